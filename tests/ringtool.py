"""Hand-made ring contents for tests: a claim that is never published, a slot with a size that
lies, a forged sender. The emulator itself only ever claims, fills and publishes in one send
(``Ring.send`` and _ring.c); a test plays a faulty or hostile writer with these."""

import errno

from partition import linux
from partition.abi import layout as L
from partition.abi.ring import _SLOT_HDR, HEAD, POLLING, S_SIZE, Ring, RingError


def claim(ring: Ring) -> int:
    """Take the next slot's ticket by compare-and-swap of ``head``, as a sender does."""
    while True:
        h = ring.head
        if h - ring.tail >= ring.nslots:
            raise RingError(errno.ENOSPC, f"IPI ring of instance {ring.id} is full")
        if linux.cas_u64(ring.addr + HEAD, h, h + 1):
            return h


def fill(ring: Ring, ticket: int, sender_id: int, sender_cpu: int, msg_type: int,
         data: bytes) -> int:
    """Write a claimed slot without publishing it; returns its offset (for ``publish``)."""
    off = ring._slot(ticket)
    _SLOT_HDR.pack_into(ring.buf, off, sender_cpu, msg_type & 0xFFFFFFFF, sender_id + 1, 0, ticket)
    p = off + L.RING_SLOT_HEADER
    ring.buf[p:p + len(data)] = data
    return off


def publish(ring: Ring, off: int, size: int) -> None:
    """Store ``data_size`` (any value: a test may lie about it)."""
    ring._put_u64(off + S_SIZE, size)


def polling(ring: Ring) -> bool:
    return ring.buf[POLLING] != 0
