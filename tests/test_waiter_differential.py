"""The differential test of _waiter.c (the C Waiter: a poll-mode kernel's wait, and a request's
send and first wait in one C call) against its Python reference: ``Messenger.request`` and
``requested`` (guest/endpoint.py) with the runtime's own poll-mode waits, ``_wait_poll`` and
``_spin_take`` (guest/runtime.py), which is what runs with MK_PURE_RING=1. Two sides alike in one
process, each a requester's own ring and the ring its requests and answers go out on (anonymous
mappings); the test plays the answerer, its replies published before the call or by a handler
during the wait or by a timer while it goes on. Every answer (the payload, or the exception and
its errno), every handler call (and whether it ran inside the drain), the Messenger's books and
every byte and counter of the rings are compared.

A failure names the seed and the step: ``MK_DIFF_SEED=<seed>`` replays it."""

import errno
import mmap
import os
import random
import threading
import time

import pytest
from helpers import without_c

from partition import linux
from partition.abi import impl, ring, ring_c
from partition.abi import layout as L
from partition.abi import message as M
from partition.abi.port import Port as PyPort
from partition.abi.ring import Ring, RingError
from partition.guest import endpoint
from partition.guest.runtime import KernelRuntime

SEEDS = [int(os.environ["MK_DIFF_SEED"])] if "MK_DIFF_SEED" in os.environ else [1, 2, 3]

TARGET = 2                  # the instance the requests go to
ECHO, ANSWERER, RAISES, NOBODY = 0x4000, 0x4001, 0x4003, 0x4004
REQ = 0x4100                # the requests' type


@pytest.fixture(autouse=True)
def _need_c():
    if impl.FAST is None:
        without_c("the C extension is not built here: nothing to compare the reference with")


class CRing(Ring):
    """A Ring on the C paths, whatever ``ring.use`` bound on Ring."""


class PyRing(Ring):
    """A Ring on the reference paths, whatever ``ring.use`` bound on Ring."""


for _name in ring_c.PATHS:
    setattr(CRing, _name, ring_c.PATHS[_name])
    setattr(PyRing, _name, ring._REFERENCE[_name])


class Owner:
    """What a kernel's runtime is to its waits: the reference waits are runtime.py's own
    methods, run on this (``_waiter`` None: the Python ring's way); the C Waiter raises and puts
    back its ``_in_drain`` as they do."""

    _wait_poll = KernelRuntime._wait_poll
    _spin_take = KernelRuntime._spin_take

    def __init__(self, own: Ring, msgr: endpoint.Messenger, replies: tuple) -> None:
        self._in_drain = False
        self._waiter = None
        self.ring = own
        self.messenger = msgr
        self._deliver = msgr.deliver
        self._replies = replies


class Ids:
    """The Messenger's request-id source: the same ids on both sides, known to the test before
    the request is made (a reply can then be published before it)."""

    def __init__(self) -> None:
        self.next: list[int] = []

    def __call__(self, bits: int) -> int:
        return self.next.pop(0)


class Directory:
    """The peer directory a request looks at after 2 ms: the target alive or dead."""

    def __init__(self) -> None:
        self.dead = False

    def incarnation(self, target: int) -> int:
        return 7

    def alive(self, target: int, incarnation: object) -> bool:
        return not self.dead


class Side:
    """One requester: its own ring (answers come in), the ring its sends go out on, its
    Messenger, and, on the C side, the Waiter that is its wait and its request."""

    def __init__(self, cls: type[Ring], lay: L.ArenaLayout) -> None:
        self.areas = [mmap.mmap(-1, lay.ring_area_bytes) for _ in range(2)]
        self.own = cls(memoryview(self.areas[0]), linux.buffer_address(self.areas[0]), lay, 1)
        self.out = PyRing(memoryview(self.areas[1]), linux.buffer_address(self.areas[1]), lay,
                          TARGET)
        self.own.set_polling(True)          # a poll-mode kernel's ring, as the runtime sets it
        self.counter = bytearray(16)
        if cls is CRing:
            self.port = ring_c.PATHS["port"](self.out, 1, 0, (memoryview(self.counter), 8),
                                             (-1, -1, 0), None)
        else:
            self.port = PyPort(self.out, 1, 0, (memoryview(self.counter), 8), (-1, -1, 0), None)
        self.ports = {TARGET: self.port, 3: self.port, 4: self.port}
        self.settled: list[tuple[int, int]] = []
        self.calls: list[tuple] = []
        self.ids = Ids()
        self.directory = Directory()
        m = endpoint.Messenger(1, self.post, self.directory, ports=(self.ports, self.after))
        m._request_id = self.ids
        self.msgr = m
        replies = (m.waiting, m.responses, m.handlers, self.ports, self.answer_after)
        self.owner = Owner(self.own, m, replies)
        self.pending_reply: list[bytes] = []
        m.register(ECHO, self.echo)
        m.register(ANSWERER, self.answerer)
        m.register(RAISES, self.raises)
        if cls is CRing:
            self.waiter = self.own.waiter(64, m.handled, m.deliver, replies, self.owner,
                                          m.waiting)
            assert type(self.waiter).__name__ == "Waiter"
            m.wait = self.waiter
            m.use_asker(self.waiter, None)
        else:
            assert self.own.waiter(64, m.handled, m.deliver, replies, self.owner,
                                   m.waiting) is None
            self.waiter = None
            m.wait = self.owner._wait_poll

    # the answerer's and the requester's plumbing (as the Endpoint's, without routing)
    def post(self, target, t, sub, mid, payload):
        rc = self.port.message(t, sub, mid, payload)
        if rc:                      # (what the C dispatch hands to ``answer_after``)
            self.settled.append((target, rc))
        return target

    def after(self, target, rc, t, sub, mid, payload):
        self.settled.append((target, rc))
        if rc == errno.ENOSPC:
            raise RingError(errno.ENOSPC, "full")
        return target

    def answer_after(self, sender, rc, t, mid, result):
        self.settled.append((sender, rc))

    # handlers: each says what it got and whether it ran inside the drain
    def echo(self, msg):
        self.calls.append(("echo", tuple(msg), self.owner._in_drain))
        return msg.payload

    def answerer(self, msg):
        """The answer arrives during the wait: this handler publishes it."""
        self.calls.append(("answerer", tuple(msg), self.owner._in_drain))
        for wire in self.pending_reply:
            PyRing.send(self.own, TARGET, 5, REQ, wire)
        self.pending_reply.clear()

    def raises(self, msg):
        self.calls.append(("raises", tuple(msg), self.owner._in_drain))
        return 1 / 0

    def wait(self, timeout):
        return self.waiter(timeout) if self.waiter is not None else \
            self.owner._wait_poll(timeout)

    def spin(self, usec):
        return self.waiter.spin(usec) if self.waiter is not None else \
            self.owner._spin_take(usec)

    def close(self):
        self.port.close()
        for r in (self.own, self.out):
            r.buf.release()
        for a in self.areas:
            a.close()


@pytest.fixture
def sides():
    lay = L.ArenaLayout(pool_bytes=4 << 20, console_bytes=4096, ring_slots=64,
                        ring_slot_bytes=256)
    made = [Side(CRing, lay), Side(PyRing, lay)]
    yield made
    for s in made:
        s.close()


def _answer(call, *args, **kwargs):
    try:
        return ("ok", call(*args, **kwargs))
    except RingError as exc:
        return ("raised", "RingError", exc.errno, str(exc))
    except Exception as exc:
        return ("raised", type(exc).__name__, None, str(exc))


def _books(s):
    """The Messenger's books after a call. ``last_target`` only where the wait answered no
    request of a peer's: the C dispatch (_port.c) answers through the Port without setting it,
    ``deliver`` sets it to that peer (nothing in a kernel reads it after a request)."""
    m = s.msgr
    answered = any(call[1][1] & M.SUB_REQUEST for call in s.calls)
    return (sorted(m.waiting.items()), sorted((k, tuple(v)) for k, v in m.responses.items()),
            None if answered else m.last_target, s.owner._in_drain, s.calls[:], s.settled[:],
            bytes(s.counter))


def _noise(rng, mid):
    """Messages that are not the answer: one-way and requests for handlers (answered out),
    an unhandled type, a response to an id nobody waits for, the right id from the wrong
    sender, a handler that raises (rarely)."""
    out = []
    for _ in range(rng.randrange(4)):
        kind = rng.random()
        payload = rng.choice([None, 1, b"x" * rng.randrange(40), "text", [1, 2], {"a": 3}])
        if kind < 0.3:
            out.append((rng.choice([3, 4]), ECHO, M.encode(ECHO, 0, rng.getrandbits(64),
                                                            payload)))
        elif kind < 0.5:
            out.append((rng.choice([3, 4]), ECHO, M.encode(ECHO, M.SUB_REQUEST,
                                                            rng.getrandbits(64), payload)))
        elif kind < 0.6:
            out.append((3, NOBODY, M.encode(NOBODY, 0, 1, payload)))
        elif kind < 0.75:
            out.append((TARGET, REQ, M.encode(REQ, M.SUB_RESPONSE, mid ^ 2, payload)))
        elif kind < 0.95:
            out.append((3, REQ, M.encode(REQ, M.SUB_RESPONSE, mid, "forged")))   # wrong sender
        else:
            out.append((4, RAISES, M.encode(RAISES, 0, 1, None)))
    return out


SCENARIOS = ("ready", "answerer", "late", "none", "wrong", "dead", "wait", "spin")


@pytest.mark.alone      # its "late" answers come from a timer thread: load moves them
@pytest.mark.parametrize("seed", SEEDS)
def test_waiter_and_reference_agree(sides, seed):
    """A request whose answer is in the ring already (``ready``), comes during the wait from a
    handler the wait dispatches (``answerer``) or from a timer after the first wait (``late``),
    never comes (``none``: ETIMEDOUT), comes only from the wrong sender (``wrong``: ignored,
    then ETIMEDOUT), or whose target dies (``dead``: ESRCH at the 2 ms look); each among other
    messages the wait dispatches (one-way, requests answered out, unhandled, forged, a handler
    that raises). And the mode's wait itself, ``waiter(timeout)`` against ``_wait_poll`` and
    ``waiter.spin(usec)`` against ``_spin_take``, with no request pending (the ``handled``
    bitmap then drops unhandled types in the ring)."""
    c, py = sides
    rng = random.Random(seed)
    seen = set()
    for step in range(120):
        where = f"seed {seed} step {step}"
        scenario = SCENARIOS[step % len(SCENARIOS)] if step < 16 else rng.choice(SCENARIOS)
        mid = rng.getrandbits(63) | 1
        payload = rng.choice([None, 0, 7, b"", b"answer" * rng.randrange(20), "é", [1, {2: 3}]])
        reply = M.encode(REQ, M.SUB_RESPONSE, mid, payload)
        before = _noise(rng, mid)
        timeout = 5.0
        if scenario == "ready":
            before.insert(rng.randrange(len(before) + 1), (TARGET, REQ, reply))
        elif scenario == "answerer":
            before.insert(rng.randrange(len(before) + 1),
                          (rng.choice([3, 4]), ANSWERER, M.encode(ANSWERER, 0, 9, None)))
        elif scenario in ("none", "wrong"):
            timeout = rng.choice([0.0, 0.001, 0.003])
            if scenario == "wrong":
                before.append((3, REQ, reply))
        elif scenario == "dead":
            timeout = 1.0
        got = {}
        for s in (c, py):
            s.ids.next = [mid]
            s.msgr.last_target = -1
            s.directory.dead = scenario == "dead"
            s.pending_reply = [reply] if scenario == "answerer" else []
            for sender, t, wire in before:
                PyRing.send(s.own, sender, 5, t, wire)
            timer = None
            if scenario == "late":
                timer = threading.Timer(rng.random() * 0.002, PyRing.send,
                                        (s.own, TARGET, 5, REQ, reply))
                timer.start()
            if scenario == "wait":
                answer = _answer(s.wait, rng.choice([0.0, 0.00002, 0.001]))
                if answer[0] == "ok":       # (C counts delivered, the reference consumed)
                    answer = ("ok", answer[1] > 0)
            elif scenario == "spin":
                answer = _answer(s.spin, rng.choice([0.0, 20.0, 200.0]))
                if answer[0] == "ok":
                    answer = ("ok", answer[1] is not None)
            else:
                answer = _answer(s.msgr.request, TARGET, REQ, payload, timeout)
            if timer is not None:
                timer.join()
            # what the wait left in the ring, taken the same way on both sides
            rest = []
            PyRing.drain(s.own, lambda *m, rest=rest: rest.append(m) or True, 64)
            got[s] = (answer, _books(s), rest)
            s.calls.clear()
            s.settled.clear()
            s.msgr.responses.clear()
            s.msgr.waiting.clear()
        assert got[c] == got[py], where
        assert bytes(c.own.buf) == bytes(py.own.buf), f"{where}: own rings differ"
        assert bytes(c.out.buf) == bytes(py.out.buf), f"{where}: out rings differ"
        assert c.own.counters() == py.own.counters(), where
        for s in (c, py):
            PyRing.drain(s.out, lambda *a: True, 64)
        seen.add((scenario, got[c][0][0], got[c][0][2] if got[c][0][0] == "raised" else None))
    # the sequence met every ending: answered, timed out, a dead peer, a handler's exception
    assert {("ready", "ok", None), ("answerer", "ok", None), ("late", "ok", None),
            ("none", "raised", errno.ETIMEDOUT), ("wrong", "raised", errno.ETIMEDOUT),
            ("dead", "raised", errno.ESRCH)} <= seen, seen
    assert any(e[1:] == ("raised", None) for e in seen), seen


def _answer_from_child(s: Side, n: int) -> int:
    """Fork the answerer: a process that takes each request from the side's out ring as it
    comes (spinning on it) and publishes its answer (the request's payload) into the side's
    own ring, so that the answer lands while the requester waits, within its first spin when
    the two are quick enough. Returns the child's pid (the caller reaps it)."""
    pid = os.fork()
    if pid:
        return pid
    code = 1
    deadline = time.monotonic() + 60        # (a requester that failed sends no more)
    try:
        for _ in range(n):
            got: list[bytes] = []
            while not got and time.monotonic() < deadline:
                PyRing.drain(s.out, lambda t, sender, cpu, data, got=got: got.append(data) or True,
                             1)
            if not got:
                break
            msg = M.decode_py(got[0], 1, 0)
            PyRing.send(s.own, TARGET, 5, REQ, M.encode(REQ, M.SUB_RESPONSE, msg[2], msg[3]))
        else:
            code = 0
    finally:
        os._exit(code)


@pytest.mark.system
@pytest.mark.parametrize("seed", SEEDS)
def test_waiter_and_reference_agree_with_a_live_answerer(sides, seed):
    """The answer from another process, arriving while the request waits (in the Waiter's
    first spin, or after it in ``requested``'s loop: when is the machine's doing, what comes
    back is not): the same payloads, the same rings, the same books on both sides."""
    rng = random.Random(seed)
    n = 40
    mids = [rng.getrandbits(63) | 1 for _ in range(n)]
    payloads = [rng.choice([None, 0, b"x" * rng.randrange(100), "é", [1, {2: 3}]])
                for _ in range(n)]
    got = {}
    for s in sides:
        s.ids.next = mids[:]
        s.out.set_polling(True)     # the answerer polls: no doorbell, however quick it is
        pid = _answer_from_child(s, n)
        try:
            answers = [_answer(s.msgr.request, TARGET, REQ, p, 5.0) for p in payloads]
        finally:
            _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        got[s] = (answers, _books(s), s.own.counters(), bytes(s.own.buf), bytes(s.out.buf))
    c, py = sides
    assert got[c][0] == [("ok", p) for p in payloads], f"seed {seed}"
    assert got[c] == got[py], f"seed {seed}"
