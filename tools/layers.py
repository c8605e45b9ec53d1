#!/usr/bin/env python3
"""The house rules of ``partition/``, checked from the source: which side may import which.

    python3 tools/layers.py            # the layers, their modules, and any broken rule (exit 1)

Layers, bottom up; a module may import its own layer and the layers below it, never above:

    base      partition.errors, .units, .linux, .stats, .terminal: no partition import but each
              other
    abi       partition.abi.*: what both sides share byte for byte
    guest     partition.guest.*: what runs inside an instance
    host      partition.host.*: the host kernel and its loader
    tools     partition.scenario.*, partition.bench.*: experiments driving a machine
    control   partition.control.*, partition.bridge.*: mkctl, the daemon, the client, the wire,
              the kerf bridge
    top       partition (the public facade), partition.pytest_plugin: nothing inside imports them

Every import counts, also one inside a function (a lazy import runs sooner or later); an import
under ``if TYPE_CHECKING:`` counts for the layers but not for cycles, since it never runs. A
cycle among the imports that run is a broken rule too.

Inside the host one more rule holds: the machine (host/machine.py's ``Machine``) is a facade
that builds its collaborators, and none of them may know it. No module of ``partition.host``
other than ``partition.host.machine`` imports that module or names ``Machine`` in its code (an
annotation, a ``TYPE_CHECKING`` import, an attribute ``machine.Machine``): a collaborator gets
what it uses, never the hub. tests/test_layers.py runs these checks.
"""

from __future__ import annotations

import ast
import os
import sys
from dataclasses import dataclass

LAYERS = ("base", "abi", "guest", "host", "tools", "control", "top")
BASE = {"partition.errors", "partition.units", "partition.linux", "partition.stats",
        "partition.terminal"}


def layer_of(module: str) -> str | None:
    """The layer of a module of ``partition``; None for modules outside it."""
    if module in BASE:
        return "base"
    if module in ("partition", "partition.pytest_plugin"):
        return "top"
    parts = module.split(".")
    if parts[0] != "partition" or len(parts) < 2:
        return None
    return {"abi": "abi", "guest": "guest", "host": "host", "scenario": "tools",
            "bench": "tools", "control": "control", "bridge": "control"}.get(parts[1])


@dataclass(frozen=True)
class Import:
    source: str        # importing module
    target: str        # imported module (the facade ``partition`` when a name is imported from it)
    line: int
    type_only: bool    # under ``if TYPE_CHECKING:``


def modules(root: str) -> dict[str, str]:
    """Module name -> file, for every .py under ``root`` (the directory holding ``partition``)."""
    out = {}
    base = os.path.join(root, "partition")
    for dirpath, _, files in os.walk(base):
        for f in files:
            if not f.endswith(".py"):
                continue
            rel = os.path.relpath(os.path.join(dirpath, f), root)[:-3].split(os.sep)
            if rel[-1] == "__init__":
                rel = rel[:-1]
            out[".".join(rel)] = os.path.join(dirpath, f)
    return out


def _type_checking_lines(tree: ast.AST) -> set[int]:
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for sub in node.body:
                for inner in ast.walk(sub):
                    if hasattr(inner, "lineno"):
                        lines.add(inner.lineno)
    return lines


def imports(module: str, path: str, known: set[str]) -> list[Import]:
    """The imports of one module that name a module of ``partition``, resolved to modules."""
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    is_pkg = path.endswith("__init__.py")
    package = module if is_pkg else module.rpartition(".")[0]
    typed = _type_checking_lines(tree)
    out = []
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parts = parts[:len(parts) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            for a in node.names:
                sub = f"{base}.{a.name}"
                names.append(sub if sub in known else base)
        for name in names:
            if name == "partition" or name.startswith("partition."):
                out.append(Import(module, name, node.lineno, node.lineno in typed))
    return out


FACADE = "partition.host.machine"
FACADE_CLASS = "Machine"


def names_facade(path: str) -> list[int]:
    """The lines of a module whose code names the facade's class: a name, an attribute, an
    imported name or a quoted annotation (docstrings and comments aside)."""
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    lines = set()
    for node in ast.walk(tree):
        if (isinstance(node, ast.Name) and node.id == FACADE_CLASS) or \
                (isinstance(node, ast.Attribute) and node.attr == FACADE_CLASS) or \
                (isinstance(node, ast.alias) and FACADE_CLASS in (node.name, node.asname)):
            lines.add(node.lineno)
        elif isinstance(node, (ast.arg, ast.AnnAssign, ast.FunctionDef, ast.AsyncFunctionDef)):
            notes = [node.annotation] if isinstance(node, (ast.arg, ast.AnnAssign)) \
                else [node.returns]
            for note in notes:
                for sub in ast.walk(note) if note is not None else ():
                    if isinstance(sub, ast.Constant) and isinstance(sub.value, str) and \
                            FACADE_CLASS in sub.value.replace(".", " ").split():
                        lines.add(sub.lineno)
    return sorted(lines)


def facade_problems(mods: dict[str, str], graph: dict[str, list[Import]]) -> list[str]:
    """The host's modules other than the facade that import it or name its class."""
    out = []
    for m, path in sorted(mods.items()):
        if not m.startswith("partition.host.") or m == FACADE:
            continue
        for imp in graph[m]:
            if imp.target == FACADE:
                out.append(f"{m}:{imp.line}: imports {FACADE}"
                           f"{' (under TYPE_CHECKING)' if imp.type_only else ''}; a "
                           "collaborator of the machine gets what it uses, never the machine")
        for line in names_facade(path):
            out.append(f"{m}:{line}: names {FACADE_CLASS}; only {FACADE} may")
    return out


def check(root: str) -> tuple[list[str], dict[str, list[Import]]]:
    """(broken rules, the import graph) of the tree at ``root``."""
    mods = modules(root)
    known = set(mods)
    graph = {m: imports(m, p, known) for m, p in sorted(mods.items())}
    problems = []
    for m, imps in graph.items():
        src = layer_of(m)
        for imp in imps:
            dst = layer_of(imp.target)
            if src is None or dst is None or imp.target == m:
                continue
            if dst == "top":
                problems.append(f"{m}:{imp.line}: imports {imp.target} (the {dst} layer); "
                                "import the module that defines the name instead")
            elif LAYERS.index(dst) > LAYERS.index(src):
                problems.append(f"{m}:{imp.line}: the {src} layer imports {imp.target} of the "
                                f"{dst} layer above it")
    problems += [f"import cycle: {' -> '.join(c)}" for c in cycles(graph)]
    problems += facade_problems(mods, graph)
    return problems, graph


def cycles(graph: dict[str, list[Import]]) -> list[list[str]]:
    """Cycles among the imports that run (Tarjan's strongly connected components)."""
    edges = {m: sorted({i.target for i in imps if not i.type_only and i.target in graph
                        and i.target != m}) for m, imps in graph.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    sys.setrecursionlimit(max(1000, 4 * len(edges)))
    for v in edges:
        if v not in index:
            visit(v)
    return found


def main() -> int:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    problems, graph = check(root)
    for layer in LAYERS:
        mods = [m for m in graph if layer_of(m) == layer]
        print(f"{layer}:")
        for m in mods:
            deps = sorted({i.target for i in graph[m]} - {m})
            print(f"  {m}" + (f"  <- {', '.join(d.removeprefix('partition.') for d in deps)}"
                              if deps else ""))
    for p in problems:
        print(f"broken rule: {p}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
