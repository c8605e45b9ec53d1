"""The host's sweep: its look at what instances write where no event tells it.

When each loop last moved (mkctl top), heartbeats, drop filters, stalled rings, and the counters
views (COUNTERS_BATCH at a time). Every SWEEP_PERIOD_S it looks at the next SWEEP_BATCH running
instances in turn, so its cost stays flat as a machine grows: each instance is seen every 0.25 s
up to 32 instances, every 4 s at 511. A sweep that finds nothing moved doubles its period up to
SWEEP_IDLE_MAX_S; anything that moves brings it back. What it reads is the instances' own
words: counted and shown, never acted on.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from partition.host.instance import Instance, State
from partition.host.ports import SYSTEM_CLOCK, Clock
from partition.host.table import InstanceTable

#: the sweep's period, and how many instances it looks at each
SWEEP_PERIOD_S = 0.25
#: ... and its longest period: a sweep that finds nothing moved (no loop or heartbeat, no event
#: or change since the last one) doubles the period up to this; anything that moves brings it
#: back to SWEEP_PERIOD_S. A turn of 32 instances costs its host about 4 ms on the caches an
#: idle VM wakes up to: at 511 tickless kernels the host used 0.6-1.0% of a CPU at rest with
#: 1 s here, 0.14-0.40% with 2 s (docs/benchmarks.md)
SWEEP_IDLE_MAX_S = 2.0
SWEEP_BATCH = 32
#: counters views rewritten per sweep, when they moved: each every 0.25 s up to 8 instances,
#: every 16 s at 511 (its first is written at the instance's first look)
COUNTERS_BATCH = 8


def turn(items: list[Instance], at: int, size: int) -> tuple[list[Instance], int]:
    """The next ``size`` of ``items`` from position ``at``, wrapping round, and where the turn
    after it starts: all of them when they are no more than ``size``."""
    n = len(items)
    if n <= size:
        return items, 0
    start = at % n
    end = start + size
    # (sliced, never the whole list copied: a copy touches every instance object, 511 cache
    # misses a sweep on the caches an idle host wakes up to)
    return (items[start:end] if end <= n else items[start:] + items[:end - n]), end


class OwnPage(Protocol):
    """What the sweep reads of an instance's own page."""

    progress: int
    heartbeats_sent: int


class CountersViews(Protocol):
    def counted(self, name: str) -> bool: ...

    def counters(self, name: str, counters: dict[str, int]) -> None: ...


class Sweep:
    """When the next sweep is due, its back-off, and the sweep itself."""

    def __init__(self, table: InstanceTable, own: Callable[[int], OwnPage],
                 views: CountersViews, counters: Callable[[Instance], dict[str, int]],
                 watch: Callable[[list[Instance]], None],
                 clock: Clock = SYSTEM_CLOCK) -> None:
        self.table = table
        self.own = own
        self.views = views
        self.counters = counters
        self.watch = watch              # the drop filters and rings of a batch (hostipc.py)
        self.clock = clock
        self.due = 0.0                  # the next sweep (CLOCK_MONOTONIC)
        self.period = SWEEP_PERIOD_S    # longer while nothing moves
        self.handled = 0                # events the reactor handled, ever
        self._swept_at = (-1, -1)       # (changes, events handled) at the last sweep
        self._sweep_at = self._counters_at = 0
        self._running: tuple[int, list[Instance]] = (-1, [])

    def after_events(self, handled: int, now: float) -> None:
        """The reactor handled ``handled`` events: something moves, look again soon."""
        if handled:
            self.handled += handled
            if self.period > SWEEP_PERIOD_S:
                self.period = SWEEP_PERIOD_S
                self.due = min(self.due, now + SWEEP_PERIOD_S)

    def maybe_run(self, now: float) -> None:
        """Sweep if one is due, then set when the next is: later while nothing moves."""
        if now < self.due:
            return
        moved = self.run(now)
        changes = self.table.changes
        quiet = not moved and self._swept_at == (changes, self.handled)
        self.period = min(2 * self.period, SWEEP_IDLE_MAX_S) if quiet else SWEEP_PERIOD_S
        self._swept_at = (changes, self.handled)
        self.due = now + self.period

    def run(self, now: float) -> bool:
        """One sweep of the next batch; returns whether anything it read had moved."""
        table = self.table
        if self._running[0] != table.changes:
            self._running = (table.changes, [i for i in table
                                             if i.state == State.ACTIVE and i.pid is not None])
        running = self._running[1]
        batch, self._sweep_at = turn(running, self._sweep_at, SWEEP_BATCH)
        wall = self.clock.time()
        moved = False
        views = self.views
        for inst in batch:
            if not views.counted(inst.name):    # its first look writes its counters file
                views.counters(inst.name, self.counters(inst))
            own = self.own(inst.id)
            progress = own.progress
            if progress != inst.progress_mark[0]:
                inst.run.mark_progress(progress, now)
                moved = True
            beats = own.heartbeats_sent
            if beats != inst.heartbeats_seen:
                moved = True
                if inst.heartbeats_seen >= 0:
                    beat = beats - inst.heartbeats_seen
                    inst.count("heartbeats", beat if 0 < beat < 1 << 20 else 1)
                    inst.run.heartbeat(wall)
                inst.run.saw_heartbeats(beats)
        # the counters views then, fewer at a time: each that moved is a file write
        written, self._counters_at = turn(running, self._counters_at, COUNTERS_BATCH)
        for inst in written:
            views.counters(inst.name, self.counters(inst))
        self.watch(batch)
        return moved
