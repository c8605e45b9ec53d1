"""Ring's hot paths through the C half (_ring.c, _port.c): functions of a Ring that ``ring.use``
binds as its methods, over the reference methods of the same names, when partition/abi/impl.py
found the extension usable. Each hands the ring's buffer and geometry to one C call and, where
the C drain stopped at a slot it leaves to the reference (unpublished, abandoned, malformed),
goes on with ring.py's careful path; the answers are the reference's, which
tests/test_ring_differential.py checks."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from partition.abi.ring import Replies, Ring

#: the extension these paths call (set by ``ring.use``; they are bound only with it). A module
#: global read straight in each path: a look-up function was one more call per send and drain
fast: Any = None


def send(self: Ring, sender_id: int, sender_cpu: int, msg_type: int, data: bytes,
         counter: tuple[memoryview, int] | None = None) -> int:
    cbuf, coff = counter if counter is not None else (None, 0)
    rc: int = fast.send(self.buf, self.nslots, self.stride, self.slot_bytes, sender_id,
                        sender_cpu, cbuf, coff, msg_type & 0xFFFFFFFF, data)
    if rc > 0:
        self.refuse(rc, len(data))
    return -rc


def sender(self: Ring, sender_id: int, sender_cpu: int,
           counter: tuple[memoryview, int] | None = None,
           doorbell: tuple[int, int, int] | None = None) -> Callable[[int, bytes], int]:
    if doorbell is not None:        # a C Port without a peer entry rings it itself
        port: Callable[[int, bytes], int] = self.port(sender_id, sender_cpu, counter,
                                                       doorbell, None)
        return port
    cbuf, coff = counter if counter is not None else (None, 0)
    return functools.partial(fast.send, self.buf, self.nslots, self.stride, self.slot_bytes,
                             sender_id, sender_cpu, cbuf, coff)


def port(self: Ring, sender_id: int, sender_cpu: int, counter: tuple[memoryview, int] | None,
         doorbell: tuple[int, int, int], entry: tuple[Any, int, int, int] | None) -> Any:
    cbuf, coff = counter if counter is not None else (None, 0)
    peers, at, state, pid = entry if entry is not None else (None, 0, 0, 0)
    return fast.Port(self.buf, self.nslots, self.stride, self.slot_bytes, sender_id,
                     sender_cpu, cbuf, coff, *doorbell, peers, at, state, pid)


def idle_enter(self: Ring) -> bool:
    idle: bool = fast.idle_enter(self.buf, self.nslots, self.stride, self.slot_bytes)
    return idle


def poller(self: Ring) -> Callable[..., Any] | None:
    return functools.partial(fast.poll, self.buf, self.nslots, self.stride, self.slot_bytes)


def waiter(self: Ring, limit: int, handled: bytes | bytearray,
           deliver: Callable[[int, int, int, bytes], bool], replies: Replies, owner: Any,
           waiting: dict[int, int], doorbell_fd: int = -1) -> Any:
    return fast.Waiter(self.buf, self.nslots, self.stride, self.slot_bytes, limit, handled,
                       deliver, replies, owner, self.finish, waiting, doorbell_fd)


def drain(self: Ring, deliver: Callable[[int, int, int, bytes], bool], limit: int = 64,
          abandon_after: float = 1.0, handled: bytes | bytearray | None = None,
          hush: bool = False, replies: Replies | None = None) -> int:
    # C consumed, counted and delivered the well-formed prefix; it says when there is more,
    # and the careful path takes over from there
    return self._rest(fast.drain(self.buf, self.nslots, self.stride, self.slot_bytes,
                                 limit, handled, deliver, hush, replies),
                      limit, abandon_after, handled, deliver)


def halt(self: Ring, doorbell_fd: int, timeout: float,
         deliver: Callable[[int, int, int, bytes], bool], limit: int = 64,
         handled: bytes | bytearray | None = None, abandon_after: float = 1.0,
         hush: bool = False, replies: Replies | None = None) -> int | None:
    got = fast.halt(self.buf, self.nslots, self.stride, self.slot_bytes, doorbell_fd,
                    float(timeout), limit, handled, deliver, hush, replies)
    if got is None:
        return None
    return self._rest(got, limit, abandon_after, handled, deliver)


#: what ``ring.use`` binds over Ring's reference methods of the same names
PATHS: dict[str, Callable[..., Any]] = {
    "send": send, "sender": sender, "port": port, "idle_enter": idle_enter,
    "poller": poller, "waiter": waiter, "drain": drain, "halt": halt}
