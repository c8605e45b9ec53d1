"""Abandoned machines for the adoption red-team suites (test_survival_hostile.py,
test_survival_state.py): a survivable machine built with ``mkctl init`` whose supervisor is
SIGKILLed, and the scrub that removes what is left of it (its recorded instances by pid, never
by name, whatever runs in its own cgroups, those cgroups, its arena and its run directory)."""

import glob
import itertools
import json
import mmap
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import posix_ipc
import psutil

from partition.control.client import Client
from partition.host import adoption, rundir
from partition.host.cgroups import kill_and_remove
from partition.host.pool import NAME_RE

HERE = os.path.dirname(os.path.abspath(__file__))
ADOPTEE = os.path.join(HERE, "kernels", "adoptee.py") + ":Adoptee"
IDLE = "kernels.idle:IdleKernel"
MKCTL = [sys.executable, "-m", "partition.control.cli"]
CPUS = sorted(os.sched_getaffinity(0))
POOL = str(CPUS[-1])
HOST = ",".join(map(str, CPUS[:-1])) or "none"
LEAK_COUNT = 0x5EED                       # tests/kernels/adoptee.py, attack=leak

def mk(run_dir, *args, timeout=60):
    return subprocess.run(MKCTL + [args[0], "--run-dir", run_dir, *args[1:]], capture_output=True,
                          text=True, timeout=timeout)


def ok(r):
    assert r.returncode == 0, f"{r.args[3:]}: exit {r.returncode}\n{r.stdout}\n{r.stderr}"
    return r


def no_traceback(r):
    out = r.stdout + r.stderr
    assert "Traceback" not in out, f"the supervisor crashed with a traceback:\n{out[-3000:]}"


def alive(pid):
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def until(cond, timeout=5.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"{what}: not met in {timeout} s"
        time.sleep(0.02)


def _cgroup_parents():
    """Where this process's machines make their cgroups (the daemons inherit our cgroups)."""
    out = []
    with open("/proc/self/cgroup") as f:
        for line in f:
            _, ctrls, path = line.rstrip("\n").split(":", 2)
            for c in ctrls.split(",") if ctrls else [""]:
                if c in ("cpuset", "memory", "pids", "freezer", ""):
                    out.append(os.path.join("/sys/fs/cgroup", c, path.lstrip("/")))
    return out


def _procs(base):
    pids = set()
    for d in glob.glob(os.path.join(glob.escape(base), "i*")):
        try:
            with open(os.path.join(d, "cgroup.procs")) as f:
                pids |= {int(p) for p in f.read().split()}
        except (OSError, ValueError):
            pass
    return {p for p in pids if alive(p)}


class Abandoned:
    """A survivable machine in ``run_dir`` whose supervisor was SIGKILLed; what its state file
    said then (``state``, ``bases``) is kept here, whatever a test writes over it."""

    def __init__(self, run_dir):
        self.run_dir = run_dir
        self.key = rundir.machine_key(run_dir)
        self.arena = adoption.arena_name(run_dir)
        self.pids: dict[str, int] = {}
        self.bases: dict[str, str] = {}
        self.state = None

    def build(self, kernels, init_args=()):
        ok(mk(self.run_dir, "init", "--cpus", POOL, "--host-cpus", HOST, "--memory", "64M",
              "--oversubscribe", *init_args))
        c = Client(self.run_dir)
        for name, spec, cmdline, *start in kernels:
            c.call("create", name=name, memory="8M", cpus=POOL)
            if spec:
                c.call("load", name=name, kernel=spec, cmdline=cmdline)
                if start != [False]:
                    c.call("start", name=name)
        self.before = c.call("show")
        self.pids = {i["name"]: i["pid"] for i in self.before["instances"] if i["pid"]}
        self.crash()
        self.state = adoption.read_state(self.run_dir)
        if self.state is not None:
            self.bases = dict(self.state["cgroups"])
        return self

    @property
    def state_file(self):
        return adoption.state_path(self.run_dir)

    def crash(self):
        pid = self.host_pid = Client(self.run_dir).call("ping")["pid"]
        os.kill(pid, signal.SIGKILL)
        until(lambda: not alive(pid), what="the supervisor's death")
        return pid

    def write_state(self, state):
        adoption.write_state(self.run_dir, state)

    def copy(self):
        return json.loads(json.dumps(self.state))

    def show(self):
        return Client(self.run_dir).call("show")

    def by_name(self):
        return {i["name"]: i for i in self.show()["instances"]}

    # -- what the instances say in their partitions, read from the arena, with no host -------
    def mark(self, name):
        rec = next(i for i in self.state["instances"] if i["name"] == name)
        shm = posix_ipc.SharedMemory(self.arena)
        try:
            m = mmap.mmap(shm.fd, os.fstat(shm.fd).st_size, prot=mmap.PROT_READ)
        finally:
            shm.close_fd()
        try:
            return m[rec["memory_base"]:rec["memory_base"] + 32].split(b"\0")[0]
        finally:
            m.close()

    def wait_marks(self, names, what):
        for name in names:
            until(lambda name=name: self.mark(name) == b"MKADOPT:" + what, 10,
                  f"{name} says {what!r} in its partition")

    # -- what is left -------------------------------------------------------------------------
    def cgroup_dirs(self):
        dirs = {b for b in self.bases.values() if os.path.isdir(b)}
        for parent in _cgroup_parents():
            dirs |= set(glob.glob(os.path.join(glob.escape(parent), f"multikernel-*-{self.key}")))
        return dirs

    def members(self):
        """Live processes in the machine's instance cgroups."""
        out = set()
        for d in self.cgroup_dirs():
            out |= _procs(d)
        return out

    def leftovers(self):
        left = [self.run_dir] if os.path.exists(self.run_dir) else []
        if os.path.exists("/dev/shm" + self.arena):
            left.append(f"arena {self.arena}")
        left += sorted(self.cgroup_dirs())
        left += [f"instance {n} (pid {p})" for n, p in self.pids.items() if alive(p)]
        return left

    def assert_gone(self):
        until(lambda: not self.leftovers(), 1.5, f"nothing left (left: {self.leftovers()})")

    def scrub(self):
        """Remove whatever is left, found or not: a bug a test shows must not leak."""
        if os.path.isdir(self.run_dir):
            owner = rundir.live_owner(self.run_dir)
            if owner and owner > 0:
                os.kill(owner, signal.SIGKILL)
                until(lambda: not alive(owner), what="the supervisor's death")
        for pid in set(self.pids.values()) | self.members():
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        kill_and_remove(list(self.bases.values()))
        for d in self.cgroup_dirs():
            kill_and_remove([d])
        try:
            posix_ipc.unlink_shared_memory(self.arena)
        except posix_ipc.ExistentialError:
            pass
        shutil.rmtree(self.run_dir, ignore_errors=True)
        until(lambda: not [p for p in self.pids.values() if alive(p)], what="instances killed")

def sane(snap):
    """What create would have refused is not in the adopted machine."""
    pool = snap["pool"]
    lo, hi = pool["memory_base"], pool["memory_base"] + pool["memory_bytes"]
    regions = []
    for i in snap["instances"]:
        assert NAME_RE.match(i["name"]) and i["name"] != "host", f"name {i['name']!r} adopted"
        assert 1 <= i["id"] < 512, f"id {i['id']} adopted"
        assert set(i["cpus"]) <= set(pool["cpus"]), f"{i['name']}: CPUs {i['cpus']} outside the pool"
        for base, size in i["regions"]:
            assert lo <= base and base + size <= hi, \
                f"{i['name']}: partition {base:#x}+{size:#x} outside the pool {lo:#x}..{hi:#x}"
            regions.append((base, base + size, i["name"]))
    assert len({i["id"] for i in snap["instances"]}) == len(snap["instances"]), "an id adopted twice"
    regions.sort()
    for (_, end, a), (start, _, b) in itertools.pairwise(regions):
        assert end <= start, f"the partitions of {a!r} and {b!r} overlap"


def eventfd_counts(pid):
    out = []
    for fd in os.listdir(f"/proc/{pid}/fdinfo"):
        try:
            with open(f"/proc/{pid}/fdinfo/{fd}") as f:
                m = re.search(r"eventfd-count:\s*([0-9a-f]+)", f.read())
        except OSError:
            continue
        if m:
            out.append(int(m.group(1), 16))
    return out
