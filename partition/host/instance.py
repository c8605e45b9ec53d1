"""An instance's record and its life cycle (``enum mk_instance_state``).

The transition table is the single place that says which verb is legal in which state; every
refusal quotes it, so a user learns both what the state is and what would make the verb legal.
"""

from __future__ import annotations

import enum
import signal
import socket
from dataclasses import dataclass, field
from typing import Any

from partition.errors import ResourceBusy
from partition.host.kimage import KImage
from partition.host.recovery import RecoveryPolicy


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


@dataclass
class Instance:
    id: int
    name: str
    cpus: list[int]
    physical_cpus: list[int]
    memory_base: int
    memory_bytes: int                   # the boot region; regions added at run time: extra
    state: State = State.READY
    extra_regions: list[tuple[int, int]] = field(default_factory=list)  # (base, bytes), oldest first
    pid_start: float = 0.0              # its process's start time (adoption checks it)
    child_fds: tuple[int, int] = (-1, -1)   # its doorbell and host doorbell, by number, in it
    adopted: bool = False               # this run was adopted: not our child, no channel
    #: KHO: the regions the last run preserved, checked, with CRCs (host/kho.py); None: none
    kho: list[tuple[str, int, int, int]] | None = None
    kho_keep_rest: bool = False
    handover: bool = False              # its kernel is quiescing for a live update
    progress_mark: tuple[int, float] = (-1, 0.0)   # its loop counter, when it last moved (top)
    kimage: KImage | None = None
    pid: int | None = None
    pidfd: int | None = None
    doorbell_fd: int | None = None
    old_doorbell_fd: int | None = None  # the predecessor's, after a live update: forwarded
    channel: socket.socket | None = None  # host end of the instance's doorbell channel
    oom_kills: int = 0                  # its memory cgroup's OOM kills seen so far
    parked: Parked | None = None        # its loaded process, before exec
    shutdown_acked: bool = False        # this run answered the host's SHUTDOWN
    cmd_seq: int = 0                    # the host commands sent to it (HostIPC.command)
    halted_said: str | None = None      # the reason of its last HALTED message, this run
    boots: int = 0
    boots_acked: bool = False           # this run's boot CPU answered the spawn mailbox
    generation: int = 0
    halt_requested: str | None = None   # "graceful" | "forced" while a kill is in progress
    last_exit: ExitRecord | None = None
    failure: str | None = None
    last_heartbeat: float | None = None
    recovery: RecoveryPolicy = field(default_factory=RecoveryPolicy)
    failures: list[dict[str, Any]] = field(default_factory=list)
    pending_fault: tuple[str, float] | None = None     # kind, monotonic time injected
    progress_seen: tuple[int, float] = (0, 0.0)       # watchdog: last value, when it changed
    nudged: float = 0.0                               # watchdog: the stall it rang the kernel for
    heartbeats_seen: int = -1                         # own page's count at the last sweep
    standby_for: str | None = None      # this instance is the pre-booted standby of that one
    served_by: int | None = None        # id of the standby that took over this role
    counters: dict[str, int] = field(default_factory=lambda: {
        "boots": 0, "halts": 0, "crashes": 0, "boot_failures": 0, "host_sent": 0,
        "heartbeats": 0, "halted_msgs": 0, "failures": 0, "restarts": 0, "faults_injected": 0,
        "foreign_pages": 0, "wild_pages": 0, "doorbells_given": 0, "bad_doorbell_requests": 0,
        "ring_jams": 0, "live_updates": 0, "watchdog_nudges": 0, "reclaim_wakes": 0,
        "doorbells_forwarded": 0})
    #: runtime resource changes (overlays): what the kernel answered, and how often
    resource_changes: dict[str, int] = field(default_factory=lambda: {
        "accepted": 0, "refused": 0, "unanswered": 0})
    #: unprotected machines: pages of this partition written by others, by writer name
    foreign_writes: dict[str, int] = field(default_factory=dict)
    #: its LLC ways (``llc-way-mask``, host/llc.py); 0: none of its own (the default group's)
    llc_way_mask: int = 0

    @property
    def regions(self) -> list[tuple[int, int]]:
        """Every region of the instance, boot region first (the /proc/iomem region-<n>)."""
        return [(self.memory_base, self.memory_bytes), *self.extra_regions]
