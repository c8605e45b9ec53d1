"""A kill fault's order (issue 20): everything the host says and looks at comes before the
signal, whose exit's notice is timed from just before it; a frozen instance is thawed after."""

from typing import Any

from host_fakes import FakeClock, FakeEvents, FakeOS, instance

from partition.host import faults
from partition.host.instance import Instance, State


class Recorded:
    """The port, the event log and the freezer of one injection, in one list of calls; an
    event takes the clock a second."""

    def __init__(self, frozen: bool) -> None:
        self.clock = FakeClock()
        self.order: list[str] = []
        self.is_frozen = frozen
        rec = self

        class Port(FakeOS):
            def kill(self, pid: int, sig: int) -> None:
                rec.order.append(f"kill {sig}")

        class Events(FakeEvents):
            def warning(self, event: str, **fields: Any) -> None:
                rec.order.append(event)
                rec.clock.advance(1.0)

        self.port, self.events = Port(), Events()

    def frozen(self, instance_id: int) -> bool:
        self.order.append("frozen?")
        return self.is_frozen

    def unfreeze(self, inst: Instance) -> None:
        self.order.append("unfreeze")

    def inject(self, inst: Instance, kind: str) -> dict[str, Any]:
        return faults.inject(inst, kind, {}, lambda i: None, lambda i: {"name": i.name}, None,
                             lambda *a, **k: None, self.events, clock=self.clock,
                             port=self.port, freeze=lambda i: True, unfreeze=self.unfreeze,
                             frozen=self.frozen)


def test_a_kill_is_said_and_looked_at_before_its_signal():
    r = Recorded(frozen=False)
    inst = instance(1, "v", pid=4242, state=State.ACTIVE)
    assert r.inject(inst, "kill") == {"name": "v"}
    assert r.order == ["frozen?", "fault_injected", "kill 9"]      # nothing after the signal
    assert inst.pending_fault == ("kill", r.clock.now)     # timed after the event: 1001.0
    assert r.clock.now == 1001.0 and inst.halt_requested == "fault"
    assert inst.counters["faults_injected"] == 1


def test_a_frozen_instance_is_thawed_after_its_kill():
    r = Recorded(frozen=True)
    inst = instance(1, "v", pid=4242, state=State.ACTIVE)
    r.inject(inst, "kill")
    assert r.order == ["frozen?", "fault_injected", "kill 9", "unfreeze"]


def test_other_faults_are_timed_then_said():
    r = Recorded(frozen=False)
    inst = instance(1, "v", pid=4242, state=State.ACTIVE)
    r.inject(inst, "hang-stop")
    assert r.order == ["kill 19", "fault_injected"]
    assert inst.pending_fault == ("hang-stop", 1000.0)
