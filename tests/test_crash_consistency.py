"""scenarios/crash-consistency.toml and what it is built of: the writer's kernel panicked at
seeded random moments while it stores into a shared region, restarted, and a checker in another
instance finding the file clean; the figures in the report and in ``expect``; a damaged file
failing the verdict. Real machines, real panics, real programs in userlands."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import psutil
import pytest
from leaks import cgroup_entries, leaks, shm_entries

from partition.scenario import draws
from partition.scenario.report import summary

pytestmark = [pytest.mark.system, pytest.mark.slow]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIPPED = os.path.join(ROOT, "scenarios", "crash-consistency.toml")


def test_the_shipped_experiment_passes_and_each_writer_went_on_from_more(run_scenario):
    """The shipped file, run once: the verdict (tests/test_scenarios.py leaves it to this
    test: ``OWN_TEST``) and the figures behind it."""
    r = run_scenario(SHIPPED)
    failed = [f"{e.text}: {e.detail}" for e in r.expectations if not e.passed]
    assert r.passed and not failed, (failed, r.metrics["check"].get("output"))
    assert r.machine["oversubscribe"] is True and not r.bad_reports
    m = r.metrics
    # each panic at its seeded moment, inside its window, and the report says so
    for f in r.scenario.faults:
        lo, hi = f["at_random"]
        assert f["at"] == draws.draw(2026, f["name"], lo, hi) and lo <= f["at"] <= hi
    assert m["check"]["exit_status"] == 0 and m["check"]["done"]
    assert m["check"]["writer_starts"] == 5 and m["check"]["bad_words"] == 0
    assert m["check"]["frontier"] == 4096 + 256 * m["check"]["records"]
    # one boot program per boot, each ended with its kernel (four panics, then the forced
    # halt): none exited on its own
    writers = [p for p in r.programs if p["instance"] == "writer"]
    assert len(writers) == 5 and len({p["generation"] for p in writers}) == 5
    assert all((p["status"], p["reason"]) == ("lost", "its userland ended first")
               for p in writers), writers
    # each went on from more than the one before it had found (its first line, in the
    # console: the whole writer's console is 18 lines, within the report's tail)
    resumed = [re.search(r"start (\d+), frontier at record (\d+)", line)
               for line in r.consoles["writer"] if "crashlog writer: start" in line]
    assert [int(x[1]) for x in resumed] == [1, 2, 3, 4, 5], r.consoles["writer"]
    at = [int(x[2]) for x in resumed]
    assert at[0] == 0 and at == sorted(at) and len(set(at)) == 5


DAMAGED = """
expect = ["check.bad_words == 0", "check.exit_status == 0"]

[scenario]
name = "damaged"
duration = "6s"

[machine]
oversubscribe = true
shared = { log = "4M" }

[[instance]]
name = "writer"
kernel = "kernels.idle:IdleKernel"
shared = ["log"]

[[instance]]
name = "reader"
kernel = "kernels.idle:IdleKernel"
shared = ["log"]

[[action]]
name = "write"
do = "run"
at = "0.1s"
target = "writer"
args = { program = "python3 -m partition.guest.crashlog write /mnt/shared/log/r --size 4M --count 1000" }

[[action]]
name = "damage"
do = "run"
at = "random(2s, 2.5s)"
target = "writer"
[action.args]                               # a byte of a payload word of record 500
program = [
    "python3", "-c",
    "f = open('/mnt/shared/log/r', 'r+b'); f.seek(4096 + 256 * 500 + 40); f.write(b'x')",
]

[[action]]
name = "check"
do = "run"
at = "4s"
target = "reader"
metrics = ["records", "bad_words", "lost_records"]
args = { program = "python3 -m partition.guest.crashlog check /mnt/shared/log/r" }
"""


def test_a_damaged_file_fails_the_verdict_with_its_figures(run_scenario):
    r = run_scenario(DAMAGED)
    assert not r.passed
    m = r.metrics
    assert m["write"]["exit_status"] == 0 and m["damage"]["exit_status"] == 0
    assert (m["check"]["records"], m["check"]["bad_words"], m["check"]["lost_records"]) == \
        (500, 1, 500)
    assert m["check"]["exit_status"] == 1 and m["check"]["error"] == "it exited with status 1"
    assert [e.passed for e in r.expectations] == [False, False]
    assert "check.bad_words=1" in r.expectations[0].detail
    text = summary(r).splitlines()
    drawn = r.scenario.actions[1]["at"]
    assert f"seed 0: drew damage at {drawn:g}s of random(2s, 2.5s)" in text
    assert "  check printed: records 500, bad_words 1, lost_records 500" in text


def test_a_run_on_a_halted_instance_is_recorded_not_fatal(run_scenario):
    r = run_scenario(DAMAGED + '\n[[action]]\nname = "halt"\ndo = "kill --force"\n'
                               'at = "0.05s"\ntarget = "writer"\n')
    m = r.metrics["write"]
    assert m["done"] is False and "is loaded" in m["error"] and m["exit_status"] is None
    assert r.metrics["check"]["exit_status"] == 2         # no file: not a log


KILLED = """
expect = ["a.restarts == 1"]

[scenario]
name = "killed"
duration = "3s"

[machine]
oversubscribe = true

[[instance]]
name = "a"
kernel = "kernels.idle:IdleKernel"
recovery = "restart"

[[action]]
name = "nap1"
do = "run"
at = "0.1s"
target = "a"
args = { program = "sleep 300" }

[[fault]]
name = "panic"
kind = "panic"
target = "a"
at = "0.5s"

[[action]]
name = "nap2"
do = "run"
at = "2s"
target = "a"
args = { program = "sleep 301" }

[[action]]
name = "halt"
do = "kill --force"
at = "2.5s"
target = "a"
"""


def test_a_run_actions_program_ends_with_its_kernel(run_scenario):
    """A ``run`` action's program is killed where it stands when its kernel panics or is
    halted by force (128 + SIGKILL in the report), as the experiment's writers were when
    ``run`` actions started them."""
    r = run_scenario(KILLED)
    assert r.passed, [(e.text, e.detail) for e in r.expectations]
    for nap in ("nap1", "nap2"):
        m = r.metrics[nap]
        assert m["exit_status"] == 128 + signal.SIGKILL and not m["done"], (nap, m)


SLEEPER = """
expect = ["nap.exit_status == 0"]

[scenario]
name = "sleeper"
duration = "{duration}"

[machine]
oversubscribe = true

[[instance]]
name = "a"
kernel = "kernels.idle:IdleKernel"

[[action]]
name = "nap"
do = "run"
at = "0.1s"
target = "a"
args = {{ program = "sleep 300", timeout = {timeout} }}
"""


def test_a_program_past_its_timeout_is_hung_up(run_scenario):
    t = time.monotonic()
    r = run_scenario(SLEEPER.format(duration="1s", timeout=1.5))
    assert time.monotonic() - t < 20                     # waited for: its timeout, not 300 s
    m = r.metrics["nap"]
    assert m["exit_status"] == 128 + signal.SIGTERM and not m["done"]
    assert m["error"] == "it exited with status 143 (hung up: still running after its timeout)"
    assert not r.passed


def test_ctrl_c_kills_a_running_program_and_leaves_nothing(tmp_path):
    f = tmp_path / "s.toml"
    f.write_text(SLEEPER.format(duration="60s", timeout=60))
    before = shm_entries(), cgroup_entries()
    p = subprocess.Popen([sys.executable, "-m", "partition.control.cli", "run", str(f),
                          "--format", "json", "--quiet"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    sleeper = None
    deadline = time.monotonic() + 30
    while sleeper is None and time.monotonic() < deadline:
        kids = psutil.Process(p.pid).children(recursive=True)
        sleeper = next((c for c in kids if c.name() == "sleep"), None)
        time.sleep(0.05)
    assert sleeper is not None
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 130, err
    report = json.loads(out)
    assert report["verdict"] == "interrupted"
    assert report["metrics"]["nap"]["error"] == "still running when the run ended"
    assert not psutil.pid_exists(sleeper.pid) or sleeper.status() == psutil.STATUS_ZOMBIE
    assert leaks(*before) == ([], [])
