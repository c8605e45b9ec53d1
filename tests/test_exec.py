"""``mkctl exec NAME -- CMD``: a command inside a running instance (kerf 0.4's exec).

Its stdio is relayed, its exit status returned; it is pinned to the instance's CPUs, sits in its
cgroups, sees its namespaces, runs under its seccomp filter and dies with it."""

import os
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.system      # real machines: pytest -m "not system" skips them

HERE = os.path.dirname(os.path.abspath(__file__))
PICKY = os.path.join(HERE, "kernels", "picky.py")
MKCTL = [sys.executable, "-m", "partition.control.cli"]
CPUS = sorted(os.sched_getaffinity(0))
PYTHON = os.path.realpath(sys.executable)      # not a shim script: a shim forks


def mk(run_dir, *args, **kw):
    return subprocess.run(MKCTL + [args[0], "--run-dir", run_dir, *args[1:]],
                          capture_output=True, text=True, timeout=60, **kw)


@pytest.fixture
def running(run_dir):
    for args in (("init", "--cpus", str(CPUS[-1]), "--memory", "64M", "--host-cpus",
                  ",".join(map(str, CPUS[:-1])) or "none", "--oversubscribe"),
                 ("create", "a", "--cpus", str(CPUS[-1]), "--memory", "16M"),
                 ("load", "a", "--kernel", PICKY), ("start", "a")):
        r = mk(run_dir, *args)
        assert r.returncode == 0, r.stderr
    return run_dir


def test_exec_relays_stdio_and_exit_status(running):
    r = mk(running, "exec", "a", "--", "/bin/cat", input="through the instance\n")
    assert r.returncode == 0 and r.stdout == "through the instance\n", r.stderr
    code = ("import os, sys; print(sorted(os.sched_getaffinity(0)), os.path.exists('/proc/self'),"
            " os.access('/', os.W_OK)); sys.exit(3)")
    r = mk(running, "exec", "a", "--", PYTHON, "-c", code)
    assert r.returncode == 3, r.stderr
    # pinned to the instance's CPU; the instance's view: no /proc, a read-only root
    assert r.stdout.strip() == f"[{CPUS[-1]}] False False"


def test_exec_is_contained_with_the_instance(running):
    # the kernel's own filter: no fork (SIGSYS, 128 + 31), no sockets
    r = mk(running, "exec", "a", "--", PYTHON, "-c", "import os; os.fork()")
    assert r.returncode == 128 + 31
    r = mk(running, "exec", "a", "--", "/nonexistent-program")
    assert r.returncode == 127 and "could not be started inside 'a'" in r.stderr
    # it is under the instance: it dies with it
    sleeper = subprocess.Popen(MKCTL + ["exec", "--run-dir", running, "a", "--", "/bin/sleep",
                                        "60"], stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 10
        kernel = None
        while kernel is None:
            assert time.monotonic() < deadline, "the command never appeared"
            for p in os.listdir("/proc"):
                if p.isdigit():
                    try:
                        with open(f"/proc/{p}/cmdline", "rb") as f:
                            if f.read() == b"/bin/sleep\x0060\x00":
                                kernel = int(p)
                    except OSError:
                        pass
            time.sleep(0.05)
        with open(f"/proc/{kernel}/cgroup") as f:
            assert any("multikernel-" in line for line in f)
        assert mk(running, "kill", "a", "--force").returncode == 0
        assert sleeper.wait(timeout=30) == 128 + 9
    finally:
        if sleeper.poll() is None:
            sleeper.kill()
        sleeper.wait()


def test_exec_needs_a_running_instance(running):
    assert mk(running, "kill", "a").returncode == 0
    r = mk(running, "exec", "a", "--", "/bin/true")
    assert r.returncode == 1 and "exec runs a command inside a running instance" in r.stderr
    # with no command, exec still boots, saying that start is the verb now
    r = mk(running, "exec", "a")
    assert r.returncode == 0 and "deprecated" in r.stderr and "mkctl start" in r.stderr
