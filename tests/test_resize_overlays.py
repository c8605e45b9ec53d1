"""Overlay transactions (host/overlays.py) on real machines.

Overlays (DTBOs built here with libfdt, in kerf's shapes) create and remove instances and are
undone by ``remove_overlay``; every bad overlay leaves the machine as it was; a peer that forges
the protocol changes nothing (tests/kernels/forger.py).
"""

import errno
import os
import struct

import pytest
from helpers import CPUS, wait_until
from resizing import (
    FORGER,
    IDLE,
    MiB,
    allowed,
    boot_picky,
    c0,
    c1,
    chunks,
    create_op,
    dtbo,
    fdt,
    highest,
    iomem,
    itree,
    phys,
    pool_end,
    pool_op,
    pool_room,
    query,
    reg,
    remove_op,
    stable,
    tx_view,
    u64,
    update_op,
    view,
)

from partition import AlreadyExists, InvalidSpec, MKError, NoSuchInstance, PermissionDenied, ResourceBusy
from partition.errors import NotSupported, ResourceRefused
from partition.host import resize

pytestmark = [pytest.mark.system,
              pytest.mark.skipif(len(CPUS) < 2, reason="CPU changes need a pool of two CPUs")]


@pytest.fixture
def m(machine_factory):
    """Two pool CPUs, no host CPU, shared cores: the only way to move CPUs on a 2-CPU box."""
    return machine_factory(cpus=CPUS[:2], host_cpus="none", oversubscribe=True, memory="256M")


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
