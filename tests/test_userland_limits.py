"""An instance's userland bounded and frozen by the host: the process limit that ``create`` and
the scenario set (``--pids-max``), the freezer a hang-stop puts the whole instance in, and the
root that ``create --rootfs`` gives it. Real supervisors, real userlands; every process reaped."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from helpers import host_pids, until
from partition.errors import ProcessLimitInvalid, ProcessLimitZero, RootfsMissing
from partition.host import userspec
from partition.scenario import schema
from partition.scenario.schema import ScenarioInvalid

HERE = os.path.dirname(os.path.abspath(__file__))
PICKY = os.path.join(HERE, "kernels", "picky.py")
MKCTL = [sys.executable, "-m", "partition.control.cli"]
CPUS = sorted(os.sched_getaffinity(0))
PYTHON = os.path.realpath(sys.executable)      # not a shim script


def mk(run_dir, *args, **kw):
    return subprocess.run(MKCTL + [args[0], "--run-dir", run_dir, *args[1:]],
                          capture_output=True, text=True, timeout=60, **kw)


def machine(run_dir, *extra: str) -> None:
    r = mk(run_dir, "init", "--cpus", str(CPUS[-1]), "--memory", "64M", "--host-cpus",
           ",".join(map(str, CPUS[:-1])) or "none", "--oversubscribe", *extra)
    assert r.returncode == 0, r.stderr


def running(run_dir, name: str, *create: str) -> None:
    for args in (("create", name, "--cpus", str(CPUS[-1]), "--memory", "16M", *create),
                 ("load", name, "--kernel", PICKY), ("start", name)):
        r = mk(run_dir, *args)
        assert r.returncode == 0, r.stderr


# -- the checks alone --------------------------------------------------------------------------
@pytest.mark.parametrize("value", [1, 64, "256", 4194304, 8.0])
def test_a_process_limit_in_range_is_taken(value):
    assert userspec.check_pids_max(value) == int(value)


@pytest.mark.parametrize("value, cls", [
    (0, ProcessLimitZero), ("0", ProcessLimitZero), (-1, ProcessLimitInvalid),
    ("-5", ProcessLimitInvalid), (float("nan"), ProcessLimitInvalid),
    ("nan", ProcessLimitInvalid), (float("inf"), ProcessLimitInvalid),
    (4194305, ProcessLimitInvalid), (1.5, ProcessLimitInvalid), (True, ProcessLimitInvalid),
    ("many", ProcessLimitInvalid), (None, ProcessLimitInvalid)])
def test_a_bad_process_limit_is_refused_with_the_fix(value, cls):
    with pytest.raises(cls) as ei:
        userspec.check_pids_max(value, "'db'")
    assert ei.value.errno == errno.EINVAL
    assert "'db'" in ei.value.message and "1..4194304" in (ei.value.hint or "")


def test_a_rootfs_must_be_a_directory(tmp_path):
    assert userspec.check_rootfs(str(tmp_path)) == str(tmp_path)
    (tmp_path / "file").write_text("")
    for bad, says in ((tmp_path / "none", "does not exist"), (tmp_path / "file",
                                                               "is not a directory")):
        with pytest.raises(RootfsMissing) as ei:
            userspec.check_rootfs(str(bad))
        assert says in ei.value.message and ei.value.hint and ei.value.errno == errno.ENOENT


def test_a_scenario_sets_the_process_limit():
    doc = {"scenario": {"name": "t"},
           "instance": [{"name": "a", "kernel": "kernels.idle:IdleKernel", "pids_max": 200},
                        {"name": "b", "kernel": "kernels.idle:IdleKernel"}]}
    sc = schema.check(doc)
    assert [i["pids_max"] for i in sc.instances] == [200, userspec.PIDS_MAX_DEFAULT]
    for bad in (0, -3, 4194305, "64", 2.5):
        doc["instance"][0]["pids_max"] = bad
        with pytest.raises(ScenarioInvalid) as ei:
            schema.check(doc, "t.toml")
        assert any("pids_max" in p for p in ei.value.problems), ei.value.problems


# -- the process limit, enforced -----------------------------------------------------------------
FORK_BOMB = textwrap.dedent("""
    import os, time
    kids = []
    while len(kids) < 500:
        try:
            pid = os.fork()
        except OSError as exc:
            print(len(kids), exc.errno)
            break
        if pid == 0:
            time.sleep(60)
            os._exit(0)
        kids.append(pid)
    else:
        print(len(kids), 0)
    for k in kids:
        os.kill(k, 9)
        os.waitpid(k, 0)
""")


@pytest.mark.system
def test_a_fork_bomb_stops_at_the_limit_create_set(run_dir):
    machine(run_dir)
    running(run_dir, "db", "--pids-max", "24")
    shown = json.loads(mk(run_dir, "show", "db", "--format", "json").stdout)
    assert shown["pids_max"] == 24 and shown["rootfs"] is None
    assert "process limit 24" in mk(run_dir, "show", "db").stdout
    r = mk(run_dir, "exec", "db", "--", PYTHON, "-c", FORK_BOMB)
    assert r.returncode == 0, r.stderr
    forked, err = map(int, r.stdout.split())
    # the kernel, the relay, the init and the bomb itself count too: fewer than 24 children,
    # where the default limit (64) would have let far more than 24 be born
    assert err == errno.EAGAIN and 0 < forked < 24, r.stdout
    assert mk(run_dir, "show", "db").returncode == 0       # the instance is unharmed


@pytest.mark.system
def test_a_bad_process_limit_changes_nothing(run_dir):
    machine(run_dir)
    for bad in ("0", "-1", "nan", "4194305", "1.5"):
        r = mk(run_dir, "create", "db", "--cpus", str(CPUS[-1]), "--memory", "16M",
               "--pids-max", bad)
        assert r.returncode != 0 and "process limit" in r.stderr and "fix:" in r.stderr, \
            (bad, r.stderr)
    # past mkctl, on the supervisor's own socket: the same refusal
    from partition.control.client import Client
    for bad, cls in ((0, ProcessLimitZero), (-7, ProcessLimitInvalid), ("nan", ProcessLimitInvalid),
                     (1 << 40, ProcessLimitInvalid)):
        with pytest.raises(cls):
            Client(run_dir).call("create", name="db", memory="16M", cpus=str(CPUS[-1]),
                                 pids_max=bad)
    snap = json.loads(mk(run_dir, "show", "--format", "json").stdout)
    assert snap["instances"] == []


# -- create --rootfs -------------------------------------------------------------------------------
def _mini_rootfs(root) -> None:
    """A root holding dash and cat with their libraries, and a marker."""
    for d in ("bin", "etc", "proc", "dev", "tmp", "run"):
        (root / d).mkdir()
    for prog in ("/bin/sh", "/bin/cat"):
        shutil.copy(prog, root / "bin" / os.path.basename(prog))
        libs = subprocess.run(["ldd", prog], capture_output=True, text=True).stdout.split()
        for lib in (x for x in libs if x.startswith("/")):
            dest = root / lib.lstrip("/")
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(lib, dest)
    (root / "etc" / "marker").write_text("inside the rootfs\n")


@pytest.mark.system
def test_exec_runs_in_the_rootfs_create_gave(run_dir, tmp_path):
    machine(run_dir)
    root = tmp_path / "root"
    root.mkdir()
    _mini_rootfs(root)
    # a relative path is mkctl's, made absolute before the supervisor sees it
    r = subprocess.run(MKCTL + ["create", "--run-dir", run_dir, "db", "--cpus", str(CPUS[-1]),
                                "--memory", "16M", "--rootfs", "root"],
                       capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert f"rootfs {root}" in r.stdout
    for args in (("load", "db", "--kernel", PICKY), ("start", "db")):
        assert mk(run_dir, *args).returncode == 0
    shown = json.loads(mk(run_dir, "show", "db", "--format", "json").stdout)
    assert shown["rootfs"] == str(root)
    r = mk(run_dir, "exec", "db", "--", "/bin/sh", "-c", "cat /etc/marker; echo /*")
    assert r.returncode == 0, r.stderr
    marker, listing = r.stdout.splitlines()
    assert marker == "inside the rootfs"
    assert set(listing.split()) == {"/" + e for e in os.listdir(root)}   # not the host's root


@pytest.mark.system
def test_a_missing_rootfs_creates_nothing(run_dir, tmp_path):
    machine(run_dir)
    (tmp_path / "file").write_text("")
    for bad in (str(tmp_path / "none"), str(tmp_path / "file")):
        r = mk(run_dir, "create", "db", "--cpus", str(CPUS[-1]), "--memory", "16M",
               "--rootfs", bad)
        assert r.returncode != 0 and "rootfs" in r.stderr and "fix:" in r.stderr, r.stderr
    from partition.control.client import Client
    with pytest.raises(RootfsMissing):
        Client(run_dir).call("create", name="db", memory="16M", cpus=str(CPUS[-1]),
                             rootfs=str(tmp_path / "none"))
    assert json.loads(mk(run_dir, "show", "--format", "json").stdout)["instances"] == []


# -- hang-stop freezes the userland ------------------------------------------------------------
COUNTER = "import time\nfor i in range(100000):\n    print(i, flush=True)\n    time.sleep(0.05)\n"


@pytest.mark.system
def test_a_hang_stop_freezes_the_userland_until_the_watchdog_acts(run_dir):
    machine(run_dir)
    running(run_dir, "db", "--watchdog", "3")
    argv = [PYTHON, "-c", COUNTER]
    program = subprocess.Popen(MKCTL + ["exec", "--run-dir", run_dir, "db", "--", *argv],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen: list[str] = []
    reader = threading.Thread(target=lambda: seen.extend(program.stdout), daemon=True)
    reader.start()
    try:
        until(lambda: len(seen) >= 5, what="the counter printing")
        inside = until(lambda: host_pids(b"\0".join(a.encode() for a in argv) + b"\0"),
                       what="the counter's process")
        assert mk(run_dir, "fault", "db", "hang-stop").returncode == 0
        time.sleep(0.3)                          # (a line in the pipe as it froze)
        frozen_at = len(seen)
        time.sleep(1.2)
        assert len(seen) == frozen_at, "the userland ran on through a hang-stop"
        # the watchdog declares the hang and halts the instance: every process of it killed
        until(lambda: json.loads(mk(run_dir, "show", "db", "--format", "json").stdout)
              ["state"] != "active", timeout=20, what="the watchdog's halt")
        assert program.wait(timeout=30) == 128 + signal.SIGKILL
        until(lambda: not any(os.path.exists(f"/proc/{p}") for p in inside),
              what="the frozen program gone")
        shown = json.loads(mk(run_dir, "show", "db", "--format", "json").stdout)
        assert shown["last_failure"]["kind"] == "hang", shown["last_failure"]
    finally:
        if program.poll() is None:
            program.kill()
        program.wait()
        reader.join(timeout=5)


def freezer_state(pid: int) -> tuple[str, str]:
    """The v1 freezer cgroup of host process ``pid``, and its state ("" without one, or once
    the process is gone)."""
    try:
        with open(f"/proc/{pid}/cgroup") as f:
            for line in f:
                _, ctrls, path = line.rstrip("\n").split(":", 2)
                if "freezer" in ctrls.split(","):
                    where = os.path.join("/sys/fs/cgroup/freezer", path.lstrip("/"))
                    with open(os.path.join(where, "freezer.state")) as g:
                        return where, g.read().strip()
    except OSError:
        pass
    return "", ""


def cpu_ticks(pid: int) -> int:
    """utime + stime of ``pid`` (clock ticks)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


@pytest.mark.system
@pytest.mark.skipif(not os.path.isdir("/sys/fs/cgroup/freezer"), reason="no v1 freezer here")
def test_a_hang_spin_stops_the_userland_while_the_kernel_spins(run_dir):
    """A spinning kernel schedules nothing: its programs stop (their nested freezer cgroup)
    while the kernel itself runs on, until the watchdog ends it; the restart's userland is a
    fresh one that runs, and nothing is left frozen."""
    machine(run_dir)
    running(run_dir, "db", "--watchdog", "3", "--recovery", "restart")
    before = json.loads(mk(run_dir, "show", "db", "--format", "json").stdout)
    argv = [PYTHON, "-c", COUNTER, "hang-spin", run_dir]    # (this test's alone: found by it)
    program = subprocess.Popen(MKCTL + ["exec", "--run-dir", run_dir, "db", "--", *argv],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen: list[str] = []
    reader = threading.Thread(target=lambda: seen.extend(program.stdout), daemon=True)
    reader.start()
    again = None
    try:
        until(lambda: len(seen) >= 5, what="the counter printing")
        inside = until(lambda: host_pids(b"\0".join(a.encode() for a in argv) + b"\0"),
                       what="the counter's process")
        nested, state = freezer_state(inside[0])
        assert nested.endswith(f"/i{before['id']}/userland") and state == "THAWED", nested
        kernel = before["pid"]
        assert freezer_state(kernel)[0] == os.path.dirname(nested)    # the kernel's: above it
        assert mk(run_dir, "fault", "db", "hang-spin").returncode == 0
        until(lambda: freezer_state(inside[0])[1] == "FROZEN", what="the userland frozen")
        time.sleep(0.3)                          # (a line in the pipe as it froze)
        frozen_at, ticks = len(seen), cpu_ticks(kernel)
        time.sleep(1.2)
        assert len(seen) == frozen_at, "the userland ran on through a hang-spin"
        assert cpu_ticks(kernel) > ticks, "the kernel did not spin: it was frozen too"
        assert mk(run_dir, "show", "db").returncode == 0
        # the watchdog declares the hang and restarts the instance: every process of it killed
        assert program.wait(timeout=30) == 128 + signal.SIGKILL
        until(lambda: not any(os.path.exists(f"/proc/{p}") for p in inside),
              what="the frozen program gone")
        shown = until(lambda: (lambda s: s if s["state"] == "active" and
                               s["boots"] > before["boots"] else None)(
            json.loads(mk(run_dir, "show", "db", "--format", "json").stdout)),
            timeout=30, what="the watchdog's restart")
        assert shown["last_failure"]["kind"] == "hang", shown["last_failure"]
        # the restarted kernel's userland is a fresh one, and it runs
        again = subprocess.Popen(MKCTL + ["exec", "--run-dir", run_dir, "db", "--", *argv],
                                 stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        assert again.stdout is not None
        assert [again.stdout.readline() for _ in range(3)] == ["0\n", "1\n", "2\n"]
        fresh = until(lambda: host_pids(b"\0".join(a.encode() for a in argv) + b"\0"),
                      what="the new counter's process")
        assert not set(fresh) & set(inside)
        assert freezer_state(fresh[0]) == (nested, "THAWED")
        again.kill()
        again.wait()
        assert mk(run_dir, "shutdown").returncode == 0
        assert not os.path.exists(os.path.dirname(nested))  # the machine's cgroups, nested too
    finally:
        for p in (program, again):
            if p is not None:
                if p.poll() is None:
                    p.kill()
                p.wait()
        reader.join(timeout=5)


def machine_cgroups(pid: int) -> list[str]:
    """The machine's directories (``multikernel-...``) holding host process ``pid``, one per
    v1 hierarchy it is in."""
    out = []
    with open(f"/proc/{pid}/cgroup") as f:
        for line in f:
            _, ctrls, path = line.rstrip("\n").split(":", 2)
            for c in ctrls.split(","):
                if c in ("cpuset", "memory", "pids", "freezer"):
                    parts = path.strip("/").split("/")
                    at = next(i for i, p in enumerate(parts) if p.startswith("multikernel-"))
                    out.append(os.path.join("/sys/fs/cgroup", c, *parts[:at + 1]))
    return out


@pytest.mark.system
@pytest.mark.skipif(not os.path.isdir("/sys/fs/cgroup/freezer"), reason="no v1 freezer here")
@pytest.mark.parametrize("survive", [(), ("--no-survive-host",)], ids=["survivable", "not"])
def test_a_frozen_userland_of_a_dead_host_is_killed_and_removed_at_shutdown(run_dir, survive):
    """A host SIGKILLed while its instance hang-spins (its userland frozen) leaves them to
    ``mkctl shutdown`` (an abandoned survivable machine's cgroups, or a dead machine's stale
    ones): every process killed though frozen, every cgroup of every hierarchy removed, the
    nested ones too."""
    machine(run_dir, *survive)
    running(run_dir, "db")
    program = subprocess.Popen(MKCTL + ["exec", "--run-dir", run_dir, "db", "--", "sleep", "307"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        sleeps = until(lambda: host_pids(b"sleep\x00307\x00"), what="the exec's sleep")
        dirs = machine_cgroups(sleeps[0])
        assert len(dirs) == 4, dirs
        assert mk(run_dir, "fault", "db", "hang-spin").returncode == 0
        until(lambda: freezer_state(sleeps[0])[1] == "FROZEN", what="the userland frozen")
        host = json.loads(mk(run_dir, "show", "--format", "json").stdout)["machine"]
        os.kill(host["supervisor_pid"], signal.SIGKILL)
        # reaped, not only dead: a zombie owner's cgroups are a live machine's to reap_stale
        until(lambda: not os.path.exists(f"/proc/{host['supervisor_pid']}"),
              what="the host's death")
        assert mk(run_dir, "shutdown").returncode == 0
        until(lambda: not any(os.path.exists(f"/proc/{p}") for p in sleeps),
              what="the frozen program gone")
        assert [d for d in dirs if os.path.exists(d)] == []
        assert program.wait(timeout=30) == 128 + signal.SIGKILL
    finally:
        if program.poll() is None:
            program.kill()
        program.wait()


@pytest.mark.system
def test_an_adopted_instance_keeps_its_limit_and_root(run_dir, tmp_path):
    machine(run_dir)
    running(run_dir, "db", "--pids-max", "30", "--rootfs", str(tmp_path))
    pid = json.loads(mk(run_dir, "show", "--format", "json").stdout)["machine"]["supervisor_pid"]
    os.kill(pid, signal.SIGKILL)
    until(lambda: not os.path.exists(f"/proc/{pid}") or
          open(f"/proc/{pid}/stat").read().split(") ")[1][0] == "Z", what="the host's death")
    r = mk(run_dir, "adopt")
    assert r.returncode == 0, r.stderr
    shown = json.loads(mk(run_dir, "show", "db", "--format", "json").stdout)
    assert (shown["state"], shown["pids_max"], shown["rootfs"]) == ("active", 30, str(tmp_path))


@pytest.mark.system
@pytest.mark.parametrize("end", [("fault", "db", "kill"), ("kill", "db", "--force")],
                         ids=["kill-fault", "forced-halt"])
def test_a_hung_stopped_instance_can_still_be_killed(run_dir, end):
    """No watchdog: the kill that ends the hang must thaw what it killed, or nothing dies."""
    machine(run_dir)
    running(run_dir, "db")
    program = subprocess.Popen(MKCTL + ["exec", "--run-dir", run_dir, "db", "--", "sleep", "305"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        sleeps = until(lambda: host_pids(b"sleep\x00305\x00"), what="the exec's sleep")
        assert mk(run_dir, "fault", "db", "hang-stop").returncode == 0
        assert mk(run_dir, *end).returncode == 0
        until(lambda: json.loads(mk(run_dir, "show", "db", "--format", "json").stdout)
              ["state"] != "active", timeout=20, what="the instance halted")
        assert program.wait(timeout=30) == 128 + signal.SIGKILL
        until(lambda: not any(os.path.exists(f"/proc/{p}") for p in sleeps),
              what="the frozen program gone")
    finally:
        if program.poll() is None:
            program.kill()
        program.wait()
