"""Adoption of a damaged record (host/adoption.py): a state file that is corrupt, torn, or
names what is not the machine's; an unknown config key; an arena gone or resized. Each is
refused (the record, or the whole adoption) and leaves the machine to ``mkctl shutdown``.

Every test builds a survivable machine with ``mkctl init``, SIGKILLs its supervisor, does its
damage, and runs ``mkctl adopt`` / ``init`` / ``shutdown`` as an operator would; the
``machines`` fixture then removes what is left of it (tests/abandoned.py).
"""

import json
import os
import shutil
import subprocess
import tempfile
import time
import uuid

import posix_ipc
import pytest
from abandoned import HOST, IDLE, POOL, Abandoned, alive, mk, no_traceback, ok, sane, until

from partition.control.client import Client
from partition.errors import MKError
from partition.host import adoption, rundir

pytestmark = [pytest.mark.system, pytest.mark.slow]      # a red-team suite of whole machines


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
