"""The pool itself grows and shrinks (/resources overlays): chunks of memory placed and
removed whole, CPUs moving between the host and the pool, adopted as they were.
"""

import errno
import os

import pytest
from helpers import CPUS
from resizing import (
    MiB,
    chunks,
    dtbo,
    events,
    iomem,
    phys,
    pool_lines,
    pool_op,
    root_chunks,
    stable,
    view,
)

from partition import InvalidSpec, MKError, ResourceBusy
from partition.host import adoption, rundir
from partition.host.devicetree import MEMORY_GRANULE, Tree
from partition.linux import physical_cpu_ids

pytestmark = [pytest.mark.system,
              pytest.mark.skipif(len(CPUS) < 2, reason="CPU changes need a pool of two CPUs")]


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
