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
    data = msgpack.packb(obj, use_bin_type=True)
    if len(data) > MAX_FRAME:
        raise ProtocolError(f"frame of {len(data)} bytes exceeds {MAX_FRAME}")
    sock.sendall(_LEN.pack(len(data)) + data)


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
    try:
        return msgpack.unpackb(_recv_exact(sock, n), raw=False, strict_map_key=True)
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
        raise ProtocolError(f"undecodable frame: {exc}") from None
