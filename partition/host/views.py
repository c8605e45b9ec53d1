"""The proc/sys views: the real system's control surfaces, as files under the run directory.

``proc/kimage`` and ``proc/iomem`` keep the real formats; ``sys/fs/multikernel/`` keeps the real
tree: ``device_tree`` and ``instances/<name>/device_tree`` are binary DTBs in the shapes kerf 0.4
reads (host/devicetree.py; ``mkctl dump`` prints them as text), ``overlays/tx_<N>/`` holds each
transaction's ``status`` and ``instance``. Files are replaced atomically (write, then rename) so
a reader never sees half a file, and only files whose content changed are rewritten, which keeps
view maintenance off the boot path's critical cost.
"""

from __future__ import annotations

import os
import shutil
from typing import Any

KIMAGE_HEADER = "MK_ID  Type        Start Address   Segments\n"
#: the dashes kerf 0.4 finds its columns by (show/main.py: each block of dashes is a column)
KIMAGE_SEPARATOR = "-----  ----------  --------------  --------\n"
POOL_RESOURCE = "Multikernel Memory Pool"
#: a shared region's resource name: the real one is a DAXFS on reserved memory
SHARED_RESOURCE = "daxfs"


def kimage_row(inst: dict[str, Any]) -> str | None:
    """An instance's ``/proc/kimage`` row, None when it holds no image."""
    if not inst["kernel"]:
        return None
    return (f"{inst['id']:5d}  {inst['kimage_type']:<10s}  0x{inst['memory_base']:012x}  "
            f"{inst['segments']:8d}\n")


def iomem_rows(inst: dict[str, Any]) -> list[tuple[int, str]]:
    """An instance's ``/proc/iomem`` lines, by address."""
    return [(lo, f"  {lo:08x}-{lo + size - 1:08x} : "
             f"mk-instance-{inst['id']}-{inst['name']}-region-{n}\n")
            for n, (lo, size) in enumerate(inst["regions"])]


def render_kimage(snapshot: dict[str, Any]) -> str:
    rows = sorted((i["id"], row) for i in snapshot["instances"]
                  if (row := kimage_row(i)) is not None)
    return join_kimage([r for _, r in rows])


def join_kimage(rows: list[str]) -> str:
    if not rows:
        return "No kimages loaded\n"
    return "".join([KIMAGE_HEADER, KIMAGE_SEPARATOR] + rows)


def shared_iomem_rows(regions: list[dict[str, Any]]) -> list[tuple[int, str]]:
    """The machine's shared regions (host/shared.py), one ``daxfs (NAME)`` resource each, at
    the addresses the host gave them past the arena."""
    return [(r["base"], f"{r['base']:08x}-{r['base'] + r['size'] - 1:08x} : "
                        f"{SHARED_RESOURCE} ({r['name']})\n") for r in regions]


def render_iomem(snapshot: dict[str, Any]) -> str:
    """``/proc/iomem`` as far as the machine goes: the pool, each chunk registered as one
    resource named as the real kernel names them, and each instance's partition nested in its
    chunk as ``mk-instance-<id>-<name>-region-<n>`` (region 0 is where it boots, the others were added
    at run time, numbered in the order they came). Addresses are arena offsets (the emulator's
    physical addresses), ends inclusive, sorted by address as the kernel lists them."""
    return join_iomem(snapshot["pool"], [r for i in snapshot["instances"] for r in iomem_rows(i)]
                      + shared_iomem_rows(snapshot["machine"].get("shared", [])))


def pool_chunks(pool: dict[str, Any]) -> list[tuple[int, int]]:
    """The pool's chunks (physical base, bytes): one at init, more as it grows at run time."""
    if "chunks" in pool:
        return [(b, n) for b, n in pool["chunks"]]
    return [(pool["memory_base"], pool["memory_bytes"])] if pool["memory_bytes"] else []


def join_iomem(pool: dict[str, Any], rows: list[tuple[int, str]]) -> str:
    """Each pool chunk as one ``Multikernel Memory Pool`` resource, the instances' regions
    nested under the chunk they lie in (kerf tells a busy chunk by its children)."""
    lines = [(b, 0, f"{b:08x}-{b + n - 1:08x} : {POOL_RESOURCE}\n") for b, n in pool_chunks(pool)]
    return "".join(r for _, _, r in sorted(lines + [(at, 1, r) for at, r in rows]))


def render_pool_tree(snapshot: dict[str, Any]) -> bytes:
    """The root ``device_tree``: the pool as kerf reads it back (physical CPU ids)."""
    from partition.host.devicetree import Chunk, pool_tree  # pylibfdt: not for mkctl show
    pool = snapshot["pool"]
    phys = {int(c): p for c, p in pool["physical_ids"].items()}
    return pool_tree([phys.get(c, c) for c in pool["cpus"]],
                     [phys.get(c, c) for c in pool["cpus_available"]],
                     [Chunk(b, n) for b, n in pool_chunks(pool)], pool["memory_granule"],
                     oversubscribe=snapshot["machine"]["oversubscribe"],
                     llc_way_mask=pool.get("llc_way_mask") or 0)


def render_instance_tree(inst: dict[str, Any]) -> bytes:
    from partition.host.devicetree import instance_tree
    phys = dict(zip(inst["cpus"], inst["physical_cpus"]))
    return instance_tree(inst["name"], inst["id"], inst["physical_cpus"],
                         [(b, s) for b, s in inst["regions"]],
                         shared=[phys.get(c, c) for c in inst["shared_cpus"]],
                         llc_way_mask=_mask(inst.get("llc_way_mask")))


def _mask(value: object) -> int:
    """An instance's ``llc_way_mask`` as the views get it (an int) or describe() says it (hex)."""
    if isinstance(value, str):
        return int(value, 16)
    return value if isinstance(value, int) else 0


class ViewWriter:
    """Keeps proc/ and sys/ under a run directory in step with the machine, per change.

    A state change touches what it changed: its instance's files, its row of ``kimage`` and
    ``iomem`` (those two are joined again only when a row differs), and the root tree only
    when the pool's free CPUs or memory moved. A device tree is rendered only when what it
    says (CPUs, regions, shared CPUs) changed, since pylibfdt is the costly part. So the views'
    share of booting the 511th instance is what it was for the first (``mkctl bench scale``).
    """

    def __init__(self, run_dir: str) -> None:
        self.proc = os.path.join(run_dir, "proc")
        self.sys = os.path.join(run_dir, "sys", "fs", "multikernel")
        self.instances_dir = os.path.join(self.sys, "instances")
        os.makedirs(self.proc, exist_ok=True)
        os.makedirs(self.instances_dir, exist_ok=True)
        self.overlays_dir = os.path.join(self.sys, "overlays")
        # a new host (adoption) starts its own transaction log: the dead host's tx_<N> would
        # stay listed, and kerf, which reads the newest tx_<N> after each write, would read one
        shutil.rmtree(self.overlays_dir, ignore_errors=True)
        os.makedirs(self.overlays_dir, exist_ok=True)
        self._cache: dict[str, str | bytes] = {}
        self._counted: dict[str, dict[str, Any]] = {}     # what each counters file says
        self._names: set[str] = set()
        self._txs: set[int] = set()
        self._tree_key: dict[str, tuple[Any, ...]] = {}
        self._kimage_rows: dict[str, tuple[int, str]] = {}
        self._iomem_rows: dict[str, list[tuple[int, str]]] = {}
        self._rows_dirty = True
        #: the machine's shared regions' lines (``shared``), fixed at init
        self._shared_rows: list[tuple[int, str]] = []
        self._pool_key: tuple[Any, ...] | None = None
        self._pool: dict[str, Any] | None = None
        self.writes = 0                       # files rewritten: what a change cost (tests)
        self.trees_rendered = 0               # device trees built (pylibfdt: the costly part)

    @property
    def names(self) -> set[str]:
        return set(self._names)

    def has(self, name: str, cpus: list[int]) -> bool:
        """Whether ``name``'s files are up with these CPUs (else sharing may have moved)."""
        key = self._tree_key.get(name)
        return key is not None and key[2] == tuple(cpus)

    def _put(self, path: str, content: str | bytes) -> None:
        if self._cache.get(path) == content:
            return
        tmp = path + ".tmp"
        with open(tmp, "wb") as f:
            f.write(content.encode() if isinstance(content, str) else content)
        os.replace(tmp, path)
        self._cache[path] = content
        self.writes += 1

    # -- per change ------------------------------------------------------------------------
    def pool(self, pool: dict[str, Any], oversubscribe: bool) -> None:
        """The root tree, rendered again only when what it says moved."""
        key = (tuple(pool["cpus"]), tuple(pool["cpus_available"]), pool["memory_base"],
               pool["memory_bytes"], tuple(pool_chunks(pool)), oversubscribe)
        self._pool = pool
        if key != self._pool_key:
            self._put(os.path.join(self.sys, "device_tree"),
                      render_pool_tree({"pool": pool,
                                        "machine": {"oversubscribe": oversubscribe}}))
            self._pool_key = key
            self._rows_dirty = True

    def instance(self, inst: dict[str, Any]) -> None:
        """One instance's files and rows; ``inst`` carries describe()'s view fields."""
        name = inst["name"]
        d = os.path.join(self.instances_dir, name)
        if name not in self._names:
            os.makedirs(d, exist_ok=True)
            self._names.add(name)
        self._put(os.path.join(d, "id"), f"{inst['id']}\n")
        self._put(os.path.join(d, "status"), f"{inst['state']}\n")
        key = (inst["id"], tuple(inst["physical_cpus"]), tuple(inst["cpus"]),
               tuple(tuple(r) for r in inst["regions"]), tuple(inst["shared_cpus"]),
               inst.get("llc_way_mask"))
        if self._tree_key.get(name) != key:
            self.trees_rendered += 1
            self._put(os.path.join(d, "device_tree"), render_instance_tree(inst))
            self._tree_key[name] = key
        row = kimage_row(inst)
        if row is None:
            if self._kimage_rows.pop(name, None) is not None:
                self._rows_dirty = True
        elif self._kimage_rows.get(name) != (inst["id"], row):
            self._kimage_rows[name] = (inst["id"], row)
            self._rows_dirty = True
        regions = iomem_rows(inst)
        if self._iomem_rows.get(name) != regions:
            self._iomem_rows[name] = regions
            self._rows_dirty = True

    def counters(self, name: str, counters: dict[str, Any]) -> None:
        """An instance's counters file; not even rendered when the counters are those it
        says already (``show`` refreshes all of them, and most have not moved)."""
        if name in self._names and self._counted.get(name) != counters:
            self._put(os.path.join(self.instances_dir, name, "counters"),
                      "".join(f"{k} {v}\n" for k, v in counters.items()))
            self._counted[name] = dict(counters)

    def counted(self, name: str) -> bool:
        """Whether ``name``'s counters file has been written (or it has no files at all)."""
        return name in self._counted or name not in self._names

    def remove(self, name: str) -> None:
        self._drop_dir(os.path.join(self.instances_dir, name))
        self._names.discard(name)
        self._counted.pop(name, None)
        self._tree_key.pop(name, None)
        self._kimage_rows.pop(name, None)
        self._iomem_rows.pop(name, None)
        self._rows_dirty = True

    def overlays(self, overlays: list[dict[str, Any]]) -> None:
        txs = set()
        for tx in overlays:
            d = os.path.join(self.overlays_dir, f"tx_{tx['id']}")
            if tx["id"] not in self._txs:
                os.makedirs(d, exist_ok=True)
            txs.add(tx["id"])
            self._put(os.path.join(d, "status"), f"{tx['status']}\n")
            self._put(os.path.join(d, "instance"), f"{tx['instance']}\n")
        for old in self._txs - txs:
            self._drop_dir(os.path.join(self.overlays_dir, f"tx_{old}"))
        self._txs = txs

    def _drop_dir(self, d: str) -> None:
        shutil.rmtree(d, ignore_errors=True)
        for key in [k for k in self._cache if k.startswith(d + os.sep)]:
            del self._cache[key]

    def shared(self, regions: list[dict[str, Any]]) -> None:
        """The machine's shared regions, listed in ``iomem`` from the next flush."""
        self._shared_rows = shared_iomem_rows(regions)
        self._rows_dirty = True

    def flush(self) -> None:
        """``kimage`` and ``iomem`` joined again from their rows, if a row changed."""
        if not self._rows_dirty or self._pool is None:
            return
        self._put(os.path.join(self.proc, "kimage"),
                  join_kimage([r for _, r in sorted(self._kimage_rows.values())]))
        self._put(os.path.join(self.proc, "iomem"),
                  join_iomem(self._pool, [r for rs in self._iomem_rows.values() for r in rs]
                             + self._shared_rows))
        self._rows_dirty = False
