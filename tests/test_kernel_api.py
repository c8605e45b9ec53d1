"""The kernel author's surface: the hooks of ``Kernel``, the services of ``self.os``
(guest/services.py), and the old spellings that still answer (guest/kernel.py)."""

import ast
import inspect
import os
import re
import textwrap

import pytest
from helpers import up, wait_until

from partition.abi import message as M
from partition.guest import kernel as K
from partition.guest.services import KernelServices

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
OLDSTYLE = os.path.join(HERE, "kernels", "oldstyle.py")


def _services_table() -> set[str]:
    with open(os.path.join(ROOT, "docs", "api.md")) as f:
        text = f.read()
    start = text.index("## Kernel services")
    section = text[start:start + re.search(r"^#{1,6} ", text[start + 3:], re.M).start() + 3]
    return {m.group(1) for m in re.finditer(r"^\| `(\w+)` \|", section, re.M)}


def _services_public() -> set[str]:
    """Public names of KernelServices: its class's, and those its __init__ assigns."""
    names = {n for n in dir(KernelServices) if not n.startswith("_")}
    init = ast.parse(textwrap.dedent(inspect.getsource(KernelServices.__init__)))
    for node in ast.walk(init):
        target = node.target if isinstance(node, ast.AnnAssign) else None
        if isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name) \
                and target.value.id == "self" and not target.attr.startswith("_"):
            names.add(target.attr)
    return names


def test_api_page_names_every_service():
    assert sorted(_services_public() - _services_table()) == []
    assert sorted(_services_table() - _services_public()) == []


def test_the_old_spellings_are_the_services_that_were_kernel_methods():
    """Every service but the three new ones answers by its old name on the kernel."""
    old = K.STABLE | K.CHANGING
    assert old == _services_public() - {"loop", "memory_base", "probe_agent"}
    assert not old & K.INTERNALS and not old & set(dir(K.Kernel))


def test_a_kernel_on_the_old_api_runs_and_is_warned_once_per_name(machine):
    up(machine, "old", f"{OLDSTYLE}:OldStyle")
    wait_until(machine, lambda: "deprecated" in machine.show("old")["metrics"])
    # printk, register_handler, memory: once each (then kept); halting twice (read anew)
    assert machine.show("old")["metrics"] == {"warned": 5, "deprecated": 5}
    assert machine.request("old", M.MK_MSG_USER, "hi", timeout=5) == \
        [machine.show("old")["id"], "hi"]
    assert machine.read_memory("old", 0, 8) == b"OLDSTYLE"
    assert "oldstyle: again" in machine.console("old")


@pytest.mark.parametrize("name", ["ring", "messenger", "no_such_thing"])
def test_an_author_attribute_never_meets_the_runtime(name):
    """A kernel's own attribute of any name is its own; a missing one is an AttributeError."""
    k = K.Kernel()
    with pytest.raises(AttributeError):
        getattr(k, name)
    setattr(k, name, 1)
    assert getattr(k, name) == 1
