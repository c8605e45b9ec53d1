"""The IPI ring protocol, in one process, against both implementations (the C hot paths of
partition/abi/_ring.c and the pure-Python reference in ring.py): they must agree on every case."""

import errno
import gc
import importlib.util
import os
import struct
import threading
import time

import pytest

from helpers import without_c
from partition import linux
from partition.abi import impl, ring
from partition.abi.ring import ABANDONED, S_SIZE, S_TICKET, RingError
from ringtool import claim, fill, polling, publish


from ringfixtures import a_ring, drain_all, implementation, rg  # noqa: F401 (fixtures)


def test_the_extension_is_used_when_built():
    if importlib.util.find_spec("partition.abi._fastring") is None:
        without_c("no C extension in this install")
    if os.environ.get("MK_PURE_RING") == "1":
        pytest.skip("MK_PURE_RING=1 asks for the Python ring")
    assert not ring.STALE, ("partition/abi/_*.c changed since the extension was built, "
                            "or its rebuild failed: pip install -e . and read its warnings")
    assert ring.IMPLEMENTATION == "c"         # its layout agrees with ring.py's


def test_order_content_and_counts(rg):
    for i in range(5):
        rg.send(sender_id=i % 2, sender_cpu=7, msg_type=0x4000 + i, data=bytes([i]) * (i + 1))
    got = drain_all(rg)
    assert got == [(0x4000 + i, i % 2, 7, bytes([i]) * (i + 1)) for i in range(5)]
    assert rg.counters()["received"] == 5 and rg.head == rg.tail == 5


def test_full_and_oversize_are_refused(rg):
    for _ in range(7):                        # one sender: its fair share, 7 of 8 slots
        rg.send(0, 0, 1, b"x")
    with pytest.raises(RingError) as ei:
        rg.send(0, 0, 1, b"x")
    assert ei.value.errno == errno.ENOSPC
    rg.send(5, 0, 1, b"other")                # another sender still finds room
    with pytest.raises(RingError) as ei:      # and now the ring is full for everyone
        rg.send(6, 0, 1, b"x")
    assert ei.value.errno == errno.ENOSPC
    for bad in (b"", b"y" * 257):
        with pytest.raises(RingError) as ei:
            rg.send(0, 0, 1, bad)
        assert ei.value.errno == errno.EMSGSIZE
    assert len(drain_all(rg)) == 8
    rg.send(0, 0, 1, b"again")                # the ring is usable after it was full
    assert drain_all(rg)[0][3] == b"again"


def test_send_counts_before_it_publishes(rg):
    counters = bytearray(16)
    rg.send(0, 0, 1, b"a", (memoryview(counters), 8))
    rg.send(0, 0, 1, b"b", (memoryview(counters), 8))
    assert struct.unpack_from("<Q", counters, 8)[0] == 2
    with pytest.raises(RingError):
        rg.send(0, 0, 1, b"", (memoryview(counters), 8))
    assert struct.unpack_from("<Q", counters, 8)[0] == 2    # a refused send is not counted


def test_bad_slots_are_dropped_and_counted_and_the_rest_delivered(rg):
    rg.send(0, 0, 1, b"first")
    off = fill(rg, claim(rg), 0, 0, 1, b"junk")
    publish(rg, off, 10_000)                   # a size no slot holds
    off = fill(rg, claim(rg), 0, 0, 1, b"stale")
    struct.pack_into("<Q", rg.buf, off + S_TICKET, 999)       # not the ticket expected here
    publish(rg, off, 5)
    rg.send(0, 0, 1, b"last")
    assert [g[3] for g in drain_all(rg)] == [b"first", b"last"]
    c = rg.counters()
    assert (c["received"], c["dropped_bad_size"]) == (2, 2)


def test_an_unpublished_claim_holds_the_tail_until_published(rg):
    rg.send(0, 0, 1, b"before")
    ticket = claim(rg)
    off = fill(rg, ticket, 3, 0, 1, b"late")
    rg.send(0, 0, 1, b"after")
    assert [g[3] for g in drain_all(rg)] == [b"before"]
    assert rg.spin(10.0) is True              # something is claimed
    publish(rg, off, 4)
    assert [g[3] for g in drain_all(rg)] == [b"late", b"after"]
    assert rg.spin(200.0) is False            # empty: the bounded wait gives up


def test_a_poller_gets_past_a_claim_its_sender_never_published(rg, implementation):
    """The C poller reads head only when its spin ends empty-handed, and a drain only when
    it has taken nothing (a ping-pong's every read of head pulled the senders' line over and
    their next claim pulled it back): a claim never published at the tail is still found. The
    pass after the message before it says there is more, and the careful path abandons it."""
    if implementation != "c":
        pytest.skip("the poller is the C ring's; the Python ring has none")
    poller = rg.poller()
    assert poller is not None
    rg.send(0, 0, 1, b"before")
    fill(rg, claim(rg), 3, 0, 1, b"never")
    rg.send(0, 0, 1, b"after")
    got = []

    def deliver(t, s, c, p):
        got.append(p)
        return True
    assert poller(200.0, 64, None, deliver, False, None) == (1, 0, 1)   # stops at the claim
    first = poller(200.0, 64, None, deliver, False, None)               # spins, then head
    assert first is not None and first[1] == 1                          # more: the claim
    rg.finish(first, 64, None, deliver, abandon_after=0.01)   # first seen: waited for
    time.sleep(0.02)
    rg.drain(deliver, 64, abandon_after=0.01)                  # then abandoned
    assert got == [b"before", b"after"]
    assert rg.counters()["dropped_abandoned"] == 1


def test_abandoned_claims_are_dropped(rg):
    off = fill(rg, claim(rg), 4, 0, 1, b"never")
    rg.send(0, 0, 1, b"next")
    assert rg.abandon_claims_of(4) == 1
    assert struct.unpack_from("<Q", rg.buf, off + S_SIZE)[0] == ABANDONED
    assert [g[3] for g in drain_all(rg)] == [b"next"]
    assert rg.counters()["dropped_abandoned"] == 1


def test_drain_respects_its_limit(rg):
    for i in range(6):
        rg.send(0, 0, 1, bytes([i]))
    got = []
    assert rg.drain(lambda *a: got.append(a) or True, 4) == 4
    assert len(got) == 4 and rg.tail == 4
    assert rg.drain(lambda *a: got.append(a) or True, 4) == 2


def test_one_doorbell_per_drain(rg):
    """Linux raises one IPI for a queue that was empty; here: one doorbell until the next drain."""
    assert rg.send(0, 0, 1, b"a") == ring.DOORBELL_SIGNAL      # busy receiver: interrupt it
    assert rg.send(0, 0, 1, b"b") == ring.DOORBELL_NONE        # already rung, not yet drained
    assert len(drain_all(rg)) == 2
    assert rg.send(0, 0, 1, b"c") == ring.DOORBELL_SIGNAL      # the drain re-armed it
    assert rg.counters()["doorbells"] == 2                     # rung twice, not three times
    drain_all(rg)
    assert rg.idle_enter() is False                            # nothing waits: it may sleep
    assert rg.send(0, 0, 1, b"d") == ring.DOORBELL_WAKE        # it sleeps: write its eventfd
    assert rg.idle_enter() is True                             # something waits: do not sleep
    rg.idle_leave()
    drain_all(rg)
    rg.set_polling(True)
    assert rg.send(0, 0, 1, b"e") == ring.DOORBELL_NONE        # a poller needs no doorbell


def test_unhandled_types_are_dropped_in_the_ring_when_nothing_is_awaited(rg):
    for t in (1, 99, 1, 99, 99):
        rg.send(0, 0, t, b"m")
    got = []
    handled = bytearray(8192)
    handled[0] = 0b10                                      # type 1 only
    assert rg.drain(lambda *a: got.append(a) or True, 64, handled=handled) == 5
    assert [g[0] for g in got] == [1, 1]                  # only the handled type is handed up
    c = rg.counters()
    assert (c["received"], c["dropped_unknown_type"]) == (5, 3)   # dropped ones were received


def test_a_bound_sender_answers_like_send_without_raising(rg):
    counters = bytearray(16)
    send = rg.sender(3, 9, (memoryview(counters), 8))
    assert send(0x4000, b"one") == -ring.DOORBELL_SIGNAL    # the doorbell, as a negative number
    assert send(0x4000, b"two") == -ring.DOORBELL_NONE
    assert send(0x4000, b"") == errno.EMSGSIZE               # an errno, not an exception
    for _ in range(5):
        send(1, b"x")
    assert send(1, b"x") == errno.ENOSPC                     # its fair share is 7 of 8
    with pytest.raises(RingError) as ei:
        rg.refuse(errno.ENOSPC, 1)
    assert ei.value.errno == errno.ENOSPC
    assert struct.unpack_from("<Q", counters, 8)[0] == 7     # refused sends are not counted
    assert drain_all(rg)[0] == (0x4000, 3, 9, b"one")


def test_a_stale_doorbell_flag_does_not_silence_the_next_sender(rg):
    """A sender that set ``signalled`` after the drain took its message must not keep the next
    sender from ringing a receiver that has gone to sleep since."""
    rg.send(0, 0, 1, b"a")                    # rings (flag set)
    drain_all(rg)                             # flag cleared, message taken
    linux.exchange_u64(rg.addr + ring.SIGNALED, 1)    # a late sender's flag, its message gone
    assert rg.idle_enter() is False           # nothing waits: the receiver sleeps ...
    assert rg.send(0, 0, 1, b"b") == ring.DOORBELL_WAKE   # ... and the next sender wakes it


@pytest.fixture
def big(implementation):
    """The default 64 slots: room for a flood past FILTER_AFTER."""
    yield from a_ring(64, 64)


HANDLES_TYPE_1 = bytes([0b10]) + bytes(8191)


def drain_handled(r):
    got = []
    r.drain(lambda t, s, c, p: got.append((t, s, c, p)) or True, 64, handled=HANDLES_TYPE_1)
    return got


def filtered(r):
    return [(f["sender"], f["type"]) for f in r.filters()]


def test_a_flood_of_junk_is_filtered_at_its_sender(big):
    """Linux disables an IRQ line that keeps firing for nobody; here a drain that drops
    FILTER_AFTER unhandled messages of one type from one sender sets a drop filter: from then
    on that sender's messages of that type are dropped inside its send, counted, and never
    reach a slot or the doorbell. Its other types, and other senders, go through."""
    for _ in range(ring.FILTER_AFTER):
        big.send(5, 0, 99, b"junk")
    big.send(3, 0, 1, b"legit")
    assert drain_handled(big) == [(1, 3, 0, b"legit")]
    assert filtered(big) == [(5, 99)]
    assert big.idle_enter() is False
    head = big.head
    counters = bytearray(8)
    send = big.sender(5, 0, (memoryview(counters), 0))
    for _ in range(100):
        assert send(99, b"junk") == 0                           # no doorbell, no error ...
    assert big.head == head                                     # ... and no slot
    assert struct.unpack_from("<Q", counters)[0] == 100         # the sender counted its sends
    assert big.counters()["dropped_filtered"] == 100            # the receiver, their drops
    assert big.send(5, 0, 1, b"other type") == ring.DOORBELL_WAKE   # the rest goes through
    assert big.idle_enter() is True
    big.idle_leave()
    assert drain_handled(big) == [(1, 5, 0, b"other type")]
    assert filtered(big) == [(5, 99)]                           # renewed: it dropped meanwhile


def test_a_few_junk_messages_set_no_filter_and_a_filter_lapses(big):
    for _ in range(ring.FILTER_AFTER - 1):
        big.send(5, 0, 99, b"junk")
    drain_handled(big)
    assert filtered(big) == []
    for _ in range(ring.FILTER_AFTER):
        big.send(6, 0, 98, b"junk")
    drain_handled(big)
    assert filtered(big) == [(6, 98)]
    import time
    time.sleep(ring.FILTER_MS / 1000 + 0.005)                   # the flood has stopped
    drain_handled(big)                                          # the receiver looks: lapsed
    assert filtered(big) == []
    assert big.send(6, 0, 98, b"junk") != ring.DOORBELL_NONE    # it reaches the ring again


def test_junk_that_slipped_past_a_new_filter_renews_it_not_doubles_it(big):
    """Senders that looked before the filter was set still put junk in the ring: tallied again,
    it renews the filter in force instead of adding a second one."""
    for _ in range(2 * ring.FILTER_AFTER):
        big.send(5, 0, 99, b"junk")          # all in the ring before any drain
    drain_handled(big)                       # one filter, from the first 16
    for _ in range(ring.FILTER_AFTER):       # (a late sender's junk: bypass the filter)
        big.buf[ring.FILTERS:ring.FILTERS + 2] = b"\0\0"
        big.send(5, 0, 99, b"junk")
    assert filtered(big) == []
    struct.pack_into("<H", big.buf, ring.FILTERS, 6)            # the filter back in force
    drain_handled(big)
    assert filtered(big) == [(5, 99)]


def test_a_slow_flood_is_filtered_too(big):
    """One junk message per drain (a flood that wakes its receiver for each message) is
    tallied across drains: FILTER_AFTER within FILTER_MS set the filter."""
    for attempt in range(5):          # a preemption of FILTER_MS in the loop restarts the tally
        for _ in range(ring.FILTER_AFTER):
            big.send(9, 0, 99, b"junk")
            drain_handled(big)
        if big.filters():
            break
    assert filtered(big) == [(9, 99)]


def test_a_filter_is_renewed_while_its_flood_goes_on(big):
    for _ in range(ring.FILTER_AFTER):
        big.send(7, 0, 99, b"junk")
    drain_handled(big)
    struct.pack_into("<I", big.buf, ring.FILTERS + 8, (ring._now_ms() - 1) & 0xFFFFFFFF)
    big.send(7, 0, 99, b"junk")                   # its time is up, but the flood goes on ...
    assert big.filters()[0]["drops_unreviewed"] == 1
    drain_handled(big)
    assert filtered(big) == [(7, 99)]             # ... so the receiver's look renews it
    assert big.filters()[0]["drops_unreviewed"] == 0


def test_handling_a_type_lifts_its_filter(big):
    for _ in range(ring.FILTER_AFTER):
        big.send(7, 0, 99, b"junk")
    drain_handled(big)
    big.unfilter_type(99)
    assert filtered(big) == []
    assert big.send(7, 0, 99, b"now wanted") != ring.DOORBELL_NONE


def test_garbage_in_the_filter_table_is_ignored(big):
    """The table is shared memory: an entry with a time we never wrote ends at the next look."""
    struct.pack_into("<HHIII", big.buf, ring.FILTERS, 6, 0, 99, 0x7FFFFFFF, 0)
    big.send(2, 0, 1, b"x")
    drain_handled(big)
    assert big.filters() == []


def test_a_failing_handler_does_not_lose_the_rest_of_its_batch(rg):
    """The batch's slots are free before any handler runs: an Exception waits until the rest
    is delivered; a BaseException (a kernel panic) stops the delivery at once."""
    for i in range(3):
        rg.send(0, 0, 1, bytes([i]))
    got = []

    def deliver(t, s, c, p):
        got.append(p)
        if p == b"\x00":
            raise ValueError("handler bug")
        return True
    with pytest.raises(ValueError):
        rg.drain(deliver, 64)
    assert got == [b"\x00", b"\x01", b"\x02"] and rg.head == rg.tail == 3
    assert rg.counters()["received"] == 3

    class Panic(BaseException):
        pass
    for i in range(3):
        rg.send(0, 0, 1, bytes([i]))
    got.clear()

    def panicking(t, s, c, p):
        got.append(p)
        raise Panic()
    with pytest.raises(Panic):
        rg.drain(panicking, 64)
    assert got == [b"\x00"]
    assert rg.head - rg.tail == 2                 # the rest is still in the ring, not lost


def test_an_unhandled_answer_from_deliver_is_counted(rg):
    rg.send(0, 0, 7, b"x")
    rg.drain(lambda *a: False, 64)
    assert rg.counters()["dropped_unknown_type"] == 1


def test_a_hushed_drain_takes_what_arrives_during_it_without_a_doorbell(rg, implementation):
    """hush: while the receiver consumes and delivers, senders ring nothing (``polling`` is
    up); it lowers the flag with a barrier and looks again, so a message sent meanwhile is
    taken by the same drain, and after it the doorbell works as before."""
    if implementation != "c":
        pytest.skip("hush is an optimisation of the C drain; the Python ring rings as usual")
    rg.send(0, 0, 1, b"first")
    doors, got = [], []

    def deliver(t, s, c, p):
        got.append(p)
        if p == b"first":
            doors.append(rg.send(1, 0, 1, b"during"))       # a sender while we deliver
        return True
    assert rg.drain(deliver, 64, hush=True) == 2
    assert got == [b"first", b"during"] and doors == [ring.DOORBELL_NONE]
    assert not polling(rg)
    assert rg.send(1, 0, 1, b"after") == ring.DOORBELL_SIGNAL     # rings again


def test_a_hushed_drain_of_a_poller_leaves_its_flag_up(rg, implementation):
    if implementation != "c":
        pytest.skip("hush is an optimisation of the C drain")
    rg.set_polling(True)
    rg.send(0, 0, 1, b"x")
    rg.drain(lambda *a: True, 64, hush=True)
    assert polling(rg)


def test_own_page_counts_read_in_one_go_agree_with_each_field():
    from partition.abi import slot as S
    buf = bytearray(S.OWN_BYTES * 2)
    page = S.OwnPage(buf, S.OWN_BYTES)
    for k, name in enumerate(S.OWN_COUNTS):
        setattr(page, name, (k + 1) * 1000 + 7)
    page.progress = 99                       # its neighbours are not counts
    assert page.counts() == {name: getattr(page, name) for name in S.OWN_COUNTS}
    assert page.counts()["ipi_sent"] == 1007 and not any(buf[:S.OWN_BYTES])


def test_c_and_python_ring_doorbells_the_same_way():
    """Pipes take pwritev2(RWF_NOWAIT) from Linux 6.4 on; before, it fails EOPNOTSUPP and
    every ring failed, so nothing woke. linux.py and _ring.c each ask the kernel once at
    import, and must agree on the answer."""
    if impl.FAST is None:
        without_c("the C extension is not built here")
    assert impl.FAST.PIPE_NOWAIT == linux.PIPE_NOWAIT


def test_a_doorbell_rings_where_pipes_refuse_rwf_nowait(monkeypatch):
    """As on a kernel before 6.4: a plain write on the non-blocking ring end; the own end is
    readable after a ring, and a full pipe counts as rung, at once."""
    monkeypatch.setattr(linux, "PIPE_NOWAIT", False)
    own, end = linux.doorbell()
    try:
        assert linux.ring_doorbell(end)
        assert linux.wait_readable(own, 0)
        try:
            while True:
                os.write(end, b"x" * 4096)
        except BlockingIOError:
            pass
        t0 = time.monotonic()
        assert linux.ring_doorbell(end) and time.monotonic() - t0 < 0.5
        linux.doorbell_clear(own)
        assert not linux.wait_readable(own, 0)
    finally:
        os.close(own)
        os.close(end)


class _Owner:
    """What a Waiter raises ``_in_drain`` on (a kernel's runtime)."""
    _in_drain = False


def test_a_waiter_spins_drains_and_goes_on_past_a_claim(rg, implementation):
    """The Waiter (Ring.waiter) is the poller's wait with everything bound once: nothing
    within the spin is None (``spin``) or 0 (a call); a message is delivered with the owner's
    ``_in_drain`` raised and put back after; the unhandled-type bitmap applies only while no
    request waits; a claim never published at the tail is handed to the careful path
    (``finish``) as the poller's answer says."""
    owner = _Owner()
    waiting: dict = {}
    seen = []

    def deliver(t, s, c, p):
        seen.append((p, owner._in_drain))
        return True
    handled = bytearray(8192)           # nothing handled: types < 65536 die in the ring
    waiter = rg.waiter(64, handled, deliver, (waiting, {}), owner, waiting)
    if implementation != "c":
        assert waiter is None           # the runtime's Python waits do this
        return
    assert waiter.spin(50.0) is None and waiter(0.00005) == 0
    rg.send(0, 0, 70000, b"one")        # (types past the bitmap count as handled)
    assert waiter.spin(200.0) == 1 and seen == [(b"one", True)] and owner._in_drain is False
    rg.send(0, 0, 5, b"dropped")        # unhandled, and no request waits: dropped in the ring
    assert waiter(0.0002) == 1 and len(seen) == 1
    waiting[123] = -1                   # a request waits: every type is handed up
    rg.send(0, 0, 5, b"kept")
    assert waiter(0.0002) == 1 and seen[-1] == (b"kept", True)
    rg.send(0, 0, 70000, b"before")
    fill(rg, claim(rg), 3, 0, 70000, b"never")
    rg.send(0, 0, 70000, b"after")
    assert waiter(0.0002) == 1                  # stops at the claim
    assert waiter(0.0002) == 0                  # first seen: waited for (careful path)
    time.sleep(1.1)                             # abandoned after a second
    assert waiter(0.0002) >= 1
    assert [p for p, _ in seen[-2:]] == [b"before", b"after"]


def _descriptors() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def test_an_interrupt_mode_waiter_halts_to_its_deadline_and_wakes_on_its_doorbell(
        rg, implementation):
    """An interrupt-mode Waiter (a doorbell given) keeps its halts' deadline on a timer set
    across waits and sleeps without a timeout: a halt with nothing coming ends at its deadline,
    never before it and at most the slack (2 ms) plus scheduling after it, back to back as
    after a longer or a shorter one; a doorbell rung during the sleep wakes it at once with the
    message drained; its timer's descriptors go with it."""
    if implementation != "c":           # (the [c] case runs it; Python has no Waiter)
        pytest.skip("the Waiter is the C extension's; the runtime's Python waits do this")
    owner = _Owner()
    waiting: dict = {}
    seen = []

    def deliver(t, s, c, p):
        seen.append(p)
        return True
    before = _descriptors()
    own, end = linux.doorbell()
    try:
        waiter = rg.waiter(64, bytearray(8192), deliver, (waiting, {}), owner, waiting, own)
        for timeout in (0.02, 0.02, 0.05, 0.0005, 0.01, 0.0005, 0.0005):
            t0 = time.monotonic()
            assert waiter(timeout) == 0 and owner._in_drain is False
            took = time.monotonic() - t0
            assert timeout <= took < timeout + 0.002 + 0.25, (timeout, took)
        assert len(_descriptors() - before) == 4     # the doorbell's ends, the timer, its epoll

        def ring_later():
            time.sleep(0.05)
            rg.send(0, 0, 70000, b"rung")
            linux.ring_doorbell(end)
        ringer = threading.Thread(target=ring_later)
        ringer.start()
        t0 = time.monotonic()
        assert waiter(30.0) == 1 and seen == [b"rung"]
        assert time.monotonic() - t0 < 10.0
        ringer.join()
        assert waiter(0.001) == 0                    # the ring was cleared: a halt again
        del waiter
    finally:
        os.close(own)
        os.close(end)
    gc.collect()
    assert _descriptors() <= before
