"""One writer per field of an instance's record (tools/writers.py): the tree keeps it, and the
check catches each way a module other than the owner could change a field."""

import importlib.util
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOOL = os.path.join(ROOT, "tools", "writers.py")
INSTANCE = os.path.join(ROOT, "partition", "host", "instance.py")


def _writers():
    spec = importlib.util.spec_from_file_location("writers", TOOL)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["writers"] = mod          # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def _tree(tmp_path, modules: dict[str, str]):
    """A checkout with this tree's instance.py and the given modules (relative to partition/)."""
    host = tmp_path / "partition" / "host"
    host.mkdir(parents=True)
    with open(INSTANCE) as f:
        (host / "instance.py").write_text(f.read())
    for rel, text in modules.items():
        p = tmp_path / "partition" / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return str(tmp_path)


def test_the_tree_has_one_writer_per_field_and_its_writes_are_seen():
    w = _writers()
    bad, every = w.check(ROOT)
    assert bad == [], "\n".join(map(str, bad))
    seen = {(x.module, x.field) for x in every}
    # the single writers the table names are found where they write (the check sees writes)
    assert {("host/kho.py", "kho"), ("host/lifecycle.py", "last_exit"),
            ("host/resize.py", "cpus"), ("host/supervision.py", "failures"),
            ("host/writewatch.py", "foreign_writes")} <= seen
    # and the shared fields are written by instance.py alone (its methods)
    for f in ("failure", "counters", "state", "kimage", "served_by", "extra_regions"):
        assert {x.module for x in every if x.field == f} == {"host/instance.py"}, f


def test_every_kind_of_write_by_another_module_is_caught(tmp_path):
    rogue = '''\
def f(inst, other, s):
    inst.failure = "x"                      # 2 assignment of a shared field
    inst.counters["crashes"] += 1           # 3 an item of it, augmented
    inst.failures.append({})                # 4 a mutating method (supervision's field)
    del inst.kho                            # 5 del (kho.py's field)
    a, inst.boots = 1, 2                    # 6 in a tuple (lifecycle's field)
    setattr(inst, "state", s)               # 7 setattr with the name spelled out
    inst.run.halt_requested = "graceful"    # 8 a run's field, past Run's methods
    inst.llc_way_mask = 1                   # 9 set when built, never after
    inst.extra_regions[0:0] = [(0, 1)]      # 10 a slice of it
    inst.count("crashes")                   # a method of the owner: fine
    inst.kimage.label = "x"                 # the image's own field: not the instance's
    other.foreign_writes.clear()            # 13 any receiver may hold an instance


class Kernel:
    def boot(self):
        self.failure = None                 # the class's own attribute: fine
        self.counters = {}
'''
    w = _writers()
    bad, _ = w.check(_tree(tmp_path, {"host/rogue.py": rogue}))
    assert [(b.line, b.field) for b in bad] == [
        (2, "failure"), (3, "counters"), (4, "failures"), (5, "kho"), (6, "boots"),
        (7, "state"), (8, "halt_requested"), (9, "llc_way_mask"), (10, "extra_regions"),
        (13, "foreign_writes")]
    assert {b.module for b in bad} == {"host/rogue.py"}
    assert "whose writer is host/supervision.py" in str(bad[2])
    assert "whose writer is nobody after it is built" in str(bad[7])


def test_a_shared_field_written_past_its_method_in_the_real_source_is_caught(tmp_path, capsys):
    """supervision.py as it is, with its restart-intensity failure written directly again (as
    it was before the check): caught, named, and the command exits 1."""
    with open(os.path.join(ROOT, "partition", "host", "supervision.py")) as f:
        src = f.read()
    assert "inst.record_failure(" in src
    reverted = src.replace("inst.record_failure(", "inst.failure = (", 1)
    root = _tree(tmp_path, {"host/supervision.py": reverted})
    w = _writers()
    bad, _ = w.check(root)
    assert [(b.module, b.field, b.receiver) for b in bad] == [
        ("host/supervision.py", "failure", "inst")]
    assert w.main(["--root", root]) == 1
    err = capsys.readouterr().err
    assert "partition/host/supervision.py:" in err and "writes inst.failure" in err
    assert w.main(["--root", _tree(tmp_path / "clean", {"host/supervision.py": src})]) == 0


def test_a_table_naming_a_field_instance_lacks_is_refused():
    src = open(INSTANCE).read().replace('"kho": "host/kho.py",', '"kho": "host/kho.py", "nope": "x",')
    with pytest.raises(SystemExit, match="nope"):
        _writers().owners(src)
