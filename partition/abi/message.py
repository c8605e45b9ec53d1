"""The ``mk_message`` codec and the message type numbers (handlers and requests: guest/endpoint.py).

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

import functools
import hashlib
import struct
from typing import Any, NamedTuple

import msgpack

from partition.abi import impl

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
MK_EMU_PROBE_START = 0x3F02      # host -> probe source, request
MK_EMU_PROBE_PING = 0x3F03       # source -> target, request: bytes, answered with the same
MK_EMU_PROBE_DATA = 0x3F04       # source -> target: [probe id, bytes]
MK_EMU_PROBE_REPORT = 0x3F05     # agent -> host: a batch of samples
MK_EMU_PROBE_FLUSH = 0x3F06      # host -> agent, request: stop and send what is pending
# the real mktty's messages are of type "MKTY" with input = 1, output = 2 (devices.md); its type
# number is not in the reference, so the emulator's is its own. Input only: a kernel's output
# is its console buffer (abi/console.py), read by the host, never a message
MK_EMU_MKTY = 0x3F07             # host -> kernel: {"op": MKTY_INPUT, "line": str}
MKTY_INPUT, MKTY_OUTPUT = 1, 2
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


def command_digest(seq: int, generation: int, msg_type: int, body: Any) -> int:
    """The 64-bit digest of a host command to one run of an instance (seq, the run's boot
    generation, type, body), as both sides compute it; with the generation in it, a command
    replayed into the instance's next run matches nothing. The host
    publishes it in the peer table, which only the host can write, and a kernel obeys a host
    command only when the message matches it, so a peer that forges the sender id of a host
    command in a ring slot still cannot make it an order (guest/kernel.py)."""
    raw = msgpack.packb([seq, generation, msg_type, body], use_bin_type=True)
    return int.from_bytes(hashlib.blake2b(raw, digest_size=8).digest(), "little")


#: what ``Kernel.host_command`` answers for a command the host did not send
NOT_FROM_HOST: Any = object()

#: the message types a kernel accepts from the host only, and only as digested commands
HOST_COMMANDS = frozenset({MK_MSG_SHUTDOWN, MK_EMU_FAULT, MK_EMU_PROBE_START,
                           MK_EMU_PROBE_FLUSH, MK_EMU_MKTY, MK_MSG_CPU_ADD, MK_MSG_CPU_REMOVE, MK_MSG_MEM_ADD,
                           MK_MSG_MEM_REMOVE, MK_MSG_QUERY})
#: the runtime resource operations (RESOURCE category), in the order one overlay applies them
RESOURCE_ORDER = (MK_MSG_MEM_REMOVE, MK_MSG_MEM_ADD, MK_MSG_CPU_REMOVE, MK_MSG_CPU_ADD)


def encode(msg_type: int, subtype: int, msg_id: int, payload: Any) -> bytes:
    body = _pack(payload)
    return HEADER.pack(msg_type, subtype, msg_id, len(body)) + body


def decode_py(data: bytes, sender: int, cpu: int) -> Message | None:
    """None for a slot whose header does not describe its bytes (dropped as bad size). The
    reference; ``decode`` is _message.c's copy of it when the extension is used."""
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
        except Exception:
            return None
    return _new(Message, (mtype, sub, mid, payload, sender, cpu))


_unpackb = msgpack.unpackb

# -- the selector: the codec's C half (_message.c) when partition/abi/impl.py uses the
# extension, given the Message type and msgpack's callables for the forms it leaves to them
decode = decode_py
if impl.FAST is not None:
    impl.FAST.configure(Message, functools.partial(msgpack.unpackb, raw=False,
                                                   strict_map_key=False), _pack)
    decode = impl.FAST.decode
