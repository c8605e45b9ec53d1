"""The control area: who may write what, field by field (docs/arena.md has the tables).

Two records per instance id, each with one writer, because a shared field is a field any
instance can forge:

- the **peer entry** (64 bytes, in the peer table): the spawn mailbox and the peer-state table
  every instance reads before sending (state, pid, generation, redirect, force_halt). Only the
  host writes it; instances map the peer table read-only, so what they read there is the
  host's word and may be acted on (a route, a halt request);
- the **own page** (4 KiB): what an instance says about itself (its answer to the mailbox, its
  halt reason, counters, boot() done). Only that instance maps it writable; no peer maps it;
  the host reads it as untrusted input: a number it shows, a reason it clamps and decodes,
  never a pid, a descriptor, a route or a verdict.

``PeerEntry`` and ``OwnPage`` are the typed accessors the host, the trampoline and the endpoint
use; the hot paths of a kernel (the main loop's progress counter, a send's peer-state check)
use the precompiled ``STATE_PID`` and ``bump``, which read the same offsets without a
descriptor call per access.
"""

from __future__ import annotations

import struct
from typing import Any, NamedTuple

from partition.abi.constants import MAX_INSTANCES

PEER_BYTES = 64            # one entry of the peer table
OWN_BYTES = 4096           # one page: each instance maps its own, and nobody else's
REASON_BYTES = 128

_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


class Field(NamedTuple):
    """One field: where it is in its record, how wide, and who writes it."""
    offset: int
    width: int            # 4 or 8 bytes (u32/u64); the reason is bytes of REASON_BYTES
    writer: str           # "host" or "instance"


#: the peer table entry of one id: host-written, read-only to every instance
PEER_FIELDS: dict[str, Field] = {
    "target_cpu": Field(0, 4, "host"),          # physical id of the boot CPU
    "epoch": Field(4, 4, "host"),               # service epoch: kept across a live update
    "ready": Field(8, 4, "host"),               # the mailbox is published for ``generation``
    "force_halt": Field(12, 4, "host"),         # the host demands a halt
    "generation": Field(16, 8, "host"),         # boot generation
    "peer_state": Field(24, 4, "host"),         # state code, as in the instance table
    "pid": Field(28, 4, "host"),                # pid of the running incarnation, 0 if none
    "redirect": Field(32, 4, "host"),           # id + 1 of the standby serving this role; 0 none
    "cmd_seq": Field(36, 4, "host"),            # the last host command's number
    "cmd_digest": Field(40, 24, "host"),        # digests of the last COMMAND_WINDOW commands
}
COMMAND_WINDOW = 3
CMD_DIGEST = PEER_FIELDS["cmd_digest"].offset

#: the own page of one id: written by that instance only, untrusted to everyone else
OWN_FIELDS: dict[str, Field] = {
    "ack_cpu": Field(0, 4, "instance"),         # physical id the trampoline found itself on
    "reason_len": Field(4, 4, "instance"),      # bytes used in reason
    "ack_generation": Field(8, 8, "instance"),  # the mailbox answer: the generation it boots
    "progress": Field(16, 8, "instance"),       # main-loop iterations
    "ipi_sent": Field(24, 8, "instance"),       # messages this instance published
    "ipi_ring_full": Field(32, 8, "instance"),  # sends refused with ENOSPC
    "ipi_esrch": Field(40, 8, "instance"),      # sends refused: target not active
    "heartbeats_sent": Field(48, 8, "instance"),  # heartbeats sent to the host
    "booted": Field(56, 8, "instance"),         # the generation whose boot() has returned
    "ring_resets": Field(64, 8, "instance"),    # times it reset its own ring (a bad header)
    "forged_commands": Field(72, 8, "instance"),  # host commands it refused as not the host's
    "res_ack_seq": Field(80, 8, "instance"),    # the host command a RES_ACK below answers
    "res_ack_status": Field(88, 8, "instance"),  # 0 accepted, else the errno it refused with
    "reason": Field(128, REASON_BYTES, "instance"),  # utf-8 halt/panic reason
    "res_ack_reason": Field(256, REASON_BYTES, "instance"),  # utf-8: why it refused
    "kho_count": Field(1024, 4, "host"),         # KHO: regions handed over to this run (table in)
    "kho_declared": Field(1028, 4, "instance"),  # KHO: regions this run preserves (table out)
    "kho_flags": Field(1032, 4, "instance"),     # KHO: bit 0, keep the rest of the partition
}

#: Kernel hand-over (KHO): tables of preserved regions of the partition, in the own page. A run
#: declares its regions in the table out (kho_preserve); when the run ends the host checks them
#: and computes each one's CRC32; before the next run boots the host writes the checked table in,
#: CRCs filled, for the new kernel to find (kho_restore), and clears the table out. Entry: name
#: (32 bytes, NUL-padded), offset and size within the partition (u64, page-aligned), crc32
#: (u32), reserved (u32).
KHO_TABLE_IN = 1040
KHO_TABLE_OUT = 2048
KHO_ENTRY = struct.Struct("<32sQQII")
KHO_MAX = 16
KHO_KEEP_REST = 1

#: a kernel's own metrics (Kernel.metric), in its own page: up to METRICS_MAX entries of a
#: NUL-padded name (24 bytes) and an f64; untrusted to the host, which checks both
METRICS_AT = 3072
METRIC = struct.Struct("<24sd")
METRICS_MAX = 16

# offsets by name, for the hot paths
PEER_STATE = PEER_FIELDS["peer_state"].offset
PEER_PID = PEER_FIELDS["pid"].offset
PEER_REDIRECT = PEER_FIELDS["redirect"].offset
PEER_FORCE_HALT = PEER_FIELDS["force_halt"].offset
OWN_PROGRESS = OWN_FIELDS["progress"].offset
OWN_IPI_SENT = OWN_FIELDS["ipi_sent"].offset
OWN_IPI_RING_FULL = OWN_FIELDS["ipi_ring_full"].offset
OWN_IPI_ESRCH = OWN_FIELDS["ipi_esrch"].offset
OWN_HEARTBEATS = OWN_FIELDS["heartbeats_sent"].offset
#: the own page's counters, which lie side by side (OwnPage.counts reads them in one go)
OWN_COUNTS = ("ipi_sent", "ipi_ring_full", "ipi_esrch", "heartbeats_sent", "booted",
              "ring_resets", "forged_commands")
_OWN_COUNTS_AT = OWN_FIELDS[OWN_COUNTS[0]].offset
assert [OWN_FIELDS[k].offset for k in OWN_COUNTS] == \
    list(range(_OWN_COUNTS_AT, _OWN_COUNTS_AT + 8 * len(OWN_COUNTS), 8))
_OWN_COUNTS = struct.Struct(f"<{len(OWN_COUNTS)}Q")
OWN_RING_RESETS = OWN_FIELDS["ring_resets"].offset
OWN_FORGED_COMMANDS = OWN_FIELDS["forged_commands"].offset

U32 = _U32                  # one field read on a hot path (PeerTable.route's redirect)

#: (peer_state, pid) in one read: adjacent on purpose, a send checks both
STATE_PID = struct.Struct("<II")
#: a peer entry's (epoch, peer_state, pid) in one read, from the entry's start: which
#: incarnation a request went to (guest/endpoint.py, PeerTable.incarnation)
EPOCH_STATE_PID = struct.Struct("<4xI16xII")
assert PEER_PID == PEER_STATE + 4


def bump(buf: Any, offset: int, n: int = 1) -> None:
    """Add ``n`` to the u64 counter at ``offset`` of ``buf`` (wrapping)."""
    _U64.pack_into(buf, offset, (_U64.unpack_from(buf, offset)[0] + n) & 0xFFFFFFFFFFFFFFFF)


class _Int:
    """Descriptor of one integer field of a record."""

    __slots__ = ("codec", "mask", "offset")

    def __init__(self, fields: dict[str, Field], name: str) -> None:
        f = fields[name]
        self.offset = f.offset
        self.codec = _U32 if f.width == 4 else _U64
        self.mask = (1 << (8 * f.width)) - 1

    def __get__(self, rec: _Record, owner: type | None = None) -> int:
        return int(self.codec.unpack_from(rec.buf, rec.base + self.offset)[0])

    def __set__(self, rec: _Record, value: int) -> None:
        self.codec.pack_into(rec.buf, rec.base + self.offset, value & self.mask)


class _Record:
    """A record at ``base`` of any buffer holding it (the host's whole-arena map, an
    instance's mapping of its own page or of the peer table)."""

    __slots__ = ("base", "buf")
    SIZE = 0

    def __init__(self, buf: Any, base: int = 0) -> None:
        self.buf = buf
        self.base = base

    def clear(self) -> None:
        self.buf[self.base:self.base + self.SIZE] = bytes(self.SIZE)


class PeerEntry(_Record):
    """The host's entry for one instance id in the peer table."""

    __slots__ = ()
    SIZE = PEER_BYTES
    target_cpu = _Int(PEER_FIELDS, "target_cpu")
    epoch = _Int(PEER_FIELDS, "epoch")
    ready = _Int(PEER_FIELDS, "ready")
    force_halt = _Int(PEER_FIELDS, "force_halt")
    generation = _Int(PEER_FIELDS, "generation")
    peer_state = _Int(PEER_FIELDS, "peer_state")
    pid = _Int(PEER_FIELDS, "pid")
    redirect = _Int(PEER_FIELDS, "redirect")
    cmd_seq = _Int(PEER_FIELDS, "cmd_seq")

    def digest(self, seq: int) -> int:
        """The digest the host published for its command ``seq`` (while in the window)."""
        return int(_U64.unpack_from(self.buf, self.base + CMD_DIGEST
                                    + 8 * (seq % COMMAND_WINDOW))[0])

    def publish_command(self, seq: int, digest: int) -> None:
        """Host: the digest first, then the number that makes it current."""
        _U64.pack_into(self.buf, self.base + CMD_DIGEST + 8 * (seq % COMMAND_WINDOW), digest)
        self.cmd_seq = seq


class OwnPage(_Record):
    """What one instance writes about itself."""

    __slots__ = ()
    SIZE = OWN_BYTES
    ack_cpu = _Int(OWN_FIELDS, "ack_cpu")
    reason_len = _Int(OWN_FIELDS, "reason_len")
    ack_generation = _Int(OWN_FIELDS, "ack_generation")
    progress = _Int(OWN_FIELDS, "progress")
    ipi_sent = _Int(OWN_FIELDS, "ipi_sent")
    ipi_ring_full = _Int(OWN_FIELDS, "ipi_ring_full")
    ipi_esrch = _Int(OWN_FIELDS, "ipi_esrch")
    heartbeats_sent = _Int(OWN_FIELDS, "heartbeats_sent")
    booted = _Int(OWN_FIELDS, "booted")
    ring_resets = _Int(OWN_FIELDS, "ring_resets")
    forged_commands = _Int(OWN_FIELDS, "forged_commands")
    res_ack_seq = _Int(OWN_FIELDS, "res_ack_seq")
    res_ack_status = _Int(OWN_FIELDS, "res_ack_status")
    kho_count = _Int(OWN_FIELDS, "kho_count")
    kho_declared = _Int(OWN_FIELDS, "kho_declared")
    kho_flags = _Int(OWN_FIELDS, "kho_flags")

    def counts(self) -> dict[str, int]:
        """The instance's counters (OWN_COUNTS), read at once: the host's ``show`` reads them
        for every instance (untrusted: plain integers, shown as read)."""
        return dict(zip(OWN_COUNTS, _OWN_COUNTS.unpack_from(self.buf, self.base + _OWN_COUNTS_AT)))

    def set_metric(self, name: str, value: float) -> None:
        raw = name.encode()[:24]
        free = None
        for i in range(METRICS_MAX):
            at = self.base + METRICS_AT + i * METRIC.size
            got = METRIC.unpack_from(self.buf, at)[0].rstrip(b"\0")
            if got == raw:
                METRIC.pack_into(self.buf, at, raw, value)
                return
            if not got and free is None:
                free = at
        if free is None:
            raise ValueError(f"at most {METRICS_MAX} metrics")
        METRIC.pack_into(self.buf, free, raw, value)

    def clear_metrics(self) -> None:
        at = self.base + METRICS_AT
        self.buf[at:at + METRICS_MAX * METRIC.size] = bytes(METRICS_MAX * METRIC.size)

    def metrics(self) -> dict[str, float]:
        """The published metrics, checked: printable names, finite values."""
        out: dict[str, float] = {}
        buf = self.buf
        for at in range(self.base + METRICS_AT, self.base + METRICS_AT + METRICS_MAX * METRIC.size,
                        METRIC.size):
            if not buf[at]:
                continue            # no name (a name that starts with NUL is refused anyway)
            raw, value = METRIC.unpack_from(buf, at)
            name = raw.rstrip(b"\0")
            if name and all(32 < c < 127 for c in name) and value == value \
                    and abs(value) != float("inf"):
                # a count published as 1001 reads back 1001, not 1001.0 (the slot holds an
                # f64 whatever was published; an integral one is exact up to 2**53)
                out[name.decode()] = int(value) if value.is_integer() and abs(value) <= 2**53 \
                    else value
        return out

    def kho_entries(self, out: bool = False) -> list[tuple[bytes, int, int, int]]:
        """A KHO table: (raw name, offset, size, crc), at most KHO_MAX entries whatever its
        count says. The table out is the kernel's word (untrusted to the host)."""
        n = min(self.kho_declared if out else self.kho_count, KHO_MAX)
        at = self.base + (KHO_TABLE_OUT if out else KHO_TABLE_IN)
        return [KHO_ENTRY.unpack_from(self.buf, at + i * KHO_ENTRY.size)[:4] for i in range(n)]

    def write_kho(self, entries: list[tuple[str, int, int, int]], out: bool = False) -> None:
        at = self.base + (KHO_TABLE_OUT if out else KHO_TABLE_IN)
        for i, (name, offset, size, crc) in enumerate(entries[:KHO_MAX]):
            KHO_ENTRY.pack_into(self.buf, at + i * KHO_ENTRY.size, name.encode()[:32], offset,
                                size, crc, 0)
        if out:
            self.kho_declared = min(len(entries), KHO_MAX)
        else:
            self.kho_count = min(len(entries), KHO_MAX)

    @property
    def reason(self) -> str:
        """The instance's own account of its halt. Untrusted: length clamped, bytes decoded
        with replacement, NULs dropped."""
        n = min(self.reason_len, REASON_BYTES)
        start = self.base + OWN_FIELDS["reason"].offset
        raw = bytes(self.buf[start:start + n])
        return raw.decode("utf-8", "replace").replace("\x00", "").strip()

    @reason.setter
    def reason(self, text: str) -> None:
        raw = text.encode("utf-8", "replace")[:REASON_BYTES]
        start = self.base + OWN_FIELDS["reason"].offset
        self.buf[start:start + REASON_BYTES] = raw.ljust(REASON_BYTES, b"\x00")
        self.reason_len = len(raw)

    @property
    def res_ack_reason(self) -> str:
        """Why the kernel refused a resource change. Untrusted: NUL-terminated within 128
        bytes, decoded with replacement."""
        start = self.base + OWN_FIELDS["res_ack_reason"].offset
        raw = bytes(self.buf[start:start + REASON_BYTES]).split(b"\x00", 1)[0]
        return raw.decode("utf-8", "replace").strip()

    def res_ack(self, seq: int, status: int, reason: str = "") -> None:
        """The kernel's RES_ACK for host command ``seq``: status and reason first, the number
        last, so the host never reads a number without its status."""
        raw = reason.encode("utf-8", "replace")[:REASON_BYTES - 1]
        start = self.base + OWN_FIELDS["res_ack_reason"].offset
        self.buf[start:start + REASON_BYTES] = raw.ljust(REASON_BYTES, b"\x00")
        self.res_ack_status = status
        self.res_ack_seq = seq


def _check_id(instance_id: int) -> None:
    if not 0 <= instance_id < MAX_INSTANCES:
        raise ValueError(f"instance id {instance_id} is outside 0..{MAX_INSTANCES - 1}")


def peer_of(table: Any, instance_id: int, table_base: int = 0) -> PeerEntry:
    """The entry of ``instance_id`` in a peer table starting at ``table_base`` of ``table``.
    The id is checked: it indexes shared memory."""
    _check_id(instance_id)
    return PeerEntry(table, table_base + instance_id * PEER_BYTES)


def own_of(pages: Any, instance_id: int, pages_base: int = 0) -> OwnPage:
    """The own page of ``instance_id`` among pages starting at ``pages_base`` of ``pages``."""
    _check_id(instance_id)
    return OwnPage(pages, pages_base + instance_id * OWN_BYTES)
