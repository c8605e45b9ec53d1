"""Runtime resource changes (host/resize.py) and overlay transactions (host/overlays.py).

Real machines, real kernel processes, real pinning: an instance grows and shrinks by whole
memory regions and gains and loses CPUs, ready or running; a running kernel is asked first
(tests/kernels/picky.py decides) and a refusal, a death or a silence rolls the whole transaction
back; overlays (DTBOs built here with libfdt, in kerf's shapes) create and remove instances and
are undone by ``remove_overlay``; every bad overlay leaves the machine as it was; a peer that
forges the protocol changes nothing (tests/kernels/forger.py).
"""

import errno
import json
import os
import signal
import struct
import subprocess
import time

import libfdt
import pytest
from helpers import CPUS, MKCTL, MOVES_ON_ITS_OWN, mk, wait_until

from partition import AlreadyExists, InvalidSpec, MKError, NoSuchInstance, PermissionDenied, ResourceBusy
from partition.abi import message as M
from partition.errors import NotSupported, ResourceRefused
from partition.host import adoption, resize, rundir
from partition.host.devicetree import MEMORY_GRANULE, Tree
from partition.linux import physical_cpu_ids
from partition.units import parse_cpulist

HERE = os.path.dirname(os.path.abspath(__file__))
PICKY = os.path.join(HERE, "kernels", "picky.py")
FORGER = os.path.join(HERE, "kernels", "forger.py")
IDLE = "kernels.idle:IdleKernel"
MiB = 1 << 20

pytestmark = [pytest.mark.system,
              pytest.mark.skipif(len(CPUS) < 2, reason="CPU changes need a pool of two CPUs")]


# -- helpers --------------------------------------------------------------------------------------
@pytest.fixture
def m(machine_factory):
    """Two pool CPUs, no host CPU, shared cores: the only way to move CPUs on a 2-CPU box."""
    return machine_factory(cpus=CPUS[:2], host_cpus="none", oversubscribe=True, memory="256M")


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


# -- 1. a ready instance --------------------------------------------------------------------------
def test_ready_instance_grows_shrinks_and_moves(m):
    a = m.create("a", cpus=[c0(m)], memory="16M")
    boot = (a["memory_base"], 16 * MiB)
    free0 = m.snapshot()["pool"]["memory_available"]

    r1 = m.resize("a", memory="20M")
    first = (highest(m, 4 * MiB), 4 * MiB)
    assert r1["regions"] == [list(boot), list(first)]
    assert (r1["memory_total"], r1["memory_bytes"], r1["memory_base"]) == \
        (20 * MiB, 16 * MiB, boot[0])               # memory_base/bytes stay the boot region
    assert r1["transaction"] == {"id": 1, "status": "applied", "instance": "/instances/a",
                                 "operations": [f"memory-add {first[0]:#x}+{first[1]:#x} on a"],
                                 "error": ""}
    r2 = m.resize("a", memory="26M")                # the next one goes just below the first
    second = (highest(m, 6 * MiB, below=first[0]), 6 * MiB)
    assert r2["regions"] == [list(boot), list(first), list(second)]
    assert m.snapshot()["pool"]["memory_available"] == free0 - 10 * MiB
    assert region_lines(m) == [
        f"{boot[0]:08x}-{boot[0] + boot[1] - 1:08x} : mk-instance-{a['id']}-a-region-0",
        f"{second[0]:08x}-{second[0] + second[1] - 1:08x} : mk-instance-{a['id']}-a-region-2",
        f"{first[0]:08x}-{first[0] + first[1] - 1:08x} : mk-instance-{a['id']}-a-region-1",
    ]
    t = itree(m, "a")
    assert t["memory-bytes"] == 26 * MiB and t["memory-base"] == boot[0]
    assert t["regions"] == [boot, first, second] and t["cpus"] == phys(m, c0(m))

    r3 = m.resize("a", cpus=[c0(m), c1(m)])
    assert r3["cpus"] == [c0(m), c1(m)] and r3["physical_cpus"] == phys(m, c0(m), c1(m))
    assert r3["transaction"]["operations"] == [f"cpu-add CPUs [{c1(m)}] on a"]
    assert itree(m, "a")["cpus"] == phys(m, c0(m), c1(m))
    assert m.snapshot()["pool"]["cpus_available"] == []

    # shrinking gives back whole regions, newest first
    r4 = m.resize("a", memory="20M")
    assert r4["regions"] == [list(boot), list(first)]
    r5 = m.resize("a", memory="16M", cpus=[c1(m)])
    assert r5["regions"] == [list(boot)] and r5["cpus"] == [c1(m)]
    assert r5["transaction"]["operations"] == [
        f"memory-remove {first[0]:#x}+{first[1]:#x} on a", f"cpu-remove CPUs [{c0(m)}] on a"]
    assert region_lines(m) == [
        f"{boot[0]:08x}-{boot[0] + boot[1] - 1:08x} : mk-instance-{a['id']}-a-region-0"]
    assert itree(m, "a") == {"model": "a", "id": a["id"], "cpus": phys(m, c1(m)),
                             "memory-base": boot[0], "memory-bytes": 16 * MiB, "regions": [boot]}
    snap = m.snapshot()
    assert snap["pool"]["memory_available"] == free0
    assert snap["pool"]["cpus_available"] == [c0(m)]
    assert [(t["id"], t["status"]) for t in snap["overlays"]] == \
        [(i, "applied") for i in range(1, 6)]
    for i in range(1, 6):
        assert tx_view(m, i) == {"status": "applied\n", "instance": "/instances/a\n"}
    # a ready instance has no kernel to ask: nothing was asked
    assert m.show("a")["resource_changes"] == {"accepted": 0, "refused": 0, "unanswered": 0}


def test_removing_the_last_transaction_undoes_it(m):
    m.create("a", cpus=[c0(m)], memory="16M")
    before = stable(m)
    tx = m.resize("a", memory="20M", cpus=[c0(m), c1(m)])["transaction"]["id"]
    assert m.remove_overlay(tx)["status"] == "removed"
    assert stable(m) == before
    assert tx_view(m, tx) is None and m.snapshot()["overlays"] == []


@pytest.mark.parametrize("kw,exc,words", [
    ({}, InvalidSpec, "give --cpus or --memory"),
    ({"memory": "17M"}, InvalidSpec, "multiples of 2M"),
    ({"memory": "8M"}, InvalidSpec, "whole regions"),
    ({"memory": "1G"}, ResourceBusy, "no pool chunk has a free range that large"),
])
def test_resize_requests_refused_before_any_transaction(m, kw, exc, words):
    m.create("a", cpus=[c0(m)], memory="16M")
    before = m.snapshot()
    with pytest.raises(exc) as ei:
        m.resize("a", **kw)
    assert words in ei.value.message and ei.value.hint
    after = m.snapshot()
    before["machine"].pop("events")
    after["machine"].pop("events")
    assert after == before and after["overlays"] == []


# -- 2. a running kernel that accepts -------------------------------------------------------------
def test_running_kernel_is_asked_and_follows(m):
    p = boot_picky(m, "p")
    pid = p["pid"]
    boot = (p["memory_base"], 16 * MiB)
    wait_allowed(m, pid, [c0(m)])
    assert query(m, "p")["added"] == []

    grown = m.resize("p", memory="20M")
    added = (highest(m, 4 * MiB), 4 * MiB)
    assert grown["regions"] == [list(boot), list(added)]
    q = query(m, "p")
    assert q["added"] == [list(added)]
    assert (q["memory_base"], q["memory_bytes"]) == boot       # its mapping: the boot region

    m.resize("p", cpus=[c0(m), c1(m)])
    q = query(m, "p")
    assert (q["cpus"], q["logical"]) == (phys(m, c0(m), c1(m)), [c0(m), c1(m)])
    wait_allowed(m, pid, [c0(m), c1(m)])

    m.resize("p", cpus=[c1(m)])
    q = query(m, "p")
    assert (q["cpus"], q["logical"]) == (phys(m, c1(m)), [c1(m)])
    wait_allowed(m, pid, [c1(m)])

    shrunk = m.resize("p", memory="16M")
    assert shrunk["regions"] == [list(boot)]
    assert query(m, "p")["added"] == []

    d = m.show("p")
    assert d["state"] == "active" and d["pid"] == pid and d["boots"] == 1
    assert d["resource_changes"] == {"accepted": 4, "refused": 0, "unanswered": 0}
    console = m.console("p")
    for what in (f"memory-add {added[0]:#x}+{added[1]:#x}", f"cpu-add {phys(m, c1(m))}",
                 f"cpu-remove {phys(m, c0(m))}", f"memory-remove {added[0]:#x}+{added[1]:#x}"):
        assert f"picky: accepted {what}" in console


# -- 3. refusal ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind,kw,op", [
    ("memory", {"memory": "20M"}, "memory-add"),
    ("cpu", {"cpus": "both"}, "cpu-add"),
])
def test_a_refusal_changes_nothing(m, kind, kw, op):
    boot_picky(m, "p", f"refuse={kind}")
    if kw.get("cpus") == "both":
        kw = {"cpus": [c0(m), c1(m)]}
    before, lines, tree, seen = stable(m), iomem(m), itree(m, "p"), query(m, "p")
    with pytest.raises(ResourceRefused) as ei:
        m.resize("p", **kw)
    e = ei.value
    assert e.errno == errno.ECANCELED and e.code == "ECANCELED"
    assert f"instance 'p' refused {op}" in e.message
    assert f"picky: no {op}" in e.message and "thank you" in e.message     # its reason
    assert "rolled back" in e.hint
    assert stable(m) == before
    assert iomem(m) == lines and itree(m, "p") == tree
    assert query(m, "p") == seen
    [tx] = m.snapshot()["overlays"]
    assert tx["status"] == "failed" and f"picky: no {op}" in tx["error"] and "[ECANCELED]" in tx["error"]
    assert tx_view(m, tx["id"]) == {"status": "failed\n", "instance": "/instances/p\n"}
    assert m.show("p")["resource_changes"] == {"accepted": 0, "refused": 1, "unanswered": 0}
    assert "multikernel: refused" in m.console("p")
    # a failed transaction can be removed: nothing to undo, the directory goes
    assert m.remove_overlay(tx["id"])["status"] == "removed"
    assert tx_view(m, tx["id"]) is None and stable(m) == before


# -- 4. the last step refused: every accepted step is undone, and the kernel hears of it --------
@pytest.mark.parametrize("via", ["resize", "overlay"])
def test_a_late_refusal_rolls_back_the_accepted_steps(m, via):
    p = boot_picky(m, "p", "refuse=cpu")
    before, lines, tree = stable(m), iomem(m), itree(m, "p")
    added = (highest(m, 4 * MiB), 4 * MiB)
    with pytest.raises(ResourceRefused, match="refused cpu-add"):
        if via == "resize":
            m.resize("p", memory="20M", cpus=[c0(m), c1(m)])
        else:
            m.apply_overlay(dtbo(update_op("p", memory_add=[added], cpu_add=phys(m, c1(m)))))
    assert stable(m) == before
    assert iomem(m) == lines and itree(m, "p") == tree
    assert m.show("p")["resource_changes"] == {"accepted": 1, "refused": 1, "unanswered": 0}
    # told of the undo (not waited for): its view has no added memory, its CPUs are as before
    q = query(m, "p")
    assert q["added"] == [] and q["cpus"] == phys(m, c0(m))
    console = m.console("p")
    assert console.index(f"picky: accepted memory-add {added[0]:#x}") < \
        console.index(f"picky: accepted memory-remove {added[0]:#x}")
    wait_allowed(m, p["pid"], [c0(m)])
    [tx] = m.snapshot()["overlays"]
    assert tx["status"] == "failed"


def test_a_refusal_in_a_later_fragment_undoes_the_earlier_ones(m):
    boot_picky(m, "p", "refuse=cpu")
    before, lines = stable(m), iomem(m)
    data = dtbo(create_op("x", phys(m, c1(m)), 8 * MiB, iid=40),
                update_op("p", cpu_add=phys(m, c1(m))))
    with pytest.raises(ResourceRefused):
        m.apply_overlay(data)
    assert "x" not in m.instances and stable(m) == before and iomem(m) == lines
    assert not os.path.exists(os.path.join(m.run_dir, "sys/fs/multikernel/instances/x"))
    [tx] = m.snapshot()["overlays"]
    assert (tx["status"], tx["instance"]) == ("failed", "/instances")


def test_rollback_does_not_scrub_and_commit_does(m):
    """Memory that leaves an instance is scrubbed when the change commits, never before: a
    change rolled back gives the region back with its bytes."""
    boot_picky(m, "p", "refuse=cpu")
    base, size = m.resize("p", memory="20M")["regions"][1]
    pattern = b"\xa5" * 4096
    m.arena.map[base:base + 4096] = pattern
    m.arena.map[base + size - 4096:base + size] = pattern
    with pytest.raises(ResourceRefused):       # memory-remove accepted, cpu-add refused
        m.resize("p", memory="16M", cpus=[c0(m), c1(m)])
    assert m.show("p")["regions"][1] == [base, size]
    assert m.arena.read(base, 4096) == pattern and m.arena.read(base + size - 4096, 4096) == pattern
    assert query(m, "p")["added"] == [[base, size]]       # removed, then given back
    m.resize("p", memory="16M")
    assert m.arena.read(base, 4096) == bytes(4096)
    assert m.arena.read(base + size - 4096, 4096) == bytes(4096)


# -- 5. death in the hook -------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["memory", "cpu"])
def test_a_kernel_that_dies_in_the_hook(m, kind):
    p = boot_picky(m, "p", f"panic={kind}")
    pool = m.snapshot()["pool"]
    lines, tree = iomem(m), itree(m, "p")
    with pytest.raises(ResourceRefused) as ei:
        m.resize("p", memory="20M", cpus=[c0(m), c1(m)])
    op = "memory-add" if kind == "memory" else "cpu-add"
    assert f"did not accept {op}" in ei.value.message and "it died" in ei.value.message
    d = m.show("p")
    # the machine's fault handling: a panic halts it (loaded; recovery "none" restarts nothing)
    assert d["state"] == "loaded" and d["pid"] is None
    assert d["last_exit"]["how"] == "panic" and "more than I can take" in d["last_exit"]["reason"]
    assert d["regions"] == [[p["memory_base"], 16 * MiB]] and d["cpus"] == [c0(m)]
    assert d["resource_changes"]["unanswered"] == 1
    assert m.snapshot()["pool"] == pool
    assert iomem(m) == lines and itree(m, "p") == tree
    assert m.snapshot()["overlays"][0]["status"] == "failed"
    # and it boots again, on its CPUs, with the kernel's view matching the host's
    wait_until(m, lambda: m.show("p")["resident"])
    again = m.start("p")
    assert again["boots"] == 2
    wait_allowed(m, again["pid"], [c0(m)])
    assert query(m, "p")["cpus"] == phys(m, c0(m))


# -- 6. silence ---------------------------------------------------------------------------------------
@pytest.mark.slow
def test_a_kernel_that_never_answers_times_out_and_is_rolled_back(m):
    p = boot_picky(m, "p", "hang=memory")
    before, lines = stable(m), iomem(m)
    t0 = time.monotonic()
    with pytest.raises(ResourceRefused) as ei:
        m.resize("p", memory="20M")
    took = time.monotonic() - t0
    assert resize.ACK_TIMEOUT_S <= took < resize.ACK_TIMEOUT_S + 5
    assert f"no RES_ACK within {resize.ACK_TIMEOUT_S:g} s" in ei.value.message
    assert ei.value.errno == errno.ECANCELED
    assert stable(m) == before and iomem(m) == lines
    d = m.show("p")
    assert d["state"] == "active" and d["pid"] == p["pid"]
    assert d["resource_changes"] == {"accepted": 0, "refused": 0, "unanswered": 1}
    assert m.snapshot()["overlays"][0]["status"] == "failed"
    k = m.kill("p", force=True)
    assert k["state"] == "loaded" and k["last_exit"]["how"] == "forced"


def test_the_supervisor_answers_read_verbs_while_a_silent_kernel_holds_a_change(run_dir):
    """Red team: a kernel that never writes RES_ACK blinded the supervisor: ``mkctl show``
    waited for the change's whole ACK_TIMEOUT_S (9 s instead of 43 ms). Read verbs are answered
    while the change waits, as while a graceful kill waits; the change itself ends when its
    kernel dies (killed here from outside, so the test does not wait the full timeout)."""
    mk(run_dir, "init", "--memory", "96M", "--oversubscribe", "--cpus",
       ",".join(map(str, CPUS[:2])), "--host-cpus", "none")
    try:
        mk(run_dir, "create", "p", "--cpus", str(CPUS[0]), "--memory", "16M")
        mk(run_dir, "load", "p", "--kernel", PICKY, "--cmdline", "hang=memory")
        mk(run_dir, "start", "p")
        pid = json.loads(mk(run_dir, "show", "p", "--format", "json").stdout)["pid"]
        change = subprocess.Popen(MKCTL + ["--run-dir", run_dir, "update", "p", "--memory", "20M"],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 10
            while "picky: hanging in memory-add" not in mk(run_dir, "console", "p").stdout:
                assert time.monotonic() < deadline and change.poll() is None, \
                    "the console was not answered while the change waited"
                time.sleep(0.05)
            t0 = time.monotonic()
            shown = json.loads(mk(run_dir, "show", "p", "--format", "json", timeout=30).stdout)
            took = time.monotonic() - t0
            assert change.poll() is None, "the change ended before show was answered"
            assert took < resize.ACK_TIMEOUT_S / 2, f"show took {took:.1f} s"
            assert shown["state"] == "active" and shown["pid"] == pid
        finally:
            os.kill(pid, signal.SIGKILL)
            out, err = change.communicate(timeout=30)
        assert change.returncode != 0 and "it died" in err and "Traceback" not in err
    finally:
        mk(run_dir, "shutdown")


def test_a_change_whose_steps_are_each_answered_late_is_bounded_as_a_whole(m, monkeypatch):
    """Each RES_ACK in time, the change too long: an overlay's steps share one budget
    (CHAIN_TIMEOUT_S), so a slow kernel cannot hold the machine's verbs for 64 step waits."""
    monkeypatch.setattr(resize, "ACK_TIMEOUT_S", 3.0)
    monkeypatch.setattr(resize, "CHAIN_TIMEOUT_S", 1.5, raising=False)
    p = boot_picky(m, "p", "slow=1.0")
    before, lines = stable(m), iomem(m)
    t0 = time.monotonic()
    with pytest.raises(ResourceRefused) as ei:      # memory-add, then cpu-add: 2 s of answers
        m.resize("p", cpus=[c0(m), c1(m)], memory="20M")
    took = time.monotonic() - t0
    assert "within the 1.5 s its update's steps have together" in ei.value.message
    assert took < 2.5 and ei.value.errno == errno.ECANCELED
    wait_until(m, lambda: "picky: accepted cpu-add" in m.console("p"))   # its late answer
    settle_until = time.monotonic() + 1.5                   # and the undo it was told of
    while time.monotonic() < settle_until:
        m.poll(0.05)
    assert stable(m) == before and iomem(m) == lines
    assert m.show("p")["cpus"] == [c0(m)]
    m.kill("p", force=True)


# -- 7. overlay transactions ----------------------------------------------------------------------
def test_overlay_create_then_remove_the_transaction(m):
    before = stable(m)
    tx = m.apply_overlay(dtbo(create_op("x", phys(m, c1(m)), 8 * MiB, iid=7)))
    assert tx == {"id": 1, "status": "applied", "instance": "/instances",
                  "operations": ["instance-create x"], "error": ""}
    x = m.show("x")
    assert (x["id"], x["state"], x["cpus"], x["memory_bytes"]) == (7, "ready", [c1(m)], 8 * MiB)
    assert tx_view(m, 1) == {"status": "applied\n", "instance": "/instances\n"}
    assert itree(m, "x")["id"] == 7 and "mk-instance-7-x-region-0" in iomem(m)

    assert m.remove_overlay(1)["status"] == "removed"
    assert "x" not in m.instances and stable(m) == before
    assert tx_view(m, 1) is None and m.snapshot()["overlays"] == []
    with pytest.raises(NoSuchInstance) as ei:
        m.remove_overlay(1)                             # already removed
    assert ei.value.errno == errno.ENOENT and "tx_1" in ei.value.message
    with pytest.raises(NoSuchInstance):
        m.remove_overlay(99)
    with pytest.raises(InvalidSpec):
        m.remove_overlay("1")
    # ids count on
    assert m.apply_overlay(dtbo(create_op("x", phys(m, c1(m)), 8 * MiB)))["id"] == 2


def test_undoing_an_instance_remove_recreates_it(m):
    m.create("y", cpus=[c0(m), c1(m)], memory="8M", id=9)
    before = stable(m)
    tx = m.apply_overlay(dtbo(remove_op("y")))
    assert tx["operations"] == ["instance-remove y"] and "y" not in m.instances
    assert "mk-instance-9-y" not in iomem(m)
    m.remove_overlay(tx["id"])
    y = m.show("y")
    assert (y["id"], y["state"], y["cpus"], y["memory_bytes"]) == (9, "ready", [c0(m), c1(m)],
                                                                   8 * MiB)
    assert stable(m) == before


def test_removing_a_create_whose_instance_is_loaded_is_busy(m):
    tx = m.apply_overlay(dtbo(create_op("x", phys(m, c0(m)), 8 * MiB)))["id"]
    m.load("x", IDLE)
    before = stable(m)
    with pytest.raises(ResourceBusy) as ei:
        m.remove_overlay(tx)
    assert ei.value.errno == errno.EBUSY and "loaded" in ei.value.message
    assert stable(m) == before and tx_view(m, tx)["status"] == "applied\n"
    m.unload("x")
    m.remove_overlay(tx)
    assert "x" not in m.instances


def test_overlay_instance_remove_refusals(m):
    boot_picky(m, "run")
    before = stable(m)
    with pytest.raises(ResourceBusy, match="'run' is active"):
        m.apply_overlay(dtbo(remove_op("run")))
    with pytest.raises(NoSuchInstance):
        m.apply_overlay(dtbo(remove_op("nobody")))
    assert stable(m) == before
    assert [t["status"] for t in m.snapshot()["overlays"]] == ["failed"] * 2


def test_instance_remove_of_a_grown_instance_frees_what_it_holds(m):
    """The real instance-remove destroys an instance that is not running with whatever it holds
    (as mkctl delete does): the regions added at run time go back to the pool. Undone, it comes
    back with them."""
    free0 = m.snapshot()["pool"]["memory_available"]
    m.create("grown", cpus=[c1(m)], memory="8M", id=5)
    m.resize("grown", memory="12M")
    before = stable(m)
    held = m.show("grown")["regions"]
    tx = m.apply_overlay(dtbo(remove_op("grown")))
    assert tx["operations"] == ["instance-remove grown"] and "grown" not in m.instances
    assert m.snapshot()["pool"]["memory_available"] == free0
    assert "mk-instance-5-grown" not in iomem(m)
    m.remove_overlay(tx["id"])
    back = m.show("grown")
    assert back["regions"] == held and back["memory_total"] == 12 * MiB
    assert stable(m) == before


# -- 8. bad overlays ------------------------------------------------------------------------------
def _valid(m):
    return dtbo(create_op("z", phys(m, c0(m)), 8 * MiB))


def _patched(data, offset, value):
    out = bytearray(data)
    struct.pack_into(">I", out, offset, value)
    return bytes(out)


BAD = {
    # parsed and refused: no transaction
    "no fragments": (lambda m: dtbo(), InvalidSpec, "no fragment@N", False),
    "unknown operation": (lambda m: dtbo(("/instances", {"instance-frob": {"instance-name": "z"}})),
                          InvalidSpec, "unknown operation 'instance-frob'", False),
    "unknown update": (lambda m: dtbo(("/instances/a", {"memory-shuffle": {}})),
                       InvalidSpec, "unknown operation 'memory-shuffle'", False),
    "device-add": (lambda m: dtbo(("/instances/a", {"device-add": {"eth0": {"reg": u64(1)}}})),
                   NotSupported, "no devices", False),
    "pool target": (lambda m: dtbo(("/resources", {"device-add": {"pci@0": {"pci-id": "0:1"}}})),
                    NotSupported, "no devices to move", False),
    "pool chunk by reg": (lambda m: dtbo(pool_op(add=[(None, 2 * MiB, reg(0, 2 * MiB))])),
                          InvalidSpec, "names no 'reg'", False),
    "pool size unaligned": (lambda m: dtbo(pool_op(add=[(None, 2 * MiB + 1000, None)])),
                            InvalidSpec, "multiple of the 4096-byte page", False),
    "pool size zero": (lambda m: dtbo(pool_op(add=[(None, 0, None)])), InvalidSpec,
                       "non-zero", False),
    "odd target": (lambda m: dtbo(("/cpus", {"cpu-add": {}})), InvalidSpec,
                   "names nothing the host knows", False),
    "no target-path": (lambda m: fdt({"fragment@0": {"__overlay__": {}}}), InvalidSpec,
                       "has no target-path", False),
    "no __overlay__": (lambda m: fdt({"fragment@0": {"target-path": "/instances"}}), InvalidSpec,
                       "has no __overlay__", False),
    "create id 0": (lambda m: dtbo(create_op("z", phys(m, c0(m)), 8 * MiB, iid=0)), InvalidSpec,
                    "Instance ID must be in range", False),
    "create no cpus": (lambda m: dtbo(("/instances", {"instance-create": {
        "instance-name": "z", "resources": {"memory-bytes": u64(8 * MiB)}}})),
        InvalidSpec, "has no CPUs", False),
    "cpus as a string": (lambda m: dtbo(("/instances", {"instance-create": {
        "instance-name": "z", "resources": {"cpus": "0", "memory-bytes": u64(8 * MiB)}}})),
        InvalidSpec, "CPU ids", False),
    "truncated": (lambda m: _valid(m)[:-8], InvalidSpec, "arrived", False),
    "random bytes": (lambda m: os.urandom(200), InvalidSpec, "not a DTB", False),
    "tiny": (lambda m: b"\xd0\x0d\xfe\xed", InvalidSpec, "shorter than an FDT header", False),
    "huge length field": (lambda m: _patched(_valid(m), 4, 0xFFFFFFF0), InvalidSpec,
                          "says it is 4294967280 bytes", False),
    "over the size limit": (lambda m: _patched(_valid(m) + bytes((1 << 20) + 1 - len(_valid(m))),
                                               4, (1 << 20) + 1), InvalidSpec, "-byte limit", False),
    "broken structure": (lambda m: _patched(_valid(m), 8, 0x7FFFFFF0), InvalidSpec, "malformed",
                         False),
    "not bytes": (lambda m: "fragment@0 {};", InvalidSpec, "must be bytes", False),
    # parsed, refused while planned: a failed transaction, nothing changed
    "pool size absurd": (lambda m: dtbo(pool_op(add=[(None, 1 << 62, None)])), MKError,
                         "left to give the pool", True),
    "pool size past the window": (lambda m: dtbo(pool_op(add=[(None, pool_room(m) + 2 * MiB,
                                                                None)])),
                                  MKError, "left to give the pool", True),
    "pool remove not a chunk": (lambda m: dtbo(pool_op(remove=[(pool_end(m), 2 * MiB)])),
                                InvalidSpec, "is not a pool chunk", True),
    "pool remove a busy chunk": (lambda m: dtbo(pool_op(remove=chunks(m))), ResourceBusy,
                                 "holds memory of instance 'a'", True),
    "pool cpu lent": (lambda m: dtbo(pool_op(cpu_remove=phys(m, c0(m)))), ResourceBusy,
                      "is lent to 'a'", True),
    "pool too many chunks": (lambda m: dtbo(*[pool_op(add=[(None, 4096, None)] * 64)] * 5),
                             MKError, "the most it keeps (256)", True),
    "pool cpu unknown": (lambda m: dtbo(pool_op(cpu_add=[4000])), InvalidSpec,
                         "APIC ID 4000 is no CPU of this host", True),
    "pool cpu in the pool": (lambda m: dtbo(pool_op(cpu_add=phys(m, c1(m)))), InvalidSpec,
                             "in the pool already", True),
    "pool grows then fails": (lambda m: dtbo(pool_op(add=[(None, 4 * MiB, None)]),
                                             pool_op(cpu_add=[4000])), InvalidSpec,
                              "APIC ID 4000", True),
    "cpu not in the pool": (lambda m: dtbo(update_op("a", cpu_add=[4000])), InvalidSpec,
                            "APIC IDs [4000]", True),
    "cpu it does not hold": (lambda m: dtbo(update_op("a", cpu_remove=phys(m, c1(m)))),
                             InvalidSpec, "it does not hold", True),
    "its last cpu": (lambda m: dtbo(update_op("a", cpu_remove=phys(m, c0(m)))), InvalidSpec,
                     "no CPU", True),
    "cpu it holds": (lambda m: dtbo(update_op("a", cpu_add=phys(m, c0(m)))), InvalidSpec,
                     "already holds", True),
    "misaligned memory": (lambda m: dtbo(update_op("a", memory_add=[(highest(m, 4 * MiB) + MiB,
                                                                     2 * MiB)])),
                          InvalidSpec, "not aligned", True),
    "odd memory size": (lambda m: dtbo(update_op("a", memory_add=[(highest(m, 4 * MiB), 3 * MiB)])),
                        InvalidSpec, "not aligned", True),
    "memory of another instance": (lambda m: dtbo(update_op("a", memory_add=[
        (m.show("b")["memory_base"], 2 * MiB)])), ResourceBusy, "overlaps 'b'", True),
    "memory outside the pool": (lambda m: dtbo(update_op("a", memory_add=[(pool_end(m), 2 * MiB)])),
                                ResourceBusy, "outside the pool", True),
    "memory it already has": (lambda m: dtbo(update_op("a", memory_add=[
        (m.show("a")["memory_base"], 2 * MiB)])), ResourceBusy, "overlaps", True),
    "the boot region": (lambda m: dtbo(update_op("a", memory_remove=[
        (m.show("a")["memory_base"], 16 * MiB)])), PermissionDenied, "boot region", True),
    "a region it lacks": (lambda m: dtbo(update_op("a", memory_remove=[
        (highest(m, 4 * MiB), 4 * MiB)])), InvalidSpec, "is not one of its regions", True),
    "no such instance": (lambda m: dtbo(update_op("nobody", cpu_add=phys(m, c1(m)))),
                         NoSuchInstance, "does not exist", True),
    "create a duplicate": (lambda m: dtbo(create_op("a", phys(m, c1(m)), 8 * MiB)), AlreadyExists,
                           "already exists", True),
    "create too big": (lambda m: dtbo(create_op("z", phys(m, c1(m)), 1 << 40)), MKError,
                       "exceeds memory pool", True),
    "create then fail": (lambda m: dtbo(create_op("z", phys(m, c1(m)), 8 * MiB),
                                        update_op("a", cpu_add=[4000])), InvalidSpec,
                         "APIC IDs [4000]", True),
}


@pytest.mark.parametrize("case", list(BAD))
def test_a_bad_overlay_changes_nothing(m, case):
    build, exc, words, makes_tx = BAD[case]
    m.create("a", cpus=[c0(m)], memory="16M")
    m.create("b", cpus=[c1(m)], memory="16M")
    data = build(m)
    before, lines = stable(m), iomem(m)
    trees = {n: itree(m, n) for n in ("a", "b")}
    pool_tree = view(m, "sys", "fs", "multikernel", "device_tree")
    with pytest.raises(exc) as ei:
        m.apply_overlay(data)
    assert words in ei.value.message, ei.value.message
    assert ei.value.hint
    assert stable(m) == before
    assert iomem(m) == lines and {n: itree(m, n) for n in ("a", "b")} == trees
    assert view(m, "sys", "fs", "multikernel", "device_tree") == pool_tree
    assert not os.path.exists(os.path.join(m.run_dir, "sys/fs/multikernel/instances/z"))
    txs = m.snapshot()["overlays"]
    if makes_tx:
        assert [(t["id"], t["status"]) for t in txs] == [(1, "failed")]
        assert f"[{ei.value.code}]" in txs[0]["error"]
        assert tx_view(m, 1)["status"] == "failed\n"
    else:
        assert txs == [] and tx_view(m, 1) is None
    # and the machine still takes a good one, with the next id
    assert m.apply_overlay(_valid(m))["id"] == (2 if makes_tx else 1)


def test_bad_overlay_errnos(m):
    m.create("a", cpus=[c0(m)], memory="16M")
    m.create("b", cpus=[c1(m)], memory="16M")
    codes = {}
    for case in ("device-add", "pool target", "misaligned memory", "memory of another instance",
                 "the boot region", "cpu not in the pool", "no such instance"):
        with pytest.raises(MKError) as ei:
            m.apply_overlay(BAD[case][0](m))
        codes[case] = ei.value.errno
    assert codes == {"device-add": errno.EOPNOTSUPP, "pool target": errno.EOPNOTSUPP,
                     "misaligned memory": errno.EINVAL, "memory of another instance": errno.EBUSY,
                     "the boot region": errno.EPERM, "cpu not in the pool": errno.EINVAL,
                     "no such instance": errno.ENOENT}


# -- 9. hostile peers -----------------------------------------------------------------------------
def notes(m, name):
    raw = m.read_memory(name, 0, 4096)
    return raw[4:4 + int.from_bytes(raw[:4], "little")].decode()


def test_a_cpu_add_forged_by_a_peer_changes_nothing(m):
    p = boot_picky(m, "p")
    seen = query(m, "p")
    m.create("f", cpus=[c1(m)], memory="4M")
    m.load("f", FORGER, f"attack=cpu-add target={p['id']} cpu={phys(m, c1(m))[0]}")
    m.start("f")
    wait_until(m, lambda: "done" in notes(m, "f"))
    said = notes(m, "f")
    assert "as itself: None" in said, said       # a command not the host's gets no answer
    wait_until(m, lambda: m.show("p")["counters"]["forged_commands"] >= 3)
    assert query(m, "p") == seen
    d = m.show("p")
    assert d["cpus"] == [c0(m)] and d["state"] == "active" and d["pid"] == p["pid"]
    assert allowed(p["pid"]) == {(c0(m),)}
    assert "picky: accepted" not in m.console("p")
    assert "a command of type 0x2001 not from the host, ignored" in m.console("p")
    # the host's own numbering is intact: its next change goes through
    m.resize("p", cpus=[c0(m), c1(m)])
    assert query(m, "p")["cpus"] == phys(m, c0(m), c1(m))


def test_a_res_ack_forged_by_a_peer_is_no_answer(m, monkeypatch):
    # the victim never answers; the forger answers for it. Bounded wait (the fixed host times
    # out instead of committing): 3 s rather than 10
    monkeypatch.setattr(resize, "ACK_TIMEOUT_S", 3.0)
    p = boot_picky(m, "p", "hang=memory")
    m.create("f", cpus=[c1(m)], memory="4M")
    m.load("f", FORGER, f"attack=ack target={p['id']} seconds=4")
    m.start("f")
    wait_until(m, lambda: "attack ack" in notes(m, "f"))
    before = stable(m)
    try:
        with pytest.raises(ResourceRefused, match="no RES_ACK"):
            m.resize("p", memory="20M")
        assert stable(m) == before
    finally:
        m.kill("p", force=True)
        m.kill("f", force=True)


# -- regressions (bugs found by these tests, fixed) -----------------------------------------------
def test_a_cpu_named_twice_is_booked_once(m):
    m.create("a", cpus=[c0(m)], memory="16M")
    p1 = phys(m, c1(m))[0]
    data = dtbo(("/instances/a", {"cpu-add": {f"cpu@{p1:x}": {"reg": u64(p1)},
                                               f"cpu@{p1:x},0": {"reg": u64(p1)}}}))
    try:
        m.apply_overlay(data)            # refusing it would be right; so is booking it once
    except InvalidSpec:
        pass
    if c1(m) in m.show("a")["cpus"]:
        m.resize("a", cpus=[c0(m)])
    assert m.snapshot()["pool"]["cpus_available"] == [c1(m)]


@pytest.mark.parametrize("what", ["cpus", "memory"])
def test_removing_an_overridden_resize_is_refused(m, what):
    m.create("a", cpus=[c0(m)], memory="16M")
    if what == "cpus":
        first = m.resize("a", cpus=[c0(m), c1(m)])["transaction"]["id"]
        m.resize("a", cpus=[c1(m)])
    else:
        first = m.resize("a", memory="20M")["transaction"]["id"]
        m.resize("a", memory="16M")
    before = stable(m)
    with pytest.raises(MKError):
        m.remove_overlay(first)
    assert stable(m) == before
    m.load("a", IDLE)                    # still a whole instance


@pytest.mark.parametrize("what", ["cpus", "memory"])
def test_removing_a_resize_of_a_deleted_instance_harms_nothing(m, what):
    m.create("a", cpus=[c0(m)], memory="16M")
    if what == "cpus":
        tx = m.resize("a", cpus=[c0(m), c1(m)])["transaction"]["id"]
    else:
        tx = m.resize("a", memory="20M")["transaction"]["id"]
    m.delete("a")
    m.create("a", cpus=[c0(m), c1(m)], memory="16M")
    before = stable(m)
    try:
        m.remove_overlay(tx)
    except MKError:
        pass
    assert stable(m) == before


def test_a_cpu_change_while_loaded_reaches_the_booted_kernel(m):
    m.create("p", cpus=[c0(m)], memory="16M")
    m.load("p", PICKY)
    parked = m.instances["p"].parked.pid
    m.resize("p", cpus=[c1(m)])
    wait_allowed(m, parked, [c1(m)])
    d = m.start("p")
    wait_allowed(m, d["pid"], [c1(m)])
    q = query(m, "p")
    assert (q["cpus"], q["logical"]) == (phys(m, c1(m)), [c1(m)])


# -- 10. the pool grows and shrinks (/resources) ------------------------------------------------
@pytest.fixture
def hm(machine_factory):
    """A pool of CPUS[1], the host on CPUS[0], its own cores (a CPU can move in and out)."""
    return machine_factory(cpus=[CPUS[1]], host_cpus=[CPUS[0]], memory="64M")


def test_the_pool_grows_by_a_chunk_it_places_and_shrinks_by_whole_chunks(hm):
    m = hm
    first = chunks(m)
    assert len(first) == 1 and first[0][1] == 64 * MiB and root_chunks(m) == first
    tx = m.apply_overlay(dtbo(pool_op(add=[(0, 32 * MiB, None)])))
    grown = chunks(m)
    new = [c for c in grown if c not in first]
    assert len(new) == 1 and new[0][1] == 32 * MiB and new[0][0] % MEMORY_GRANULE == 0
    assert tx["operations"] == [f"pool memory-add {new[0][0]:#x}+{32 * MiB:#x}"]
    pool = m.snapshot()["pool"]
    assert (pool["memory_bytes"], pool["memory_available"]) == (96 * MiB, 96 * MiB)
    assert root_chunks(m) == grown                       # one memory@ per chunk, as kerf reads
    assert pool_lines(m) == [f"{b:08x}-{b + n - 1:08x} : Multikernel Memory Pool" for b, n in grown]
    assert [e["op"] for e in events(m, "pool_changed")] == ["memory-add"]

    # an instance grows into the new chunk (kerf places added memory at the highest free
    # range): that chunk is busy, the pool cannot give it back
    m.create("a", cpus=[CPUS[1]], memory="16M")
    m.resize("a", memory="32M")
    assert m.show("a")["regions"][1][0] >= new[0][0]
    lines = iomem(m).splitlines()
    at = lines.index(pool_lines(m)[1])
    assert lines[at + 1].strip().endswith(f"-a-region-1")     # nested under its chunk
    before = stable(m)
    with pytest.raises(ResourceBusy) as ei:
        m.apply_overlay(dtbo(pool_op(remove=new)))
    assert ei.value.errno == errno.EBUSY and "holds memory of instance 'a'" in ei.value.message
    assert stable(m) == before and root_chunks(m) == grown

    m.resize("a", memory="16M")
    tx = m.apply_overlay(dtbo(pool_op(remove=new)))
    assert chunks(m) == first and root_chunks(m) == first and len(pool_lines(m)) == 1
    pool = m.snapshot()["pool"]
    assert (pool["memory_bytes"], pool["memory_available"]) == (64 * MiB, 48 * MiB)
    # the range went back to the host: its pages are gone from the arena
    assert not m.arena.read(new[0][0], 4096).strip(b"\0")


def test_pool_cpus_move_between_the_host_and_the_pool(hm):
    m = hm
    c0_, c1_ = CPUS[0], CPUS[1]
    p0, p1 = m.config.physical_ids[c0_], m.config.physical_ids[c1_]
    # the host's last CPU stays the host's (its own cores: no oversubscription)
    with pytest.raises(ResourceBusy, match="the host kernel's last CPU"):
        m.apply_overlay(dtbo(pool_op(cpu_add=[p0])))
    m.create("a", cpus=[c1_], memory="8M")
    with pytest.raises(ResourceBusy, match="is lent to 'a'"):
        m.apply_overlay(dtbo(pool_op(cpu_remove=[p1])))
    m.delete("a")
    # a pool CPU goes back to the host and comes in again; the views follow
    tx = m.apply_overlay(dtbo(pool_op(cpu_remove=[p1])))
    pool = m.snapshot()["pool"]
    assert pool["cpus"] == [] and m.config.host_cpus == sorted([c0_, c1_])
    t = Tree(view(m, "sys", "fs", "multikernel", "device_tree"))
    assert t.cpus(t.path("/resources")) == []
    with pytest.raises(MKError):
        m.create("b", cpus=[c1_], memory="8M")          # not a pool CPU any more
    m.remove_overlay(tx["id"])                           # rolled back: it is the pool's again
    assert m.snapshot()["pool"]["cpus"] == [c1_] and m.config.host_cpus == [c0_]
    m.create("b", cpus=[c1_], memory="8M")
    assert [e["op"] for e in events(m, "pool_changed")] == ["cpu-remove", "cpu-add"]


def test_a_memory_remove_that_strands_parked_cpus_is_busy(hm):
    """The pool's CPUs park in pool memory: its last chunk cannot go while it has CPUs; in one
    fragment with the CPUs (which leave first) the pool empties, and rolled back, the memory
    comes back as a chunk of the same size and the CPUs with it."""
    m = hm
    only = chunks(m)
    before = stable(m)
    with pytest.raises(ResourceBusy) as ei:
        m.apply_overlay(dtbo(pool_op(remove=only)))
    assert "would strand the pool's parked CPUs" in ei.value.message and ei.value.hint
    assert stable(m) == before
    tx = m.apply_overlay(dtbo(pool_op(remove=only, cpu_remove=phys(m, CPUS[1]))))
    assert tx["operations"] == [f"pool cpu-remove APIC ID {phys(m, CPUS[1])[0]}",
                                f"pool memory-remove {only[0][0]:#x}+{only[0][1]:#x}"]
    pool = m.snapshot()["pool"]
    assert (pool["cpus"], pool["chunks"], pool["memory_bytes"]) == ([], [], 0)
    assert pool_lines(m) == [] and root_chunks(m) == []
    m.remove_overlay(tx["id"])
    pool = m.snapshot()["pool"]
    assert pool["cpus"] == [CPUS[1]] and [n for _, n in pool["chunks"]] == [64 * MiB]


def test_rolling_back_a_pool_growth_keeps_the_chunk_as_the_real_kernel_does(hm):
    """rmdir of a /resources memory-add: the real kernel cannot name the chunk the pool chose,
    so it keeps it and warns; a transaction that fails is undone exactly all the same."""
    m = hm
    first = chunks(m)
    tx = m.apply_overlay(dtbo(pool_op(add=[(None, 8 * MiB, None)])))
    grown = chunks(m)
    assert m.remove_overlay(tx["id"])["status"] == "removed"
    assert chunks(m) == grown
    kept = events(m, "pool_rollback_kept")
    assert len(kept) == 1 and kept[0]["size"] == 8 * MiB and kept[0]["tx"] == tx["id"]
    before = stable(m)
    with pytest.raises(InvalidSpec):
        m.apply_overlay(dtbo(pool_op(add=[(None, 8 * MiB, None)]), pool_op(cpu_add=[4000])))
    assert stable(m) == before and chunks(m) == grown != first


def test_a_grown_pool_is_adopted_as_it_was(machine_factory):
    """The state file records the chunks and the window: a new host rebuilds the same arena
    and the instance whose memory lies in the grown chunk is adopted with it."""
    m = machine_factory(cpus=[CPUS[1]], host_cpus=[CPUS[0]], memory="32M", survive_host=True)
    m.apply_overlay(dtbo(pool_op(add=[(None, 16 * MiB, None)])))
    m.create("a", cpus=[CPUS[1]], memory="8M")
    m.resize("a", memory="24M")
    held, grown = m.show("a")["regions"], chunks(m)
    args = m.abandon()
    run = rundir.claim(m.run_dir)
    run.owned = True                     # the new host removes it at its end
    try:
        n = machine_factory(run_dir=run, adopt=True, **args)
    except BaseException:
        adoption.remove_abandoned(m.run_dir)     # its arena and cgroups, whatever failed
        raise
    assert chunks(n) == grown and n.show("a")["regions"] == held
    assert n.snapshot()["pool"]["memory_available"] == 48 * MiB - 24 * MiB


@pytest.mark.skipif(len(CPUS) < 2, reason="needs a CPU outside the pinned host's")
def test_a_pinned_host_adds_a_cpu_outside_its_own_affinity(machine_factory):
    """A supervisor is pinned to the host's CPUs (pin_host): the CPUs a pool may take are the
    host's online ones, not that process's affinity. A CPU neither the host's nor the pool's
    was refused ("is no CPU of this host") under mkctl, and taken by an unpinned machine."""
    before = os.sched_getaffinity(0)
    try:
        m = machine_factory(cpus=[CPUS[0]], host_cpus=[CPUS[0]], oversubscribe=True,
                            memory="32M", pin_host=True)
        assert os.sched_getaffinity(0) == {CPUS[0]}
        m.apply_overlay(dtbo(pool_op(cpu_add=[physical_cpu_ids()[CPUS[1]]])))
        assert m.snapshot()["pool"]["cpus"] == [CPUS[0], CPUS[1]]
    finally:
        os.sched_setaffinity(0, before)


def test_the_hosts_last_cpu_joins_a_shared_pool_and_stays_the_hosts(machine_factory):
    """On a machine whose instances share cores (--oversubscribe) the host's last CPU may join
    the pool: it is then the host's and the pool's, and an instance on it is marked shared.
    Rolled back, it is the host's alone again."""
    m = machine_factory(cpus=[CPUS[1]], host_cpus=[CPUS[0]], oversubscribe=True, memory="32M")
    p0 = m.config.physical_ids[CPUS[0]]
    tx = m.apply_overlay(dtbo(pool_op(cpu_add=[p0])))
    assert m.snapshot()["pool"]["cpus"] == sorted([CPUS[0], CPUS[1]])
    assert m.config.host_cpus == [CPUS[0]]
    assert m.create("s", cpus=[CPUS[0]], memory="8M")["shared_cpus"] == [CPUS[0]]
    with pytest.raises(ResourceBusy, match="lent to s"):
        m.remove_overlay(tx["id"])
    m.delete("s")
    m.remove_overlay(tx["id"])
    assert m.snapshot()["pool"]["cpus"] == [CPUS[1]] and m.config.host_cpus == [CPUS[0]]
