"""``mkctl exec NAME -- CMD``: a command inside a running instance (kerf 0.4's exec).

Its stdio is relayed, its exit status returned; it is pinned to the instance's CPUs, sits in its
cgroups, sees its namespaces, runs under its seccomp filter and dies with it."""

import fcntl
import os
import subprocess
import sys
import time

import pytest
from helpers import host_pids

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
    code = ("import os, sys; print(sorted(os.sched_getaffinity(0)), sorted(p for p in "
            "os.listdir('/proc') if p.isdigit()), os.access('/', os.W_OK)); sys.exit(3)")
    r = mk(running, "exec", "a", "--", PYTHON, "-c", code)
    assert r.returncode == 3, r.stderr
    # pinned to the instance's CPU; the userland's view: a /proc of its own PID namespace
    # (its init and the command: the instance's one userland, where the first exec's cat
    # was pid 2), a read-only root
    assert r.stdout.strip() == f"[{CPUS[-1]}] ['1', '3'] False"


def test_exec_is_contained_with_the_instance(running):
    # the userland's filter (issue 22): fork allowed, a mount refused (EPERM, not SIGSYS)
    r = mk(running, "exec", "a", "--", PYTHON, "-c", "import os, sys; pid = os.fork(); "
           "pid or os._exit(5); sys.exit(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))")
    assert r.returncode == 5, r.stderr
    r = mk(running, "exec", "a", "--", "/bin/mount", "-t", "tmpfs", "none", "/tmp")
    assert r.returncode not in (0, 128 + 31) and "permission denied" in r.stderr.lower()
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


class Terminal:
    """mkctl exec -it driven from a real pty, as a user at a terminal would: mkctl's stdin,
    stdout and stderr are the slave of a pty whose master this test reads and types into."""

    def __init__(self, run_dir, *argv, rows=24, cols=80):
        import pty
        import struct
        import termios
        self.master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
        self.proc = subprocess.Popen(MKCTL + ["exec", "--run-dir", run_dir, *argv],
                                     stdin=slave, stdout=slave, stderr=slave,
                                     start_new_session=True,
                                     preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0))
        os.close(slave)
        self.seen = b""

    def type(self, text):
        os.write(self.master, text.encode() if isinstance(text, str) else text)

    def expect(self, pattern, timeout=20):
        """Read until ``pattern`` (a regex on bytes) appears after what was already matched."""
        import re
        import select
        deadline = time.monotonic() + timeout
        while True:
            m = re.search(pattern, self.seen)
            if m:
                self.seen = self.seen[m.end():]
                return m
            left = deadline - time.monotonic()
            assert left > 0, f"never saw {pattern!r}; the terminal showed {self.seen!r}"
            if select.select([self.master], [], [], left)[0]:
                try:
                    self.seen += os.read(self.master, 4096)
                except OSError:            # EIO: mkctl is gone, and the pty with it
                    assert re.search(pattern, self.seen), (pattern, self.seen)

    def drain(self, quiet=1.0):
        """Everything left to read: until the pty closes or ``quiet`` seconds pass silent."""
        import select
        while select.select([self.master], [], [], quiet)[0]:
            try:
                data = os.read(self.master, 4096)
            except OSError:                # EIO: mkctl is gone, and the pty with it
                return
            if not data:
                return
            self.seen += data

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)
        os.close(self.master)


def test_exec_it_is_a_terminal_with_job_control(running):
    t = Terminal(running, "-it", "a", "--", "/bin/sh", rows=33, cols=101)
    try:
        t.expect(rb"# ")                      # the shell's own prompt: root, inside
        t.type("PS1='m''k$ '\n")              # a prompt its own echo does not show
        t.expect(rb"mk\$ ")
        t.type("echo $((6*7))\n")
        t.expect(rb"\r\n42\r\nmk\$ ")
        # the window size set before start is the terminal's inside; stdin is a tty there
        t.type("stty size; tty\n")
        t.expect(rb"\r\n33 101\r\n/dev/pts/\d+\r\nmk\$ ")
        # Ctrl-C goes to the foreground job inside, not to mkctl: the sleep is gone, the
        # shell is back
        t.type("sleep 100\n")
        deadline = time.monotonic() + 10
        while not host_pids(b"sleep\x00100\x00"):
            assert time.monotonic() < deadline, "the sleep never started"
            time.sleep(0.05)
        t.type(b"\x03")
        t.expect(rb"mk\$ ")
        deadline = time.monotonic() + 10
        while host_pids(b"sleep\x00100\x00"):
            assert time.monotonic() < deadline, "Ctrl-C did not reach the sleep"
            time.sleep(0.05)
        assert t.proc.poll() is None, "Ctrl-C reached mkctl"
        # job control: Ctrl-Z stops the foreground job, fg brings it back
        t.type("sleep 101\n")
        deadline = time.monotonic() + 10
        while not host_pids(b"sleep\x00101\x00"):
            assert time.monotonic() < deadline, "the sleep never started"
            time.sleep(0.05)
        t.type(b"\x1a")
        t.expect(rb"[Ss]topped")
        t.expect(rb"mk\$ ")
        (pid,) = host_pids(b"sleep\x00101\x00")
        with open(f"/proc/{pid}/stat") as f:
            assert f.read().rpartition(")")[2].split()[0] == "T"
        t.type("fg\n")
        t.expect(rb"sleep 101")
        t.type(b"\x03")
        t.expect(rb"mk\$ ")
        # a resize of mkctl's terminal (SIGWINCH to mkctl) is the terminal's inside too
        import struct
        import termios
        fcntl.ioctl(t.master, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
        deadline = time.monotonic() + 10
        while True:
            t.type("stty size\n")
            m = t.expect(rb"\r\n(\d+ \d+)\r\nmk\$ ")
            if m.group(1) == b"40 120":
                break
            assert time.monotonic() < deadline, f"the size inside stayed {m.group(1)!r}"
            time.sleep(0.1)
        # the shell's exit status is mkctl's
        t.type("exit 7\n")
        assert t.proc.wait(timeout=30) == 7
        # mkctl's terminal was restored: cooked mode, echo and canonical input back on
        import termios
        lflag = termios.tcgetattr(t.master)[3]
        assert lflag & termios.ECHO and lflag & termios.ICANON and lflag & termios.ISIG
    finally:
        t.close()
    assert not host_pids(b"sleep\x00101\x00")


def test_exec_t_needs_a_terminal(running):
    r = mk(running, "exec", "-it", "a", "--", "/bin/true", stdin=subprocess.DEVNULL)
    assert r.returncode != 0 and "the input device is not a TTY" in r.stderr
    assert "[ENOTTY]" in r.stderr


def test_exec_t_alone_gives_a_terminal_and_reads_no_input(running):
    # -t without -i (docker's -t): the command's stdio is a pty of its own, mkctl's input is
    # not relayed, mkctl's terminal stays cooked, and a Ctrl-C at mkctl reaches the command
    # through the pty as its interrupt character
    t = Terminal(running, "-t", "a", "--", "/bin/sh", "-c",
                 "stty size; test -t 0 && echo stdin-is-a-tty; exec cat", rows=12, cols=34)
    try:
        t.expect(rb"12 34\r+\nstdin-is-a-tty\r+\n")
        t.type("typed at mkctl\n")
        t.expect(rb"typed at mkctl")                 # mkctl's own terminal's echo
        time.sleep(0.5)                              # what cat would print, were it relayed
        t.type(b"\x03")
        assert t.proc.wait(timeout=30) == 128 + 2
        t.drain()
        assert b"typed at mkctl" not in t.seen
    finally:
        t.close()


def test_exec_it_restores_the_terminal_when_mkctl_is_terminated(running):
    import signal
    import termios
    t = Terminal(running, "-it", "a", "--", "/bin/sh")
    try:
        t.expect(rb"# ")
        assert not termios.tcgetattr(t.master)[3] & termios.ECHO      # raw while it runs
        t.type("sleep 102\n")
        deadline = time.monotonic() + 10
        while not host_pids(b"sleep\x00102\x00"):
            assert time.monotonic() < deadline, "the sleep never started"
            time.sleep(0.05)
        t.proc.send_signal(signal.SIGTERM)
        assert t.proc.wait(timeout=30) == 128 + signal.SIGTERM
        lflag = termios.tcgetattr(t.master)[3]
        assert lflag & termios.ECHO and lflag & termios.ICANON and lflag & termios.ISIG
        # and the userland went with it
        deadline = time.monotonic() + 10
        while host_pids(b"sleep\x00102\x00"):
            assert time.monotonic() < deadline, "the userland outlived mkctl"
            time.sleep(0.05)
    finally:
        t.close()


def test_exec_it_of_a_missing_program_says_why(running):
    t = Terminal(running, "-it", "a", "--", "/no/such/program")
    try:
        assert t.proc.wait(timeout=30) == 127
        t.drain()
        assert b"/no/such/program: could not be started inside 'a'" in t.seen
    finally:
        t.close()
