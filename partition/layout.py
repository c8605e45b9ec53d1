"""Byte layout of the physical-memory arena (documented in docs/arena.md; keep both in step).

Everything is computed from a handful of sizes so that the host and a booting instance agree on
where things are without exchanging anything but the header. All offsets are page-aligned, so each
region can be mapped on its own with ``mmap(fd, offset=...)``: that is what lets an instance map
only what it owns.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from .units import PAGE_SIZE

MAGIC = b"MKARENA\x00"
VERSION = 2
MAX_INSTANCES = 512          # ids 0..511; 0 is the host
NAME_BYTES = 32
KERNEL_BYTES = 64

# Header (page 0). Little-endian, naturally aligned.
HEADER = struct.Struct("<8sIIQIIQIIQIIQQQQQQQQII")
HEADER_FIELDS = (
    "magic", "version", "page_size", "arena_bytes", "max_instances", "flags",
    "table_offset", "table_record_bytes", "_pad0",
    "control_offset", "control_slot_bytes", "_pad1",
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

# Control slot, one per instance id, in the shared control area.
# The first part is the spawn mailbox of the SMP INIT trampoline.
CONTROL_SLOT_BYTES = 256
SLOT_TARGET_CPU = 0       # u32 physical id of the boot CPU (host writes)
SLOT_FLAGS = 4            # u32
SLOT_READY = 8            # u32 host sets 1 last; boot CPU clears to 0
SLOT_ACK_CPU = 12         # u32 physical id the trampoline found itself on
SLOT_GENERATION = 16      # u64 boot generation (host writes)
SLOT_PEER_STATE = 24      # u32 state code of this instance (host writes; the peer-state table)
SLOT_PID = 28             # u32 pid of the running instance, 0 if none (host writes)
SLOT_FORCE_HALT = 32      # u32 host sets 1 to demand a halt
SLOT_REASON_LEN = 36      # u32 bytes of halt/panic reason (instance writes)
SLOT_PROGRESS = 40        # u64 main-loop iterations (instance writes)
SLOT_IPI_SENT = 48        # u64 messages this instance published (instance writes)
SLOT_IPI_RING_FULL = 56   # u64 sends refused with ENOSPC (instance writes)
SLOT_IPI_ESRCH = 192      # u64 sends refused because the target was not active
SLOT_HEARTBEATS = 200     # u64 heartbeats sent to the host
SLOT_DOORBELL_FD = 208    # u32 descriptor number of the instance's doorbell in its own process
SLOT_REDIRECT = 212       # u32 id + 1 of the standby now serving this id's role; 0: none (host)
SLOT_REASON = 64          # 128 bytes: utf-8 halt/panic reason
REASON_BYTES = 128

# Console (kmsg) buffer, one per instance id.
CONSOLE_HEADER = struct.Struct("<IIQ")   # magic, capacity, head (bytes ever written)
CONSOLE_MAGIC = 0x4B4D5347               # 'KMSG'
CONSOLE_DATA = 64

# IPI ring, one per receiving instance id (ring.py has the protocol).
RING_HEADER_BYTES = 256
RING_SLOT_HEADER = 32

STATE_CODES = {"empty": 0, "ready": 1, "loaded": 2, "active": 3, "failed": 4}


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
    def control_bytes(self) -> int:
        return _align(MAX_INSTANCES * CONTROL_SLOT_BYTES, PAGE_SIZE)

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

    def ring_at(self, instance_id: int) -> int:
        return self.ring_offset + instance_id * self.ring_bytes

    @property
    def pool_offset(self) -> int:
        return _align(self.ring_offset + self.ring_area_bytes, 2 << 20)

    @property
    def arena_bytes(self) -> int:
        return self.pool_offset + self.pool_bytes

    def console_at(self, instance_id: int) -> int:
        return self.console_offset + instance_id * self.console_bytes

    def control_slot_at(self, instance_id: int) -> int:
        """Offset of a control slot relative to the start of the control area."""
        return instance_id * CONTROL_SLOT_BYTES

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
