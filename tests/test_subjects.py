"""The commit habit (tools/subjects.py): subjects of at most 72 characters after a base commit,
checked on a throwaway repository."""

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.system   # runs real processes (git, the tool, userlands)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(ROOT, "tools", "subjects.py")
ENV = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.invalid",
       "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.invalid",
       "GIT_CONFIG_GLOBAL": os.devnull, "GIT_CONFIG_NOSYSTEM": "1"}


def _git(repo, *args):
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True,
                          text=True, env=ENV).stdout.strip()


def _commit(repo, message):
    _git(repo, "commit", "-q", "--allow-empty", "-m", message)
    return _git(repo, "rev-parse", "HEAD")


def _tool(*args):
    return subprocess.run([sys.executable, TOOL, *args], capture_output=True, text=True,
                          timeout=60, env=ENV)


def test_a_long_subject_after_the_base_is_caught(tmp_path):
    _git(tmp_path, "init", "-q")
    _commit(tmp_path, "before the rule: " + "x" * 200)              # not judged
    base = _commit(tmp_path, "base")
    _commit(tmp_path, "s" * 72 + "\n\n" + "a body may run as long as it needs " * 10)
    long = _commit(tmp_path, "l" * 73)
    _commit(tmp_path, "short again")

    p = _tool("--repo", str(tmp_path), "--since", base)
    assert p.returncode == 1
    lines = p.stderr.splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(f"subjects: {long[:10]} subject is 73 characters, over 72:")
    assert "detail in the body" in lines[0]
    assert "3 commit(s) after" in p.stdout and "longest subject 73" in p.stdout


def test_subjects_within_the_bound_pass_and_a_missing_base_is_an_error(tmp_path):
    _git(tmp_path, "init", "-q")
    base = _commit(tmp_path, "base: " + "x" * 100)                 # the base itself is not judged
    _commit(tmp_path, "y" * 72)
    p = _tool("--repo", str(tmp_path), "--since", base)
    assert p.returncode == 0 and p.stderr == ""
    assert "1 commit(s) after" in p.stdout

    p = _tool("--repo", str(tmp_path), "--since", "0" * 40)
    assert p.returncode == 2
    assert "is not a commit of" in p.stderr and "--since" in p.stderr
