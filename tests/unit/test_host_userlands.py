"""The host's bookkeeping of a userland (host/userlands.py) against fakes: what it does with a
run's descriptors once the run is over. No process: the run's descriptors are pipes."""

import os
import signal
import subprocess

import pytest

from partition.host.reactor import Reactor
from partition.host.table import InstanceTable
from partition.host.userlands import Run, Userlands


class Events:
    def __init__(self) -> None:
        self.said: list[str] = []

    def subscribe(self, _listener) -> None:
        pass

    def info(self, event, **_fields) -> None:
        self.said.append(event)

    warning = info


def test_a_run_forgotten_reads_nothing_from_a_number_reused():
    """Issue 22: the init's pipe is closed with its run; a report handler still queued for it
    (a stale key) must not read whatever descriptor got its number next."""
    reactor = Reactor()
    ul = Userlands(InstanceTable(), reactor, Events(), None, lambda _s: {},
                   lambda _i, _t: None, lambda _d, _t: True, "/nonexistent")
    fds = [os.pipe() for _ in range(3)]
    r, w = fds[0]
    run = Run(1, "a", 1, pid=0, pidfd=fds[1][0], start=0, report=r, console=fds[2][0],
              slave=fds[2][1])
    ul.runs[1] = run
    reused = None
    try:
        reactor.watch(r, "userland-report", None, lambda _i: ul._read_report(run))
        ul._forget(run)
        assert (run.report, run.pidfd, run.console, run.slave) == (-1, -1, -1, -1)
        reused, writer = os.pipe()                   # (the lowest number: the one closed)
        os.write(writer, b"ready\n")
        ul._read_report(run)
        assert not run.pending and not run.ready
        assert os.read(reused, 16) == b"ready\n"     # left to its owner
        os.close(writer)
    finally:
        reactor.close()
        for fd in (w, fds[1][1]):
            os.close(fd)
        if reused is not None:
            os.close(reused)


class Cgroups:
    """The instance's cgroup as a test makes it: ``members`` as cgroup.procs was read, and
    the procs file as it is by the time the host acts (the process gone, its number reused)."""

    def __init__(self, members, procs_file) -> None:
        self._members, self._procs = members, procs_file

    def members(self, _iid):
        return list(self._members)

    def procs_files(self, _iid):
        return [self._procs]


def test_a_resize_never_pins_a_pid_that_left_the_instance(tmp_path):
    """Issue 22: _repin pins the pids it read from cgroup.procs; one that is no longer the
    instance's when the host acts (here this test's own process: a number reused by a host
    process) keeps its affinity."""
    from host_fakes import instance
    mine = sorted(os.sched_getaffinity(0))
    if len(mine) < 2:
        import pytest
        pytest.skip("needs two CPUs to tell a pinning")
    procs = tmp_path / "cgroup.procs"
    procs.write_text("999999\n")                    # the instance's processes by now: not us
    table = InstanceTable()
    inst = instance(1, "a", cpus=[mine[-1]], pid=999998)
    table.add(inst)
    ul = Userlands(table, Reactor(), Events(), Cgroups([os.getpid()], str(procs)),
                   lambda _s: {}, lambda _i, _t: None, lambda _d, _t: True, "/nonexistent")
    ul.runs[1] = Run(1, "a", 1, pid=999997, pidfd=-1, start=0, report=-1, console=-1, slave=-1)
    try:
        ul._repin(1)
        assert sorted(os.sched_getaffinity(0)) == mine
    finally:
        os.sched_setaffinity(0, mine)
        ul.reactor.close()


@pytest.mark.system     # (a real process stands for the init: its pidfd is killed)
def test_a_kernel_halted_with_boot_programs_stops_its_userland():
    """fix2 item 4: active -> loaded of an instance with boot programs parks its next init
    and, independently, stops the running userland (not left to ``instance_exit`` alone)."""
    reactor = Reactor()
    ul = Userlands(InstanceTable(), reactor, Events(), None, lambda _s: {},
                   lambda _i, _t: None, lambda _d, _t: True, "/nonexistent")
    proc = subprocess.Popen(["sleep", "30"])
    pidfd = os.pidfd_open(proc.pid)
    try:
        ul.programs[1] = [["/bin/true"]]
        ul.runs[1] = run = Run(1, "a", 1, pid=proc.pid, pidfd=pidfd, start=0, report=-1,
                               console=-1, slave=-1)
        ul._on_event("state_change", {"instance": 1, "old": "active", "new": "loaded"}, 0.0)
        assert 1 in ul._park_due
        assert run.failure == "its kernel halted"
        assert proc.wait(5) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(pidfd)
        ul.closed = True
        reactor.close()
