"""An instance's userland (guest/userland.py), started by the launcher directly and through
``mkctl exec``: real programs, real namespaces, real cgroups; every process reaped."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap

import pytest

from helpers import host_pids, until
from partition.bench import userland as bench
from partition.errors import ProcessLimitZero, RootfsMissing
from partition.guest import userland

pytestmark = pytest.mark.system   # runs real processes (git, the tool, userlands)

HERE = os.path.dirname(os.path.abspath(__file__))
PICKY = os.path.join(HERE, "kernels", "picky.py")
MKCTL = [sys.executable, "-m", "partition.control.cli"]
CPUS = sorted(os.sched_getaffinity(0))
PYTHON = os.path.realpath(sys.executable)      # not a shim script


def mk(run_dir, *args, **kw):
    return subprocess.run(MKCTL + [args[0], "--run-dir", run_dir, *args[1:]],
                          capture_output=True, text=True, timeout=60, **kw)


def bare(name="u", **kw) -> userland.Identity:
    """A userland of no instance (no cgroups): what the namespaces and filter do alone."""
    return userland.Identity(name=name, cpus=[CPUS[-1]], cgroup_procs=[], **kw)


def run(identity, argv):
    """Start, wait; (exit status, reason), with stdout captured through a pipe."""
    r, w = os.pipe()
    saved = os.dup(1)
    os.dup2(w, 1)
    try:
        started = userland.start(identity, argv)
    finally:
        os.dup2(saved, 1)
        os.close(saved)
        os.close(w)
    out = b""
    while chunk := os.read(r, 65536):
        out += chunk
    os.close(r)
    return started.wait(), started.reason, out.decode()


# -- the launcher alone ---------------------------------------------------------------------
def test_namespaces_of_its_own():
    code = textwrap.dedent("""
        import os, socket
        print(socket.gethostname())
        print(sorted(p for p in os.listdir('/proc') if p.isdigit()))
        print(socket.if_nameindex())
        print(os.access('/', os.W_OK), os.access('/tmp', os.W_OK), os.access('/run', os.W_OK))
        print(sorted(os.listdir('/dev')))
        print(open('/proc/self/status').read().count('0000000000000000'))
    """)
    status, why, out = run(bare("db"), [PYTHON, "-c", code])
    assert status == 0, why
    lines = out.splitlines()
    assert lines[0] == "db"                                    # UTS: the instance's name
    assert lines[1] == "['1', '2']"                            # PID: its init and itself
    assert lines[2] == "[(1, 'lo')]"                           # network: lo only
    assert lines[3] == "False True True"                       # root read-only, scratch not
    assert lines[4] == str(sorted(["console", "fd", "full", "null", "random", "shm", "stderr",
                                   "stdin", "stdout", "tty", "urandom", "zero"]))
    assert int(lines[5]) >= 5                                  # every capability set empty


def test_loopback_is_up_for_a_server_and_its_client():
    code = textwrap.dedent("""
        import os, socket
        srv = socket.socket(); srv.bind(('127.0.0.1', 0)); srv.listen()
        pid = os.fork()
        if pid == 0:
            c, _ = srv.accept(); c.sendall(c.recv(100).upper()); os._exit(0)
        cl = socket.create_connection(srv.getsockname()); cl.sendall(b'ping')
        print(cl.recv(100).decode()); os.waitpid(pid, 0)
    """)
    status, why, out = run(bare(), [PYTHON, "-c", code])
    assert (status, out.strip()) == (0, "PING"), why


def test_a_program_that_does_not_exist_exits_127_with_the_reason():
    status, why, _ = run(bare(), ["/no/such/program"])
    assert status == 127 and "/no/such/program" in why and "No such file" in why


def test_refusals_before_anything_starts(tmp_path):
    with pytest.raises(RootfsMissing) as e:
        userland.start(bare(rootfs=str(tmp_path / "absent")), ["/bin/true"])
    assert e.value.code == "ENOENT"
    (tmp_path / "a-file").write_text("")
    with pytest.raises(RootfsMissing):
        userland.start(bare(rootfs=str(tmp_path / "a-file")), ["/bin/true"])
    # an instance whose process limit is 0 (the host's pids.max beside its procs file)
    (tmp_path / "pids.max").write_text("0\n")
    spec = userland.Identity("z", [CPUS[-1]], [str(tmp_path / "cgroup.procs")])
    with pytest.raises(ProcessLimitZero) as e:
        userland.start(spec, ["/bin/true"])
    assert e.value.code == "EINVAL"


def test_the_init_kills_what_the_program_left_when_it_exits():
    status, why, _ = run(bare(), ["/bin/sh", "-c", "sleep 302 & exit 4"])
    assert status == 4, why
    assert host_pids(b"sleep\x00302\x00") == []


def test_told_to_stop_the_userland_dies_whole():
    started = userland.start(bare(), ["/bin/sh", "-c", "sleep 303 & sleep 303"])
    try:
        until(lambda: len(host_pids(b"sleep\x00303\x00")) == 2, what="both sleeps")
        started.signal(signal.SIGTERM)
        assert started.wait() == 128 + signal.SIGTERM
        assert host_pids(b"sleep\x00303\x00") == []
    finally:
        if started.status is None:
            os.kill(started.pid, signal.SIGKILL)
            started.wait()


def test_the_console_is_the_callers_terminal():
    master, slave = os.openpty()
    try:
        status, why, _ = run(bare(console=os.ttyname(slave)),
                             ["/bin/sh", "-c", "echo to the console > /dev/console"])
        assert status == 0, why
        assert os.read(master, 100).replace(b"\r", b"") == b"to the console\n"
    finally:
        os.close(master)
        os.close(slave)


def test_the_fork_exec_bench_runs_both_loops():
    """The figures are the bench's to judge (noise here); this holds that both loops run and
    that the userland's one really ran inside (its output came through the pipe)."""
    r = bench.compare(bare("bench"), n=20, rounds=1)
    assert r["host_per_s"] > 0 and r["userland_per_s"] > 0 and r["ratio"] > 0


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


def test_a_rootfs_is_the_root_read_only(tmp_path):
    _mini_rootfs(tmp_path)
    status, why, out = run(bare(rootfs=str(tmp_path)), [
        "/bin/sh", "-c", "cat /etc/marker; echo /*; echo x > /etc/new 2>/dev/null || echo ro; "
                         "echo y > /tmp/y && cat /tmp/y"])
    assert status == 0, why
    marker, listing, ro, tmp = out.splitlines()
    assert marker == "inside the rootfs"
    assert set(listing.split()) <= {"/bin", "/etc", "/proc", "/dev", "/tmp", "/run", "/lib",
                                    "/lib64", "/usr"}       # nothing of the host's root
    assert (ro, tmp) == ("ro", "y")
    assert not (tmp_path / "etc" / "new").exists() and not (tmp_path / "tmp" / "y").exists()


# -- through mkctl exec, under a running instance --------------------------------------------
@pytest.fixture
def running(run_dir):
    for args in (("init", "--cpus", str(CPUS[-1]), "--memory", "64M", "--host-cpus",
                  ",".join(map(str, CPUS[:-1])) or "none", "--oversubscribe"),
                 ("create", "a", "--cpus", str(CPUS[-1]), "--memory", "16M"),
                 ("load", "a", "--kernel", PICKY), ("start", "a")):
        r = mk(run_dir, *args)
        assert r.returncode == 0, r.stderr
    return run_dir


def test_exec_runs_a_shell_pipeline_and_a_server_with_its_client(running):
    r = mk(running, "exec", "a", "--", "/bin/sh", "-c", "echo hi | cat; ls /; hostname")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == "hi" and "usr" in lines and lines[-1] == "a"
    code = textwrap.dedent("""
        import os, socket
        path = '/tmp/srv.sock'
        srv = socket.socket(socket.AF_UNIX); srv.bind(path); srv.listen()
        pid = os.fork()
        if pid == 0:
            c, _ = srv.accept(); c.sendall(c.recv(100)[::-1]); os._exit(0)
        cl = socket.socket(socket.AF_UNIX); cl.connect(path); cl.sendall(b'abc')
        print(cl.recv(100).decode()); os.waitpid(pid, 0)
    """)
    r = mk(running, "exec", "a", "--", PYTHON, "-c", code)
    assert (r.returncode, r.stdout.strip()) == (0, "cba"), r.stderr


@pytest.mark.parametrize("end", [("fault", "a", "panic"), ("fault", "a", "kill"), ("kill", "a")],
                         ids=["panic", "kill-fault", "halt"])
def test_the_instance_ending_leaves_no_process_of_an_exec_behind(running, end):
    shell = subprocess.Popen(MKCTL + ["exec", "--run-dir", running, "a", "--", "/bin/sh", "-c",
                                      "sleep 304 & sleep 304 & wait"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        sleeps = until(lambda: (p := host_pids(b"sleep\x00304\x00")) and len(p) == 2 and p,
                       what="the exec's two sleeps")
        assert mk(running, *end).returncode == 0
        assert shell.wait(timeout=30) == 128 + signal.SIGKILL     # killed with its instance
        until(lambda: not any(os.path.exists(f"/proc/{p}") for p in sleeps),
              what="every process of the userland gone")
    finally:
        if shell.poll() is None:
            shell.kill()
        shell.wait()
