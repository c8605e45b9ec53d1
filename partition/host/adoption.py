"""Kernels that outlive their host: the state a supervisor's machine keeps, and adoption.

On the real machine the spawned kernels keep their CPUs and memory when the host kernel fails.
Here, a supervisor's machine (``survive_host``) gives its instances no parent-death signal, keeps
its arena under a name (``/dev/shm/mk-arena-<run>``), leaves its cgroups where the next machine
will not reap them, and writes what it knows to ``<run-dir>/machine.json`` on every change. If
the supervisor dies, the instances run on: pinned, contained, messaging each other with the
doorbells they hold; messages to the host wait in its ring; consoles keep their lines.

A new host (``mkctl adopt``, or ``mkctl init`` on the same run directory) opens the arena by
name and rebuilds its tables from the state file, checked against the arena and the processes.
Every instance that was running is verified before it is adopted:

* its pid lives and started when the file says (``psutil`` create time, to the hundredth of a
  second), so a reused pid is never taken for it;
* the pid is in the instance's own cgroup, which the host made and the instance cannot leave
  (its cgroup filesystem is read-only in its namespace);
* the arena's peer table names that pid and that generation.

Then the host opens a pidfd for it and takes its doorbell and the old host doorbell with
``pidfd_getfd``; each must be an eventfd. An instance that fails a check is not adopted: the
processes in its cgroup are killed (they can only be its own), the pid itself is never
signalled, and it is recorded as failed with the reason. A parked (loaded) instance's process
is killed through its cgroup too; it is parked again at ``start``. Exit statuses of adopted
instances went to init, so their exits are recorded as "status unknown". Their doorbell channels
died with the old host, so an adopted instance cannot ask for doorbells of peers it did not
already know: messages to those still arrive, at its ring check (every 0.1 s).
"""

from __future__ import annotations

import json
import os
import selectors
import time
from typing import TYPE_CHECKING, Any

import posix_ipc
import psutil

from partition import linux
from partition.host.instance import EXIT, Instance, State
from partition.host.kimage import check_spec
from partition.host.pool import Reservation
from partition.host.recovery import RecoveryPolicy

if TYPE_CHECKING:
    from partition.host.machine import Machine

STATE_FILE = "machine.json"
STATE_VERSION = 1
#: how far the recorded start time of an adopted process may be from the one the kernel gives
START_TOLERANCE_S = 0.01


def arena_name(run_dir: str) -> str:
    """The POSIX shared-memory name of a survivable machine's arena."""
    base = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in os.path.basename(run_dir))
    return f"/mk-arena-{base}"[:200]


def state_path(run_dir: str) -> str:
    return os.path.join(run_dir, STATE_FILE)


def read_state(run_dir: str) -> dict[str, Any] | None:
    """The state a machine left, or None. Written by the host alone, in a directory only root
    reads (and every instance has covered), yet still shape-checked before use."""
    try:
        with open(state_path(run_dir)) as f:
            state = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(state, dict) or state.get("version") != STATE_VERSION or \
            not isinstance(state.get("instances"), list) or not isinstance(state.get("config"), dict):
        return None
    return state


def cgroup_bases(run_dir: str) -> dict[str, str] | None:
    state = read_state(run_dir)
    bases = state.get("cgroups") if state else None
    return {str(k): str(v) for k, v in bases.items()} if isinstance(bases, dict) else None


def abandoned(run_dir: str) -> bool:
    """A survivable machine whose host is gone: its state file and its arena remain."""
    state = read_state(run_dir)
    if state is None:
        return False
    try:
        posix_ipc.SharedMemory(str(state.get("arena")), 0).close_fd()
    except (posix_ipc.ExistentialError, ValueError):
        return False
    return True


def _start_time(pid: int) -> float:
    try:
        return float(psutil.Process(pid).create_time())
    except psutil.Error:
        return 0.0


def save_state(m: Machine) -> None:
    """Everything a new host needs to adopt this machine's instances, written atomically."""
    instances = []
    for inst in m.instances.values():
        k = inst.kimage
        instances.append({
            "id": inst.id, "name": inst.name, "cpus": inst.cpus,
            "physical_cpus": inst.physical_cpus, "memory_base": inst.memory_base,
            "memory_bytes": inst.memory_bytes, "extra_regions": inst.extra_regions,
            "state": inst.state.value, "pid": inst.pid,
            "pid_start": inst.pid_start if inst.pid else 0.0,
            "generation": inst.generation, "cmd_seq": inst.cmd_seq, "boots": inst.boots,
            "child_fds": list(inst.child_fds),
            "kimage": {"spec": k.spec, "cmdline": k.cmdline, "label": k.label,
                       "source": k.source} if k else None,
            "recovery": inst.recovery.to_dict(), "counters": inst.counters,
            "standby_for": inst.standby_for,
        })
    cfg = m.config
    state = {
        "version": STATE_VERSION, "arena": m.arena.shm_name, "host_pid": os.getpid(),
        "config": {"cpus": cfg.cpus, "memory": cfg.memory_bytes, "host_cpus": cfg.host_cpus,
                   "oversubscribe": cfg.oversubscribe,
                   "console_bytes": m.layout.console_bytes, "ring_slots": m.layout.ring_slots,
                   "ring_slot_bytes": m.layout.ring_slot_bytes,
                   "kill_timeout": m.kill_timeout, "protection": m.protection},
        "cgroups": m.cgroups.bases, "instances": instances,
    }
    path = state_path(m.run_dir)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(state, f)
    os.replace(tmp, path)


def adopt(m: Machine) -> None:
    """Take over the instances the state file names (see the module's docstring)."""
    t0 = time.monotonic()
    state = read_state(m.run_dir)
    assert state is not None
    adopted, refused = [], []
    for rec in state["instances"]:
        inst = _rebuild(m, rec)
        if inst is None:
            continue
        why = None
        if rec.get("state") == "active" and isinstance(rec.get("pid"), int):
            why = _take(m, inst, rec)
            if why is None:
                adopted.append(inst.name)
                continue
            refused.append({"name": inst.name, "why": why})
        elif rec.get("state") in ("loaded", "active", "failed"):
            m.cgroups.kill(inst.id)            # a parked process: parked again at start
        inst.state = State.LOADED if inst.kimage else State.READY
        if why is not None:
            inst.failure = f"not adopted: {why}"
            inst.state = State.FAILED if inst.kimage else State.READY
            m.cgroups.kill(inst.id)
        m.arena.peer(inst.id).peer_state = 0
        m.arena.peer(inst.id).pid = 0
    ms = round((time.monotonic() - t0) * 1e3, 3)
    m.adopt_ms = ms
    m.events.info("adopted", instances=adopted, refused=refused, adopt_ms=ms,
                  previous_host=state.get("host_pid"))
    m.printk(f"multikernel: adopted {len(adopted)} running instance(s) in {ms} ms"
             + (f", refused {len(refused)}" if refused else ""))


def _rebuild(m: Machine, rec: dict[str, Any]) -> Instance | None:
    try:
        iid, name = int(rec["id"]), str(rec["name"])
        cpus = [int(c) for c in rec["cpus"]]
        base, size = int(rec["memory_base"]), int(rec["memory_bytes"])
        extra = [(int(b), int(s)) for b, s in rec.get("extra_regions") or []]
    except (KeyError, TypeError, ValueError):
        m.events.warning("adopt_bad_record", record=str(rec)[:200])
        return None
    pool_lo = m.layout.pool_offset
    m.pool.commit(Reservation(iid, name, cpus, base - pool_lo, size))
    for b, s in extra:
        m.pool.add_range(name, b - pool_lo, s)
    rp = rec.get("recovery") or {}
    policy = RecoveryPolicy.build(str(rp.get("policy", "none")), int(rp.get("max_restarts", 3)),
                                  float(rp.get("restart_window", 5.0)),
                                  float(rp.get("watchdog", 0.0)),
                                  bool(rp.get("preserve_memory", False)))
    inst = Instance(id=iid, name=name, cpus=cpus,
                    physical_cpus=[m.config.physical_ids.get(c, c) for c in cpus],
                    memory_base=base, memory_bytes=size, recovery=policy,
                    standby_for=rec.get("standby_for"))
    inst.extra_regions = extra
    inst.boots = int(rec.get("boots", 0))
    inst.generation = int(rec.get("generation", 0))
    # the host's command numbering goes on: a kernel obeys only numbers past its last
    inst.cmd_seq = max(int(rec.get("cmd_seq", 0)), m.arena.peer(iid).cmd_seq)
    counters = rec.get("counters")
    if isinstance(counters, dict):
        for k, v in counters.items():
            if k in inst.counters and isinstance(v, int):
                inst.counters[k] = v
    k = rec.get("kimage")
    if isinstance(k, dict):
        inst.kimage = check_spec(k.get("spec"), k.get("cmdline", ""))
        inst.kimage.label = str(k.get("label", ""))
        inst.kimage.source = str(k.get("source", ""))
    m.instances[name] = inst
    return inst


def _take(m: Machine, inst: Instance, rec: dict[str, Any]) -> str | None:
    """Verify a running instance and take its descriptors; None when adopted, else why not."""
    pid = int(rec["pid"])
    start = _start_time(pid)
    if not start:
        return f"pid {pid} is gone"
    if abs(start - float(rec.get("pid_start") or 0)) > START_TOLERANCE_S:
        return f"pid {pid} is another process now (it started at {start}, not {rec.get('pid_start')})"
    procs = m.cgroups.procs_files(inst.id)
    if procs and not any(str(pid) in _read(p).split() for p in procs):
        return f"pid {pid} is not in the instance's cgroup"
    peer = m.arena.peer(inst.id)
    if peer.pid != pid or peer.generation != inst.generation:
        return f"the peer table says pid {peer.pid}, generation {peer.generation}"
    try:
        pidfd = linux.pidfd_open(pid)
    except OSError as exc:
        return f"pidfd_open: {exc.strerror}"
    fds = rec.get("child_fds") or [-1, -1]
    try:
        doorbell = _eventfd_of(pidfd, int(fds[0]))
        host_bell = _eventfd_of(pidfd, int(fds[1]))
    except OSError as exc:
        os.close(pidfd)
        return f"its doorbells: {exc.strerror}"
    if _start_time(pid) != start:                       # it died meanwhile: the fds are stale
        os.close(pidfd)
        os.close(doorbell)
        os.close(host_bell)
        return f"pid {pid} exited during adoption"
    inst.pid, inst.pidfd, inst.doorbell_fd, inst.pid_start = pid, pidfd, doorbell, start
    inst.child_fds = (int(fds[0]), int(fds[1]))
    inst.adopted = True
    inst.state = State.ACTIVE
    m.selector.register(pidfd, selectors.EVENT_READ, (EXIT, inst))
    m.selector.register(host_bell, selectors.EVENT_READ, None)
    m.extra_host_doorbells.append(host_bell)
    return None


def _eventfd_of(pidfd: int, fd: int) -> int:
    got = linux.pidfd_getfd(pidfd, fd)
    try:
        kind = os.readlink(f"/proc/self/fd/{got}")
    except OSError:
        kind = ""
    if kind != "anon_inode:[eventfd]":
        os.close(got)
        raise OSError(22, f"descriptor {fd} is {kind or 'unknown'}, not an eventfd")
    os.set_blocking(got, False)
    return got


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def remove_abandoned(run_dir: str) -> int:
    """``mkctl shutdown`` of a machine whose host is gone: kill what runs in its instances'
    cgroups (nothing else), remove the cgroups and the arena's name; returns processes killed."""
    from partition.host.cgroups import kill_and_remove
    state = read_state(run_dir)
    if state is None:
        return 0
    killed = kill_and_remove(cgroup_bases(run_dir) or {})
    try:
        posix_ipc.unlink_shared_memory(str(state.get("arena")))
    except (posix_ipc.ExistentialError, ValueError):
        pass
    return killed
