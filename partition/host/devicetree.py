"""Device trees, the resource language of ``/sys/fs/multikernel``: the DTBs the host serves and the
DTBs and overlays (DTBO) it accepts, in the shapes kerf 0.4 writes and reads, built and parsed with
pylibfdt (the library kerf itself uses, so the two can never disagree on the wire format).

Every CPU in a tree is a physical (APIC) id in a 64-bit cell, as the current kernel tree writes
them; memory is a physical address, which in the emulator is an offset into the arena. A written
tree is an attacker's input (``mkctl kerf`` serves it from a filesystem any root process in the
bridge can write): its size is bounded, every property is length-checked before it is decoded,
and every problem is an ``InvalidSpec`` (EINVAL) that names the node and property.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass, field
from typing import Any

import libfdt

from partition.errors import InvalidSpec, NotSupported

#: the largest tree or overlay the host parses (a real one is a few hundred bytes)
MAX_TREE_BYTES = 1 << 20
#: the unit memory moves into or out of an instance in (the root ``memory-granule``): kerf sizes
#: and places memory it adds to an instance in it
MEMORY_GRANULE = 2 << 20
HOST_COMPATIBLE = "linux,multikernel-host"
INSTANCE_COMPATIBLE = "linux,multikernel-instance"
OVERLAY_COMPATIBLE = "linux,multikernel-overlay"
INSTANCES_PATH = "/instances"
POOL_PATH = "/resources"
#: the LLC ways of the pool (baseline) or of an instance (host/llc.py)
LLC_PROP = "llc-way-mask"
#: kerf's instance ids: 0 is the host
MAX_ID = 511
#: a pool chunk's size is a whole number of pages (the real kernel's rule for /resources)
PAGE_BYTES = 4096


# -- building -------------------------------------------------------------------------------------
def _cpus(ids: list[int]) -> bytes:
    return struct.pack(f">{len(ids)}Q", *ids)


def _finish(sw: Any) -> bytes:
    fdt = sw.as_fdt()
    fdt.pack()
    return bytes(fdt.as_bytearray())


def host_tree(online: list[int]) -> bytes:
    """The root tree before any pool exists: it describes the host (its online CPUs) and has no
    ``memory@`` node, which is how kerf tells "no pool yet" from a live one."""
    sw = libfdt.FdtSw()
    sw.finish_reservemap()
    sw.begin_node("")
    sw.property_string("compatible", HOST_COMPATIBLE)
    sw.begin_node("resources")
    sw.property("cpus", _cpus(sorted(online)))
    sw.end_node()
    sw.end_node()
    return _finish(sw)


@dataclass(frozen=True)
class Chunk:
    """One pool chunk: a physical range and the NUMA node it sits on."""

    base: int
    size: int
    node: int = 0


def pool_tree(cpus: list[int], free: list[int], chunks: list[Chunk],
              granule: int = MEMORY_GRANULE, oversubscribe: bool = False,
              llc_way_mask: int = 0) -> bytes:
    """The root tree once the pool is live: ``/resources`` lists the pool's CPUs (``cpus``), the
    ones no instance holds (``cpus-available``) and every chunk as ``memory@<base>`` with
    ``device_type`` and ``reg``; the root carries ``memory-granule``. Instances are not in it:
    each is read from its own ``instances/<name>/device_tree``, as on the real kernel. Emulator
    addition: an empty ``oversubscribe`` property when instances may share cores. The pool's
    ``llc-way-mask`` (LLC ways it may hand out) when the baseline gave one."""
    sw = libfdt.FdtSw()
    sw.finish_reservemap()
    sw.begin_node("")
    sw.property_string("compatible", HOST_COMPATIBLE)
    sw.property_u64("memory-granule", granule)
    sw.begin_node("resources")
    sw.property("cpus", _cpus(sorted(cpus)))
    sw.property("cpus-available", _cpus(sorted(free)))
    if oversubscribe:
        sw.property("oversubscribe", b"")
    if llc_way_mask:
        _llc(sw, llc_way_mask)
    for c in chunks:
        sw.begin_node(f"memory@{c.base:x}")
        sw.property_string("device_type", "memory")
        sw.property("reg", struct.pack(">QQ", c.base, c.size))
        sw.property_u32("numa-node-id", c.node)
        sw.end_node()
    sw.end_node()
    sw.end_node()
    return _finish(sw)


def _llc(sw: Any, mask: int) -> None:
    """``llc-way-mask``: one u32 cell, as the real tree writes it; two for a wider cache."""
    if mask >> 32:
        sw.property_u64(LLC_PROP, mask)
    else:
        sw.property_u32(LLC_PROP, mask)


def instance_tree(name: str, instance_id: int, cpus: list[int],
                  regions: list[tuple[int, int]], shared: list[int] | None = None,
                  llc_way_mask: int = 0) -> bytes:
    """An instance's tree as ``instances/<name>/device_tree`` serves it and ``kerf dump`` writes
    it: ``model`` is the name, ``id``, and ``resources`` with physical ``cpus``, ``memory-base``
    (its first region), ``memory-bytes`` (all regions) and one ``memory@<base>`` per region.
    Emulator addition: ``shared-cpus``, the CPUs it shares with the host or a peer. Its
    ``llc-way-mask`` when it has LLC ways of its own."""
    sw = libfdt.FdtSw()
    sw.finish_reservemap()
    sw.begin_node("")
    sw.property_string("compatible", INSTANCE_COMPATIBLE)
    sw.property_string("model", name)
    sw.property_u32("id", instance_id)
    sw.begin_node("resources")
    sw.property("cpus", _cpus(sorted(cpus)))
    sw.property_u64("memory-base", regions[0][0] if regions else 0)
    sw.property_u64("memory-bytes", sum(size for _, size in regions))
    if shared:
        sw.property("shared-cpus", _cpus(sorted(shared)))
    if llc_way_mask:
        _llc(sw, llc_way_mask)
    for base, size in regions:
        sw.begin_node(f"memory@{base:x}")
        sw.property_string("device_type", "memory")
        sw.property("reg", struct.pack(">QQ", base, size))
        sw.end_node()
    sw.end_node()
    sw.end_node()
    return _finish(sw)


# -- reading --------------------------------------------------------------------------------------
class Tree:
    """A bounded, checked view of a DTB: the accessors raise InvalidSpec naming node and
    property, never a libfdt error code."""

    def __init__(self, data: bytes, what: str = "device tree") -> None:
        self.what = what
        if not isinstance(data, bytes | bytearray):
            raise InvalidSpec(f"the {what} must be bytes (a DTB)", "write a compiled tree")
        if len(data) > MAX_TREE_BYTES:
            raise InvalidSpec(f"the {what} is {len(data)} bytes, over the {MAX_TREE_BYTES}-byte "
                              "limit", "a multikernel tree is a few hundred bytes")
        if len(data) < 40:
            raise InvalidSpec(f"the {what} is {len(data)} bytes, shorter than an FDT header",
                              "write a whole DTB (dtc -O dtb), not DTS text")
        magic, total = struct.unpack_from(">II", data, 0)
        if magic != 0xD00DFEED:
            raise InvalidSpec(f"the {what} is not a DTB (magic {magic:#x}, want 0xd00dfeed)",
                              "compile DTS text with dtc -O dtb first")
        if total != len(data):
            raise InvalidSpec(f"the {what} says it is {total} bytes but {len(data)} arrived",
                              "write the whole blob in one go")
        try:
            self.fdt = libfdt.Fdt(bytes(data))
            # the whole structure, properties' name offsets included (a wild one would make
            # libfdt read past the strings block), then every node walked
            rc = libfdt.fdt_check_full(self.fdt._fdt, len(data))
            if rc < 0:
                raise libfdt.FdtException(rc)
            self._walk_all()
        except libfdt.FdtException as exc:
            raise InvalidSpec(f"the {what} is malformed: {exc}", "regenerate it") from None

    def _walk_all(self) -> None:
        off, depth = 0, 0
        while True:
            try:
                off, depth = self.fdt.next_node(off, depth, libfdt.QUIET_NOTFOUND)
            except libfdt.FdtException:
                raise
            if off < 0:
                return

    def _malformed(self, exc: Exception) -> InvalidSpec:
        return InvalidSpec(f"the {self.what} is malformed: {exc}", "regenerate it")

    def path(self, path: str) -> int | None:
        try:
            off = self.fdt.path_offset(path, libfdt.QUIET_NOTFOUND)
        except libfdt.FdtException as exc:
            raise self._malformed(exc) from None
        return None if off < 0 else int(off)

    def children(self, node: int) -> list[tuple[str, int]]:
        out = []
        try:
            off = self.fdt.first_subnode(node, libfdt.QUIET_NOTFOUND)
            while off >= 0:
                out.append((str(self.fdt.get_name(off)), int(off)))
                off = self.fdt.next_subnode(off, libfdt.QUIET_NOTFOUND)
        except (libfdt.FdtException, UnicodeDecodeError) as exc:
            raise self._malformed(exc) from None
        return out

    def child(self, node: int, name: str) -> int | None:
        try:
            off = self.fdt.subnode_offset(node, name, libfdt.QUIET_NOTFOUND)
        except libfdt.FdtException as exc:
            raise self._malformed(exc) from None
        return None if off < 0 else int(off)

    def where(self, node: int) -> str:
        try:
            return str(self.fdt.get_path(node))
        except libfdt.FdtException:
            return "?"

    def raw(self, node: int, prop: str) -> bytes | None:
        try:
            value = self.fdt.getprop(node, prop, libfdt.QUIET_NOTFOUND)
        except libfdt.FdtException as exc:
            raise self._malformed(exc) from None
        if isinstance(value, int):
            return None
        return bytes(value)

    def _bad(self, node: int, prop: str, want: str) -> InvalidSpec:
        return InvalidSpec(f"{self.what}: {self.where(node)}: '{prop}' must be {want}",
                           "see docs/kerf.md for the shapes the host accepts")

    def string(self, node: int, prop: str) -> str | None:
        v = self.raw(node, prop)
        if v is None:
            return None
        if not v.endswith(b"\0") or b"\0" in v[:-1] or len(v) > 256:
            raise self._bad(node, prop, "one NUL-terminated string")
        try:
            return v[:-1].decode("ascii")
        except UnicodeDecodeError:
            raise self._bad(node, prop, "ASCII") from None

    def u32(self, node: int, prop: str) -> int | None:
        v = self.raw(node, prop)
        if v is None:
            return None
        if len(v) != 4:
            raise self._bad(node, prop, "one u32 cell")
        return int(struct.unpack(">I", v)[0])

    def u64(self, node: int, prop: str) -> int | None:
        v = self.raw(node, prop)
        if v is None:
            return None
        if len(v) != 8:
            raise self._bad(node, prop, "a u64 (two cells)")
        return int(struct.unpack(">Q", v)[0])

    def llc_mask(self, node: int) -> int | None:
        """``llc-way-mask``: one u32 cell (the real tree's) or a u64; zero is refused."""
        v = self.raw(node, LLC_PROP)
        if v is None:
            return None
        if len(v) not in (4, 8):
            raise self._bad(node, LLC_PROP, "one u32 cell (or a u64) of LLC way bits")
        mask = int.from_bytes(v, "big")
        if not mask:
            raise InvalidSpec(f"{self.what}: {self.where(node)}: Invalid {LLC_PROP} 0: at least "
                              "one LLC way is needed", f"set at least one bit, or leave "
                              f"{LLC_PROP} out")
        return mask

    def cpus(self, node: int, prop: str = "cpus") -> list[int] | None:
        """64-bit cells (current format); 32-bit cells from older trees are accepted, as kerf
        accepts them."""
        v = self.raw(node, prop)
        if v is None:
            return None
        if len(v) % 8 == 0:
            ids = list(struct.unpack(f">{len(v) // 8}Q", v))
        elif len(v) % 4 == 0:
            ids = list(struct.unpack(f">{len(v) // 4}I", v))
        else:
            raise self._bad(node, prop, "a list of CPU ids in 64-bit cells")
        if len(ids) > 8192 or len(set(ids)) != len(ids):
            raise self._bad(node, prop, "a list of distinct CPU ids (at most 8192)")
        return ids

    def reg(self, node: int) -> tuple[int, int]:
        v = self.raw(node, "reg")
        if v is None or len(v) != 16:
            raise self._bad(node, "reg", "<base size> in two u64s")
        base, size = struct.unpack(">QQ", v)
        return int(base), int(size)


@dataclass
class Baseline:
    """What a baseline write asks for: pool CPUs (physical ids) and memory per NUMA node."""

    cpus: list[int]
    memory: dict[int, int]
    llc_way_mask: int | None = None

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
    return Baseline(cpus=cpus, memory=memory, llc_way_mask=t.llc_mask(res))


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


# -- text -----------------------------------------------------------------------------------------
def to_dts(data: bytes) -> str:
    """DTS text of a tree, as ``mkctl dump`` prints it: strings, cells (u64 for ``cpus``,
    ``reg`` and sizes) and bytes."""
    t = Tree(data)
    lines = ["/dts-v1/;", ""]

    def value(prop: str, v: bytes) -> str:
        if not v:
            return ""
        if v.endswith(b"\0") and all(32 <= b < 127 for b in v[:-1].replace(b"\0", b"")) \
                and len(v) > 1 and b"\0\0" not in v:
            return " = " + ", ".join(f'"{s.decode()}"' for s in v[:-1].split(b"\0"))
        if len(v) % 8 == 0 and (prop in ("cpus", "cpus-available", "reg", "shared-cpus")
                                or len(v) == 8):
            cells = struct.unpack(f">{len(v) // 8}Q", v)
            return " = /bits/ 64 <" + " ".join(f"{c:#x}" for c in cells) + ">"
        if len(v) % 4 == 0:
            cells = struct.unpack(f">{len(v) // 4}I", v)
            return " = <" + " ".join(f"{c:#x}" for c in cells) + ">"
        return " = [" + " ".join(f"{b:02x}" for b in v) + "]"

    def node(off: int, depth: int) -> None:
        pad = "\t" * depth
        name = t.fdt.get_name(off) or "/"
        lines.append(f"{pad}{name} {{")
        p = t.fdt.first_property_offset(off, libfdt.QUIET_NOTFOUND)
        while p >= 0:
            prop = t.fdt.get_property_by_offset(p)
            lines.append(f"{pad}\t{prop.name}{value(prop.name, bytes(prop))};")
            p = t.fdt.next_property_offset(p, libfdt.QUIET_NOTFOUND)
        for _, child in t.children(off):
            node(child, depth + 1)
        lines.append(f"{pad}}};")

    node(0, 0)
    return "\n".join(lines) + "\n"


_TOKEN = re.compile(r'\s*(?:(//[^\n]*|/\*.*?\*/)|("(?:[^"\\]|\\.)*")|(/bits/)|(/dts-v1/)|'
                    r'([A-Za-z0-9_,.+@#?-]+)|(\[[0-9a-fA-F\s]*\])|(<[^>]*>)|([{};=/]))', re.S)


#: how deep ``from_dts`` follows nested nodes (libfdt's own walks stop at 64)
MAX_DTS_DEPTH = 32


def from_dts(text: str) -> bytes:
    """Compile DTS text of the shape ``to_dts`` (and kerf's ``dump --dts``) prints into a DTB:
    nodes, string lists, cells (``/bits/ 64`` for 64-bit ones), byte strings. No labels,
    references, includes or arithmetic (dtc has them; the emulator's trees never need them)."""
    if len(text) > MAX_TREE_BYTES * 4:
        raise InvalidSpec("the DTS text is too long", "a multikernel tree is a few hundred bytes")
    toks: list[tuple[str, str]] = []
    pos = 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None:
            if text[pos:].strip():
                raise InvalidSpec(f"DTS: cannot read {text[pos:pos + 20]!r}",
                                  "write nodes, properties, strings and <cells> only")
            break
        pos = m.end()
        kinds = ("comment", "string", "bits", "header", "word", "bytes", "cells", "punct")
        for kind, value in zip(kinds, m.groups()):
            if value is not None and kind != "comment":
                toks.append((kind, value))
    sw = libfdt.FdtSw()
    sw.finish_reservemap()
    i = 0

    def take(kind: str | None = None, value: str | None = None) -> tuple[str, str]:
        nonlocal i
        if i >= len(toks):
            raise InvalidSpec("DTS: the text ends inside a node", "close every node with };")
        tok = toks[i]
        if (kind and tok[0] != kind) or (value and tok[1] != value):
            raise InvalidSpec(f"DTS: expected {value or kind}, found {tok[1]!r}",
                              "check the braces and semicolons")
        i += 1
        return tok

    def prop_value() -> bytes:
        out = b""
        while True:
            kind, value = take()
            if kind == "string":
                out += value[1:-1].encode().decode("unicode_escape").encode() + b"\0"
            elif kind == "bits":
                width = int(take("word")[1])
                if width not in (8, 16, 32, 64):
                    raise InvalidSpec(f"DTS: /bits/ {width}", "use /bits/ 64 or 32")
                cells = take("cells")[1][1:-1].split()
                out += b"".join(int(c, 0).to_bytes(width // 8, "big") for c in cells)
            elif kind == "cells":
                out += b"".join(int(c, 0).to_bytes(4, "big") for c in value[1:-1].split())
            elif kind == "bytes":
                out += bytes.fromhex(value[1:-1])
            else:
                raise InvalidSpec(f"DTS: unexpected {value!r} in a property value",
                                  'values are "strings", <cells> or [bytes]')
            sep = take("punct")[1]
            if sep == ";":
                return out
            if sep != ",":
                raise InvalidSpec(f"DTS: expected , or ; after a value, found {sep!r}", "")

    def node(name: str, depth: int = 0) -> None:
        # the parser recurses once a level: a 20000-deep file is refused here by name, not
        # by Python's RecursionError (a multikernel tree nests 4 deep)
        if depth > MAX_DTS_DEPTH:
            raise InvalidSpec(f"DTS: nodes nested more than {MAX_DTS_DEPTH} deep",
                              "a multikernel tree nests a few levels: give mkctl dump's output")
        sw.begin_node(name)
        take("punct", "{")
        while toks[i:i + 1] != [("punct", "}")]:
            if i >= len(toks):
                raise InvalidSpec("DTS: the text ends inside a node", "close every node with };")
            _, word = take("word")
            nxt = take("punct")[1]
            if nxt == "{":
                i_back()
                node(word, depth + 1)
            elif nxt == ";":
                sw.property(word, b"")
            elif nxt == "=":
                sw.property(word, prop_value())
            else:
                raise InvalidSpec(f"DTS: unexpected {nxt!r} after {word!r}", "")
        take("punct", "}")
        take("punct", ";")
        sw.end_node()

    def i_back() -> None:
        nonlocal i
        i -= 1

    try:
        if toks[:1] == [("header", "/dts-v1/")]:
            take()
            take("punct", ";")
        take("punct", "/")
        node("")
        if i != len(toks):
            raise InvalidSpec("DTS: text after the root node", "one root node, / { ... };")
        return _finish(sw)
    except (ValueError, IndexError, libfdt.FdtException) as exc:
        raise InvalidSpec(f"DTS: {exc}", "check the syntax against mkctl dump's output") from None


def read_tree_file(path: str) -> bytes:
    """A ``--input`` file: a DTB as is, DTS text compiled (``/dts-v1/`` first)."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_TREE_BYTES * 4 + 1)
    except OSError as exc:
        raise InvalidSpec(f"cannot read {path}: {exc.strerror}", "give a .dtb or .dts file") from None
    if data.lstrip().startswith(b"/dts-v1/"):
        return from_dts(data.decode("utf-8", errors="replace"))
    return data


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
