"""The host's plans, checked before anything changes: an instance's resize, the pool's resize,
and the KHO table a run leaves. Plain objects only: no process, no shared memory, no cgroup."""

import zlib

import pytest
from host_fakes import FakeArena, FakeEvents, instance

from partition.abi import message as M
from partition.abi import slot as S
from partition.errors import InvalidSpec, OutOfMemory, PermissionDenied, ResourceBusy
from partition.host import kho, poolresize, resize
from partition.host.devicetree import MEMORY_GRANULE, PoolOp, UpdateOp
from partition.host.instance import State
from partition.host.pool import PoolConfig, ResourcePool

MB = 1 << 20
LO = 2 * MEMORY_GRANULE     # where the pool starts in the arena (granule-aligned, as ever)


def _resources(memory: int = 64 * MB):
    cfg = PoolConfig.build([1], memory, [0], True)
    pool = ResourcePool(cfg, window=2 * memory)
    return resize.Resources(cfg, pool, LO, None, FakeEvents(), None, None, None, False)


def _placed(r, name: str, iid: int, size: int, state=State.READY):
    res = r.pool.plan(name, size, cpus=[1], instance_id=iid)
    r.pool.commit(res)
    return instance(iid, name, cpus=[1], memory_base=LO + res.memory_offset,
                    memory_bytes=size, state=state)


def test_a_resize_plan_refuses_memory_that_overlaps_another_instance():
    r = _resources()
    a = _placed(r, "a", 1, 8 * MB)
    b = _placed(r, "b", 2, 8 * MB)
    with pytest.raises(ResourceBusy, match="overlaps 'b''s region"):
        resize.plan(r, a, UpdateOp("a", memory_add=[(b.memory_base, MEMORY_GRANULE)]))
    with pytest.raises(ResourceBusy, match="overlaps 'a''s region"):
        resize.plan(r, a, UpdateOp("a", memory_add=[(a.memory_base, MEMORY_GRANULE)]))
    assert r.pool.regions == {"a": (0, 8 * MB), "b": (8 * MB, 8 * MB)}     # nothing changed


def test_a_resize_plan_takes_a_free_granule_and_keeps_the_boot_region():
    r = _resources()
    a = _placed(r, "a", 1, 8 * MB)
    free = LO + 32 * MB
    steps = resize.plan(r, a, UpdateOp("a", memory_add=[(free, MEMORY_GRANULE)]))
    assert [(s.op, s.base, s.size) for s in steps] == [(M.MK_MSG_MEM_ADD, free, MEMORY_GRANULE)]
    with pytest.raises(PermissionDenied, match="boot region"):
        resize.plan(r, a, UpdateOp("a", memory_remove=[(a.memory_base, a.memory_bytes)]))
    with pytest.raises(InvalidSpec, match="granule"):
        resize.plan(r, a, UpdateOp("a", memory_add=[(free + 4096, MEMORY_GRANULE)]))
    with pytest.raises(InvalidSpec, match="no CPU"):
        resize.plan(r, a, UpdateOp("a", cpu_remove=[1]))
    with pytest.raises(PermissionDenied, match="reserved for host"):
        resize.plan(r, a, UpdateOp("a", cpu_add=[0]))


def test_a_resize_plan_waits_for_a_settled_state():
    r = _resources()
    a = _placed(r, "a", 1, 8 * MB, state=State.FAILED)
    with pytest.raises(ResourceBusy, match="ready, loaded or active"):
        resize.plan(r, a, UpdateOp("a", cpu_add=[1]))


def test_update_op_grows_at_the_highest_free_granule_and_shrinks_whole_regions():
    r = _resources()
    a = _placed(r, "a", 1, 8 * MB)
    op = resize.update_op(a, None, 8 * MB + MEMORY_GRANULE, r.config, r.pool, LO)
    assert op.memory_add and op.memory_add[0][1] == MEMORY_GRANULE
    with pytest.raises(InvalidSpec, match="multiples"):
        resize.update_op(a, None, 8 * MB + 4096 * 3, r.config, r.pool, LO)
    with pytest.raises(InvalidSpec, match="whole regions"):
        resize.update_op(a, None, 4 * MB, r.config, r.pool, LO)
    with pytest.raises(InvalidSpec, match="--cpus or --memory"):
        resize.update_op(a, None, None, r.config, r.pool, LO)


def test_a_pool_plan_refuses_to_give_back_what_an_instance_holds():
    r = _resources()
    _placed(r, "a", 1, 8 * MB)
    with pytest.raises(ResourceBusy, match="lent to 'a'"):
        poolresize.plan(r, PoolOp(cpu_remove=[1]))
    with pytest.raises(ResourceBusy, match="holds memory of instance 'a'"):
        poolresize.plan(r, PoolOp(memory_remove=[(LO, 64 * MB)]))
    with pytest.raises(InvalidSpec, match="not a pool chunk"):
        poolresize.plan(r, PoolOp(memory_remove=[(LO + MB, MB)]))
    with pytest.raises(OutOfMemory, match="left to give"):
        poolresize.plan(r, PoolOp(memory_add=[128 * MB]))
    steps = poolresize.plan(r, PoolOp(memory_add=[16 * MB]))
    assert [(s.kind, s.size) for s in steps] == [("memory-add", 16 * MB)]


def _captured(entries, size: int = 64 << 10, flags: int = 0):
    arena, events = FakeArena(), FakeEvents()
    inst = instance(1, "a", memory_base=4096, memory_bytes=size)
    arena.map[4096:4096 + size] = bytes(range(256)) * (size // 256)
    own = arena.own(1)
    own.kho_out = [(n.encode() if isinstance(n, str) else n, o, z, 0) for n, o, z in entries]
    own.kho_flags = flags
    kho.capture(arena, events, inst)
    return inst, arena, events


def test_kho_keeps_a_checked_table_with_its_crcs():
    inst, arena, events = _captured([("state", 0, 4096), ("log", 8192, 8192)],
                                    flags=S.KHO_KEEP_REST)
    want = [("state", 0, 4096, zlib.crc32(arena.map[4096:8192])),
            ("log", 8192, 8192, zlib.crc32(arena.map[4096 + 8192:4096 + 16384]))]
    assert inst.kho == want and inst.kho_keep_rest
    assert events.named("kho_captured")[0]["dropped"] == []


@pytest.mark.parametrize(("entry", "why"), [
    ((b"", 0, 4096), "not 1-31 printable"),
    ((b"bad name", 0, 4096), "not 1-31 printable"),
    ((b"x" * 32, 0, 4096), "not 1-31 printable"),
    (("odd", 100, 4096), "not page-aligned"),
    (("big", 0, 128 << 10), "not page-aligned inside"),
    (("empty", 4096, 0), "not page-aligned"),
])
def test_kho_refuses_a_bad_entry_and_says_why(entry, why):
    inst, _, events = _captured([("good", 8192, 4096), entry])
    assert [k[0] for k in inst.kho] == ["good"]
    dropped = events.named("kho_captured")[0]["dropped"]
    assert len(dropped) == 1 and why in dropped[0]


def test_kho_refuses_overlaps_and_duplicate_names():
    inst, _, events = _captured([("a", 0, 8192), ("b", 4096, 4096), ("a", 16384, 4096)])
    assert [k[0] for k in inst.kho] == ["a"]
    dropped = events.named("kho_captured")[0]["dropped"]
    assert "overlaps" in dropped[0] and "name is taken" in dropped[1]


def test_kho_hands_in_the_table_and_scrubs_around_it():
    inst, arena, events = _captured([("state", 8192, 4096)])
    kho.prepare(arena, events, inst)
    base = inst.memory_base
    assert arena.scrubbed == [(base, 8192), (base + 12288, inst.memory_bytes - 12288)]
    assert arena.own(1).kho_in is not None and arena.own(1).kho_in[0][0] == "state"
    assert inst.kho is None
