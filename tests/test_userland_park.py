"""The parked init (issue 22, item 9: boot to first answer): an instance with boot programs has
its next userland's init made while its kernel is loaded, set up and waiting; it starts the
programs only once the kernel is active, and any other change lets it go."""

import json
import os
import signal
import time

import pytest
from helpers import mk

from partition.errors import BootFailed, BootTimeout
from partition.host.machine import Machine

pytestmark = pytest.mark.system   # runs real processes (a machine, its inits)

CPUS = sorted(os.sched_getaffinity(0))
NAME = "ulpark"
PROGRAM = "/bin/sh -c 'echo park-booted'"


def inits():
    """Host pids of the processes titled as this test's instance's init."""
    found = []
    for p in os.listdir("/proc"):
        if not p.isdigit():
            continue
        try:
            with open(f"/proc/{p}/cmdline", "rb") as f:
                if f.read().startswith(f"mk-init [{NAME}]".encode()):
                    found.append(int(p))
        except OSError:
            pass
    return found


def until(pred, what, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not (got := pred()):
        assert time.monotonic() < deadline, f"{what}: not in {timeout} s"
        time.sleep(0.05)
    return got


def starts(run_dir):
    with open(os.path.join(run_dir, "events.log")) as f:
        return [e for e in map(json.loads, filter(str.strip, f))
                if e["event"] == "userland_start"]


def console(run_dir):
    return mk(run_dir, "console", NAME, "--raw").stdout


def test_the_next_boots_init_waits_parked_for_its_kernel(run_dir):
    mk(run_dir, "init", "--cpus", str(CPUS[-1]), "--memory", "64M", "--host-cpus",
       ",".join(map(str, CPUS[:-1])) or "none", "--oversubscribe")
    mk(run_dir, "create", NAME, "--cpus", str(CPUS[-1]), "--memory", "16M")
    mk(run_dir, "load", NAME, "--kernel", "kernels.idle:IdleKernel", "--program", PROGRAM)
    # loaded: the init is there, set up, but no program ran and no run was recorded
    parked = until(inits, "a parked init while loaded")
    assert len(parked) == 1
    time.sleep(0.3)
    assert "park-booted" not in console(run_dir) and starts(run_dir) == []
    mk(run_dir, "start", NAME)
    until(lambda: "park-booted" in console(run_dir), "the boot program's line")
    assert [e["pid"] for e in starts(run_dir)] == parked      # the parked one became the run
    # halted: the next boot's init is parked at once; an unload lets it go
    mk(run_dir, "kill", NAME, "--force")
    until(lambda: inits() and inits() != parked, "a fresh parked init after the halt")
    assert len(starts(run_dir)) == 1
    mk(run_dir, "unload", NAME)
    mk(run_dir, "delete", NAME)              # at once: its cgroups go with the init let go
    until(lambda: inits() == [], "no init left after the unload")


# -- in-process: the host's own bookkeeping of a parked init -------------------------------
@pytest.fixture
def machine():
    with Machine(cpus=str(CPUS[-1]), memory="64M", host_cpus=str(CPUS[0]),
                 oversubscribe=True) as m:
        yield m


def parked_in(m, name="a"):
    """The parked init of ``name``, once the host made it (its reactor driven meanwhile)."""
    deadline = time.monotonic() + 10
    while (run := m.userlands.parked.get(m.get(name).id)) is None:
        assert time.monotonic() < deadline, "no parked init in 10 s"
        m.poll(0.05)
    return run


def alive(pid):
    """Whether ``pid`` is there and no zombie (a zombie is one its parent never reaped)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return None


def test_an_init_let_go_is_reaped_by_a_close_before_the_reactor_turns(machine):
    """fix2 item 1: an unload lets the parked init go; closing the machine before the
    reactor's next turn still reaps it and closes the host's descriptors of it."""
    m = machine
    m.create("a", cpus=str(CPUS[-1]), memory="16M")
    m.load("a", "kernels.idle:IdleKernel", "", programs=[["/bin/true"]])
    run = parked_in(m)
    m.unload("a")
    m.close()
    assert alive(run.pid) is None, f"the init left {alive(run.pid)}"
    assert (run.pidfd, run.report, run.console, run.slave) == (-1, -1, -1, -1)


def test_an_exec_before_the_due_turn_takes_the_parked_init(machine):
    """fix2 item 2: ``ensure`` (mkctl exec) on an instance just active, before the reactor's
    turn that unparks its init: that init becomes the run, no second one is forked."""
    m = machine
    m.create("a", cpus=str(CPUS[-1]), memory="16M")
    m.load("a", "kernels.idle:IdleKernel", "", programs=[["/bin/sleep", "30"]])
    run = parked_in(m)
    m.exec("a")
    got = m.userlands.ensure(m.get("a"))
    assert got["init"] == run.pid
    m.poll(0.2)
    assert m.userlands.runs[m.get("a").id] is run and not m.userlands.parked
    assert m.events.counts.get("userland_start") == 1


def test_a_failed_boot_counts_no_parked_init_as_its_orphan(machine):
    """fix2 item 3: the parked init lives in the instance's cgroups; a boot that fails kills
    it with the rest, but it is the host's fork, not an orphan of the kernel's."""
    m = machine
    m.create("a", cpus=str(CPUS[-1]), memory="16M")
    m.load("a", "kernels.idle:IdleKernel", "", programs=[["/bin/true"]])
    parked_in(m)
    inst = m.get("a")
    os.kill(inst.parked.pid, signal.SIGSTOP)    # its kernel never answers: a boot timeout
    with pytest.raises((BootFailed, BootTimeout)):
        m.exec("a")
    m.poll(0.2)
    assert inst.state.value == "failed" and m.events.counts.get("instance_exit") == 1
    assert "userland_start" not in m.events.counts
    assert "orphans_killed" not in m.events.counts, str(sorted(m.events.counts.items()))
