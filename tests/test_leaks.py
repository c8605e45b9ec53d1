"""The leak check (conftest.no_leaks, leaks.py) on a shared host: a machine somebody else starts
while a test runs is not the test's leak; what the test's own machines leave still is."""

import os
import shutil
import subprocess
import tempfile
import threading
import time
import uuid

import posix_ipc
import psutil
import pytest
from helpers import CPUS, mk
from leaks import LEDGER, MARK, SETTLE_S, cgroup_entries, cgroup_owners, leaks, shm_entries

#: the settling time of the checks these tests run on objects they make and forget themselves:
#: what is tested is whether such an object counts, not the length of the wait (SETTLE_S, for
#: a machine on its way out), which would only keep the other workers waiting
QUICK_SETTLE_S = 0.5

pytestmark = pytest.mark.system      # real machines: pytest -m "not system" skips them


def _init_args():
    return ["init", "--memory", "64M", "--oversubscribe", "--cpus", ",".join(map(str, CPUS)),
            "--host-cpus", str(CPUS[0])]


def _supervisor(run_dir):
    with open(os.path.join(run_dir, "machine.pid")) as f:
        return int(f.read().split()[0])


def _shm_mapped_by(pid):
    """The /dev/shm objects process ``pid`` maps (a machine's host maps its arena)."""
    with open(f"/proc/{pid}/maps") as f:
        return {os.path.basename(line.split()[-1]) for line in f
                if line.rstrip("\n").split()[-1].startswith("/dev/shm/")}


def test_a_machine_somebody_else_starts_mid_test_is_not_the_tests_leak():
    """Another user's experiment (not of this session: started from elsewhere, its own
    environment) starts a survivable machine while the test runs; its run directory sits
    outside /dev/shm, so only its arena and its cgroup appear there, named after a run
    directory the test never heard of."""
    shm_before, cg_before = shm_entries(), cgroup_entries()
    parent = tempfile.mkdtemp(prefix="mkt-other-")
    other = os.path.join(parent, f"mk{uuid.uuid4().hex[:6]}")
    env = {k: v for k, v in os.environ.items() if k != MARK}
    try:
        mk(other, *_init_args(), env=env)
        host = _supervisor(other)
        assert os.getpid() not in [p.pid for p in psutil.Process(host).parents()]
        made = _shm_mapped_by(host) & (shm_entries() - shm_before)
        assert made, "the other machine made no /dev/shm object: nothing was checked"
        # (a third machine on this host may come and go meanwhile: only the other's count)
        its_cgroups = {e for e in cgroup_entries() - cg_before if host in cgroup_owners(e)}
        assert its_cgroups, "the other machine made no cgroup"
        shm, cgroups = leaks(shm_before, cg_before)
        assert not made & set(shm), f"blamed for the other machine's {sorted(made & set(shm))}"
        assert not its_cgroups & set(cgroups), f"blamed for the other machine's {cgroups}"
    finally:
        mk(other, "shutdown", env=env, check=False)
        shutil.rmtree(parent, ignore_errors=True)


def test_the_tests_own_machine_left_running_is_a_leak(run_dir):
    """The session's own machine runs as a daemon that left its parent (mkctl init starts it
    in a new session): still the test's, its run directory, arena and cgroup all counted."""
    shm_before, cg_before = shm_entries(), cgroup_entries()
    mk(run_dir, *_init_args())
    host = _supervisor(run_dir)
    assert os.getpid() not in [p.pid for p in psutil.Process(host).parents()]
    shm, cgroups = leaks(shm_before, cg_before)
    assert os.path.basename(run_dir) in shm
    arena = _shm_mapped_by(host) - {os.path.basename(run_dir)}
    assert arena and arena <= set(shm), f"the machine's {sorted(arena)} not counted in {shm}"
    assert [c for c in cgroups if host in cgroup_owners(c)], "the machine's cgroup not counted"
    mk(run_dir, "shutdown")
    shm, cgroups = leaks(shm_before, cg_before)
    assert os.path.basename(run_dir) not in shm and not arena & set(shm)
    assert not [c for c in cgroups if host in cgroup_owners(c)]


@pytest.mark.alone      # its forgotten object is, for a moment, every worker's unheld one
def test_an_object_nobody_holds_any_more_is_a_leak():
    """Made by the test and forgotten: no live process holds it, whatever its name."""
    shm_before, cg_before = shm_entries(), cgroup_entries()
    name = f"/mkt-forgotten-{uuid.uuid4().hex[:8]}"
    posix_ipc.SharedMemory(name, posix_ipc.O_CREX, size=4096).close_fd()
    try:
        assert name[1:] in leaks(shm_before, cg_before, settle=QUICK_SETTLE_S)[0]
    finally:
        posix_ipc.unlink_shared_memory(name)
    assert name[1:] not in leaks(shm_before, cg_before, settle=QUICK_SETTLE_S)[0]


@pytest.mark.alone      # no sibling worker's running test to wait for besides the fake one
def test_an_unheld_object_waits_for_the_test_another_session_is_running():
    """Under xdist another worker's test kills a host and removes what it left seconds later:
    an object nobody holds is not counted while a session that was running a test when it was
    found still runs it; once that test is over, what stays is counted."""
    shm_before, cg_before = shm_entries(), cgroup_entries()
    other = subprocess.Popen(["sleep", "60"])             # a live pid for the other session
    entry = os.path.join(LEDGER.dir, f"{other.pid}-{uuid.uuid4().hex[:12]}")
    os.makedirs(LEDGER.dir, exist_ok=True)
    names = [f"/mkt-other-{uuid.uuid4().hex[:8]}" for _ in range(2)]
    try:
        with open(entry, "w") as f:
            f.write("7 running")
        for name in names:
            posix_ipc.SharedMemory(name, posix_ipc.O_CREX, size=4096).close_fd()
        found = {}
        check = threading.Thread(target=lambda: found.update(
            shm=leaks(shm_before, cg_before, settle=QUICK_SETTLE_S)[0]))
        t0 = time.monotonic()
        check.start()
        time.sleep(QUICK_SETTLE_S + 1.0)
        assert check.is_alive(), "counted while the other session's test still ran"
        posix_ipc.unlink_shared_memory(names[0])         # the other test cleans up one,
        with open(entry, "w") as f:                       # and ends
            f.write("7 checking")
        check.join(timeout=60)
        assert not check.is_alive() and time.monotonic() - t0 < SETTLE_S + 30
        assert names[0][1:] not in found["shm"]           # gone: nobody's leak
        assert names[1][1:] in found["shm"]               # stays: counted
    finally:
        for name in names:
            try:
                posix_ipc.unlink_shared_memory(name)
            except posix_ipc.ExistentialError:
                pass
        os.unlink(entry)
        other.kill()
        other.wait()


def test_an_orphan_forked_without_exec_holding_an_object_is_the_tests():
    """A process this session forks without executing (an in-process machine's kernel, its
    zygote, a host surviving in a fork) and whose parent then dies is adopted by init: no
    ancestor ties it to the session, only the mark in its environment, which it has from the
    session's block, not from an exec. What it holds is the test's leak."""
    shm_before, cg_before = shm_entries(), cgroup_entries()
    name = f"/mkt-orphan-{uuid.uuid4().hex[:8]}"
    r, w = os.pipe()
    middle = os.fork()
    if middle == 0:                                  # forks the holder, and dies at once
        try:
            os.close(r)
            if os.fork() == 0:
                shm = posix_ipc.SharedMemory(name, posix_ipc.O_CREX, size=4096)
                os.write(w, b"%d\n" % os.getpid())
                while True:
                    time.sleep(60)                   # holds the fd until killed
                shm.close_fd()
            os._exit(0)
        finally:
            os._exit(1)
    os.close(w)
    holder = None
    try:
        holder = int(os.read(r, 32))
        os.waitpid(middle, 0)
        assert os.getpid() not in [p.pid for p in psutil.Process(holder).parents()]
        assert name[1:] in leaks(shm_before, cg_before)[0]
    finally:
        os.close(r)
        if holder is not None:
            os.kill(holder, 9)
            psutil.Process(holder).wait(timeout=10)
        posix_ipc.unlink_shared_memory(name)
