"""Supervision: what the host does about an instance that failed or stopped making progress.

IHK's hang detection (the watchdog), Erlang's restart intensity (the restart queue), and an
active-backup takeover by a pre-booted standby; every failure is recorded with the fault that
caused it (when one was injected) and the last lines of the failed kernel's console. Kept out of
the machine's verbs because it acts on its own, from the reactor, never at a caller's request.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from partition.errors import MKError
from partition.host.exits import FAILURE_KINDS, REBOOT
from partition.host.instance import ExitRecord, Instance, State
from partition.host.ports import SYSTEM_CLOCK, SYSTEM_OS, Clock, OSPort

if TYPE_CHECKING:
    from partition.host.arena import Arena
    from partition.host.events import EventLog
    from partition.host.publish import Publisher
    from partition.host.table import InstanceTable


class Supervisor:
    """The watchdog, the restart queue and takeovers of one machine. It decides; what it
    decides is done by the callables it is given (``force`` and ``boot``: lifecycle.py's, passed
    by the reactor at each call, so that neither module holds the other)."""

    def __init__(self, table: InstanceTable, arena: Arena, events: EventLog,
                 publisher: Publisher, printk: Callable[[str], None],
                 forget_parked: Callable[[Instance], object],
                 console_text: Callable[[int], str],
                 clock: Clock = SYSTEM_CLOCK, port: OSPort = SYSTEM_OS) -> None:
        self.table = table
        self.arena = arena
        self.events = events
        self.publisher = publisher
        self.printk = printk
        self.forget_parked = forget_parked
        self.console_text = console_text
        self.clock = clock
        self.port = port
        self._restart_queue: list[Instance] = []
        self._restarting = False
        self._watched: tuple[int, list[Instance]] = (-1, [])

    # -- watchdog --------------------------------------------------------------------------
    def watched(self) -> list[Instance]:
        """The active instances with a watchdog; computed again only after a published
        change (every poll asks, and a machine may hold 511 instances)."""
        changes = self.table.changes
        if self._watched[0] != changes:
            self._watched = (changes, [
                i for i in self.table
                if i.recovery.watchdog > 0 and i.state == State.ACTIVE and i.pid is not None])
        return self._watched[1]

    def watchdog(self, watched: list[Instance], force: Callable[[Instance], None]) -> None:
        """IHK's hang detection: an active instance whose progress counter stood still for
        longer than its watchdog period is hung; it is force-halted and handled as a failure.

        A kernel may be quiet rather than hung: a tickless one (``idle_timeout = None``)
        sleeps until a doorbell, and a slow tick may be longer than the period. So when the
        counter has stood still for half the period the host rings the instance's doorbell,
        once per stall (``watchdog_nudges`` counts it): a kernel that is only idle runs a lap
        of its loop and counts; a hung one does not, and is force-halted at the full period.
        The ring is the same the host gives any sender; it is a wake-up, not a message."""
        now = self.clock.monotonic()
        for inst in watched:
            value = self.arena.own(inst.id).progress
            last, since = inst.progress_seen
            stalled = now - since
            if value != last or since == 0.0:
                inst.run.saw_progress(value, now)
            elif stalled > inst.recovery.watchdog / 2 and inst.nudged != since \
                    and stalled <= inst.recovery.watchdog and inst.doorbell_fd is not None:
                inst.run.nudge(since)
                inst.count("watchdog_nudges")
                self.port.ring_doorbell(inst.doorbell_fd)
            elif stalled > inst.recovery.watchdog and inst.halt_requested is None \
                    and inst.pid is not None:
                self.events.warning("watchdog_expired", instance=inst.id, name=inst.name,
                                    stalled_s=round(stalled, 3), progress=value)
                force(inst)                     # force_halt, the write scan, SIGKILL
                inst.run.halt("watchdog")

    def update_policy(self, inst: Instance, **changes: Any) -> None:
        """Change an instance's recovery policy or watchdog (all or nothing); the watchdog
        times a stall from now."""
        inst.recovery.update(**changes)
        self.watch_from_now(inst)
        self.events.info("instance_updated", instance=inst.id, name=inst.name,
                         recovery=inst.recovery.to_dict())
        self.publisher.publish(inst)

    def watch_from_now(self, inst: Instance) -> None:
        """The watchdog times a stall from now (a boot, a new policy), not from the last
        run's final progress."""
        inst.run.saw_progress(self.arena.own(inst.id).progress, self.clock.monotonic())

    # -- failures --------------------------------------------------------------------------
    def is_failure(self, record: ExitRecord) -> bool:
        return record.how in FAILURE_KINDS

    def record_failure(self, inst: Instance, record: ExitRecord,
                       detected: float) -> dict[str, Any]:
        """The failure record, made as soon as the exit is classified: the death's notice
        ends here (``detect_ms`` is measured to ``detected``, the handler's start). Its event
        is ``announce_failure``'s, once the host has tidied up after the run (issue 20: the
        record first, what can wait after it)."""
        fault = inst.pending_fault
        failure: dict[str, Any] = {
            "kind": FAILURE_KINDS[record.how], "time": record.time, "reason": record.reason,
            "fault": fault[0] if fault else None,
            "detect_ms": round((detected - fault[1]) * 1e3, 3) if fault else None,
            "recorded_ms": round((self.clock.monotonic() - fault[1]) * 1e3, 3) if fault else None,
            "exit": record.to_dict(),
            "console_tail": self.console_text(inst.id).rstrip("\n").splitlines()[-8:],
        }
        inst.failures.append(failure)
        del inst.failures[:-20]
        inst.count("failures")
        return failure

    def announce_failure(self, inst: Instance, failure: dict[str, Any]) -> None:
        self.events.warning("failure", instance=inst.id, name=inst.name, **failure)

    def recover(self, inst: Instance) -> None:
        """Apply the instance's recovery policy to a failure just recorded."""
        pol = inst.recovery
        if pol.policy == "standby":
            self.takeover(inst)
            return
        if pol.policy != "restart":
            return
        self._queue_restart(inst)

    def _queue_restart(self, inst: Instance) -> None:
        """A restart of loaded ``inst`` into the queue (``run_restarts`` boots it on the next
        turn), if its restart intensity allows one more; else it is given up (failed)."""
        pol = inst.recovery
        if pol.allow_restart(self.clock.monotonic()):
            self._restart_queue.append(inst)
            return
        inst.record_failure(f"restart intensity exceeded: more than {pol.max_restarts} "
                            f"restarts in {pol.restart_window:g} s")
        self.forget_parked(inst)                # its successor will not be booted
        self.printk(f"Instance {inst.id} ({inst.name}) failed: {inst.failure}")
        self.publisher.transition(inst, State.FAILED, "restart-intensity", reason=inst.failure)

    # -- reboot(2) inside ------------------------------------------------------------------
    def reboot(self, inst: Instance, force: Callable[[Instance], None]) -> bool:
        """A program in the userland of active ``inst`` called reboot(2) (host/userlands.py):
        its kernel is force-halted (halt ``reboot``); its exit queues a restart
        (``rebooted``). Never a verb: this runs from the reactor. Refused (False, an event)
        when the host already halts it: an operator's kill wins over a reboot."""
        if inst.state != State.ACTIVE or inst.pid is None or inst.halt_requested is not None:
            self.events.info("reboot_skipped", instance=inst.id, name=inst.name,
                             why=f"halting already ({inst.halt_requested})"
                             if inst.halt_requested else f"it is {inst.state.value}")
            return False
        force(inst)
        inst.run.halt(REBOOT)
        return True

    def rebooted(self, inst: Instance) -> None:
        """The kernel a reboot halted has exited (lifecycle.py, once it is loaded): a restart,
        whatever the recovery policy (it was asked for, as a spawn kernel that reboots is
        booted again), counted against the restart intensity like any other: a userland that
        reboots in a loop gives its instance up (failed) once past ``max_restarts``."""
        if inst.state == State.LOADED:
            self._queue_restart(inst)

    # -- takeover --------------------------------------------------------------------------
    def takeover(self, primary: Instance) -> None:
        """Active-backup: the first active standby of ``primary`` serves its role from now on."""
        t0 = self.clock.monotonic()
        standby = next((i for i in self.table if i.standby_for == primary.name
                        and i.state == State.ACTIVE and i.pid is not None), None)
        if standby is None:
            self.events.warning("takeover_failed", instance=primary.id, name=primary.name,
                             reason="no active standby")
            return
        primary.serve(standby.id)
        self.arena.peer(primary.id).redirect = standby.id + 1
        self.printk(f"Instance {primary.id} ({primary.name}) failed; standby {standby.id} "
                 f"({standby.name}) takes over its role")
        self.events.warning("takeover", instance=primary.id, name=primary.name,
                            standby=standby.name, standby_id=standby.id,
                            takeover_ms=round((self.clock.monotonic() - t0) * 1e3, 3))
        self.publisher.publish(primary)

    def pending(self) -> bool:
        """A restart is queued and not yet running."""
        return bool(self._restart_queue) and not self._restarting

    # -- restarts --------------------------------------------------------------------------
    def run_restarts(self, boot: Callable[[Instance], None], closing: Callable[[], bool]) -> None:
        """Boot what the queue holds (``boot``: lifecycle.py's). Not re-entered: a restart
        that fails at once queues itself again only through the next exit, handled by the next
        poll."""
        if not self._restart_queue or self._restarting:
            return
        self._restarting = True
        try:
            while self._restart_queue:
                inst = self._restart_queue.pop(0)
                if inst.state != State.LOADED or closing() or inst.name not in self.table:
                    continue
                inst.count("restarts")
                # preserved regions (KHO) survive: kho.prepare scrubs around them at boot
                scrub = not inst.recovery.preserve_memory and inst.kho is None
                if scrub:   # reclaim before reuse: the failed run's memory is not trusted
                    self.arena.scrub(inst.memory_base, inst.memory_bytes)
                self.events.info("restart", instance=inst.id, name=inst.name,
                              restarts=inst.counters["restarts"], scrubbed=scrub)
                try:
                    boot(inst)
                except MKError as exc:
                    self.events.warning("restart_failed", instance=inst.id, name=inst.name,
                                     error=exc.message)
        finally:
            self._restarting = False
