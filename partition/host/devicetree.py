"""Device trees, the resource language of ``/sys/fs/multikernel``: the DTBs the host serves and the
DTBs and overlays (DTBO) it accepts, in the shapes kerf 0.4 writes and reads, built and parsed with
pylibfdt (the library kerf itself uses, so the two can never disagree on the wire format).

Every CPU in a tree is a physical (APIC) id in a 64-bit cell, as the current kernel tree writes
them; memory is a physical address, which in the emulator is an offset into the arena. A written
tree is an attacker's input (``mkctl kerf`` serves it from a filesystem any root process in the
bridge can write): its size is bounded, every property is length-checked before it is decoded,
and every problem is an ``InvalidSpec`` (EINVAL) that names the node and property.

The language lives in four modules, each with one job; this one is their single import path
(``from partition.host.devicetree import ...``, ``devicetree.MAX_TREE_BYTES``), so that callers,
tests and the kerf bridge never depend on how it is split:

    dtb.py      the vocabulary (compatibles, paths, bounds) and ``Tree``, the checked reader
    dtbuild.py  the DTBs the host serves: the root tree, the pool, an instance
    dtparse.py  the trees it accepts: a baseline, an overlay's operations, an instance's dump
    dts.py      the text form: ``to_dts``, ``from_dts``, ``read_tree_file``
"""

from __future__ import annotations

from partition.host.dtb import (
    HOST_COMPATIBLE,
    INSTANCE_COMPATIBLE,
    INSTANCES_PATH,
    LLC_PROP,
    MAX_ID,
    MAX_TREE_BYTES,
    MEMORY_GRANULE,
    OVERLAY_COMPATIBLE,
    PAGE_BYTES,
    POOL_PATH,
    Tree,
)
from partition.host.dtbuild import Chunk, host_tree, instance_tree, pool_tree
from partition.host.dtparse import (
    Baseline,
    CreateOp,
    InstanceDump,
    Operation,
    Overlay,
    PoolOp,
    RemoveOp,
    UpdateOp,
    parse_baseline,
    parse_instance,
    parse_overlay,
)
from partition.host.dts import MAX_DTS_DEPTH, from_dts, read_tree_file, to_dts

__all__ = [
    "HOST_COMPATIBLE", "INSTANCES_PATH", "INSTANCE_COMPATIBLE", "LLC_PROP", "MAX_DTS_DEPTH", "MAX_ID",
    "MAX_TREE_BYTES", "MEMORY_GRANULE", "OVERLAY_COMPATIBLE", "PAGE_BYTES", "POOL_PATH", "Baseline",
    "Chunk", "CreateOp", "InstanceDump", "Operation", "Overlay", "PoolOp", "RemoveOp", "Tree",
    "UpdateOp", "from_dts", "host_tree", "instance_tree", "parse_baseline", "parse_instance",
    "parse_overlay", "pool_tree", "read_tree_file", "to_dts",
]
