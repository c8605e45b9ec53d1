"""Kernels that outlive their host: SIGKILL the supervisor under inter-instance traffic; the
instances run on, lose nothing, and a new host adopts them (host/adoption.py)."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import psutil
import pytest

from partition.host import adoption, rundir

pytestmark = pytest.mark.system      # real machines: pytest -m "not system" skips them

HERE = os.path.dirname(os.path.abspath(__file__))
PINGPONG = os.path.join(HERE, "kernels", "pingpong.py")
MKCTL = [sys.executable, "-m", "partition.control.cli"]
CPUS = sorted(os.sched_getaffinity(0))
COUNTS = re.compile(r"pingpong: asked (\d+) answered (\d+) lost (\d+) wrong (\d+)")


def mk(run_dir, *args, check=True):
    r = subprocess.run(MKCTL + [args[0], "--run-dir", run_dir, *args[1:]], capture_output=True,
                       text=True, timeout=120)
    if check:
        assert r.returncode == 0, f"mkctl {' '.join(args)}: {r.returncode}\n{r.stdout}\n{r.stderr}"
    return r


def show(run_dir):
    return json.loads(mk(run_dir, "show", "--format", "json").stdout)


def counts(run_dir):
    lines = COUNTS.findall(mk(run_dir, "console", "c").stdout)
    return tuple(map(int, lines[-1])) if lines else (0, 0, 0, 0)


def until(cond, timeout=20.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"{what} not met in {timeout} s"
        time.sleep(0.05)


def kill_supervisor(run_dir):
    pid = show(run_dir)["machine"]["supervisor_pid"]
    os.kill(pid, signal.SIGKILL)
    until(lambda: not psutil.pid_exists(pid) or psutil.Process(pid).status() == "zombie",
          what="the supervisor's death")
    return pid


def pair(run_dir):
    mk(run_dir, "init", "--cpus", str(CPUS[-1]), "--host-cpus",
       ",".join(map(str, CPUS[:-1])) or "none", "--memory", "64M", "--oversubscribe")
    for name, cls in (("s", "Server"), ("c", "Client")):
        mk(run_dir, "create", name, "--cpus", str(CPUS[-1]), "--memory", "8M")
    sid = show(run_dir)["instances"][0]["id"]
    mk(run_dir, "load", "s", "--kernel", f"{PINGPONG}:Server")
    mk(run_dir, "load", "c", "--kernel", f"{PINGPONG}:Client", "--cmdline",
       f"peer={sid} interval=0.005")
    mk(run_dir, "start", "s")
    mk(run_dir, "start", "c")


def test_instances_outlive_their_host_and_are_adopted(run_dir):
    pair(run_dir)
    until(lambda: counts(run_dir)[1] >= 100, what="100 answers before the crash")
    before = {i["name"]: i for i in show(run_dir)["instances"]}
    pids = {n: i["pid"] for n, i in before.items()}
    shm = [e for e in os.listdir("/dev/shm") if e.startswith("mk-arena-")]
    asked_then = counts(run_dir)[0]

    kill_supervisor(run_dir)
    time.sleep(1.0)                               # the instances run on without a host
    for name, pid in pids.items():
        p = psutil.Process(pid)
        assert p.status() != psutil.STATUS_ZOMBIE, name
        assert p.cpu_affinity() == [CPUS[-1]], f"{name} lost its pinning"

    r = mk(run_dir, "adopt")
    assert "adopted the machine" in r.stdout
    snap = show(run_dir)
    after = {i["name"]: i for i in snap["instances"]}
    assert {n: i["pid"] for n, i in after.items()} == pids          # their old pids
    assert all(i["state"] == "active" for i in after.values())
    assert snap["machine"]["adopt_ms"] is not None and snap["machine"]["adopt_ms"] < 1000
    events = [json.loads(line) for line in open(os.path.join(run_dir, "events.log"))]
    adopted = [e for e in events if e["event"] == "adopted"]
    assert adopted and sorted(adopted[-1]["instances"]) == ["c", "s"]

    # traffic went on all along and goes on: more asked than at the crash, none lost
    until(lambda: counts(run_dir)[0] >= asked_then + 200, what="traffic after the adoption")
    asked, answered, lost, wrong = counts(run_dir)
    assert lost == 0 and wrong == 0 and answered == asked
    # the new host commands them as its own: a graceful halt of the client is obeyed
    mk(run_dir, "kill", "c")
    assert show(run_dir)["instances"][1]["last_exit"]["how"] == "graceful"
    final = counts(run_dir)
    assert final[2] == 0 and final[3] == 0

    mk(run_dir, "shutdown")
    assert not os.path.exists(run_dir)
    for pid in pids.values():
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == "zombie"
    assert [e for e in os.listdir("/dev/shm") if e.startswith("mk-arena-")] != shm or not shm
    assert not os.path.exists("/dev/shm" + adoption.arena_name(run_dir))


def test_an_abandoned_machine_is_removed_whole(run_dir):
    pair(run_dir)
    pids = [i["pid"] for i in show(run_dir)["instances"]]
    kill_supervisor(run_dir)
    assert all(psutil.pid_exists(p) for p in pids)
    r = mk(run_dir, "shutdown")
    assert "stale" in r.stdout or "removed" in r.stdout
    assert not os.path.exists(run_dir)
    until(lambda: not any(psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"
                          for p in pids), what="the abandoned instances' end")
    assert not os.path.exists("/dev/shm" + adoption.arena_name(run_dir))


def test_adoption_never_takes_a_process_that_is_not_the_instance(run_dir):
    """The state file says the client runs as pid P; P is now some other process (its start
    time differs): the client is not adopted, P is not signalled, and the processes in the
    client's own cgroup are what is killed."""
    pair(run_dir)
    impostor = subprocess.Popen(["sleep", "60"])
    try:
        kill_supervisor(run_dir)
        state = adoption.read_state(run_dir)
        real = next(i for i in state["instances"] if i["name"] == "c")["pid"]
        for rec in state["instances"]:
            if rec["name"] == "c":
                rec["pid"] = impostor.pid
        adoption.write_state(run_dir, state)
        mk(run_dir, "adopt")
        c = next(i for i in show(run_dir)["instances"] if i["name"] == "c")
        assert c["state"] == "failed" and "not adopted" in c["failure"]
        assert impostor.poll() is None, "a process that is not the instance was signalled"
        until(lambda: not psutil.pid_exists(real) or psutil.Process(real).status() == "zombie",
              what="the real client, in the instance's cgroup, killed")
        s = next(i for i in show(run_dir)["instances"] if i["name"] == "s")
        assert s["state"] == "active"
    finally:
        impostor.kill()
        impostor.wait()
    mk(run_dir, "shutdown")


def test_run_directories_with_one_basename_share_nothing(run_dir):
    """Two machines in .../a/mk and .../b/mk: their arena names and cgroups differ, so
    ``mkctl shutdown`` of the empty b/mk touches nothing of a/mk's live machine (it used to
    kill every instance of it and unlink its arena), and an init in b/mk then runs beside it
    with objects of its own. A new host of a/mk finds a/mk's objects again."""
    a, b = os.path.join(run_dir, "a", "mk"), os.path.join(run_dir, "b", "mk")
    os.makedirs(b)
    try:
        mk(a, "init", "--cpus", ",".join(map(str, CPUS)), "--host-cpus", str(CPUS[0]),
           "--memory", "64M", "--oversubscribe")
        mk(a, "create", "v", "--cpus", str(CPUS[-1]), "--memory", "8M")
        mk(a, "load", "v", "--kernel", "kernels.idle:IdleKernel")
        mk(a, "start", "v")
        pid = show(a)["instances"][0]["pid"]
        arena_a = "/dev/shm" + adoption.arena_name(a)
        cgroups_a = adoption.cgroup_bases(a)
        assert os.path.exists(arena_a) and cgroups_a

        mk(b, "shutdown", check=False)                  # an empty directory: nothing to do
        time.sleep(0.3)
        assert psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie"
        assert os.path.exists(arena_a) and adoption.cgroup_bases(a) == cgroups_a
        assert show(a)["instances"][0]["state"] == "active"
        assert adoption.arena_name(a) != adoption.arena_name(b)
        assert not adoption.cgroup_bases(b)

        mk(b, "init", "--cpus", ",".join(map(str, CPUS)), "--host-cpus", str(CPUS[0]),
           "--memory", "64M", "--oversubscribe")
        assert os.path.exists("/dev/shm" + adoption.arena_name(b)) and os.path.exists(arena_a)
        mk(b, "shutdown")
        assert os.path.exists(arena_a) and psutil.pid_exists(pid)

        kill_supervisor(a)                               # and a new host of a/mk finds it
        mk(a, "adopt")
        assert show(a)["instances"][0]["pid"] == pid
        mk(a, "kill", "v")
        mk(a, "start", "v")                              # restarts work (they broke: ENOSPC)
        assert show(a)["instances"][0]["state"] == "active"
    finally:
        for d in (b, a):
            if os.path.exists(d):
                mk(d, "shutdown", check=False)
        import shutil
        shutil.rmtree(run_dir, ignore_errors=True)
    assert not os.path.exists(arena_a) and not adoption.cgroup_bases(a)


def test_an_adopted_instances_doorbell_is_still_ring_only(run_dir):
    """A new host makes the ring end it gives peers from the adopted instance's own doorbell
    (a pipe open for reading and writing): write-only, so a kernel it starts later reads
    nothing of the adopted one's wake-ups either."""
    hostile = os.path.join(HERE, "kernels", "hostile.py") + ":Hostile"
    mk(run_dir, "init", "--cpus", ",".join(map(str, CPUS)), "--host-cpus", str(CPUS[0]),
       "--memory", "64M", "--oversubscribe")
    mk(run_dir, "create", "v", "--cpus", str(CPUS[-1]), "--memory", "8M")
    mk(run_dir, "load", "v", "--kernel", "kernels.echo:EchoKernel")
    mk(run_dir, "start", "v")
    vid = show(run_dir)["instances"][0]["id"]
    kill_supervisor(run_dir)
    mk(run_dir, "adopt")
    mk(run_dir, "create", "evil", "--cpus", str(CPUS[0]), "--memory", "8M")
    mk(run_dir, "load", "evil", "--kernel", hostile, "--cmdline",
       f"attack=steal-doorbell target={vid} seconds=0.5")
    mk(run_dir, "start", "evil")
    until(lambda: "steal:" in mk(run_dir, "console", "evil").stdout, what="the theft tried")
    said = mk(run_dir, "console", "evil").stdout
    assert "steal: PermissionError" in said and "took 0 bytes" in said, said
    mk(run_dir, "shutdown")


def test_a_new_host_sleeps_once_no_adopted_instance_holds_the_old_doorbell(run_dir,
                                                                           machine_factory):
    """The adopted instances are the only writers of the dead host's doorbell pipe, which the
    new host watches. Once one is restarted (it gets the new host's doorbell) and the other
    is killed, none is left: a watch opened read-only then read end-of-file, readable at every
    poll, and the new host spun at 100 % CPU. It must sleep as long as it is told to."""
    old = machine_factory(cpus=CPUS, memory="64M", host_cpus=[CPUS[0]], oversubscribe=True,
                          run_dir=run_dir, survive_host=True)
    for name in ("a", "b"):
        old.create(name, "8M", cpus=[CPUS[-1]])
        old.load(name, "kernels.idle:IdleKernel")
        old.start(name)
    cfg = old.abandon()
    run = rundir.claim(run_dir)
    run.owned = True                     # removed when the new host closes
    new = machine_factory(run_dir=run, adopt=True, **cfg)
    assert all(new.show(n)["state"] == "active" for n in ("a", "b"))
    assert new.extra_host_doorbells, "the old host's doorbell is not watched"
    new.kill("a")
    new.kill("b")
    new.start("b")                       # a restart: its doorbell to the host is the new one
    assert new.show("b")["state"] == "active"
    end = time.monotonic() + 1.0
    calls = handled = 0
    while time.monotonic() < end:
        handled += new.poll(0.2)
        calls += 1
    assert calls <= 12 and handled <= 6, \
        f"the new host polled {calls} times in 1 s ({handled} events): it spins"
