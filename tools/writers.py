#!/usr/bin/env python3
"""One writer per field of an instance's record, checked from the source.

    python3 tools/writers.py                # every write of an Instance/Run field outside its
                                            # owner (exit 1), nothing when the tree keeps it
    python3 tools/writers.py --root DIR     # another checkout
    python3 tools/writers.py --list         # every write found, with its owner

``Instance`` (partition/host/instance.py) is read by most of the host; if any module may change
any of its fields, nobody can tell from a module what it changes, nor where a wrong value came
from. So each field has one writer module, named in instance.py's ``WRITERS`` table ("the
instance" itself where several modules change it: then through its methods); a field the table
does not name is set when the instance is built and never after; every field of ``Run`` is
Run's methods' (instance.py). This check reads that table and the two classes' fields from
instance.py's source (no import), then walks every module of partition/ with ``ast`` and
reports each write of one of those fields by a module other than its owner: an assignment
(plain, augmented, annotated, in a tuple), a ``del``, an item assigned or deleted
(``x.counters["k"] += 1``), a mutating method called on it (``x.failures.append(...)``), and
``setattr(x, "field", ...)`` with the name spelled out.

What it cannot see, and why that is fine here: the receiver's type. ``x.pid = ...`` is taken as
a write of an instance's field whatever ``x`` is, except (1) ``self`` in a class other than
Instance and Run (that class's own attribute) and (2) the receivers listed in ``NOT_INSTANCE``
(module, receiver as written), each with what it is; so a new variable that holds an instance is
checked without anybody listing it, and a false alarm is answered by a line there with its
reason. An alias (``c = inst.counters; c["k"] += 1``) is not followed: the host's code does not
write through one, and a reviewer reads it as the write it is. tests/unit/test_writers.py runs
this check and shows it catching each kind of write.
"""

from __future__ import annotations

import argparse
import ast
import os
import sys
from dataclasses import dataclass

#: where Instance, Run and WRITERS live, relative to partition/
INSTANCE_MODULE = "host/instance.py"
#: the classes whose ``self`` writes are the instance module's own
OWN_CLASSES = ("Instance", "Run")
#: methods that change the list, dict or object they are called on
MUTATORS = frozenset({"append", "extend", "insert", "remove", "pop", "popitem", "clear",
                      "update", "setdefault", "sort", "reverse", "add", "discard"})
#: (module relative to partition/, receiver as written) -> what it is: a field of the same name
#: on another kind of object, never an instance
NOT_INSTANCE: dict[tuple[str, str], str] = {
    ("host/lifecycle.py", "peer"): "the instance's peer record in the arena (abi)",
    ("host/publish.py", "peer"): "the instance's peer record in the arena (abi)",
    ("host/adoption.py", "a.arena.peer(inst.id)"): "the instance's peer record in the arena",
    ("host/assembly.py", "host"): "the host's peer record in the arena",
    ("host/assembly.py", "cfg"): "the pool's PoolConfig",
    ("host/pool.py", "cfg"): "the pool's PoolConfig",
    ("host/pool.py", "self.config"): "the pool's PoolConfig",
    ("control/cliverbs.py", "a"): "the command line's argparse namespace",
    ("guest/commands.py", "ctx"): "the kernel's own context (guest side)",
    ("host/userlands.py", "run"): "a userland's own record (userrun.Run), not an instance's",
    ("host/userlands.py", "p"): "a boot program's record (userrun.Program), not an instance",
}


@dataclass(frozen=True)
class Write:
    module: str         # relative to partition/, with /
    line: int
    field: str
    receiver: str       # as written
    owner: str | None   # None: set when the instance is built, never after

    def __str__(self) -> str:
        owner = self.owner or "nobody after it is built"
        return (f"partition/{self.module}:{self.line}: writes {self.receiver}.{self.field}, "
                f"whose writer is {owner}")


def owners(instance_source: str) -> dict[str, str | None]:
    """Field -> its one writer module (None: nobody after construction), read from
    instance.py's source: Instance's fields (and the run's fields it forwards), Run's fields,
    and the ``WRITERS`` table."""
    tree = ast.parse(instance_source)
    table: dict[str, str] = {}
    fields: dict[str, str | None] = {}
    for node in tree.body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) \
                and node.target.id == "WRITERS" and node.value is not None:
            table = ast.literal_eval(node.value)
    for node in tree.body:
        if not (isinstance(node, ast.ClassDef) and node.name in OWN_CLASSES):
            continue
        for stmt in node.body:
            if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
                name = stmt.target.id
                fields[name] = INSTANCE_MODULE if node.name == "Run" else table.get(name)
            elif isinstance(stmt, ast.Assign):      # pid = _run_field("pid"): the run's
                for t in stmt.targets:
                    if isinstance(t, ast.Name):
                        fields[t.id] = INSTANCE_MODULE
    unknown = set(table) - set(fields)
    if unknown:
        raise SystemExit(f"WRITERS names fields Instance does not have: {sorted(unknown)}")
    return fields


def _written(node: ast.AST) -> list[ast.expr]:
    """The expressions ``node`` writes to (or changes in place)."""
    targets: list[ast.expr] = []
    if isinstance(node, ast.Assign):
        targets = list(node.targets)
    elif isinstance(node, (ast.AugAssign, ast.AnnAssign)):
        targets = [node.target]
    elif isinstance(node, ast.Delete):
        targets = list(node.targets)
    elif isinstance(node, ast.Call):
        f = node.func
        if isinstance(f, ast.Attribute) and f.attr in MUTATORS:
            targets = [f.value]
        elif isinstance(f, ast.Name) and f.id in ("setattr", "delattr") and len(node.args) >= 2 \
                and isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str):
            targets = [ast.Attribute(value=node.args[0], attr=node.args[1].value, ctx=ast.Store())]
    out: list[ast.expr] = []
    while targets:
        t = targets.pop()
        if isinstance(t, (ast.Tuple, ast.List)):
            targets.extend(t.elts)
        elif isinstance(t, ast.Starred):
            targets.append(t.value)
        else:
            while isinstance(t, ast.Subscript):      # x.counters["k"] = ...: x.counters changes
                t = t.value
            out.append(t)
    return out


def writes_in(module: str, source: str, fields: dict[str, str | None]) -> list[Write]:
    """Every write of a field in ``fields`` that ``module``'s source makes, owned or not."""
    found: list[Write] = []

    def visit(node: ast.AST, cls: str | None) -> None:
        for t in _written(node):
            if not (isinstance(t, ast.Attribute) and t.attr in fields):
                continue
            recv = ast.unparse(t.value)
            if recv == "self" and cls not in OWN_CLASSES:
                continue                 # a class's own attribute of the same name
            if (module, recv) in NOT_INSTANCE:
                continue
            found.append(Write(module, getattr(node, "lineno", 0), t.attr, recv,
                               fields[t.attr]))
        for child in ast.iter_child_nodes(node):
            visit(child, child.name if isinstance(child, ast.ClassDef) else cls)

    visit(ast.parse(source, filename=module), None)
    return sorted(found, key=lambda w: (w.line, w.field))


def check(root: str) -> tuple[list[Write], list[Write]]:
    """(the writes by a module that is not the field's owner, every write found)."""
    base = os.path.join(root, "partition")
    with open(os.path.join(base, INSTANCE_MODULE)) as f:
        fields = owners(f.read())
    every: list[Write] = []
    for dirpath, dirs, files in os.walk(base):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__" and not d.startswith("."))
        for name in sorted(files):
            if name.endswith(".py"):
                full = os.path.join(dirpath, name)
                rel = os.path.relpath(full, base).replace(os.sep, "/")
                with open(full) as f:
                    every.extend(writes_in(rel, f.read(), fields))
    bad = [w for w in every if w.owner != w.module]
    return bad, every


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", default=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    ap.add_argument("--list", action="store_true", help="print every write found")
    a = ap.parse_args(argv)
    bad, every = check(a.root)
    if a.list:
        for w in every:
            print(f"partition/{w.module}:{w.line}: {w.receiver}.{w.field} (owner {w.owner})")
    for w in bad:
        print(w, file=sys.stderr)
    if bad:
        print(f"{len(bad)} write(s) of an instance's field outside its one writer: call the "
              "owner's method (partition/host/instance.py's WRITERS says who owns each), or, "
              "if the receiver is not an instance, list it in tools/writers.py's NOT_INSTANCE "
              "with what it is", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
