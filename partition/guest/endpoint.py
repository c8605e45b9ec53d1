"""One IPC endpoint: how a kernel, or the host, sends and receives ``mk_message``s.

The send side addresses a peer (its id, followed once through a standby's redirect), binds a
send to the peer's ring and doorbell for the incarnation it found running, and rings the
doorbell by hand when the bound send could not. The receive side is the ``Messenger``: one
handler per type, requests and their responses. Instances and the host differ only in where
they learn about a peer, so that is a ``PeerDirectory`` handed in: an instance reads the
shared peer-state table (``PeerTable``, guest/peers.py), the host reads its own records
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
import random
import signal
import time
from collections.abc import Callable
from typing import Any, Protocol

from partition import linux
from partition.abi.constants import IPI_SIGNAL
from partition.abi.layout import ArenaLayout
from partition.abi.message import SUB_REQUEST, SUB_RESPONSE, Message, decode, encode
from partition.abi.ring import REROUTE, Ring, RingError

#: (wake_fd, signal_pidfd, signo) as Ring.sender takes it: signal_pidfd 0 means "the host:
#: always its doorbell", below 0 "no signal possible"
Doorbell = tuple[int, int, int]
NO_DOORBELL: Doorbell = (-1, -1, 0)
#: a bound send, the pid it was bound for, its doorbell, and the descriptors it owns
Bound = tuple[Callable[[int, bytes], int], int, Doorbell, list[int]]


class PeerDirectory(Protocol):
    """Where an endpoint learns about its peers."""

    def route(self, target: int) -> tuple[int, int]:
        """(id, pid) of the instance that serves ``target`` now (a standby after a takeover);
        RingError(ESRCH) when none is active."""

    def doorbell(self, target: int, pid: int) -> tuple[Doorbell, list[int]]:
        """The doorbell of incarnation ``pid`` of ``target``, and the descriptors the endpoint
        must close when it lets go of it."""

    def retry(self, target: int) -> bool:
        """Whether a binding without a doorbell should be made again now."""

    def entry(self, target: int, pid: int) -> tuple[Any, int, int, int] | None:
        """Where a send can check, in C, that ``target`` is still incarnation ``pid``: (peer
        table, offset of its (state, pid), the state, the pid); None: no such table, every
        send is routed."""

    def incarnation(self, target: int) -> Any:
        """A token for the incarnation of ``target`` that a request just went to: taken on
        every request, so it must be cheap."""

    def alive(self, target: int, incarnation: Any) -> bool:
        """Is that incarnation (or its successor by a live update) still running?"""

    def refused(self, code: int) -> None:
        """Count a send refused with ``code`` (ENOSPC)."""


Handler = Callable[[Message], Any]

#: a request's first wait, before it reads the clock and its peer's liveness token: shorter
#: than any restart of the peer (whose death alone takes about 1 ms to notice)
FIRST_WAIT_S = 0.0005


def _no_wait(timeout: float) -> object:
    raise AssertionError("a Messenger whose owner set no wait must be given one per request")


def _no_port(*args: Any) -> int:
    raise AssertionError("a Messenger without Ports has no Port answer to settle")


class Messenger:
    """Handlers and pending requests of one endpoint (an instance or the host)."""

    def __init__(self, self_id: int, post: Callable[[int, int, int, int, Any], int],
                 directory: PeerDirectory | None = None,
                 post_many: Callable[[int, int, int, list[Any]], tuple[int, int]] | None = None,
                 ports: tuple[dict[int, Any], Callable[..., int]] | None = None) -> None:
        self.self_id = self_id
        # post(target, msg_type, subtype, msg_id, payload) -> the id it reached (a standby's)
        self._post = post
        # (the Endpoint's Ports by target, what to do with a Port's answer other than 0): a
        # request sends through its target's Port itself, without ``post``'s frame before the
        # send (a round trip's critical path); ``post`` does all the rest
        self._ports: dict[int, Any] = ports[0] if ports is not None else {}
        self._sent_after: Callable[..., int] = ports[1] if ports is not None else _no_port
        # post_many(target, msg_type, first_id, payloads) -> (the id they reached, how many)
        self._post_many = post_many or self.post_each
        # is the incarnation that got our request still there? A request to a peer that dies
        # meanwhile then fails with ESRCH at once, not at timeout.
        self._directory = directory
        self.last_target = -1
        self.handlers: dict[int, Handler] = {}
        # the same, as a bitmap for the ring (bit t: type t handled; types >= 65536 always
        # reach deliver): the C drain drops unhandled types with one load per message
        self.handled = bytearray(8192)
        self._ids = itertools.count((os.getpid() & 0xFFFF) << 40 | 1)
        # a request's id is drawn at random: a peer that cannot see it cannot answer it
        self._request_id = random.Random(os.urandom(16)).getrandbits
        self.responses: dict[int, Message] = {}
        #: ids of the requests in flight -> the instance each was sent to (-1: not sent yet)
        self.waiting: dict[int, int] = {}
        #: how ``request`` waits when its caller names no way: deliver what comes meanwhile
        #: for up to the seconds given (a kernel's runtime sets its own; see runtime.py)
        self.wait: Callable[[float], object] = _no_wait
        #: a poll-mode kernel's send and first wait in one C call (Ring.waiter's ``ask``), for
        #: a request whose caller names no wait and whose target has a Port; None: none
        self.asker: Any = None

    def use_asker(self, asker: Any, spin_of: Any = None) -> None:
        """A kernel's runtime, with the C ring: requests go through ``asker`` (Ring.waiter):
        ``request`` sends, waits first and collects the answer in one C call (poll: a spin of
        up to 50 us; hybrid: of ``spin_of``'s ``kernel.spin_us``, as its wait spins before it
        blocks; interrupt: a halt on the doorbell of up to FIRST_WAIT_S, capped by
        ``kernel.idle_timeout``, as _wait_halt's), and this Messenger's ``request`` becomes
        the asker's, whose fast path has no Python frame at all (a round trip's critical
        path) and which hands every other case back to ``request``/``requested`` here."""
        self.asker = asker
        asker.bind(self, self._ports, self._request_id, FIRST_WAIT_S, self.request, spin_of)
        self.__dict__["request"] = asker.request     # (an attribute: shadows the method)

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
        self.last_target = self._post(target, msg_type, subtype, mid, payload)
        return mid

    def post_each(self, target: int, msg_type: int, first_id: int,
                  payloads: list[Any]) -> tuple[int, int]:
        """One-way messages one ``post`` at a time, until a full ring: (the id they reached,
        how many went). The way without a Port, and the rest of a batch after a REROUTE."""
        to = target
        for i, payload in enumerate(payloads):
            try:
                to = self._post(target, msg_type, 0, first_id + i, payload)
            except RingError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                return to, i
        return to, len(payloads)

    def send_many(self, target: int, msg_type: int, payloads: list[Any]) -> int:
        """One-way messages, in order, until the ring is full: how many went."""
        first = next(self._ids)
        self._ids = itertools.count(first + max(1, len(payloads)))
        self.last_target, sent = self._post_many(target, msg_type, first, payloads)
        return sent

    def request(self, target: int, msg_type: int, payload: Any = None, timeout: float = 10.0,
                wait: Callable[[float], object] | None = None) -> Any:
        """Send a request and wait for its response. Nothing but the request's id comes
        before the send (a round trip is timed from the call), and nothing but the first wait
        (at most FIRST_WAIT_S) after it: in poll mode the answer is usually there after it;
        the clock, the deadline (``timeout`` from then) and the 2 ms liveness look come only
        when it is not. ``wait`` defaults to the endpoint's own (``self.wait``): a kernel's
        ``self.os.request`` is this method itself, bound once, without a frame before it."""
        asker = None
        if wait is None:
            wait = self.wait
            asker = self.asker
        mid = self._request_id(63) | 1
        self.waiting[mid] = -1    # before sending: the answer may come in an interrupt at once
        rc = None
        if asker is not None:
            port = self._ports.get(target)
            if port is not None:
                # poll, hybrid: the send, the first spin and the answer's collection in one C
                # call; the asker itself back means not answered yet (``rc``: how the send went)
                try:
                    got = asker.ask(port, msg_type, mid, payload, target,
                                    min(timeout, FIRST_WAIT_S))
                except BaseException:
                    self.waiting.pop(mid, None)
                    self.responses.pop(mid, None)
                    raise
                if got is not asker:
                    self.last_target = target
                    return got
                rc = asker.rc
        return self.requested(target, msg_type, payload, timeout, wait, mid, rc)

    def requested(self, target: int, msg_type: int, payload: Any, timeout: float,
                  wait: Callable[[float], object], mid: int, rc: int | None) -> Any:
        """A request from its id on (``waiting[mid]`` set): the send, unless ``rc`` says how
        an asker's send went (0: sent, and its first wait done: a poll-mode spin as long, or
        hybrid's spin before it would block), and the wait for the answer.
        ``request``'s, and a poll-mode kernel's C request (Ring.waiter) after its fast path."""
        waiting, responses = self.waiting, self.responses
        try:
            deadline = None
            waited = rc == 0
            try:
                if rc is None:
                    port = self._ports.get(target)
                    if port is None:
                        to = self._post(target, msg_type, SUB_REQUEST, mid, payload)
                    else:
                        rc = port.message(msg_type, SUB_REQUEST, mid, payload)
                        to = target if not rc else \
                            self._sent_after(target, rc, msg_type, SUB_REQUEST, mid, payload)
                else:
                    to = target if not rc else \
                        self._sent_after(target, rc, msg_type, SUB_REQUEST, mid, payload)
            except RingError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                deadline = time.monotonic() + timeout
                to = self._post_when_room(target, msg_type, mid, payload, deadline, wait)
            self.last_target = waiting[mid] = to
            # the first wait straight after the send, with nothing read before it: in poll
            # mode the answer is there after it, and the clock, the deadline and the liveness
            # token (0.6 us of Python a round trip, measured, more than the peer's turn-around)
            # are read only when it is not. It lasts FIRST_WAIT_S at most, less than any
            # restart takes (a death's notice alone takes about 1 ms), so the incarnation read
            # after it is still the one that got the request (or none, if it died meanwhile)
            if not waited and mid not in responses:
                wait(min(timeout, FIRST_WAIT_S))
            if mid in responses:
                waiting.pop(mid, None)
                return responses.pop(mid).payload
            start = time.monotonic()
            if deadline is None:
                deadline = start + timeout
            peers = self._directory
            # which incarnation got it: compared every 2 ms from 2 ms on
            incarnation = peers.incarnation(to) if peers is not None else None
            next_look = start + 0.002
            # look again soon when there is a peer to look at: a death rings no doorbell
            left = deadline - start if peers is None else min(deadline - start, 0.01)
            while mid not in responses:
                if left <= 0:
                    raise RingError(errno.ETIMEDOUT, f"no response to message {mid:#x} "
                                                     f"(type {msg_type:#x}) from instance "
                                                     f"{target} within {timeout:g} s")
                wait(left)
                if mid in responses:
                    break
                now = time.monotonic()
                left = deadline - now
                if peers is not None:
                    if now >= next_look:         # every 2 ms, off the polling fast path
                        next_look = now + 0.002
                        if not peers.alive(to, incarnation):
                            raise RingError(errno.ESRCH, f"instance {to} halted while request "
                                                         f"{mid:#x} was pending")
                    left = min(left, 0.01)
        except BaseException:
            waiting.pop(mid, None)
            responses.pop(mid, None)
            raise
        waiting.pop(mid, None)      # answered: the one pop of each on the way back
        return responses.pop(mid).payload

    def post_request(self, target: int, msg_type: int, payload: Any) -> tuple[int, int, Any]:
        """Send a request and return at once (a probe's ping: probes.py must not block the
        kernel it runs in): its id, the instance it reached and that one's incarnation (for
        ``answerer_alive``). Its response lands in ``responses`` like a waited request's;
        ``take_response`` collects it, ``forget_request`` gives up on it. RingError as
        ``send`` (ENOSPC: a full ring, for the caller to retry later)."""
        mid = self._request_id(63) | 1
        self.waiting[mid] = -1    # before sending: the answer may come in an interrupt at once
        try:
            to = self._post(target, msg_type, SUB_REQUEST, mid, payload)
        except BaseException:
            del self.waiting[mid]
            raise
        self.last_target = self.waiting[mid] = to
        peers = self._directory
        return mid, to, peers.incarnation(to) if peers is not None else None

    def take_response(self, mid: int) -> Message | None:
        """The response to ``post_request``'s ``mid`` if it came (then the request is done)."""
        msg = self.responses.pop(mid, None)
        if msg is not None:
            self.waiting.pop(mid, None)
        return msg

    def forget_request(self, mid: int) -> None:
        """Give up on a request ``post_request`` sent: a late response is dropped."""
        self.waiting.pop(mid, None)
        self.responses.pop(mid, None)

    def answerer_alive(self, to: int, incarnation: Any) -> bool:
        """Is the incarnation a request went to (``post_request``) still there to answer?"""
        peers = self._directory
        return peers is None or peers.alive(to, incarnation)

    def _post_when_room(self, target: int, msg_type: int, mid: int, payload: Any,
                        deadline: float, wait: Callable[[float], object]) -> int:
        """A full ring is back pressure: send again until the deadline. A receiver drains a
        slot in about a microsecond: look again soon, then less often (20 us doubling to
        1 ms), not a whole millisecond at once."""
        backoff = 20e-6
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise RingError(errno.ENOSPC, f"instance {target}'s ring stayed full until the "
                                              "request's deadline")
            wait(min(left, backoff))
            backoff = min(backoff * 2, 0.001)
            try:
                return self._post(target, msg_type, SUB_REQUEST, mid, payload)
            except RingError as exc:
                if exc.errno != errno.ENOSPC:
                    raise

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
            to = self.waiting.get(msg[2])
            if to is not None and (to == sender or to == -1):   # (the sender id is a claim:
                self.responses[msg[2]] = msg                      # a peer could still forge
            return True                                           # it, knowing the id)
        handler = self.handlers.get(msg_type)
        if handler is None:
            return False
        result = handler(msg)
        if sub & SUB_REQUEST:
            try:
                self.last_target = self._post(sender, msg_type, SUB_RESPONSE, msg[2], result)
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
        #: target -> its Port, for the sends that need no routing: the peer entry it checks
        #: still names the incarnation it was bound for (instances only; the host routes)
        self._ports: dict[int, Any] = {}
        self.messenger = Messenger(self_id, self.post_message, directory, self.post_many,
                                   (self._ports, self._sent_after))

    def ring_of(self, target: int) -> Ring:
        ring = self._rings.get(target)
        if ring is None:
            ring = Ring(self._area, self._address, self._layout, target)
            self._rings[target] = ring
        return ring

    def post_message(self, target: int, msg_type: int, subtype: int, msg_id: int,
                     payload: Any) -> int:
        """Encode and send one mk_message: the send path of every message. A target bound
        before and still the same incarnation takes one C call (its Port checks the peer
        entry, encodes into the slot, rings the doorbell); anything else is routed by
        ``post``. Returns the id the message reached (a standby's after a takeover)."""
        port = self._ports.get(target)
        if port is not None:
            rc = port.message(msg_type, subtype, msg_id, payload)
            if not rc:
                return target
            return self._sent_after(target, rc, msg_type, subtype, msg_id, payload)
        return self.post(target, msg_type, encode(msg_type, subtype, msg_id, payload))

    def _sent_after(self, target: int, rc: int, msg_type: int, subtype: int, msg_id: int,
                    payload: Any) -> int:
        """A Port's answer other than done: a refusal or a doorbell it could not ring is
        settled; REROUTE (that incarnation is gone) routes the message afresh."""
        if rc != REROUTE:
            self._settle(target, rc, (msg_type, subtype, msg_id, payload))
            return target
        self._ports.pop(target, None)   # route from now on (a standby serves it) until a
                                        # binding to it is made
        return self.post(target, msg_type, encode(msg_type, subtype, msg_id, payload))

    def _settle(self, target: int, rc: int, message: bytes | tuple[int, int, int, Any]) -> None:
        """A send's answer other than done or REROUTE: a refusal of ``message`` (its bytes, or
        the parts a Port was to encode: counted, and raised as ``send`` would), or a doorbell
        it could not ring. Only a full ring's error does not say the size, and only it is
        retried (back pressure): it costs no encode."""
        if rc > 0:
            self.directory.refused(rc)
            size = 0
            if rc != errno.ENOSPC:
                size = len(message if isinstance(message, bytes) else encode(*message))
            self.ring_of(target).refuse(rc, size)
        ring_by_hand(self._senders[target][2])

    def post_many(self, target: int, msg_type: int, first_id: int,
                  payloads: list[Any]) -> tuple[int, int]:
        """Send ``payloads`` as one-way messages with ids from ``first_id`` on, in order, until
        the ring is full: (the id they reached, how many went). With a Port, one C call
        publishes each in turn; otherwise (or when the target must be routed afresh) one
        ``post_message`` each."""
        port = self._ports.get(target)
        sent = 0
        if port is not None:
            sent, rc = port.messages(msg_type, 0, first_id, payloads)
            if rc == 0:
                return target, sent
            if rc == errno.ENOSPC:                  # back pressure: the caller sends the rest
                self.directory.refused(rc)
                return target, sent
            if rc != REROUTE:       # a refusal (raised, as a single send's), or a doorbell to ring
                self._settle(target, rc, (msg_type, 0, first_id + sent, payloads[sent]))
                return target, sent
            self._ports.pop(target, None)           # that incarnation is gone
        to, more = self.messenger.post_each(target, msg_type, first_id + sent,
                                              payloads[sent:])
        return to, sent + more

    def drain_state(self) -> tuple[Any, ...]:
        """What a C drain needs to match replies and dispatch messages itself (_port.c,
        take_reply and dispatch): the Messenger's waiting, responses and handlers, the Ports,
        and the slow path for an answer a Port could not send."""
        m = self.messenger
        return (m.waiting, m.responses, m.handlers, self._ports, self._answer_after)

    def _answer_after(self, target: int, rc: int, msg_type: int, msg_id: int,
                      result: Any) -> None:
        """An answer the C dispatch's Port could not send as it was: routed afresh (REROUTE),
        or the refusal counted, or the doorbell rung by hand; as Messenger.deliver, a refused
        answer is given up (the requester times out)."""
        try:
            if rc == REROUTE:
                self._ports.pop(target, None)       # that incarnation is gone
                self.post(target, msg_type, encode(msg_type, SUB_RESPONSE, msg_id, result))
            else:
                self._settle(target, rc, (msg_type, SUB_RESPONSE, msg_id, result))
        except RingError:
            pass

    def post(self, target: int, msg_type: int, data: bytes) -> int:
        """Route, bind if need be, send ``data``: the bound send rings the doorbell itself (C),
        so nothing in Python stands between a publish and its doorbell. Returns the id the
        message reached (a standby's after a takeover)."""
        for _ in range(2):
            routed, pid = self.directory.route(target)
            bound = self._senders.get(routed)
            if bound is None or bound[1] != pid or (bound[2][1] < 0 and
                                                    self.directory.retry(routed)):
                bound = self._bind(routed, pid)         # first send to this incarnation
            rc = bound[0](msg_type & 0xFFFFFFFF, data)
            if rc == REROUTE:
                continue        # it died or was replaced since the route: route again
            if rc:
                self._settle(routed, rc, data)
            return routed
        raise RingError(errno.ESRCH, f"instance {target} is not active")

    def _bind(self, target: int, pid: int) -> Bound:
        """A send bound to ``target``'s ring and doorbell, for the incarnation ``pid``; the
        previous binding's descriptor is closed (the peer rebooted)."""
        self.forget(target)
        doorbell, owned = self.directory.doorbell(target, pid)
        ring = self.ring_of(target)
        entry = self.directory.entry(target, pid)
        port = ring.port(self.id, self.cpu, self._sent_counter, doorbell, entry)
        if port is None:
            send = ring.sender(self.id, self.cpu, self._sent_counter, doorbell)
        else:
            send = port
            if entry is not None and doorbell[1] >= 0:   # (without a doorbell: ``post`` asks
                self._ports[target] = port               # again now and then)
        bound = self._senders[target] = (send, pid, doorbell, owned)
        return bound

    def forget(self, target: int) -> None:
        """Drop the binding to ``target`` and close what the endpoint held for it."""
        self._ports.pop(target, None)
        old = self._senders.pop(target, None)
        if old is not None:
            close = getattr(old[0], "close", None)
            if close is not None:
                close()                 # a Port: let go of the buffers it holds
            for fd in old[3]:
                os.close(fd)

    def close(self) -> None:
        for target in list(self._senders):
            self.forget(target)
        self._rings.clear()


def ring_by_hand(doorbell: Doorbell) -> None:
    """The doorbell a bound send could not ring (no descriptor for the peer's doorbell, or the
    write failed): a signal reaches a halted peer as well as a busy one; the host's doorbell
    (signal_pid 0) is always written."""
    wake_fd, pidfd, _ = doorbell
    if pidfd == 0:
        if wake_fd >= 0:                # (full: rung already; no reader: the host is gone)
            linux.ring_doorbell(wake_fd)
        return
    if pidfd < 0:               # nobody to ring
        return
    try:
        signal.pidfd_send_signal(pidfd, IPI_SIGNAL)
    except (ProcessLookupError, PermissionError):
        pass
