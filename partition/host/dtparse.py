"""The trees the host accepts, parsed into what they ask for: a baseline (``kerf init``), an
overlay (``kerf create/update/delete`` and pool changes, one transaction of operations) and an
instance's dump (``mkctl create --input``).

Separate from the reader (dtb.py) and the builders: this is where the meaning of each node is
decided (which properties a fragment may carry, in what order its operations run); the reader
only guarantees the bytes are well-formed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from partition.errors import InvalidSpec, NotSupported
from partition.host.dtb import (
    INSTANCES_PATH,
    MAX_ID,
    PAGE_BYTES,
    POOL_PATH,
    Tree,
)


@dataclass
class Baseline:
    """What a baseline write asks for: pool CPUs (physical ids) and memory per NUMA node."""

    cpus: list[int]
    memory: dict[int, int]
    llc_way_mask: int | None = None
    #: the machine's shared regions, ``daxfs@NAME { size; }`` (the emulator's own node:
    #: host/shared.py), name -> bytes, checked where the machine is made
    shared: dict[str, int] = field(default_factory=dict)

    @property
    def memory_bytes(self) -> int:
        return sum(self.memory.values())


def parse_baseline(data: bytes) -> Baseline:
    """A baseline as ``kerf init`` writes it: ``/resources`` with ``cpus`` and one
    ``memory@N { size; numa-node-id; }`` per node; no ``/instances``."""
    t = Tree(data, "baseline device tree")
    res = t.path(POOL_PATH)
    if res is None:
        raise InvalidSpec("baseline device tree has no /resources node",
                          "a baseline is /resources { cpus; memory@0 { size; }; }")
    if t.path(INSTANCES_PATH) is not None and t.children(t.path(INSTANCES_PATH) or 0):
        raise InvalidSpec("Baseline device tree must not contain instances",
                          "create instances with overlays (kerf create)")
    for legacy in ("memory-base", "memory-bytes"):
        if t.raw(res, legacy) is not None:
            raise InvalidSpec("memory-base/memory-bytes are not supported; use memory@N "
                              "{ size; numa-node-id; }", "rewrite the baseline's memory nodes")
    cpus = t.cpus(res) or []
    memory: dict[int, int] = {}
    for name, node in t.children(res):
        if not name.startswith("memory@"):
            continue
        size = t.u64(node, "size")
        if size is None:
            raise InvalidSpec(f"baseline device tree: /resources/{name} has no 'size'",
                              "a baseline asks for memory by size: memory@0 { size = /bits/ 64 <N>; }")
        numa = t.u32(node, "numa-node-id") or 0
        memory[numa] = memory.get(numa, 0) + size
    shared: dict[str, int] = {}
    for name, node in t.children(res):
        if name.startswith("daxfs@"):
            size = t.u64(node, "size")
            if size is None:
                raise InvalidSpec(f"baseline device tree: /resources/{name} has no 'size'",
                                  "a shared region: daxfs@db { size = /bits/ 64 <0x1000000>; }")
            shared[name[len("daxfs@"):]] = size
    return Baseline(cpus=cpus, memory=memory, llc_way_mask=t.llc_mask(res), shared=shared)


# -- overlays -------------------------------------------------------------------------------------
@dataclass
class CreateOp:
    name: str
    id: int | None
    cpus: list[int]
    memory_bytes: int
    llc_way_mask: int | None = None


@dataclass
class RemoveOp:
    name: str


@dataclass
class UpdateOp:
    """One fragment aimed at ``/instances/<name>``: its operations, in the kernel's fixed order
    (memory-remove, memory-add, cpu-remove, cpu-add)."""

    name: str
    memory_remove: list[tuple[int, int]] = field(default_factory=list)
    memory_add: list[tuple[int, int]] = field(default_factory=list)
    cpu_remove: list[int] = field(default_factory=list)
    cpu_add: list[int] = field(default_factory=list)

    def empty(self) -> bool:
        return not (self.memory_remove or self.memory_add or self.cpu_remove or self.cpu_add)


@dataclass
class PoolOp:
    """One fragment aimed at ``/resources``: the pool grows or shrinks (Documentation/
    multikernel/overlays.rst). CPUs are physical ids; ``memory_remove`` names whole chunks as
    the root tree reports them; ``memory_add`` asks for sizes, the pool picks each base. They
    run in the real kernel's order for the pool, resources leaving before any joins: cpu-remove,
    memory-remove, memory-add, cpu-add (devices, which the emulator has none of, sit between)."""

    cpu_remove: list[int] = field(default_factory=list)
    memory_remove: list[tuple[int, int]] = field(default_factory=list)
    memory_add: list[int] = field(default_factory=list)
    cpu_add: list[int] = field(default_factory=list)

    def empty(self) -> bool:
        return not (self.cpu_remove or self.memory_remove or self.memory_add or self.cpu_add)


Operation = CreateOp | RemoveOp | UpdateOp | PoolOp


@dataclass
class Overlay:
    operations: list[Operation]
    target: str          # the first fragment's target path (kerf reads it as tx_N/instance)


def _cpu_items(t: Tree, node: int) -> list[int]:
    out = []
    for name, item in t.children(node):
        if not name.startswith("cpu@"):
            raise InvalidSpec(f"overlay: {t.where(node)}/{name}: expected cpu@<id> nodes",
                              "each CPU is cpu@<apic id> { reg = /bits/ 64 <id>; }")
        v = t.raw(item, "reg")
        if v is None or len(v) not in (4, 8):
            raise InvalidSpec(f"overlay: {t.where(item)}: 'reg' must be one CPU id",
                              "reg = /bits/ 64 <apic id>")
        out.append(int.from_bytes(v, "big"))
    return out


def _memory_items(t: Tree, node: int) -> list[tuple[int, int]]:
    out = []
    for name, item in t.children(node):
        if not name.startswith("memory@"):
            raise InvalidSpec(f"overlay: {t.where(node)}/{name}: expected memory@<n> nodes",
                              "each range is memory@<n> { reg = <base size>; }")
        out.append(t.reg(item))
    return out


def _pool_sizes(t: Tree, node: int) -> list[int]:
    """``/resources`` memory-add items: ``size`` (u64, non-zero, page aligned) and an optional
    ``numa-node-id``; the pool picks the base, so a ``reg`` is refused, as the real kernel
    refuses it."""
    out = []
    for name, item in t.children(node):
        where = f"overlay: {t.where(item)}"
        if not name.startswith("memory@"):
            raise InvalidSpec(f"overlay: {t.where(node)}/{name}: expected memory@<n> nodes",
                              "each request is memory@<n> { size = /bits/ 64 <bytes>; }")
        if t.raw(item, "reg") is not None:
            raise InvalidSpec(f"{where}: a pool memory-add names no 'reg' (the pool picks the "
                              "base)", "ask with size = /bits/ 64 <bytes> only")
        size = t.u64(item, "size")
        if not size or size % PAGE_BYTES:
            raise InvalidSpec(f"{where}: 'size' must be a non-zero multiple of the "
                              f"{PAGE_BYTES}-byte page, got {size!r}",
                              "size = /bits/ 64 <bytes>, e.g. 0x4000000 for 64 MB")
        node_id = t.u32(item, "numa-node-id")
        if node_id not in (None, 0):
            raise InvalidSpec(f"{where}: NUMA node {node_id} does not exist (the emulator has "
                              "node 0 only)", "numa-node-id = <0>, or leave it out")
        out.append(size)
    return out


def _pool_fragment(t: Tree, body: int) -> PoolOp:
    op = PoolOp()
    for kind, node in t.children(body):
        if kind == "memory-add":
            op.memory_add += _pool_sizes(t, node)
        elif kind == "memory-remove":
            op.memory_remove += _memory_items(t, node)
        elif kind == "cpu-add":
            op.cpu_add += _cpu_items(t, node)
        elif kind == "cpu-remove":
            op.cpu_remove += _cpu_items(t, node)
        elif kind in ("device-add", "device-remove"):
            raise NotSupported("the emulator has no devices to move into or out of the pool",
                               "leave --devices out")
        else:
            raise InvalidSpec(f"overlay: unknown operation {kind!r} for {POOL_PATH}",
                              "use memory-add/-remove or cpu-add/-remove")
    return op


def parse_overlay(data: bytes) -> Overlay:
    """An overlay as kerf writes it to ``overlays/new``: ``fragment@N`` nodes with a
    ``target-path`` and an ``__overlay__`` holding ``instance-create``, ``instance-remove`` or,
    aimed at ``/instances/<name>``, the resource operations, or, aimed at ``/resources``, the
    pool's (PoolOp). Device operations are refused with EOPNOTSUPP: the emulator has no
    devices. Within an ``/instances`` fragment creates run before removes (the real order)."""
    t = Tree(data, "overlay")
    ops: list[Operation] = []
    first_target = ""
    fragments = [(n, o) for n, o in t.children(0) if n.startswith("fragment@")]
    if not fragments:
        raise InvalidSpec("overlay has no fragment@N node", "kerf writes one fragment per change")
    if len(fragments) > 64:
        raise InvalidSpec(f"overlay has {len(fragments)} fragments (at most 64)",
                          "split the change into several overlays")
    for _fname, frag in fragments:
        target = t.string(frag, "target-path")
        if target is None:
            raise InvalidSpec(f"overlay: {t.where(frag)} has no target-path",
                              "a fragment names its target with target-path")
        first_target = first_target or target
        body = t.child(frag, "__overlay__")
        if body is None:
            raise InvalidSpec(f"overlay: {t.where(frag)} has no __overlay__ node",
                              "a fragment carries its change in __overlay__")
        if target == POOL_PATH:
            ops.append(_pool_fragment(t, body))
            continue
        if target == INSTANCES_PATH:
            removes: list[Operation] = []
            for kind, node in t.children(body):
                if kind == "instance-create":
                    ops.append(_create(t, node))
                elif kind == "instance-remove":
                    name = t.string(node, "instance-name")
                    if not name:
                        raise InvalidSpec(f"overlay: {t.where(node)} has no instance-name",
                                          "instance-remove { instance-name = \"NAME\"; }")
                    removes.append(RemoveOp(name))
                else:
                    raise InvalidSpec(f"overlay: unknown operation {kind!r} under /instances",
                                      "use instance-create or instance-remove")
            ops += removes
            continue
        if not target.startswith(INSTANCES_PATH + "/") or target.count("/") != 2 or \
                target.rsplit("/", 1)[1] in ("", ".", ".."):
            raise InvalidSpec(f"overlay: target-path {target!r} names nothing the host knows",
                              "target /instances, /instances/<name> or /resources")
        up = UpdateOp(target.rsplit("/", 1)[1])
        for kind, node in t.children(body):
            if kind == "memory-remove":
                up.memory_remove += _memory_items(t, node)
            elif kind == "memory-add":
                up.memory_add += _memory_items(t, node)
            elif kind == "cpu-remove":
                up.cpu_remove += _cpu_items(t, node)
            elif kind == "cpu-add":
                up.cpu_add += _cpu_items(t, node)
            elif kind in ("device-add", "device-remove"):
                raise NotSupported("the emulator has no devices to hand to an instance",
                                   "leave --devices out")
            else:
                raise InvalidSpec(f"overlay: unknown operation {kind!r} for {target}",
                                  "use memory-add/-remove or cpu-add/-remove")
        ops.append(up)
    return Overlay(operations=ops, target=first_target)


def _create(t: Tree, node: int) -> CreateOp:
    name = t.string(node, "instance-name")
    if not name:
        raise InvalidSpec(f"overlay: {t.where(node)} has no instance-name",
                          "instance-create { instance-name = \"NAME\"; resources { ... }; }")
    iid = t.u32(node, "id")
    if iid is not None and not 1 <= iid <= MAX_ID:
        raise InvalidSpec(f"Instance ID must be in range 1-{MAX_ID}, got {iid}",
                          "id 0 is the host")
    res = t.child(node, "resources")
    if res is None:
        raise InvalidSpec(f"overlay: instance {name!r} has no resources node",
                          "resources { cpus; memory-bytes; }")
    cpus = t.cpus(res)
    if not cpus:
        raise InvalidSpec(f"overlay: instance {name!r} has no CPUs",
                          "resources { cpus = /bits/ 64 <apic ids>; }")
    size = t.u64(res, "memory-bytes")
    if not size:
        raise InvalidSpec(f"overlay: instance {name!r} has no memory-bytes",
                          "resources { memory-bytes = /bits/ 64 <bytes>; }")
    for _sub, _ in t.children(node):
        if _sub not in ("resources", "options"):
            raise InvalidSpec(f"overlay: instance {name!r}: unknown node {_sub!r}",
                              "an instance-create holds resources (and options)")
    if t.child(res, "uring") is not None:
        raise NotSupported("the emulator has no io_uring shared ring", "leave --uring out")
    return CreateOp(name=name, id=iid, cpus=cpus, memory_bytes=size, llc_way_mask=t.llc_mask(res))


@dataclass
class InstanceDump:
    name: str
    id: int | None
    cpus: list[int]
    memory_bytes: int
    llc_way_mask: int | None = None


def parse_instance(data: bytes) -> InstanceDump:
    """An instance's tree as ``mkctl dump``/``kerf dump NAME`` write it (``model``, ``id``,
    ``resources { cpus; memory-bytes; }``), for ``create --input``."""
    t = Tree(data, "instance device tree")
    name = t.string(0, "model")
    if not name:
        raise InvalidSpec("Not an instance device tree: the root node carries no model",
                          "give a tree from mkctl dump NAME (or kerf dump NAME)")
    res = t.path("/resources")
    if res is None:
        raise InvalidSpec(f"instance {name!r} has no /resources", "dump it again")
    cpus = t.cpus(res) or []
    size = t.u64(res, "memory-bytes") or 0
    if not cpus or not size:
        raise InvalidSpec(f"instance {name!r}: no cpus or no memory-bytes", "dump it again")
    return InstanceDump(name=name, id=t.u32(0, "id"), cpus=cpus, memory_bytes=size,
                        llc_way_mask=t.llc_mask(res))
