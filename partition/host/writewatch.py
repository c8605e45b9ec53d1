"""Who wrote into whose partition: write attribution on machines without protection.

With protection (the default) an instance maps only its own partition, so a write into another
one is a page fault in the writer, and nothing here is needed. Without protection every instance
maps the whole arena, as kernels sharing one physical address space do; then a wild write lands,
and a checksum can only say *that* a partition changed, not *who* changed it, nor tell a
kernel's own writes from a neighbour's.

Each unprotected instance write-protects the pool part of its whole-arena mapping with an
asynchronous userfaultfd at boot (``trampoline._watch_foreign_writes``): writes proceed without
any handler, and the page tables of the writing process remember them. The host scans and
re-arms those marks with PAGEMAP_SCAN on ``/proc/PID/pagemap`` and charges every written page
to the partition that holds it. A kernel's own partition is mapped a second time (its
``memory``) and never watched, so its own writes cost nothing and are never charged.

Guarantees and limits:
- a page written by instance W inside the partition of instance V (W != V) is recorded once per
  scan in which it was written, as ``foreign_writes`` of V and ``wild_pages`` of W, with an event;
- a scan runs every ``period`` seconds while the machine is driven, and just before the host
  kills an instance; writes made by a writer in its last ``period`` before it died by itself
  are lost with its page tables (its victim's checksum still shows them);
- an instance whose watch could not be armed is reported once (``write_watch_unavailable``)
  and its writes stay unattributed.
"""

from __future__ import annotations

import errno
import time
from typing import TYPE_CHECKING

from partition import linux
from partition.host.instance import Instance

if TYPE_CHECKING:
    from partition.abi.layout import ArenaLayout
    from partition.host.arena import Arena
    from partition.host.events import EventLog

PAGE = 4096


class WriteWatch:
    """The write scans of one unprotected machine's instances (``instances``: its table,
    by name)."""

    def __init__(self, instances: dict[str, Instance], layout: ArenaLayout, arena: Arena,
                 events: EventLog, period: float = 0.1) -> None:
        self.instances = instances
        self.layout = layout
        self.arena = arena
        self.events = events
        self.period = period
        self._next = 0.0
        self._where: dict[int, int] = {}              # pid -> address of its arena mapping
        self._unwatched: set[int] = set()             # pids already reported as unavailable
        self.scans = 0

    def due(self, now: float) -> bool:
        return now >= self._next

    @property
    def next_due(self) -> float:
        """When the next periodic scan is due (CLOCK_MONOTONIC)."""
        return self._next

    def scan(self, only: Instance | None = None) -> int:
        """Charge the pages written since the last scan; returns how many foreign pages."""
        self._next = time.monotonic() + self.period
        self.scans += 1
        found = 0
        writers = [only] if only is not None else list(self.instances.values())
        for inst in writers:
            if inst.pid is not None:
                found += self._scan_one(inst)
        return found

    def forget(self, pid: int) -> None:
        self._where.pop(pid, None)
        self._unwatched.discard(pid)

    def _scan_one(self, writer: Instance) -> int:
        pid = writer.pid
        assert pid is not None
        lay = self.layout
        base = self._where.get(pid)
        if base is None:
            try:
                base = self._arena_base(linux.mappings_of(pid, self.arena.tag))
            except OSError:
                return 0                               # gone meanwhile: its exit is handled
            if base is None:
                return 0                               # booting (or a zombie): nothing mapped
            self._where[pid] = base
        try:
            regions = linux.written_pages(pid, base + lay.pool_offset,
                                          base + lay.pool_offset + lay.pool_bytes)
        except OSError as exc:
            if exc.errno == errno.EPERM and pid not in self._unwatched:
                self._unwatched.add(pid)
                self.events.warning("write_watch_unavailable", instance=writer.id,
                                      name=writer.name, pid=pid, error=str(exc))
            return 0
        charged: dict[str, list[int]] = {}
        for start, end in regions:
            for page in range(start - base, end - base, PAGE):
                owner = self._owner(page)
                if owner is writer:
                    continue
                charged.setdefault(owner.name if owner else "(free pool)", []).append(page)
        for victim_name, pages in charged.items():
            victim = self.instances.get(victim_name)
            writer.count("wild_pages", len(pages))
            if victim is not None:
                victim.count("foreign_pages", len(pages))
                victim.foreign_writes[writer.name] = victim.foreign_writes.get(writer.name, 0) \
                    + len(pages)
            self.events.warning("foreign_write", instance=writer.id, name=writer.name,
                                  victim=victim_name, pages=len(pages),
                                  first_address=hex(pages[0]))
        return sum(len(p) for p in charged.values())

    def _arena_base(self, maps: list[tuple[int, int, int]]) -> int | None:
        """Where the whole-arena mapping starts. Arming the watch split it in two VMAs (before
        the pool, the pool), so look for a mapping at file offset 0 followed by the pool."""
        pool_off = self.layout.pool_offset
        starts = {(lo, off) for lo, _, off in maps}
        for lo, _, off in maps:
            if off == 0 and (lo + pool_off, pool_off) in starts:
                return lo
        return None

    def _owner(self, arena_offset: int) -> Instance | None:
        for inst in self.instances.values():
            if inst.memory_base <= arena_offset < inst.memory_base + inst.memory_bytes:
                return inst
        return None


def foreign_mappers(instances: dict[str, Instance], arena_tag: str, name: str) -> list[str]:
    """Running instances other than ``name`` that map any byte of its partition, from the
    kernel's own account (/proc/PID/maps). With protection this must be empty: it is how a
    protected run shows its partitions were out of reach, rather than assuming it."""
    victim = instances[name]
    lo, hi = victim.memory_base, victim.memory_base + victim.memory_bytes
    out = []
    for inst in instances.values():
        if inst is victim or inst.pid is None:
            continue
        try:
            maps = linux.mappings_of(inst.pid, arena_tag)
        except OSError:
            continue
        if any(off < hi and off + (end - start) > lo for start, end, off in maps):
            out.append(inst.name)
    return out
