"""The host's half of ``kexec load``: fork the instance's process for its image, read its
loader's report, and keep the parked process until ``start`` takes it (lifecycle.py) or
``unload`` drops it.

The process contains itself before it imports the image (guest/trampoline.py), so the host
never runs a kernel's module code; what it reports is read as untrusted input (size, JSON depth
and types checked), and a loader that dies or hangs fails the load with the reason.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import signal
import socket
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from partition import linux
from partition.abi.constants import DEFAULT_HEAP
from partition.errors import BadKernelImage, MKError, ZygoteError
from partition.guest.kernel import heap_of
from partition.guest.trampoline import BootParams, enter, readable_label
from partition.guest.zygote import Zygote
from partition.host import cgroups
from partition.host.arena import inherited_mappings
from partition.host.exits import classify_exit
from partition.host.instance import PARKED_EXIT, REPORT, Instance, Parked

if TYPE_CHECKING:
    from partition.abi.layout import ArenaLayout
    from partition.host.arena import Arena
    from partition.host.cgroups import Cgroups
    from partition.host.events import EventLog
    from partition.host.kimage import KImage
    from partition.host.pool import ResourcePool
    from partition.host.reactor import Reactor

#: drive the machine until ``done()`` or the deadline (the machine's wait); whether it is done
Wait = Callable[[Callable[[], bool], float | None], bool]

#: how long ``load`` waits for the instance's process to import its image and report
LOAD_TIMEOUT_S = 30.0
MAX_REPORT = 16 << 10
UNREADABLE = "the loader's report is unreadable"


class Zygotes:
    """The process that forks this machine's instances (guest/zygote.py), made at the first
    load and again after one is lost; ``enabled`` False (MK_ZYGOTE=0, or none could start):
    instances are forked from the host itself (to compare)."""

    def __init__(self, enabled: bool) -> None:
        self.current: Zygote | None = None
        self.enabled = enabled

    def close(self) -> None:
        """Close the zygote, if any (the next load makes a new one)."""
        if self.current is not None:
            self.current.close()
            self.current = None


class Loading:
    """Spawns, watches and reaps the parked processes of one machine's loaded instances.
    ``llc_join``: its process into its LLC group; ``host_ring``: the host doorbell's ring
    end, which every instance holds; ``wait``: drives the machine (its wait)."""

    def __init__(self, arena: Arena, layout: ArenaLayout, pool: ResourcePool, cgroups: Cgroups,
                 events: EventLog, reactor: Reactor, wait: Wait,
                 llc_join: Callable[[Instance, int], None], host_ring: int, run_dir: str,
                 protection: bool, survive_host: bool) -> None:
        self.arena = arena
        self.layout = layout
        self.pool = pool
        self.cgroups = cgroups
        self.events = events
        self.reactor = reactor
        self.wait = wait
        self.llc_join = llc_join
        self.host_ring = host_ring
        self.run_dir = run_dir
        self.protection = protection
        self.survive_host = survive_host
        self.zygotes = Zygotes(os.environ.get("MK_ZYGOTE", "1") != "0")

    def spawn(self, inst: Instance) -> None:
        """Fork the instance's process for its loaded image: it contains itself, imports the
        image, reports, and parks (guest/trampoline.py). Returns at once; the report comes
        through the reactor (``on_report``)."""
        assert inst.kimage is not None and inst.parked is None
        # what can fail without descriptors to close comes first
        procs = self.cgroups.prepare(inst.id, inst.cpus, self._memory_limit(inst), inst.pids_max)
        inherited = inherited_mappings()
        # (each pair closed if a later one fails: EMFILE near 511 instances)
        host_end, guest_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            host_end.setblocking(False)
            report_r, report_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
            try:
                own_doorbell, doorbell_fd = linux.doorbell()  # the child's end; the ring end ours
            except BaseException:
                os.close(report_r)
                os.close(report_w)
                raise
        except BaseException:
            host_end.close()
            guest_end.close()
            raise
        params = BootParams(
            id=inst.id, name=inst.name, cpus=inst.cpus, physical_cpus=inst.physical_cpus,
            cmdline=inst.kimage.cmdline, spec=inst.kimage.spec, arena_fd=self.arena.fd,
            layout=self.layout, memory_base=inst.memory_base, memory_bytes=inst.memory_bytes,
            doorbell_fd=own_doorbell, host_doorbell_fd=self.host_ring,
            channel_fd=guest_end.fileno(), report_fd=report_w, host_pid=os.getpid(),
            oversubscribed=bool(self.pool.shared_cpus(inst.name, inst.cpus)),
            protection=self.protection, inherited=inherited, cgroups=procs, hide=[self.run_dir],
            survive_host=self.survive_host, image=inst.kimage.image,
        )
        try:
            pid, child_fds = self._fork(params)
        except BaseException:
            os.close(doorbell_fd)   # no child: nothing it would have had stays open here
            host_end.close()
            os.close(report_r)
            raise
        finally:
            guest_end.close()       # (the child has its own copies)
            os.close(report_w)
            os.close(own_doorbell)
        pidfd = linux.pidfd_open(pid)
        if inst.llc_way_mask:
            self.llc_join(inst, pid)          # its LLC ways (host/llc.py), before it is started
        inst.run.park(Parked(pid, pidfd, doorbell_fd, host_end, report_r, cpus=list(inst.cpus),
                             child_fds=child_fds))
        self.reactor.watch(pidfd, PARKED_EXIT, inst, self.on_parked_exit)
        self.reactor.watch(report_r, REPORT, inst, self.on_report)

    def load(self, inst: Instance, kimage: KImage, check_signature: Callable[..., None]) -> None:
        """``kexec load``: the image checked (its signature), imported in its own process
        (never here), its label read from the loader's report; a failure leaves ``inst`` as
        it was."""
        check_signature(inst, kimage)
        inst.set_kimage(kimage)
        try:
            report = self.await_loaded(inst)
        except BaseException:
            inst.set_kimage(None)
            raise
        kimage.label = readable_label(str(report.get("label") or ""),
                                      str(report.get("source") or ""))
        kimage.source = str(report.get("source") or "")
        self.events.info("kimage_loaded", instance=inst.id, name=inst.name, kernel=kimage.label,
                         source=kimage.source, cmdline=kimage.cmdline)

    def set_image(self, inst: Instance, kimage: KImage | None) -> None:
        """The image ``inst`` runs from now (a live update's new one, or its old one back)."""
        inst.set_kimage(kimage)

    def unload(self, inst: Instance) -> None:
        """``kexec unload``: the parked process reaped, the image and its failure dropped."""
        self.forget_parked(inst)
        inst.set_kimage(None)
        inst.clear_failure()
        self.events.info("kimage_unloaded", instance=inst.id, name=inst.name)

    def _fork(self, params: BootParams) -> tuple[int, tuple[int, int]]:
        """The instance's process: forked by the machine's zygote (guest/zygote.py), a small
        interpreter, so that it is no copy of this host's heap; by this process itself if no
        zygote can run. Returns its pid and its numbers of the doorbell and host doorbell."""
        z = self.zygotes
        if z.current is not None and not z.current.alive():
            self.events.warning("zygote_died", pid=z.current.proc.pid,
                                code=z.current.proc.returncode)
            z.close()                    # (a new one now)
        if z.current is None and z.enabled:
            try:
                z.current = Zygote()
                self.events.info("zygote_started", pid=z.current.proc.pid)
            except (OSError, ZygoteError) as exc:
                z.enabled = False
                self.events.warning("zygote_unavailable", error=str(exc))
        if z.current is not None:
            try:
                return z.current.spawn(dataclasses.replace(params, inherited=[]))
            except ZygoteError as exc:
                # a zygote that did not answer is not asked again (its late answer would be
                # read as the next one's): closed; the next load makes a new one. If it may
                # have forked, this load fails, and what runs in the instance's cgroup ends
                # (the process may share this load's descriptors); else this load forks here
                self.events.warning("zygote_failed", error=exc.message)
                z.close()
                if exc.sent:
                    self.cgroups.kill(params.id, reap=True)
                    raise
        # Keep the collector off the pages parent and child still share: a collection walks
        # every tracked object and would copy-on-write fault them all, in both processes.
        gc.freeze()
        try:
            pid = os.fork()
            if pid == 0:
                os.set_blocking(params.report_fd, True)
                enter(params)       # never returns
        finally:
            gc.unfreeze()           # cyclic garbage made meanwhile must stay collectable
        return pid, (params.doorbell_fd, params.host_doorbell_fd)

    def on_report(self, inst: Instance) -> None:
        """The loader's report arrived (or its pipe closed). Untrusted: the image's import-time
        code ran in that process before it wrote; sizes and types are checked."""
        p = inst.parked
        if p is None or p.report_fd < 0:
            return
        while True:                  # to the end of the pipe (the loader closes it when done)
            try:
                chunk = os.read(p.report_fd, MAX_REPORT + 1 - len(p.raw))
            except BlockingIOError:
                return               # more to come
            p.raw += chunk
            if not chunk or len(p.raw) > MAX_REPORT:
                break
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
        if p.report["ok"]:
            self._check_inert(inst, p)

    def _check_inert(self, inst: Instance, p: Parked) -> None:
        """A loaded image must be inert until start: the process that reported is its loader
        alone. Its threads are counted here, from outside (``/proc/PID/task``: the process is
        not reaped, so the pid is still its own): the loader's own check knows only the threads
        ``threading`` made, and an image's import-time code can start one with ``_thread`` or
        hide one from it. One that runs more is killed, and its load refused."""
        try:
            threads = len(os.listdir(f"/proc/{p.pid}/task"))
        except OSError:
            return                   # gone already: on_parked_exit says why
        if threads <= 1:
            return
        try:
            signal.pidfd_send_signal(p.pidfd, signal.SIGKILL)
        except ProcessLookupError:
            pass
        spec = inst.kimage.spec if inst.kimage else ""
        self.events.warning("image_not_inert", instance=inst.id, name=inst.name, pid=p.pid,
                              threads=threads)
        p.report = {"ok": False,
                    "message": f"kernel {spec!r} runs {threads - 1} thread(s) besides its "
                               "loader while parked: its import started them",
                    "hint": "start threads in boot(), not at import"}

    def _close_report(self, p: Parked) -> None:
        if p.report_fd >= 0:
            self.reactor.unwatch(p.report_fd)
            os.close(p.report_fd)
            p.report_fd = -1

    def await_loaded(self, inst: Instance) -> dict[str, Any]:
        """Drive the machine until the parked process reported (its report), or raise
        BadKernelImage with the loader's reason; a failed loader is reaped here."""
        if inst.parked is None:
            self.spawn(inst)
        p = inst.parked
        assert p is not None
        self.wait(lambda: p.report is not None or inst.parked is not p,
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
            self.events.warning("loader_exit", instance=inst.id, name=inst.name, pid=p.pid,
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
            self.events.warning("loader_exit", instance=inst.id, name=inst.name, pid=p.pid,
                                  reason=reason)            # by await_loaded)

    def forget_parked(self, inst: Instance, kill: bool = True) -> int | None:
        """Kill (unless it is gone already) and reap the parked process; close what it held.
        Returns its wait status (None: no parked process, or not ours to reap)."""
        if inst.parked is None:
            return None
        p = inst.run.unpark()
        self._close_report(p)
        self.reactor.unwatch(p.pidfd)
        try:
            if kill:
                os.kill(p.pid, signal.SIGKILL)
            p.status = os.waitpid(p.pid, 0)[1]
        except (ProcessLookupError, ChildProcessError):
            pass
        os.close(p.pidfd)
        os.close(p.doorbell_fd)
        p.channel.close()
        # whatever it left in the instance's cgroup; a live update's running kernel shares it
        self.cgroups.kill(inst.id, keep=inst.pid)
        return p.status

    @staticmethod
    def _memory_limit(inst: Instance) -> int:
        """The memory cgroup's limit: the partition, the kernel's heap, the allowance."""
        assert inst.kimage is not None
        try:
            heap = heap_of(inst.kimage.cmdline)
        except MKError:
            heap = DEFAULT_HEAP        # the trampoline refuses it, with the reason
        return inst.memory_bytes + heap + cgroups.ALLOWANCE
