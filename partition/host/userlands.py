"""One userland per running instance, owned by the host: started, watched, ended, reported.

An instance's userland (docs/userland.md) is a PID namespace whose init (guest/userinit.py) the
host forks itself, with the instance's other namespaces, cgroups and mounts: so the host knows
its pid from its own fork, never from anything the instance wrote, and holds a pidfd on it in
the reactor, whose readiness says it died. It is started the first time it is needed: when the
instance becomes active if it has boot programs (``load --program``, a scenario's
``programs``), else at the first ``mkctl exec`` (``ensure``), which then joins it
(guest/userjoin.py). With boot programs its init is made ahead, while the kernel is loaded
(``park``): set up and waiting for its go, written when the kernel is active, so that the
boot to the programs' first answer does not wait for the init's fork and setup; no program
starts before the kernel is active. It ends with its kernel: every exit of the kernel (panic, kill, halt, a
live update's handover) kills the init through its pidfd, and the PID namespace with it (the
instance's cgroup kill does too, where the machine has cgroups); a restart brings up a fresh
one. The init reports over a pipe (``userinit.parse`` checks every record): ready, and each
boot program's start and exit, recorded per boot.

Its ``/dev/console`` is a pty whose master the host holds, non-blocking, in the reactor: what
programs write there goes into the instance's console log, each line tagged ``[console]``;
``feed`` types into it.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from partition import linux
from partition.errors import MKError, NotLoaded, UserlandFailed
from partition.guest import userinit, userland
from partition.guest.userjoin import start_ticks
from partition.host.arena import inherited_mappings
from partition.host.userrun import (
    BOOTS_KEPT,
    CONSOLE_TAG,
    LINE_MAX,
    PENDING_MAX,
    READ_PER_TURN,
    READY_S,
    Program,
    Run,
    kill_and_reap,
    quiet,
)

if TYPE_CHECKING:
    from partition.host.cgroups import Cgroups
    from partition.host.events import EventLog
    from partition.host.instance import Instance
    from partition.host.reactor import Reactor
    from partition.host.table import InstanceTable

#: (instance id, text): append to the instance's console log
ConsoleWrite = Callable[[int, str], None]


class Userlands:
    """The userlands of one machine's instances."""

    def __init__(self, table: InstanceTable, reactor: Reactor, events: EventLog,
                 cgroups: Cgroups, shared_mounts: Callable[[list[str]], dict[str, str]],
                 console_write: ConsoleWrite,
                 wait: Callable[[Callable[[], bool], float | None], bool],
                 run_dir: str, reboot: Callable[[Instance], Any] | None = None) -> None:
        self.table = table
        self.reactor = reactor
        self.events = events
        self.cgroups = cgroups
        self.shared_mounts = shared_mounts
        self.console_write = console_write
        self.wait = wait
        self.run_dir = run_dir
        #: reboot(2) inside: the supervisor's (supervision.py: a forced halt whose exit queues
        #: a restart, counted against the restart intensity); never a verb, from a handler
        self.reboot = reboot
        self._reboots: dict[int, int] = {}                 # instance id -> generation asking
        self.runs: dict[int, Run] = {}                     # instance id -> its userland
        self.programs: dict[int, list[list[str]]] = {}     # instance id -> its boot programs
        self.boots: dict[int, list[list[Program]]] = {}    # instance id -> latest boots'
        self._due: set[int] = set()
        self._park_due: set[int] = set()
        #: instance id -> its next userland's init, made while its kernel is loaded (``park``)
        self.parked: dict[int, Run] = {}
        #: parked inits let go (``unpark``), killed, until their pidfd's turn reaps them
        self._letting_go: dict[int, Run] = {}            # host pid -> its run
        self._bell = -1          # an eventfd in the reactor, made when first rung
        self.closed = False
        events.subscribe(self._on_event)

    # -- what the machine tells ------------------------------------------------------------
    def set_programs(self, inst: Instance, programs: list[list[str]]) -> None:
        """The boot programs of ``inst`` from its next boot on (a load's)."""
        self.programs[inst.id] = [list(p) for p in programs]
        self.unpark(inst.id)

    def _on_event(self, event: str, fields: dict[str, Any], _now: float) -> None:
        """The kernel's runs, as the event log tells them: an instance that became active
        gets its userland if it has boot programs (from the next turn: not inside a verb's
        bookkeeping); one whose kernel ended loses it."""
        inst_id = fields.get("instance")
        if not isinstance(inst_id, int):
            return
        if event == "state_change":
            if fields.get("new") != "loaded" or fields.get("old") == "loaded":
                self._park_due.discard(inst_id)
            if fields.get("new") == "active":
                if self.programs.get(inst_id):
                    self._due.add(inst_id)
                    self._ring()
            else:
                self.unpark(inst_id)
            if fields.get("new") == "loaded" and self.programs.get(inst_id):
                self._park_due.add(inst_id)           # its next boot's init, made meanwhile
                self._ring()
            if fields.get("old") == "active":         # (whether or not a park follows)
                self.stop(inst_id, "its kernel halted")
            elif fields.get("new") == "empty":     # deleted: its id may be another's next
                self.programs.pop(inst_id, None)
                self.boots.pop(inst_id, None)
        elif event in ("instance_exit", "handover_exit"):
            self.stop(inst_id, "its kernel halted")
        elif event == "resources_changed":
            self.unpark(inst_id)          # (made for what it had: the next boot makes its own)
            if str(fields.get("op", "")).startswith("cpu"):
                self._repin(inst_id)

    def _repin(self, inst_id: int) -> None:
        """A CPU resize (host/resize.py pins the kernel): every thread of the userland to the
        instance's new CPUs too. The cpuset, where the machine has one, already bounds them;
        their own affinity is the init's, set at its start, and must follow."""
        inst = self.table.by_id(inst_id)
        if inst is None or not inst.cpus or inst_id not in self.runs:
            return
        kernel = {inst.pid, inst.parked.pid if inst.parked is not None else None}
        procs = self.cgroups.procs_files(inst_id)
        for pid in self.cgroups.members(inst_id) or [self.runs[inst_id].pid]:
            if pid in kernel:
                continue
            # a number read from cgroup.procs: held by a pidfd, then checked to be still the
            # instance's and alive, so that a pid reused meanwhile is never pinned
            try:
                pidfd = os.pidfd_open(pid)
            except OSError:
                continue
            try:
                if not userland.in_cgroups_of(pid, procs):
                    continue
                signal.pidfd_send_signal(pidfd, 0)
                tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
            except OSError:
                continue
            finally:
                os.close(pidfd)
            for tid in tids:
                try:
                    os.sched_setaffinity(tid, inst.cpus)
                except OSError:
                    pass

    def _ring(self) -> None:
        """Have the reactor call ``_start_due`` on its next turn."""
        if self.closed:
            return
        if self._bell < 0:
            self._bell = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            self.reactor.watch(self._bell, "userland-due", None, lambda _i: self._start_due())
        os.eventfd_write(self._bell, 1)

    def _start_due(self) -> None:
        try:
            os.eventfd_read(self._bell)
        except BlockingIOError:
            pass
        reboots, self._reboots = self._reboots, {}
        for inst_id, generation in sorted(reboots.items()):
            inst = self.table.by_id(inst_id)
            # only the run that asked: a reboot that raced its kernel's end restarts nothing
            # (one during a halt the host asked for is refused by the supervisor, an event)
            if inst is None or inst.state.value != "active" or inst.generation != generation \
                    or self.reboot is None or self.closed:
                continue
            self.reboot(inst)
        parks, self._park_due = self._park_due, set()
        for inst_id in sorted(parks):
            inst = self.table.by_id(inst_id)
            if inst is None or inst.state.value != "loaded" or inst.pid is not None \
                    or inst_id in self.parked or not self.programs.get(inst_id) or self.closed:
                continue
            try:
                self.park(inst)
            except (OSError, MKError):          # its boot makes one then, and says why
                pass
        due, self._due = self._due, set()
        for inst_id in sorted(due):
            inst = self.table.by_id(inst_id)
            if inst is None or inst.state.value != "active" or inst.pid is None \
                    or inst.halt_requested is not None or self.closed:
                continue                        # (halting: its userland would die at once)
            if inst_id in self.runs:
                if self.runs[inst_id].generation != inst.generation:
                    self._due.add(inst_id)      # the last run's, killed, not reaped yet:
                continue                        # this one starts when it is (``_exited``)
            try:
                if not self._unpark_into_run(inst):
                    self.start(inst)
            except (OSError, MKError) as exc:
                self.events.warning("userland_start_failed", instance=inst.id, name=inst.name,
                                    error=str(exc)[:300])

    # -- starting ----------------------------------------------------------------------------
    def ensure(self, inst: Instance) -> dict[str, Any]:
        """The running userland of active ``inst``, started if it has none (a bounded wait for
        its init's ready, driving the machine meanwhile): what ``mkctl exec`` joins."""
        if inst.state.value != "active" or inst.pid is None:
            raise NotLoaded(f"instance {inst.name!r} is {inst.state.value}; its userland runs "
                            "with its kernel", f"mkctl start {inst.name} first")
        run = self.runs.get(inst.id)
        if run is not None and (run.ended or run.generation != inst.generation):
            self.stop(inst.id, "a new run of its kernel")
            run = None
        if run is None:
            try:
                if not self._unpark_into_run(inst):     # (never a second init beside it)
                    self.start(inst)
                run = self.runs[inst.id]
            except OSError as exc:           # (a refusal, an MKError, goes as it is)
                raise UserlandFailed(f"the userland of {inst.name!r} could not be started: "
                                     f"{exc.strerror or exc}", "mkctl show; try again") from None
        if not run.ready:
            self.wait(lambda: run.ready or run.ended, time.monotonic() + READY_S)
        if not run.ready:
            why = run.failure or f"its init did not say it was ready within {READY_S:g} s"
            raise UserlandFailed(f"the userland of {inst.name!r} could not be brought up: "
                                 f"{why}", f"mkctl show {inst.name}; mkctl console {inst.name}")
        return {"init": run.pid, "start": run.start, "generation": run.generation}

    def start(self, inst: Instance) -> Run:
        """Fork the init of a fresh userland of ``inst`` (pid 1 of a new PID namespace: the
        host's own pid namespace for children is set back right after the fork)."""
        assert inst.pid is not None
        run = self._fork(inst, self._identity(inst), self.programs.get(inst.id, []))
        self._begin(inst, run)
        return run

    def park(self, inst: Instance) -> Run:
        """Make the init of ``inst``'s next userland while its kernel is loaded, off the boot's
        path: set up (cgroups, namespaces, mounts, filter), it waits for its go, written when
        the kernel is active (``_unpark_into_run``); so no program starts before the kernel
        does. Until then it says nothing and is no run of the instance's: any other change of
        the instance (a load, a resize, a halt, a delete) lets it go (``unpark``)."""
        identity, programs = self._identity(inst), self.programs.get(inst.id, [])
        r, w = os.pipe2(os.O_CLOEXEC)
        try:
            run = self._fork(inst, identity, programs, go=r)
        except BaseException:
            os.close(w)
            raise
        finally:
            os.close(r)
        run.go, run.made_for, run.ahead = w, (identity, [list(p) for p in programs]), True
        self.parked[inst.id] = run
        return run

    def unpark(self, inst_id: int) -> None:
        """Let the parked init of ``inst_id`` go (if any): its go pipe closed, it exits
        quietly; killed too, and reaped by its pidfd's turn."""
        run = self.parked.pop(inst_id, None)
        if run is None:
            return
        if not run.ended:
            self._letting_go[run.pid] = run   # until reaped (``_exited``, or ``close``)
        if run.go >= 0:
            os.close(run.go)
            run.go = -1
        if not run.ended:
            try:
                signal.pidfd_send_signal(run.pidfd, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def parked_pid(self, inst_id: int) -> int | None:
        """The host pid of ``inst_id``'s parked init (its own fork's), if one is parked: it
        lives in the instance's cgroups but is none of its kernel's orphans (lifecycle.py)."""
        run = self.parked.get(inst_id)
        return None if run is None or run.ended else run.pid

    def _unpark_into_run(self, inst: Instance) -> bool:
        """Active ``inst``'s parked init, if it is still alive and made for what the instance
        is now, becomes its run: told to go. False (it let go) otherwise."""
        run = self.parked.get(inst.id)
        if run is None:
            return False
        if run.ended or run.made_for != (self._identity(inst), self.programs.get(inst.id, [])):
            self.unpark(inst.id)
            return False
        del self.parked[inst.id]
        try:
            os.write(run.go, userinit.GO)
        except OSError:                 # it died meanwhile: its pidfd's turn reaps it
            self.parked[inst.id] = run
            self.unpark(inst.id)
            return False
        os.close(run.go)
        run.go, run.ahead = -1, False
        run.generation = inst.generation
        self._begin(inst, run)
        self._read_report(run)          # what it said while parked (nothing, or its failure)
        return True

    def _identity(self, inst: Instance) -> userland.Identity:
        identity = userland.Identity(
            name=inst.name, cpus=list(inst.cpus), cgroup_procs=self.cgroups.procs_files(inst.id),
            rootfs=inst.rootfs, hide=[self.run_dir],
            shared=self.shared_mounts(inst.shared), joinable=True)
        userland.check(identity)
        return identity

    def _fork(self, inst: Instance, identity: userland.Identity, programs: list[list[str]],
              go: int = -1) -> Run:
        master, slave = os.openpty()
        r = w = own_ns = pidfd = -1
        pid = 0
        arenas = inherited_mappings()           # the host's arena: not the init's to keep
        watched: list[int] = []
        try:
            quiet(slave)
            os.set_blocking(master, False)
            r, w = os.pipe2(os.O_CLOEXEC)
            os.set_blocking(r, False)
            own_ns = os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
            linux.unshare(userland.CLONE_NEWPID)
            try:
                pid = os.fork()
                if pid == 0:
                    try:
                        for address, length in arenas:     # every instance's memory, gone
                            linux.munmap(address, length)  # (nothing here touches it)
                        userinit.run(identity, slave, w, programs, die_with_host=True, go=go)
                    finally:
                        os._exit(userinit.EXIT_CANNOT_START)
                pidfd = os.pidfd_open(pid)      # held from the start: whatever fails next,
            finally:                            # the init is killed and reaped (below)
                linux.setns(own_ns, userland.CLONE_NEWPID)    # the host's next forks: its own
            os.close(w)
            w = -1
            run = Run(inst.id, inst.name, inst.generation, pid, pidfd, start_ticks(pid) or 0,
                      r, master, slave)
            for fd, kind, handler in (
                    (pidfd, "userland", lambda _i: self._exited(run)),
                    (r, "userland-report", lambda _i: self._read_report(run)),
                    (master, "userland-console", lambda _i: self._read_console(run))):
                self.reactor.watch(fd, kind, inst, handler)
                watched.append(fd)
        except BaseException:
            for fd in watched:
                self.reactor.unwatch(fd)
            if pid > 0:                         # never left running untracked
                kill_and_reap(pid, pidfd)
            for fd in (master, slave, r, w, pidfd):
                if fd >= 0:
                    os.close(fd)
            raise
        finally:
            if own_ns >= 0:
                os.close(own_ns)
        run.programs = [Program(i, argv, inst.generation) for i, argv in enumerate(programs)]
        return run

    def _begin(self, inst: Instance, run: Run) -> None:
        """``run`` is ``inst``'s userland from now on: kept, its boot's programs recorded."""
        parked = self.parked.get(inst.id)
        if parked is not None and parked is not run:
            self.unpark(inst.id)                # a start beside a parked init: it goes
        programs = run.programs
        for p in programs:
            p.generation = inst.generation
        if programs:
            kept = self.boots.setdefault(inst.id, [])
            kept.append(programs)
            del kept[:-BOOTS_KEPT]
        self.runs[inst.id] = run
        self.events.info("userland_start", instance=inst.id, name=inst.name, pid=run.pid,
                         generation=inst.generation, programs=len(programs))

    # -- ending ------------------------------------------------------------------------------
    def stop(self, inst_id: int, why: str) -> None:
        """Kill the userland of ``inst_id`` (its init: the PID namespace goes with it); the
        reactor reaps it when its pidfd says so (``close`` at once)."""
        run = self.runs.get(inst_id)
        if run is None or run.ended:
            return
        run.failure = run.failure or why
        try:
            signal.pidfd_send_signal(run.pidfd, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def _exited(self, run: Run) -> None:
        """The init's pidfd is readable: reap it, take its last records and console lines,
        record how it ended, close what the host held."""
        if run.ended:
            return
        try:
            _, status = os.waitpid(run.pid, 0)
            code: int | None = userland.exit_code(status)
        except ChildProcessError:
            code = None
        if run.ahead:                            # a parked init let go (or dead): no run
            if self.parked.get(run.inst_id) is run:
                self.unpark(run.inst_id)
            if self._letting_go.get(run.pid) is run:
                del self._letting_go[run.pid]
            self._forget(run)
            return
        self._read_report(run, everything=True)
        self._read_console(run, everything=True)
        self._forget(run)
        for p in run.programs:
            if p.status in ("starting", "running"):
                p.status, p.reason = "lost", "its userland ended first"
        self.events.info("userland_exit", instance=run.inst_id, name=run.name, pid=run.pid,
                         generation=run.generation, status=code, why=run.failure or "exited")
        if run.inst_id in self._due:
            self._ring()                         # the next run's start waited for this one

    def _forget(self, run: Run) -> None:
        """The run is over: its descriptors unwatched and closed, their numbers forgotten
        (-1): a number the host closes is the next descriptor it opens."""
        run.ended = True
        for fd in (run.pidfd, run.report, run.console):
            if fd >= 0:
                self.reactor.unwatch(fd)
        for fd in (run.pidfd, run.report, run.console, run.slave):
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
        run.pidfd = run.report = run.console = run.slave = -1
        if self.runs.get(run.inst_id) is run:
            del self.runs[run.inst_id]

    def close(self) -> None:
        """The machine closes (or is abandoned: its userlands die with their host): every
        userland killed and reaped now (bounded), every descriptor closed; parked inits let
        go and not reaped yet too (no zombie, no descriptor left for a turn that never comes)."""
        if self.closed:
            return
        self.closed = True
        for inst_id in list(self.parked):
            self.unpark(inst_id)
        ahead = list(self._letting_go.values())          # those let go before too, not reaped yet
        for run in list(self.runs.values()):
            self.stop(run.inst_id, "the machine shut down")
        deadline = time.monotonic() + 5.0
        for run in list(self.runs.values()) + ahead:
            if run.ended:
                continue
            while time.monotonic() < deadline and not linux.wait_readable(run.pidfd, 0.05):
                pass
            if linux.wait_readable(run.pidfd, 0):
                self._exited(run)
            else:                            # (a process of it not reaped by its parent yet)
                self.events.warning("userland_not_reaped", instance=run.inst_id, name=run.name,
                                    pid=run.pid)
                self._forget(run)
        self._letting_go.clear()
        if self._bell >= 0:
            self.reactor.unwatch(self._bell)
            os.close(self._bell)
            self._bell = -1

    # -- the init's records ------------------------------------------------------------------
    def _read_report(self, run: Run, everything: bool = False) -> None:
        """Read (at most READ_PER_TURN unless ``everything``) of the init's pipe and apply each
        checked record; a bad one is refused with an event and the pipe dropped. Nothing once
        the run is over (its pipe closed: the number may be another descriptor's)."""
        if run.report < 0 or run.ended or run.go >= 0:
            return                      # (a parked init's records wait for its go)
        eof = False
        while True:
            try:
                chunk = os.read(run.report, READ_PER_TURN)
            except BlockingIOError:
                break
            except OSError:
                eof = True
                break
            if not chunk:
                eof = True
                break
            run.pending += chunk
            if len(run.pending) > PENDING_MAX:
                self._refuse(run, f"{len(run.pending)} bytes without a whole record")
                return
            if not everything:
                break
        for rec in userinit.parse(run.pending, len(run.programs)):
            if isinstance(rec, userinit.BadRecord):
                self._refuse(run, str(rec))
                return
            self._apply(run, rec)
        if eof and not everything:
            self.reactor.unwatch(run.report)     # the pidfd's turn ends it

    def _refuse(self, run: Run, why: str) -> None:
        self.events.warning("userland_record_refused", instance=run.inst_id, name=run.name,
                            why=why[:200])
        run.pending.clear()
        self.reactor.unwatch(run.report)
        os.close(run.report)
        run.report = -1

    def _apply(self, run: Run, rec: userinit.Record) -> None:
        if rec.kind == "ready":
            run.ready = True
            self.events.info("userland_ready", instance=run.inst_id, name=run.name,
                             generation=run.generation)
            return
        if rec.kind == "unset":                       # the init itself could not set up
            run.failure = rec.reason[:300]
            self.events.warning("userland_setup_failed", instance=run.inst_id, name=run.name,
                                reason=rec.reason[:300])
            return
        if rec.kind == "reboot":                      # reboot(2) inside: this instance's
            self.events.info("userland_reboot", instance=run.inst_id, name=run.name,
                             generation=run.generation)
            self._reboots[run.inst_id] = run.generation
            self._ring()
            return
        p = run.programs[rec.index]
        if rec.kind == "started":
            p.status = "running"
            return
        p.status, p.reason = rec.status, rec.reason[:300]
        self.events.info("program_exit", instance=run.inst_id, name=run.name, index=p.index,
                         argv=[a[:200] for a in p.argv[:16]], generation=p.generation,
                         status=p.status, reason=p.reason)

    # -- /dev/console ------------------------------------------------------------------------
    def _read_console(self, run: Run, everything: bool = False) -> None:
        """What programs wrote to /dev/console, into the instance's console log, a line at a
        time, each tagged (a line longer than LINE_MAX is cut there)."""
        if run.ended:
            return
        while True:
            try:
                chunk = os.read(run.console, READ_PER_TURN)
            except (BlockingIOError, OSError):
                break
            if not chunk:
                break
            run.line += chunk
            if not everything:
                break
        lines = []
        while True:
            nl = run.line.find(b"\n")
            if nl < 0 and len(run.line) < LINE_MAX:
                break
            cut = nl if 0 <= nl < LINE_MAX else LINE_MAX
            lines.append(bytes(run.line[:cut]).decode("utf-8", "replace").rstrip("\r"))
            del run.line[:cut + 1 if cut == nl else cut]
        if everything and run.line:
            lines.append(bytes(run.line).decode("utf-8", "replace"))
            run.line.clear()
        if lines:
            self.console_write(run.inst_id, "".join(f"{CONSOLE_TAG}{s}\n" for s in lines))

    def feed(self, name: str, data: bytes) -> bool:
        """Type ``data`` into the userland's /dev/console (what its readers read); False when
        the instance has no userland up or the pty takes no more now (nothing is queued)."""
        inst = self.table.get(name)
        run = self.runs.get(inst.id)
        if run is None or run.ended or not data:
            return False
        try:
            return os.write(run.console, bytes(data)) == len(data)
        except OSError:
            return False

    # -- views -------------------------------------------------------------------------------
    def describe(self, inst: Instance) -> dict[str, Any]:
        """The userland and boot programs of ``inst``, for ``mkctl show`` and the json view."""
        run = self.runs.get(inst.id)
        boots = self.boots.get(inst.id, [])
        return {
            "userland": None if run is None else {
                "pid": run.pid, "generation": run.generation, "ready": run.ready},
            "programs": [p.to_dict() for p in boots[-1]] if boots else [],
            "boot_programs": [list(p) for p in self.programs.get(inst.id, [])],
        }

    def history(self, inst: Instance) -> list[dict[str, Any]]:
        """Every kept boot's programs of ``inst``, oldest first (the scenario report's)."""
        return [p.to_dict() for boot in self.boots.get(inst.id, []) for p in boot]
