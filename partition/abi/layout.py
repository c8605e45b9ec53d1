"""Byte layout of the physical-memory arena (documented in docs/arena.md, which tests/test_docs.py
checks against these constants).

Everything is computed from a handful of sizes so that the host and a booting instance agree on
where things are without exchanging anything but the header. All offsets are page-aligned, so each
region can be mapped on its own with ``mmap(fd, offset=...)``: that is what lets an instance map
only what it owns.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from partition.abi.constants import MAX_INSTANCES
from partition.abi.slot import OWN_BYTES, PEER_BYTES
from partition.units import PAGE_SIZE

MAGIC = b"MKARENA\x00"
VERSION = 3
NAME_BYTES = 32
KERNEL_BYTES = 64

# Header (page 0). Little-endian, naturally aligned.
HEADER = struct.Struct("<8sIIQIIQIIQIIQQQQQQQQII")
HEADER_FIELDS = (
    "magic", "version", "page_size", "arena_bytes", "max_instances", "flags",
    "table_offset", "table_record_bytes", "_pad0",
    "control_offset", "peer_entry_bytes", "own_page_bytes",
    "console_offset", "console_bytes", "pool_offset", "pool_bytes", "generation", "host_pid",
    "ring_offset", "ring_bytes", "ring_slots", "ring_slot_bytes",
)
GENERATION_OFFSET = 96
FLAG_OVERSUBSCRIBE = 1 << 0
FLAG_UNPROTECTED = 1 << 1     # every instance maps the whole arena (wild writes land)

# Instance table record (host-written; instances never map the table).
TABLE_RECORD = struct.Struct(f"<II{NAME_BYTES}sQQ64sIIqii{KERNEL_BYTES}s")
TABLE_FIELDS = (
    "state", "id", "name", "memory_base", "memory_bytes", "cpu_bitmap", "pid", "boots",
    "last_exit_ns", "last_exit_signal", "last_exit_code", "kernel",
)
TABLE_RECORD_BYTES = 256

# The control area: the host's peer table (PEER_BYTES an id, read-only to instances), then one
# own page (OWN_BYTES) an id, each writable by its instance alone; slot.py has their fields.

# Console (kmsg) buffer, one per instance id.
CONSOLE_HEADER = struct.Struct("<IIQ")   # magic, capacity, head (bytes ever written)
CONSOLE_MAGIC = 0x4B4D5347               # 'KMSG'
CONSOLE_DATA = 64

# IPI ring, one per receiving instance id (ring.py has the protocol).
RING_HEADER_BYTES = 256
RING_SLOT_HEADER = 32


def _align(value: int, to: int) -> int:
    return (value + to - 1) // to * to


@dataclass(frozen=True)
class ArenaLayout:
    """Offsets of every region, derived from the pool size and the console size."""

    pool_bytes: int
    console_bytes: int = 64 * 1024
    ring_slots: int = 64                 # MK_IPI_RING_SIZE
    ring_slot_bytes: int = 4096          # MK_MAX_DATA_SIZE

    @property
    def table_offset(self) -> int:
        return PAGE_SIZE

    @property
    def control_offset(self) -> int:
        return _align(self.table_offset + MAX_INSTANCES * TABLE_RECORD_BYTES, PAGE_SIZE)

    @property
    def peer_table_bytes(self) -> int:
        return _align(MAX_INSTANCES * PEER_BYTES, PAGE_SIZE)

    @property
    def own_pages_offset(self) -> int:
        return self.control_offset + self.peer_table_bytes

    def own_at(self, instance_id: int) -> int:
        """Offset of an instance's own page (page-aligned: it maps it alone)."""
        return self.own_pages_offset + instance_id * OWN_BYTES

    @property
    def control_bytes(self) -> int:
        return self.peer_table_bytes + MAX_INSTANCES * OWN_BYTES

    @property
    def console_offset(self) -> int:
        return _align(self.control_offset + self.control_bytes, 1 << 20)

    @property
    def slot_stride(self) -> int:
        return _align(RING_SLOT_HEADER + self.ring_slot_bytes, 64)

    @property
    def ring_bytes(self) -> int:
        return _align(RING_HEADER_BYTES + self.ring_slots * self.slot_stride, PAGE_SIZE)

    @property
    def ring_offset(self) -> int:
        return _align(self.console_offset + MAX_INSTANCES * self.console_bytes, 1 << 20)

    @property
    def ring_area_bytes(self) -> int:
        return MAX_INSTANCES * self.ring_bytes

    @property
    def pool_offset(self) -> int:
        return _align(self.ring_offset + self.ring_area_bytes, 2 << 20)

    @property
    def arena_bytes(self) -> int:
        return self.pool_offset + self.pool_bytes

    def console_at(self, instance_id: int) -> int:
        return self.console_offset + instance_id * self.console_bytes

    def table_record_at(self, instance_id: int) -> int:
        return self.table_offset + instance_id * TABLE_RECORD_BYTES

    def validate(self) -> None:
        if self.console_bytes % PAGE_SIZE or self.console_bytes < PAGE_SIZE:
            raise ValueError("console size must be a positive multiple of 4 KiB")
        if self.pool_bytes % PAGE_SIZE:
            raise ValueError("pool size must be a multiple of 4 KiB")
        if not 1 <= self.ring_slots <= 4096:
            raise ValueError("ring slots must be 1..4096")
        if not 64 <= self.ring_slot_bytes <= 1 << 20:
            raise ValueError("ring slot size must be 64 bytes .. 1 MiB")
