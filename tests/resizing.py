"""Helpers of the tests of runtime resource changes (test_resize*.py): reading a machine's
views and its instances' affinity, booting tests/kernels/picky.py, and DTBOs in the shapes kerf
writes (built here with libfdt)."""

import json
import os
import struct
import time

import libfdt
from helpers import MOVES_ON_ITS_OWN

from partition.abi import message as M
from partition.host.devicetree import MEMORY_GRANULE, Tree
from partition.units import parse_cpulist

HERE = os.path.dirname(os.path.abspath(__file__))
PICKY = os.path.join(HERE, "kernels", "picky.py")
FORGER = os.path.join(HERE, "kernels", "forger.py")
IDLE = "kernels.idle:IdleKernel"
MiB = 1 << 20

def c0(m):
    return m.config.cpus[0]


def c1(m):
    return m.config.cpus[1]


def phys(m, *cpus):
    return [m.config.physical_ids[c] for c in cpus]


def stable(m):
    """The snapshot without what moves on its own or by design on every attempt: event counts,
    the transaction list, and per-instance message counters, loop progress (its age, whether it
    sleeps on its doorbell), the tally of kernel answers (asserted separately where it
    matters)."""
    snap = m.snapshot()
    snap["machine"].pop("events")
    snap.pop("overlays")
    for i in snap["instances"]:
        for k in ("counters", "progress", "resource_changes", *MOVES_ON_ITS_OWN):
            i.pop(k)
    return snap


def view(m, *path):
    with open(os.path.join(m.run_dir, *path), "rb") as f:
        return f.read()


def iomem(m):
    return view(m, "proc", "iomem").decode()


def region_lines(m):
    return [line.strip() for line in iomem(m).splitlines()[1:]]


def itree(m, name):
    """An instance's device_tree, read back: physical CPUs, memory-bytes, memory@ regions."""
    t = Tree(view(m, "sys", "fs", "multikernel", "instances", name, "device_tree"))
    res = t.path("/resources")
    assert res is not None
    regions = [t.reg(node) for sub, node in t.children(res) if sub.startswith("memory@")]
    return {"model": t.string(0, "model"), "id": t.u32(0, "id"), "cpus": t.cpus(res),
            "memory-base": t.u64(res, "memory-base"), "memory-bytes": t.u64(res, "memory-bytes"),
            "regions": regions}


def tx_view(m, tx):
    d = os.path.join(m.run_dir, "sys", "fs", "multikernel", "overlays", f"tx_{tx}")
    if not os.path.isdir(d):
        return None
    return {f: view(m, d, f).decode() for f in ("status", "instance")}


def query(m, name):
    """The kernel's own view of its resources (it answers MK_MSG_QUERY)."""
    q = m.command(name, M.MK_MSG_QUERY, {}, timeout=5)
    assert q["status"] == 0
    return q


def allowed(pid):
    """Cpus_allowed_list of every thread of ``pid``."""
    out = set()
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/status") as f:
            line = next(x for x in f if x.startswith("Cpus_allowed_list:"))
        out.add(tuple(parse_cpulist(line.split(":", 1)[1].strip())))
    return out


def wait_allowed(m, pid, cpus, timeout=2.0):
    want = {tuple(sorted(cpus))}
    deadline = time.monotonic() + timeout
    while allowed(pid) != want:
        assert time.monotonic() < deadline, f"pid {pid} runs on {allowed(pid)}, not {want}"
        m.poll(0.01)


def boot_picky(m, name, cmdline="", cpus=None, memory="16M"):
    m.create(name, cpus=[c0(m)] if cpus is None else cpus, memory=memory)
    m.load(name, PICKY, cmdline)
    return m.start(name)


def pool_end(m):
    pool = m.snapshot()["pool"]
    return pool["memory_base"] + pool["memory_bytes"]


def highest(m, size, below=None):
    """Where kerf puts ``size`` added bytes: the highest free granule-aligned range (here the
    pool's top is free, or the range just below ``below``)."""
    top = pool_end(m) if below is None else below
    return (top - size) // MEMORY_GRANULE * MEMORY_GRANULE


def chunks(m):
    return [tuple(c) for c in m.snapshot()["pool"]["chunks"]]


def pool_room(m):
    pool = m.snapshot()["pool"]
    return pool["window_bytes"] - pool["memory_bytes"]


def pool_op(add=(), remove=(), cpu_add=(), cpu_remove=()):
    """A /resources fragment as kerf init writes one on a live pool: ``add`` is (node, size,
    reg) requests (None leaves a property out), ``remove`` whole chunks."""
    body = {}
    if cpu_remove:
        body["cpu-remove"] = {f"cpu@{p:x}": {"reg": u64(p)} for p in cpu_remove}
    if remove:
        body["memory-remove"] = {f"memory@{i}": {"reg": reg(b, n)} for i, (b, n) in enumerate(remove)}
    if add:
        items = {}
        for i, (node, size, r) in enumerate(add):
            item = {"size": u64(size)}
            if node is not None:
                item["numa-node-id"] = node
            if r is not None:
                item["reg"] = r
            items[f"memory@{i}"] = item
        body["memory-add"] = items
    if cpu_add:
        body["cpu-add"] = {f"cpu@{p:x}": {"reg": u64(p)} for p in cpu_add}
    return ("/resources", body)


def root_chunks(m):
    """The root device_tree's memory@ nodes (base, size): what a pool memory-remove names."""
    t = Tree(view(m, "sys", "fs", "multikernel", "device_tree"))
    res = t.path("/resources")
    return [t.reg(node) for sub, node in t.children(res) if sub.startswith("memory@")]


def pool_lines(m):
    return [line for line in iomem(m).splitlines() if line.endswith("Multikernel Memory Pool")]


def events(m, name):
    with open(os.path.join(m.run_dir, "events.log")) as f:
        return [e for e in map(json.loads, f) if e["event"] == name]


# -- DTBOs, in the shapes kerf writes ---------------------------------------------------------------
def u64(*values):
    return struct.pack(f">{len(values)}Q", *values)


def reg(base, size):
    return struct.pack(">QQ", base, size)


def _node(sw, name, body):
    sw.begin_node(name)
    for k, v in body.items():          # properties first: FdtSw wants them before subnodes
        if isinstance(v, str):
            sw.property_string(k, v)
        elif isinstance(v, bytes):
            sw.property(k, v)
        elif isinstance(v, int):
            sw.property_u32(k, v)
    for k, v in body.items():
        if isinstance(v, dict):
            _node(sw, k, v)
    sw.end_node()


def fdt(root):
    """A DTB whose root node is ``root`` (a dict: str, bytes and int are properties, dicts are
    subnodes)."""
    sw = libfdt.FdtSw()
    sw.finish_reservemap()
    _node(sw, "", root)
    tree = sw.as_fdt()
    tree.pack()
    return bytes(tree.as_bytearray())


def dtbo(*fragments):
    """An overlay: root compatible "linux,multikernel-overlay", one fragment@N per
    (target-path, __overlay__ body)."""
    root = {"compatible": "linux,multikernel-overlay"}
    for i, (target, body) in enumerate(fragments):
        root[f"fragment@{i}"] = {"target-path": target, "__overlay__": body}
    return fdt(root)


def create_op(name, cpus, memory, iid=None):
    body = {"instance-name": name}
    if iid is not None:
        body["id"] = iid
    body["resources"] = {"cpus": u64(*cpus), "memory-bytes": u64(memory)}
    return ("/instances", {"instance-create": body})


def remove_op(name):
    return ("/instances", {"instance-remove": {"instance-name": name}})


def update_op(name, memory_add=(), memory_remove=(), cpu_add=(), cpu_remove=()):
    body = {}
    for kind, ranges in (("memory-remove", memory_remove), ("memory-add", memory_add)):
        if ranges:
            body[kind] = {f"memory@{i}": {"reg": reg(b, s)} for i, (b, s) in enumerate(ranges)}
    for kind, ids in (("cpu-remove", cpu_remove), ("cpu-add", cpu_add)):
        if ids:
            body[kind] = {f"cpu@{p:x}": {"reg": u64(p)} for p in ids}
    return (f"/instances/{name}", body)
