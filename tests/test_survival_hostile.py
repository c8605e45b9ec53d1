"""Adoption under attack (host/adoption.py): hostile instances that tamper with the descriptors a
new host takes from them, or die while it takes them; a state file that is corrupt, torn, or
names what is not the machine's; an arena gone or resized; adopts that race; a host adopted,
killed and adopted again; and a machine whose instances die with their host.

Every test builds a survivable machine with ``mkctl init``, SIGKILLs its supervisor, does its
damage, and runs ``mkctl adopt`` / ``init`` / ``shutdown`` as an operator would. Whatever a test
found, the ``machines`` fixture then removes what is left of its machine: the instances it
recorded (by pid, never by name) and whatever runs in the machine's own cgroups, those cgroups,
its arena and its run directory; conftest's leak checks look after that.

These tests found twelve bugs (an adopted host spinning on an undrained doorbell, a failed
adoption deleting the state file, paths and records from the file trusted as they were, a
descriptor leaked on a refusal, ...); each is fixed, and its test is a regression test now."""

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
import tempfile
import time
import uuid

import posix_ipc
import psutil
import pytest

from partition.control.client import Client
from partition.errors import MKError
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

pytestmark = [pytest.mark.system, pytest.mark.slow]      # a red-team suite of whole machines: 45 s


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


@pytest.fixture
def machines(run_dir):
    made = []

    def build(kernels, init_args=()):
        m = Abandoned(run_dir)
        made.append(m)
        return m.build(kernels, init_args)

    yield build
    for m in made:
        m.scrub()


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


# -- hostile instances ---------------------------------------------------------------------------
def test_descriptors_swapped_while_the_host_was_dead_are_refused_and_harm_nobody(machines):
    """While the host is dead, instances put a pipe where their doorbell was, a memfd where
    the host doorbell was, an eventfd of their own where the host doorbell was, and garbage in
    their own pages and the host's ring: the first two are refused (not the pipes the host
    made) and killed through their cgroups, the others harm nobody, and the honest instance next to them is
    adopted, heard and commanded as before."""
    m = machines([("good", "kernels.counter:CounterKernel", "interval=0.01 report=10"),
                  ("pipe", ADOPTEE, "attack=pipe-doorbell"),
                  ("memfd", ADOPTEE, "attack=memfd-hostbell"),
                  ("evhost", ADOPTEE, "attack=eventfd-hostbell"),
                  ("scribble", ADOPTEE, "attack=scribble")])
    m.wait_marks(["pipe", "memfd", "evhost", "scribble"], b"done")
    adopted_at = time.time()
    r = mk(m.run_dir, "adopt")
    no_traceback(r)
    assert "adopted the machine" in ok(r).stdout
    inst = m.by_name()
    for name, why in (("pipe", "not the doorbell the host made"), ("memfd", "not a host doorbell")):
        assert inst[name]["state"] == "failed", inst[name]
        assert "not adopted" in inst[name]["failure"] and why in inst[name]["failure"]
        until(lambda name=name: not alive(m.pids[name]), what=f"{name} killed")
    assert inst["good"]["state"] == "active" and inst["good"]["pid"] == m.pids["good"]
    assert inst["evhost"]["state"] in ("active", "failed")
    assert inst["scribble"]["state"] in ("active", "failed")
    running = {i["pid"] for i in inst.values() if i["pid"]}
    until(lambda: m.members() <= running, what="only adopted instances run in the cgroups")

    c = Client(m.run_dir)
    # the honest instance's messages to the host (a heartbeat a second) reach the new host
    until(lambda: (c.call("show", name="good")["last_heartbeat"] or 0) > adopted_at, 3,
          "a heartbeat of the honest instance heard by the new host")

    def count():
        return max(map(int, re.findall(r"count=(\d+)", c.call("console", name="good"))), default=0)

    then = count()
    until(lambda: count() >= then + 20, what="the honest instance's console goes on")
    t0 = time.monotonic()
    out = c.call("kill", name="good", timeout=5)
    assert out["last_exit"]["how"] == "graceful" and time.monotonic() - t0 < 4, out["last_exit"]
    assert not alive(m.pids["good"])
    for name in ("evhost", "scribble"):
        if inst[name]["state"] == "active":
            out = c.call("kill", name=name, timeout=2)
            assert out["state"] == "loaded" and not alive(m.pids[name]), out
    ok(mk(m.run_dir, "shutdown"))
    m.assert_gone()


def test_a_refused_instance_leaves_no_descriptor_in_the_new_host(machines):
    m = machines([("leak", ADOPTEE, "attack=leak")])
    m.wait_marks(["leak"], b"done")
    r = mk(m.run_dir, "adopt")
    no_traceback(r)
    ok(r)
    snap = m.show()
    assert snap["instances"][0]["state"] == "failed"
    counts = eventfd_counts(snap["machine"]["supervisor_pid"])
    assert LEAK_COUNT not in counts, "the refused instance's eventfd is held by the new host"
    adopted = sum(1 for i in snap["instances"] if i["state"] == "active")
    # doorbells are pipes (linux.doorbell, host_doorbell): the new host holds no eventfd at all
    assert counts == [], f"eventfds in the new host: {counts} ({adopted} adopted)"
    ok(mk(m.run_dir, "shutdown"))
    m.assert_gone()


def test_an_instance_that_exits_while_it_is_being_adopted(machines):
    """It watches the host's peer entry, which a new host writes just before it adopts, and
    exits at once: adoption goes on, it is recorded, not taken, and its neighbour is adopted.
    Another tried to fork while its host was dead (seccomp killed it): refused, recorded."""
    m = machines([("x", ADOPTEE, "attack=exit-at-adoption"), ("y", ADOPTEE, ""),
                  ("f", ADOPTEE, "attack=fork")])
    m.wait_marks(["x", "f"], b"armed")
    until(lambda: not alive(m.pids["f"]), what="f killed for its fork")
    r = mk(m.run_dir, "adopt")
    no_traceback(r)
    ok(r)
    until(lambda: not alive(m.pids["x"]), what="x gone")
    inst = m.by_name()
    assert inst["y"]["state"] == "active" and inst["y"]["pid"] == m.pids["y"]
    assert inst["f"]["state"] == "failed" and "not adopted" in inst["f"]["failure"], inst["f"]
    x = inst["x"]
    assert x["pid"] is None, x
    if x["state"] == "failed":             # refused mid-way: it died between two checks
        assert "not adopted" in x["failure"]
    else:                                  # adopted, then its exit seen through its pidfd
        assert x["state"] == "loaded" and x["last_exit"] is not None, x
    assert Client(m.run_dir).call("ping")["pid"] == m.show()["machine"]["supervisor_pid"]
    ok(mk(m.run_dir, "shutdown"))
    m.assert_gone()


def test_the_new_host_sleeps_when_nothing_happens(machines):
    m = machines([("idle", IDLE, "")])             # tickless: nothing rings anyone
    ok(mk(m.run_dir, "adopt"))
    sup = psutil.Process(m.show()["machine"]["supervisor_pid"])
    time.sleep(0.5)
    t0 = sum(sup.cpu_times()[:2])
    time.sleep(1.0)
    used = sum(sup.cpu_times()[:2]) - t0
    assert used < 0.3, f"the adopted host used {used:.2f} s of CPU in 1 s with nothing to do"


# -- the state file ------------------------------------------------------------------------------
def _rec(i, **changes):
    def mutate(st):
        st["instances"][i].update(changes)
    return mutate


def _pid_string(st):
    st["instances"][0]["pid"] = str(st["instances"][0]["pid"])


def _overlap(st):
    st["instances"][1]["memory_base"] = st["instances"][0]["memory_base"]


def _same_name(st):
    st["instances"][1]["name"] = st["instances"][0]["name"]


RECORDS = [
    pytest.param(1, _pid_string, id="pid-as-string"),
    pytest.param(1, _rec(0, pid=-5), id="negative-pid"),
    pytest.param(1, _rec(0, cpus=[99]), id="cpu-outside-the-pool"),
    pytest.param(1, _rec(0, memory_base=1 << 40), id="partition-past-the-arena"),
    pytest.param(2, _overlap, id="overlapping-partitions"),
    pytest.param(2, _same_name, id="duplicate-name"),
    pytest.param(1, _rec(0, state="ready", kimage=None), id="one-change-behind"),
]


@pytest.mark.parametrize(("n", "mutate"), RECORDS)
def test_a_corrupt_record_is_refused_not_trusted(machines, n, mutate):
    """Adopt what is valid, refuse the rest (or the whole file) with a clear error; never a
    traceback; never a process left in the instance cgroups that the new host does not run;
    and mkctl shutdown removes everything."""
    m = machines([(f"k{i}", IDLE, "") for i in range(n)])
    st = m.copy()
    mutate(st)
    m.write_state(st)
    r = mk(m.run_dir, "adopt")
    no_traceback(r)
    if r.returncode == 0:
        snap = m.show()
        sane(snap)
        running = {i["pid"] for i in snap["instances"] if i["pid"]}
        until(lambda: m.members() <= running, 1,
              "every process in the instance cgroups is one the new host runs")
    else:
        assert "error:" in r.stderr and os.path.exists(m.state_file), r.stderr
    ok(mk(m.run_dir, "shutdown"))
    m.assert_gone()


def test_an_unreadable_record_is_refused_and_its_neighbours_adopted(machines):
    """One record per instance (machine.d/<id>.json): a torn or garbage record refuses its
    own instance (its cgroup's processes killed), not the machine; what else lies in the
    directory is not a record."""
    m = machines([("k0", IDLE, ""), ("k1", IDLE, "")])
    rec = next(r for r in m.state["instances"] if r["name"] == "k1")
    d = adoption.records_path(m.run_dir)
    with open(os.path.join(d, f"{rec['id']}.json"), "w") as f:
        f.write('{"id": ')
    with open(os.path.join(d, "junk.txt"), "w") as f:
        f.write("not a record")
    r = mk(m.run_dir, "adopt")
    no_traceback(r)
    ok(r)
    inst = m.by_name()
    assert inst["k0"]["state"] == "active" and inst["k0"]["pid"] == m.pids["k0"]
    assert "k1" not in inst
    until(lambda: not alive(m.pids["k1"]), 5, "k1 killed with its cgroup")
    ok(mk(m.run_dir, "shutdown"))
    m.assert_gone()


BAD_FIELDS = [
    pytest.param({"pid_start": "soon"}, "pid_start", id="start-as-text"),
    pytest.param({"pid_start": [1]}, "pid_start", id="start-as-list"),
    pytest.param({"pid_start": float("nan")}, "pid_start", id="start-nan"),   # matched any start
    pytest.param({"extra_regions": 5}, "extra_regions", id="regions-as-number"),
    pytest.param({"recovery": {"max_restarts": float("inf")}}, "recovery", id="restarts-inf"),
]


@pytest.mark.parametrize(("change", "field"), BAD_FIELDS)
def test_one_bad_field_refuses_its_record_and_the_rest_is_adopted(machines, change, field):
    """Red team: ``pid_start: "soon"`` (or ``[1]``) in one instance's record made ``mkctl
    adopt`` fail EIO and adopt nobody. Every field is type-checked before use: that record is
    refused, its instance killed through its cgroup, the rest adopted."""
    m = machines([("k0", IDLE, ""), ("k1", IDLE, "")])
    st = m.copy()
    next(r for r in st["instances"] if r["name"] == "k1").update(change)
    m.write_state(st)
    r = mk(m.run_dir, "adopt")
    no_traceback(r)
    ok(r)
    inst = m.by_name()
    assert inst["k0"]["state"] == "active" and inst["k0"]["pid"] == m.pids["k0"]
    assert "k1" not in inst
    until(lambda: not alive(m.pids["k1"]), 5, "k1 killed with its cgroup")
    with open(os.path.join(m.run_dir, rundir.EVENTS)) as f:
        adopted = [json.loads(line) for line in f if '"adopted"' in line][-1]
    assert adopted["instances"] == ["k0"]
    assert [x["name"] for x in adopted["refused"]] == ["k1"]
    assert adopted["refused"][0]["why"].startswith(f"bad record: {field} ")
    ok(mk(m.run_dir, "shutdown"))
    m.assert_gone()


def test_a_name_in_the_state_file_is_never_a_path(machines):
    victim = tempfile.mkdtemp(prefix="mkt-victim-")
    try:
        with open(os.path.join(victim, "precious"), "w") as f:
            f.write("keep me\n")
        m = machines([("v", None, None)])          # created only: ready, no process
        st = m.copy()
        st["instances"][0]["name"] = os.path.relpath(
            victim, os.path.join(m.run_dir, "sys", "fs", "multikernel", "instances"))
        m.write_state(st)
        r = mk(m.run_dir, "adopt")
        no_traceback(r)
        if r.returncode == 0:
            try:
                Client(m.run_dir).call("delete", name=st["instances"][0]["name"])
            except MKError:
                pass
        assert os.path.exists(os.path.join(victim, "precious")), "the victim directory was removed"
        assert os.listdir(victim) == ["precious"], f"written outside the run directory: {victim}"
    finally:
        shutil.rmtree(victim, ignore_errors=True)


def test_shutdown_of_an_abandoned_machine_touches_only_what_is_its_own(machines):
    if os.path.isdir("/sys/fs/cgroup/pids"):
        hierarchy, key = "/sys/fs/cgroup/pids", "pids"
    elif os.path.exists("/sys/fs/cgroup/cgroup.controllers"):
        hierarchy, key = "/sys/fs/cgroup", ""
    else:
        pytest.skip("no cgroups")
    tag = uuid.uuid4().hex[:8]
    victim_cg = os.path.join(hierarchy, f"mkt-victim-{tag}")
    victim_shm = f"/mkt-victim-{tag}"
    sleeper = None
    try:
        os.makedirs(os.path.join(victim_cg, "i1"))
        sleeper = subprocess.Popen(["sleep", "60"])
        with open(os.path.join(victim_cg, "i1", "cgroup.procs"), "w") as f:
            f.write(str(sleeper.pid))
        posix_ipc.SharedMemory(victim_shm, posix_ipc.O_CREX, size=4096).close_fd()
        m = machines([("k0", IDLE, "")])
        st = m.copy()
        st["cgroups"], st["arena"] = {key: victim_cg}, victim_shm
        m.write_state(st)
        mk(m.run_dir, "shutdown")
        time.sleep(0.1)
        assert sleeper.poll() is None, "mkctl shutdown killed a process outside the machine"
        assert os.path.isdir(victim_cg), "mkctl shutdown removed a cgroup not the machine's"
        assert os.path.exists("/dev/shm" + victim_shm), "mkctl shutdown unlinked a foreign shm"
    finally:
        if sleeper is not None:
            sleeper.kill()
            sleeper.wait()
        for d in (os.path.join(victim_cg, "i1"), victim_cg):
            for _ in range(100):
                try:
                    os.rmdir(d)
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.01)
        try:
            posix_ipc.unlink_shared_memory(victim_shm)
        except posix_ipc.ExistentialError:
            pass


def _truncate(m):
    with open(m.state_file) as f:
        text = f.read()
    with open(m.state_file, "w") as f:
        f.write(text[:len(text) // 2])


def _newer(m):
    st = m.copy()
    st["version"] = adoption.STATE_VERSION + 1
    m.write_state(st)


def _no_arena(m):
    posix_ipc.unlink_shared_memory(m.arena)


@pytest.mark.parametrize("damage", [_truncate, _newer], ids=["truncated", "newer-version"])
def test_an_unreadable_state_file_still_lets_shutdown_remove_the_machine(machines, damage):
    m = machines([("k0", IDLE, "")])
    damage(m)
    r = mk(m.run_dir, "adopt")
    no_traceback(r)
    assert r.returncode != 0 and "no machine to adopt" in r.stderr, r.stderr
    mk(m.run_dir, "shutdown")
    m.assert_gone()


@pytest.mark.parametrize("damage", [_truncate, _no_arena], ids=["truncated", "arena-gone"])
def test_init_over_a_broken_abandoned_machine_ends_its_instances(machines, damage):
    m = machines([("k0", IDLE, "")])
    damage(m)
    r = mk(m.run_dir, "init", "--cpus", POOL, "--host-cpus", HOST, "--memory", "64M",
           "--oversubscribe")
    no_traceback(r)
    ok(r)
    until(lambda: not alive(m.pids["k0"]), 1, "the old machine's instance ended")
    ok(mk(m.run_dir, "shutdown"))
    m.assert_gone()


def _config_key(m):
    st = m.copy()
    st["config"]["bogus"] = 1
    m.write_state(st)


def _config_value(m):
    st = m.copy()
    st["config"]["memory"] = "lots"
    m.write_state(st)


def _small_arena(m):
    posix_ipc.unlink_shared_memory(m.arena)
    posix_ipc.SharedMemory(m.arena, posix_ipc.O_CREX, mode=0o600, size=4096).close_fd()


def test_an_unknown_config_key_is_ignored(machines):
    m = machines([("k0", IDLE, "")])
    _config_key(m)
    r = mk(m.run_dir, "adopt")
    no_traceback(r)
    ok(r)
    assert m.show()["instances"][0]["pid"] == m.pids["k0"]
    ok(mk(m.run_dir, "shutdown"))
    m.assert_gone()


@pytest.mark.parametrize("damage", [_config_value, _small_arena],
                         ids=["bad-config-value", "arena-too-small"])
def test_a_refused_adoption_leaves_the_machine_to_shutdown(machines, damage):
    m = machines([("k0", IDLE, "")])
    damage(m)
    r = mk(m.run_dir, "adopt")
    assert r.returncode != 0 and "error:" in r.stderr, r.stderr
    assert os.path.exists(m.state_file), "the refused adoption removed machine.json"
    no_traceback(r)
    ok(mk(m.run_dir, "shutdown"))
    m.assert_gone()


def test_a_machine_whose_arena_is_gone_is_refused_and_removed(machines):
    m = machines([("k0", IDLE, "")])
    _no_arena(m)
    r = mk(m.run_dir, "adopt")
    no_traceback(r)
    assert r.returncode != 0 and "no machine to adopt" in r.stderr, r.stderr
    assert alive(m.pids["k0"]) and os.path.exists(m.state_file)
    assert "stale" in ok(mk(m.run_dir, "shutdown")).stdout
    m.assert_gone()


# -- adopts that race, repeat, and a machine that does not survive its host -------------------------
def test_adoption_is_exclusive_and_repeatable(machines):
    """Three adopts at once: one wins, the others are refused, nothing is adopted twice. Then a
    crash that leaves a torn machine.json.tmp (its write is a rename), ``mkctl init`` on the run
    directory (it adopts, and says so), and a kill of the adopted host and a second adoption."""
    m = machines([("a", IDLE, ""), ("b", IDLE, ""), ("c", IDLE, "", False)])   # c: parked
    procs = [subprocess.Popen(MKCTL + ["adopt", "--run-dir", m.run_dir], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(3)]
    results = [(p.communicate(timeout=60), p.returncode) for p in procs]
    won = [out for out, rc in results if rc == 0]
    lost = [out for out, rc in results if rc != 0]
    assert len(won) == 1, results
    for _, err in lost:
        assert "already running" in err and "Traceback" not in err, err
    with open(os.path.join(m.run_dir, "events.log")) as f:
        events = [json.loads(line) for line in f]
    assert [sorted(e["instances"]) for e in events if e["event"] == "adopted"] == [["a", "b"]]
    daemons = [p.pid for p in psutil.process_iter(["cmdline"])      # titled mk-host <run>
               if " ".join(p.info["cmdline"] or ()).strip() == f"mk-host {m.run_dir}"
               and p.pid not in m.pids.values() and alive(p.pid)]
    assert len(daemons) == 1, f"supervisors of {m.run_dir}: {daemons}"

    def pids():
        return {i["name"]: (i["pid"], i["state"]) for i in m.show()["instances"]}

    want = {n: (p, "active") for n, p in m.pids.items()} | {"c": (None, "loaded")}
    assert pids() == want
    until(lambda: m.members() <= set(m.pids.values()), what="c's parked process killed")
    c = Client(m.run_dir)
    c.call("start", name="c")                              # parked again, and started
    want["c"] = (c.call("show", name="c")["pid"], "active")
    assert want["c"][0] and pids() == want
    m.pids["c"] = want["c"][0]

    m.crash()
    with open(m.state_file) as f:
        torn = f.read()[:100]
    with open(m.state_file + ".tmp", "w") as f:        # a crash in the middle of save_state
        f.write(torn)
    r = mk(m.run_dir, "init", "--cpus", POOL, "--host-cpus", HOST, "--memory", "32M")
    no_traceback(r)
    assert "adopted it" in ok(r).stderr
    assert pids() == want
    assert m.show()["pool"]["memory_bytes"] == 64 << 20      # its pool, not the one asked for

    m.crash()                                              # adoption of an adopted machine
    assert "adopted the machine" in ok(mk(m.run_dir, "adopt")).stdout
    assert pids() == want
    assert c.call("kill", name="a", timeout=5)["last_exit"]["how"] == "graceful"
    ok(mk(m.run_dir, "shutdown"))
    m.assert_gone()


def test_without_survive_host_instances_die_with_their_host(machines):
    m = machines([("k0", IDLE, "")], init_args=("--no-survive-host",))
    until(lambda: not alive(m.pids["k0"]), 5, "the instance's death with its host")
    # its cgroups are reaped as a dead machine's once its supervisor is reaped (by init here,
    # which may take a second: cgroups.reap_stale takes a zombie owner for a live one)
    until(lambda: not psutil.pid_exists(m.host_pid), 5, "the supervisor reaped")
    assert m.state is None and not os.path.exists("/dev/shm" + m.arena)
    r = mk(m.run_dir, "adopt")
    no_traceback(r)
    assert r.returncode != 0 and "no machine to adopt" in r.stderr, r.stderr
    assert "stale" in ok(mk(m.run_dir, "shutdown")).stdout
    m.assert_gone()
