"""One IPC endpoint: how a kernel, or the host, sends and receives ``mk_message``s.

The send side addresses a peer (its id, followed once through a standby's redirect), binds a
send to the peer's ring and doorbell for the incarnation it found running, and rings the
doorbell by hand when the bound send could not. The receive side is the ``Messenger``: one
handler per type, requests and their responses. Instances and the host differ only in where
they learn about a peer, so that is a ``PeerDirectory`` handed in: an instance reads the
shared peer-state table (``PeerTable`` here), the host reads its own records
(``partition.host.hostipc``). The host's end reuses this class instead of copying it.

Request/response (emulator convention; the real tree keys its pending table by type, op and
resource): a request carries ``SUB_REQUEST`` in its subtype; the handler's return value comes
back as a message of the same type with ``SUB_RESPONSE`` and the same ``msg_id``; the requester
waits for it with a timeout (ETIMEDOUT).
"""

from __future__ import annotations

import errno
import itertools
import os
import time
from collections.abc import Callable
from typing import Any, Protocol

from partition import linux
from partition.abi import slot as S
from partition.abi.constants import HOST_ID, IPI_SIGNAL, MAX_INSTANCES, STATE_ACTIVE
from partition.abi.layout import ArenaLayout
from partition.abi.message import SUB_REQUEST, SUB_RESPONSE, Message, decode, encode
from partition.abi.ring import Ring, RingError

#: (wake_fd, signal_pid, signo) as Ring.sender takes it, and whether the endpoint owns wake_fd
Doorbell = tuple[int, int, int]
#: a bound send, the pid it was bound for, its doorbell, and the wake_fd to close (-1: none)
Bound = tuple[Callable[[int, bytes], int], int, Doorbell, int]


class PeerDirectory(Protocol):
    """Where an endpoint learns about its peers."""

    def route(self, target: int) -> tuple[int, int]:
        """(id, pid) of the instance that serves ``target`` now (a standby after a takeover);
        RingError(ESRCH) when none is active."""

    def doorbell(self, target: int, pid: int) -> tuple[Doorbell, int]:
        """The doorbell of incarnation ``pid`` of ``target``, and the descriptor the endpoint
        must close when it lets go of it (-1: none of its own)."""

    def liveness(self, target: int) -> Callable[[], bool]:
        """A test: is the incarnation of ``target`` that got our request still running?"""

    def refused(self, code: int) -> None:
        """Count a send refused with ``code`` (ENOSPC)."""


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

    def register(self, msg_type: int, handler: Handler) -> None:
        if msg_type in self.handlers:
            raise RingError(errno.EEXIST, f"a handler for message type {msg_type:#x} is already "
                                          "registered")
        self.handlers[msg_type] = handler
        if 0 <= msg_type < 65536:
            self.handled[msg_type >> 3] |= 1 << (msg_type & 7)

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
            return True                     # consumed: a slot that lies about its message
        sub = msg[1]
        if sub & SUB_RESPONSE:
            if msg[2] in self.waiting:
                self.responses[msg[2]] = msg
            return True
        handler = self.handlers.get(msg_type)
        if handler is None:
            return False
        result = handler(msg)
        if sub & SUB_REQUEST:
            try:
                self.last_target = self._post(sender, msg_type,
                                              encode(msg_type, SUB_RESPONSE, msg[2], result))
            except RingError:
                pass                        # the requester will time out; nothing to undo
        return True


class Endpoint:
    """The send side of one instance (or the host): peer addressing, bound senders, doorbells,
    redirects; ``messenger`` is its receive side."""

    def __init__(self, self_id: int, cpu: int, rings: memoryview, rings_address: int,
                 layout: ArenaLayout, directory: PeerDirectory,
                 sent_counter: tuple[memoryview, int] | None = None) -> None:
        self.id = self_id
        self.cpu = cpu                   # physical id: what the slot header carries
        self._area = rings
        self._address = rings_address
        self._layout = layout
        self.directory = directory
        self._sent_counter = sent_counter
        self._rings: dict[int, Ring] = {}
        self._senders: dict[int, Bound] = {}
        self.messenger = Messenger(self_id, self.post, directory.liveness)

    def ring_of(self, target: int) -> Ring:
        ring = self._rings.get(target)
        if ring is None:
            ring = Ring(self._area, self._address, self._layout, target)
            self._rings[target] = ring
        return ring

    def post(self, target: int, msg_type: int, data: bytes) -> int:
        """Ring + doorbell: the send path of every message. The bound send rings the doorbell
        itself (C), so nothing in Python stands between a publish and its doorbell. Returns
        the id the message reached (a standby's after a takeover)."""
        target, pid = self.directory.route(target)
        bound = self._senders.get(target)
        if bound is None or bound[1] != pid:        # first send to this incarnation
            bound = self._bind(target, pid)
        rc = bound[0](msg_type & 0xFFFFFFFF, data)
        if rc:
            if rc > 0:
                self.directory.refused(rc)
                self.ring_of(target).refuse(rc, len(data))
            ring_by_hand(bound[2])                   # the bound send could not ring it
        return target

    def _bind(self, target: int, pid: int) -> Bound:
        """A send bound to ``target``'s ring and doorbell, for the incarnation ``pid``; the
        previous binding's descriptor is closed (the peer rebooted)."""
        self.forget(target)
        doorbell, owned = self.directory.doorbell(target, pid)
        send = self.ring_of(target).sender(self.id, self.cpu, self._sent_counter, doorbell)
        bound = self._senders[target] = (send, pid, doorbell, owned)
        return bound

    def forget(self, target: int) -> None:
        """Drop the binding to ``target`` and close what the endpoint held for it."""
        old = self._senders.pop(target, None)
        if old is not None and old[3] >= 0:
            os.close(old[3])

    def close(self) -> None:
        for target in list(self._senders):
            self.forget(target)
        self._rings.clear()


def ring_by_hand(doorbell: Doorbell) -> None:
    """The doorbell a bound send could not ring (no descriptor for the peer's eventfd, or the
    write failed): a signal reaches a halted peer as well as a busy one; the host's doorbell
    (signal_pid 0) is always its eventfd."""
    wake_fd, pid, _ = doorbell
    if pid == 0:
        if wake_fd >= 0:
            os.eventfd_write(wake_fd, 1)
        return
    if pid < 0:                 # nobody to ring, ever (kill(-n) is a process group)
        return
    try:
        os.kill(pid, IPI_SIGNAL)
    except (ProcessLookupError, PermissionError):
        pass


class PeerTable:
    """An instance's directory: the peer-state table in the shared control area, which the
    host keeps and every peer's trampoline writes its own entry of. What it reads there was
    written by peers: a pid is only ever signalled or pidfd-opened, never trusted further."""

    def __init__(self, control: memoryview, own: S.ControlSlot, host_doorbell_fd: int) -> None:
        self.control = control
        self.own = own
        self.host_doorbell_fd = host_doorbell_fd

    def _u32(self, target: int, off: int) -> int:
        return int.from_bytes(self.control[target * S.SLOT_BYTES + off:
                                           target * S.SLOT_BYTES + off + 4], "little")

    def route(self, target: int) -> tuple[int, int]:
        if target.__class__ is int and 0 <= target < MAX_INSTANCES:
            state, pid = S.STATE_PID.unpack_from(self.control,
                                                 target * S.SLOT_BYTES + S.SLOT_PEER_STATE)
            if state == STATE_ACTIVE:
                return target, pid
            # a dead target whose role a standby took over: address the standby (one hop)
            via = self._u32(target, S.SLOT_REDIRECT)
            if 0 < via <= MAX_INSTANCES:
                state, pid = S.STATE_PID.unpack_from(self.control,
                                                     (via - 1) * S.SLOT_BYTES + S.SLOT_PEER_STATE)
                if state == STATE_ACTIVE:
                    return via - 1, pid
        S.bump(self.own.buf, self.own.base + S.SLOT_IPI_ESRCH)
        raise RingError(errno.ESRCH, f"instance {target} is not active")

    def doorbell(self, target: int, pid: int) -> tuple[Doorbell, int]:
        """The peer's eventfd, fetched once per peer boot with pidfd_getfd (the host's we hold
        already); a refusal leaves the signal doorbell to do the job."""
        if target == HOST_ID:
            return (self.host_doorbell_fd, 0, 0), -1
        if pid <= 0:                 # not running (yet): nobody to ring
            return (-1, -1, 0), -1
        fd = -1
        try:
            pidfd = os.pidfd_open(pid)
            try:
                fd = linux.pidfd_getfd(pidfd, S.slot_of(self.control, target).doorbell_fd)
            finally:
                os.close(pidfd)
        except OSError:
            fd = -1
        return (fd, pid, int(IPI_SIGNAL)), fd

    def liveness(self, target: int) -> Callable[[], bool]:
        if target == HOST_ID:
            return lambda: True
        peer = S.slot_of(self.control, target)
        pid = peer.pid
        return lambda: peer.peer_state == STATE_ACTIVE and peer.pid == pid

    def refused(self, code: int) -> None:
        if code == errno.ENOSPC:
            S.bump(self.own.buf, self.own.base + S.SLOT_IPI_RING_FULL)
