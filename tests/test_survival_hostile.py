"""Adoption under attack (host/adoption.py): hostile instances that tamper with the descriptors a
new host takes from them, or die while it takes them; adopts that race; a host adopted, killed
and adopted again; and a machine whose instances die with their host. (A state file that is
corrupt, torn, or names what is not the machine's, and an arena gone or resized, are in
test_survival_state.py.)

Every test builds a survivable machine with ``mkctl init``, SIGKILLs its supervisor, does its
damage, and runs ``mkctl adopt`` / ``init`` / ``shutdown`` as an operator would. Whatever a test
found, the ``machines`` fixture then removes what is left of its machine (tests/abandoned.py);
conftest's leak checks look after that.

These tests and test_survival_state.py's found twelve bugs (an adopted host spinning on an
undrained doorbell, a failed adoption deleting the state file, paths and records from the file
trusted as they were, a descriptor leaked on a refusal, ...); each is fixed, and its test is a
regression test now."""

import json
import os
import re
import subprocess
import time

import psutil
import pytest
from abandoned import (
    ADOPTEE,
    HOST,
    IDLE,
    LEAK_COUNT,
    MKCTL,
    POOL,
    Abandoned,
    alive,
    eventfd_counts,
    mk,
    no_traceback,
    ok,
    until,
)

from partition.control.client import Client

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
