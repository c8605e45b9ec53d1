"""The resource pool (``/resources`` of the baseline device tree) and every check on it.

All validation of a create request happens here, before anything changes: the caller gets either
a complete reservation or an exception, never half of one. Messages follow kerf's wording where
kerf has one ("CPU 2 is reserved for host kernel", "CPU overlap detected (CPUs 8-11)",
"Total memory allocation (16G) exceeds memory pool (14G)").
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any

from partition import linux
from partition.abi.layout import MAX_INSTANCES
from partition.errors import AlreadyExists, InvalidSpec, OutOfMemory, PermissionDenied, ResourceBusy
from partition.units import (
    PAGE_SIZE,
    format_cpulist,
    format_size,
    parse_cpulist,
    parse_size,
    require_page_aligned,
)

NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]{0,30}$")
RESERVED_NAMES = {"host"}


@dataclass
class PoolConfig:
    """What ``mkctl init`` fixes for the machine's lifetime."""

    cpus: list[int]
    host_cpus: list[int]
    memory_bytes: int
    oversubscribe: bool
    physical_ids: dict[int, int] = field(default_factory=dict)

    @classmethod
    def build(cls, cpus: str | list[int] | None = None, memory: str | int = "1G",
              host_cpus: str | list[int] | None = "0", oversubscribe: bool = False) -> PoolConfig:
        online = sorted(os.sched_getaffinity(0))
        host = [] if host_cpus in (None, "", "none", []) else parse_cpulist(host_cpus, "host CPU list")
        missing = [c for c in host if c not in online]
        if missing:
            raise InvalidSpec(f"host CPUs {format_cpulist(missing)} are not available to this "
                              f"process (available: {format_cpulist(online)})",
                              "choose --host-cpus from the available CPUs")
        if cpus is None:
            pool = [c for c in online if c not in host]
            if not pool:
                if not oversubscribe:
                    raise InvalidSpec(
                        f"no CPU left for the pool: available {format_cpulist(online)}, "
                        f"all reserved for the host",
                        "pass --oversubscribe to let instances share host cores, or fewer --host-cpus")
                pool = list(online)
        else:
            pool = parse_cpulist(cpus, "pool CPU list")
        absent = [c for c in pool if c not in online]
        if absent:
            raise InvalidSpec(f"CPUs {format_cpulist(absent)} are not available to this process "
                              f"(available: {format_cpulist(online)})",
                              f"choose pool CPUs from {format_cpulist(online)}")
        taken = [c for c in pool if c in host]
        if taken and not oversubscribe:
            raise PermissionDenied(f"CPU {format_cpulist(taken)} is reserved for host kernel",
                                   "leave host CPUs out of --cpus, or pass --oversubscribe")
        nbytes = parse_size(memory, "memory pool")
        require_page_aligned(nbytes, "memory pool", memory)
        phys = linux.physical_cpu_ids()
        return cls(cpus=pool, host_cpus=host, memory_bytes=nbytes, oversubscribe=oversubscribe,
                   physical_ids={c: phys.get(c, c) for c in set(pool) | set(host)})

    def to_dict(self) -> dict[str, object]:
        return {"cpus": self.cpus, "host_cpus": self.host_cpus, "memory_bytes": self.memory_bytes,
                "oversubscribe": self.oversubscribe}


@dataclass
class Reservation:
    id: int
    name: str
    cpus: list[int]
    memory_offset: int       # within the pool
    memory_bytes: int


#: where the pool places a chunk it grows by (the instances' memory granule, 2 MiB)
POOL_GRANULE = 2 << 20


def host_memory_bytes() -> int:
    """The host's RAM (MemTotal), in whole granules: how far the pool's window reaches past
    what ``init`` asked for, so that the pool can grow at run time (``memory-add`` under
    ``/resources``) without moving the arena. 0 when /proc/meminfo cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024 // POOL_GRANULE * POOL_GRANULE
    except (OSError, ValueError, IndexError):
        pass
    return 0


def pool_window(memory_bytes: int) -> int:
    """The arena's pool area for a pool of ``memory_bytes``: what it holds now and, beyond it,
    the host's RAM as room to grow into. Address space only: the arena is sparse, a page costs
    memory when it is written, and a chunk that leaves the pool has its pages punched out."""
    return memory_bytes + host_memory_bytes()


def pool_shape(memory: int, chunks: Any, window: Any) -> tuple[list[tuple[int, int]], int]:
    """The pool's chunks (pool-relative) and window: fresh, or as a state file recorded them
    (checked: a window of whole pages holding page-aligned chunks that do not overlap)."""
    if chunks is None and window is None:
        return ([(0, memory)] if memory else []), pool_window(memory)
    try:
        if type(window) is not int or window <= 0 or window % PAGE_SIZE:
            raise ValueError(f"window {window!r}")
        out = sorted((int(b), int(n)) for b, n in chunks or [])
        end = 0
        for b, n in out:
            if b < end or n <= 0 or b % PAGE_SIZE or n % PAGE_SIZE or b + n > window:
                raise ValueError(f"chunk {b:#x}+{n:#x}")
            end = b + n
    except (TypeError, ValueError) as exc:
        raise InvalidSpec(f"the recorded pool is not one this host can rebuild ({exc})",
                          "mkctl shutdown removes what the dead host left") from None
    return out, window


def place_chunk(chunks: list[tuple[int, int]], window: int, nbytes: int, base: int,
                align: int = POOL_GRANULE) -> int | None:
    """Where a chunk of ``nbytes`` the pool grows by goes, among ``chunks`` in a window of
    ``window`` bytes: the lowest free range whose physical address (``base`` + offset) is
    ``align``-aligned (the pool picks the base, as the real kernel does), or None."""
    cursor = 0
    for lo, size in sorted(chunks) + [(window, 0)]:
        at = -(-(base + cursor) // align) * align - base
        if at + nbytes <= lo:
            return at
        cursor = max(cursor, lo + size)
    return None


class ResourcePool:
    """Tracks which CPUs, memory ranges, names and ids are taken.

    The pool's memory is a set of chunks (pool-relative offset, bytes) inside the arena's pool
    area (``window`` bytes, host/machine.py): one chunk at offset 0 at init, more as the pool
    grows at run time (host/poolresize.py), fewer as whole chunks go back to the host. An
    instance's region lies inside one chunk."""

    def __init__(self, config: PoolConfig, window: int | None = None,
                 chunks: list[tuple[int, int]] | None = None) -> None:
        self.config = config
        self.window = config.memory_bytes if window is None else window
        self.chunks: list[tuple[int, int]] = sorted(chunks) if chunks is not None else (
            [(0, config.memory_bytes)] if config.memory_bytes else [])
        self.cpu_users: dict[int, list[str]] = {c: [] for c in config.cpus}
        self.regions: dict[str, tuple[int, int]] = {}     # name -> (offset in pool, bytes)
        #: regions added at run time (overlay memory-add), oldest first: name -> [(offset, bytes)]
        self.extra: dict[str, list[tuple[int, int]]] = {}
        self.ids: dict[int, str] = {}
        # bytes reserved, kept as regions come and go: the pool's fields are in the views of
        # every change, and summing the regions there made each change O(N log N)
        self._used = 0

    # -- queries ---------------------------------------------------------------------------
    @property
    def memory_used(self) -> int:
        return self._used

    def taken(self) -> list[tuple[int, int]]:
        """Every reserved range of the pool (pool-relative offset, bytes), sorted."""
        out = list(self.regions.values())
        for ranges in self.extra.values():
            out += ranges
        return sorted(out)

    @property
    def memory_available(self) -> int:
        return self.config.memory_bytes - self.memory_used

    def cpus_available(self) -> list[int]:
        return [c for c, users in self.cpu_users.items() if not users]

    def shared_cpus(self, name: str, cpus: list[int]) -> list[int]:
        """CPUs of ``name`` that another instance or the host also runs on. (Counted, not
        searched: 511 instances share two CPUs in ``bench scale``, and ``show`` asks this of
        every one of them.)"""
        host, users = self.config.host_cpus, self.cpu_users
        out = []
        for c in cpus:
            on = users.get(c)
            if c in host or (on and (on[0] != name or on[-1] != name
                                     or on.count(name) != len(on))):
                out.append(c)
        return out

    # -- reservation -----------------------------------------------------------------------
    def plan(self, name: str, memory: str | int, cpus: str | list[int] | None = None,
             cpu_count: int | None = None, instance_id: int | None = None) -> Reservation:
        """Validate a create request completely; change nothing."""
        if not isinstance(name, str) or not NAME_RE.match(name) or name in RESERVED_NAMES:
            raise InvalidSpec(f"invalid instance name {name!r}",
                              "use 1-31 characters [A-Za-z0-9_.-], starting with a letter or _, "
                              "not 'host'")
        if name in self.regions:
            raise AlreadyExists(f"an instance named {name!r} already exists", "choose another name")
        if instance_id is not None:
            if isinstance(instance_id, bool) or not isinstance(instance_id, int) or \
                    not 1 <= instance_id < MAX_INSTANCES:
                raise InvalidSpec(f"instance id {instance_id!r} is out of range 1..{MAX_INSTANCES - 1}",
                                  "id 0 is the host; pick 1..511 or leave --id out")
            if instance_id in self.ids:
                raise AlreadyExists(f"instance id {instance_id} is taken by {self.ids[instance_id]!r}",
                                    "pick another --id or leave it out")
            iid = instance_id
        else:
            free = [i for i in range(1, MAX_INSTANCES) if i not in self.ids]
            if not free:
                raise ResourceBusy("all 511 instance ids are in use", "delete an instance first")
            iid = free[0]
        nbytes = parse_size(memory, "memory")
        require_page_aligned(nbytes, "memory", memory)
        chosen = self._plan_cpus(cpus, cpu_count)
        if self.memory_used + nbytes > self.config.memory_bytes:
            raise OutOfMemory(
                f"Total memory allocation ({format_size(self.memory_used + nbytes)}) exceeds "
                f"memory pool ({format_size(self.config.memory_bytes)})",
                f"{format_size(self.memory_available) if self.memory_available else 'nothing'} "
                f"is free; ask for less or init a bigger --memory")
        offset = self._first_fit(nbytes)
        return Reservation(iid, name, chosen, offset, nbytes)

    def _plan_cpus(self, cpus: str | list[int] | None, cpu_count: int | None) -> list[int]:
        cfg = self.config
        if (cpus is None) == (cpu_count is None):
            raise InvalidSpec("give exactly one of --cpus LIST or --cpu-count N",
                              "e.g. --cpus 1 or --cpu-count 1")
        if cpus is not None:
            chosen = parse_cpulist(cpus)
            for c in chosen:
                if c not in cfg.cpus:
                    if c in cfg.host_cpus:
                        every = format_cpulist(sorted(set(cfg.cpus) | set(cfg.host_cpus)))
                        raise PermissionDenied(
                            f"CPU {c} is reserved for host kernel",
                            f"choose from the pool: {format_cpulist(cfg.cpus)}; to let instances "
                            f"share the host's CPU, mkctl init --cpus {every} --oversubscribe"
                            + (" (--oversubscribe alone shares only the pool's CPUs)"
                               if cfg.oversubscribe else ""))
                    raise InvalidSpec(f"CPU {c} is not in the pool ({format_cpulist(cfg.cpus)})",
                                      f"choose from the pool: {format_cpulist(cfg.cpus)}")
            if not cfg.oversubscribe:
                overlap = [c for c in chosen if self.cpu_users[c]]
                if overlap:
                    owners = sorted({u for c in overlap for u in self.cpu_users[c]})
                    raise ResourceBusy(
                        f"CPU overlap detected (CPUs {format_cpulist(overlap)}) with "
                        f"{', '.join(repr(o) for o in owners)}",
                        f"free CPUs: {format_cpulist(self.cpus_available()) or 'none'}; or init "
                        f"the machine with --oversubscribe to share cores")
            return chosen
        if isinstance(cpu_count, bool) or not isinstance(cpu_count, int) or cpu_count < 1:
            raise InvalidSpec(f"--cpu-count must be a positive integer, got {cpu_count!r}",
                              "e.g. --cpu-count 1")
        if cpu_count > len(cfg.cpus):
            raise InvalidSpec(f"--cpu-count {cpu_count} exceeds the pool's "
                              f"{len(cfg.cpus)} CPUs ({format_cpulist(cfg.cpus)})",
                              f"ask for at most {len(cfg.cpus)}")
        free = self.cpus_available()
        if len(free) >= cpu_count:
            return free[:cpu_count]
        if not cfg.oversubscribe:
            raise ResourceBusy(f"only {len(free)} CPUs free in the pool "
                               f"({format_cpulist(free) or 'none'}), {cpu_count} requested",
                               "delete an instance, ask for fewer, or init with --oversubscribe")
        by_load = sorted(cfg.cpus, key=lambda c: (len(self.cpu_users[c]), c))
        return sorted(by_load[:cpu_count])

    def gaps(self) -> list[tuple[int, int]]:
        """Every free range of the pool (start, end), pool-relative, chunk by chunk: a region
        never straddles two chunks."""
        taken = self.taken()
        out = []
        for lo, size in self.chunks:
            cursor, hi = lo, lo + size
            for off, n in taken:
                if off + n <= lo or off >= hi:
                    continue
                if off > cursor:
                    out.append((cursor, off))
                cursor = max(cursor, off + n)
            if hi > cursor:
                out.append((cursor, hi))
        return out

    def _first_fit(self, nbytes: int) -> int:
        largest = 0
        for lo, hi in self.gaps():
            if hi - lo >= nbytes:
                return lo
            largest = max(largest, hi - lo)
        raise OutOfMemory(f"no contiguous free region of {format_size(nbytes)} in the pool "
                          f"(largest hole {format_size(largest)}; fragmentation)",
                          "ask for at most the largest hole, or delete instances")

    def commit(self, r: Reservation) -> None:
        for c in r.cpus:
            self.cpu_users[c].append(r.name)
        old = self.regions.get(r.name)
        self._used += r.memory_bytes - (old[1] if old else 0)
        self.regions[r.name] = (r.memory_offset, r.memory_bytes)
        self.ids[r.id] = r.name

    def release(self, name: str, instance_id: int, cpus: list[int]) -> None:
        for c in cpus:
            if name in self.cpu_users.get(c, []):
                self.cpu_users[c].remove(name)
        region = self.regions.pop(name, None)
        self._used -= (region[1] if region else 0) + sum(n for _, n in self.extra.pop(name, []))
        self.ids.pop(instance_id, None)

    # -- runtime changes (host/resize.py): each checked by the caller's plan first ---------
    def range_free(self, offset: int, nbytes: int) -> str | None:
        """Why [offset, offset+nbytes) of the pool cannot be reserved, or None if it can."""
        if offset < 0 or nbytes <= 0 or not any(lo <= offset and offset + nbytes <= lo + n
                                                for lo, n in self.chunks):
            return (f"the range is outside the pool: no chunk holds pool offset "
                    f"{offset:#x}+{nbytes:#x} (chunks at pool offsets "
                    f"{', '.join(f'{lo:#x}+{n:#x}' for lo, n in self.chunks) or 'none'})")
        for off, size in self.taken():
            if off < offset + nbytes and offset < off + size:
                owner = next((n for n, r in self.regions.items() if r == (off, size)), None) or \
                    next((n for n, rs in self.extra.items() if (off, size) in rs), "?")
                return f"range overlaps {owner!r}'s region {off:#x}+{size:#x}"
        return None

    def highest_free(self, nbytes: int, align: int, base: int) -> int | None:
        """The highest free range of ``nbytes`` whose physical address (``base`` + offset) is
        ``align``-aligned, as kerf picks where memory added to an instance goes; None if none."""
        best = None
        for lo, hi in self.gaps():
            at = (base + hi - nbytes) // align * align
            if at >= base + lo and (best is None or at > best):
                best = at
        return best

    def add_range(self, name: str, offset: int, nbytes: int) -> None:
        self.extra.setdefault(name, []).append((offset, nbytes))
        self._used += nbytes

    def remove_range(self, name: str, offset: int, nbytes: int) -> None:
        ranges = self.extra.get(name, [])
        ranges.remove((offset, nbytes))
        self._used -= nbytes
        if not ranges:
            self.extra.pop(name, None)

    def add_cpus(self, name: str, cpus: list[int]) -> None:
        for c in cpus:
            self.cpu_users[c].append(name)

    def remove_cpus(self, name: str, cpus: list[int]) -> None:
        for c in cpus:
            if name in self.cpu_users.get(c, []):
                self.cpu_users[c].remove(name)

    # -- the pool itself grows and shrinks (host/poolresize.py checks first) ----------------
    def chunk_owner(self, offset: int, nbytes: int) -> str | None:
        """Who holds memory inside the chunk [offset, offset+nbytes), or None."""
        for name, (off, size) in self.regions.items():
            if off < offset + nbytes and offset < off + size:
                return name
        for name, ranges in self.extra.items():
            if any(off < offset + nbytes and offset < off + size for off, size in ranges):
                return name
        return None

    def place_chunk(self, nbytes: int, base: int) -> int | None:
        return place_chunk(self.chunks, self.window, nbytes, base)

    def add_chunk(self, offset: int, nbytes: int) -> None:
        self.chunks = sorted(self.chunks + [(offset, nbytes)])
        self.config.memory_bytes += nbytes

    def remove_chunk(self, offset: int, nbytes: int) -> None:
        self.chunks.remove((offset, nbytes))
        self.config.memory_bytes -= nbytes

    def add_pool_cpu(self, cpu: int, physical_id: int, keep_host: bool) -> None:
        """A host CPU joins the pool; it stays the host's too only when ``keep_host``."""
        cfg = self.config
        cfg.cpus = sorted(cfg.cpus + [cpu])
        self.cpu_users = {c: self.cpu_users.get(c, []) for c in cfg.cpus}   # in CPU order
        cfg.physical_ids[cpu] = physical_id
        if not keep_host and cpu in cfg.host_cpus:
            cfg.host_cpus = [c for c in cfg.host_cpus if c != cpu]

    def remove_pool_cpu(self, cpu: int, to_host: bool = True) -> None:
        """A free pool CPU goes back to the host kernel (``to_host``: it runs the host's
        work again; an undone cpu-add gives back only what it took)."""
        cfg = self.config
        cfg.cpus = [c for c in cfg.cpus if c != cpu]
        self.cpu_users.pop(cpu, None)
        if to_host and cpu not in cfg.host_cpus:
            cfg.host_cpus = sorted(cfg.host_cpus + [cpu])
