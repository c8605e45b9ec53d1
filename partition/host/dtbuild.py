"""The DTBs the host serves (the root tree before and after a pool exists, and each instance's
tree), written with pylibfdt's sequential writer in the shapes kerf 0.4 reads.

Separate from the parsers: building never sees untrusted bytes, so it needs none of their
checks, and a reader of the wire format finds everything the host emits in one place.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

import libfdt

from partition.host.dtb import HOST_COMPATIBLE, INSTANCE_COMPATIBLE, LLC_PROP, MEMORY_GRANULE


def _cpus(ids: list[int]) -> bytes:
    return struct.pack(f">{len(ids)}Q", *ids)


def finish(sw: Any) -> bytes:
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
    return finish(sw)


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
    return finish(sw)


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
    return finish(sw)

