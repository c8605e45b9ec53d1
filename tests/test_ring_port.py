"""The IPI ring's Port (partition/abi/_port.c, C only): a send bound to one ring and one
incarnation; split from test_ring.py, whose fixtures it shares (ringfixtures.py)."""

import errno
import struct

import pytest

from helpers import without_c
from partition.abi import impl, ring
from ringfixtures import a_ring, drain_all, implementation, rg  # noqa: F401 (fixtures)


# -- Port: a send bound to one ring and one incarnation (C only) -----------------------------

_PORTS = []


@pytest.fixture
def big_ring():
    """A ring whose receiver polls (no doorbell to ring), and the ports made on it closed
    before the mapping goes, also when a test fails."""
    if impl.FAST is None:
        without_c("Port is part of the C extension")
    for r in a_ring(8, 4096):
        r.set_polling(True)
        try:
            yield r
        finally:
            while _PORTS:
                _PORTS.pop().close()


def a_port(r, peers=None, state=5, pid=4242, counters=None):
    entry = None if peers is None else (peers, 8, state, pid)
    port = r.port(3, 9, counters, (-1, -1, 0), entry)
    _PORTS.append(port)
    return port


@pytest.mark.parametrize("payload", [
    b"", b"x", b"y" * 255, b"z" * 256, b"w" * 3000, None, True, False, 0, 1, 127, 128, -1,
    2 ** 40, "text", {"a": [1, 2.5, None]}, [b"nested", "list"], 1.5])
def test_a_port_writes_the_bytes_encode_writes(big_ring, payload):
    from partition.abi.message import decode, encode
    port = a_port(big_ring)
    assert port.message(0x4001, 2, 0xDEADBEEF12345, payload) == 0
    got = drain_all(big_ring)
    assert got == [(0x4001, 3, 9, encode(0x4001, 2, 0xDEADBEEF12345, payload))]
    assert decode(got[0][3], 3, 9).payload == payload
    port.close()


def test_a_port_refuses_what_encode_refuses(big_ring):
    from partition.abi.message import encode
    port = a_port(big_ring)
    for bad in (2 ** 70, object()):
        with pytest.raises(Exception) as want:
            encode(1, 0, 1, bad)
        with pytest.raises(want.type):
            port.message(1, 0, 1, bad)
    with pytest.raises(OverflowError):
        port.message(2 ** 32, 0, 1, None)
    assert port.message(1, 0, 1, b"q" * 4096) == errno.EMSGSIZE        # over the slot
    assert port(1, b"") == errno.EMSGSIZE
    assert drain_all(big_ring) == []
    port.close()


def test_a_port_checks_the_peer_entry_before_every_send(big_ring):
    peers = bytearray(64)
    struct.pack_into("<II", peers, 8, 5, 4242)          # (state, pid) the port was made for
    counters = bytearray(8)
    port = a_port(big_ring, memoryview(peers).toreadonly(), counters=(memoryview(counters), 0))
    assert port.current and port(7, b"one") == 0
    for state, pid in ((5, 4243), (6, 4242), (0, 0)):  # restarted, stopped, gone
        struct.pack_into("<II", peers, 8, state, pid)
        assert not port.current
        assert port(7, b"no") == ring.REROUTE
        assert port.message(7, 0, 1, b"no") == ring.REROUTE
    struct.pack_into("<II", peers, 8, 5, 4242)
    assert port.message(7, 0, 1, None) == 0
    assert [g[0] for g in drain_all(big_ring)] == [7, 7]      # nothing sent while stale
    assert struct.unpack("<Q", counters)[0] == 2
    port.close()


def test_an_instance_port_sends_on_its_tail_hint_and_never_overruns(big_ring):
    """Issue 20: an instance's Port (with a peer table) does not read the receiver's tail at
    every send (a cache miss on every round trip): a tail it read before is a lower bound,
    enough while head is less than the fair share ahead of it. So a tail the receiver
    scribbled over does not stop it within the share; and with an honest tail it never
    overruns: the ring takes 7 of 8 slots from one sender, then ENOSPC, and room made by a
    drain is found once the hint runs out."""
    peers = bytearray(64)
    struct.pack_into("<II", peers, 8, 5, 4242)
    port = a_port(big_ring, memoryview(peers).toreadonly())
    sent = [port.message(0x4001, 0, i, b"m") for i in range(10)]
    assert sent == [0] * 7 + [errno.ENOSPC] * 3              # the share, then back pressure
    assert len(drain_all(big_ring)) == 7
    assert [port.message(0x4001, 0, 100 + i, b"m") for i in range(8)] == [0] * 7 + [errno.ENOSPC]
    assert len(drain_all(big_ring)) == 7
    assert port.message(0x4001, 0, 199, b"m") == 0            # at the share: reads the tail
    # the receiver's tail scribbled far ahead of head: a bare send reads it (head - tail wraps:
    # no room); the Port's hint, just taken, still says there is room, and it sends
    head = big_ring.head
    big_ring.buf[ring.TAIL:ring.TAIL + 8] = struct.pack("<Q", head + 1000)
    with pytest.raises(ring.RingError) as e:
        big_ring.send(3, 9, 0x4001, b"bare")
    assert e.value.errno == errno.ENOSPC
    assert port.message(0x4001, 0, 200, b"hinted") == 0


def test_a_closed_port_refuses_and_lets_the_mapping_go(big_ring):
    port = a_port(big_ring)
    port.close()
    port.close()                              # twice is fine
    with pytest.raises(ValueError):
        port(1, b"x")
    with pytest.raises(ValueError):
        port.message(1, 0, 1, b"x")
    assert not port.current


def test_a_port_refuses_bad_geometry_and_offsets(big_ring):
    with pytest.raises(ValueError):
        impl.FAST.Port(big_ring.buf, 10 ** 6, big_ring.stride, big_ring.slot_bytes, 0, 0,
                        None, 0, -1, -1, 0, None, 0, 0, 0)
    with pytest.raises(ValueError):
        big_ring.port(0, 0, (memoryview(bytearray(8)), 4), (-1, -1, 0), None)
    with pytest.raises(ValueError):
        big_ring.port(0, 0, None, (-1, -1, 0), (bytearray(16), 12, 5, 1))


def test_a_drain_matches_replies_as_deliver_would(rg, implementation):
    """``replies`` = (waiting, responses): the C drain takes a response to an awaited request
    itself, only from the instance it was sent to (or from any, when that is not known yet:
    -1), drops other responses and hands everything else to deliver; the Python ring hands all
    to deliver, and Messenger.deliver does the same there."""
    from partition.abi.message import SUB_REQUEST, SUB_RESPONSE, encode
    from partition.guest.endpoint import Messenger
    m = Messenger(9, lambda *a: 9)
    m.register(0x4001, lambda msg: None)
    m.waiting.update({11: 2, 12: -1, 13: 2})
    rg.send(2, 0, 0x4001, encode(0x4001, SUB_RESPONSE, 11, b"from 2"))   # awaited from 2
    rg.send(3, 0, 0x4001, encode(0x4001, SUB_RESPONSE, 12, b"any"))      # from anyone
    rg.send(3, 0, 0x4001, encode(0x4001, SUB_RESPONSE, 13, b"forged"))   # 13 is 2's
    rg.send(2, 0, 0x4001, encode(0x4001, SUB_RESPONSE, 99, b"unasked"))
    rg.send(2, 0, 0x4002, encode(0x4001, SUB_RESPONSE, 11, b"lies"))     # slot type differs
    rg.send(2, 0, 0x4001, encode(0x4001, SUB_REQUEST, 14, b"request"))
    delivered = []

    def deliver(t, s, c, p):
        delivered.append(p)
        return m.deliver(t, s, c, p)
    assert rg.drain(deliver, 64, replies=(m.waiting, m.responses)) == 6
    assert {k: v.payload for k, v in m.responses.items()} == {11: b"from 2", 12: b"any"}
    assert m.responses[11].sender == 2
    assert len(delivered) == (1 if implementation == "c" else 6)      # only the request, in C
    assert rg.counters()["received"] == 6


def test_a_port_sends_a_batch_in_order_until_the_ring_is_full(big_ring):
    from partition.abi.message import decode
    port = a_port(big_ring)
    assert port.messages(0x4001, 0, 100, [b"a", None, 7]) == (3, 0)
    got = [decode(p, s, c) for _, s, c, p in drain_all(big_ring)]
    assert [(m.msg_id, m.payload) for m in got] == [(100, b"a"), (101, None), (102, 7)]
    sent, rc = port.messages(0x4001, 0, 200, [b"x"] * 20)     # 8 slots, 7 for one sender
    assert (sent, rc) == (7, errno.ENOSPC)
    assert len(drain_all(big_ring)) == 7
    with pytest.raises(TypeError):
        port.messages(0x4001, 0, 1, 5)                        # not a sequence
    assert port.messages(0x4001, 0, 1, []) == (0, 0)


def test_a_batch_to_a_stale_port_sends_nothing(big_ring):
    peers = bytearray(64)
    struct.pack_into("<II", peers, 8, 5, 1)
    port = a_port(big_ring, memoryview(peers).toreadonly(), state=5, pid=2)
    assert port.messages(0x4001, 0, 1, [b"a", b"b"]) == (0, ring.REROUTE)
    assert drain_all(big_ring) == []
