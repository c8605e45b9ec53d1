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

from partition.host.devicetree import Chunk, instance_tree, pool_tree
from partition.units import format_cpulist, format_size

KIMAGE_HEADER = "MK_ID  Type        Start Address   Segments\n"
#: the dashes kerf 0.4 finds its columns by (show/main.py: each block of dashes is a column)
KIMAGE_SEPARATOR = "-----  ----------  --------------  --------\n"
POOL_RESOURCE = "Multikernel Memory Pool"


def render_kimage(snapshot: dict[str, Any]) -> str:
    rows = [i for i in snapshot["instances"] if i["kernel"]]
    if not rows:
        return "No kimages loaded\n"
    out = [KIMAGE_HEADER, KIMAGE_SEPARATOR]
    for i in sorted(rows, key=lambda r: r["id"]):
        out.append(f"{i['id']:5d}  {i['kimage_type']:<10s}  0x{i['memory_base']:012x}  "
                   f"{i['segments']:8d}\n")
    return "".join(out)


def render_iomem(snapshot: dict[str, Any]) -> str:
    """``/proc/iomem`` as far as the machine goes: the pool, registered as one resource named
    as the real kernel names its pool chunks, and each instance's partition nested in it as
    ``mk-instance-<id>-<name>-region-<n>`` (region 0 is where it boots, the others were added
    at run time, numbered in the order they came). Addresses are arena offsets (the emulator's
    physical addresses), ends inclusive, sorted by address as the kernel lists them."""
    pool = snapshot["pool"]
    base, size = pool["memory_base"], pool["memory_bytes"]
    if not size:
        return ""
    out = [f"{base:08x}-{base + size - 1:08x} : {POOL_RESOURCE}\n"]
    rows = [(lo, n, i) for i in snapshot["instances"] for n, (lo, _) in enumerate(i["regions"])]
    for lo, n, i in sorted(rows, key=lambda r: r[0]):
        out.append(f"  {lo:08x}-{lo + i['regions'][n][1] - 1:08x} : "
                   f"mk-instance-{i['id']}-{i['name']}-region-{n}\n")
    return "".join(out)


def render_pool_tree(snapshot: dict[str, Any]) -> bytes:
    """The root ``device_tree``: the pool as kerf reads it back (physical CPU ids)."""
    pool = snapshot["pool"]
    phys = {int(c): p for c, p in pool["physical_ids"].items()}
    return pool_tree([phys.get(c, c) for c in pool["cpus"]],
                     [phys.get(c, c) for c in pool["cpus_available"]],
                     [Chunk(pool["memory_base"], pool["memory_bytes"])]
                     if pool["memory_bytes"] else [], pool["memory_granule"],
                     oversubscribe=snapshot["machine"]["oversubscribe"])


def render_instance_tree(inst: dict[str, Any]) -> bytes:
    phys = dict(zip(inst["cpus"], inst["physical_cpus"]))
    return instance_tree(inst["name"], inst["id"], inst["physical_cpus"],
                         [(b, s) for b, s in inst["regions"]],
                         shared=[phys.get(c, c) for c in inst["shared_cpus"]])


def render_counters(inst: dict[str, Any]) -> str:
    return "".join(f"{k} {v}\n" for k, v in inst["counters"].items())


def render_show(snapshot: dict[str, Any]) -> str:
    m, pool = snapshot["machine"], snapshot["pool"]
    out = [
        f"machine {m['run_dir']}  host pid {m['supervisor_pid']}  host CPUs "
        f"{format_cpulist(m['host_cpus']) or '-'}"
        + (f"  (adopted from a dead host in {m['adopt_ms']} ms)" if m.get("adopt_ms") is not None
           else "") + ("  [instances outlive this host]" if m.get("survive_host") else ""),
        f"pool    CPUs {format_cpulist(pool['cpus'])} (available: "
        f"{format_cpulist(pool['cpus_available']) or '-'})  memory "
        f"{format_size(pool['memory_bytes'])} (free "
        f"{format_size(pool['memory_available']) if pool['memory_available'] else '0'})",
    ]
    if not m.get("protection", True):
        out.append("MEMORY  UNPROTECTED: every instance maps the whole arena; a wild write "
                   "corrupts its victim")
    if m["oversubscribe"]:
        out.append("MODE    OVERSUBSCRIBED: instances may share host cores; a spinning instance "
                   "costs a peer on its core a scheduler timeslice per hop")
    else:
        out.append("MODE    dedicated: every instance owns its cores")
    rows = [("ID", "NAME", "STATE", "CPUS", "MEMORY", "BASE", "KERNEL", "PID", "LAST EXIT")]
    for i in snapshot["instances"]:
        cpus = format_cpulist(i["cpus"]) + ("*" if i["shared_cpus"] else "")
        last = i["last_exit"]["reason"] if i["last_exit"] else "-"
        if i["failure"]:
            last = f"FAILED: {i['failure']}"
        rows.append((str(i["id"]), i["name"], i["state"], cpus, format_size(i["memory_bytes"]),
                     f"0x{i['memory_base']:x}", i["kernel"] or "-",
                     str(i["pid"]) if i["pid"] else "-", last))
    txs = snapshot.get("overlays", [])
    if txs:
        counts = {st: sum(1 for t in txs if t["status"] == st) for st in ("applied", "failed")}
        last = txs[-1]
        out.append(f"overlays {counts['applied']} applied, {counts['failed']} failed; last "
                   f"tx_{last['id']} {last['status']}: {'; '.join(last['operations']) or '-'}"
                   + (f" ({last['error']})" if last["error"] else ""))
    if len(rows) == 1:
        out.append("no instances")
    else:
        widths = [max(len(r[k]) for r in rows) for k in range(len(rows[0]) - 1)]
        for r in rows:
            out.append("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1])
        if any(i["shared_cpus"] for i in snapshot["instances"]):
            out.append("* = CPU shared with another instance or the host (oversubscribed)")
    return "\n".join(out) + "\n"


class ViewWriter:
    """Keeps proc/ and sys/ under a run directory in step with the machine."""

    def __init__(self, run_dir: str) -> None:
        self.proc = os.path.join(run_dir, "proc")
        self.sys = os.path.join(run_dir, "sys", "fs", "multikernel")
        self.instances_dir = os.path.join(self.sys, "instances")
        os.makedirs(self.proc, exist_ok=True)
        os.makedirs(self.instances_dir, exist_ok=True)
        self.overlays_dir = os.path.join(self.sys, "overlays")
        os.makedirs(self.overlays_dir, exist_ok=True)
        self._cache: dict[str, str | bytes] = {}
        self._names: set[str] = set()
        self._txs: set[int] = set()

    def _put(self, path: str, content: str | bytes) -> None:
        if self._cache.get(path) == content:
            return
        tmp = path + ".tmp"
        with open(tmp, "wb") as f:
            f.write(content.encode() if isinstance(content, str) else content)
        os.replace(tmp, path)
        self._cache[path] = content

    def update(self, snapshot: dict[str, Any]) -> None:
        self._put(os.path.join(self.proc, "kimage"), render_kimage(snapshot))
        self._put(os.path.join(self.proc, "iomem"), render_iomem(snapshot))
        self._put(os.path.join(self.sys, "device_tree"), render_pool_tree(snapshot))
        names = set()
        for inst in snapshot["instances"]:
            d = os.path.join(self.instances_dir, inst["name"])
            if inst["name"] not in self._names:
                os.makedirs(d, exist_ok=True)
            names.add(inst["name"])
            self._put(os.path.join(d, "id"), f"{inst['id']}\n")
            self._put(os.path.join(d, "status"), f"{inst['state']}\n")
            self._put(os.path.join(d, "device_tree"), render_instance_tree(inst))
            self._put(os.path.join(d, "counters"), render_counters(inst))
        for gone in self._names - names:
            d = os.path.join(self.instances_dir, gone)
            shutil.rmtree(d, ignore_errors=True)
            for key in [k for k in self._cache if k.startswith(d + os.sep)]:
                del self._cache[key]
        self._names = names
        txs = set()
        for tx in snapshot.get("overlays", []):
            d = os.path.join(self.overlays_dir, f"tx_{tx['id']}")
            if tx["id"] not in self._txs:
                os.makedirs(d, exist_ok=True)
            txs.add(tx["id"])
            self._put(os.path.join(d, "status"), f"{tx['status']}\n")
            self._put(os.path.join(d, "instance"), f"{tx['instance']}\n")
        for old in self._txs - txs:
            d = os.path.join(self.overlays_dir, f"tx_{old}")
            shutil.rmtree(d, ignore_errors=True)
            for key in [k for k in self._cache if k.startswith(d + os.sep)]:
                del self._cache[key]
        self._txs = txs
