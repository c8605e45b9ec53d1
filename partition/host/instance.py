"""An instance's record and its life cycle (``enum mk_instance_state``).

The transition table is the single place that says which verb is legal in which state; every
refusal quotes it, so a user learns both what the state is and what would make the verb legal.
"""

from __future__ import annotations

import enum
import errno as _errno
import operator
import signal
import socket
from dataclasses import dataclass, field
from typing import Any

from partition.errors import MKError, ResourceBusy
from partition.host.kimage import KImage
from partition.host.recovery import RecoveryPolicy
from partition.host.userspec import PIDS_MAX_DEFAULT


class State(str, enum.Enum):
    EMPTY = "empty"
    READY = "ready"
    LOADED = "loaded"
    ACTIVE = "active"
    FAILED = "failed"

    def __str__(self) -> str:
        return self.value


# verb -> states it is legal in
ALLOWED: dict[str, tuple[State, ...]] = {
    "load": (State.READY,),
    "start": (State.LOADED, State.FAILED),      # kerf 0.4's boot ("exec" is its old name)
    "kill": (State.ACTIVE,),
    "kill --force": (State.ACTIVE, State.LOADED),
    "unload": (State.LOADED, State.FAILED),
    "delete": (State.READY,),
}

# how to reach a state where the verb is legal, from the state the instance is in
_PATHS: dict[tuple[str, State], str] = {
    ("load", State.LOADED): "mkctl unload {n} first to replace the image",
    ("load", State.ACTIVE): "mkctl kill {n}, then mkctl unload {n}",
    ("load", State.FAILED): "mkctl unload {n} first",
    ("start", State.READY): "mkctl load {n} --kernel SPEC first",
    ("start", State.ACTIVE): "it is already running; mkctl kill {n} to halt it",
    ("kill", State.READY): "nothing runs there; mkctl load and mkctl start boot it",
    ("kill", State.LOADED): "it is already halted (mkctl kill --force is allowed and a no-op)",
    ("kill", State.FAILED): "it is not running; mkctl unload {n} to clear it",
    ("kill --force", State.READY): "nothing is loaded there",
    ("kill --force", State.FAILED): "it is not running; mkctl unload {n} to clear it",
    ("unload", State.READY): "no image is loaded",
    ("unload", State.ACTIVE): "mkctl kill {n} first",
    ("delete", State.LOADED): "mkctl unload {n} first",
    ("delete", State.ACTIVE): "mkctl kill {n}, then mkctl unload {n}",
    ("delete", State.FAILED): "mkctl unload {n} first",
}


def check_transition(verb: str, name: str, state: State) -> None:
    allowed = ALLOWED[verb]
    if state in allowed:
        return
    need = " or ".join(s.value for s in allowed)
    hint = _PATHS.get((verb, state), "").format(n=name) or None
    raise ResourceBusy(f"instance {name!r} is {state.value}; {verb!r} needs state {need}", hint)


@dataclass
class ExitRecord:
    """Why the last run of an instance ended."""

    reason: str
    how: str                 # graceful | forced | voluntary | panic | killed | exited | boot-failed
    signal: int | None = None
    code: int | None = None
    time: float = 0.0        # wall clock, seconds

    def to_dict(self) -> dict[str, Any]:
        return {
            "reason": self.reason, "how": self.how, "signal": self.signal,
            "signal_name": signal.Signals(self.signal).name if self.signal else None,
            "code": self.code, "time": self.time,
        }


#: what a descriptor in the machine's selector is, with the instance it belongs to
EXIT, CHANNEL, REPORT, PARKED_EXIT = "exit", "channel", "report", "parked-exit"
OLD_DOORBELL = "old-doorbell"       # a live update's predecessor's doorbell (lifecycle.py)


@dataclass
class Parked:
    """An instance's process between ``load`` and ``exec``: contained, its image imported (or
    being imported), waiting on its doorbell for the spawn mailbox."""

    pid: int
    pidfd: int
    doorbell_fd: int
    channel: socket.socket           # host end of its doorbell channel
    report_fd: int                   # the loader's report pipe; -1 once read
    raw: bytes = b""
    report: dict[str, Any] | None = None
    status: int | None = None        # its wait status, once reaped
    cpus: list[int] = field(default_factory=list)   # what it was told it runs on, at fork
    child_fds: tuple[int, int] = (-1, -1)           # its doorbell and host doorbell, in it


class RunTransitionError(MKError):
    """A run of an instance was asked to change in a way its table does not allow: a second
    process started beside a live one, a process ended twice, a second successor parked. A bug
    of the host, never of a kernel; nothing was changed."""

    errno = _errno.EPROTO


class Phase(str, enum.Enum):
    """Whether a process of the instance runs (booting, active or halting)."""

    IDLE = "idle"
    RUNNING = "running"


#: (phase, event) -> the phase it leads to; an event not listed for a phase is refused
RUN_TRANSITIONS: dict[tuple[Phase, str], Phase] = {
    (Phase.IDLE, "start"): Phase.RUNNING,       # lifecycle.boot: the parked process runs
    (Phase.IDLE, "adopt"): Phase.RUNNING,       # adoption: a dead host's run taken over
    (Phase.RUNNING, "end"): Phase.IDLE,         # lifecycle: reaped, or forgotten at close
}


@dataclass
class Run:
    """The run-time state of an instance's process: what runs now (its pid and the host's
    descriptors for it), its parked successor, its halt flags and the timers the host keeps.

    Its fields change through its methods alone (instance.py is the one writer module of every
    field, ``WRITERS``; tools/writers.py checks it), each a step of ``RUN_TRANSITIONS`` or a
    flag of the run; the module that calls each:

    - ``start``, ``end``, ``keep_old_doorbell``, ``drop_doorbell``, ``booted``,
      ``saw_oom_kills``, ``clear_fault``: lifecycle.py; ``adopt``, ``restore``: adoption.py;
    - ``park`` and ``unpark``: loading.py (``unpark`` also lifecycle.py's boot, which takes
      the parked process);
    - ``halt``: whoever halts it (lifecycle.py, liveupdate.py, faults.py, supervision.py's
      watchdog); ``hand_over``: liveupdate.py; ``inject_fault``: faults.py;
    - ``next_command``, ``said_halted``, ``acked_shutdown``, ``heartbeat``: hostipc.py;
    - ``saw_progress``, ``nudge``: supervision.py; ``mark_progress``, ``saw_heartbeats``:
      sweep.py.
    """

    phase: Phase = Phase.IDLE
    pid: int | None = None
    pidfd: int | None = None
    doorbell_fd: int | None = None
    old_doorbell_fd: int | None = None  # the predecessor's, after a live update: forwarded
    channel: socket.socket | None = None  # host end of the instance's doorbell channel
    child_fds: tuple[int, int] = (-1, -1)   # its doorbell and host doorbell, by number, in it
    pid_start: float = 0.0              # its process's start time (adoption checks it)
    adopted: bool = False               # this run was adopted: not our child, no channel
    parked: Parked | None = None        # its loaded process, before exec
    halt_requested: str | None = None   # why the host halts it, while it does ("graceful"...)
    handover: bool = False              # its kernel is quiescing for a live update
    shutdown_acked: bool = False        # this run answered the host's SHUTDOWN
    halted_said: str | None = None      # the reason of its last HALTED message, this run
    boots_acked: bool = False           # this run's boot CPU answered the spawn mailbox
    generation: int = 0                 # its incarnations (the spawn mailbox's number)
    cmd_seq: int = 0                    # the host commands sent to it (HostIPC.command)
    oom_kills: int = 0                  # its memory cgroup's OOM kills seen so far
    pending_fault: tuple[str, float] | None = None     # kind, monotonic time injected
    progress_seen: tuple[int, float] = (0, 0.0)       # watchdog: last value, when it changed
    nudged: float = 0.0                               # watchdog: the stall it rang the kernel for
    heartbeats_seen: int = -1                         # own page's count at the last sweep
    progress_mark: tuple[int, float] = (-1, 0.0)   # its loop counter, when it last moved (top)
    last_heartbeat: float | None = None

    def _step(self, event: str) -> None:
        nxt = RUN_TRANSITIONS.get((self.phase, event))
        if nxt is None:
            allowed = sorted(e for p, e in RUN_TRANSITIONS if p == self.phase)
            raise RunTransitionError(f"a run that is {self.phase.value} cannot {event} "
                                     f"(it can: {', '.join(allowed)})",
                                     "a bug of the host: report it with the event log")
        self.phase = nxt

    def start(self, p: Parked, pid_start: float) -> None:
        """The parked process becomes the running one (a boot): a fresh run's flags."""
        self._step("start")
        self.pid, self.pidfd, self.doorbell_fd, self.channel = \
            p.pid, p.pidfd, p.doorbell_fd, p.channel
        self.child_fds, self.adopted = p.child_fds, False
        if pid_start:
            self.pid_start = pid_start
        self.halt_requested = None
        self.halted_said = None
        self.shutdown_acked = False
        self.boots_acked = False
        self.generation += 1

    def adopt(self, pid: int, pidfd: int, doorbell_fd: int, pid_start: float,
              child_fds: tuple[int, int]) -> None:
        """A dead host's run, checked, taken over by this host (no channel: it died)."""
        self._step("adopt")
        self.pid, self.pidfd, self.doorbell_fd, self.pid_start = pid, pidfd, doorbell_fd, pid_start
        self.child_fds = child_fds
        self.adopted = True

    def restore(self, generation: int, cmd_seq: int) -> None:
        """What a dead host's record says of the runs before (adoption)."""
        self.generation, self.cmd_seq = generation, cmd_seq

    def end(self) -> None:
        """The process is reaped or forgotten; what the host held for it is closed already."""
        self._step("end")
        self.pid = self.pidfd = self.doorbell_fd = self.old_doorbell_fd = None
        self.channel = None
        self.adopted = False

    def drop_doorbell(self) -> int | None:
        """Take the run's doorbell out of it (a live update keeps its ring end); its fd."""
        fd, self.doorbell_fd = self.doorbell_fd, None
        return fd

    def keep_old_doorbell(self, fd: int | None) -> None:
        """The predecessor's doorbell, watched for late rings after a live update (or none)."""
        self.old_doorbell_fd = fd

    def park(self, p: Parked) -> None:
        if self.parked is not None:
            raise RunTransitionError(f"a successor (pid {self.parked.pid}) is parked already",
                                     "a bug of the host: report it with the event log")
        self.parked = p

    def unpark(self) -> Parked:
        """The parked successor, taken out (to boot it, or to reap it)."""
        p = self.parked
        if p is None:
            raise RunTransitionError("no successor is parked", "a bug of the host: report it")
        self.parked = None
        return p

    def halt(self, why: str | None) -> None:
        """Why the host halts the run (the exit's record says so); None: it asks no more."""
        self.halt_requested = why

    def booted(self) -> None:
        """The boot CPU answered the spawn mailbox."""
        self.boots_acked = True

    def next_command(self) -> int:
        self.cmd_seq += 1
        return self.cmd_seq

    def said_halted(self, reason: str | None) -> None:
        self.halted_said = reason

    def acked_shutdown(self) -> None:
        self.shutdown_acked = True

    def heartbeat(self, at: float) -> None:
        self.last_heartbeat = at

    def saw_oom_kills(self, n: int) -> None:
        """Its memory cgroup's OOM kills, as last read."""
        self.oom_kills = n

    def inject_fault(self, kind: str, at: float) -> None:
        """A fault the host injected (its kind, monotonic time): the exit it causes says so."""
        self.pending_fault = (kind, at)

    def clear_fault(self) -> None:
        self.pending_fault = None

    def hand_over(self, quiescing: bool) -> None:
        """Its kernel quiesces for a live update (True) or is done with it (False)."""
        self.handover = quiescing

    def saw_progress(self, value: int, at: float) -> None:
        """The watchdog: the progress counter's value, when it last changed."""
        self.progress_seen = (value, at)

    def nudge(self, since: float) -> None:
        """The watchdog rang the kernel for the stall that began at ``since``."""
        self.nudged = since

    def mark_progress(self, value: int, at: float) -> None:
        """The sweep: its loop counter, when it last moved."""
        self.progress_mark = (value, at)

    def saw_heartbeats(self, n: int) -> None:
        """The sweep: its own page's heartbeat count, as last read."""
        self.heartbeats_seen = n


def _run_field(name: str) -> Any:
    """An attribute of ``Instance`` that is its run's (read there; written by ``Run``'s
    methods): the names callers outside the host know keep working. Read through
    ``operator.attrgetter`` (C): no Python call per read, as the boot path reads them often."""
    return property(operator.attrgetter(f"run.{name}"),
                    doc=f"``Run.{name}`` of the instance (read-only here)")


#: Instance field -> the one module that may change it once the instance is built (paths from
#: partition/); a field not listed is set when the instance is built (provision.py's create,
#: adoption.py's rebuild) and never changed after. "host/instance.py" means through Instance's
#: methods (their callers are in Instance's docstring); every field of ``Run`` is its methods'
#: too. tools/writers.py checks the source against this table (tests/unit/test_writers.py).
WRITERS: dict[str, str] = {
    "state": "host/instance.py",            # enter: publish.py, adoption.py
    "kimage": "host/instance.py",           # set_kimage: loading.py, adoption.py
    "failure": "host/instance.py",          # record_failure, clear_failure
    "counters": "host/instance.py",         # count, restore_counters
    "served_by": "host/instance.py",        # serve: lifecycle.py, supervision.py
    "extra_regions": "host/instance.py",    # add_region, remove_region: resize.py, overlays.py
    "cpus": "host/resize.py",
    "physical_cpus": "host/resize.py",
    "resource_changes": "host/resize.py",
    "boots": "host/lifecycle.py",
    "last_exit": "host/lifecycle.py",
    "failures": "host/supervision.py",
    "recovery": "host/supervision.py",      # changed in place by update_policy (mkctl update)
    "kho": "host/kho.py",
    "kho_keep_rest": "host/kho.py",
    "foreign_writes": "host/writewatch.py",
}


@dataclass
class Instance:
    """An instance as the host records it: identity (``id``, ``name``, ``rootfs``), resources
    (``cpus``, ``physical_cpus``, the memory regions, ``llc_way_mask``, ``pids_max``), policy
    (``recovery``, ``standby_for``), its ``state`` and ``kimage``, and what its runs left
    (``last_exit``, ``boots``, ``failures``, ``failure``, ``kho``, ``counters``...). Its
    process's run-time state is ``run`` (``Run``, with its own transition table); the run's
    fields read as the instance's (``inst.pid``), as they always did.

    Each field has one writer module (``WRITERS``, checked by tools/writers.py): the fields
    several modules change go through the methods below, whose callers are: ``enter``
    (publish.py's transitions; adoption.py as it rebuilds), ``set_kimage`` (loading.py's
    load, unload and live-update image; adoption.py), ``record_failure`` (lifecycle.py's
    boot failures, supervision.py's restart intensity, adoption.py's refusal),
    ``clear_failure`` (lifecycle.py's boot, loading.py's unload), ``count`` (whoever counts:
    lifecycle, supervision, hostipc, sweep, faults, liveupdate, writewatch),
    ``restore_counters`` (adoption.py), ``serve`` (lifecycle.py, supervision.py's
    failover), ``add_region``/``remove_region`` (resize.py; overlays.py's undo). The rest
    have a single writer module named in ``WRITERS``; a field it does not name is set when
    the instance is built (provision.py, adoption.py) and never after."""

    id: int
    name: str
    cpus: list[int]
    physical_cpus: list[int]
    memory_base: int
    memory_bytes: int                   # the boot region; regions added at run time: extra
    state: State = State.READY
    extra_regions: list[tuple[int, int]] = field(default_factory=list)  # (base, bytes), oldest first
    #: KHO: the regions the last run preserved, checked, with CRCs (host/kho.py); None: none
    kho: list[tuple[str, int, int, int]] | None = None
    kho_keep_rest: bool = False
    kimage: KImage | None = None
    boots: int = 0
    last_exit: ExitRecord | None = None
    failure: str | None = None
    recovery: RecoveryPolicy = field(default_factory=RecoveryPolicy)
    failures: list[dict[str, Any]] = field(default_factory=list)
    standby_for: str | None = None      # this instance is the pre-booted standby of that one
    served_by: int | None = None        # id of the standby that took over this role
    counters: dict[str, int] = field(default_factory=lambda: {
        "boots": 0, "halts": 0, "crashes": 0, "boot_failures": 0, "host_sent": 0,
        "heartbeats": 0, "halted_msgs": 0, "failures": 0, "restarts": 0, "faults_injected": 0,
        "foreign_pages": 0, "wild_pages": 0, "doorbells_given": 0, "bad_doorbell_requests": 0,
        "ring_jams": 0, "live_updates": 0, "watchdog_nudges": 0, "reclaim_wakes": 0,
        "doorbells_forwarded": 0, "console_lines": 0})
    #: runtime resource changes (overlays): what the kernel answered, and how often
    resource_changes: dict[str, int] = field(default_factory=lambda: {
        "accepted": 0, "refused": 0, "unanswered": 0})
    #: unprotected machines: pages of this partition written by others, by writer name
    foreign_writes: dict[str, int] = field(default_factory=dict)
    #: its LLC ways (``llc-way-mask``, host/llc.py); 0: none of its own (the default group's)
    llc_way_mask: int = 0
    #: its userland's process limit (the pids cgroup's ``pids.max``, host/userspec.py)
    pids_max: int = PIDS_MAX_DEFAULT
    #: its userland's root directory (``create --rootfs``, absolute); None: the host's root
    rootfs: str | None = None
    #: the machine's shared regions its userlands mount (``create --shared``, host/shared.py)
    shared: list[str] = field(default_factory=list)

    run: Run = field(default_factory=Run)

    # the run's fields, read as the instance's (written through ``run``'s methods)
    pid = _run_field("pid")
    pidfd = _run_field("pidfd")
    doorbell_fd = _run_field("doorbell_fd")
    old_doorbell_fd = _run_field("old_doorbell_fd")
    channel = _run_field("channel")
    child_fds = _run_field("child_fds")
    pid_start = _run_field("pid_start")
    adopted = _run_field("adopted")
    parked = _run_field("parked")
    halt_requested = _run_field("halt_requested")
    handover = _run_field("handover")
    shutdown_acked = _run_field("shutdown_acked")
    halted_said = _run_field("halted_said")
    boots_acked = _run_field("boots_acked")
    generation = _run_field("generation")
    cmd_seq = _run_field("cmd_seq")
    oom_kills = _run_field("oom_kills")
    pending_fault = _run_field("pending_fault")
    progress_seen = _run_field("progress_seen")
    nudged = _run_field("nudged")
    heartbeats_seen = _run_field("heartbeats_seen")
    progress_mark = _run_field("progress_mark")
    last_heartbeat = _run_field("last_heartbeat")

    def enter(self, state: State) -> None:
        """Its new state (publish.py tells the peer table and the event log; adoption.py
        rebuilds it quietly)."""
        self.state = state

    def set_kimage(self, kimage: KImage | None) -> None:
        self.kimage = kimage

    def record_failure(self, why: str) -> None:
        """Why it cannot run as it is (``show`` says so until a boot or an unload clears it)."""
        self.failure = why

    def clear_failure(self) -> None:
        self.failure = None

    def count(self, what: str, n: int = 1) -> None:
        """One of its counters (``counters``' keys; a name not there is a bug: KeyError)."""
        self.counters[what] += n

    def restore_counters(self, saved: dict[str, Any]) -> None:
        """A dead host's counters (adoption): the known names with an int, the rest ignored."""
        for k, v in saved.items():
            if k in self.counters and isinstance(v, int):
                self.counters[k] = v

    def serve(self, by: int | None) -> None:
        """The standby (by id) that took over its role; None: it serves its own again."""
        self.served_by = by

    def add_region(self, base: int, size: int) -> None:
        self.extra_regions.append((base, size))

    def remove_region(self, base: int, size: int) -> None:
        self.extra_regions.remove((base, size))

    @property
    def regions(self) -> list[tuple[int, int]]:
        """Every region of the instance, boot region first (the /proc/iomem region-<n>)."""
        return [(self.memory_base, self.memory_bytes), *self.extra_regions]
