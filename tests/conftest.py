import os
import subprocess
import sys
import uuid

import psutil
import pytest
from leaks import cgroup_entries, explain_cgroup, explain_shm, leaks, mark_session, shm_entries

HERE = os.path.dirname(os.path.abspath(__file__))
MISBEHAVING = os.path.join(HERE, "kernels", "misbehaving.py")

mark_session()      # what the tests start is the session's, daemons included (leaks.py)


@pytest.fixture(autouse=True)
def no_leaks():
    """Every test must reap what it started and remove the shared-memory objects and the
    cgroups it made; what other machines on the host made meanwhile is theirs (leaks.py)."""
    before = shm_entries()
    cg_before = cgroup_entries()
    yield
    kids = psutil.Process().children(recursive=True)
    for k in kids:
        k.kill()
    new, cg_new = leaks(before, cg_before)
    assert not kids, f"test left child processes: {[k.pid for k in kids]}"
    assert not new, f"test left /dev/shm entries: {[explain_shm(e) for e in new]}"
    assert not cg_new, f"test left cgroups: {[explain_cgroup(e) for e in cg_new]}"

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
