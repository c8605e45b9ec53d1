"""The device-tree vocabulary the host and kerf share, and ``Tree``: the one bounded, checked
reader every parser of a written tree goes through.

Kept apart from the builders and parsers because it is the part that faces an attacker's bytes
(a tree written into ``/sys/fs/multikernel``): every libfdt call that can fail on hostile input
lives here, behind accessors that raise ``InvalidSpec`` naming the node and property.
"""

from __future__ import annotations

import struct

import libfdt

from partition.errors import InvalidSpec

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
