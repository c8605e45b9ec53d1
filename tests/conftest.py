import os
import subprocess
import sys
import time
import uuid

import psutil
import pytest

from partition.host import rundir

HERE = os.path.dirname(os.path.abspath(__file__))
MISBEHAVING = os.path.join(HERE, "kernels", "misbehaving.py")


def shm_entries() -> set[str]:
    return set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()


def _foreign(entry: str) -> bool:
    """A run directory some other live process (another test run) owns: not our leak. A
    survivable machine's arena (``mk-arena-<key>``, rundir.machine_key: the run directory's
    basename, a hash of its real path) belongs to its run directory's owner."""
    if entry.startswith("mk-arena-"):
        key = entry[len("mk-arena-"):]
        run = key.rpartition("-")[0]
        if os.path.isdir(os.path.join("/dev/shm", run)) and \
                rundir.machine_key(os.path.join("/dev/shm", run)) == key:
            return _foreign(run)
        # (the basename alone: a machine of an older tree running beside this one)
        return os.path.isdir(os.path.join("/dev/shm", key)) and _foreign(key)
    pidfile = os.path.join("/dev/shm", entry, "machine.pid")
    for _ in range(2):
        try:
            with open(pidfile) as f:
                pid = int(f.read().split()[0])
            break
        except (OSError, ValueError, IndexError):
            time.sleep(0.2)      # a foreign machine being set up writes its pidfile at once
    else:
        return not os.path.exists(os.path.join("/dev/shm", entry))
    return _another_runs(pid)


def _another_runs(pid: int) -> bool:
    """``pid`` lives and is neither this test process nor one of its children."""
    if pid == os.getpid() or not psutil.pid_exists(pid):
        return False
    try:
        return os.getpid() not in [p.pid for p in psutil.Process(pid).parents()]
    except psutil.Error:
        return False


def cgroup_entries() -> set[str]:
    """The machines' cgroup directories (host/cgroups.py) in the pids hierarchy (or v2)."""
    for base in ("/sys/fs/cgroup/pids", "/sys/fs/cgroup"):
        if os.path.isdir(base):
            return {e for e in os.listdir(base) if e.startswith("multikernel-")}
    return set()


def _foreign_cgroup(entry: str) -> bool:
    """Owned by a live process that is not this test's (another test run)."""
    try:
        pid = int(entry.split("-")[1].removeprefix("s"))    # s<pid>: a survivable machine's
    except (IndexError, ValueError):
        return False
    return _another_runs(pid)


@pytest.fixture(autouse=True)
def no_leaks():
    """Every test must reap what it started and remove the shared-memory objects and the
    cgroups it made."""
    before = shm_entries()
    cg_before = cgroup_entries()
    yield
    kids = psutil.Process().children(recursive=True)
    for k in kids:
        k.kill()
    new = [e for e in shm_entries() - before if not _foreign(e)]
    cg_new = [e for e in cgroup_entries() - cg_before if not _foreign_cgroup(e)]
    assert not kids, f"test left child processes: {[k.pid for k in kids]}"
    assert not new, f"test left /dev/shm entries: {sorted(new)}"
    assert not cg_new, f"test left cgroups: {sorted(cg_new)}"


@pytest.fixture
def misbehaving() -> str:
    return MISBEHAVING


def mkctl_cmd() -> list[str]:
    return [sys.executable, "-m", "partition.control.cli"]


@pytest.fixture
def run_dir():
    """A run directory for a supervisor a test starts; whatever happened, nothing is left:
    the machine is shut down, or a stale directory removed."""
    path = f"/dev/shm/mkt-{uuid.uuid4().hex[:8]}"
    yield path
    if os.path.exists(path):
        subprocess.run(mkctl_cmd() + ["--run-dir", path, "shutdown"], capture_output=True,
                       timeout=60)
    assert not os.path.exists(path)
