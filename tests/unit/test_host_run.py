"""An instance's run and its transition table: what a process may do in which phase, and that
a refused step changes nothing."""

import pytest
from host_fakes import instance

from partition.host.instance import RUN_TRANSITIONS, Parked, Phase, RunTransitionError


class Channel:
    """Stands for the host end of a doorbell channel: nothing is opened."""

    def close(self) -> None:
        pass


def _parked(pid: int = 100) -> Parked:
    return Parked(pid, 7, 8, Channel(), 9, child_fds=(3, 4))    # type: ignore[arg-type]


def test_a_boot_takes_the_parked_process_and_starts_a_fresh_run():
    inst = instance()
    inst.run.park(_parked())
    inst.run.halt("forced")
    inst.run.said_halted("old words")
    p = inst.run.unpark()
    inst.run.start(p, 12.5)
    assert inst.run.phase == Phase.RUNNING and inst.parked is None
    assert (inst.pid, inst.pidfd, inst.doorbell_fd, inst.child_fds) == (100, 7, 8, (3, 4))
    assert inst.generation == 1 and inst.pid_start == 12.5
    assert inst.halt_requested is None and inst.halted_said is None and not inst.adopted


def test_a_second_process_beside_a_live_one_is_refused_and_changes_nothing():
    inst = instance()
    inst.run.start(_parked(100), 0.0)
    with pytest.raises(RunTransitionError) as err:
        inst.run.start(_parked(200), 0.0)
    assert err.value.code == "EPROTO" and "running cannot start" in err.value.message
    with pytest.raises(RunTransitionError):
        inst.run.adopt(300, 1, 2, 0.0, (3, 4))
    assert inst.pid == 100 and inst.generation == 1
    inst.run.end()
    assert inst.run.phase == Phase.IDLE and inst.pid is None and inst.channel is None
    with pytest.raises(RunTransitionError, match="idle cannot end"):
        inst.run.end()


def test_one_successor_is_parked_at_a_time():
    inst = instance()
    inst.run.park(_parked(1))
    with pytest.raises(RunTransitionError, match="parked already"):
        inst.run.park(_parked(2))
    assert inst.run.unpark().pid == 1
    with pytest.raises(RunTransitionError, match="no successor"):
        inst.run.unpark()


def test_the_table_names_every_phase_and_only_known_events():
    assert {p for p, _ in RUN_TRANSITIONS} == set(Phase)
    assert {e for _, e in RUN_TRANSITIONS} == {"start", "adopt", "end"}


def test_the_run_reads_as_the_instance_but_is_written_through_the_run():
    inst = instance()
    with pytest.raises(AttributeError):
        inst.pid = 5                    # type: ignore[misc]
    assert inst.run.next_command() == 1 and inst.cmd_seq == 1
