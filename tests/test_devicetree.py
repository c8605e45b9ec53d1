"""partition/host/devicetree.py against kerf 0.4's own code, hostile bytes and a small fuzz.

Trees and overlays are made by kerf's generators (InstanceExtractor, OverlayGenerator) and read
back by ours, and ours are read back by kerf's DeviceTreeParser: the two sides must agree on
every value. Hand-built trees (FdtSw) then break one rule at a time; every refusal is an
InvalidSpec (EINVAL) or NotSupported (EOPNOTSUPP) naming the problem. The byte-level tests run
in a forked child, so that a crash inside libfdt fails the test instead of killing pytest.
"""

import dataclasses
import errno
import faulthandler
import json
import os
import random
import select
import signal
import struct
import time
import traceback

import libfdt
import pytest
from helpers import dtb
from kerf.dtc.extractor import InstanceExtractor
from kerf.dtc.overlay import OverlayGenerator
from kerf.dtc.parser import DeviceTreeParser
from kerf.exceptions import ParseError
from kerf.models import (
    CPUAllocation,
    GlobalDeviceTree,
    HardwareInventory,
    Instance,
    InstanceResources,
    MemoryAllocation,
    PoolMemoryRegion,
)
from kerf.pool_diff import ANY_NODE, PoolDiff

from partition.errors import InvalidSpec, MKError, NotSupported
from partition.host import devicetree as dt
from partition.host.devicetree import Chunk, CreateOp, RemoveOp, UpdateOp

MB = 1 << 20

# -- kerf's models ----------------------------------------------------------------------------


def _hw(cpus, requested):
    return HardwareInventory(
        cpus=CPUAllocation(total=max(cpus, default=-1) + 1, host_reserved=[], available=cpus),
        memory=MemoryAllocation(total_bytes=0, host_reserved_bytes=0, requested=requested),
        topology=None, devices={})


def _gdt(instances=None, cpus=(2, 3, 6), requested=None):
    return GlobalDeviceTree(hardware=_hw(list(cpus), requested or {0: 64 * MB}),
                            instances=dict(instances or {}), device_references={})


def _inst(name, iid, cpus, memory, **resources):
    return Instance(name=name, id=iid, resources=InstanceResources(
        cpus=list(cpus), memory_base=0, memory_bytes=memory, devices=[], **resources))


def _with(instance, **resources):
    return dataclasses.replace(instance,
                               resources=dataclasses.replace(instance.resources, **resources))


def kerf_baseline(cpus=(2, 3, 6), requested=None) -> bytes:
    return bytes(InstanceExtractor().generate_global_dtb(_gdt(cpus=cpus, requested=requested)))


def kerf_create(*instances) -> bytes:
    return bytes(OverlayGenerator().generate_overlay(
        _gdt(), _gdt({i.name: i for i in instances})))


# -- hand-built trees -------------------------------------------------------------------------


def u32(v):
    return struct.pack(">I", v)


def u64(v):
    return struct.pack(">Q", v)


def reg(base, size):
    return struct.pack(">QQ", base, size)


def cells64(*ids):
    return struct.pack(f">{len(ids)}Q", *ids)


def overlay(*fragments) -> bytes:
    """fragments: (target-path or raw bytes or None, __overlay__ body or None)."""
    root: dict = {"compatible": dt.OVERLAY_COMPATIBLE}
    for n, (target, body) in enumerate(fragments):
        frag: dict = {}
        if target is not None:
            frag["target-path"] = target
        if body is not None:
            frag["__overlay__"] = body
        root[f"fragment@{n:x}"] = frag
    return dtb(root)


ID3 = u32(3)


def create_body(name="web", iid=ID3, cpus=None, memory=None, extra=None, res_extra=None):
    res: dict = {"cpus": cells64(1, 2) if cpus is None else cpus}
    if memory is not False:
        res["memory-bytes"] = u64(8 * MB) if memory is None else memory
    res.update(res_extra or {})
    body: dict = {}
    if name is not None:
        body["instance-name"] = name
    if iid is not None:
        body["id"] = iid
    body["resources"] = res
    body.update(extra or {})
    return {"instance-create": body}


def baseline(resources=None, root_extra=None) -> bytes:
    res = {"cpus": cells64(2, 3)} if resources is None else resources
    spec: dict = {"compatible": dt.HOST_COMPATIBLE, "resources": res}
    spec.update(root_extra or {})
    return dtb(spec)


def _pool_res(**extra):
    return {"cpus": cells64(2, 3), "memory@0": {"size": u64(64 * MB), "numa-node-id": u32(0)},
            **extra}


def _id(v) -> str:
    """A short test id: a message fragment (or the last of a list), else the value's type."""
    if isinstance(v, list) and v and isinstance(v[-1], str):
        v = v[-1]
    if isinstance(v, str):
        return v[:48]
    return v.__name__ if isinstance(v, type) else type(v).__name__


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


# -- 2. refusals --------------------------------------------------------------------------------

GOOD_OV = kerf_create(_inst("web", 5, [1, 2], 8 * MB))


def _header(blob: bytes, field: int, value: int) -> bytes:
    b = bytearray(blob)
    struct.pack_into(">I", b, 4 * field, value)
    return bytes(b)


def _refused(fn, blob, cls, *fragments):
    with pytest.raises(MKError) as e:
        fn(blob)
    assert type(e.value) is cls, f"{type(e.value).__name__}: {e.value}"
    assert e.value.errno == (errno.EINVAL if cls is InvalidSpec else errno.EOPNOTSUPP)
    for frag in fragments:
        assert frag in e.value.message, (frag, e.value.message)
    return e.value


@pytest.mark.parametrize("blob, fragment", [
    ("a string", "must be bytes"),
    (None, "must be bytes"),
    (memoryview(GOOD_OV), "must be bytes"),
    (b"", "0 bytes, shorter than an FDT header"),
    (GOOD_OV[:39], "39 bytes, shorter than an FDT header"),
    (b"\0\0\0\0" + GOOD_OV[4:], "not a DTB (magic 0x0, want 0xd00dfeed)"),
    (b"/dts-v1/;\n/ { };\n" + bytes(40), "not a DTB"),
    (GOOD_OV[:-8], f"says it is {len(GOOD_OV)} bytes but {len(GOOD_OV) - 8} arrived"),
    (GOOD_OV + bytes(8), f"says it is {len(GOOD_OV)} bytes but {len(GOOD_OV) + 8} arrived"),
    (_header(GOOD_OV, 1, 1 << 30), "bytes but"),
    (b"\xd0\x0d\xfe\xed" + bytes(dt.MAX_TREE_BYTES - 3),
     f"{dt.MAX_TREE_BYTES + 1} bytes, over the {dt.MAX_TREE_BYTES}-byte limit"),
    (_header(GOOD_OV, 5, 1), "malformed"),                           # version 1
    (_header(GOOD_OV, 2, 0xFFFFFFF0), "malformed"),                  # off_dt_struct
    (_header(GOOD_OV, 9, 0x7FFFFFFF), "malformed"),                  # size_dt_struct
], ids=_id)
@pytest.mark.parametrize("parse", [dt.parse_overlay, dt.parse_baseline, dt.to_dts])
def test_blobs_that_are_no_dtb_are_refused(parse, blob, fragment):
    err = _refused(parse, blob, InvalidSpec, fragment)
    if parse is dt.parse_overlay and isinstance(blob, bytes) and len(blob) >= 40:
        assert err.message.startswith("the overlay ")
    if parse is dt.parse_baseline and isinstance(blob, bytes) and len(blob) >= 40:
        assert err.message.startswith("the baseline device tree ")


def test_a_blob_over_the_limit_is_refused_before_it_is_read():
    big = b"\xd0\x0d\xfe\xed" + struct.pack(">I", dt.MAX_TREE_BYTES * 2) + bytes(dt.MAX_TREE_BYTES * 2 - 8)
    _refused(dt.parse_overlay, big, InvalidSpec, "over the")
    _refused(dt.parse_overlay, bytearray(big), InvalidSpec, "over the")
    assert dt.parse_overlay(bytearray(GOOD_OV)).operations          # a bytearray is a blob too


CPU = {"cpu@1": {"reg": u64(1)}}


@pytest.mark.parametrize("blob, cls, fragments", [
    # strings
    (overlay((b"/instances", create_body())), InvalidSpec,
     ["/fragment@0", "'target-path' must be one NUL-terminated string"]),
    (overlay((b"/instances\0/resources\0", create_body())), InvalidSpec,
     ["'target-path' must be one NUL-terminated string"]),
    (overlay((b"/inst\0ances\0", create_body())), InvalidSpec, ["NUL-terminated"]),
    (overlay(("/instances", create_body(name=b"web"))), InvalidSpec,
     ["/fragment@0/__overlay__/instance-create", "'instance-name' must be one NUL-terminated"]),
    (overlay(("/instances", create_body(name=b"w\0eb\0"))), InvalidSpec, ["'instance-name'"]),
    (overlay(("/instances", create_body(name="x" * 300))), InvalidSpec, ["'instance-name'"]),
    (overlay(("/instances", create_body(name="w\u00e9b"))), InvalidSpec, ["must be ASCII"]),
    (overlay(("/instances", create_body(name=""))), InvalidSpec, ["has no instance-name"]),
    (overlay(("/instances", create_body(name=None))), InvalidSpec, ["has no instance-name"]),
    (overlay(("/instances", {"instance-remove": {}})), InvalidSpec, ["has no instance-name"]),
    (overlay(("/instances", {"instance-remove": {"instance-name": b"web"}})), InvalidSpec,
     ["NUL-terminated"]),
    # u32 / u64
    (overlay(("/instances", create_body(iid=u64(3)))), InvalidSpec, ["'id' must be one u32 cell"]),
    (overlay(("/instances", create_body(iid=b"\x03"))), InvalidSpec, ["'id' must be one u32 cell"]),
    (overlay(("/instances", create_body(iid=u32(0)))), InvalidSpec,
     ["Instance ID must be in range 1-511, got 0"]),
    (overlay(("/instances", create_body(iid=u32(512)))), InvalidSpec,
     ["Instance ID must be in range 1-511, got 512"]),
    (overlay(("/instances", create_body(iid=u32(0xFFFFFFFF)))), InvalidSpec, ["got 4294967295"]),
    (overlay(("/instances", create_body(memory=u64(0)))), InvalidSpec,
     ["instance 'web' has no memory-bytes"]),
    (overlay(("/instances", create_body(memory=False))), InvalidSpec, ["has no memory-bytes"]),
    (overlay(("/instances", create_body(memory=u32(8 * MB)))), InvalidSpec,
     ["/fragment@0/__overlay__/instance-create/resources", "'memory-bytes' must be a u64"]),
    # cpus
    (overlay(("/instances", create_body(cpus=b"\0\0\0\0\0\1"))), InvalidSpec,
     ["'cpus' must be a list of CPU ids in 64-bit cells"]),
    (overlay(("/instances", create_body(cpus=b"\1"))), InvalidSpec, ["'cpus' must be a list"]),
    (overlay(("/instances", create_body(cpus=cells64(1, 2, 1)))), InvalidSpec,
     ["'cpus' must be a list of distinct CPU ids"]),
    (overlay(("/instances", create_body(cpus=u32(4) * 3))), InvalidSpec, ["distinct"]),
    (overlay(("/instances", create_body(cpus=cells64(*range(8193))))), InvalidSpec,
     ["at most 8192"]),
    (overlay(("/instances", create_body(cpus=b""))), InvalidSpec, ["instance 'web' has no CPUs"]),
    # the shape of an instance-create
    (overlay(("/instances", {"instance-create": {"instance-name": "web"}})), InvalidSpec,
     ["instance 'web' has no resources node"]),
    (overlay(("/instances", create_body(extra={"evil": {}}))), InvalidSpec,
     ["instance 'web': unknown node 'evil'"]),
    (overlay(("/instances", create_body(res_extra={"uring": {"sq-entries": u32(8)}}))),
     NotSupported, ["io_uring"]),
    # reg and cpu@ items
    (overlay(("/instances/web", {"memory-add": {"memory@0": {"reg": u64(0x200000)}}})),
     InvalidSpec, ["/fragment@0/__overlay__/memory-add/memory@0", "'reg' must be <base size>"]),
    (overlay(("/instances/web", {"memory-remove": {"memory@0": {"reg": bytes(24)}}})),
     InvalidSpec, ["'reg' must be <base size> in two u64s"]),
    (overlay(("/instances/web", {"memory-remove": {"memory@0": {}}})), InvalidSpec,
     ["'reg' must be <base size>"]),
    (overlay(("/instances/web", {"memory-add": {"cpu@0": {"reg": u64(1)}}})), InvalidSpec,
     ["memory-add/cpu@0: expected memory@<n> nodes"]),
    (overlay(("/instances/web", {"cpu-add": {"cpu@1": {"reg": bytes(16)}}})), InvalidSpec,
     ["cpu-add/cpu@1: 'reg' must be one CPU id"]),
    (overlay(("/instances/web", {"cpu-add": {"cpu@1": {}}})), InvalidSpec, ["must be one CPU id"]),
    (overlay(("/instances/web", {"cpu-remove": {"memory@1": {"reg": u64(1)}}})), InvalidSpec,
     ["expected cpu@<id> nodes"]),
    # operations and targets
    (overlay(("/instances/web", {"device-add": {"pci@0": {"pci-id": "0000:01:00.0"}}})),
     NotSupported, ["no devices"]),
    (overlay(("/instances/web", {"device-remove": {"pci@0": {"pci-id": "0000:01:00.0"}}})),
     NotSupported, ["no devices"]),
    # the pool (/resources): the real kernel's rules for a chunk request
    (overlay(("/resources", {"device-add": {"pci@0": {"pci-id": "0000:01:00.0"}}})),
     NotSupported, ["no devices to move into or out of the pool"]),
    (overlay(("/resources", {"memory-add": {"memory@0": {"reg": reg(0, MB)}}})), InvalidSpec,
     ["/fragment@0/__overlay__/memory-add/memory@0", "names no 'reg' (the pool picks the base)"]),
    (overlay(("/resources", {"memory-add": {"memory@0": {}}})), InvalidSpec,
     ["'size' must be a non-zero multiple", "got None"]),
    (overlay(("/resources", {"memory-add": {"memory@0": {"size": u64(0)}}})), InvalidSpec,
     ["'size' must be a non-zero multiple", "got 0"]),
    (overlay(("/resources", {"memory-add": {"memory@0": {"size": u64(MB + 1000)}}})), InvalidSpec,
     ["'size' must be a non-zero multiple of the 4096-byte page"]),
    (overlay(("/resources", {"memory-add": {"memory@0": {"size": u32(MB)}}})), InvalidSpec,
     ["'size' must be a u64"]),
    (overlay(("/resources", {"memory-add": {"memory@0": {"size": u64(MB),
                                                         "numa-node-id": u32(1)}}})),
     InvalidSpec, ["NUMA node 1 does not exist"]),
    (overlay(("/resources", {"memory-remove": {"memory@0": {"size": u64(MB)}}})), InvalidSpec,
     ["'reg' must be <base size>"]),
    (overlay(("/resources", {"cpu-add": {"memory@1": {"reg": u64(1)}}})), InvalidSpec,
     ["expected cpu@<id> nodes"]),
    (overlay(("/resources", {"instance-create": {}})), InvalidSpec,
     ["unknown operation 'instance-create' for /resources"]),
    (overlay(("/instances", {"instance-update": {}})), InvalidSpec,
     ["unknown operation 'instance-update' under /instances"]),
    (overlay(("/instances", {"cpu-add": CPU})), InvalidSpec, ["unknown operation 'cpu-add'"]),
    (overlay(("/instances/web", {"cpu-move": CPU})), InvalidSpec,
     ["unknown operation 'cpu-move' for /instances/web"]),
    (overlay(("/instances/web", {"instance-create": {}})), InvalidSpec,
     ["unknown operation 'instance-create' for /instances/web"]),
    (overlay(("/", {"cpu-add": CPU})), InvalidSpec, ["target-path '/' names nothing"]),
    (overlay(("/instances/web/resources", {"cpu-add": CPU})), InvalidSpec, ["names nothing"]),
    (overlay(("/instancesX/web", {"cpu-add": CPU})), InvalidSpec, ["names nothing"]),
    (overlay(("instances/web", {"cpu-add": CPU})), InvalidSpec, ["names nothing"]),
    # fragments
    (dtb({"compatible": dt.OVERLAY_COMPATIBLE}), InvalidSpec, ["overlay has no fragment@N node"]),
    (overlay((None, create_body())), InvalidSpec, ["/fragment@0 has no target-path"]),
    (overlay(("/instances", None)), InvalidSpec, ["/fragment@0 has no __overlay__ node"]),
    (overlay(*[("/instances", {})] * 65), InvalidSpec, ["65 fragments (at most 64)"]),
    (overlay(("/instances", create_body()), ("/resources", {"cpu-frob": CPU})), InvalidSpec,
     ["unknown operation 'cpu-frob' for /resources"]),
    (kerf_baseline(), InvalidSpec, ["no fragment@N"]),
], ids=_id)
def test_an_overlay_breaking_a_rule_is_refused_naming_it(blob, cls, fragments):
    _refused(dt.parse_overlay, blob, cls, *fragments)


def test_an_overlay_at_the_limits_is_accepted():
    ov = dt.parse_overlay(overlay(
        *[("/instances", create_body(name=f"i{n}", iid=u32(n + 1))) for n in range(63)],
        ("/instances", create_body(name="x" * 255, iid=u32(511),
                                   cpus=u32(7) + u32(9) + u32(11)))))
    assert len(ov.operations) == 64
    assert ov.operations[-1] == CreateOp("x" * 255, 511, [7, 9, 11], 8 * MB)  # 32-bit cells
    assert ov.operations[0] == CreateOp("i0", 1, [1, 2], 8 * MB)
    empty = dt.parse_overlay(overlay(("/instances", {})))
    assert empty.operations == [] and empty.target == "/instances"


def test_a_pool_fragment_is_parsed_in_the_real_order():
    """A /resources fragment (kerf init on a live pool writes one): sizes asked for, whole
    chunks named, CPUs by APIC id; whatever order the nodes come in, the operation keeps the
    real order (cpu-remove, memory-remove, memory-add, cpu-add); in an /instances fragment
    creates come before removes."""
    ov = dt.parse_overlay(overlay(("/resources", {
        "cpu-add": {"cpu@3": {"reg": u64(3)}},
        "memory-add": {"memory@0": {"size": u64(64 * MB), "numa-node-id": u32(0)},
                       "memory@1": {"size": u64(4096)}},
        "memory-remove": {"memory@0": {"reg": reg(0x10000000, 32 * MB)}},
        "cpu-remove": {"cpu@5": {"reg": u32(5)}}})))
    assert ov.target == "/resources"
    assert ov.operations == [dt.PoolOp(cpu_remove=[5], memory_remove=[(0x10000000, 32 * MB)],
                                       memory_add=[64 * MB, 4096], cpu_add=[3])]
    both = dt.parse_overlay(overlay(("/instances", {
        "instance-remove": {"instance-name": "old"}, **create_body()})))
    assert [type(o).__name__ for o in both.operations] == ["CreateOp", "RemoveOp"]


def test_a_target_with_an_empty_instance_name_is_refused():
    _refused(dt.parse_overlay, overlay(("/instances/", {"cpu-add": CPU})), InvalidSpec,
             "names nothing")


@pytest.mark.parametrize("blob, fragments", [
    (baseline(_pool_res(**{"memory-base": u64(0)})),
     ["memory-base/memory-bytes are not supported; use memory@N { size; numa-node-id; }"]),
    (baseline(_pool_res(**{"memory-bytes": u64(64 * MB)})), ["memory-base/memory-bytes"]),
    (bytes(InstanceExtractor().generate_global_dtb(_gdt({"web": _inst("web", 1, [2], 4 * MB)}))),
     ["Baseline device tree must not contain instances"]),
    (baseline(root_extra={"instances": {"web": {"id": u32(1)}}}), ["must not contain instances"]),
    (dtb({"compatible": dt.HOST_COMPATIBLE}), ["baseline device tree has no /resources node"]),
    (GOOD_OV, ["has no /resources node"]),
    (baseline({"cpus": cells64(2), "memory@0": {"numa-node-id": u32(0)}}),
     ["/resources/memory@0 has no 'size'"]),
    (baseline({"cpus": cells64(2), "memory@0": {"reg": struct.pack(">QQ", 0, MB)}}),
     ["has no 'size'"]),
    (baseline({"cpus": cells64(2), "memory@0": {"size": u32(MB)}}),
     ["/resources/memory@0: 'size' must be a u64"]),
    (baseline({"cpus": cells64(2), "memory@0": {"size": u64(MB), "numa-node-id": u64(0)}}),
     ["'numa-node-id' must be one u32 cell"]),
    (baseline({"cpus": b"\0\0\2", "memory@0": {"size": u64(MB)}}),
     ["/resources: 'cpus' must be a list of CPU ids in 64-bit cells"]),
    (baseline({"cpus": cells64(2, 3, 2), "memory@0": {"size": u64(MB)}}), ["distinct"]),
], ids=_id)
def test_a_baseline_breaking_a_rule_is_refused_naming_it(blob, fragments):
    _refused(dt.parse_baseline, blob, InvalidSpec, *fragments)


def test_a_baseline_with_an_empty_instances_node_or_extra_nodes_is_read():
    base = dt.parse_baseline(baseline(
        {"cpus": cells64(2, 3), "memory@0": {"size": u64(MB)}, "memory@1":
         {"size": u64(2 * MB), "numa-node-id": u32(1)}, "memory@2": {"size": u64(MB)},
         "topology": {}}, root_extra={"instances": {}}))
    assert base.cpus == [2, 3]
    assert base.memory == {0: 2 * MB, 1: 2 * MB}


# -- byte-level hostility, in a forked child --------------------------------------------------


def _in_child(fn, timeout=120.0):
    """Run ``fn()`` in a forked child; its JSON result, or the way the child died."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:                                   # pragma: no cover - the child
        code = 0
        try:
            faulthandler.disable()                 # a crash is the parent's to report
            os.close(r)
            try:
                out = {"result": fn()}
            except BaseException:
                out, code = {"error": traceback.format_exc()}, 1
            data = json.dumps(out).encode()
            while data:
                data = data[os.write(w, data):]
        finally:
            os._exit(code)
    os.close(w)
    chunks = []
    deadline = time.monotonic() + timeout
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([r], [], [], left)[0]:
                os.kill(pid, signal.SIGKILL)
                break
            chunk = os.read(r, 65536)
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(r)
        _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        pytest.fail(f"the child died of signal {os.WTERMSIG(status)} "
                    f"({signal.Signals(os.WTERMSIG(status)).name}): a crash in libfdt")
    out = json.loads(b"".join(chunks) or b"{}")
    if "error" in out:
        pytest.fail(f"the child failed:\n{out['error']}")
    return out["result"]


def _outcome(fn, blob) -> tuple[str, str]:
    try:
        fn(blob)
        return "ok", ""
    except (InvalidSpec, NotSupported) as exc:
        return type(exc).__name__, ""
    except MKError as exc:
        return f"MKError:{type(exc).__name__}", str(exc)
    except Exception as exc:
        return f"{type(exc).__module__}.{type(exc).__name__}", repr(exc)


def _survey(cases) -> dict:
    """cases: (label, parse, blob). Counts per outcome, and a few examples of each one that is
    not a successful parse nor an InvalidSpec/NotSupported."""
    counts: dict[str, int] = {}
    examples: dict[str, list] = {}
    for label, fn, blob in cases:
        kind, why = _outcome(fn, blob)
        counts[kind] = counts.get(kind, 0) + 1
        if kind not in ("ok", "InvalidSpec", "NotSupported") and len(examples.setdefault(kind, [])) < 3:
            examples[kind].append([label, why, blob.hex()])
    return {"counts": counts, "examples": examples, "cases": sum(counts.values())}


def _samples() -> dict[str, tuple[bytes, object]]:
    web = _inst("web", 5, [1, 2], 8 * MB)
    gen = OverlayGenerator()
    return {
        "create": (kerf_create(web, _inst("db", None, [3], 2 * MB)), dt.parse_overlay),
        "remove": (bytes(gen.generate_removal_overlay("web")), dt.parse_overlay),
        "update": (bytes(gen.generate_update_overlay(
            "web", web, _with(web, cpus=[2, 3], memory_bytes=12 * MB),
            memory_add_base=0x4000000)), dt.parse_overlay),
        "shrink": (bytes(gen.generate_update_overlay(
            "web", web, _with(web, memory_bytes=4 * MB),
            memory_regions=[(0x200000, 4 * MB), (0x600000, 4 * MB)])), dt.parse_overlay),
        "baseline": (kerf_baseline((2, 3, 6), {0: 64 * MB, 1: 32 * MB}), dt.parse_baseline),
    }


def _flips():
    cases = []
    for name, (blob, parse) in _samples().items():
        off, size = struct.unpack_from(">I", blob, 8)[0], struct.unpack_from(">I", blob, 36)[0]
        for pos in range(off, off + size):
            for how in ("xor ff", "xor 01", "xor 80", "set 00", "set 03", "set 09"):
                b = bytearray(blob)
                op, value = how.split()
                b[pos] = b[pos] ^ int(value, 16) if op == "xor" else int(value, 16)
                if bytes(b) != blob:
                    cases.append((f"{name}@{pos - off} {how}", parse, bytes(b)))
    return cases


def _flip_survey():
    return _survey(_flips())


@pytest.fixture(scope="module")
def flip_survey():
    return _in_child(_flip_survey)


def test_flipped_structure_bytes_never_crash_nor_raise_an_unknown_error(flip_survey):
    """Every byte of the structure block of five kerf-made blobs, six ways: the parse either
    succeeds or refuses; nothing crashes. (libfdt's own exception is the known leak shown by
    the next test.)"""
    counts = flip_survey["counts"]
    assert flip_survey["cases"] > 3000
    assert counts.get("InvalidSpec", 0) > 500 and counts.get("ok", 0) > 100
    unknown = {k: v for k, v in counts.items()
               if k not in ("ok", "InvalidSpec", "NotSupported", "libfdt.FdtException")}
    assert not unknown, (unknown, {k: flip_survey["examples"][k] for k in unknown})


def test_flipped_structure_bytes_are_only_ever_invalid_spec_or_not_supported(flip_survey):
    counts = flip_survey["counts"]
    leaked = {k: v for k, v in counts.items() if k not in ("ok", "InvalidSpec", "NotSupported")}
    assert not leaked, (leaked, {k: flip_survey["examples"][k][:1] for k in leaked})


def test_a_corrupt_begin_node_tag_is_invalid_spec():
    blob = kerf_baseline()
    off = struct.unpack_from(">I", blob, 8)[0]
    b = bytearray(blob)
    b[off] ^= 0xFF
    _refused(dt.parse_baseline, bytes(b), InvalidSpec, "malformed")


def _bad_name_offset_dts():
    """to_dts of an overlay whose first property's name offset points far past the strings
    block: libfdt's get_property_by_offset hands pylibfdt a name it never checked."""
    blob = bytearray(bytes(OverlayGenerator().generate_removal_overlay("web")))
    off = struct.unpack_from(">I", blob, 8)[0]
    assert struct.unpack_from(">I", blob, off + 8)[0] == 3          # FDT_PROP "compatible"
    blob[off + 16] ^= 0xFF                                          # its nameoff, high byte
    try:
        dt.to_dts(bytes(blob))
    except InvalidSpec as exc:
        return ["InvalidSpec", exc.message]
    return ["ok", ""]


def test_to_dts_refuses_a_property_whose_name_is_out_of_bounds():
    kind, message = _in_child(_bad_name_offset_dts, timeout=60)
    assert kind == "InvalidSpec", message


# -- 3. a small fuzz ---------------------------------------------------------------------------

FUZZ_SEED = 0x6D6B6474          # "mkdt"
FUZZ_CASES = 2000
INTERESTING = (0, 1, 2, 3, 4, 9, 0x10, 0x7F, 0x80, 0xFF, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF,
               0xFFFFFFF0, 0xD00DFEED)


def _mutate(rng: random.Random, blob: bytes) -> bytes:
    b = bytearray(blob)
    kind = rng.randrange(7)
    if kind == 0:                                       # a few bit flips anywhere past magic
        for _ in range(rng.randint(1, 4)):
            pos = rng.randrange(8, len(b))
            b[pos] ^= 1 << rng.randrange(8)
    elif kind == 1:                                     # random bytes
        for _ in range(rng.randint(1, 8)):
            b[rng.randrange(8, len(b))] = rng.randrange(256)
    elif kind == 2:                                     # an interesting word, aligned
        pos = rng.randrange(2, len(b) // 4) * 4
        struct.pack_into(">I", b, pos, rng.choice(INTERESTING + (len(b), len(b) - pos)))
    elif kind == 3:                                     # a header field
        field = rng.randrange(2, 10)
        value = rng.choice(INTERESTING + (rng.randrange(len(b) + 64),))
        struct.pack_into(">I", b, 4 * field, value)
    elif kind == 4:                                     # cut a piece out
        a = rng.randrange(40, len(b))
        del b[a:a + rng.randint(1, 16)]
    elif kind == 5:                                     # duplicate a piece
        a = rng.randrange(40, len(b))
        piece = b[a:a + rng.randint(1, 24)]
        b[a:a] = piece
    else:                                               # truncate
        del b[rng.randrange(40, len(b)):]
    if rng.random() < 0.85 and len(b) >= 8:             # mostly, a totalsize that matches
        struct.pack_into(">I", b, 4, len(b))
    return bytes(b)


def _fuzz_cases():
    rng = random.Random(FUZZ_SEED)
    samples = list(_samples().items())
    cases = []
    for n in range(FUZZ_CASES):
        name, (blob, parse) = samples[n % len(samples)]
        mutated = _mutate(rng, blob)
        cases.append((f"{name}#{n}", parse, mutated))
        other = dt.parse_baseline if parse is dt.parse_overlay else dt.parse_overlay
        cases.append((f"{name}#{n} cross", other, mutated))
    return cases


def _fuzz_survey():
    t0 = time.monotonic()
    out = _survey(_fuzz_cases())
    out["seconds"] = time.monotonic() - t0
    out["digest"] = sum(len(b) for _, _, b in _fuzz_cases()[::2])
    return out


@pytest.fixture(scope="module")
def fuzz_survey():
    return _in_child(_fuzz_survey)


def test_the_fuzz_is_deterministic_and_quick(fuzz_survey):
    again = sum(len(b) for _, _, b in _fuzz_cases()[::2])
    assert fuzz_survey["digest"] == again
    assert fuzz_survey["cases"] == 2 * FUZZ_CASES
    assert fuzz_survey["seconds"] < 20, fuzz_survey["seconds"]


def test_fuzzed_kerf_blobs_never_crash_nor_raise_an_unknown_error(fuzz_survey):
    counts = fuzz_survey["counts"]
    assert counts.get("ok", 0) > 50 and counts.get("InvalidSpec", 0) > 1000, counts
    unknown = {k: v for k, v in counts.items() if k not in
               ("ok", "InvalidSpec", "NotSupported", "libfdt.FdtException")
               and not k.startswith("MKError:")}
    assert not unknown, (unknown, {k: fuzz_survey["examples"][k] for k in unknown})


def test_fuzzed_kerf_blobs_are_parsed_or_refused_as_mkerrors(fuzz_survey):
    counts = fuzz_survey["counts"]
    leaked = {k: v for k, v in counts.items()
              if k not in ("ok", "InvalidSpec", "NotSupported") and not k.startswith("MKError:")}
    assert not leaked, (leaked, {k: fuzz_survey["examples"][k][:1] for k in leaked})


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
