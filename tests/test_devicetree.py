"""partition/host/devicetree.py against kerf 0.4's own code, and its DTS text.

Trees and overlays are made by kerf's generators (InstanceExtractor, OverlayGenerator) and read
back by ours, and ours are read back by kerf's DeviceTreeParser: the two sides must agree on
every value. Refusals are in test_devicetree_refusals.py, hostile bytes and a small fuzz in
test_devicetree_fuzz.py.
"""

import dataclasses
import errno
import struct

import libfdt
import pytest
from dtrees import (
    MB,
    _gdt,
    _inst,
    _with,
    cells64,
    kerf_baseline,
    kerf_create,
    overlay,
    u32,
    u64,
)
from helpers import dtb
from kerf.dtc.overlay import OverlayGenerator
from kerf.dtc.parser import DeviceTreeParser
from kerf.exceptions import ParseError
from kerf.models import (
    PoolMemoryRegion,
)
from kerf.pool_diff import ANY_NODE, PoolDiff

from partition.errors import NotSupported
from partition.host import devicetree as dt
from partition.host.devicetree import Chunk, CreateOp, RemoveOp, UpdateOp

# -- 1. round trips with kerf's own code ------------------------------------------------------


@pytest.mark.parametrize("cpus, requested, want", [
    ((2, 3, 6), {0: 64 * MB}, {0: 64 * MB}),
    ((1,), {0: 64 * MB, 1: 32 * MB}, {0: 64 * MB, 1: 32 * MB}),
    ((0, 4, 5, 7), {ANY_NODE: 128 * MB}, {0: 128 * MB}),      # kerf omits numa-node-id: node 0
    ((1 << 33, 9), {2: 2 * MB}, {2: 2 * MB}),                 # APIC ids need the 64-bit cells
])
def test_a_kerf_baseline_parses_to_the_same_cpus_and_memory(cpus, requested, want):
    blob = kerf_baseline(cpus, requested)
    base = dt.parse_baseline(blob)
    assert base.cpus == list(cpus)
    assert base.memory == want
    assert base.memory_bytes == sum(requested.values())
    ref = DeviceTreeParser().parse_dtb_from_bytes(blob).hardware      # kerf reads it alike
    assert ref.cpus.available == base.cpus
    assert ref.memory.memory_pool_bytes == base.memory_bytes


def test_kerf_reads_our_pool_tree():
    chunks = [Chunk(0x200000, 4 * MB, 0), Chunk(0x1000000, 2 * MB, 1), Chunk(0x8000000, 6 * MB, 0)]
    blob = dt.pool_tree([3, 1, 2, 1 << 33], [2], chunks)
    tree = DeviceTreeParser().parse_dtb_from_bytes(blob)
    assert tree.hardware.cpus.available == [1, 2, 3, 1 << 33]
    assert tree.hardware.cpus.available_free == [2]
    assert [(r.base, r.size, r.node) for r in tree.hardware.memory.regions] == \
        [(c.base, c.size, c.node) for c in chunks]
    assert tree.hardware.memory.memory_pool_bytes == 12 * MB
    assert tree.hardware.memory.requested == {}
    assert tree.instances == {}
    assert bytes(libfdt.Fdt(blob).getprop(0, "memory-granule")) == u64(dt.MEMORY_GRANULE)


def test_kerf_reads_a_live_pool_with_every_cpu_lent_and_no_memory():
    """cpus-available present but empty: kerf takes it as a live pool, not "no pool yet"."""
    tree = DeviceTreeParser().parse_dtb_from_bytes(dt.pool_tree([1, 2], [], []))
    assert tree.hardware.cpus.available == [1, 2]
    assert tree.hardware.cpus.available_free == []
    assert tree.hardware.memory.regions == []


def test_the_host_tree_has_no_pool_as_kerf_sees_it():
    blob = dt.host_tree([3, 0, 1])
    fdt = libfdt.Fdt(blob)
    res = fdt.path_offset("/resources")
    assert bytes(fdt.getprop(res, "cpus")) == cells64(0, 1, 3)
    assert fdt.getprop(res, "cpus-available", libfdt.QUIET_NOTFOUND) == -libfdt.NOTFOUND
    assert fdt.first_subnode(res, libfdt.QUIET_NOTFOUND) == -libfdt.NOTFOUND   # no memory@
    with pytest.raises(ParseError, match="No memory description"):   # kerf: "no pool yet"
        DeviceTreeParser().parse_dtb_from_bytes(blob)


@pytest.mark.parametrize("name, iid, cpus, regions, shared", [
    ("web", 7, [3, 1], [(0x200000, 2 * MB), (0x800000, 4 * MB)], [5]),
    ("db", 1, [1 << 40], [(0xA800000, 64 * MB)], None),
    ("edge", 511, [0, 2, 4, 6], [], None),
])
def test_kerf_reads_our_instance_tree(name, iid, cpus, regions, shared):
    blob = dt.instance_tree(name, iid, cpus, regions, shared)
    inst = DeviceTreeParser().parse_instance_dtb_from_bytes(blob)
    assert inst.name == name
    assert inst.id == iid
    assert inst.resources.cpus == sorted(cpus)
    assert inst.resources.memory_base == (regions[0][0] if regions else 0)
    assert inst.resources.memory_bytes == sum(size for _, size in regions)
    assert inst.resources.devices == []
    assert not inst.resources.uring
    fdt = libfdt.Fdt(blob)
    res = fdt.path_offset("/resources")
    nodes = []
    off = fdt.first_subnode(res, libfdt.QUIET_NOTFOUND)
    while off >= 0:
        nodes.append((fdt.get_name(off), bytes(fdt.getprop(off, "reg"))))
        off = fdt.next_subnode(off, libfdt.QUIET_NOTFOUND)
    assert nodes == [(f"memory@{b:x}", struct.pack(">QQ", b, s)) for b, s in regions]


def test_kerfs_create_overlay_parses_to_create_ops():
    web = _inst("web", 5, [1, 2], 8 * MB)
    auto = _inst("auto", None, [1 << 33], 2 * MB, numa_nodes=[0], cpu_affinity="compact",
                 memory_policy="local")
    kcore = dataclasses.replace(_inst("kcore", 511, [7], 4 * MB),
                                options={"enable-host-kcore": True})
    ov = dt.parse_overlay(kerf_create(web, auto, kcore))
    assert ov.target == "/instances"
    assert ov.operations == [CreateOp("web", 5, [1, 2], 8 * MB), CreateOp("auto", None, [1 << 33], 2 * MB),
                             CreateOp("kcore", 511, [7], 4 * MB)]


def test_kerfs_overlay_of_a_whole_change_keeps_kerfs_fragment_order():
    old = _inst("old", 1, [2], 4 * MB)
    new = _inst("new", 2, [3], 6 * MB)
    blob = OverlayGenerator().generate_overlay(_gdt({"old": old}), _gdt({"new": new}))
    assert dt.parse_overlay(bytes(blob)).operations == [CreateOp("new", 2, [3], 6 * MB),
                                                         RemoveOp("old")]


def test_kerfs_removal_overlay_parses_to_a_remove_op():
    ov = dt.parse_overlay(bytes(OverlayGenerator().generate_removal_overlay("web")))
    assert ov.operations == [RemoveOp("web")]
    assert ov.target == "/instances"


def test_kerfs_update_overlay_shrinking_memory_and_moving_cpus():
    old = _inst("web", 5, [1, 2, 4], 12 * MB)
    new = _with(old, cpus=[2, 3, 5], memory_bytes=4 * MB)
    regions = [(0x200000, 4 * MB), (0x800000, 2 * MB), (0x4000000, 6 * MB)]
    blob = bytes(OverlayGenerator().generate_update_overlay("web", old, new,
                                                            memory_regions=regions))
    ov = dt.parse_overlay(blob)
    assert ov.target == "/instances/web"
    assert ov.operations == [UpdateOp("web", memory_remove=[(0x4000000, 6 * MB), (0x800000, 2 * MB)],
                                      memory_add=[], cpu_remove=[1, 4], cpu_add=[3, 5])]


def test_kerfs_update_overlay_growing_memory_on_a_node():
    old = _inst("web", 5, [1, 2], 8 * MB, numa_nodes=[1])
    new = _with(old, cpus=[1], memory_bytes=14 * MB)
    blob = bytes(OverlayGenerator().generate_update_overlay("web", old, new,
                                                            memory_add_base=0x4000000))
    (up,) = dt.parse_overlay(blob).operations
    assert up == UpdateOp("web", memory_remove=[], memory_add=[(0x4000000, 6 * MB)],
                          cpu_remove=[2], cpu_add=[])
    assert not up.empty()


def test_an_update_is_read_in_the_kernels_fixed_order_whatever_the_node_order():
    """kerf writes memory-remove, memory-add, cpu-remove, cpu-add; the operations land in their
    fields whatever order a writer chose, and several nodes of one kind add up."""
    old = _inst("web", 5, [1, 2], 8 * MB)
    new = _with(old, cpus=[2, 3], memory_bytes=4 * MB)
    kerf_blob = bytes(OverlayGenerator().generate_update_overlay(
        "web", old, new, memory_regions=[(0x200000, 4 * MB), (0x600000, 4 * MB)]))
    fdt = libfdt.Fdt(kerf_blob)
    body = fdt.path_offset("/fragment@0/__overlay__")
    names = []
    off = fdt.first_subnode(body, libfdt.QUIET_NOTFOUND)
    while off >= 0:
        names.append(fdt.get_name(off))
        off = fdt.next_subnode(off, libfdt.QUIET_NOTFOUND)
    assert names == ["memory-remove", "cpu-remove", "cpu-add"]        # kerf's own order

    reg = struct.pack(">QQ", 0x600000, 4 * MB)
    shuffled = overlay(("/instances/web", {
        "cpu-add": {"cpu@3": {"reg": u64(3)}},
        "memory-add": {"memory@0": {"reg": struct.pack(">QQ", 0x9000000, 2 * MB)}},
        "cpu-remove": {"cpu@1": {"reg": u32(1)}},                     # a 32-bit cell reads too
        "memory-remove": {"memory@0": {"reg": reg}},
    }))
    assert dt.parse_overlay(shuffled).operations == [
        UpdateOp("web", [(0x600000, 4 * MB)], [(0x9000000, 2 * MB)], [1], [3])]
    assert dt.parse_overlay(kerf_blob).operations == [
        UpdateOp("web", [(0x600000, 4 * MB)], [], [1], [3])]


def test_kerf_overlays_the_emulator_cannot_serve_are_not_supported():
    web = _inst("web", 5, [1], 4 * MB)
    gen = OverlayGenerator()
    cases = {
        "device on create": kerf_create(_with(web, devices=["nvme0"])),
        "device on update": bytes(gen.generate_update_overlay(
            "web", web, _with(web, devices=["nvme0"]), pci_ids={"nvme0": "0000:01:00.0"})),
        "device removed": bytes(gen.generate_update_overlay(
            "web", _with(web, devices=["nvme0"]), web)),
        "uring": kerf_create(_with(web, uring=True, uring_sq_entries=64)),
        "pool devices": bytes(gen.generate_pool_overlay(PoolDiff(devices_to_pool=["0000:01:00.0"]))),
    }
    for what, blob in cases.items():
        with pytest.raises(NotSupported) as e:
            dt.parse_overlay(blob)
        assert e.value.errno == errno.EOPNOTSUPP, what


def test_kerf_pool_overlays_are_read():
    """kerf init on a live pool writes a /resources overlay from its PoolDiff: every part of it
    reads back as the pool operation it asks for."""
    diff = PoolDiff(cpus_to_pool=[5], cpus_to_host=[7], memory_to_pool=[(0, 64 * MB), (-1, 4096)],
                    memory_to_host=[PoolMemoryRegion(base=0x10000000, size=32 * MB, node=0)])
    ov = dt.parse_overlay(bytes(OverlayGenerator().generate_pool_overlay(diff)))
    assert ov.target == "/resources"
    assert ov.operations == [dt.PoolOp(cpu_remove=[7], memory_remove=[(0x10000000, 32 * MB)],
                                       memory_add=[64 * MB, 4096], cpu_add=[5])]


def test_kerf_reads_an_instance_tree_we_write_back_into_an_overlay_we_read():
    """kerf dump reads our instance tree; kerf update builds its overlay from that model."""
    blob = dt.instance_tree("web", 9, [1, 2], [(0x200000, 4 * MB), (0x800000, 4 * MB)])
    cur = DeviceTreeParser().parse_instance_dtb_from_bytes(blob)
    new = _with(cur, cpus=[2], memory_bytes=4 * MB)
    up = dt.parse_overlay(bytes(OverlayGenerator().generate_update_overlay(
        "web", cur, new, memory_regions=[(0x200000, 4 * MB), (0x800000, 4 * MB)])))
    assert up.operations == [UpdateOp("web", [(0x800000, 4 * MB)], [], [1], [])]

# -- 4. DTS text --------------------------------------------------------------------------------


def test_to_dts_prints_cpus_in_64_bit_cells_and_strings_quoted():
    text = dt.to_dts(dt.pool_tree([3, 1, 2], [2], [Chunk(0x200000, 4 * MB, 1)]))
    lines = [line.strip() for line in text.splitlines()]
    assert lines[:3] == ["/dts-v1/;", "", "/ {"]
    assert 'compatible = "linux,multikernel-host";' in lines
    assert "cpus = /bits/ 64 <0x1 0x2 0x3>;" in lines
    assert "cpus-available = /bits/ 64 <0x2>;" in lines
    assert "memory-granule = /bits/ 64 <0x200000>;" in lines
    assert "memory@200000 {" in lines
    assert 'device_type = "memory";' in lines
    assert "reg = /bits/ 64 <0x200000 0x400000>;" in lines
    assert "numa-node-id = <0x1>;" in lines
    assert text.endswith("};\n")
    assert text.count("{") == text.count("}")

    inst = dt.to_dts(dt.instance_tree("web", 7, [5], [(0x200000, 2 * MB)], shared=[0]))
    assert 'model = "web";' in inst
    assert "id = <0x7>;" in inst
    assert "cpus = /bits/ 64 <0x5>;" in inst
    assert "shared-cpus = /bits/ 64 <0x0>;" in inst
    assert "memory-bytes = /bits/ 64 <0x200000>;" in inst

    ov = dt.to_dts(kerf_create(_inst("web", 5, [1, 1 << 33], 8 * MB)))
    assert 'target-path = "/instances";' in ov
    assert 'instance-name = "web";' in ov
    assert "cpus = /bits/ 64 <0x1 0x200000000>;" in ov
    assert "\tfragment@0 {" in ov and "\t\t__overlay__ {" in ov


def test_to_dts_prints_a_string_list_a_lone_cpu_zero_and_raw_bytes():
    text = dt.to_dts(dtb({"compatible": b"a,b\0c\0", "resources": {
        "cpus": cells64(0), "cpus-available": b"", "odd": b"\1\2\3"}}))
    assert 'compatible = "a,b", "c";' in text
    assert "cpus = /bits/ 64 <0x0>;" in text
    assert "cpus-available;" in text
    assert "odd = [01 02 03];" in text
