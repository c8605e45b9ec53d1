"""A kill fault's order (issue 20): everything the host says and looks at comes before the
signal, whose exit's notice is timed from just before it; a frozen instance is thawed after.
A hang-spin (issue 22): the fault sent, then the userland alone frozen; nothing if not sent."""

import errno
from typing import Any

import pytest
from host_fakes import FakeClock, FakeEvents, FakeOS, instance

from partition.abi.ring import RingError
from partition.errors import ResourceBusy
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


def spin(command, order: list[str]) -> Instance:
    """A hang-spin injected through ``command``; the calls in ``order``."""
    r = Recorded(frozen=False)
    r.order = order
    inst = instance(1, "v", pid=4242, state=State.ACTIVE)

    def freeze_userland(instance_id: int) -> bool:
        order.append(f"freeze userland {instance_id}")
        return True

    def freeze(instance_id: int) -> bool:
        order.append(f"freeze {instance_id}")
        return True

    def send(*args: Any, **kw: Any) -> Any:
        order.append("command")
        return command()

    faults.inject(inst, "hang-spin", {}, lambda i: None, lambda i: {"name": i.name}, None,
                  send, r.events, clock=r.clock, port=r.port, freeze=freeze,
                  unfreeze=r.unfreeze, frozen=r.frozen, freeze_userland=freeze_userland)
    return inst


def test_a_hang_spin_freezes_the_userland_alone_once_sent():
    """The kernel is sent its fault and left running (no signal, no whole-instance freeze:
    it must spin for the watchdog to see it); its userland alone is frozen, then it is said."""
    order: list[str] = []
    inst = spin(lambda: None, order)
    assert order == ["command", "freeze userland 1", "fault_injected"]
    assert inst.pending_fault == ("hang-spin", 1000.0)


def test_a_hang_spin_that_could_not_be_sent_freezes_nothing():
    def full() -> None:
        raise RingError(errno.ENOSPC, "full")
    order: list[str] = []
    with pytest.raises(ResourceBusy):
        spin(full, order)
    assert order == ["command"]
