"""The size bound (tools/bounds.py): no Python module over 600 lines, tables and generated files
aside, each with its reason."""

import importlib.util
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(ROOT, "tools", "bounds.py")


def _bounds():
    spec = importlib.util.spec_from_file_location("bounds", TOOL)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bounds"] = mod          # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def _module(root, rel, lines, newline_at_end=True):
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    text = "\n".join(f"x{i} = {i}" for i in range(lines))
    p.write_text(text + ("\n" if newline_at_end else ""))


@pytest.mark.system    # runs the tool as a process
def test_a_module_over_the_bound_is_caught_and_named(tmp_path):
    _module(tmp_path, "partition/host/big.py", 601)
    _module(tmp_path, "tests/test_big.py", 700, newline_at_end=False)
    _module(tmp_path, "partition/host/edge.py", 600)          # at the bound: fine
    _module(tmp_path, "kernels/small.py", 10)
    _module(tmp_path, "partition/__pycache__/cached.py", 900)  # not source
    _module(tmp_path, "docs/not_checked.py", 900)              # outside the checked trees
    problems, found = _bounds().check(str(tmp_path))
    assert [m.path for m in found] == ["tests/test_big.py", "partition/host/big.py",
                                       "partition/host/edge.py", "kernels/small.py"]
    assert [m.lines for m in found] == [700, 601, 600, 10]
    assert len(problems) == 2
    assert problems[0].startswith("tests/test_big.py: 700 lines")
    assert problems[1].startswith("partition/host/big.py: 601 lines, over the bound of 600 by 1")
    assert all("split it by concern" in p for p in problems)

    p = subprocess.run([sys.executable, TOOL, "--root", str(tmp_path), "--top", "2"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 1
    assert "partition/host/big.py: 601 lines" in p.stderr and "ALLOWED" in p.stderr
    assert "700  tests/test_big.py OVER" in p.stdout
    assert "edge.py" not in p.stdout                           # --top 2


def test_the_allowlist_excuses_only_with_a_reason_and_cannot_rot(tmp_path):
    _module(tmp_path, "partition/table.py", 800)
    _module(tmp_path, "partition/shrunk.py", 100)
    b = _bounds()
    assert b.check(str(tmp_path), allowed={"partition/table.py": "a generated table"})[0] == []
    problems = b.check(str(tmp_path), allowed={"partition/table.py": " ",
                                               "partition/shrunk.py": "was big",
                                               "partition/gone.py": "was big"})[0]
    assert len(problems) == 3
    assert "partition/gone.py: allowed in tools/bounds.py but not found" in problems[0]
    assert "partition/shrunk.py: allowed in tools/bounds.py but 100 lines" in problems[1]
    assert "partition/table.py: allowed in tools/bounds.py without a reason" in problems[2]


@pytest.mark.system    # runs the tool as a process
def test_a_tree_within_the_bound_passes(tmp_path):
    _module(tmp_path, "partition/a.py", 600)
    p = subprocess.run([sys.executable, TOOL, "--root", str(tmp_path)],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and p.stderr == ""
    assert "600  partition/a.py" in p.stdout


def test_the_repository_is_within_the_bound():
    problems, found = _bounds().check(ROOT)
    assert problems == []
    assert any(m.path == "partition/host/machine.py" for m in found)   # the real tree was read
