"""Wire format between ``mkctl`` and the supervisor: length-prefixed msgpack maps.

One request per connection: ``{"op": str, "args": {...}}`` answered by ``{"ok": true, "result":
...}`` or ``{"ok": false, "error": {class, message, hint}}``. The supervisor treats every request
as untrusted: size-limited, shape-checked, and unknown ops or arguments are refused by name.
"""

from __future__ import annotations

import socket
import struct
from typing import Any

import msgpack

MAX_FRAME = 16 << 20
_LEN = struct.Struct(">I")


class ProtocolError(Exception):
    pass


def send(sock: socket.socket, obj: Any) -> None:
    sock.sendall(frame(obj))


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ProtocolError("connection closed mid-frame")
        buf += chunk
    return bytes(buf)


def recv(sock: socket.socket) -> Any:
    (n,) = _LEN.unpack(_recv_exact(sock, _LEN.size))
    if n > MAX_FRAME:
        raise ProtocolError(f"frame of {n} bytes exceeds {MAX_FRAME}")
    return _decode(_recv_exact(sock, n))


#: ``parse`` of a buffer that does not hold a whole frame yet
INCOMPLETE: Any = object()


def frame(obj: Any) -> bytes:
    """One whole frame: length and msgpack bytes."""
    data = msgpack.packb(obj, use_bin_type=True)
    if len(data) > MAX_FRAME:
        raise ProtocolError(f"frame of {len(data)} bytes exceeds {MAX_FRAME}")
    return _LEN.pack(len(data)) + data


def parse(buf: bytes | bytearray) -> Any:
    """The object in the first frame of ``buf``, or ``INCOMPLETE``; ProtocolError for a frame
    that is too large (said as soon as its length is read) or undecodable."""
    if len(buf) < _LEN.size:
        return INCOMPLETE
    (n,) = _LEN.unpack_from(buf, 0)
    if n > MAX_FRAME:
        raise ProtocolError(f"frame of {n} bytes exceeds {MAX_FRAME}")
    if len(buf) < _LEN.size + n:
        return INCOMPLETE
    return _decode(bytes(buf[_LEN.size:_LEN.size + n]))


def _decode(data: bytes) -> Any:
    try:
        return msgpack.unpackb(data, raw=False, strict_map_key=True)
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
        raise ProtocolError(f"undecodable frame: {exc}") from None
