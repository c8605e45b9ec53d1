"""Adoption's checks of a dead host's records, against fakes: a forged or broken record is
refused alone (its cgroup killed), a good one rebuilt, and a running one taken only when its
pid is the process the record names. The state file is written to a temporary directory; no
process is started, no shared memory mapped, no cgroup touched."""

import os

import pytest
from host_fakes import FakeArena, FakeEvents

from partition import linux
from partition.host import adoption
from partition.host.instance import State
from partition.host.pool import PoolConfig, ResourcePool
from partition.host.table import InstanceTable

MB = 1 << 20
LO = 4 * MB


class Cgroups:
    def __init__(self) -> None:
        self.bases: dict[str, str] = {}
        self.killed: list[int] = []

    def kill(self, iid: int, reap: bool = False, keep: int | None = None) -> int:
        self.killed.append(iid)
        return 0

    def procs_files(self, iid: int) -> list[str]:
        return []


class Resctrl:
    def remove_groups(self, keep: set[int]) -> list[int]:
        return []


def _adopt(tmp_path, records):
    adoption.write_state(str(tmp_path), {"version": adoption.STATE_VERSION, "config": {},
                                         "instances": records})
    cfg = PoolConfig.build([1], 64 * MB, [0], True)
    table, cgroups, events, printed = InstanceTable(), Cgroups(), FakeEvents(), []
    a = adoption.Adopter(str(tmp_path), table, FakeArena(), ResourcePool(cfg), LO, cfg, cgroups,
                         Resctrl(), None, events, printed.append, lambda *_: None, False,
                         None, None, lambda inst: None)
    _, refused = adoption.adopt(a)
    return table, cgroups, {r["name"]: r["why"] for r in refused}, events


def _record(iid=1, name="a", **fields):
    rec = {"id": iid, "name": name, "cpus": [1], "memory_base": LO + (iid - 1) * 8 * MB,
           "memory_bytes": 8 * MB, "state": "ready", "generation": 0, "cmd_seq": 0,
           "boots": 0, "recovery": {"policy": "none"}, "counters": {}}
    rec.update(fields)
    return rec


@pytest.fixture
def adopt(tmp_path):
    return lambda records: _adopt(tmp_path, records)


def test_a_ready_record_is_rebuilt_as_it_was(adopt):
    table, cgroups, refused, events = adopt([_record(counters={"boots": 3})])
    inst = table.find("a")
    assert refused == {} and inst is not None and inst.state == State.READY
    assert inst.memory_base == LO and inst.counters["boots"] == 3
    assert events.named("adopted")[0]["instances"] == []
    assert cgroups.killed == [1]               # nothing of it was left running


@pytest.mark.parametrize(("forged", "why"), [
    ({"id": 0}, "id 0 is not 1..511"),
    ({"id": "1"}, "id '1' is not 1..511"),
    ({"name": "host"}, "is not an instance name"),
    ({"cpus": [0]}, "are not the pool's"),
    ({"cpus": [1, "x"]}, "cpus"),
    ({"memory_base": LO + 100}, "not page-aligned"),
    ({"memory_base": LO + 128 * MB}, "outside"),
    ({"state": "running"}, "state"),
    ({"pid_start": float("nan")}, "pid_start"),
    ({"counters": {"boots": "many"}}, "counters"),
    ({"recovery": {"policy": "restart", "max_restarts": 1.5}}, "recovery"),
])
def test_a_forged_record_is_refused_alone_and_its_cgroup_killed(adopt, forged, why):
    bad = {**_record(1, "bad"), **forged}
    table, cgroups, refused, _ = adopt([_record(2, "good"), bad])
    assert [i.name for i in table] == ["good"]
    [said] = refused.values()
    assert said.startswith("bad record: ") and why in said, said
    iid = forged.get("id", 1)
    if type(iid) is int and 1 <= iid < 512:
        assert iid in cgroups.killed


def test_two_records_of_one_name_or_one_range_are_refused(adopt):
    table, _, refused, _ = adopt([_record(1, "a"), _record(2, "a"),
                                  _record(3, "c", memory_base=LO)])
    assert [i.name for i in table] == ["a"]
    assert "a second record" in refused["a"] and "overlaps" in refused["c"]


def test_a_running_record_whose_pid_is_another_process_is_refused(adopt):
    me = os.getpid()          # a live process, but not the one that started when it says
    started = linux.process_start_time(me)
    table, cgroups, refused, _ = adopt([_record(state="active", pid=me,
                                                pid_start=started - 100.0)])
    inst = table.find("a")
    assert "is another process now" in refused["a"]
    assert inst is not None and inst.state == State.READY and inst.pid is None
    assert inst.failure is None or "not adopted" in inst.failure
    assert 1 in cgroups.killed


def test_a_running_record_the_peer_table_disowns_is_refused(adopt):
    me = os.getpid()
    table, _, refused, _ = adopt([_record(state="active", pid=me,
                                          pid_start=linux.process_start_time(me),
                                          kimage={"spec": "kernels.idle:IdleKernel"})])
    # the arena's peer table (zeroed here) names no pid: the record is not believed
    assert "the peer table says pid 0" in refused["a"]
    inst = table.find("a")
    assert inst is not None and inst.state == State.FAILED and inst.pid is None
    assert inst.failure == f"not adopted: {refused['a']}"
