"""The control slot: one 256-byte record per instance id in the shared control area, and the
one implementation of every field's offset, width and encoding (docs/arena.md has the table).

The first 24 bytes are the spawn mailbox of the SMP INIT trampoline; after them come the
peer-state table entry other instances read before sending, the halt handshake, and the
counters an instance keeps about itself. Every field has one writer (``FIELDS`` says which);
whatever an instance wrote is an untrusted value to everyone else.

``ControlSlot`` is the typed accessor the host, the trampoline and the endpoint use; the hot
paths of a kernel (the main loop's progress counter, a send's peer-state check) use the
precompiled ``STATE_PID`` and ``bump`` below, which read the same offsets without a descriptor
call per access.
"""

from __future__ import annotations

import struct
from typing import Any, NamedTuple

from partition.abi.constants import MAX_INSTANCES

SLOT_BYTES = 256
REASON_BYTES = 128

_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


class Field(NamedTuple):
    """One field: where it is, how wide, and who writes it."""
    offset: int
    width: int            # 4 or 8 bytes (u32/u64); the reason is bytes of REASON_BYTES
    writer: str           # "host", "instance", or "both" (documented in docs/arena.md)


# name -> (offset, width, writer); the order is the table of docs/arena.md
FIELDS: dict[str, Field] = {
    "target_cpu": Field(0, 4, "host"),          # physical id of the boot CPU
    "flags": Field(4, 4, "host"),               # reserved, 0
    "ready": Field(8, 4, "both"),               # host sets 1 last; the boot CPU clears it
    "ack_cpu": Field(12, 4, "instance"),        # physical id the trampoline found itself on
    "generation": Field(16, 8, "host"),         # boot generation
    "peer_state": Field(24, 4, "both"),         # state code; the trampoline writes "active"
    "pid": Field(28, 4, "both"),                # pid of the running instance
    "force_halt": Field(32, 4, "host"),         # host sets 1 to demand a halt
    "reason_len": Field(36, 4, "instance"),     # bytes used in reason
    "progress": Field(40, 8, "instance"),       # main-loop iterations
    "ipi_sent": Field(48, 8, "instance"),       # messages this instance published
    "ipi_ring_full": Field(56, 8, "instance"),  # sends refused with ENOSPC
    "reason": Field(64, REASON_BYTES, "instance"),  # utf-8 halt/panic reason
    "ipi_esrch": Field(192, 8, "instance"),     # sends refused: target not active
    "heartbeats_sent": Field(200, 8, "instance"),  # heartbeats sent to the host
    "doorbell_fd": Field(208, 4, "instance"),   # its doorbell's descriptor number
    "redirect": Field(212, 4, "host"),          # id + 1 of the standby serving this role; 0 none
    "booted": Field(216, 8, "instance"),        # the generation whose boot() has returned
}

# offsets by name, for the hot paths and the pure-Python ring
SLOT_TARGET_CPU = FIELDS["target_cpu"].offset
SLOT_READY = FIELDS["ready"].offset
SLOT_ACK_CPU = FIELDS["ack_cpu"].offset
SLOT_GENERATION = FIELDS["generation"].offset
SLOT_PEER_STATE = FIELDS["peer_state"].offset
SLOT_PID = FIELDS["pid"].offset
SLOT_FORCE_HALT = FIELDS["force_halt"].offset
SLOT_PROGRESS = FIELDS["progress"].offset
SLOT_IPI_SENT = FIELDS["ipi_sent"].offset
SLOT_IPI_RING_FULL = FIELDS["ipi_ring_full"].offset
SLOT_IPI_ESRCH = FIELDS["ipi_esrch"].offset
SLOT_HEARTBEATS = FIELDS["heartbeats_sent"].offset
SLOT_REDIRECT = FIELDS["redirect"].offset

#: (peer_state, pid) in one read: adjacent on purpose, a send checks both
STATE_PID = struct.Struct("<II")
assert SLOT_PID == SLOT_PEER_STATE + 4


def bump(buf: Any, offset: int) -> None:
    """Add one to the u64 counter at ``offset`` of ``buf`` (wrapping)."""
    _U64.pack_into(buf, offset, (_U64.unpack_from(buf, offset)[0] + 1) & 0xFFFFFFFFFFFFFFFF)


class _Int:
    """Descriptor of one integer field of a ``ControlSlot``."""

    __slots__ = ("codec", "offset")

    def __init__(self, name: str) -> None:
        f = FIELDS[name]
        self.offset = f.offset
        self.codec = _U32 if f.width == 4 else _U64

    def __get__(self, slot: ControlSlot, owner: type | None = None) -> int:
        return int(self.codec.unpack_from(slot.buf, slot.base + self.offset)[0])

    def __set__(self, slot: ControlSlot, value: int) -> None:
        mask = 0xFFFFFFFF if self.codec is _U32 else 0xFFFFFFFFFFFFFFFF
        self.codec.pack_into(slot.buf, slot.base + self.offset, value & mask)


class ControlSlot:
    """Typed fields of the control slot of one instance id, over any buffer holding it (the
    host's whole-arena map, an instance's control-area map)."""

    __slots__ = ("base", "buf")

    target_cpu = _Int("target_cpu")
    flags = _Int("flags")
    ready = _Int("ready")
    ack_cpu = _Int("ack_cpu")
    generation = _Int("generation")
    peer_state = _Int("peer_state")
    pid = _Int("pid")
    force_halt = _Int("force_halt")
    reason_len = _Int("reason_len")
    progress = _Int("progress")
    ipi_sent = _Int("ipi_sent")
    ipi_ring_full = _Int("ipi_ring_full")
    ipi_esrch = _Int("ipi_esrch")
    heartbeats_sent = _Int("heartbeats_sent")
    doorbell_fd = _Int("doorbell_fd")
    redirect = _Int("redirect")
    booted = _Int("booted")

    def __init__(self, buf: Any, base: int = 0) -> None:
        self.buf = buf
        self.base = base

    @property
    def reason(self) -> str:
        """The instance's own account of its halt. Untrusted: length clamped, bytes decoded
        with replacement, NULs dropped."""
        n = min(self.reason_len, REASON_BYTES)
        start = self.base + FIELDS["reason"].offset
        raw = bytes(self.buf[start:start + n])
        return raw.decode("utf-8", "replace").replace("\x00", "").strip()

    @reason.setter
    def reason(self, text: str) -> None:
        raw = text.encode("utf-8", "replace")[:REASON_BYTES]
        start = self.base + FIELDS["reason"].offset
        self.buf[start:start + REASON_BYTES] = raw.ljust(REASON_BYTES, b"\x00")
        self.reason_len = len(raw)

    def clear(self) -> None:
        """Zero the whole slot (a new instance, a deleted one)."""
        self.buf[self.base:self.base + SLOT_BYTES] = bytes(SLOT_BYTES)

    def to_dict(self) -> dict[str, int | str]:
        out: dict[str, int | str] = {name: getattr(self, name) for name in FIELDS
                                     if name != "reason"}
        out["reason"] = self.reason
        return out


def slot_of(control: Any, instance_id: int, control_base: int = 0) -> ControlSlot:
    """The slot of ``instance_id`` in a control area starting at ``control_base`` of
    ``control``. The id is checked: it indexes shared memory."""
    if not 0 <= instance_id < MAX_INSTANCES:
        raise ValueError(f"instance id {instance_id} is outside 0..{MAX_INSTANCES - 1}")
    return ControlSlot(control, control_base + instance_id * SLOT_BYTES)
