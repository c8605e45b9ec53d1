"""The messaging layer over IPI rings: ``mk_message`` headers, handlers, request/response.

A message is one ring slot: the slot's ``type`` is ``msg_type`` and its bytes are the header
``{u32 msg_type; u32 msg_subtype; u64 msg_id; u32 payload_len}`` followed by a msgpack payload
(header + payload <= slot size, else EMSGSIZE). Type numbers are the real tree's. One handler per
type (a second is refused with EEXIST); a message of a type nobody handles is dropped and counted.

Request/response (emulator convention, the real tree keys its pending table by type, op and
resource): a request carries ``SUB_REQUEST`` in its subtype; the handler's return value comes
back as a message of the same type with ``SUB_RESPONSE`` and the same ``msg_id``; the requester
waits for it with a timeout (ETIMEDOUT).
"""

from __future__ import annotations

import errno
import functools
import itertools
import os
import struct
import time
from typing import Any, Callable, NamedTuple

import msgpack

from . import ring as _ring
from .ring import RingError

HEADER = struct.Struct("<IIQI")

# categories and types (include/linux/multikernel.h of the real tree)
MK_MSG_IO = 0x1000
MK_MSG_IRQ_FORWARD, MK_MSG_IRQ_BALANCE, MK_MSG_IRQ_MASK, MK_MSG_IRQ_UNMASK = 0x1001, 0x1002, 0x1003, 0x1004
MK_MSG_RESOURCE = 0x2000
MK_MSG_CPU_ADD, MK_MSG_CPU_REMOVE, MK_MSG_MEM_ADD, MK_MSG_MEM_REMOVE = 0x2001, 0x2002, 0x2003, 0x2004
MK_MSG_QUERY, MK_MSG_DEVICE_ADD, MK_MSG_DEVICE_REMOVE = 0x2005, 0x2006, 0x2007
MK_MSG_RES_ACK = 0x2100
MK_MSG_SYSTEM = 0x3000
MK_MSG_HEARTBEAT, MK_MSG_SHUTDOWN, MK_MSG_SHUTDOWN_ACK, MK_MSG_HALTED = 0x3001, 0x3002, 0x3003, 0x3004
MK_MSG_USER = 0x4000
# emulator inventions (no counterpart in the real tree), all in 0x3Fxx: fault injection into a
# kernel; the probes of partition/probes.py take 0x3F02-0x3F06; an ipi-storm floods with a type
# no kernel handles, so that every storm message is dropped and counted at the victim
MK_EMU_FAULT = 0x3F01
MK_EMU_STORM = 0x3F0F
MK_MSG_NETWORK = 0x5000

SUB_REQUEST = 0x4000_0000
SUB_RESPONSE = 0x8000_0000


class Message(NamedTuple):
    """One delivered message. A named tuple, built with ``tuple.__new__`` on the receive path:
    a dataclass's Python ``__init__`` cost 0.24 us a message, a quarter of a decode."""
    msg_type: int
    msg_subtype: int
    msg_id: int
    payload: Any
    sender: int          # instance id (0 = host)
    sender_cpu: int      # physical id


_new = tuple.__new__
_unpack_header = HEADER.unpack_from
_HEADER_SIZE = HEADER.size


# One packer, reused: packb builds a new one per call, which costs more than packing a small
# payload. Reuse is safe against the IPI signal handler: it runs between bytecodes, never
# inside this C call.
_pack = msgpack.Packer(use_bin_type=True, autoreset=True).pack


def encode(msg_type: int, subtype: int, msg_id: int, payload: Any) -> bytes:
    body = _pack(payload)
    return HEADER.pack(msg_type, subtype, msg_id, len(body)) + body


def decode_py(data: bytes, sender: int, cpu: int) -> Message | None:
    """None for a slot whose header does not describe its bytes (dropped as bad size). The
    reference; ``decode`` is _fastring.c's copy of it when the extension is built."""
    if len(data) < _HEADER_SIZE:
        return None
    mtype, sub, mid, plen = _unpack_header(data, 0)
    if plen != len(data) - _HEADER_SIZE:
        return None
    if plen >= 2 and data[_HEADER_SIZE] == 0xC4 and data[_HEADER_SIZE + 1] == plen - 2:
        # a msgpack bin 8 (bytes of up to 255): the commonest payload of a data message, read
        # without msgpack's machinery, which costs 2 us on the caches a wake-up finds
        payload = data[_HEADER_SIZE + 2:]
    else:
        try:
            payload = _unpackb(data[_HEADER_SIZE:], raw=False, strict_map_key=False)
        except Exception:  # noqa: BLE001 - garbage from a faulty peer
            return None
    return _new(Message, (mtype, sub, mid, payload, sender, cpu))


_unpackb = msgpack.unpackb

decode = decode_py
if _ring._fast is not None:          # (None also when the build is stale or MK_PURE_RING=1)
    _ring._fast.configure(Message, functools.partial(msgpack.unpackb, raw=False,
                                                     strict_map_key=False))
    decode = _ring._fast.decode


Handler = Callable[[Message], Any]


class Messenger:
    """Handlers and pending requests of one endpoint (an instance or the host)."""

    def __init__(self, self_id: int, post: Callable[[int, int, bytes], int],
                 liveness: Callable[[int], Callable[[], bool]] | None = None) -> None:
        self.self_id = self_id
        self._post = post          # post(target, msg_type, bytes) -> id it reached (a standby's)
        # liveness(id) -> alive(): is the incarnation that got our request still there? A
        # request to a peer that dies meanwhile then fails with ESRCH at once, not at timeout.
        self._liveness = liveness
        self.last_target = -1
        self.handlers: dict[int, Handler] = {}
        # the same, as a bitmap for the ring (bit t: type t handled; types >= 65536 always
        # reach deliver): the C drain drops unhandled types with one load per message
        self.handled = bytearray(8192)
        self._ids = itertools.count((os.getpid() & 0xFFFF) << 40 | 1)
        self.responses: dict[int, Message] = {}
        self.waiting: set[int] = set()
        self.bad = 0
        self.unhandled = 0

    def register(self, msg_type: int, handler: Handler) -> None:
        if msg_type in self.handlers:
            raise RingError(errno.EEXIST, f"a handler for message type {msg_type:#x} is already "
                                          "registered")
        self.handlers[msg_type] = handler
        if 0 <= msg_type < 65536:
            self.handled[msg_type >> 3] |= 1 << (msg_type & 7)

    def unregister(self, msg_type: int) -> None:
        self.handlers.pop(msg_type, None)
        if 0 <= msg_type < 65536:
            self.handled[msg_type >> 3] &= ~(1 << (msg_type & 7)) & 0xFF

    def send(self, target: int, msg_type: int, payload: Any = None, subtype: int = 0,
             msg_id: int | None = None) -> int:
        mid = next(self._ids) if msg_id is None else msg_id
        self.last_target = self._post(target, msg_type, encode(msg_type, subtype, mid, payload))
        return mid

    def request(self, target: int, msg_type: int, payload: Any, timeout: float,
                wait: Callable[[float], None]) -> Any:
        mid = next(self._ids)
        self.waiting.add(mid)     # before sending: the answer may come in an interrupt at once
        deadline = time.monotonic() + timeout
        try:
            backoff = 20e-6
            while True:      # a full ring is back pressure: retry until the deadline
                try:
                    self.send(target, msg_type, payload, SUB_REQUEST, mid)
                    break
                except RingError as exc:
                    left = deadline - time.monotonic()
                    if exc.errno != errno.ENOSPC or left <= 0:
                        raise
                    # a receiver drains a slot in about a microsecond: look again soon, then
                    # less often (20 us doubling to 1 ms), not a whole millisecond at once
                    wait(min(left, backoff))
                    backoff = min(backoff * 2, 0.001)
            alive = self._liveness(self.last_target) if self._liveness else None
            next_look = 0.0
            while mid not in self.responses:
                now = time.monotonic()
                left = deadline - now
                if left <= 0:
                    raise RingError(errno.ETIMEDOUT, f"no response to message {mid:#x} "
                                                     f"(type {msg_type:#x}) from instance "
                                                     f"{target} within {timeout:g} s")
                if alive is not None:
                    if now >= next_look:         # every 2 ms, off the polling fast path
                        next_look = now + 0.002
                        if not alive():
                            raise RingError(errno.ESRCH, f"instance {self.last_target} halted "
                                                         f"while request {mid:#x} was pending")
                    left = min(left, 0.01)       # look again soon: a death rings no doorbell
                wait(left)
            return self.responses.pop(mid).payload
        finally:
            self.waiting.discard(mid)
            self.responses.pop(mid, None)

    def deliver(self, msg_type: int, sender: int, cpu: int, data: bytes) -> bool:
        """Ring callback. False means no handler took it (the ring counts the drop). Runs
        once per message, first thing after a wake-up: a response is posted directly rather
        than through ``send``, which would only add a call."""
        msg = decode(data, sender, cpu)     # (unhandled types mostly never get here: the ring
                                            # drops them with the ``handled`` bitmap)
        if msg is None or msg[0] != msg_type:
            self.bad += 1
            return True                     # consumed; counted here as malformed
        sub = msg[1]
        if sub & SUB_RESPONSE:
            if msg[2] in self.waiting:
                self.responses[msg[2]] = msg
            return True
        handler = self.handlers.get(msg_type)
        if handler is None:
            self.unhandled += 1
            return False
        result = handler(msg)
        if sub & SUB_REQUEST:
            try:
                self.last_target = self._post(sender, msg_type,
                                              encode(msg_type, SUB_RESPONSE, msg[2], result))
            except RingError:
                pass                        # the requester will time out; nothing to undo
        return True
