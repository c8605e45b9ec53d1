"""The parked init (issue 22, item 9: boot to first answer): an instance with boot programs has
its next userland's init made while its kernel is loaded, set up and waiting; it starts the
programs only once the kernel is active, and any other change lets it go."""

import json
import os
import time

from helpers import mk

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
