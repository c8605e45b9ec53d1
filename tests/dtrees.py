"""Device trees for the tests of partition/host/devicetree.py: kerf 0.4's models and
generators (the real control plane's bytes) and hand-built trees (FdtSw) that break one rule at a
time."""

import dataclasses
import struct

from helpers import dtb
from kerf.dtc.extractor import InstanceExtractor
from kerf.dtc.overlay import OverlayGenerator
from kerf.models import (
    CPUAllocation,
    GlobalDeviceTree,
    HardwareInventory,
    Instance,
    InstanceResources,
    MemoryAllocation,
)

from partition.host import devicetree as dt

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
