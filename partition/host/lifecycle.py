"""Booting, halting and reaping instance processes (loading.py forks them at load).

Boot is the real system's sequence in miniature: the host writes the spawn mailbox (target CPU,
generation, then ``ready``) and rings the instance's parked process, whose trampoline answers
with the generation in its own page; no fork on this path.
Halting asks first (SHUTDOWN through the ring, SIGTERM if the ring refuses) and forces after a
timeout (``force_halt``, then SIGKILL). Every exit is seen through the instance's pidfd, reaped
at once, classified and recorded before any other verb runs; failures go to the supervisor.

A moment after each boot the host holds the run's mount namespace (which the process made for
itself, guest/containment.py) and lets it go a moment after the run's exit: the last reference
tears the namespace down, an expedited RCU grace period (0.05 ms idle, milliseconds on a busy
machine) that the dying process would otherwise wait for before its pidfd says it exited, on
the path the failure's detection is timed on (issue 20, docs/benchmarks.md).
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from partition import linux
from partition.abi import message as M
from partition.abi.constants import STATE_CODES
from partition.abi.ring import RingError
from partition.errors import BadKernelImage, BootFailed, BootTimeout, ResourceBusy
from partition.host import kho
from partition.host.exits import REBOOT, classify_exit
from partition.host.instance import (
    CHANNEL,
    EXIT,
    OLD_DOORBELL,
    ExitRecord,
    Instance,
    Phase,
    State,
)
from partition.host.ports import SYSTEM_OS, OSPort

if TYPE_CHECKING:
    from partition.host.arena import Arena
    from partition.host.cgroups import Cgroups
    from partition.host.events import EventLog
    from partition.host.hostipc import HostIPC
    from partition.host.loading import Loading, Wait
    from partition.host.publish import Publisher
    from partition.host.reactor import Reactor
    from partition.host.supervision import Supervisor
    from partition.host.table import InstanceTable
    from partition.host.writewatch import WriteWatch


#: how long ``exec`` waits for a kernel's boot() to return
BOOT_RETURN_S = 30.0
#: a restarting instance's next incarnation is forked, and every run's mount namespace held,
#: this long after its boot
SUCCESSOR_DELAY_S = 0.05
#: a run's mount namespace is let go this long after its exit (its teardown then blocks the
#: host, off the failure's detection and its restart)
NAMESPACE_RELEASE_S = 0.05


class Lifecycle:
    """Boots, halts and reaps the instance processes of one machine."""

    def __init__(self, table: InstanceTable, arena: Arena, reactor: Reactor, events: EventLog,
                 cgroups: Cgroups, loading: Loading, ipc: HostIPC, supervisor: Supervisor,
                 publisher: Publisher, writes: WriteWatch | None, wait: Wait,
                 printk: Callable[[str], None], closing: Callable[[], bool],
                 survive_host: bool, boot_timeout: float, port: OSPort = SYSTEM_OS) -> None:
        self.table = table
        self.arena = arena
        self.reactor = reactor
        self.events = events
        self.cgroups = cgroups
        self.loading = loading
        self.ipc = ipc
        self.supervisor = supervisor
        self.publisher = publisher
        self.writes = writes
        self.wait = wait
        self.printk = printk
        self.closing = closing
        self.survive_host = survive_host
        self.boot_timeout = boot_timeout
        self.port = port                      # signals and doorbells (host/ports.py)
        self.successors_due: list[tuple[float, Instance]] = []    # (when, instance)
        self.namespaces: dict[int, int] = {}        # running pid -> its mount namespace's fd
        self.releases: list[tuple[float, int]] = []    # (when, namespace fd to let go)
        #: instance id -> the host pid of its next userland's parked init (host/userlands.py,
        #: wired by assembly.py): in the instance's cgroups, but none of its kernel's orphans
        self.parked_userland: Callable[[int], int | None] = lambda _inst_id: None

    # -- boot ------------------------------------------------------------------------------
    def boot(self, inst: Instance, wait_boot: bool = False, handover: bool = False) -> None:
        """Boot ``inst`` from its parked process (spawned first if there is none): returns when
        its boot CPU answered the spawn mailbox (the real system's answer), or with
        ``wait_boot`` when its kernel's ``boot()`` has returned too; raises BootFailed (with
        the reason) when it died before that, or when its image no longer loads."""
        assert inst.kimage is not None
        if inst.pid is not None:
            # one process per incarnation: a second booted beside a live run would share its
            # ring and cgroup, and the host, knowing one, would reap the wrong pid
            raise ResourceBusy(f"instance {inst.name!r} still runs as pid {inst.pid}; it is "
                               "not booted a second time", f"mkctl kill {inst.name} first")
        if inst.parked is not None and inst.parked.cpus != inst.cpus:
            # its CPUs changed while it was parked (kerf update of a loaded instance): the
            # kernel must boot knowing the new ones, so the image is loaded again
            self.loading.forget_parked(inst)
        try:
            self.loading.await_loaded(inst)
        except BadKernelImage as exc:
            inst.record_failure(f"boot failed: {exc.message}")
            inst.count("boot_failures")
            self.printk(f"Instance {inst.id} ({inst.name}) failed to boot: {exc.message}")
            self.publisher.transition(inst, State.FAILED, "boot-failure", reason=exc.message)
            raise BootFailed(f"instance {inst.name!r}: its kernel image did not load: "
                             f"{exc.message}", exc.hint) from None
        p = inst.run.unpark()
        # the parked process becomes the running one, its start time what a new host will
        # check before adopting it
        inst.run.start(p, linux.process_start_time(p.pid) if self.survive_host else 0.0)
        self.reactor.rewatch(p.pidfd, EXIT, inst, self.on_exit)
        self.reactor.watch(p.channel, CHANNEL, inst, self.ipc.serve_doorbells)
        inst.clear_failure()
        peer, own = self.arena.peer(inst.id), self.arena.own(inst.id)
        gen = inst.generation
        peer.ready = 0
        peer.force_halt = 0
        own.reason_len = own.ack_cpu = own.ack_generation = own.booted = 0
        own.clear_metrics()                  # each run publishes its own
        peer.target_cpu = inst.physical_cpus[0]
        peer.generation = gen
        peer.redirect = 0
        kho.prepare(self.arena, self.events, inst)   # preserved regions in, the rest scrubbed
        if not handover:
            # (a live update keeps both: the messages sent meanwhile wait in the ring for the
            # new kernel, and requests to the old one are still answered: same service epoch)
            self.ipc.ring_of(inst.id).reset()       # stale messages and dead claims go with the old run
            peer.epoch = (peer.epoch + 1) & 0xFFFFFFFF
        inst.serve(None)               # it serves its own role again
        peer.ready = 1                       # publish last, then ring the parked CPU
        self.port.ring_doorbell(p.doorbell_fd)
        deadline = time.monotonic() + self.boot_timeout
        acked = self.wait(lambda: inst.pid is None or own.ack_generation == gen, deadline)
        pid = p.pid
        if inst.state == State.ACTIVE or (inst.pid is None and inst.boots_acked):
            if wait_boot:
                self._wait_boot_return(inst)
            return                        # booted (and possibly already halted again)
        if inst.pid is None:              # died before answering: on_exit recorded why
            raise BootFailed(f"instance {inst.name!r} died during boot: {inst.failure}",
                             f"mkctl console {inst.name} shows the kernel's last words")
        if not acked:
            peer.ready = 0                # revoke the publication
            inst.run.halt("boot-timeout")
            self.port.kill(pid, signal.SIGKILL)
            self.wait(lambda: inst.pid is None, None)
            raise BootTimeout(
                f"instance {inst.name!r}: boot CPU {inst.cpus[0]} did not answer the spawn "
                f"mailbox within {self.boot_timeout:g} s; instance marked failed",
                f"mkctl console {inst.name}; then mkctl start {inst.name} to retry")
        self._mark_booted(inst)
        if wait_boot:
            self._wait_boot_return(inst)

    def _wait_boot_return(self, inst: Instance) -> None:
        """Drive the machine until the kernel's ``boot()`` returned (it says so in its slot)
        or the run ended; a run that ended first failed in ``boot()``."""
        own = self.arena.own(inst.id)
        gen = inst.generation
        returned = self.wait(lambda: inst.pid is None or own.booted == gen,
                          time.monotonic() + BOOT_RETURN_S)
        if own.booted == gen:
            return                    # boot() returned (the run may have ended since)
        if inst.pid is None or inst.generation != gen:
            why = inst.last_exit.reason if inst.last_exit else "it halted"
            raise BootFailed(f"instance {inst.name!r} failed in boot(): {why}",
                             f"mkctl console {inst.name} shows the kernel's last words")
        if not returned:
            raise BootTimeout(f"instance {inst.name!r} is active but its boot() has not "
                              f"returned within {BOOT_RETURN_S:g} s",
                              f"mkctl console {inst.name}; start --no-wait does not wait")
    def _mark_booted(self, inst: Instance) -> None:
        """The boot CPU cleared ``ready``: the instance is active."""
        inst.run.booted()
        self.supervisor.watch_from_now(inst)    # a stall is timed from this boot
        inst.boots += 1
        inst.count("boots")
        peer = self.arena.peer(inst.id)
        peer.ready = 0                                # answered: the mailbox is closed
        # online in the peer table first, and rung: its kernel starts while the host does the
        # rest of its bookkeeping (transition writes the same two fields again)
        peer.peer_state, peer.pid = STATE_CODES["active"], inst.pid or 0
        if inst.doorbell_fd is not None:
            self.port.ring_doorbell(inst.doorbell_fd)
        self.publisher.transition(inst, State.ACTIVE, "start", pid=inst.pid,
                          ack_cpu=self.arena.own(inst.id).ack_cpu)
        # its namespace held and, if it restarts, its successor forked a moment later
        self.successors_due.append((time.monotonic() + SUCCESSOR_DELAY_S, inst))

    def when_due(self) -> float | None:
        """When the timed work of ``run_due`` is next due (CLOCK_MONOTONIC), None if none
        (every turn asks: mostly there is none)."""
        if not self.successors_due and not self.releases:
            return None
        return min([t for t, _ in self.successors_due] + [t for t, _ in self.releases])

    def run_due(self) -> None:
        """The work a boot or an exit left for a moment later, off its path (the poll loop's)."""
        now = time.monotonic()
        if self.releases:
            self._release([fd for t, fd in self.releases if t <= now])
            self.releases = [(t, fd) for t, fd in self.releases if t > now]
        if self.successors_due:
            self.spawn_successors()

    def spawn_successors(self) -> None:
        """SUCCESSOR_DELAY_S after a boot the host holds the new run's mount namespace, and an
        instance that restarts on failure gets its next incarnation forked, contained and
        parked with its image while it runs, so that a restart is a boot and not a load
        (``bench recovery``). Done from the poll loop: the fork takes the host a millisecond or
        two, which the new run's first requests should not wait for."""
        now = time.monotonic()
        due = [inst for t, inst in self.successors_due if t <= now]
        self.successors_due = [(t, inst) for t, inst in self.successors_due if t > now]
        for inst in due:
            if self.closing() or inst.state != State.ACTIVE or inst.pid is None:
                continue
            self._hold_namespace(inst.pid)
            if inst.recovery.policy != "restart" or inst.parked is not None \
                    or inst.handover or inst.kimage is None or inst.name not in self.table:
                continue
            try:
                self.loading.spawn(inst)
            except OSError as exc:          # a restart loads it then, and says why if it fails
                self.events.warning("spawn_failed", instance=inst.id, name=inst.name,
                                 error=str(exc))

    def _hold_namespace(self, pid: int) -> None:
        """Hold the mount namespace of the running process ``pid`` (our child, not reaped: the
        pid is its own), so that its death is not the namespace's last reference."""
        if pid in self.namespaces:
            return
        try:
            self.namespaces[pid] = os.open(f"/proc/{pid}/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:          # (no /proc, or gone): its death tears its namespace down
            pass

    def _let_go(self, pid: int | None, later: bool) -> None:
        """The run ``pid`` ended: its namespace let go ``later`` (NAMESPACE_RELEASE_S: after
        its failure's record and restart) or now; all of them now once the machine closes."""
        fd = self.namespaces.pop(pid, None) if pid is not None else None
        closing = self.closing()
        if fd is not None and later and not closing:
            self.releases.append((time.monotonic() + NAMESPACE_RELEASE_S, fd))
            return
        if fd is not None:
            self._release([fd])
        if closing and self.releases:
            self._release([f for _, f in self.releases])
            self.releases = []

    @staticmethod
    def _release(fds: list[int]) -> None:
        for fd in fds:
            os.close(fd)            # (the last reference: the namespace's teardown, here)

    # -- halting ---------------------------------------------------------------------------
    def force(self, inst: Instance) -> None:
        if inst.pid is None:
            return
        inst.run.halt("forced")
        self.arena.peer(inst.id).force_halt = 1
        if self.writes is not None:
            self.writes.scan(only=inst)
        try:
            if inst.pidfd is not None:     # by the pidfd: never a reused pid
                self.port.pidfd_send_signal(inst.pidfd, signal.SIGKILL)
            else:
                self.port.kill(inst.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.unfreeze(inst)

    def unfreeze(self, inst: Instance) -> None:
        """A hung-stopped instance (its cgroup frozen, faults.py) dies only once thawed: every
        process of it is killed while still frozen, then the cgroup thawed (``Cgroups.kill``),
        so that none of its userland runs again; its parked successor is spared."""
        if self.cgroups.frozen(inst.id):
            self.cgroups.kill(inst.id, keep=inst.parked.pid if inst.parked else None)

    def halt_many(self, insts: list[Instance], timeout: float) -> None:
        """Ask all to halt at once, wait up to ``timeout`` together, then force the rest."""
        asked = []
        for inst in insts:
            if inst.pid is None:
                continue
            inst.run.halt("graceful")
            try:
                self.ipc.command(inst, M.MK_MSG_SHUTDOWN, {"timeout_s": timeout})
            except RingError as exc:
                # the ring refused (full): fall back to the signal the kernel also honours
                self.events.warning("shutdown_message_refused", instance=inst.id,
                                 name=inst.name, error=exc.strerror)
                try:
                    self.port.kill(inst.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
            asked.append(inst)
        deadline = time.monotonic() + timeout
        self.wait(lambda: all(i.pid is None for i in asked), deadline)
        for inst in asked:
            if inst.pid is not None:
                self.events.warning("halt_timeout", instance=inst.id, name=inst.name,
                                 timeout_s=timeout)
                self.force(inst)
                inst.run.halt("forced-after-timeout")
        self.wait(lambda: all(i.pid is None for i in asked), None)

    # -- exits -----------------------------------------------------------------------------
    def on_exit(self, inst: Instance) -> None:
        """The pidfd of ``inst`` became readable: reap, classify, record, return CPUs."""
        if inst.pid is None:
            return
        detected = time.monotonic()
        own, peer = self.arena.own(inst.id), self.arena.peer(inst.id)
        if inst.state != State.ACTIVE and own.ack_generation == inst.generation \
                and inst.halt_requested != "boot-timeout":
            self._mark_booted(inst)       # it answered the mailbox, then exited before we looked
        # off the peer table before the reap: until waitpid the pid cannot be reused, so a
        # peer that read this pid as active was never pointed at another process. A live
        # update keeps the entry: peers go on writing into the ring, for the new kernel (they
        # reach a process only through the pidfd the host gave them, never by this pid)
        if not inst.handover:
            peer.peer_state, peer.pid = STATE_CODES["loaded"], 0
        if inst.adopted:        # not our child, mostly: its status went to init (adoption.py)
            try:
                _, status = os.waitpid(inst.pid, 0)     # ours after all (a host in-process)
            except ChildProcessError:
                status = -1
        else:
            _, status = os.waitpid(inst.pid, 0)
        if inst.handover:
            kho.capture(self.arena, self.events, inst)              # what it preserved, checked, CRCs of now
            self._handed_over(inst, status, detected)
            return
        ooms = self.cgroups.oom_kills(inst.id)
        booting = inst.state != State.ACTIVE
        if status == -1:
            how = {"graceful": "graceful", None: "exited"}.get(inst.halt_requested, "forced")
            record = ExitRecord(own.reason or "exit status unknown (an adopted instance is not "
                                "the new host's child)", how, time=time.time())
        else:
            record = classify_exit(status, inst.halt_requested, own.reason)
        # (the count is the instance's memory cgroup's, its userland's too: a parked init's
        # OOM kill while the kernel is SIGKILLed for another reason would be credited here; the
        # init is set up and waiting, allocating next to nothing, so it is not told apart)
        oom = ooms > inst.oom_kills and record.signal == signal.SIGKILL and record.how == "killed"
        if oom:
            record.reason = ("killed by its memory limit (cgroup OOM killer): it used more than "
                             "its partition, heap and allowance")
        inst.run.saw_oom_kills(ooms)
        failed = booting or self.supervisor.is_failure(record)
        # the failure record first: the cgroup's sweep (a freeze and thaw in v1), the events,
        # the console and the views can wait until it is made (issue 20: they doubled the
        # time from the pidfd's notice to the record); each still happens, in the same order
        failure = self.supervisor.record_failure(inst, record, detected) if failed else None
        kho.capture(self.arena, self.events, inst)                  # what it preserved, checked, CRCs of now
        # what it said before it died (its halted message) is read before its run is forgotten:
        # its death is handled before the host's doorbell when both are ready (reactor.FIRST)
        if self.ipc.pending():
            self.ipc.drain()
        # whatever it forked goes with it; not a successor parked while it ran (a restart's)
        # (its next userland's parked init is killed too, the instance's boot over, but is no
        # orphan of this run's: the host forked it, and knows its pid from its own fork)
        init = self.parked_userland(inst.id)
        spared = init is not None and init in self.cgroups.members(inst.id)
        orphans = self.cgroups.kill(inst.id, keep=inst.parked.pid if inst.parked else None)
        orphans -= min(orphans, int(spared))
        if orphans:
            self.events.warning("orphans_killed", instance=inst.id, name=inst.name, count=orphans)
        if os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGSYS:
            self.events.warning("forbidden_syscall", instance=inst.id, name=inst.name, pid=inst.pid)
        if oom:
            self.events.warning("memory_limit_exceeded", instance=inst.id, name=inst.name)
        pid = inst.pid
        self.forget_process(inst, reaped=True, keep_parked=True)
        self.ipc.sweep_claims_of(inst)
        inst.last_exit = record
        inst.count("halts")
        if record.how in ("panic", "killed", "exited", "boot-failed"):
            inst.count("crashes")
        if inst.halted_said is not None:
            self.events.info("halted_message", instance=inst.id, name=inst.name,
                          reason=inst.halted_said)
            inst.run.said_halted(None)
        self.events.info("instance_exit", instance=inst.id, name=inst.name, pid=pid,
                      how=record.how, reason=record.reason, signal=record.signal,
                      code=record.code,
                      handled_after_ms=round((time.monotonic() - detected) * 1e3, 3))
        if failure is not None:
            self.supervisor.announce_failure(inst, failure)
        if booting:
            inst.record_failure(f"boot failed: {record.reason}")
            inst.count("boot_failures")
            self.printk(f"Instance {inst.id} ({inst.name}) failed to boot: {record.reason}")
            self.publisher.transition(inst, State.FAILED, "boot-failure", reason=record.reason)
        else:
            if own.booted != inst.generation and inst.halt_requested is None:
                # it answered the mailbox, then died before its boot() returned: it never
                # came up, which is a boot failure (its crash is counted too)
                inst.count("boot_failures")
                self.events.warning("died_in_boot", instance=inst.id, name=inst.name,
                                 how=record.how, reason=record.reason)
            self.printk(f"Instance {inst.id} ({inst.name}) halted, CPUs parking in pool")
            self.publisher.transition(inst, State.LOADED, record.how, reason=record.reason)
            if failed:
                self.supervisor.recover(inst)      # a takeover first: the fork below takes time
            elif inst.halt_requested == REBOOT:     # reboot(2) inside: queued, counted
                self.supervisor.rebooted(inst)
            if not self.closing() and inst.parked is None and inst.state == State.LOADED:
                try:
                    self.loading.spawn(inst)  # the next incarnation imports and parks meanwhile
                except OSError as exc:          # start tries again, and says why if it fails too
                    self.events.warning("spawn_failed", instance=inst.id, name=inst.name,
                                     error=str(exc))
        inst.run.clear_fault()

    def _handed_over(self, inst: Instance, status: int, detected: float) -> None:
        """The old kernel of a live update exited (host/liveupdate.py boots the new one): the
        run is recorded, its descriptors closed; the loaded successor and the peer entry stay."""
        own = self.arena.own(inst.id)
        if status == -1:
            record = ExitRecord(own.reason or "handed over", "graceful", time=time.time())
        else:
            record = classify_exit(status, inst.halt_requested, own.reason)
        self.cgroups.kill(inst.id, keep=inst.parked.pid if inst.parked else None)
        pid = inst.pid
        # a peer's Port bound to this run that checked the peer entry before the new pid was
        # written publishes after the new kernel's last look and rings this doorbell: kept,
        # and forwarded to the new kernel's for as long as it runs (models/liveupdate.pml)
        ring_end = inst.run.drop_doorbell()
        # (the host holds the pipe's ring end, which cannot be watched for a ring: the pipe
        # opened again for reading and writing, so that it stays open to late rings)
        kept = None
        if ring_end is not None:
            try:
                kept = linux.doorbell_watch(ring_end)
            except OSError as exc:       # (EMFILE near 511 instances): late rings are lost,
                self.events.warning("doorbell_watch_failed", instance=inst.id,   # nothing else
                                 name=inst.name, error=exc.strerror)
        self.forget_process(inst, reaped=True, keep_parked=True)
        if ring_end is not None:
            os.close(ring_end)
        if kept is not None:
            inst.run.keep_old_doorbell(kept)
            self.reactor.watch(kept, OLD_DOORBELL, inst, self.forward_old_doorbell)
        self.ipc.sweep_claims_of(inst)
        inst.last_exit = record
        inst.count("halts")
        if own.booted != inst.generation:     # its boot() never returned: a new image that
            inst.record_failure(f"boot failed: {record.reason}")    # did not boot (a live update's)
            inst.count("boot_failures")
        self.publisher.set_quietly(inst, State.LOADED)    # the service stays up for peers
        self.events.info("handover_exit", instance=inst.id, name=inst.name, pid=pid,
                      how=record.how, reason=record.reason,
                      handled_after_ms=round((time.monotonic() - detected) * 1e3, 3))

    def forget_process(self, inst: Instance, reaped: bool = False,
                       keep_parked: bool = False) -> None:
        """Close what the host held for a run of ``inst`` (and its parked successor, unless
        ``keep_parked``: the next run boots it); kill and reap it unless ``reaped`` (on_exit
        did: its pid may belong to someone else by now)."""
        if not keep_parked:
            self.loading.forget_parked(inst)
        if inst.pidfd is not None:
            self.reactor.unwatch(inst.pidfd)
        ended = inst.pid
        if inst.pid is not None:
            if self.writes is not None:
                self.writes.forget(inst.pid)
            if not reaped and inst.adopted:   # by its pidfd: never a pid we did not fork
                if inst.pidfd is not None:
                    try:
                        signal.pidfd_send_signal(inst.pidfd, signal.SIGKILL)
                        os.waitpid(inst.pid, 0)   # reaped if it is our child after all
                    except (ProcessLookupError, ChildProcessError):
                        pass
                self.cgroups.kill(inst.id)
            elif not reaped:
                try:
                    os.kill(inst.pid, signal.SIGKILL)
                    self.unfreeze(inst)          # (else the wait would be for good)
                    os.waitpid(inst.pid, 0)
                except (ProcessLookupError, ChildProcessError):
                    pass
                self.cgroups.kill(inst.id)
        if inst.pidfd is not None:            # after the kill above, which may signal through it
            os.close(inst.pidfd)
        self.ipc.forget(inst.id)
        if inst.channel is not None:
            self.reactor.unwatch(inst.channel)
            inst.channel.close()
        if inst.doorbell_fd is not None:
            os.close(inst.doorbell_fd)
        if inst.old_doorbell_fd is not None:
            self.reactor.unwatch(inst.old_doorbell_fd)
            os.close(inst.old_doorbell_fd)
        if inst.run.phase == Phase.RUNNING:
            inst.run.end()                    # (every descriptor of it closed above)
        else:
            inst.run.keep_old_doorbell(None)
        self._let_go(ended, later=reaped)     # (an exit's: after its record and restart)

    def drop_descriptors(self, inst: Instance) -> None:
        """Close what the host holds for ``inst``'s run and its parked successor, and nothing
        else: no kill, no reap, no unregister (a host that is abandoned: the reactor closes
        next, and the processes run on for the host that adopts them)."""
        held = self.namespaces.pop(inst.pid, None) if inst.pid is not None else None
        self._release([fd for _, fd in self.releases] + ([] if held is None else [held]))
        self.releases = []
        for fd in (inst.pidfd, inst.doorbell_fd, inst.old_doorbell_fd):
            if fd is not None:
                os.close(fd)
        if inst.channel is not None:
            inst.channel.close()
        p = inst.parked
        if p is not None:
            for fd in (p.pidfd, p.doorbell_fd, p.report_fd):
                if fd >= 0:
                    os.close(fd)
            p.channel.close()

    def forward_old_doorbell(self, inst: Instance) -> None:
        """The doorbell of a live update's predecessor was rung (a late sender, see
        ``_handed_over``): ring the running kernel's. Before it boots there is none to ring,
        and none is needed: a new kernel drains its ring before it first sleeps."""
        if inst.old_doorbell_fd is not None:
            linux.doorbell_clear(inst.old_doorbell_fd)
        if inst.doorbell_fd is not None:
            inst.count("doorbells_forwarded")
            self.port.ring_doorbell(inst.doorbell_fd)


def ring(doorbell_fd: int) -> None:
    """Ring an instance's doorbell (its ring end: linux.doorbell). Peers hold it too (the host
    gives it to them), so it may be full: then it is rung already, and the host must not fail
    or wait for it (nor for an instance that is gone)."""
    linux.ring_doorbell(doorbell_fd)
