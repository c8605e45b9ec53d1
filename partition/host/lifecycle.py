"""The kexec loader's half of the host: boot an instance process, halt it, reap it.

Boot is the real system's sequence in miniature: the host writes the spawn mailbox (target CPU,
generation, then ``ready``), forks, and the child's trampoline answers by clearing ``ready``.
Halting asks first (SHUTDOWN through the ring, SIGTERM if the ring refuses) and forces after a
timeout (``force_halt``, then SIGKILL). Every exit is seen through the instance's pidfd, reaped
at once, classified and recorded before any other verb runs; failures go to the supervisor.
"""

from __future__ import annotations

import gc
import json
import os
import selectors
import signal
import socket
import time
from typing import TYPE_CHECKING, Any

from partition import linux
from partition.abi import message as M
from partition.abi.constants import DEFAULT_HEAP, STATE_CODES
from partition.abi.ring import RingError
from partition.errors import BadKernelImage, BootFailed, BootTimeout, MKError
from partition.guest.kernel import parse_cmdline
from partition.guest.trampoline import BootParams, enter
from partition.host import cgroups
from partition.host.arena import inherited_mappings
from partition.host.exits import classify_exit
from partition.host.instance import CHANNEL, EXIT, PARKED_EXIT, REPORT, Instance, Parked, State
from partition.units import parse_size

if TYPE_CHECKING:
    from partition.host.machine import Machine


#: how long ``exec`` waits for a kernel's boot() to return
BOOT_RETURN_S = 30.0
#: how long ``load`` waits for the instance's process to import its image and report
LOAD_TIMEOUT_S = 30.0
MAX_REPORT = 16 << 10
UNREADABLE = "the loader's report is unreadable"


class Lifecycle:
    """Boots, halts and reaps the instance processes of one machine."""

    def __init__(self, machine: Machine) -> None:
        self.m = machine

    # -- load: the instance's process, parked --------------------------------------------
    def spawn(self, inst: Instance) -> None:
        """Fork the instance's process for its loaded image: it contains itself, imports the
        image, reports, and parks (guest/trampoline.py). Returns at once; the report comes
        through the reactor (``on_report``)."""
        m = self.m
        assert inst.kimage is not None and inst.parked is None
        doorbell_fd = linux.eventfd()
        host_end, guest_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        host_end.setblocking(False)
        report_r, report_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        params = BootParams(
            id=inst.id, name=inst.name, cpus=inst.cpus, physical_cpus=inst.physical_cpus,
            cmdline=inst.kimage.cmdline, spec=inst.kimage.spec, arena_fd=m.arena.fd,
            layout=m.layout, memory_base=inst.memory_base, memory_bytes=inst.memory_bytes,
            doorbell_fd=doorbell_fd, host_doorbell_fd=m.host_doorbell,
            channel_fd=guest_end.fileno(), report_fd=report_w, host_pid=os.getpid(),
            oversubscribed=bool(m.pool.shared_cpus(inst.name, inst.cpus)),
            protection=m.protection, inherited=inherited_mappings(),
            cgroups=m.cgroups.prepare(inst.id, inst.cpus, self._memory_limit(inst)),
            hide=[m.run_dir],
        )
        # Keep the collector off the pages parent and child still share: a collection walks
        # every tracked object and would copy-on-write fault them all, in both processes.
        gc.freeze()
        try:
            pid = os.fork()
            if pid == 0:
                os.set_blocking(report_w, True)
                enter(params)       # never returns
        finally:
            gc.unfreeze()           # cyclic garbage made meanwhile must stay collectable
            guest_end.close()       # (the child has its own copies, by number)
            os.close(report_w)
        pidfd = linux.pidfd_open(pid)
        inst.parked = Parked(pid, pidfd, doorbell_fd, host_end, report_r)
        m.selector.register(pidfd, selectors.EVENT_READ, (PARKED_EXIT, inst))
        m.selector.register(report_r, selectors.EVENT_READ, (REPORT, inst))

    def on_report(self, inst: Instance) -> None:
        """The loader's report arrived (or its pipe closed). Untrusted: the image's import-time
        code ran in that process before it wrote; sizes and types are checked."""
        p = inst.parked
        if p is None or p.report_fd < 0:
            return
        try:
            chunk = os.read(p.report_fd, MAX_REPORT + 1 - len(p.raw))
        except BlockingIOError:
            return
        p.raw += chunk
        if chunk and len(p.raw) <= MAX_REPORT:
            return                   # more to come: the loader closes the pipe when done
        self._close_report(p)
        try:
            report = json.loads(p.raw) if len(p.raw) <= MAX_REPORT else None
        except (ValueError, RecursionError):     # garbage, or nesting meant to crash us
            report = None
        if not (isinstance(report, dict) and isinstance(report.get("ok"), bool)):
            report = {"ok": False, "message": UNREADABLE, "hint": None}
        # only strings, clamped: whatever else is there was not written by our loader
        p.report = {"ok": report["ok"]} | {
            k: report[k][:400] for k in ("label", "source", "message", "hint")
            if isinstance(report.get(k), str)}

    def _close_report(self, p: Parked) -> None:
        if p.report_fd >= 0:
            self.m.selector.unregister(p.report_fd)
            os.close(p.report_fd)
            p.report_fd = -1

    def await_loaded(self, inst: Instance) -> dict[str, Any]:
        """Drive the machine until the parked process reported (its report), or raise
        BadKernelImage with the loader's reason; a failed loader is reaped here."""
        m = self.m
        if inst.parked is None:
            self.spawn(inst)
        p = inst.parked
        assert p is not None
        m.wait(lambda: p.report is not None or inst.parked is not p,
               time.monotonic() + LOAD_TIMEOUT_S)
        report = p.report
        if report is not None and report.get("ok") and inst.parked is p:
            return report
        said = report is not None and isinstance(report.get("message"), str) \
            and report.get("message") != UNREADABLE
        timed_out = report is None and inst.parked is p and p.report_fd >= 0 \
            and os.waitid(os.P_PIDFD, p.pidfd, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None
        if timed_out:
            self.forget_parked(inst)
            raise BadKernelImage(f"the kernel image {inst.kimage.spec if inst.kimage else ''!r} "
                                 f"did not load within {LOAD_TIMEOUT_S:g} s",
                                 "its import-time code runs too long: keep work out of module "
                                 "scope (docs/kernels.md)")
        if inst.parked is p:
            self.forget_parked(inst, kill=not said or report is None)
        status = p.status
        if not said and status is not None:
            record = classify_exit(status, None, "")
            m.events.warning("loader_exit", instance=inst.id, name=inst.name, pid=p.pid,
                             reason=record.reason)
            raise BadKernelImage(f"the kernel image {inst.kimage.spec if inst.kimage else ''!r} "
                                 f"did not load: its loader was {record.reason}",
                                 "its import-time code did what no instance may, or died: "
                                 "mkctl console shows its last words")
        if not said:
            raise BadKernelImage(f"the kernel image {inst.kimage.spec if inst.kimage else ''!r} "
                                 "did not load (its loader said nothing)",
                                 "check that it imports on its own (python -c 'import MODULE')")
        assert report is not None
        raise BadKernelImage(str(report.get("message") or "the image did not load"),
                             report.get("hint") if isinstance(report.get("hint"), str) else None)

    def on_parked_exit(self, inst: Instance) -> None:
        """A parked process died before exec (killed from outside, or its loader failed)."""
        p = inst.parked
        if p is None:
            return
        if p.report is None and p.report_fd >= 0:
            self.on_report(inst)             # what it said before it went
        status = self.forget_parked(inst, kill=False)
        if p.report is not None and p.report.get("ok"):     # (a loader that failed is told
            reason = classify_exit(status, None, "").reason if status is not None else "?"
            self.m.events.warning("loader_exit", instance=inst.id, name=inst.name, pid=p.pid,
                                  reason=reason)            # by await_loaded)

    def forget_parked(self, inst: Instance, kill: bool = True) -> int | None:
        """Kill (unless it is gone already) and reap the parked process; close what it held.
        Returns its wait status (None: no parked process, or not ours to reap)."""
        p = inst.parked
        if p is None:
            return None
        inst.parked = None
        self._close_report(p)
        try:
            self.m.selector.unregister(p.pidfd)
        except (KeyError, ValueError):
            pass
        try:
            if kill:
                os.kill(p.pid, signal.SIGKILL)
            p.status = os.waitpid(p.pid, 0)[1]
        except (ProcessLookupError, ChildProcessError):
            pass
        os.close(p.pidfd)
        os.close(p.doorbell_fd)
        p.channel.close()
        self.m.cgroups.kill(inst.id)
        return p.status

    # -- boot ------------------------------------------------------------------------------
    def boot(self, inst: Instance, wait_boot: bool = False) -> None:
        """Boot ``inst`` from its parked process (spawned first if there is none): returns when
        its boot CPU answered the spawn mailbox (the real system's answer), or with
        ``wait_boot`` when its kernel's ``boot()`` has returned too; raises BootFailed (with
        the reason) when it died before that, or when its image no longer loads."""
        m = self.m
        assert inst.kimage is not None
        try:
            self.await_loaded(inst)
        except BadKernelImage as exc:
            inst.failure = f"boot failed: {exc.message}"
            inst.counters["boot_failures"] += 1
            m.printk(f"Instance {inst.id} ({inst.name}) failed to boot: {exc.message}")
            m.transition(inst, State.FAILED, "boot-failure", reason=exc.message)
            raise BootFailed(f"instance {inst.name!r}: its kernel image did not load: "
                             f"{exc.message}", exc.hint) from None
        p = inst.parked
        assert p is not None
        inst.parked = None
        # the parked process becomes the running one
        inst.pid, inst.pidfd, inst.doorbell_fd, inst.channel = p.pid, p.pidfd, p.doorbell_fd, \
            p.channel
        m.selector.modify(p.pidfd, selectors.EVENT_READ, (EXIT, inst))
        m.selector.register(p.channel, selectors.EVENT_READ, (CHANNEL, inst))
        inst.halt_requested = None
        inst.shutdown_acked = False
        inst.failure = None
        inst.boots_acked = False
        peer, own = m.arena.peer(inst.id), m.arena.own(inst.id)
        inst.generation += 1
        gen = inst.generation
        peer.ready = 0
        peer.force_halt = 0
        own.reason_len = own.ack_cpu = own.ack_generation = own.booted = 0
        peer.target_cpu = inst.physical_cpus[0]
        peer.generation = gen
        peer.redirect = 0
        m.ring_of(inst.id).reset()           # stale messages and dead claims go with the old run
        inst.served_by = None                # it serves its own role again
        peer.ready = 1                       # publish last, then ring the parked CPU
        os.eventfd_write(p.doorbell_fd, 1)
        deadline = time.monotonic() + m.boot_timeout
        acked = m.wait(lambda: inst.pid is None or own.ack_generation == gen, deadline)
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
            inst.halt_requested = "boot-timeout"
            os.kill(pid, signal.SIGKILL)
            m.wait(lambda: inst.pid is None, None)
            raise BootTimeout(
                f"instance {inst.name!r}: boot CPU {inst.cpus[0]} did not answer the spawn "
                f"mailbox within {m.boot_timeout:g} s; instance marked failed",
                f"mkctl console {inst.name}; then mkctl exec {inst.name} to retry")
        self._mark_booted(inst)
        if wait_boot:
            self._wait_boot_return(inst)

    def _wait_boot_return(self, inst: Instance) -> None:
        """Drive the machine until the kernel's ``boot()`` returned (it says so in its slot)
        or the run ended; a run that ended first failed in ``boot()``."""
        m = self.m
        own = m.arena.own(inst.id)
        gen = inst.generation
        returned = m.wait(lambda: inst.pid is None or own.booted == gen,
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
                              f"mkctl console {inst.name}; exec --no-wait does not wait")

    @staticmethod
    def _memory_limit(inst: Instance) -> int:
        """The memory cgroup's limit: the partition, the kernel's heap, the allowance."""
        heap = DEFAULT_HEAP
        assert inst.kimage is not None
        text = parse_cmdline(inst.kimage.cmdline).get("mk_heap")
        if text:
            try:
                heap = parse_size(text, "mk_heap")
            except MKError:
                pass                   # the trampoline refuses it, with the reason
        return inst.memory_bytes + heap + cgroups.ALLOWANCE

    def _mark_booted(self, inst: Instance) -> None:
        """The boot CPU cleared ``ready``: the instance is active."""
        inst.boots_acked = True
        # the watchdog times a stall from this boot, not from the last run's final progress
        inst.progress_seen = (self.m.arena.own(inst.id).progress, time.monotonic())
        inst.boots += 1
        inst.counters["boots"] += 1
        inst.active_since = time.time()
        self.m.arena.peer(inst.id).ready = 0          # answered: the mailbox is closed
        self.m.transition(inst, State.ACTIVE, "exec", pid=inst.pid,
                          ack_cpu=self.m.arena.own(inst.id).ack_cpu)
        if inst.doorbell_fd is not None:
            os.eventfd_write(inst.doorbell_fd, 1)      # online: its kernel may start

    # -- halting ---------------------------------------------------------------------------
    def force(self, inst: Instance) -> None:
        m = self.m
        if inst.pid is None:
            return
        inst.halt_requested = "forced"
        m.arena.peer(inst.id).force_halt = 1
        if m.writes is not None:
            m.writes.scan(only=inst)
        try:
            os.kill(inst.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def halt_many(self, insts: list[Instance], timeout: float) -> None:
        """Ask all to halt at once, wait up to ``timeout`` together, then force the rest."""
        m = self.m
        asked = []
        for inst in insts:
            if inst.pid is None:
                continue
            inst.halt_requested = "graceful"
            try:
                m.ipc.send(inst.id, M.MK_MSG_SHUTDOWN, {"timeout_s": timeout})
            except RingError as exc:
                # the ring refused (full): fall back to the signal the kernel also honours
                m.events.warning("shutdown_message_refused", instance=inst.id,
                                 name=inst.name, error=exc.strerror)
                try:
                    os.kill(inst.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
            asked.append(inst)
        deadline = time.monotonic() + timeout
        m.wait(lambda: all(i.pid is None for i in asked), deadline)
        for inst in asked:
            if inst.pid is not None:
                m.events.warning("halt_timeout", instance=inst.id, name=inst.name,
                                 timeout_s=timeout)
                self.force(inst)
                inst.halt_requested = "forced-after-timeout"
        m.wait(lambda: all(i.pid is None for i in asked), None)

    # -- exits -----------------------------------------------------------------------------
    def on_exit(self, inst: Instance) -> None:
        """The pidfd of ``inst`` became readable: reap, classify, record, return CPUs."""
        m = self.m
        if inst.pid is None:
            return
        detected = time.monotonic()
        own, peer = m.arena.own(inst.id), m.arena.peer(inst.id)
        if inst.state != State.ACTIVE and own.ack_generation == inst.generation \
                and inst.halt_requested != "boot-timeout":
            self._mark_booted(inst)       # it answered the mailbox, then exited before we looked
        # off the peer table before the reap: until waitpid the pid cannot be reused, so a
        # peer that read this pid as active was never pointed at another process
        peer.peer_state, peer.pid = STATE_CODES["loaded"], 0
        _, status = os.waitpid(inst.pid, 0)
        ooms = m.cgroups.oom_kills(inst.id)
        orphans = m.cgroups.kill(inst.id)     # whatever it forked goes with it
        if orphans:
            m.events.warning("orphans_killed", instance=inst.id, name=inst.name, count=orphans)
        if os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGSYS:
            m.events.warning("forbidden_syscall", instance=inst.id, name=inst.name, pid=inst.pid)
        booting = inst.state != State.ACTIVE
        record = classify_exit(status, inst.halt_requested, own.reason)
        if ooms > inst.oom_kills and record.signal == signal.SIGKILL and record.how == "killed":
            record.reason = ("killed by its memory limit (cgroup OOM killer): it used more than "
                             "its partition, heap and allowance")
            m.events.warning("memory_limit_exceeded", instance=inst.id, name=inst.name)
        inst.oom_kills = ooms
        pid = inst.pid
        self.forget_process(inst)
        m.ipc.sweep_claims_of(inst)
        inst.last_exit = record
        inst.counters["halts"] += 1
        if record.how in ("panic", "killed", "exited", "boot-failed"):
            inst.counters["crashes"] += 1
        m.events.info("instance_exit", instance=inst.id, name=inst.name, pid=pid,
                      how=record.how, reason=record.reason, signal=record.signal,
                      code=record.code,
                      handled_after_ms=round((time.monotonic() - detected) * 1e3, 3))
        if booting:
            inst.failure = f"boot failed: {record.reason}"
            inst.counters["boot_failures"] += 1
            m.printk(f"Instance {inst.id} ({inst.name}) failed to boot: {record.reason}")
            m.supervisor.record_failure(inst, record, detected)
            m.transition(inst, State.FAILED, "boot-failure", reason=record.reason)
        else:
            m.printk(f"Instance {inst.id} ({inst.name}) halted, CPUs parking in pool")
            failed = m.supervisor.is_failure(record)
            if failed:
                m.supervisor.record_failure(inst, record, detected)
            m.transition(inst, State.LOADED, record.how, reason=record.reason)
            if not m.closing:
                try:
                    self.spawn(inst)      # the next incarnation imports and parks meanwhile
                except OSError as exc:    # exec tries again, and says why if it fails too
                    m.events.warning("spawn_failed", instance=inst.id, name=inst.name,
                                     error=str(exc))
            if failed:
                m.supervisor.recover(inst)
        inst.pending_fault = None

    def forget_process(self, inst: Instance) -> None:
        """Close what the host held for a run of ``inst`` (and its parked successor); reap
        it if still there."""
        m = self.m
        self.forget_parked(inst)
        if inst.pidfd is not None:
            try:
                m.selector.unregister(inst.pidfd)
            except (KeyError, ValueError):
                pass
            os.close(inst.pidfd)
            inst.pidfd = None
        if inst.pid is not None:
            if m.writes is not None:
                m.writes.forget(inst.pid)
            try:
                os.kill(inst.pid, signal.SIGKILL)
                os.waitpid(inst.pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass
            m.cgroups.kill(inst.id)
            inst.pid = None
        m.ipc.forget(inst.id)
        if inst.channel is not None:
            try:
                m.selector.unregister(inst.channel)
            except (KeyError, ValueError):
                pass
            inst.channel.close()
            inst.channel = None
        if inst.doorbell_fd is not None:
            os.close(inst.doorbell_fd)
            inst.doorbell_fd = None
        inst.active_since = None
