"""Small helpers shared by the tests that drive an in-process machine."""

import contextlib
import gc
import os
import subprocess
import sys
import time

import libfdt
import pytest

CPUS = sorted(os.sched_getaffinity(0))


def up(m, name, kernel="kernels.echo:EchoKernel", cmdline="", cpu=None, memory="4M", **create):
    """Create, load and exec one instance (on the last CPU unless told)."""
    m.create(name, cpus=str(CPUS[-1] if cpu is None else cpu), memory=memory, **create)
    m.load(name, kernel, cmdline)
    return m.exec(name)


#: what an instance's record says that moves on its own while nothing is asked of it: how long
#: ago its loop moved and whether its kernel sleeps on its doorbell right now
MOVES_ON_ITS_OWN = ("progress_age_s", "waiting")


def settled(record):
    """An instance record (describe) or a whole snapshot, less what moves on its own."""
    if "instances" in record:
        return {**record, "instances": [settled(i) for i in record["instances"]]}
    return {k: v for k, v in record.items() if k not in MOVES_ON_ITS_OWN}


def wait_until(m, pred, timeout=10.0):
    """Drive the machine until ``pred()`` holds; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "condition not reached in time"
        m.poll(0.01)


def without_c(why: str) -> None:
    """The C half of the ring is missing: skipped on a user's machine, a failure where CI asks
    for it (MK_REQUIRE_C=1, set by .ci/run)."""
    if os.environ.get("MK_REQUIRE_C") == "1":
        pytest.fail(f"{why}, and MK_REQUIRE_C=1 requires it: pip install -e . and read its "
                    "warnings", pytrace=False)
    pytest.skip(why)


MKCTL = [sys.executable, "-m", "partition.control.cli"]


def mk(run_dir, *args, check=True, timeout=60, **kw):
    """Run mkctl against ``run_dir``; fail the test (with its output) on a non-zero exit."""
    p = subprocess.run(MKCTL + ["--run-dir", run_dir, *args], capture_output=True, text=True,
                       timeout=timeout, **kw)
    if check and p.returncode != 0:
        raise AssertionError(f"mkctl {' '.join(args)} -> {p.returncode}\n{p.stdout}\n{p.stderr}")
    return p


def dtb(spec: dict) -> bytes:
    """A DTB from a nested dict: a dict value is a child node, str a string property, bytes a
    raw one; insertion order is the order in the blob."""
    sw = libfdt.FdtSw()
    sw.finish_reservemap()

    def node(name, body):
        sw.begin_node(name)
        for key, value in body.items():
            if isinstance(value, str):
                sw.property_string(key, value)
            elif isinstance(value, bytes):
                sw.property(key, value)
        for key, value in body.items():
            if isinstance(value, dict):
                node(key, value)
        sw.end_node()

    node("", spec)
    fdt = sw.as_fdt()
    fdt.pack()
    return bytes(fdt.as_bytearray())


@contextlib.contextmanager
def no_descriptor_leaked():
    """This process's descriptors are the same after the block as before it. What an earlier
    test left to the cycle collector (an xdist worker runs many tests in one process) is
    collected first and the collector held off during the block, so a descriptor it would
    close meanwhile is not mistaken for one the block took or gave back."""
    gc.collect()
    was = gc.isenabled()
    gc.disable()
    try:
        before = set(os.listdir("/proc/self/fd"))
        yield
        assert set(os.listdir("/proc/self/fd")) == before
    finally:
        if was:
            gc.enable()


def host_pids(cmdline: bytes) -> list[int]:
    """Processes of the host whose command line is exactly ``cmdline`` (NUL-separated): what
    a userland test looks for outside the instance after the instance is gone."""
    out = []
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                with open(f"/proc/{p}/cmdline", "rb") as f:
                    if f.read() == cmdline:
                        out.append(int(p))
            except OSError:
                pass
    return out


def until(pred, timeout=10.0, what="the condition"):
    """Poll ``pred`` every 50 ms until it returns something true, and return that."""
    deadline = time.monotonic() + timeout
    while not (value := pred()):
        assert time.monotonic() < deadline, f"{what} never held"
        time.sleep(0.05)
    return value

