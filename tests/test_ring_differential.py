"""One differential test per C translation unit: the C half and its Python reference driven over
the same inputs (seeded random sequences and the edge cases), side by side in one process, and
every answer and every byte of shared memory compared. The reference is the specification:
a difference is a bug in whichever of the two the test shows is wrong.

  _ring.c     vs ring.py     (send, drain, idle_enter, spin; hostile claims and slots)
  _message.c  vs message.py  (encode, decode, also of mangled bytes)
  _port.c     vs port.py     (a Port's send, message and messages; peer entry; doorbells)
             and Messenger.deliver (the drain's reply matching and handler dispatch)
  _waiter.c   vs Messenger.request and runtime.py's poll-mode waits: in
             tests/test_waiter_differential.py (its sides are a requester and its answerer)

A failure names the seed and the step: ``MK_DIFF_SEED=<seed>`` replays it."""

import errno
import mmap
import os
import random

import pytest
from helpers import without_c
from ringtool import claim, fill, publish

from partition import linux
from partition.abi import impl, ring, ring_c
from partition.abi import layout as L
from partition.abi import message as M
from partition.abi.port import Port as PyPort
from partition.abi.ring import Ring, RingError

SEEDS = [int(os.environ["MK_DIFF_SEED"])] if "MK_DIFF_SEED" in os.environ else [1, 2, 3]


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


@pytest.fixture
def pair():
    """(C ring, Python ring): the same geometry in two mappings, made and released here."""
    lay = L.ArenaLayout(pool_bytes=4 << 20, console_bytes=4096, ring_slots=16,
                        ring_slot_bytes=256)
    made = []
    for cls in (CRing, PyRing):
        area = mmap.mmap(-1, lay.ring_area_bytes)
        view = memoryview(area)
        made.append((cls(view, linux.buffer_address(area), lay, 1), view, area))
    yield made[0][0], made[1][0]
    for r, view, area in made:
        r.buf.release()
        view.release()
        area.close()


def _answer(call, *args, **kwargs):
    """What ``call(*args, **kwargs)`` answered: its value, or the error it raised (which kind,
    and its errno)."""
    try:
        return ("ok", call(*args, **kwargs))
    except (RingError, ValueError, OverflowError) as exc:
        kind = next(k for k in (RingError, OverflowError, ValueError) if isinstance(exc, k))
        return ("raised", kind.__name__, getattr(exc, "errno", None))


def _same(c, py, where):
    assert bytes(c.buf) == bytes(py.buf), f"{where}: the rings' bytes differ"


# -- _ring.c ----------------------------------------------------------------------------------

def _data(rng, cap):
    n = rng.choice([0, 1, 2, cap - 1, cap, cap + 1, rng.randrange(1, cap + 1)])
    return bytes(rng.getrandbits(8) for _ in range(n))


def _drained(r, limit, bits, hush):
    """What one drain delivered (and answered); some messages are "nobody handled it"."""
    seen = []

    def deliver(t, s, cpu, data):
        seen.append((t, s, cpu, data))
        return len(data) % 3 != 0

    seen.append(r.drain(deliver, limit, 3600.0, bits, hush))
    return seen


@pytest.mark.parametrize("seed", SEEDS)
def test_ring_c_and_reference_agree(pair, seed):
    """Sends of every size (0, the slot's, one past it) from several senders, drains of every
    limit with and without a bitmap of handled types, a receiver that polls, sleeps or is busy,
    and hostile contents: a claim never published (then swept as abandoned), a published size
    that lies, a ticket from another lap. Unhandled (sender, type) pairs are many and each rare,
    so no drop filter (a matter of milliseconds) is set on one side and not on the other."""
    c, py = pair
    rng = random.Random(seed)
    cap = c.slot_bytes
    counters = {c: bytearray(8), py: bytearray(8)}
    handled = bytearray(b"\xff" * 128)
    for t in range(0x100, 0x200):
        handled[t >> 3] &= ~(1 << (t & 7))          # types 0x100-0x1ff: nobody handles them
    for step in range(3000):
        op = rng.random()
        where = f"seed {seed} step {step}"
        if op < 0.45:
            args = (rng.randrange(6), rng.getrandbits(16), rng.choice(
                [0, 1, 0xFFFFFFFF, rng.randrange(0x400), rng.getrandbits(32)]), _data(rng, cap))
            got = [_answer(r.send, *args, counter=(memoryview(counters[r]), 0)) for r in (c, py)]
            assert got[0] == got[1], where
        elif op < 0.75:
            limit = rng.choice([1, 2, 3, 8, 64])
            bits = handled if rng.random() < 0.5 else None
            hush = rng.random() < 0.5
            seen = [_drained(r, limit, bits, hush) for r in (c, py)]
            assert seen[0] == seen[1], where
        elif op < 0.80:
            polling = rng.random() < 0.5
            for r in (c, py):
                r.set_polling(polling)
        elif op < 0.85:
            got = [r.idle_enter() for r in (c, py)]
            assert got[0] == got[1], where
            if rng.random() < 0.5:
                for r in (c, py):
                    r.idle_leave()
        elif op < 0.88:
            assert c.spin(0) == py.spin(0) and c.pending() == py.pending(), where
        elif op < 0.94:
            # a hostile or dying sender: a claim, filled or not, published with a lie or not
            sender, kind = rng.randrange(6), rng.randrange(4)
            size = rng.choice([cap + 1, 2 ** 63, ring.ABANDONED, 5])
            for r in (c, py):
                try:
                    ticket = claim(r)
                except RingError:
                    continue
                off = fill(r, ticket, sender, 1, 7, b"x" * 5)
                if kind == 3:                       # a ticket from another lap
                    r._put_u64(off + ring.S_TICKET, ticket + r.nslots)
                if kind >= 1:
                    publish(r, off, size if kind == 2 else 5)
        else:
            sender = rng.randrange(6)
            assert c.abandon_claims_of(sender) == py.abandon_claims_of(sender), where
        assert counters[c] == counters[py], where
        _same(c, py, where)
    assert c.counters() == py.counters()


# -- _message.c -------------------------------------------------------------------------------

_EDGE_PAYLOADS = [b"", b"x", b"x" * 255, b"x" * 256, b"x" * 65535, b"x" * 65536, None, True,
                  False, 0, 1, 127, 128, 255, 256, -1, -32, -33, 2 ** 31, 2 ** 63 - 1,
                  2 ** 64 - 1, -2 ** 63, 0.0, 1.5, "", "text", "é", [], {}, [b"x", None],
                  {"a": [1, 2], 3: b"y"}, (1, 2)]


def _payload(rng, depth=0):
    kind = rng.randrange(8 if depth < 2 else 6)
    if kind == 0:
        return bytes(rng.getrandbits(8) for _ in range(rng.choice([0, 1, 2, 254, 255, 256,
                                                                   rng.randrange(300)])))
    if kind == 1:
        return rng.choice([None, True, False])
    if kind == 2:
        return rng.choice([rng.randrange(128), rng.randrange(-2 ** 63, 2 ** 64)])
    if kind == 3:
        return rng.uniform(-1e9, 1e9)
    if kind == 4:
        return "".join(chr(rng.randrange(32, 0x3000)) for _ in range(rng.randrange(20)))
    if kind == 5:
        return rng.randrange(-40, 200)
    if kind == 6:
        return [_payload(rng, depth + 1) for _ in range(rng.randrange(4))]
    return {rng.randrange(100): _payload(rng, depth + 1) for _ in range(rng.randrange(4))}


def _mangle(rng, data):
    data = bytearray(data)
    how = rng.randrange(5)
    if how == 0 and data:
        data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    elif how == 1:
        del data[rng.randrange(len(data) + 1):]
    elif how == 2:
        data += bytes(rng.getrandbits(8) for _ in range(rng.randrange(1, 4)))
    elif how == 3 and len(data) >= 20:       # a payload_len that agrees with the mangled size
        data[16:20] = (len(data) - 20).to_bytes(4, "little")
        if len(data) > 20:
            data[20 + rng.randrange(len(data) - 20)] = rng.getrandbits(8)
    else:
        data = bytearray(rng.getrandbits(8) for _ in range(rng.randrange(40)))
    return bytes(data)


@pytest.mark.parametrize("seed", SEEDS)
def test_codec_c_and_reference_agree(seed):
    """Encode: the C writer's bytes are message.encode's, for every payload form (the ones it
    writes itself and the ones it hands to msgpack). Decode: the same Message (or None) from
    the same bytes, well formed or mangled (a flipped bit, cut, padded, a length that agrees
    with garbage, garbage)."""
    rng = random.Random(seed)
    payloads = _EDGE_PAYLOADS + [_payload(rng) for _ in range(1500)]
    for i, payload in enumerate(payloads):
        head = (rng.choice([0, 1, 0x4000, 0xFFFFFFFF, rng.getrandbits(32)]),
                rng.choice([0, M.SUB_REQUEST, M.SUB_RESPONSE, rng.getrandbits(32)]),
                rng.choice([0, 1, 2 ** 64 - 1, rng.getrandbits(64)]))
        wire = M.encode(*head, payload)
        assert impl.FAST.encode(*head, payload) == wire, f"seed {seed} payload {i}"
        for data in [wire] + [_mangle(rng, wire) for _ in range(3)]:
            sender, cpu = rng.randrange(64), rng.getrandbits(16)
            want, got = M.decode_py(data, sender, cpu), impl.FAST.decode(data, sender, cpu)
            assert type(got) is type(want), f"seed {seed} payload {i}: {data!r}"
            assert repr(got) == repr(want), f"seed {seed} payload {i}: {data!r}"
            if got is not None:
                assert type(got.payload) is type(want.payload)


# -- _port.c ----------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", SEEDS)
def test_port_c_and_reference_agree(pair, seed):
    """A C Port and a Python Port, made alike on two rings alike, sent the same calls: bytes of
    every size, mk_messages of every payload form, batches that run into a full ring; the peer
    entry changed under them (REROUTE) and back; a receiver that polls, sleeps or is busy, with
    a doorbell that wakes a sleeper (a pipe) but cannot signal a busy one. Every
    answer, every byte of the rings and of the doorbells is compared; then both are closed."""
    c, py = pair
    rng = random.Random(seed)
    peers = {c: bytearray(16), py: bytearray(16)}
    counters = {c: bytearray(16), py: bytearray(16)}
    pipes = {r: os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC) for r in (c, py)}
    state, pid = 5, 4242
    ports = {}
    answers = set()
    try:
        for r in (c, py):
            peers[r][8:16] = state.to_bytes(4, "little") + pid.to_bytes(4, "little")
        for r, make in ((c, lambda r, *a: ring_c.PATHS["port"](r, *a)),
                        (py, lambda r, *a: PyPort(r, *a))):
            ports[r] = make(r, 3, 9, (memoryview(counters[r]), 8),
                            (pipes[r][1], -1, 0), (memoryview(peers[r]).toreadonly(), 8,
                                                     state, pid))
        for step in range(2000):
            where = f"seed {seed} step {step}"
            op = rng.random()
            if op < 0.3:
                t, data = rng.getrandbits(33), _data(rng, c.slot_bytes)
                got = [_answer(ports[r], t, data) for r in (c, py)]
            elif op < 0.6:
                args = (rng.choice([0x4000, rng.getrandbits(32)]), rng.choice(
                    [0, M.SUB_REQUEST, M.SUB_RESPONSE]), rng.getrandbits(64), _payload(rng))
                got = [_answer(ports[r].message, *args) for r in (c, py)]
            elif op < 0.7:
                args = (0x4000, 0, rng.getrandbits(32),
                        [_payload(rng) for _ in range(rng.randrange(6))])
                got = [_answer(ports[r].messages, *args) for r in (c, py)]
            elif op < 0.8:
                limit = rng.choice([1, 4, 64])
                got = [PyRing.drain(r, lambda *m: True, limit) for r in (c, py)]
            elif op < 0.87:
                flags = (rng.random() < 0.3, rng.random() < 0.5)
                for r in (c, py):
                    r.set_polling(flags[0])
                    r.buf[ring.IDLE] = flags[1]
                got = [None, None]
            elif op < 0.95:
                entry = rng.choice([(state, pid), (state, pid + 1), (state + 1, pid)])
                for r in (c, py):
                    peers[r][8:16] = entry[0].to_bytes(4, "little") + \
                        entry[1].to_bytes(4, "little")
                got = [ports[r].current for r in (c, py)]
            else:
                got = [len(linux_read_all(pipes[r][0])) for r in (c, py)]
            assert got[0] == got[1], where
            assert counters[c] == counters[py], where
            _same(c, py, where)
            if op < 0.7 and got[0][0] == "ok":
                answers.add(got[0][1] if isinstance(got[0][1], int) else got[0][1][1])
        # the sequence met every answer a Port gives (sent, refused, rerouted, left to ring)
        assert {0, errno.ENOSPC, errno.EMSGSIZE, ring.REROUTE} <= answers, answers
        assert -2 in answers, answers             # a busy receiver, no signal possible
        for r in (c, py):
            ports[r].close()
        got = [_answer(ports[r], 1, b"x") for r in (c, py)]
        assert got[0] == got[1] == ("raised", "ValueError", None)
        assert [ports[r].current for r in (c, py)] == [False, False]
    finally:
        for r in (c, py):
            if r in ports:
                ports[r].close()
            for fd in pipes[r]:
                os.close(fd)


def linux_read_all(fd: int) -> bytes:
    """Everything a doorbell pipe holds (it is non-blocking)."""
    out = b""
    while True:
        try:
            chunk = os.read(fd, 4096)
        except BlockingIOError:
            return out
        if not chunk:
            return out
        out += chunk



@pytest.mark.parametrize("seed", SEEDS)
def test_port_dispatch_c_and_reference_agree(pair, seed, monkeypatch):
    """_port.c's other half, the drain's reply matching and dispatch, against its reference,
    Messenger.deliver (guest/endpoint.py) on the reference drain: the same batches (requests
    of handled and unhandled types, one-way messages, responses awaited from their sender, from
    anyone, from another sender or not at all, slots whose type lies about their message,
    garbage) give the same handler calls, the same responses taken, the same answers written
    into the requester's ring (through its Port, or the slow path without one) and the same
    exception from a handler that raises."""
    from partition.guest import endpoint
    monkeypatch.setattr(endpoint, "decode", M.decode_py)      # the codec has its own test
    c, py = pair
    lay = L.ArenaLayout(pool_bytes=4 << 20, console_bytes=4096, ring_slots=64,
                        ring_slot_bytes=256)
    areas = [mmap.mmap(-1, lay.ring_area_bytes) for _ in range(2)]
    backs = [PyRing(memoryview(a), linux.buffer_address(a), lay, 2) for a in areas]
    rng = random.Random(seed)
    calls = {c: [], py: []}
    sides = {}
    try:
        for r, back in ((c, backs[0]), (py, backs[1])):
            if r is c:
                port = ring_c.PATHS["port"](back, 1, 0, None, (-1, -1, 0), None)
            else:
                port = PyPort(back, 1, 0, None, (-1, -1, 0), None)

            # every answer goes to one ring per side, compared byte for byte: C's through the
            # Port in ``ports`` or ``after`` (the Endpoint's slow path), the reference's ``post``
            def post(target, t, sub, mid, payload, port=port):
                port.message(t, sub, mid, payload)
                return target

            def after(sender, rc, t, mid, result, port=port):
                if rc == ring.REROUTE:          # no Port for that sender: routed afresh; any
                    port.message(t, M.SUB_RESPONSE, mid, result)    # other answer was sent

            m = endpoint.Messenger(1, post)
            for t, handler in ((0x4000, lambda msg: msg.payload), (0x4001, lambda msg: None),
                               (0x4002, lambda msg: {"echo": msg.payload, "from": msg.sender})):
                m.register(t, lambda msg, h=handler, r=r: calls[r].append(
                    ("handler", msg)) or h(msg))
            m.register(0x4003, lambda msg, r=r: calls[r].append(("raise", msg)) or 1 / 0)
            ports = {s: port for s in (3, 4)}           # senders 5, 6: no Port, the slow path
            sides[r] = (m, port, ports, after)
        for step in range(600):
            where = f"seed {seed} step {step}"
            awaited = {}
            for _ in range(rng.randrange(4)):
                awaited[rng.getrandbits(63) | 1] = rng.choice([3, 4, 5, -1])
            batch = []
            for _ in range(rng.randrange(1, 12)):
                sender = rng.choice([3, 4, 5, 6])
                kind = rng.random()
                t = rng.choice([0x4000, 0x4001, 0x4002, 0x4003, 0x4004])
                if kind < 0.4:
                    wire = M.encode(t, M.SUB_REQUEST, rng.getrandbits(64), _payload(rng))
                elif kind < 0.6:
                    wire = M.encode(t, 0, rng.getrandbits(64), _payload(rng))
                elif kind < 0.85:
                    mid = rng.choice(list(awaited) or [5]) if rng.random() < 0.7 else 7
                    wire = M.encode(t, M.SUB_RESPONSE, mid, _payload(rng))
                else:
                    wire = _mangle(rng, M.encode(t, rng.choice([0, M.SUB_REQUEST,
                                                                 M.SUB_RESPONSE]), 9, b"x"))
                slot_type = t if rng.random() < 0.9 else t ^ 1    # a slot that lies
                if wire and len(wire) <= c.slot_bytes:
                    batch.append((sender, slot_type, wire))
            got = {}
            for r in (c, py):
                m, port, ports, after = sides[r]
                m.waiting.clear()
                m.waiting.update(awaited)
                for sender, slot_type, wire in batch:
                    PyRing.send(r, sender, 0, slot_type, wire)
                replies = (m.waiting, m.responses, m.handlers, ports, after) if r is c \
                    else None
                try:        # (the answer differs by design: C counts delivered, Python consumed)
                    r.drain(m.deliver, 64, 1.0, None, False, replies)
                    drained = "ok"
                except Exception as exc:        # a handler's, raised after the whole batch
                    drained = type(exc).__name__
                got[r] = (drained, sorted(m.responses.items()), calls[r][:])
                m.responses.clear()
                calls[r].clear()
            assert got[c] == got[py], where
            _same(c, py, where)
            assert bytes(backs[0].buf) == bytes(backs[1].buf), where
            for back in backs:
                PyRing.drain(back, lambda *a: True, 64)
    finally:
        for r in sides:
            sides[r][1].close()
        for back in backs:
            back.buf.release()
        for a in areas:
            a.close()
