"""Runtime resource changes (host/resize.py) of one instance.

Real machines, real kernel processes, real pinning: an instance grows and shrinks by whole
memory regions and gains and loses CPUs, ready or running; a running kernel is asked first
(tests/kernels/picky.py decides) and a refusal, a death or a silence rolls the whole transaction
back. Overlay transactions are in test_resize_overlays.py, the pool's own changes in
test_resize_pool.py.
"""

import errno
import json
import os
import signal
import subprocess
import time

import pytest
from helpers import CPUS, MKCTL, mk, wait_until
from resizing import (
    IDLE,
    PICKY,
    MiB,
    boot_picky,
    c0,
    c1,
    create_op,
    dtbo,
    highest,
    iomem,
    itree,
    phys,
    query,
    region_lines,
    stable,
    tx_view,
    u64,
    update_op,
    wait_allowed,
)

from partition import InvalidSpec, MKError, ResourceBusy
from partition.errors import ResourceRefused
from partition.host import resize

pytestmark = [pytest.mark.system,
              pytest.mark.skipif(len(CPUS) < 2, reason="CPU changes need a pool of two CPUs")]


@pytest.fixture
def m(machine_factory):
    """Two pool CPUs, no host CPU, shared cores: the only way to move CPUs on a 2-CPU box."""
    return machine_factory(cpus=CPUS[:2], host_cpus="none", oversubscribe=True, memory="256M")


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
def test_a_kernel_that_never_answers_times_out_and_is_rolled_back(m, monkeypatch):
    monkeypatch.setattr(resize, "ACK_TIMEOUT_S", 3.0)      # the wait is the subject: a short one
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


@pytest.mark.alone      # times itself
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
