"""The supervisor is never blind and never anyone's tool: slow or idle clients, absurd input,
other users and racing starts leave it answering, timing and recording as before."""

import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time

import msgpack
import psutil
import pytest
from helpers import CPUS, mk, wait_until

pytestmark = pytest.mark.system      # real machines: pytest -m "not system" skips them

HERE = os.path.dirname(os.path.abspath(__file__))
CPUS = sorted(os.sched_getaffinity(0))
MKCTL = [sys.executable, "-m", "partition.control.cli"]
BUSY = os.path.join(HERE, "kernels", "busy.py")


def init(run_dir, *extra, **kw):
    return mk(run_dir, "init", "--cpus", ",".join(map(str, CPUS)), "--host-cpus", str(CPUS[0]),
              "--memory", "256M", "--oversubscribe", *extra, **kw)


def events(run_dir):
    with open(os.path.join(run_dir, "events.log")) as f:
        return [json.loads(line) for line in f if line.strip()]


def wait_event(run_dir, pred, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [e for e in events(run_dir) if pred(e)]
        if found:
            return found[0]
        time.sleep(0.05)
    raise AssertionError("event not logged in time")


def raw_call(run_dir, request):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(os.path.join(run_dir, "mkctl.sock"))
    data = msgpack.packb(request, use_bin_type=True)
    try:
        s.sendall(struct.pack(">I", len(data)) + data)
    except BrokenPipeError:
        pass                # refused before it read us: the refusal is waiting to be read
    n = struct.unpack(">I", s.recv(4, socket.MSG_WAITALL))[0]
    reply = msgpack.unpackb(s.recv(n, socket.MSG_WAITALL), raw=False)
    s.close()
    return reply


def test_watchdog_fires_with_no_client_traffic(run_dir):
    init(run_dir)
    mk(run_dir, "create", "h", "--cpus", str(CPUS[-1]), "--memory", "16M", "--watchdog", "1")
    mk(run_dir, "load", "h", "--kernel", "kernels.counter:CounterKernel")
    mk(run_dir, "exec", "h")
    mk(run_dir, "fault", "h", "hang-stop")
    # nothing else talks to the supervisor: its own timer must find the hang
    e = wait_event(run_dir, lambda e: e["event"] == "watchdog_expired", timeout=6)
    assert e["name"] == "h"


@pytest.mark.alone      # times itself
def test_a_slow_client_stalls_nobody(run_dir):
    init(run_dir)
    mk(run_dir, "create", "v", "--cpus", str(CPUS[-1]), "--memory", "16M")
    mk(run_dir, "load", "v", "--kernel", "kernels.idle:IdleKernel")
    mk(run_dir, "exec", "v")
    pid = json.loads(mk(run_dir, "show", "v", "--format", "json").stdout)["pid"]
    slow = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    slow.connect(os.path.join(run_dir, "mkctl.sock"))
    slow.send(b"\x00")                         # one byte of a length, then nothing
    try:
        t0 = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        e = wait_event(run_dir, lambda e: e["event"] == "instance_exit" and e["pid"] == pid)
        assert e["how"] == "killed"
        assert time.monotonic() - t0 < 2.0      # noticed at once, not after the slow client
        t0 = time.monotonic()
        mk(run_dir, "show")
        assert time.monotonic() - t0 < 5.0
    finally:
        slow.close()


def test_idle_connections_get_a_clear_refusal_not_a_traceback(run_dir):
    init(run_dir)
    idle = []
    try:
        for _ in range(20):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(os.path.join(run_dir, "mkctl.sock"))
            idle.append(s)
        time.sleep(0.2)
        p = mk(run_dir, "show", check=False)
        assert p.returncode != 0 and "Traceback" not in p.stderr
        assert "already serves 16 clients" in p.stderr
    finally:
        for s in idle:
            s.close()
    time.sleep(0.2)
    mk(run_dir, "show")                        # the slots come back


def test_absurd_cpu_range_is_refused_before_expansion(run_dir):
    init(run_dir)
    t0 = time.monotonic()
    p = mk(run_dir, "create", "x", "--cpus", "1-100000000", "--memory", "16M", check=False)
    assert p.returncode != 0 and "CPU" in p.stderr and "Traceback" not in p.stderr
    assert time.monotonic() - t0 < 5.0
    assert psutil.Process(json.loads(mk(run_dir, "show", "--format", "json").stdout)
                          ["machine"]["supervisor_pid"]).memory_info().rss < 500 << 20


def test_nan_and_infinity_are_refused_everywhere(run_dir):
    p = init(run_dir, "--kill-timeout", "nan", check=False)
    assert p.returncode == 2 and "not a finite number" in p.stderr
    assert not os.path.exists(os.path.join(run_dir, "mkctl.sock"))
    init(run_dir)
    mk(run_dir, "create", "v", "--cpus", str(CPUS[-1]), "--memory", "16M")
    mk(run_dir, "load", "v", "--kernel", "kernels.idle:IdleKernel")
    mk(run_dir, "exec", "v")
    p = mk(run_dir, "kill", "v", "--timeout", "inf", check=False)
    assert p.returncode == 2 and "not a finite number" in p.stderr
    # over the wire, below mkctl's own checks
    for bad in (float("nan"), float("inf"), float("-inf")):
        r = raw_call(run_dir, {"op": "kill", "args": {"name": "v", "timeout": bad}})
        assert r["ok"] is False and "finite" in r["error"]["message"]
    snap = json.loads(mk(run_dir, "show", "--format", "json").stdout)
    assert snap["instances"][0]["state"] == "active"          # nothing happened to it


def test_socket_is_private_whatever_the_umask(run_dir):
    init(run_dir, preexec_fn=lambda: os.umask(0))
    mode = os.stat(os.path.join(run_dir, "mkctl.sock")).st_mode & 0o777
    assert mode == 0o600


def test_other_users_are_refused_by_credentials(run_dir):
    init(run_dir)
    sock = os.path.join(run_dir, "mkctl.sock")
    os.chmod(run_dir, 0o755)
    os.chmod(sock, 0o666)           # as if the mode were wrong: the credentials still decide
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.setgid(54321)
            os.setuid(54321)
            reply = raw_call(run_dir, {"op": "show", "args": {}})
            said = reply["error"]["message"] if not reply["ok"] else "ok"
        except BaseException as exc:  # noqa: BLE001 - the test shows it
            said = f"the client failed: {exc!r}"
        try:
            os.write(w, json.dumps(said).encode())
        finally:
            os._exit(0)
    os.close(w)
    os.waitpid(pid, 0)
    said = json.loads(os.read(r, 4096))
    os.close(r)
    assert "uid 54321 may not use this machine" in said
    assert any(e["event"] == "client_refused" and e["uid"] == 54321 for e in events(run_dir))


def test_a_run_directory_owned_by_someone_else_is_refused(tmp_path):
    path = str(tmp_path / "squat")
    os.mkdir(path)
    os.chown(path, 12345, 12345)
    p = init(path, check=False)
    assert p.returncode != 0 and "belongs to uid 12345" in p.stderr
    assert os.listdir(path) == []


def test_racing_inits_never_remove_each_others_directory(run_dir):
    for _ in range(4):
        args = MKCTL + ["--run-dir", run_dir, "init", "--cpus", ",".join(map(str, CPUS)),
                        "--host-cpus", str(CPUS[0]), "--memory", "64M", "--oversubscribe"]
        procs = [subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for _ in range(2)]
        outs = [p.communicate(timeout=60) for p in procs]
        codes = sorted(p.returncode for p in procs)
        assert codes[0] == 0 and codes[1] != 0, outs
        loser = outs[[p.returncode for p in procs].index(codes[1])][1]
        assert "already running" in loser
        mk(run_dir, "show")                     # the winner's machine is whole and reachable
        mk(run_dir, "shutdown")
        assert not os.path.exists(run_dir)


def test_busy_instances_take_ipi_signals_without_console_noise(run_dir):
    init(run_dir)
    mk(run_dir, "create", "b", "--cpus", str(CPUS[-1]), "--memory", "16M")
    mk(run_dir, "load", "b", "--kernel", BUSY + ":Busy")
    mk(run_dir, "exec", "b")
    for _ in range(200):
        r = raw_call(run_dir, {"op": "show", "args": {"name": "b"}})
        assert r["ok"]
    # the host's messages to a busy kernel ring its IPI signal; faults go the same way
    mk(run_dir, "fault", "b", "cpu-hog", "--seconds", "0.2")
    time.sleep(0.5)
    console = mk(run_dir, "console", "b").stdout
    assert "fault injected: cpu-hog" in console
    assert "Exception ignored" not in console and "Bad file descriptor" not in console



def test_a_verb_longer_than_the_request_deadline_still_gets_its_answer(run_dir):
    # the request arrives within its 5 s; the graceful kill then waits 6 s for a kernel that
    # ignores SHUTDOWN, forces it, and the client must still get that answer
    stubborn = os.path.join(HERE, "kernels", "misbehaving.py") + ":Stubborn"
    init(run_dir)
    mk(run_dir, "create", "s", "--cpus", str(CPUS[-1]), "--memory", "16M")
    mk(run_dir, "load", "s", "--kernel", stubborn)
    mk(run_dir, "start", "s")
    p = mk(run_dir, "kill", "s", "--timeout", "6", "--format", "json")
    assert json.loads(p.stdout)["last_exit"]["how"] == "forced"
    assert not any(e["event"] == "client_timeout" for e in events(run_dir))


def test_a_restarting_instance_runs_with_its_successor_parked(machine):
    """Its next incarnation is forked and parked while it runs, and the restart boots that
    process; an instance without the restart policy has none, and unload kills it."""
    machine.create("r", cpus=[CPUS[-1]], memory="4M", recovery="restart")
    machine.load("r", "kernels.echo:EchoKernel")
    machine.exec("r")
    wait_until(machine, lambda: machine.show("r")["resident"], timeout=30)
    successor = machine.instances["r"].parked.pid
    first = machine.pid_of("r")
    assert successor != first
    machine.fault("r", "kill")
    wait_until(machine, lambda: machine.show("r")["state"] == "active"
               and machine.show("r")["pid"] not in (None, first), timeout=10)
    assert machine.pid_of("r") == successor
    machine.create("plain", cpus=[CPUS[-1]], memory="4M")
    machine.load("plain", "kernels.echo:EchoKernel")
    machine.exec("plain")
    machine.poll(0.2)
    assert machine.instances["plain"].parked is None
    wait_until(machine, lambda: machine.show("r")["resident"], timeout=30)
    spare = machine.instances["r"].parked.pid
    machine.kill("r", force=True)
    machine.unload("r")
    assert machine.instances["r"].parked is None
    assert not os.path.exists(f"/proc/{spare}")


@pytest.mark.alone      # times itself
def test_a_bad_frame_harms_only_its_sender(run_dir):
    """While client A's graceful kill waits for a kernel that ignores SHUTDOWN, client B's
    malformed frames are refused to B (EINVAL, at once), and A's kill ends as it would have:
    forced, the instance no longer active. (B's unhashable op used to fail A's verb.)"""
    stubborn = os.path.join(HERE, "kernels", "misbehaving.py") + ":Stubborn"
    init(run_dir)
    mk(run_dir, "create", "s", "--cpus", str(CPUS[-1]), "--memory", "16M")
    mk(run_dir, "load", "s", "--kernel", stubborn)
    mk(run_dir, "start", "s")
    a = subprocess.Popen(MKCTL + ["--run-dir", run_dir, "kill", "s", "--timeout", "3",
                                  "--format", "json"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(1.0)                             # A's kill is waiting for s to halt
        assert a.poll() is None
        for bad in ({"op": [1]}, {"op": {"x": 1}, "args": {}}, {"op": "show", "args": [1]},
                    {"op": "show", "args": {"name": [1]}},
                    {"op": "kill", "args": {"name": "s", "force": "no"}}):
            t0 = time.monotonic()
            r = raw_call(run_dir, bad)
            assert r["ok"] is False and r["error"]["class"] == "InvalidSpec", (bad, r)
            assert time.monotonic() - t0 < 2.0, "refused at once, not queued behind A"
        out, err = a.communicate(timeout=30)
    finally:
        if a.poll() is None:
            a.kill()
            a.communicate()
    assert a.returncode == 0, err
    assert json.loads(out)["last_exit"]["how"] == "forced"
    assert json.loads(mk(run_dir, "show", "s", "--format", "json").stdout)["state"] != "active"


BAD_FIELDS = [
    ("kill", {"name": "v", "force": "no"}, "force"),           # was taken as true
    ("kill", {"name": "v", "force": 0}, "force"),
    ("kill", {"name": "v", "timeout": "5"}, "timeout"),
    ("kill", {"name": "v", "timeout": -1}, "timeout"),
    ("kill", {"name": ["v"]}, "name"),
    ("kill", {}, "name"),
    ("start", {"name": "v", "wait": "yes"}, "wait"),
    ("show", {"brief": 1}, "brief"),
    ("show", {"name": {"a": 1}}, "name"),
    ("console", {"name": 1.5}, "name"),
    ("console", {"name": 4096}, "name"),
    ("create", {"name": "x", "memory": -1}, "memory"),
    ("create", {"name": "x", "memory": "16M", "cpus": [True]}, "cpus"),
    ("create", {"name": "x", "memory": "16M", "max_restarts": 1 << 62}, "max_restarts"),
    ("update", {"name": "v", "preserve_memory": "false"}, "preserve_memory"),
    ("fault", {"name": "v", "kind": "cpu-hog", "options": {"seconds": "2"}}, "options"),
    ("fault", {"name": "v", "kind": "cpu-hog", "options": [1]}, "options"),
    ("exec_into", {"name": "v", "argv": "ls"}, "argv"),
    ("overlay", {"data": "not bytes"}, "data"),
    ("overlay_remove", {"tx": True}, "tx"),
    ("kexec_unload", {"id": -1}, "id"),
    ("live_update", {"name": "v", "kernel": "k", "quiesce": 1e9}, "quiesce"),
]


def _deep(depth):
    v = []
    for _ in range(depth):
        v = [v]
    return v


BAD_FIELDS.append(("show", {"name": _deep(1000)}, "name"))     # no RecursionError on the way


def test_every_field_is_checked_before_its_verb(run_dir):
    """A schema per verb: a field of the wrong type or out of range is refused by name with
    EINVAL, and nothing changes."""
    init(run_dir)
    mk(run_dir, "create", "v", "--cpus", str(CPUS[-1]), "--memory", "16M")
    mk(run_dir, "load", "v", "--kernel", "kernels.idle:IdleKernel")
    mk(run_dir, "start", "v")
    for op, args, field in BAD_FIELDS:
        r = raw_call(run_dir, {"op": op, "args": args})
        assert r["ok"] is False and r["error"]["class"] == "InvalidSpec", (op, args, r)
        assert repr(field) in r["error"]["message"], (op, args, r)
    snap = json.loads(mk(run_dir, "show", "--format", "json").stdout)
    assert [(i["name"], i["state"]) for i in snap["instances"]] == [("v", "active")]


def test_every_verb_has_a_schema():
    """A verb added without argument checks would take whatever a frame holds."""
    from partition.control.daemon import ARGS, _ops

    class Stub:
        def __getattr__(self, name):
            return None
    ops = _ops(Stub())
    assert set(ARGS) == set(ops) | {"shutdown"}
    for op, (allowed, _) in ops.items():
        assert set(ARGS[op]) == allowed, op
