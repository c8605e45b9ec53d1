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

from partition.scenario import draws, schema
from partition.scenario.report import summary

pytestmark = [pytest.mark.system, pytest.mark.slow]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIPPED = os.path.join(ROOT, "scenarios", "crash-consistency.toml")
HAS_PROGRAMS = "programs" in schema.INSTANCE_KEYS
#: the writer's boot program, as the shipped file gives it
WRITER = re.compile(r'^programs = \["(?P<cmd>[^"]+)"\]\n', re.M)


def with_run_actions(text):
    """The shipped file with its boot program started by ``run`` actions instead: one at the
    start and one after each panic's window, as a boot program would be after each restart.
    The same experiment for a tree without boot programs (``programs``, issue 22 item 5)."""
    cmd = WRITER.search(text)["cmd"]
    text = WRITER.sub("", text)
    for n, at in enumerate(("0.2s", "3s", "6.5s", "10s", "13.5s")):
        text += (f'\n[[action]]\nname = "write{n}"\ndo = "run"\nat = "{at}"\n'
                 f'target = "writer"\nargs = {{ program = "{cmd}" }}\n')
    return text


def assert_passed(r):
    failed = [f"{e.text}: {e.detail}" for e in r.expectations if not e.passed]
    assert r.passed and not failed, (failed, {a: r.metrics[a].get("output")
                                              for a in ("check",) if a in r.metrics})


@pytest.mark.skipif(not HAS_PROGRAMS, reason="needs boot programs (the `programs` key)")
def test_the_shipped_experiment_passes_with_boot_programs(run_scenario):
    r = run_scenario(SHIPPED)
    assert_passed(r)
    assert r.metrics["check"]["writer_starts"] == 5


def test_the_experiment_with_the_writer_started_by_run_actions(run_scenario):
    with open(SHIPPED) as f:
        text = with_run_actions(f.read())
    r = run_scenario(text)
    assert_passed(r)
    m = r.metrics
    # each panic at its seeded moment, inside its window, and the report says so
    for f in r.scenario.faults:
        lo, hi = f["at_random"]
        assert f["at"] == draws.draw(2026, f["name"], lo, hi) and lo <= f["at"] <= hi
    # every writer but the last two was killed with its kernel (128 + SIGKILL); the fifth
    # by the forced halt; the figures reached the report
    assert [m[f"write{n}"]["exit_status"] for n in range(5)] == [137] * 5
    assert m["check"]["exit_status"] == 0 and m["check"]["done"]
    assert m["check"]["writer_starts"] == 5 and m["check"]["bad_words"] == 0
    assert m["check"]["frontier"] == 4096 + 256 * m["check"]["records"]
    resumed = [re.search(r"frontier at record (\d+)", m[f"write{n}"]["output"][0])
               for n in range(5)]
    at = [int(x[1]) for x in resumed]
    assert at[0] == 0 and at == sorted(at) and len(set(at)) == 5    # each went on from more


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
