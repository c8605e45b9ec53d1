"""Kernels that outlive their host: the state a supervisor's machine keeps, and adoption.

On the real machine the spawned kernels keep their CPUs and memory when the host kernel fails.
Here, a supervisor's machine (``survive_host``) gives its instances no parent-death signal, keeps
its arena under a name (``/dev/shm/mk-arena-<key>``), leaves its cgroups where the next machine
will not reap them, and writes what it knows to ``<run-dir>/machine.json`` (the machine) and
``<run-dir>/machine.d/<id>.json`` (one record per instance) as things change. If
the supervisor dies, the instances run on: pinned, contained, messaging each other with the
doorbells they hold; messages to the host wait in its ring; consoles keep their lines.

A new host (``mkctl adopt``, or ``mkctl init`` on the same run directory) opens the arena by
name and rebuilds its tables from the state file, checked against the arena and the processes.
Every field of a record is type-checked before any is used: a record with one bad field is
refused alone (its cgroup killed), never the machine's adoption. Every instance that was running
is verified before it is adopted:

* its pid lives and started when the file says (its start time as psutil's ``create_time``
  says it, to the hundredth of a second), so a reused pid is never taken for it;
* the pid is in the instance's own cgroup, which the host made and the instance cannot leave
  (its cgroup filesystem is read-only in its namespace);
* the arena's peer table names that pid and that generation.

Then the host opens a pidfd for it and takes its doorbell and the old host doorbell with
``pidfd_getfd``: pipes open for reading and writing and for writing (``_doorbell_of``,
``_host_bell_of``). An instance that fails a check is not adopted: the
processes in its cgroup are killed (they can only be its own), the pid itself is never
signalled, and it is recorded as failed with the reason. A parked (loaded) instance's process
is killed through its cgroup too; it is parked again at ``start``. Exit statuses of adopted
instances went to init, so their exits are recorded as "status unknown". Their doorbell channels
died with the old host, so an adopted instance cannot ask for doorbells of peers it did not
already know: messages to those still arrive, at its ring check (every 0.1 s).
"""

from __future__ import annotations

import base64
import json
import math
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import posix_ipc

from partition import linux
from partition.abi.constants import MAX_INSTANCES
from partition.errors import MKError
from partition.host import cgroups, llc, rundir, signing
from partition.host.instance import EXIT, Instance, State
from partition.host.kimage import check_spec
from partition.host.pool import NAME_RE, RESERVED_NAMES, Reservation
from partition.host.recovery import RecoveryPolicy
from partition.host.statefile import (  # noqa: F401  (the state file's names, as before)
    CONFIG_KEYS,
    START_TOLERANCE_S,
    STATE_FILE,
    STATE_VERSION,
    abandoned,
    arena_name,
    cgroup_bases,
    leftovers,
    read_state,
    records_path,
    resctrl_prefix,
    state_path,
    write_state,
)
from partition.host.userspec import PIDS_MAX_DEFAULT, check_pids_max
from partition.units import PAGE_SIZE

if TYPE_CHECKING:
    from partition.host.arena import Arena
    from partition.host.cgroups import Cgroups
    from partition.host.events import EventLog
    from partition.host.hostipc import HostBells
    from partition.host.pool import PoolConfig, ResourcePool
    from partition.host.reactor import Reactor
    from partition.host.table import InstanceTable


@dataclass
class Adopter:
    """What adoption uses of its machine, each named (never the machine itself)."""

    run_dir: str
    table: InstanceTable
    arena: Arena
    pool: ResourcePool
    pool_offset: int
    config: PoolConfig
    cgroups: Cgroups
    resctrl: llc.Resctrl
    llc_way_mask: int | None
    events: EventLog
    printk: Callable[[str], None]
    #: kexec_file_load's signature check (host/verbs' ``check_signature``)
    check_signature: Callable[..., None]
    require_signed: bool
    reactor: Reactor
    host_bells: HostBells                 # adopted instances ring the old host's doorbells
    on_exit: Callable[[Instance], None]   # an adopted run's pidfd became readable


def adopt(a: Adopter) -> tuple[float, list[dict[str, Any]]]:
    """Take over the instances the state file names (see the module's docstring); returns how
    long it took (ms) and the records refused, ``[{"name", "why"}]``."""
    t0 = time.monotonic()
    state = read_state(a.run_dir)
    assert state is not None
    adopted: list[str] = []
    refused: list[dict[str, Any]] = []
    for rec in state["instances"]:
        inst = _rebuild(a, rec, refused)
        if inst is None:
            continue
        why = None
        if rec.get("state") == "active" and isinstance(rec.get("pid"), int):
            why = _take(a, inst, rec)
            if why is None:
                adopted.append(inst.name)
                continue
            refused.append({"name": inst.name, "why": why})
        else:
            a.cgroups.kill(inst.id, reap=True)  # a parked process (or one the file lags behind)
        inst.enter(State.LOADED if inst.kimage else State.READY)
        if why is not None:
            inst.record_failure(f"not adopted: {why}")
            inst.enter(State.FAILED if inst.kimage else State.READY)
            a.cgroups.kill(inst.id, reap=True)
        a.arena.peer(inst.id).peer_state = 0
        a.arena.peer(inst.id).pid = 0
    _kill_unnamed(a)
    ms = round((time.monotonic() - t0) * 1e3, 3)
    a.events.info("adopted", instances=adopted, refused=refused, adopt_ms=ms,
                  previous_host=state.get("host_pid"))
    a.printk(f"multikernel: adopted {len(adopted)} running instance(s) in {ms} ms"
             + (f", refused {len(refused)}" if refused else ""))
    return ms, refused


def _kill_unnamed(a: Adopter) -> None:
    """Every instance cgroup no adopted or rebuilt record names: what runs there (a process the
    state file lagged behind) is killed, and the cgroup removed."""
    known = {f"i{i.id}" for i in a.table.by_name.values()}
    for base in a.cgroups.bases.values():
        try:
            entries = os.listdir(base)
        except OSError:
            continue
        for entry in entries:
            if re.fullmatch(r"i[0-9]{1,3}", entry) and entry not in known:
                cgroups.kill_and_remove_one(os.path.join(base, entry))
    # and their resctrl groups (CLOSIDs are scarce): a refused record's too
    for iid in a.resctrl.remove_groups(keep={i.id for i in a.table.by_name.values()}):
        a.events.info("llc_group_removed", instance=iid, why="no adopted instance holds it")


def _ints(v: Any) -> list[int]:
    if not isinstance(v, list) or not all(type(x) is int for x in v):
        raise ValueError(f"{v!r} is not a list of integers"[:200])
    return list(v)


def _finite(v: Any) -> bool:
    """An int or a finite float, not a bool (JSON gives NaN and Infinity too: a NaN start
    time would compare as matching any process's)."""
    return type(v) is int or (type(v) is float and math.isfinite(v))


#: every field of a record (save_state writes them all), with the check its value must pass
#: before any of it is used; a field missing takes its default, one not named here is not read
#: (a field added to _state_record gets its check here)
_FIELDS: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "id": ("an integer", lambda v: type(v) is int),
    "name": ("text", lambda v: isinstance(v, str)),
    "cpus": ("a list of integers", lambda v: isinstance(v, list)
             and all(type(x) is int for x in v)),
    "physical_cpus": ("a list of integers", lambda v: isinstance(v, list)
                      and all(type(x) is int for x in v)),
    "memory_base": ("an integer", lambda v: type(v) is int),
    "memory_bytes": ("an integer", lambda v: type(v) is int),
    "extra_regions": ("a list of [base, size]", lambda v: v is None or (
        isinstance(v, list) and all(isinstance(r, list) and len(r) == 2
                                    and all(type(x) is int for x in r) for r in v))),
    "state": ("an instance state", lambda v: v in {s.value for s in State}),
    "pid": ("an integer or null", lambda v: v is None or type(v) is int),
    "pid_start": ("a finite number", _finite),
    "generation": ("an integer", lambda v: type(v) is int),
    "cmd_seq": ("an integer", lambda v: type(v) is int),
    "boots": ("an integer", lambda v: type(v) is int),
    "child_fds": ("a list of integers", lambda v: isinstance(v, list)
                  and all(type(x) is int for x in v)),
    "kimage": ("null or an image's spec, cmdline, label and source", lambda v: v is None or (
        isinstance(v, dict) and all(isinstance(v.get(k, ""), str)
                                    for k in ("spec", "cmdline", "label", "source")))),
    "recovery": ("a recovery policy", lambda v: isinstance(v, dict)
                 and isinstance(v.get("policy", ""), str)
                 and type(v.get("max_restarts", 0)) is int
                 and all(_finite(v.get(k, 0)) for k in ("restart_window", "watchdog"))
                 and type(v.get("preserve_memory", False)) is bool
                 and type(v.get("recent_restarts", 0)) is int),
    "counters": ("a map of integers", lambda v: isinstance(v, dict)
                 and all(type(x) is int for x in v.values())),
    "standby_for": ("null or a name", lambda v: v is None or isinstance(v, str)),
}


def _check_fields(rec: dict[str, Any]) -> None:
    """Every field of the record has its type before any is used (ValueError names the first
    that does not): one bad value refuses its record, never the machine's adoption."""
    if rec.get("unreadable") is True:           # (_read_records' mark for a torn file)
        raise ValueError("its file is not JSON")
    for key, (what, ok) in _FIELDS.items():
        if key not in rec:
            continue
        value = rec[key]
        if not ok(value):
            raise ValueError(f"{key} {json.dumps(value)[:60]} is not {what}")


def _rebuild(a: Adopter, rec: Any, refused: list[dict[str, Any]]) -> Instance | None:
    """An instance record, checked as strictly as a create: id, name, CPUs of the pool, memory
    inside the pool and free, no duplicate. A record that fails is refused (its cgroup, if its
    id is sane, is killed) and named in the ``adopted`` event."""
    cfg, pool_lo = a.config, a.pool_offset
    iid = rec.get("id") if isinstance(rec, dict) else None
    try:
        if not isinstance(rec, dict):
            raise ValueError("not a record")
        if type(iid) is not int or not 1 <= iid < MAX_INSTANCES:
            raise ValueError(f"id {iid!r} is not 1..{MAX_INSTANCES - 1}")
        _check_fields(rec)
        name = rec.get("name")
        if not isinstance(name, str) or not NAME_RE.match(name) or name in RESERVED_NAMES:
            raise ValueError(f"name {name!r} is not an instance name")
        if name in a.table.by_name or a.table.by_id(iid) is not None:
            raise ValueError(f"a second record for {name!r} / id {iid}")
        cpus = _ints(rec.get("cpus"))
        if not cpus or any(c not in cfg.cpus for c in cpus):
            raise ValueError(f"CPUs {cpus} are not the pool's {cfg.cpus}")
        base, size = rec.get("memory_base"), rec.get("memory_bytes")
        if type(base) is not int or type(size) is not int:
            raise ValueError(f"region {base!r}+{size!r} is not two integers")
        extra: list[tuple[int, int]] = []
        for r in rec.get("extra_regions") or []:
            pair = _ints(r)
            if len(pair) != 2:
                raise ValueError(f"region {r!r} is not base and size")
            extra.append((pair[0], pair[1]))
        for b, z in [(base, size), *extra]:
            if z <= 0 or b % PAGE_SIZE or z % PAGE_SIZE:
                raise ValueError(f"region {b!r}+{z!r} is not page-aligned")
            why = a.pool.range_free(b - pool_lo, z)
            if why is not None:
                raise ValueError(why)
        mask = rec.get("llc_way_mask") or 0
        if mask:
            if type(mask) is not int:
                raise ValueError(f"llc_way_mask {mask!r} is not an integer")
            try:
                llc.check_instance(name, mask, a.llc_way_mask,
                                   {i.name: i.llc_way_mask for i in a.table.by_name.values()})
            except MKError as exc:
                raise ValueError(exc.message) from None
    except ValueError as exc:
        refused.append({"name": str(rec.get("name"))[:40] if isinstance(rec, dict) else "?",
                        "why": f"bad record: {exc}"})
        if type(iid) is int and 1 <= iid < MAX_INSTANCES and a.table.by_id(iid) is None:
            a.cgroups.kill(iid)
        return None
    a.pool.commit(Reservation(iid, name, cpus, base - pool_lo, size))
    for b, z in extra:
        a.pool.add_range(name, b - pool_lo, z)
    rp = rec["recovery"] if isinstance(rec.get("recovery"), dict) else {}
    try:
        policy = RecoveryPolicy.build(str(rp.get("policy", "none")),
                                      int(rp.get("max_restarts", 3)),
                                      float(rp.get("restart_window", 5.0)),
                                      float(rp.get("watchdog", 0.0)),
                                      bool(rp.get("preserve_memory", False)))
    except (MKError, TypeError, ValueError):
        policy = RecoveryPolicy()
    standby = rec.get("standby_for")
    try:        # (a dead host's record from before the limit was stored: the default)
        pids_max = check_pids_max(rec.get("pids_max", PIDS_MAX_DEFAULT))
    except MKError:
        pids_max = PIDS_MAX_DEFAULT
    rootfs = rec.get("rootfs")
    inst = Instance(id=iid, name=name, cpus=cpus,
                    physical_cpus=[a.config.physical_ids.get(c, c) for c in cpus],
                    memory_base=base, memory_bytes=size, recovery=policy,
                    standby_for=standby if isinstance(standby, str) else None,
                    extra_regions=extra, llc_way_mask=mask, pids_max=pids_max,
                    rootfs=rootfs if isinstance(rootfs, str) and rootfs.startswith("/") else None,
                    boots=_int(rec.get("boots")))
    generation = _int(rec.get("generation"))
    # the host's command numbering goes on: a kernel obeys only numbers past its last
    inst.run.restore(generation, max(_int(rec.get("cmd_seq")), a.arena.peer(iid).cmd_seq))
    counters = rec.get("counters")
    if isinstance(counters, dict):
        inst.restore_counters(counters)
    k = rec.get("kimage")
    if isinstance(k, dict):
        try:
            kimage = check_spec(k.get("spec"), k.get("cmdline", ""))
            kimage.label = str(k.get("label", ""))[:200]
            kimage.source = str(k.get("source", ""))[:400]
            inst.set_kimage(kimage)
            if k.get("file") is not None:     # checked again, not trusted: KEXEC_SIG_FORCE
                file = base64.b64decode(str(k["file"]), validate=True)
                if len(file) > signing.MAX_IMAGE:
                    raise ValueError(f"its image is over {signing.MAX_IMAGE >> 20} MiB")
                a.check_signature(inst, kimage, file)
            elif a.require_signed:     # nothing checked to run again: refused at a restart
                a.check_signature(inst, kimage)
        except (MKError, ValueError):
            inst.set_kimage(None)
    a.table.by_name[name] = inst
    return inst


def _int(v: Any) -> int:
    return v if type(v) is int and 0 <= v < 1 << 62 else 0


def _take(a: Adopter, inst: Instance, rec: dict[str, Any]) -> str | None:
    """Verify a running instance and take its descriptors; None when adopted, else why not."""
    pid = rec["pid"]
    if type(pid) is not int or not 0 < pid < 1 << 22:
        return f"pid {pid!r} is not a process id"
    start = linux.process_start_time(pid)
    if not start:
        return f"pid {pid} is gone"
    if abs(start - float(rec.get("pid_start") or 0)) > START_TOLERANCE_S:
        return f"pid {pid} is another process now (it started at {start}, not {rec.get('pid_start')})"
    procs = a.cgroups.procs_files(inst.id)
    if procs and not any(str(pid) in _read(p).split() for p in procs):
        return f"pid {pid} is not in the instance's cgroup"
    peer = a.arena.peer(inst.id)
    if peer.pid != pid or peer.generation != inst.generation:
        return f"the peer table says pid {peer.pid}, generation {peer.generation}"
    try:
        pidfd = linux.pidfd_open(pid)
    except OSError as exc:
        return f"pidfd_open: {exc.strerror}"
    fds = rec.get("child_fds")
    if not (isinstance(fds, list) and len(fds) == 2 and all(type(f) is int and 0 <= f < 1 << 20
                                                             for f in fds)):
        os.close(pidfd)
        return f"its doorbell numbers {fds!r} are not descriptors"
    try:
        doorbell = _doorbell_of(pidfd, fds[0])
    except OSError as exc:
        os.close(pidfd)
        return f"its doorbell: {exc.strerror}"
    try:
        host_bell = _host_bell_of(pidfd, fds[1])
    except OSError as exc:
        os.close(pidfd)
        os.close(doorbell)
        return f"its host doorbell: {exc.strerror}"
    if linux.process_start_time(pid) != start:                       # it died meanwhile: the fds are stale
        os.close(pidfd)
        os.close(doorbell)
        os.close(host_bell)
        return f"pid {pid} exited during adoption"
    inst.run.adopt(pid, pidfd, doorbell, start, (int(fds[0]), int(fds[1])))
    inst.enter(State.ACTIVE)
    a.cgroups.kill(inst.id, keep=pid)      # a successor the dead host parked: not ours to boot
    a.reactor.watch(pidfd, EXIT, inst, a.on_exit)
    ident = _pipe_id(host_bell)
    if ident is not None and ident in a.host_bells.ids:
        os.close(host_bell)                    # the same old host doorbell: watched already
    else:
        a.host_bells.add(host_bell, ident)
    return None


def _pipe_id(fd: int) -> int | None:
    """The pipe's identity (its inode, ``pipe:[N]``): descriptors of one pipe share it, so
    the old host's doorbell, which every adopted instance holds, is watched once."""
    try:
        found = re.fullmatch(r"pipe:\[([0-9]+)\]", os.readlink(f"/proc/self/fd/{fd}"))
    except OSError:
        return None
    return int(found.group(1)) if found else None


def _open_mode(fd: int) -> int:
    found = re.search(r"^flags:\s*([0-7]+)", _read(f"/proc/self/fdinfo/{fd}"), re.M)
    return int(found.group(1), 8) & os.O_ACCMODE if found else -1


def _pipe_end_of(pidfd: int, fd: int, mode: int, what: str) -> int:
    """A copy of descriptor ``fd`` of an adopted process, checked to be a pipe opened with
    ``mode`` (``what`` names it in the refusal); the caller reopens it as it needs, then the
    copy is closed. What an instance left at a number is its word, so it is checked first."""
    got = linux.pidfd_getfd(pidfd, fd)
    try:
        kind = os.readlink(f"/proc/self/fd/{got}")
    except OSError:
        kind = ""
    if not kind.startswith("pipe:") or _open_mode(got) != mode:
        os.close(got)
        raise OSError(22, f"descriptor {fd} is {kind or 'unknown'}, not {what}")
    return got


def _host_bell_of(pidfd: int, fd: int) -> int:
    """The old host's doorbell (linux.host_doorbell), as the instance rings it: the write end
    of a pipe, whose read end died with that host. The new host opens the same pipe again and
    waits on it, for reading and writing (linux.doorbell_watch): its only other writers are
    the adopted instances, and once the last of them is gone (exited, killed, or restarted
    with the new host's doorbell; or an instance that put a pipe of its own there closed
    it) a read-only end would read end-of-file, readable at every poll: the new host spun.
    (An instance may have put a pipe of its own there: it can only wake the new host with
    it, as it could with the host's.)"""
    got = _pipe_end_of(pidfd, fd, os.O_WRONLY, "a host doorbell (the write end of a pipe)")
    try:
        return linux.doorbell_watch(got)
    finally:
        os.close(got)


def _doorbell_of(pidfd: int, fd: int) -> int:
    """A ring end for the instance's doorbell (linux.doorbell), made from the instance's own
    end: that must be a pipe open for reading and writing, which only the host can have made
    (an instance has no /proc and no writable directory for a FIFO); the ring end is the pipe
    opened again write-only, so that the peers the new host gives it to cannot read it."""
    got = _pipe_end_of(pidfd, fd, os.O_RDWR,
                       "the doorbell the host made (a pipe open for reading and writing)")
    try:
        return os.open(f"/proc/self/fd/{got}", os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    finally:
        os.close(got)


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def remove_abandoned(run_dir: str) -> int:
    """``mkctl shutdown`` of a machine whose host is gone (or ``init`` over one that cannot be
    adopted): kill what runs in its instances' cgroups, found by name (nothing else), remove
    the cgroups, the resctrl groups (at the default root, and at the state file's if it can be
    read) and the arena's name; works without a readable state file. Returns the processes
    killed."""
    killed = cgroups.kill_and_remove([d for _, d in
                                      cgroups.survivable_dirs(rundir.machine_key(run_dir))])
    state = read_state(run_dir)
    root = state["config"].get("resctrl_root") if state is not None else None
    for r in {llc.RESCTRL_ROOT, *([root] if isinstance(root, str) and os.path.isabs(root) else [])}:
        llc.Resctrl(r, prefix=resctrl_prefix(run_dir)).remove_groups()
    try:
        posix_ipc.unlink_shared_memory(arena_name(run_dir))
    except (posix_ipc.ExistentialError, ValueError):
        pass
    return killed
