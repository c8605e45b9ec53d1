"""Fault injection, the host's side: the kinds and the check of a request (guest/faults.py
carries out the inside kinds). Each kind is a real event in a real process, not a simulation.

Outside faults are done by the host to the process (``kill``: SIGKILL; ``hang-stop``: SIGSTOP,
and the instance's cgroup frozen, so that its userland stops with it until a kill thaws it).
Inside faults are asked of the kernel through its ring (message ``MK_EMU_FAULT``, an emulator
invention) and carried out by the kernel's own code, in its own process:

- ``panic``: the kernel panics (console oops, HALTED to the host);
- ``hang-spin``: the kernel spins without making progress (its progress counter stops); the
  host freezes the instance's userland alone (its nested cgroup, host/cgroups.py), as a kernel
  spinning on its CPUs schedules none of its programs, until a kill thaws it;
- ``wild-write``: the kernel writes to a physical address outside its partition. With
  protection on it never had that memory mapped: the access faults inside the offender (a
  kernel oops: "unable to handle page fault"); with protection off the whole arena is mapped and
  the write lands in the victim;
- ``ipi-storm``: the kernel floods a peer's ring with messages;
- ``cpu-hog``: the kernel burns its cores for a while (still making progress);
- ``mem-hog``: the kernel allocates beyond its heap limit (RLIMIT_AS) and fails alone.
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from partition.abi import message as M
from partition.abi.ring import RingError
from partition.errors import InvalidSpec, NotLoaded, ResourceBusy
from partition.host.instance import Instance, State
from partition.host.ports import SYSTEM_CLOCK, SYSTEM_OS, Clock, OSPort

if TYPE_CHECKING:
    from partition.host.events import EventLog
    from partition.host.writewatch import WriteWatch

OUTSIDE = ("kill", "hang-stop")
INSIDE = ("panic", "hang-spin", "wild-write", "ipi-storm", "cpu-hog", "mem-hog")
KINDS = OUTSIDE + INSIDE



def validate(kind: str, options: dict[str, Any]) -> dict[str, Any]:
    """Check a fault request completely before anything is done (CLI and scenario input)."""
    if kind not in KINDS:
        raise InvalidSpec(f"unknown fault kind {kind!r}", f"one of: {', '.join(KINDS)}")
    allowed = {"wild-write": {"address", "bytes"}, "ipi-storm": {"target", "count"},
               "cpu-hog": {"seconds"}, "mem-hog": {"bytes"}}.get(kind, set())
    extra = set(options) - allowed
    if extra:
        raise InvalidSpec(f"fault {kind!r} takes no option(s) {sorted(extra)}",
                          f"its options: {sorted(allowed) or 'none'}")
    out = dict(options)
    for key in ("address", "bytes", "target", "count"):
        if key in out:
            v = out[key]
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise InvalidSpec(f"fault option {key} must be a non-negative integer, got {v!r}",
                                  f"e.g. {key}=4096")
    if "seconds" in out:
        v = out["seconds"]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v <= 3600:
            raise InvalidSpec(f"fault option seconds must be in (0, 3600], got {v!r}",
                              "e.g. seconds=2")
    if kind == "wild-write" and "address" not in out:
        raise InvalidSpec("wild-write needs address (a physical address)",
                          "e.g. --address 0x... (a victim's memory_base from mkctl show)")
    if kind == "ipi-storm" and "target" not in out:
        raise InvalidSpec("ipi-storm needs target (an instance id)", "e.g. --target 2")
    return out


def inject(inst: Instance, kind: str, opts: dict[str, Any],
           by_id: Callable[[int], Instance | None], describe: Callable[[Instance], dict[str, Any]],
           writes: WriteWatch | None, command: Callable[..., Any], events: EventLog,
           clock: Clock = SYSTEM_CLOCK, port: OSPort = SYSTEM_OS,
           freeze: Callable[[int], bool] | None = None,
           unfreeze: Callable[[Instance], None] | None = None,
           frozen: Callable[[int], bool] | None = None,
           freeze_userland: Callable[[int], bool] | None = None) -> dict[str, Any]:
    """Inject a checked fault (``validate``) into an active instance; returns what ``describe``
    said of it just before (nothing slow between the fault and its detection). ``freeze``: the
    instance's cgroup freezer (Cgroups.freeze), which a hang-stop puts its userland in;
    ``freeze_userland`` (Cgroups.freeze_userland) freezes the userland alone, for a hang-spin
    (the kernel must go on spinning, its progress counter still, for the watchdog to see);
    ``unfreeze`` (Lifecycle.unfreeze) lets a kill fault end a hung-stopped instance, which
    ``frozen`` (Cgroups.frozen) tells before the kill (without it, unfreeze looks after)."""
    if inst.state != State.ACTIVE or inst.pid is None:
        raise NotLoaded(f"instance {inst.name!r} is {inst.state.value}; a fault needs it active",
                        f"mkctl start {inst.name} first")
    if kind == "ipi-storm" and by_id(opts["target"]) is None:
        raise InvalidSpec(f"ipi-storm target {opts['target']} is no instance",
                          "give the id of an instance (mkctl show)")
    out = describe(inst)
    if writes is not None:
        writes.scan(only=inst)       # what it wrote so far, before its page tables go
    if kind == "kill":
        # all the host says and looks at first, the signal last: once it is sent, the host's
        # time (and, on a shared CPU, the dying process's) is its exit's notice (issue 20:
        # the cgroup read and the event after the kill took 0.2 ms)
        thaw = unfreeze is not None and (frozen is None or frozen(inst.id))
        inst.run.halt("fault")             # the record says so, and it is still a crash
        _said(inst, kind, opts, events)
        inst.run.inject_fault(kind, clock.monotonic())
        port.kill(inst.pid, signal.SIGKILL)
        if thaw and unfreeze is not None:  # (hung-stopped before: frozen, it would never die)
            unfreeze(inst)
        return out
    injected = clock.monotonic()
    if kind == "hang-stop":
        port.kill(inst.pid, signal.SIGSTOP)
        if freeze is not None:     # its userland too: every process of the instance stops
            freeze(inst.id)
    else:
        try:
            command(inst, M.MK_EMU_FAULT, {"kind": kind, "options": opts})
        except RingError as exc:       # nothing was injected: nothing is recorded
            raise ResourceBusy(f"fault {kind!r} could not be sent to {inst.name!r}: "
                               f"{exc.strerror}", "its IPI ring is full or it is not "
                               "answering; retry, or inject kill or hang-stop") from None
        if kind == "hang-spin" and freeze_userland is not None:
            freeze_userland(inst.id)   # sent: nothing runs beside a spinning kernel
    inst.run.inject_fault(kind, injected)     # the failure it causes is timed from then
    _said(inst, kind, opts, events)
    return out


def _said(inst: Instance, kind: str, opts: dict[str, Any], events: EventLog) -> None:
    """The fault counted and logged (a kill's before its signal, the others' after)."""
    inst.count("faults_injected")
    events.warning("fault_injected", instance=inst.id, name=inst.name, kind=kind, options=opts)
