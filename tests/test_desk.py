"""What a researcher meets at the desk: named processes, a followed console, mkctl top."""

import os
import re
import signal
import subprocess
import sys
import time

import psutil

from partition.control.cli import new_console_text

MKCTL = [sys.executable, "-m", "partition.control.cli"]
CPUS = sorted(os.sched_getaffinity(0))


def mk(run_dir, *args, **kw):
    r = subprocess.run(MKCTL + [args[0], "--run-dir", run_dir, *args[1:]], capture_output=True,
                       text=True, timeout=60, **kw)
    assert r.returncode == 0, f"mkctl {' '.join(args)}: {r.returncode}\n{r.stderr}"
    return r.stdout


def machine(run_dir, *kernels):
    mk(run_dir, "init", "--cpus", str(CPUS[-1]), "--host-cpus",
       ",".join(map(str, CPUS[:-1])) or "none", "--memory", "64M", "--oversubscribe")
    for name, spec, cmdline in kernels:
        mk(run_dir, "create", name, "--cpus", str(CPUS[-1]), "--memory", "4M")
        mk(run_dir, "load", name, "--kernel", spec, "--cmdline", cmdline)


def pid_of(run_dir, name):
    import json
    return json.loads(mk(run_dir, "show", name, "--format", "json"))["pid"]


def title(pid):
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read().replace(b"\0", b" ").decode().strip()


def test_processes_are_named_for_what_they_are(run_dir):
    machine(run_dir, ("db", "kernels.idle:IdleKernel", ""))
    sup = int(open(os.path.join(run_dir, "machine.pid")).read().split()[0])
    assert title(sup) == f"mk-host {run_dir}"
    parked = [p for p in psutil.process_iter(["cmdline"])
              if "mk[1:db] kernels.idle:IdleKernel (parked)" in " ".join(p.info["cmdline"] or [])]
    assert len(parked) == 1
    mk(run_dir, "start", "db")
    pid = pid_of(run_dir, "db")
    deadline = time.monotonic() + 5
    while title(pid) != "mk[1:db] kernels.idle:IdleKernel":
        assert time.monotonic() < deadline, title(pid)
        time.sleep(0.02)


def test_a_console_is_followed_line_by_line(run_dir):
    machine(run_dir, ("c", "kernels.counter:CounterKernel", "interval=0.01 report=10"))
    mk(run_dir, "start", "c")
    follow = subprocess.Popen(MKCTL + ["console", "--run-dir", run_dir, "c", "-f", "--interval",
                                       "0.05"], stdout=subprocess.PIPE, text=True)
    try:
        time.sleep(1.5)
    finally:
        follow.send_signal(signal.SIGINT)
        out, _ = follow.communicate(timeout=30)
    assert follow.returncode == 0
    lines = [line for line in out.splitlines() if line.strip()]
    stamps = [line.split("]")[0] for line in lines]
    assert len(lines) >= 10, out                    # a line every 0.1 s, for 1.5 s
    assert len(stamps) == len(set(stamps)), "a line was printed twice"
    assert stamps == sorted(stamps, key=lambda s: float(s.strip("[ ")))


def test_new_console_text_across_a_wrap():
    assert new_console_text("a\nb\n", "a\nb\nc\n") == "c\n"
    assert new_console_text("a\nb\nc\n", "c\nd\ne\n") == "d\ne\n"      # the ring dropped a, b
    assert new_console_text("x\n", "y\n") == "y\n"                     # nothing in common


def test_top_shows_every_instance_and_a_stopped_kernel(run_dir):
    machine(run_dir, ("busy", "kernels.counter:CounterKernel", "interval=0.01"),
            ("stuck", "kernels.idle:IdleKernel", ""))
    mk(run_dir, "start", "busy")
    mk(run_dir, "start", "stuck")
    mk(run_dir, "fault", "stuck", "hang-stop")          # active, and never moving again
    time.sleep(2.5)
    out = mk(run_dir, "top", "--once", "--interval", "0.3", "--sort", "progress")
    rows = {line.split()[1]: line for line in out.splitlines() if re.match(r"\s*\d+\s", line)}
    assert set(rows) == {"busy", "stuck"}
    assert "active" in rows["busy"] and "now" in rows["busy"]
    age = re.search(r"(\d+)s ago", rows["stuck"])
    assert age and int(age.group(1)) >= 2, rows["stuck"]
    assert out.index("stuck") < out.index("busy")       # longest without progress first
    assert "PROGRESS" in out and "RX/S" in out
    mk(run_dir, "kill", "stuck", "--force")             # a stopped kernel answers no SHUTDOWN
