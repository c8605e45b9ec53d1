"""Kernel hand-over (KHO): regions of a partition that survive into the next run of an instance.

A run declares regions in its own page (``Kernel.kho_preserve``; abi/slot.py has the table).
When the run ends (``capture``, from the exit path) the host reads that table as untrusted
input: a name of 1-31 printable ASCII characters, offset and size page-aligned and inside the
partition, no overlap, no duplicate name, at most 16; anything else is dropped and said in the
event log. It then takes each region's CRC32: the bytes are what the run left. Before the next
run boots (``prepare``), with the same image or a new one (a live update), the host scrubs the
rest of the partition unless the run asked to keep it (``kho_keep_rest``), and writes the checked
table, CRCs filled, where the new kernel finds it (``Kernel.kho_restore`` checks the CRC). A run
that preserved nothing leaves the partition as it always did.
"""

from __future__ import annotations

import zlib
from typing import TYPE_CHECKING

from partition.abi import slot as S
from partition.host.instance import Instance
from partition.units import PAGE_SIZE

if TYPE_CHECKING:
    from partition.host.arena import Arena
    from partition.host.events import EventLog


def capture(arena: Arena, events: EventLog, inst: Instance) -> None:
    """The run of ``inst`` ended: keep its checked KHO table, with the CRCs of now."""
    own = arena.own(inst.id)
    declared = own.kho_entries(out=True)
    if not declared:
        return
    size = inst.memory_bytes
    kept: list[tuple[str, int, int, int]] = []
    dropped: list[str] = []
    taken: list[tuple[int, int]] = []
    for raw, offset, length, _ in declared:
        name_b = raw.rstrip(b"\0")
        name = name_b.decode("ascii", "replace")
        why = None
        if not name_b or len(name_b) > 31 or b"\0" in name_b or \
                not all(32 < c < 127 for c in name_b):
            why = "its name is not 1-31 printable ASCII characters"
        elif offset % PAGE_SIZE or length % PAGE_SIZE or length <= 0 or offset + length > size:
            why = f"{offset:#x}+{length:#x} is not page-aligned inside the partition"
        elif any(o < offset + length and offset < o + z for o, z in taken):
            why = "it overlaps another preserved region"
        elif any(k[0] == name for k in kept):
            why = "its name is taken"
        if why:
            dropped.append(f"{name[:40]!r}: {why}")
            continue
        base = inst.memory_base + offset
        view = memoryview(arena.map)[base:base + length]
        try:
            kept.append((name, offset, length, zlib.crc32(view)))
        finally:
            view.release()
        taken.append((offset, length))
    inst.kho = kept
    inst.kho_keep_rest = bool(own.kho_flags & S.KHO_KEEP_REST)
    events.info("kho_captured", instance=inst.id, name=inst.name,
                  regions=[[n, o, z] for n, o, z, _ in kept], keep_rest=inst.kho_keep_rest,
                  dropped=dropped)


def prepare(arena: Arena, events: EventLog, inst: Instance) -> None:
    """The next run is about to boot: scrub what is not preserved (unless kept) and hand the
    table in; the table out starts empty."""
    own = arena.own(inst.id)
    own.kho_declared = 0
    own.kho_flags = 0
    kept = inst.kho
    if kept is None:
        own.kho_count = 0
        return
    if not inst.kho_keep_rest:
        cursor = 0
        for _, offset, length, _ in sorted(kept, key=lambda k: k[1]):
            if offset > cursor:
                arena.scrub(inst.memory_base + cursor, offset - cursor)
            cursor = offset + length
        if cursor < inst.memory_bytes:
            arena.scrub(inst.memory_base + cursor, inst.memory_bytes - cursor)
    own.write_kho(kept)
    inst.kho = None
    events.info("kho_handed_over", instance=inst.id, name=inst.name,
                  regions=[n for n, _, _, _ in kept], scrubbed_rest=not inst.kho_keep_rest)


def put_back(inst: Instance, kept: list[tuple[str, int, int, int]], keep_rest: bool) -> None:
    """A live update rolled back: the table its old run left is handed in again at its boot."""
    inst.kho, inst.kho_keep_rest = kept, keep_rest
