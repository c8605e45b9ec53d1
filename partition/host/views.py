"""The proc/sys views: the real system's control surfaces, as files under the run directory.

``proc/kimage`` keeps the v2 format byte for byte; ``sys/fs/multikernel/`` keeps its tree shape
with readable device-tree text. Files are replaced atomically (write, then rename) so a reader
never sees half a file, and only files whose content changed are rewritten, which keeps view
maintenance off the boot path's critical cost.
"""

from __future__ import annotations

import os
import shutil
from typing import Any

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
    ``mk-instance-<id>-<name>-region-<n>`` (one region each: partitions are contiguous here).
    Addresses are arena offsets (the emulator's physical addresses), ends inclusive."""
    pool = snapshot["pool"]
    base, size = pool["memory_base"], pool["memory_bytes"]
    if not size:
        return ""
    out = [f"{base:08x}-{base + size - 1:08x} : {POOL_RESOURCE}\n"]
    for i in sorted(snapshot["instances"], key=lambda r: r["memory_base"]):
        lo = i["memory_base"]
        out.append(f"  {lo:08x}-{lo + i['memory_bytes'] - 1:08x} : "
                   f"mk-instance-{i['id']}-{i['name']}-region-0\n")
    return "".join(out)


def _cells(cpus: list[int]) -> str:
    return "<" + " ".join(str(c) for c in cpus) + ">"


def render_pool_tree(snapshot: dict[str, Any]) -> str:
    pool, machine = snapshot["pool"], snapshot["machine"]
    lines = [
        "/ {",
        '\tcompatible = "multikernel-v1";',
        "\tresources {",
        f"\t\tcpus = {_cells(pool['cpus'])};",
        f"\t\tcpus-available = {_cells(pool['cpus_available'])};",
        f"\t\thost-cpus = {_cells(machine['host_cpus'])};",
        f"\t\tmemory@{pool['memory_base']:x} {{",
        f"\t\t\tsize = <0x{pool['memory_bytes']:x}>;   /* {format_size(pool['memory_bytes'])} */",
        f"\t\t\tavailable = <0x{pool['memory_available']:x}>;",
        "\t\t\tnuma-node-id = <0>;",
        "\t\t};",
    ]
    if machine["oversubscribe"]:
        lines.append("\t\toversubscribe;   /* emulator: instances may share host cores */")
    lines += ["\t};", "};", ""]
    return "\n".join(lines)


def render_instance_tree(inst: dict[str, Any]) -> str:
    lines = [
        "/ {",
        '\tcompatible = "multikernel-v1";',
        f'\tmodel = "{inst["kernel"] or ""}";',
        f"\tid = <{inst['id']}>;",
        "\tresources {",
        f"\t\tmemory-base = <0x{inst['memory_base']:x}>;",
        f"\t\tmemory-bytes = <0x{inst['memory_bytes']:x}>;",
        f"\t\tcpus = {_cells(inst['cpus'])};",
        f"\t\tphysical-cpus = {_cells(inst['physical_cpus'])};",
    ]
    if inst["shared_cpus"]:
        lines.append(f"\t\tshared-cpus = {_cells(inst['shared_cpus'])};   /* oversubscribed */")
    lines += ["\t};", "};", ""]
    return "\n".join(lines)


def render_counters(inst: dict[str, Any]) -> str:
    return "".join(f"{k} {v}\n" for k, v in inst["counters"].items())


def render_show(snapshot: dict[str, Any]) -> str:
    m, pool = snapshot["machine"], snapshot["pool"]
    out = [
        f"machine {m['run_dir']}  host pid {m['supervisor_pid']}  host CPUs "
        f"{format_cpulist(m['host_cpus']) or '-'}",
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
        self._cache: dict[str, str] = {}
        self._names: set[str] = set()

    def _put(self, path: str, text: str) -> None:
        if self._cache.get(path) == text:
            return
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
        self._cache[path] = text

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
