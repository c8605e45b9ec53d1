"""The red team's findings on the instance-wide userland (issue 22, containment), each an attack
by an instance or a program inside it on its host, with real processes: the host's supervisor
lives on, the attack is refused or bounded, and the machine says what happened."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest
from helpers import CPUS, MKCTL, mk

pytestmark = pytest.mark.system   # runs real processes (supervisors, kernels, userlands)

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIBBLER = os.path.join(HERE, "kernels", "scribbler.py")
PICKY = os.path.join(HERE, "kernels", "picky.py")
PYTHON = os.path.realpath(sys.executable)


def machine_up(run_dir):
    mk(run_dir, "init", "--cpus", str(CPUS[-1]), "--memory", "64M", "--host-cpus",
       ",".join(map(str, CPUS[:-1])) or "none", "--oversubscribe")
    return run_dir


def show(run_dir, name):
    return json.loads(mk(run_dir, "show", "--format", "json", name).stdout)


def events(run_dir):
    with open(os.path.join(run_dir, "events.log")) as f:
        return [json.loads(line) for line in f if line.strip()]


def until(pred, timeout=30.0, what="the condition"):
    deadline = time.monotonic() + timeout
    while True:
        got = pred()
        if got:
            return got
        assert time.monotonic() < deadline, f"{what} not reached in {timeout} s"
        time.sleep(0.05)


def test_a_console_head_beyond_reason_is_healed_and_the_host_lives_on(run_dir):
    """The kernel writes its console header's head as 2**64-1; a boot program writes to
    /dev/console, which the host appends to that console: it heals the head (an event), the
    line is there, and the supervisor still answers."""
    machine_up(run_dir)
    mk(run_dir, "create", "a", "--cpus", str(CPUS[-1]), "--memory", "16M")
    mk(run_dir, "load", "a", "--kernel", SCRIBBLER,
       "--program", "/bin/sh -c 'sleep 0.5; echo boom > /dev/console'")
    mk(run_dir, "start", "a")
    until(lambda: "[console] boom" in mk(run_dir, "console", "a").stdout,
          what="the program's line in the console")
    healed = [e for e in events(run_dir) if e.get("event") == "console_healed"]
    assert healed and "beyond reason" in healed[0]["why"], healed
    assert show(run_dir, "a")["state"] == "active"            # the supervisor still answers
    assert not [e for e in events(run_dir) if e.get("event") == "handler_failed"]


@pytest.fixture
def visible_run_dir():
    """A second machine's run directory where a userland can see it (a host directory no
    userland covers: beside the checkout, unless that is under /tmp, as a CI clone is, whose
    own tmpfs hides it inside; then /var/lib); shut down and removed afterwards."""
    covered = ("/tmp/", "/var/tmp/", "/run/", "/dev/shm/")
    beside = os.path.dirname(HERE)
    where = beside if not (os.path.realpath(beside) + "/").startswith(covered) else "/var/lib"
    base = tempfile.mkdtemp(prefix=".mkt-peer-", dir=where)
    path = os.path.join(base, "run")
    try:
        yield path
    finally:
        if os.path.exists(path):
            subprocess.run([*MKCTL, "--run-dir", path, "shutdown"], capture_output=True,
                           timeout=60)
        shutil.rmtree(base, ignore_errors=True)


def test_a_userland_cannot_drive_another_machine(run_dir, visible_run_dir):
    """A program in machine A's userland (uid 0, no caps) sees machine B's control socket:
    B refuses it (an event says why) and its instance is untouched; mkctl on the host still
    drives B."""
    machine_up(run_dir)
    mk(run_dir, "create", "a", "--cpus", str(CPUS[-1]), "--memory", "16M")
    mk(run_dir, "load", "a", "--kernel", PICKY)
    mk(run_dir, "start", "a")
    b = machine_up(visible_run_dir)
    mk(b, "create", "victim", "--cpus", str(CPUS[-1]), "--memory", "16M")
    mk(b, "load", "victim", "--kernel", PICKY)
    mk(b, "start", "victim")
    before = show(b, "victim")
    r = mk(run_dir, "exec", "a", "--", PYTHON, "-m", "partition.control.cli", "--run-dir", b,
           "kill", "victim", "--force", check=False)
    assert r.returncode != 0, r.stdout + r.stderr
    assert "an instance may not drive a machine" in r.stderr, r.stderr
    refused = [e for e in events(b) if e.get("event") == "client_refused"]
    assert refused and "PID namespace" in refused[-1]["why"], refused
    after = show(b, "victim")                              # mkctl on the host still works
    assert (after["state"], after["pid"]) == ("active", before["pid"])
    mk(b, "kill", "victim", "--force")
    assert show(b, "victim")["state"] == "loaded"


REBOOT_AT_ONCE = ("import ctypes; ctypes.CDLL(None, use_errno=True).reboot(0x01234567); "
                  "import time; time.sleep(30)")


def test_a_userland_rebooting_in_a_loop_is_bounded_by_the_restart_intensity(machine):
    """A boot program that calls reboot(2) at once, every boot: each reboot is a restart of the
    supervisor's queue, counted against max_restarts (2 in 60 s here), after which the instance
    is given up (failed), not booted again forever."""
    m = machine
    m.create("a", cpus=str(CPUS[-1]), memory="16M", max_restarts=2, restart_window=60.0)
    m.load("a", "kernels.echo:EchoKernel", "", programs=[[PYTHON, "-c", REBOOT_AT_ONCE]])
    m.exec("a")
    inst = m.get("a")
    deadline = time.monotonic() + 60
    while inst.state.value != "failed":
        assert time.monotonic() < deadline, (inst.state, inst.counters, m.events.counts)
        assert m.events.counts.get("userland_reboot", 0) <= 3, m.events.counts
        m.poll(0.05)
    assert inst.counters["restarts"] == 2
    assert m.events.counts.get("userland_reboot") == 3
    assert "restart intensity exceeded" in (inst.failure or "")
    assert inst.last_exit.how == "forced"


LOOK_AT_PTS = r"""
import errno, os, sys
mounts = {line.split()[4]: line.split()[5] for line in open('/proc/self/mountinfo')}
print('dev', mounts['/dev'].split(',')[0])
print('pts', '/dev/pts' in mounts, os.stat('/dev/pts').st_uid)
for what, make in (('link', lambda: os.symlink('/dev/shm', '/dev/pts/99')),
                   ('file', lambda: os.close(os.open('/dev/pts/98', os.O_CREAT | os.O_WRONLY))),
                   ('unlink', lambda: os.unlink(sys.argv[1]))):
    try:
        make()
        print(what, 'done')
    except OSError as exc:
        print(what, errno.errorcode[exc.errno])
"""


def test_a_terminal_exec_shows_its_pty_without_a_writable_dev(run_dir):
    """mkctl exec -t shows its pty under /dev/pts inside; the userland's /dev is never made
    writable for it (/dev/pts is a tmpfs of its own, owned by nobody), so a program inside
    cannot plant a link there for the privileged relay to follow, nor remove the name."""
    from test_exec import Terminal
    machine_up(run_dir)
    mk(run_dir, "create", "a", "--cpus", str(CPUS[-1]), "--memory", "16M")
    mk(run_dir, "load", "a", "--kernel", PICKY)
    mk(run_dir, "start", "a")
    t = Terminal(run_dir, "-t", "a", "--", "/bin/sh", "-c", "tty; sleep 60")
    try:
        name = t.expect(rb"/dev/pts/\d+").group(0).decode()
        r = mk(run_dir, "exec", "a", "--", PYTHON, "-c", LOOK_AT_PTS, name, check=False)
        assert r.returncode == 0, r.stderr
        seen = dict(line.split(" ", 1) for line in r.stdout.splitlines())
        assert seen == {"dev": "ro", "pts": "True 65534", "link": "EACCES",
                        "file": "EACCES", "unlink": "EACCES"}, r.stdout
    finally:
        t.close()
    r = until(lambda: (r := mk(run_dir, "exec", "a", "--", "/bin/ls", "-A", "/dev/pts",
                               check=False)).stdout.strip() == "" and r,
              what="the pty's name gone with its exec")


def test_an_init_whose_start_fails_after_the_fork_is_killed_and_reaped(machine, monkeypatch):
    """The host is out of descriptors when it takes the init's pidfd (EMFILE): the start fails
    (UserlandFailed), and the init it forked is killed and reaped, not left running
    untracked; the next exec starts a userland as usual."""
    import errno

    import psutil

    from partition.errors import UserlandFailed
    m = machine
    m.create("a", cpus=str(CPUS[-1]), memory="16M")
    m.load("a", "kernels.echo:EchoKernel", "")
    m.exec("a")
    inst = m.get("a")
    before = {p.pid for p in psutil.Process().children()}

    def out_of_fds(_pid, *_a):
        raise OSError(errno.EMFILE, "Too many open files")
    with monkeypatch.context() as patch:
        patch.setattr(os, "pidfd_open", out_of_fds)
        with pytest.raises(UserlandFailed):
            m.userlands.ensure(inst)
    assert {p.pid for p in psutil.Process().children()} == before
    assert inst.id not in m.userlands.runs
    assert m.userlands.ensure(inst)["init"] > 0


def test_a_run_actions_flood_is_read_a_bounded_amount_per_step():
    """scenario/runstep.py: a program's stdout that never runs dry (here /dev/zero stands for
    a program writing faster than the runner reads, or a process it left behind holding the
    pipe) is read at most READ_PER_STEP bytes per step: the step returns, the run goes on."""
    from partition.guest.userland import Userland
    from partition.scenario import runstep
    relay = subprocess.Popen(["sleep", "30"])
    out = os.open("/dev/zero", os.O_RDONLY | os.O_NONBLOCK)
    r, w = os.pipe()
    programs = runstep.Programs()
    programs.running["flood"] = runstep.Started("flood", ["yes"], Userland(relay.pid, r), out,
                                                time.monotonic() + 60)

    def endless(*_):
        raise TimeoutError("a step read without end")
    old = signal.signal(signal.SIGALRM, endless)
    signal.setitimer(signal.ITIMER_REAL, 5.0)
    try:
        programs.step()
        programs.step()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
        relay.kill()
        relay.wait()
        for fd in (out, r, w):
            os.close(fd)
    p = programs.running["flood"]
    assert len(p.tail) == runstep.TAIL and p.status is None



def test_the_inits_inbox_is_read_a_bounded_number_of_datagrams_per_wake():
    """guest/userinit.py: any process inside may send to the init's inbox; a flood of junk
    is read RECEIVES_PER_WAKE datagrams a turn, so the init's loop (its reaping, its answers
    to reboot(2)) comes round between, and every descriptor sent with the junk is closed."""
    import select

    from partition.guest import userinit
    inbox, sender = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    inbox.setblocking(False)
    r, w = os.pipe()
    try:
        for _ in range(100):
            socket.send_fds(sender, [b"x"], [r])
        foreign: set[int] = set()
        before = len(os.listdir("/proc/self/fd"))
        userinit._take_listeners(inbox, foreign, select.poll())
        assert not foreign and len(os.listdir("/proc/self/fd")) == before
        left = 0
        while True:
            try:
                _, fds, _, _ = socket.recv_fds(inbox, 16, 4)
            except BlockingIOError:
                break
            left += 1
            for fd in fds:
                os.close(fd)
        assert left == 100 - userinit.RECEIVES_PER_WAKE
    finally:
        inbox.close()
        sender.close()
        os.close(r)
        os.close(w)


def test_the_userlands_init_keeps_no_mapping_of_the_arena(machine):
    """The init is forked from the host, which maps the whole arena (every instance's
    memory): it unmaps it before anything else, as an instance's trampoline does."""
    m = machine
    m.create("a", cpus=str(CPUS[-1]), memory="16M")
    m.load("a", "kernels.echo:EchoKernel", "")
    m.exec("a")
    init = m.userlands.ensure(m.get("a"))["init"]
    with open(f"/proc/{os.getpid()}/maps") as f:
        assert "mk-arena" in f.read()                  # (the host's own: the test can tell)
    with open(f"/proc/{init}/maps") as f:
        maps = f.read()
    assert "mk-arena" not in maps, [line for line in maps.splitlines() if "mk-arena" in line]
