"""The sweep's back-off and its turns, against a fake clock: no process, no shared memory."""

from host_fakes import FakeArena, FakeClock, instance

from partition.host.instance import State
from partition.host.sweep import (
    COUNTERS_BATCH,
    SWEEP_BATCH,
    SWEEP_IDLE_MAX_S,
    SWEEP_PERIOD_S,
    Sweep,
    turn,
)
from partition.host.table import InstanceTable


class Views:
    def __init__(self) -> None:
        self.written: list[str] = []

    def counted(self, name: str) -> bool:
        return name in self.written

    def counters(self, name: str, counters: dict[str, int]) -> None:
        self.written.append(name)


def _sweep(n: int = 0):
    table, arena, clock, views = InstanceTable(), FakeArena(), FakeClock(), Views()
    for i in range(1, n + 1):
        table.add(instance(i, f"i{i}", state=State.ACTIVE, pid=1000 + i))
    table.changes += 1
    watched: list[list[str]] = []
    sweep = Sweep(table, arena.own, views, lambda inst: dict(inst.counters),
                  lambda batch: watched.append([i.name for i in batch]), clock=clock)
    return sweep, table, arena, clock, views, watched


def _run_when_due(sweep, clock) -> float:
    clock.now = max(clock.now, sweep.due)
    sweep.maybe_run(clock.now)
    return sweep.period


def test_a_quiet_machine_doubles_the_period_up_to_its_cap():
    sweep, _, _, clock, _, _ = _sweep(2)
    periods = [_run_when_due(sweep, clock) for _ in range(7)]
    # the first sweep reads each instance's counters for the first time: something moved
    assert periods == [SWEEP_PERIOD_S, 0.5, 1.0, SWEEP_IDLE_MAX_S, SWEEP_IDLE_MAX_S,
                       SWEEP_IDLE_MAX_S, SWEEP_IDLE_MAX_S]
    assert sweep.due == clock.now + SWEEP_IDLE_MAX_S


def test_it_does_not_sweep_before_it_is_due():
    sweep, _, _, clock, _, watched = _sweep(1)
    _run_when_due(sweep, clock)
    clock.advance(SWEEP_PERIOD_S / 2)
    sweep.maybe_run(clock.now)
    assert len(watched) == 1


def test_an_event_brings_the_period_back_at_once():
    sweep, _, _, clock, _, _ = _sweep(1)
    for _ in range(6):
        _run_when_due(sweep, clock)
    assert sweep.period == SWEEP_IDLE_MAX_S
    sweep.after_events(1, clock.now)
    assert sweep.period == SWEEP_PERIOD_S and sweep.due == clock.now + SWEEP_PERIOD_S
    assert sweep.handled == 1


def test_a_moving_loop_or_heartbeat_keeps_the_period_short():
    sweep, table, arena, clock, _, _ = _sweep(1)
    inst = table.find("i1")
    for _ in range(4):
        _run_when_due(sweep, clock)
    assert sweep.period > SWEEP_PERIOD_S
    arena.own(inst.id).progress += 1
    assert _run_when_due(sweep, clock) == SWEEP_PERIOD_S
    assert inst.progress_mark == (1, clock.now)
    arena.own(inst.id).heartbeats_sent += 3
    assert _run_when_due(sweep, clock) == SWEEP_PERIOD_S
    assert inst.counters["heartbeats"] == 3 and inst.last_heartbeat == clock.time()


def test_a_change_published_counts_as_movement():
    sweep, table, _, clock, _, _ = _sweep(0)
    for _ in range(4):
        _run_when_due(sweep, clock)
    table.changes += 1
    assert _run_when_due(sweep, clock) == SWEEP_PERIOD_S


def test_each_sweep_looks_at_the_next_batch_of_running_instances():
    sweep, table, _, clock, views, watched = _sweep(SWEEP_BATCH + 8)
    table.add(instance(99, "stopped", state=State.LOADED))
    table.changes += 1
    _run_when_due(sweep, clock)
    _run_when_due(sweep, clock)
    assert [len(b) for b in watched] == [SWEEP_BATCH, SWEEP_BATCH]
    assert watched[1][:8] == [f"i{i}" for i in range(SWEEP_BATCH + 1, SWEEP_BATCH + 9)]
    assert "stopped" not in {n for b in watched for n in b}
    assert len(set(views.written)) == SWEEP_BATCH + 8     # every one looked at has its file


def test_turns_wrap_round_and_cover_everything():
    items = list(range(10))
    got, at = [], 0
    for _ in range(5):
        batch, at = turn(items, at, 4)      # type: ignore[arg-type]
        got += batch
    assert got[:12] == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]
    assert turn(items[:3], 7, COUNTERS_BATCH) == (items[:3], 0)   # type: ignore[arg-type]
