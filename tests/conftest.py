import os
import sys

import psutil
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
MISBEHAVING = os.path.join(HERE, "kernels", "misbehaving.py")


def shm_entries() -> set[str]:
    return set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()


@pytest.fixture(autouse=True)
def no_leaks():
    """Every test must reap what it started and remove the shared-memory objects it made."""
    before = shm_entries()
    yield
    kids = psutil.Process().children(recursive=True)
    for k in kids:
        k.kill()
    new = shm_entries() - before
    assert not kids, f"test left child processes: {[k.pid for k in kids]}"
    assert not new, f"test left /dev/shm entries: {sorted(new)}"


@pytest.fixture
def misbehaving() -> str:
    return MISBEHAVING


def mkctl_cmd() -> list[str]:
    return [sys.executable, "-m", "partition.cli"]
