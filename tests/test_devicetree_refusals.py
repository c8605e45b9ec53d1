"""partition/host/devicetree.py refusing trees and overlays that break a rule.

Hand-built trees (FdtSw) break one rule at a time; every refusal is an InvalidSpec (EINVAL) or
NotSupported (EOPNOTSUPP) naming the problem.
"""

import errno
import struct

import pytest
from dtrees import (
    MB,
    _gdt,
    _id,
    _inst,
    _pool_res,
    baseline,
    cells64,
    create_body,
    kerf_baseline,
    kerf_create,
    overlay,
    reg,
    u32,
    u64,
)
from helpers import dtb
from kerf.dtc.extractor import InstanceExtractor

from partition.errors import InvalidSpec, MKError, NotSupported
from partition.host import devicetree as dt
from partition.host.devicetree import CreateOp

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

def test_a_corrupt_begin_node_tag_is_invalid_spec():
    blob = kerf_baseline()
    off = struct.unpack_from(">I", blob, 8)[0]
    b = bytearray(blob)
    b[off] ^= 0xFF
    _refused(dt.parse_baseline, bytes(b), InvalidSpec, "malformed")
