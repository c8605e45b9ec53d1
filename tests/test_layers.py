"""The house rules (tools/layers.py): each side of the machine imports only what it may."""

import importlib.util
import os
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _layers():
    spec = importlib.util.spec_from_file_location("layers", os.path.join(ROOT, "tools", "layers.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules["layers"] = mod          # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def test_the_tree_keeps_the_rules():
    problems, graph = _layers().check(ROOT)
    assert problems == []
    # the rules were checked on the real tree, not on an empty one
    assert {"partition.abi.ring", "partition.guest.kernel", "partition.host.machine",
            "partition.control.cli"} <= set(graph)


def _tree(tmp_path, files):
    for rel, text in files.items():
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(textwrap.dedent(text))
    for d in ("partition", "partition/abi", "partition/guest", "partition/host",
              "partition/control"):
        (tmp_path / d).mkdir(parents=True, exist_ok=True)
        (tmp_path / d / "__init__.py").touch()
    return str(tmp_path)


def test_a_guest_importing_the_host_is_caught_also_lazily(tmp_path):
    root = _tree(tmp_path, {
        "partition/host/machine.py": "X = 1\n",
        "partition/guest/kernel.py": "def f():\n    from partition.host import machine\n",
    })
    problems, _ = _layers().check(root)
    assert len(problems) == 1 and "partition.guest.kernel:2" in problems[0] \
        and "host layer above it" in problems[0]


def test_abi_importing_control_and_the_facade_are_caught(tmp_path):
    root = _tree(tmp_path, {
        "partition/control/cli.py": "X = 1\n",
        "partition/abi/ring.py": "from partition.control.cli import X\nfrom partition import Y\n",
    })
    problems, _ = _layers().check(root)
    assert any("control layer above it" in p for p in problems)
    assert any("the top layer" in p for p in problems)


def test_cycles_count_lazy_imports_but_not_type_only_ones(tmp_path):
    root = _tree(tmp_path, {
        "partition/host/a.py": "from partition.host import b\n",
        "partition/host/b.py": "def f():\n    from partition.host import a\n",
        "partition/host/c.py": "from typing import TYPE_CHECKING\nfrom partition.host import d\n",
        "partition/host/d.py": ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                                "    from partition.host import c\n"),
    })
    problems, _ = _layers().check(root)
    assert problems == ["import cycle: partition.host.a -> partition.host.b"]


def test_a_host_module_that_knows_the_machine_is_caught_even_type_only(tmp_path):
    """The facade rule: host/machine.py builds its collaborators and none may know it, not by
    an import under TYPE_CHECKING, a lazy import, an annotation or a quoted one."""
    root = _tree(tmp_path, {
        "partition/host/machine.py": "class Machine:\n    pass\n",
        "partition/host/lifecycle.py": (
            "from __future__ import annotations\nfrom typing import TYPE_CHECKING\n"
            "if TYPE_CHECKING:\n    from partition.host.machine import Machine\n\n\n"
            "def boot(m: Machine) -> None:\n    pass\n"),
        "partition/host/kho.py": "def capture(m: 'Machine') -> None:\n    pass\n",
        "partition/host/loading.py": ("def spawn():\n    from partition.host import machine\n"
                                      "    return machine.Machine\n"),
        # a docstring or a comment that says the word is no use of it
        "partition/host/table.py": '"""The Machine holds this table."""\n# (Machine)\nX = 1\n',
    })
    problems, _ = _layers().check(root)
    assert any(p.startswith("partition.host.lifecycle:4: imports partition.host.machine "
                            "(under TYPE_CHECKING)") for p in problems), problems
    assert "partition.host.lifecycle:4: names Machine; only partition.host.machine may" \
        in problems
    assert "partition.host.lifecycle:7: names Machine; only partition.host.machine may" \
        in problems
    assert "partition.host.kho:1: names Machine; only partition.host.machine may" in problems
    assert any(p.startswith("partition.host.loading:2: imports partition.host.machine;")
               for p in problems), problems
    assert "partition.host.loading:3: names Machine; only partition.host.machine may" \
        in problems
    assert not any("partition.host.table" in p or "partition.host.machine:" in p
                   for p in problems), problems


def test_the_facade_and_the_layers_above_may_use_the_machine(tmp_path):
    root = _tree(tmp_path, {
        "partition/host/machine.py": "class Machine:\n    pass\n\n\nm: Machine\n",
        "partition/control/daemon.py": "from partition.host.machine import Machine\n",
    })
    problems, _ = _layers().check(root)
    assert problems == []
