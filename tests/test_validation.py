"""Every refusal of the resource model: specific message, errno, hint, and no change at all."""

import os

import pytest

from partition import AlreadyExists, InvalidSpec, Machine, OutOfMemory, PermissionDenied, ResourceBusy
from partition.host.devicetree import to_dts
from partition.units import format_cpulist, format_size, parse_cpulist, parse_size

CPUS = sorted(os.sched_getaffinity(0))


@pytest.fixture
def dedicated(machine_factory):
    """Host on the first CPU, the rest dedicated (no oversubscription)."""
    if len(CPUS) < 2:
        pytest.skip("needs two CPUs")
    return machine_factory(cpus=CPUS[1:], memory="256M", host_cpus=str(CPUS[0]))


def refused(m: Machine, exc: type, words: str, **kw) -> Exception:
    before = m.snapshot()
    views = open(os.path.join(m.run_dir, "sys/fs/multikernel/device_tree"), "rb").read()
    with pytest.raises(exc) as ei:
        m.create(**kw)
    assert words in ei.value.message, (ei.value.message, words)
    assert ei.value.hint, "every refusal names a fix"
    after = m.snapshot()
    before["machine"].pop("events")
    after["machine"].pop("events")
    assert after == before, "a refused create changed the machine"
    assert open(os.path.join(m.run_dir, "sys/fs/multikernel/device_tree"), "rb").read() == views
    return ei.value


def test_host_cpu_is_reserved(dedicated):
    e = refused(dedicated, PermissionDenied, f"CPU {CPUS[0]} is reserved for host kernel",
                name="a", cpus=str(CPUS[0]), memory="16M")
    assert e.code == "EPERM"


def test_cpu_not_in_pool(dedicated):
    e = refused(dedicated, InvalidSpec, "CPU 4000 is not in the pool", name="a", cpus="4000",
                memory="16M")
    assert e.code == "EINVAL"


def test_cpu_overlap_names_the_cpus(dedicated):
    dedicated.create("a", cpus=str(CPUS[1]), memory="16M")
    e = refused(dedicated, ResourceBusy, f"CPU overlap detected (CPUs {CPUS[1]}) with 'a'",
                name="b", cpus=str(CPUS[1]), memory="16M")
    assert "--oversubscribe" in e.hint


def test_cpu_count_beyond_free(dedicated):
    dedicated.create("a", cpu_count=len(CPUS) - 1, memory="16M")
    refused(dedicated, ResourceBusy, "CPUs free in the pool", name="b", cpu_count=1, memory="16M")


def test_memory_over_pool_oversubscribed(machine):
    machine.create("a", cpu_count=1, memory="200M")
    e = refused(machine, OutOfMemory, "Total memory allocation (264M) exceeds memory pool (256M)",
                name="b", cpu_count=1, memory="64M")
    assert "56M" in e.hint


@pytest.mark.parametrize("memory,words", [
    ("1000", "not a multiple of the 4 KiB page size"),
    ("4097", "not a multiple of the 4 KiB page size"),
    ("0", "greater than zero"),
    ("-4K", "cannot parse"),
    ("lots", "cannot parse"),
])
def test_bad_memory(machine, memory, words):
    refused(machine, InvalidSpec, words, name="a", cpu_count=1, memory=memory)


@pytest.mark.parametrize("memory,words,fix", [
    ("64", "64 bytes is not a multiple", "did you mean 64M?"),        # meant 64M: say so
    (64, "64 bytes is not a multiple", "did you mean 64M?"),
    ("1001K", "not a multiple", "use 1000K or 1004K"),               # a unit given: no guess
    ("99999999999999999999999999G", "beyond what one machine can map", "at most 64T"),
    ("9" * 5000, "beyond what one machine can map", "at most 64T"),   # not int()'s ValueError
], ids=["64", "int 64", "1001K", "1e26G", "5000 digits"])
def test_memory_hints_point_the_right_way(machine, memory, words, fix):
    e = refused(machine, InvalidSpec, words, name="a", cpu_count=1, memory=memory)
    assert fix in e.hint, e.hint


def test_a_resize_to_a_unitless_size_is_hinted_too(machine):
    machine.create("a", cpu_count=1, memory="16M")
    with pytest.raises(InvalidSpec) as ei:
        machine.resize("a", memory="64")
    assert "did you mean 64M?" in ei.value.hint
    assert machine.show("a")["memory_bytes"] == 16 << 20


def test_pool_size_beyond_any_machine_is_refused_before_anything_starts(tmp_path):
    for memory, fix in (("99999999999999999999999999G", "at most 64T"), ("64", "64M")):
        with pytest.raises(InvalidSpec) as ei:
            Machine(memory=memory, run_dir=str(tmp_path / "r"))
        assert fix in ei.value.hint
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("name", ["", "1abc", "has space", "x" * 32, "host", "a/b"])
def test_bad_names(machine, name):
    refused(machine, InvalidSpec, "invalid instance name", name=name, cpu_count=1, memory="16M")


def test_duplicate_name_and_id(machine):
    machine.create("a", cpu_count=1, memory="16M", id=7)
    refused(machine, AlreadyExists, "an instance named 'a' already exists", name="a",
            cpu_count=1, memory="16M")
    refused(machine, AlreadyExists, "instance id 7 is taken by 'a'", name="b", cpu_count=1,
            memory="16M", id=7)


@pytest.mark.parametrize("iid", [0, 512, -1, 10**6])
def test_id_out_of_range(machine, iid):
    refused(machine, InvalidSpec, "out of range 1..511", name="a", cpu_count=1, memory="16M", id=iid)


def test_cpus_and_count_exclusive(machine):
    refused(machine, InvalidSpec, "exactly one of", name="a", cpus="1", cpu_count=1, memory="16M")
    refused(machine, InvalidSpec, "exactly one of", name="a", memory="16M")


def test_auto_ids_and_first_fit(machine):
    a = machine.create("a", cpu_count=1, memory="16M")
    b = machine.create("b", cpu_count=1, memory="16M")
    assert (a["id"], b["id"]) == (1, 2)
    assert b["memory_base"] == a["memory_base"] + 16 * 2**20
    machine.delete("a")
    c = machine.create("c", cpu_count=1, memory="8M")
    assert c["id"] == 1 and c["memory_base"] == a["memory_base"]


def test_oversubscription_is_visible(machine):
    machine.create("a", cpus=str(CPUS[-1]), memory="16M")
    b = machine.create("b", cpus=str(CPUS[-1]), memory="16M")
    assert b["shared_cpus"] == [CPUS[-1]]
    snap = machine.snapshot()
    assert snap["machine"]["mode"] == "oversubscribed"
    tree = to_dts(open(os.path.join(machine.run_dir, "sys/fs/multikernel/device_tree"), "rb").read())
    assert "\toversubscribe;" in tree
    inst_tree = to_dts(open(os.path.join(machine.run_dir,
                                         "sys/fs/multikernel/instances/b/device_tree"), "rb").read())
    assert "shared-cpus" in inst_tree


def test_machine_construction_refusals(tmp_path):
    with pytest.raises(PermissionDenied, match="reserved for host kernel"):
        Machine(cpus=str(CPUS[0]), host_cpus=str(CPUS[0]), run_dir=str(tmp_path / "r1"))
    with pytest.raises(InvalidSpec, match="not available"):
        Machine(cpus="4000", run_dir=str(tmp_path / "r2"))
    with pytest.raises(InvalidSpec, match="not a multiple"):
        Machine(memory="1001", run_dir=str(tmp_path / "r3"))
    if len(CPUS) == 1:
        return
    with pytest.raises(InvalidSpec, match="no CPU left for the pool"):
        Machine(host_cpus=format_cpulist(CPUS), run_dir=str(tmp_path / "r4"))
    assert not any((tmp_path / r).exists() for r in ("r1", "r2", "r3", "r4"))


def test_units_roundtrip():
    assert parse_size("64K") == 65536 and parse_size("8GB") == 8 << 30 and parse_size("1GiB") == 1 << 30
    assert parse_size("4096") == 4096
    assert format_size(268435456) == "256M" and format_size(12288) == "12K"
    assert parse_cpulist("1-3,5") == [1, 2, 3, 5]
    assert format_cpulist([1, 2, 3, 5]) == "1-3,5"
    for bad in ("", "3-1", "a", "1,,2", "-1"):
        with pytest.raises(InvalidSpec):
            parse_cpulist(bad)
