"""The supervisor's decisions against a fake clock and a fake OS: restart intensity, the
watchdog's nudge and failure, takeovers, the restart queue. No process, no shared memory."""

from host_fakes import FakeArena, FakeClock, FakeEvents, FakeOS, FakePublisher, instance

from partition.host.instance import ExitRecord, State
from partition.host.recovery import RecoveryPolicy
from partition.host.supervision import Supervisor
from partition.host.table import InstanceTable


class House:
    def __init__(self) -> None:
        self.table = InstanceTable()
        self.arena = FakeArena()
        self.events = FakeEvents()
        self.publisher = FakePublisher()
        self.clock = FakeClock()
        self.port = FakeOS()
        self.printed: list[str] = []
        self.forgotten: list[str] = []
        self.forced: list[str] = []
        self.booted: list[str] = []
        self.sup = Supervisor(self.table, self.arena, self.events, self.publisher,
                              self.printed.append, lambda i: self.forgotten.append(i.name),
                              lambda iid: "oops\nlast words\n", clock=self.clock,
                              port=self.port)

    def add(self, name: str = "a", iid: int = 1, **fields):
        inst = instance(iid, name, **fields)
        self.table.add(inst)
        self.table.changes += 1
        return inst

    def force(self, inst) -> None:
        self.forced.append(inst.name)
        inst.run.halt("watchdog")

    def boot(self, inst) -> None:
        self.booted.append(inst.name)
        inst.state = State.ACTIVE


def test_restart_intensity_exceeded_gives_the_instance_up():
    h = House()
    inst = h.add(state=State.LOADED,
                 recovery=RecoveryPolicy.build("restart", max_restarts=2, restart_window=5.0))
    h.sup.recover(inst)
    h.clock.advance(1.0)
    h.sup.recover(inst)
    assert h.sup.pending() and inst.state == State.LOADED and inst.failure is None
    h.clock.advance(1.0)
    h.sup.recover(inst)                         # a third failure inside the 5 s window
    assert inst.state == State.FAILED
    assert inst.failure == "restart intensity exceeded: more than 2 restarts in 5 s"
    assert h.forgotten == ["a"]                 # its parked successor is not booted
    assert h.publisher.transitions == [("a", State.FAILED, "restart-intensity")]
    assert h.printed and "restart intensity exceeded" in h.printed[0]


def test_restarts_outside_the_window_are_allowed_again():
    h = House()
    inst = h.add(state=State.LOADED,
                 recovery=RecoveryPolicy.build("restart", max_restarts=1, restart_window=2.0))
    h.sup.recover(inst)
    h.clock.advance(2.5)                        # the first restart left the window
    h.sup.recover(inst)
    assert inst.state == State.LOADED and inst.failure is None


def test_queued_restarts_boot_scrubbed_unless_memory_is_preserved():
    h = House()
    a = h.add("a", 1, state=State.LOADED, memory_base=0,
              recovery=RecoveryPolicy.build("restart"))
    b = h.add("b", 2, state=State.LOADED, memory_base=1 << 16,
              recovery=RecoveryPolicy.build("restart", preserve_memory=True))
    h.sup.recover(a)
    h.sup.recover(b)
    h.sup.run_restarts(h.boot, lambda: False)
    assert h.booted == ["a", "b"] and not h.sup.pending()
    assert h.arena.scrubbed == [(0, a.memory_bytes)]          # b's memory is kept
    assert [e["scrubbed"] for e in h.events.named("restart")] == [True, False]
    assert a.counters["restarts"] == b.counters["restarts"] == 1


def test_no_restart_while_the_machine_closes():
    h = House()
    a = h.add(state=State.LOADED, recovery=RecoveryPolicy.build("restart"))
    h.sup.recover(a)
    h.sup.run_restarts(h.boot, lambda: True)
    assert h.booted == []


def _watched(h: House, watchdog: float = 1.0):
    inst = h.add(state=State.ACTIVE, pid=4242, doorbell_fd=17,
                 recovery=RecoveryPolicy.build(watchdog=watchdog))
    assert h.sup.watched() == [inst]
    return inst


def test_a_stalled_kernel_is_nudged_once_then_forced_at_its_period():
    h = House()
    inst = _watched(h)
    h.arena.own(inst.id).progress = 5
    h.sup.watchdog([inst], h.force)             # first look: the stall is timed from now
    h.clock.advance(0.4)
    h.sup.watchdog([inst], h.force)
    assert h.port.calls == [] and h.forced == []
    h.clock.advance(0.2)                        # past half the period: rung, once
    h.sup.watchdog([inst], h.force)
    h.clock.advance(0.2)
    h.sup.watchdog([inst], h.force)
    assert h.port.named("ring_doorbell") == [(17,)]
    assert inst.counters["watchdog_nudges"] == 1 and h.forced == []
    h.clock.advance(0.3)                        # past the whole period: hung
    h.sup.watchdog([inst], h.force)
    assert h.forced == ["a"]
    assert [e["progress"] for e in h.events.named("watchdog_expired")] == [5]
    h.clock.advance(0.5)                        # being halted: not forced twice
    h.sup.watchdog([inst], h.force)
    assert h.forced == ["a"]


def test_a_kernel_that_answers_the_nudge_is_not_forced():
    h = House()
    inst = _watched(h)
    h.sup.watchdog([inst], h.force)
    h.clock.advance(0.6)
    h.sup.watchdog([inst], h.force)             # nudged
    h.arena.own(inst.id).progress += 1          # its loop lapped
    h.clock.advance(0.1)
    h.sup.watchdog([inst], h.force)
    h.clock.advance(0.8)            # 1.5 s since the first look, 0.8 s since it moved: a new
    h.sup.watchdog([inst], h.force)     # stall, rung once more, and not yet a hang
    assert h.forced == [] and inst.counters["watchdog_nudges"] == 2


def test_only_active_running_instances_with_a_watchdog_are_watched():
    h = House()
    watched = _watched(h)
    h.add("off", 2, state=State.ACTIVE, pid=1, recovery=RecoveryPolicy.build(watchdog=0.0))
    h.add("idle", 3, state=State.LOADED, recovery=RecoveryPolicy.build(watchdog=1.0))
    assert h.sup.watched() == [watched]


def test_a_failed_primary_is_served_by_its_active_standby():
    h = House()
    primary = h.add("p", 1, state=State.LOADED, recovery=RecoveryPolicy.build("standby"))
    standby = h.add("s", 2, state=State.ACTIVE, pid=99, standby_for="p")
    h.sup.recover(primary)
    assert primary.served_by == standby.id
    assert h.arena.peer(primary.id).redirect == standby.id + 1
    assert h.events.named("takeover")[0]["standby"] == "s"
    assert h.publisher.published == [primary]


def test_no_active_standby_is_a_failed_takeover():
    h = House()
    primary = h.add("p", 1, state=State.LOADED, recovery=RecoveryPolicy.build("standby"))
    h.add("s", 2, state=State.LOADED, standby_for="p")
    h.sup.recover(primary)
    assert primary.served_by is None and h.events.named("takeover_failed")


def test_a_failure_record_times_its_fault_and_keeps_the_console_tail():
    h = House()
    inst = h.add(state=State.ACTIVE, pid=5)
    inst.run.pending_fault = ("panic", h.clock.now)
    h.clock.advance(0.002)
    rec = ExitRecord("kernel panic", "panic", time=1.0)
    failure = h.sup.record_failure(inst, rec, detected=h.clock.now - 0.001)
    assert h.sup.is_failure(rec) and not h.sup.is_failure(ExitRecord("", "graceful"))
    assert failure["fault"] == "panic" and failure["detect_ms"] == 1.0
    assert failure["recorded_ms"] == 2.0
    assert failure["console_tail"] == ["oops", "last words"]
    assert inst.counters["failures"] == 1 and inst.failures == [failure]


def test_a_reboot_inside_is_a_counted_restart_and_a_halt_asked_for_wins():
    """Issue 22: reboot(2) in a userland force-halts the kernel (halt ``reboot``) and its exit
    queues a restart counted against the intensity, whatever the policy; one while the host
    already halts the instance (an operator's kill) does nothing but say so."""
    h = House()
    inst = h.add(state=State.ACTIVE, pid=4242,
                 recovery=RecoveryPolicy.build("none", max_restarts=1, restart_window=5.0))
    assert h.sup.reboot(inst, h.force) and h.forced == ["a"]
    assert inst.halt_requested == "reboot"
    inst.state = State.LOADED                   # its exit handled (lifecycle.py)
    h.sup.rebooted(inst)
    assert h.sup.pending()
    h.sup.run_restarts(h.boot, lambda: False)
    assert h.booted == ["a"] and inst.counters["restarts"] == 1
    inst.run.halt(None)
    assert h.sup.reboot(inst, h.force)          # once more inside the window: given up
    inst.state = State.LOADED
    h.sup.rebooted(inst)
    assert inst.state == State.FAILED and not h.sup.pending()
    other = h.add("b", 2, state=State.ACTIVE, pid=4343)
    other.run.halt("graceful")                  # mkctl kill in progress
    assert not h.sup.reboot(other, h.force)
    assert h.forced == ["a", "a"] and other.halt_requested == "graceful"
    assert h.events.named("reboot_skipped"), h.events.said
