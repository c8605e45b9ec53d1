"""The views follow each change without re-rendering the machine (issue 13): a change writes
what it changed, and what is on disk is always what a full render of the machine says."""

import os

import pytest
from helpers import CPUS, wait_until

from partition.host.views import render_instance_tree, render_iomem, render_kimage, render_pool_tree

pytestmark = pytest.mark.system      # real machines: pytest -m "not system" skips them

IDLE = "kernels.idle:IdleKernel"


def _read(path, binary=False):
    with open(path, "rb" if binary else "r") as f:
        return f.read()


def assert_views_match(m):
    """Every view file equals a full render from the machine's snapshot."""
    snap = m.snapshot()
    proc = os.path.join(m.run_dir, "proc")
    sysfs = os.path.join(m.run_dir, "sys", "fs", "multikernel")
    assert _read(os.path.join(proc, "kimage")) == render_kimage(snap)
    assert _read(os.path.join(proc, "iomem")) == render_iomem(snap)
    assert _read(os.path.join(sysfs, "device_tree"), True) == render_pool_tree(snap)
    names = sorted(os.listdir(os.path.join(sysfs, "instances")))
    assert names == sorted(i["name"] for i in snap["instances"])
    for i in snap["instances"]:
        d = os.path.join(sysfs, "instances", i["name"])
        assert _read(os.path.join(d, "status")) == f"{i['state']}\n"
        assert _read(os.path.join(d, "id")) == f"{i['id']}\n"
        assert _read(os.path.join(d, "device_tree"), True) == render_instance_tree(i), i["name"]


def _boot(m, name, cpu, kernel=IDLE, cmdline=""):
    m.create(name, cpus=[cpu], memory="1M")
    m.load(name, kernel, cmdline)
    wait_until(m, lambda: m.show(name)["resident"], timeout=30)
    # the host's sweep (counters views of instances whose heartbeat moved) is held off
    # meanwhile: what is counted is what the boot writes, not what a sweep due by chance does
    due, m._filters_due = m._filters_due, float("inf")
    try:
        before = m.views.writes, m.views.trees_rendered
        m.exec(name, wait=False)
        return m.views.writes - before[0], m.views.trees_rendered - before[1]
    finally:
        m._filters_due = due


def test_a_boot_writes_the_same_few_files_at_any_size(machine):
    cost = []
    for k in range(12):
        cost.append(_boot(machine, f"k{k}", CPUS[k % len(CPUS)]))
    assert_views_match(machine)
    # the boot changes one instance's status and nothing else machine-wide: no device tree
    # is built again (a full re-render built one per instance on every change)
    assert max(w for w, _ in cost) <= 2, cost
    assert all(t == 0 for _, t in cost), cost
    before = machine.views.trees_rendered
    machine.create("late", cpus=[CPUS[-1]], memory="1M")
    # its own tree, and none of the others': they shared that CPU already
    assert machine.views.trees_rendered - before == 1


def test_sharing_a_cpu_changes_the_older_instances_tree(machine):
    cpu = CPUS[-1]
    machine.create("first", cpus=[cpu], memory="1M")
    machine.create("second", cpus=[cpu], memory="1M")       # now both share that CPU
    assert machine.show("first")["shared_cpus"] == [cpu]
    assert_views_match(machine)
    machine.delete("second")
    assert_views_match(machine)


def test_load_unload_resize_and_delete_keep_the_views_whole(machine):
    _boot(machine, "a", CPUS[-1])
    _boot(machine, "b", CPUS[0])
    assert_views_match(machine)
    machine.kill("a", force=True)
    machine.unload("a")
    assert_views_match(machine)                 # its kimage row is gone
    machine.resize("a", memory="3M")
    assert_views_match(machine)                 # a second region in iomem
    machine.delete("a")
    assert_views_match(machine)
    assert not os.path.exists(os.path.join(machine.run_dir, "sys", "fs", "multikernel",
                                           "instances", "a"))


def test_counters_views_follow_the_sweep(machine):
    _boot(machine, "c", CPUS[-1], "kernels.counter:CounterKernel", "interval=0.05")
    path = os.path.join(machine.run_dir, "sys", "fs", "multikernel", "instances", "c",
                        "counters")

    def beats():
        text = _read(path) if os.path.exists(path) else ""
        return dict(line.split() for line in text.splitlines()).get("heartbeats_sent", "0")

    wait_until(machine, lambda: int(beats()) >= 2, timeout=10)


def test_a_look_rewrites_only_counters_that_moved(machine):
    _boot(machine, "quiet", CPUS[-1])
    machine.show()                              # every counters file says what it reads now
    due, machine._filters_due = machine._filters_due, float("inf")
    try:
        before = machine.views.writes
        snap = machine.show()
        moved = machine.views.writes - before
        # only a heartbeat that fell between the two looks can have moved a counter
        assert moved <= len(snap["instances"])
        machine.show()
        machine.show()
        assert machine.views.writes - before - moved <= 2
    finally:
        machine._filters_due = due
    path = os.path.join(machine.run_dir, "sys", "fs", "multikernel", "instances", "quiet",
                        "counters")
    said = dict(line.split() for line in _read(path).splitlines())
    assert said["boots"] == "1"


def test_the_brief_look_is_the_table_and_agrees_with_the_whole_one(machine):
    cpu = CPUS[-1]
    _boot(machine, "one", cpu)
    machine.create("two", cpus=[cpu], memory="1M")          # shares "one"'s CPU, not loaded
    machine.create("three", cpus=[CPUS[0]], memory="1M")
    whole, brief = machine.show(), machine.show(brief=True)
    assert brief["machine"] == whole["machine"] and brief["pool"] == whole["pool"]
    assert [i["name"] for i in brief["instances"]] == [i["name"] for i in whole["instances"]]
    for b, w in zip(brief["instances"], whole["instances"]):
        assert b == {k: w[k] for k in b}       # the same values, fewer fields
        assert "counters" not in b and "metrics" not in b
    by = {i["name"]: i for i in brief["instances"]}
    assert by["one"]["shared_cpus"] == [cpu] == by["two"]["shared_cpus"]
    three_shared = [cpu for cpu in [CPUS[0]] if cpu in machine.config.host_cpus]
    assert by["three"]["shared_cpus"] == three_shared
    from partition.control.show import render_show
    assert render_show(brief) == render_show(whole)


def test_a_brief_that_is_not_a_boolean_is_refused(machine):
    import pytest

    from partition.errors import InvalidSpec
    for bad in ("yes", 1, None, float("nan")):
        with pytest.raises(InvalidSpec, match="brief must be true or false"):
            machine.show(brief=bad)


def test_the_sweep_backs_off_while_nothing_moves_and_comes_back_when_something_does(machine):
    from partition.abi import message as M
    from partition.host.machine import SWEEP_IDLE_MAX_S, SWEEP_PERIOD_S
    _boot(machine, "still", CPUS[-1])                        # tickless: nothing moves
    wait_until(machine, lambda: machine._sweep_period == SWEEP_IDLE_MAX_S, timeout=10)
    machine.send("still", M.MK_MSG_USER, "move")             # its loop laps: progress moves
    wait_until(machine, lambda: machine._sweep_period == SWEEP_PERIOD_S, timeout=5)
