#!/usr/bin/env python3
"""The size bound of the house: no Python module over 600 lines, checked from the source.

    python3 tools/bounds.py                 # the largest modules, and any over the bound (exit 1)
    python3 tools/bounds.py --top 20        # more of the largest
    python3 tools/bounds.py --root DIR      # another checkout

A module past the bound has stopped being one job that a reader can hold in their head; the fix
is to split it by concern (each new module one job, with a docstring that says why it stands
apart), keeping its public import path working through a small facade. The only modules that
may stay bigger are the ones in ``ALLOWED``, each with the reason: a table or a generated file,
which is read by lookup, not end to end. An entry whose file is gone or back within the bound
is itself a failure, so the list cannot rot. tests/test_bounds.py runs this check.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass

#: the most lines a Python module may have
LIMIT = 600
#: the trees checked, relative to the repository root
ROOTS = ("partition", "tools", "kernels", "scenarios", "tests")
#: directories never walked (caches, build output, virtual environments)
SKIP_DIRS = {"__pycache__", "build", "dist", ".venv", "venv", "node_modules"}
#: path (relative to the root, with /) -> why it may exceed LIMIT. Only tables and generated
#: files belong here; a module of logic that grew is split instead.
ALLOWED: dict[str, str] = {}


@dataclass(frozen=True)
class Module:
    path: str       # relative to the root, with /
    lines: int


def count_lines(path: str) -> int:
    """Lines as ``wc -l`` and an editor count them (a last line without a newline counts)."""
    with open(path, "rb") as f:
        data = f.read()
    return data.count(b"\n") + (1 if data and not data.endswith(b"\n") else 0)


def modules(root: str) -> list[Module]:
    """Every .py file under the checked trees of ``root``, largest first."""
    out = []
    for top in ROOTS:
        base = os.path.join(root, top)
        for dirpath, dirs, files in os.walk(base):
            dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS and not d.startswith("."))
            for f in files:
                if f.endswith(".py"):
                    full = os.path.join(dirpath, f)
                    rel = os.path.relpath(full, root).replace(os.sep, "/")
                    out.append(Module(rel, count_lines(full)))
    return sorted(out, key=lambda m: (-m.lines, m.path))


def check(root: str, limit: int = LIMIT, allowed: dict[str, str] | None = None
          ) -> tuple[list[str], list[Module]]:
    """(problems, modules largest first). A problem names the file, its line count and the fix."""
    allowed = ALLOWED if allowed is None else allowed
    found = modules(root)
    by_path = {m.path: m for m in found}
    problems = []
    for m in found:
        if m.lines > limit and m.path not in allowed:
            problems.append(f"{m.path}: {m.lines} lines, over the bound of {limit} by "
                            f"{m.lines - limit}: split it by concern into modules of at most "
                            f"{limit} lines (a facade keeps its import path), or, for a table "
                            f"or a generated file only, add it to ALLOWED in tools/bounds.py "
                            f"with the reason")
    for path, why in sorted(allowed.items()):
        if not why.strip():
            problems.append(f"{path}: allowed in tools/bounds.py without a reason: say why it "
                            f"may exceed {limit} lines (a table, a generated file)")
        if path not in by_path:
            problems.append(f"{path}: allowed in tools/bounds.py but not found: remove its "
                            f"entry from ALLOWED")
        elif by_path[path].lines <= limit:
            problems.append(f"{path}: allowed in tools/bounds.py but {by_path[path].lines} "
                            f"lines, within the bound of {limit}: remove its entry from ALLOWED")
    return problems, found


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="tools/bounds.py", description=__doc__.splitlines()[0])
    ap.add_argument("--root", default=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                    help="the repository root (default: this checkout)")
    ap.add_argument("--top", type=int, default=10, help="how many of the largest to print")
    a = ap.parse_args(argv)
    problems, found = check(a.root)
    print(f"largest Python modules (bound {LIMIT} lines):")
    for m in found[:max(a.top, 0)]:
        mark = " (allowed)" if m.path in ALLOWED else " OVER" if m.lines > LIMIT else ""
        print(f"  {m.lines:6d}  {m.path}{mark}")
    for p in problems:
        print(f"bounds: {p}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
