"""The marks' machinery in tests/conftest.py, checked on inner pytest sessions run over this
directory's conftest, as a developer's new test would be: a test that starts a process without
the `system` mark fails, so `pytest -m "not system"` (the quick loop) cannot quietly grow a
machine; a test marked `alone` runs while no other xdist worker runs one."""

import itertools
import os
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest

pytestmark = pytest.mark.system      # runs pytest in a subprocess

HERE = os.path.dirname(os.path.abspath(__file__))

INNER = '''
import subprocess

import pytest


@pytest.fixture(scope="module")
def forked_once():
    subprocess.run(["true"], check=True)


def test_unmarked_subprocess():
    subprocess.run(["true"], check=True)


def test_unmarked_module_fixture(forked_once):
    pass


@pytest.mark.system
def test_marked_subprocess():
    subprocess.run(["true"], check=True)


def test_unmarked_pure():
    assert sum(range(4)) == 6
'''


def test_a_process_started_without_the_mark_fails_the_test(tmp_path):
    for helper in ("conftest.py", "leaks.py"):
        shutil.copy(os.path.join(HERE, helper), tmp_path / helper)
    (tmp_path / "test_inner.py").write_text(INNER)
    report = tmp_path / "report.xml"
    # the inner session is no xdist worker of ours, nor in our ledger's run
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", "0",
                        "--rootdir", str(tmp_path), "-c", os.devnull, f"--junitxml={report}",
                        str(tmp_path / "test_inner.py")],
                       capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    outcome = {}
    for case in ET.parse(report).getroot().iter("testcase"):
        failed = [c for c in case if c.tag in ("failure", "error")]
        outcome.setdefault(case.get("name"), []).extend(f.get("message", "") for f in failed)
    assert set(outcome) == {"test_unmarked_subprocess", "test_unmarked_module_fixture",
                            "test_marked_subprocess", "test_unmarked_pure"}, p.stdout + p.stderr
    for name in ("test_unmarked_subprocess", "test_unmarked_module_fixture"):
        assert any("not marked `system`" in m for m in outcome[name]), (name, p.stdout)
    assert outcome["test_marked_subprocess"] == [], p.stdout
    assert outcome["test_unmarked_pure"] == [], p.stdout
    assert p.returncode == 1


ALONE = '''
import itertools
import os
import time

import pytest

LOG = os.environ["MK_MARKS_LOG"]


def _spell(name, seconds):
    start = time.monotonic()
    time.sleep(seconds)
    with open(os.path.join(LOG, name), "w") as f:
        f.write(f"{start} {time.monotonic()}")


@pytest.mark.alone
def test_alone():
    _spell("alone", 0.5)


@pytest.mark.parametrize("n", range(4))
def test_shared(n):
    _spell(f"shared{n}", 1.0)
'''


def test_an_alone_test_runs_while_no_other_worker_runs_one(tmp_path):
    for helper in ("conftest.py", "leaks.py"):
        shutil.copy(os.path.join(HERE, helper), tmp_path / helper)
    (tmp_path / "test_inner.py").write_text(ALONE)
    log = tmp_path / "log"
    log.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    env["MK_MARKS_LOG"] = str(log)
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", "2",
                        "-p", "no:randomly", "--rootdir", str(tmp_path), "-c", os.devnull,
                        "-o", "markers=alone", str(tmp_path / "test_inner.py")],
                       capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert p.returncode == 0, p.stdout + p.stderr
    spells = {f: tuple(map(float, (log / f).read_text().split())) for f in os.listdir(log)}
    assert len(spells) == 5
    a0, a1 = spells.pop("alone")
    overlapping = [f for f, (s0, s1) in spells.items() if s0 < a1 and a0 < s1]
    assert not overlapping, (overlapping, spells, (a0, a1))
    # and the others did share: some two of them overlap (else this proves nothing)
    shared = sorted(spells.values())
    assert any(b0 < e for (_, e), (b0, _) in itertools.pairwise(shared))
