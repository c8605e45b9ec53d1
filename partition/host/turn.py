"""One turn of the host's loop (the machine's ``poll``), and when the next one is due.

A turn handles what the descriptors say (each to its own handler: reactor.py), drains what a
flood left in the host's ring, looks at the watched instances (the watchdog), sweeps when due
(sweep.py), scans for foreign writes when due (writewatch.py), boots queued restarts and does
what a boot or an exit left for a moment later (lifecycle.py: successors forked, mount
namespaces held and let go). The order is the host's priority: deaths and
messages first, then what it looks at on its own.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from partition.host.ports import SYSTEM_CLOCK, Clock

if TYPE_CHECKING:
    from collections.abc import Callable

    from partition.host.hostipc import HostIPC
    from partition.host.lifecycle import Lifecycle
    from partition.host.reactor import Reactor
    from partition.host.supervision import Supervisor
    from partition.host.sweep import Sweep
    from partition.host.table import InstanceTable
    from partition.host.writewatch import WriteWatch


class Turn:
    """Drives one machine's collaborators, one turn at a time."""

    def __init__(self, table: InstanceTable, reactor: Reactor, ipc: HostIPC,
                 supervisor: Supervisor, sweeper: Sweep, writes: WriteWatch | None,
                 lifecycle: Lifecycle, closing: Callable[[], bool],
                 clock: Clock = SYSTEM_CLOCK) -> None:
        self.table = table
        self.reactor = reactor
        self.ipc = ipc
        self.supervisor = supervisor
        self.sweeper = sweeper
        self.writes = writes
        self.lifecycle = lifecycle
        self.closing = closing
        self.clock = clock

    def run(self, timeout: float | None) -> int:
        """Handle pending events; wait up to ``timeout`` for the first. Returns how many."""
        watched = self.supervisor.watched()
        if watched:
            period = min(i.recovery.watchdog for i in watched) / 4
            timeout = period if timeout is None else min(timeout, period)
        handled = self.reactor.dispatch(timeout)
        if self.ipc.pending():
            self.ipc.drain()               # what a flood left over from the last turn
        if watched:
            self.supervisor.watchdog(watched, self.lifecycle.force)
        now = self.clock.monotonic()
        self.sweeper.after_events(handled, now)
        self.sweeper.maybe_run(now)
        if self.writes is not None and self.writes.due(now):
            self.writes.scan()
        self.supervisor.run_restarts(self.lifecycle.boot, self.closing)
        due = self.lifecycle.when_due()
        if due is not None and due <= self.clock.monotonic():
            self.lifecycle.run_due()           # successors forked, namespaces held and let go
        return handled

    def next_timer(self) -> float | None:
        """Seconds until the machine has timed work of its own (a watchdog look, a write-watch
        scan, a queued restart), None if none."""
        due: list[float] = []
        watched = self.supervisor.watched()
        if watched:
            due.append(min(i.recovery.watchdog for i in watched) / 4)
        if self.writes is not None:
            due.append(max(0.0, self.writes.next_due - self.clock.monotonic()))
        if self.supervisor.pending() or self.ipc.pending():
            due.append(0.0)
        lifecycle = self.lifecycle.when_due()
        if lifecycle is not None:        # a successor's fork, a namespace held or let go
            due.append(max(0.0, lifecycle - self.clock.monotonic()))
        if len(self.table):
            due.append(max(0.0, self.sweeper.due - self.clock.monotonic()))
        return min(due) if due else None
