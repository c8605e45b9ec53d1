"""The host's loop: each descriptor goes to its own handler, and a turn bounds its wait by the
watchdog, sweeps when due and boots what the supervisor queued. A pipe stands for a doorbell;
the collaborators of a turn are fakes."""

import os
import threading
import time

from host_fakes import FakeClock, instance

from partition.host.reactor import Reactor
from partition.host.recovery import RecoveryPolicy
from partition.host.table import InstanceTable
from partition.host.turn import Turn


def test_each_readable_descriptor_goes_to_its_own_handler():
    reactor = Reactor()
    r1, w1 = os.pipe()
    r2, w2 = os.pipe()
    got: list[tuple[str, object]] = []
    a, b = instance(1, "a"), instance(2, "b")
    try:
        reactor.watch(r1, "report", a, lambda inst: got.append(("report", inst)))
        reactor.watch(r2, "channel", b, lambda inst: got.append(("channel", inst)))
        os.write(w2, b"x")
        assert reactor.dispatch(0) == 1 and got == [("channel", b)]
        os.write(w1, b"x")
        reactor.unwatch(r2)
        reactor.unwatch(r2)                     # twice, or never watched: no error
        assert reactor.dispatch(0) == 1 and got[-1] == ("report", a)
        keys = {k.data.kind: k.data.inst for k in reactor.selector.get_map().values()}
        assert keys == {"report": a}
    finally:
        reactor.close()
        for fd in (r1, w1, r2, w2):
            os.close(fd)


class Recorder:
    """Stands for every collaborator of a turn, recording what it was asked."""

    def __init__(self, watched=()) -> None:
        self.calls: list[str] = []
        self.timeout: float | None = -1.0
        self._watched = list(watched)
        self.lifecycle_due: float | None = None
        self.due = 0.0
        self.next_due = 0.0

    # reactor
    def dispatch(self, timeout):
        self.timeout = timeout
        return 2

    # ipc
    def pending(self):
        return False

    # supervisor
    def watched(self):
        return self._watched

    def watchdog(self, watched, force):
        self.calls.append(f"watchdog {len(watched)}")

    def run_restarts(self, boot, closing):
        self.calls.append(f"restarts closing={closing()}")

    # sweep
    def after_events(self, handled, now):
        self.calls.append(f"events {handled}")

    def maybe_run(self, now):
        self.calls.append("sweep")

    # lifecycle
    def force(self, inst):
        pass

    def boot(self, inst):
        pass

    def when_due(self):
        return self.lifecycle_due

    def run_due(self):
        self.calls.append("lifecycle")


def test_a_turn_waits_no_longer_than_a_quarter_of_the_shortest_watchdog():
    watched = [instance(1, "a", recovery=RecoveryPolicy.build(watchdog=2.0)),
               instance(2, "b", recovery=RecoveryPolicy.build(watchdog=0.4))]
    f = Recorder(watched)
    turn = Turn(InstanceTable(), f, f, f, f, None, f, lambda: False, clock=FakeClock())
    assert turn.run(None) == 2
    assert f.timeout == 0.1
    assert f.calls == ["watchdog 2", "events 2", "sweep", "restarts closing=False"]
    turn.run(0.05)
    assert f.timeout == 0.05


def test_the_next_timer_is_the_earliest_of_the_machines_own_work():
    f = Recorder()
    table = InstanceTable()
    clock = FakeClock(100.0)
    turn = Turn(table, f, f, f, f, None, f, lambda: False, clock=clock)
    assert turn.next_timer() is None              # nothing runs, nothing is due
    table.add(instance(1, "a"))
    f.due = 101.5
    assert turn.next_timer() == 1.5               # the sweep
    f.lifecycle_due = 100.25
    assert turn.next_timer() == 0.25              # a successor's fork, a namespace let go


def test_a_death_is_handled_before_what_else_is_ready():
    """Issue 20: its channel hangs up moments before an instance's pidfd says it exited; both
    ready in one turn, the death's handler runs first."""
    reactor = Reactor()
    fds = [os.pipe() for _ in range(3)]
    got: list[str] = []
    a = instance(1, "a")
    try:
        for (r, _), kind in zip(fds, ("channel", "exit", "report")):
            reactor.watch(r, kind, a, lambda inst, kind=kind: got.append(kind))
        for _, w in fds:                 # ready in this order: the channel's first
            os.write(w, b"x")
        assert reactor.dispatch(0) == 3
        assert got == ["exit", "channel", "report"]
    finally:
        reactor.close()
        for pair in fds:
            for fd in pair:
                os.close(fd)


def test_an_expected_descriptor_is_handled_when_it_becomes_ready():
    """``expect``: a handler that sees a death coming has it handled at once, within a bound;
    a descriptor that stays quiet, or is not watched, costs no more than the bound."""
    reactor = Reactor()
    r, w = os.pipe()
    got: list[object] = []
    a = instance(1, "a")
    try:
        reactor.watch(r, "exit", a, got.append)
        t0 = time.monotonic()
        assert reactor.expect(r, 0.02) is False and got == []
        assert 0.015 <= time.monotonic() - t0 < 1.0
        timer = threading.Timer(0.005, os.write, (w, b"x"))
        timer.start()
        assert reactor.expect(r, 5.0) is True and got == [a]
        timer.join()
        reactor.unwatch(r)
        assert reactor.expect(r, 5.0) is False and got == [a]     # at once: not watched
    finally:
        reactor.close()
        os.close(r)
        os.close(w)


def test_a_handler_that_raises_loses_its_watch_is_reported_and_the_loop_goes_on():
    """Issue 22: a handler reads what an instance wrote; one that raises on it must not end
    the host: its watch is dropped, ``on_failure`` is told, every other handler still runs."""
    told: list[tuple[str, object, str]] = []
    reactor = Reactor(lambda watch, exc: told.append((watch.kind, watch.inst, str(exc))))
    r1, w1 = os.pipe()
    r2, w2 = os.pipe()
    got: list[str] = []
    a, b = instance(1, "a"), instance(2, "b")

    def bad(_inst):
        raise ValueError("scribbled header")
    try:
        reactor.watch(r1, "userland-console", a, bad)
        reactor.watch(r2, "channel", b, lambda _i: got.append("b"))
        os.write(w1, b"x")
        os.write(w2, b"x")
        assert reactor.dispatch(0) == 2
        assert got == ["b"] and told == [("userland-console", a, "scribbled header")]
        assert reactor.failures == 1
        kinds = {k.data.kind for k in reactor.selector.get_map().values()}
        assert kinds == {"channel"}                       # the failing one is watched no more
        assert reactor.dispatch(0) == 1 and len(told) == 1
    finally:
        reactor.close()
        for fd in (r1, w1, r2, w2):
            os.close(fd)


def test_keyboard_interrupt_out_of_a_handler_still_ends_the_loop():
    reactor = Reactor(lambda watch, exc: None)
    r, w = os.pipe()

    def interrupted(_inst):
        raise KeyboardInterrupt
    try:
        reactor.watch(r, "host-doorbell", None, interrupted)
        os.write(w, b"x")
        try:
            reactor.dispatch(0)
        except KeyboardInterrupt:
            pass
        else:
            raise AssertionError("KeyboardInterrupt swallowed")
    finally:
        reactor.close()
        os.close(r)
        os.close(w)


def test_a_console_header_beyond_reason_is_healed_never_overflowed():
    """abi/console.py: a writer (the host appending a userland's lines) never trusts the head
    it reads: 2**64-1 there is brought back into range with the text kept in order."""
    from partition.abi import layout as L
    from partition.abi.console import HEAD_MAX, ConsoleWriter, format_console, read_console
    buf = bytearray(L.CONSOLE_DATA + 64)
    format_console(buf)
    w = ConsoleWriter(memoryview(buf))
    w.write("first\n")
    w.data.release()
    L.CONSOLE_HEADER.pack_into(buf, 0, L.CONSOLE_MAGIC, 64, 2**64 - 1)
    w = ConsoleWriter(memoryview(buf))
    assert "beyond reason" in w.healed
    w.write("second\n")
    assert L.CONSOLE_HEADER.unpack_from(buf, 0)[2] <= HEAD_MAX
    assert read_console(buf).endswith("second\n")
    # a head moved beyond reason under a writer already open: not taken either
    L.CONSOLE_HEADER.pack_into(buf, 0, L.CONSOLE_MAGIC, 64, 2**64 - 3)
    w.write("third\n")
    assert read_console(buf).endswith("third\n")
    w.data.release()
    buf[0:4] = b"XXXX"                                  # a bad magic: formatted afresh
    w = ConsoleWriter(memoryview(buf))
    assert w.healed and read_console(buf) == ""
    w.data.release()


def test_a_descriptor_unwatched_earlier_in_the_turn_is_not_handled():
    """Two descriptors ready in one turn; the first's handler unwatches the second and its
    number is watched again for something else: the second's old handler is not called (its
    key is stale), the new one is, from the next turn."""
    reactor = Reactor(lambda watch, exc: None)
    r1, w1 = os.pipe()
    r2, w2 = os.pipe()
    got: list[str] = []
    a = instance(1, "a")

    def first(_inst):
        got.append("first")
        os.read(r1, 1)
        reactor.unwatch(r2)
        reactor.watch(r2, "other", a, lambda _i: got.append("new"))

    def second(_inst):
        got.append("second")
        os.read(r2, 1)
        reactor.unwatch(r1)
    try:
        reactor.watch(r1, "one", a, first)
        reactor.watch(r2, "two", a, second)
        os.write(w1, b"x")
        os.write(w2, b"x")
        reactor.dispatch(0)
        assert got in (["first"], ["second"])          # whichever the kernel listed first
        if got == ["first"]:
            reactor.dispatch(0)
            assert got == ["first", "new"]
    finally:
        reactor.close()
        for fd in (r1, w1, r2, w2):
            os.close(fd)


def test_a_host_handler_that_raises_is_reported_and_stays_watched():
    """The host's own descriptors (its doorbell: ``inst`` None) serve every instance: a
    handler of one that raises is reported, and the descriptor is still watched."""
    told: list[str] = []
    reactor = Reactor(lambda watch, exc: told.append(watch.kind))
    r, w = os.pipe()
    calls: list[int] = []

    def flaky(_inst):
        os.read(r, 1)                       # its readiness taken first, as _rung does
        calls.append(1)
        if len(calls) == 1:
            raise ValueError("a forged message")
    try:
        reactor.watch(r, "host-doorbell", None, flaky)
        os.write(w, b"x")
        reactor.dispatch(0)
        assert told == ["host-doorbell"]
        os.write(w, b"x")
        assert reactor.dispatch(0) == 1 and len(calls) == 2 and told == ["host-doorbell"]
    finally:
        reactor.close()
        os.close(r)
        os.close(w)
