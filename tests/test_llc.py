"""``llc-way-mask``: the real device-tree property for an instance's last-level-cache ways.

The rules (a non-zero subset of the baseline's mask that no other instance holds) are checked in
the trees the host reads (baseline, instance-create overlay, an instance dump), through
``Machine.create`` and ``mkctl``; every refusal leaves the machine as it was. The mask is shown
in every view (show, JSON, the instance and pool trees). Enforcement goes through resctrl: this
VM has none, so that path runs against a directory tree of resctrl's shape given as the root
(``resctrl_root``), and the views say plainly when nothing enforces the mask.
"""

import errno
import json
import os
import signal
import subprocess
import sys

import libfdt
import pytest
from helpers import dtb
from kerf.dtc.parser import DeviceTreeParser

from partition.errors import InvalidSpec, MKError, ResourceBusy
from partition.host import adoption, rundir
from partition.host import devicetree as dt
from partition.host.devicetree import to_dts

MB = 1 << 20
CPUS = sorted(os.sched_getaffinity(0))
MKCTL = [sys.executable, "-m", "partition.control.cli"]


def _u32(v):
    return v.to_bytes(4, "big")


def _u64(v):
    return v.to_bytes(8, "big")


def _baseline(**res):
    return dtb({"compatible": dt.HOST_COMPATIBLE, "resources": {
        "cpus": _u64(1), "memory@0": {"size": _u64(64 * MB)}, **res}})


def _create_overlay(name="web", mask: bytes | None = None, cpus=(1,)):
    res = {"cpus": b"".join(_u64(c) for c in cpus), "memory-bytes": _u64(8 * MB)}
    if mask is not None:
        res["llc-way-mask"] = mask
    return dtb({"compatible": dt.OVERLAY_COMPATIBLE, "fragment@0": {
        "target-path": "/instances",
        "__overlay__": {"instance-create": {"instance-name": name, "resources": res}}}})


@pytest.fixture
def resctrl(tmp_path):
    """A directory tree of resctrl's shape: two L3 domains with code/data prioritisation, an
    MB line the host must leave alone, a 16-way cache."""
    root = tmp_path / "resctrl"
    (root / "info" / "L3").mkdir(parents=True)
    (root / "schemata").write_text("L3CODE:0=ffff;1=ffff\nL3DATA:0=ffff;1=ffff\nMB:0=100;1=100\n")
    (root / "info" / "L3" / "cbm_mask").write_text("ffff\n")
    return root


def _machine(factory, **kw):
    return factory(cpus=CPUS, memory="64M", host_cpus=[CPUS[0]], oversubscribe=True, **kw)


# -- the trees -----------------------------------------------------------------------------------
def test_a_baseline_and_an_instance_create_carry_the_mask():
    assert dt.parse_baseline(_baseline(**{"llc-way-mask": _u32(0xFFFF)})).llc_way_mask == 0xFFFF
    assert dt.parse_baseline(_baseline()).llc_way_mask is None
    op = dt.parse_overlay(_create_overlay(mask=_u32(0x0F))).operations[0]
    assert isinstance(op, dt.CreateOp) and op.llc_way_mask == 0x0F
    wide = dt.parse_overlay(_create_overlay(mask=_u64(1 << 40))).operations[0]
    assert isinstance(wide, dt.CreateOp) and wide.llc_way_mask == 1 << 40


@pytest.mark.parametrize("value, words", [
    (_u32(0), "Invalid llc-way-mask 0"),
    (b"\x0f", "'llc-way-mask' must be one u32 cell"),
    (_u32(1) * 3, "'llc-way-mask' must be one u32 cell"),
])
def test_a_bad_mask_in_a_tree_is_refused_naming_it(value, words):
    for parse, blob in ((dt.parse_overlay, _create_overlay(mask=value)),
                        (dt.parse_baseline, _baseline(**{"llc-way-mask": value}))):
        with pytest.raises(InvalidSpec, match=words) as e:
            parse(blob)
        assert e.value.errno == errno.EINVAL


def test_the_trees_the_host_serves_show_the_mask_and_kerf_still_reads_them():
    blob = dt.instance_tree("web", 3, [1], [(0x100000, 8 * MB)], llc_way_mask=0xF0)
    res = libfdt.Fdt(blob).path_offset("/resources")
    assert libfdt.Fdt(blob).getprop(res, "llc-way-mask").as_uint32() == 0xF0
    assert "llc-way-mask = <0xf0>;" in to_dts(blob)
    parsed = DeviceTreeParser().parse_instance_dtb_from_bytes(blob)
    assert parsed.name == "web" and parsed.resources.cpus == [1]
    assert dt.parse_instance(blob).llc_way_mask == 0xF0          # create --input replays it
    pool = dt.pool_tree([1], [1], [dt.Chunk(0, 64 * MB)], llc_way_mask=0xFFFF)
    assert "llc-way-mask = <0xffff>;" in to_dts(pool)
    DeviceTreeParser().parse_dtb_from_bytes(pool)
    assert "llc-way-mask" not in to_dts(dt.instance_tree("web", 3, [1], [(0, MB)]))


# -- the rules, on a machine ---------------------------------------------------------------------
def test_the_rules_refuse_in_kerfs_errnos_and_change_nothing(machine_factory, resctrl):
    m = _machine(machine_factory, llc_way_mask=0xFF, resctrl_root=str(resctrl))
    m.create("a", "8M", cpus=[CPUS[-1]], llc_way_mask="0x0f")
    before = m.show()
    groups = sorted(os.listdir(resctrl))
    cases = [("0x100", InvalidSpec, "not a subset of the pool's 0xff"),
             ("0x18", ResourceBusy, "overlaps another instance's (a holds 0x8)"),
             (0, InvalidSpec, "Invalid llc-way-mask 0"),
             ("ways", InvalidSpec, "is not a bit mask")]
    for mask, cls, words in cases:
        with pytest.raises(cls, match=words.replace("(", r"\(").replace(")", r"\)")):
            m.create("b", "8M", cpus=[CPUS[-1]], llc_way_mask=mask)
    after = m.show()
    assert [i["name"] for i in after["instances"]] == ["a"]
    assert after["pool"] == before["pool"]
    assert sorted(os.listdir(resctrl)) == groups
    m.create("b", "8M", cpus=[CPUS[-1]], llc_way_mask=0xF0)   # the free ways are fine


def test_a_mask_without_one_in_the_pool_is_refused(machine_factory, tmp_path):
    m = _machine(machine_factory, resctrl_root=str(tmp_path / "none"))
    with pytest.raises(InvalidSpec, match="the pool has none") as e:
        m.create("a", "8M", cpus=[CPUS[-1]], llc_way_mask=1)
    assert "add llc-way-mask to the baseline" in (e.value.hint or "")
    assert m.show()["instances"] == []


def test_a_pool_mask_the_cache_does_not_have_is_refused(machine_factory, resctrl):
    with pytest.raises(InvalidSpec, match="names ways the L3 cache does not have"):
        _machine(machine_factory, llc_way_mask=0x1FFFF, resctrl_root=str(resctrl))


def test_resctrl_holds_the_instances_process_in_its_ways(machine_factory, resctrl):
    """A group per instance with its mask on every L3 domain (code and data), the process in
    its tasks from load on, the group gone with the instance; the MB line is left alone."""
    m = _machine(machine_factory, llc_way_mask=0xFF00, resctrl_root=str(resctrl))
    m.create("web", "8M", cpus=[CPUS[-1]], llc_way_mask=0x0F00)
    group = m.resctrl.group(m.show("web")["id"])
    # named after the machine key, as its arena and cgroups: one key decides what is its own
    assert os.path.basename(group) == \
        f"multikernel-{rundir.machine_key(m.run_dir)}-{m.show('web')['id']}"
    with open(os.path.join(group, "schemata")) as f:
        assert f.read() == "L3CODE:0=f00;1=f00\nL3DATA:0=f00;1=f00\n"
    m.load("web", "kernels/echo.py")
    m.start("web")
    pid = m.show("web")["pid"]
    with open(os.path.join(group, "tasks")) as f:
        assert [int(x) for x in f.read().split()] == [pid]
    snap = m.show()
    assert snap["pool"]["llc"]["enforced"] is True
    assert snap["pool"]["llc_way_mask"] == 0xFF00
    assert m.show("web")["llc_way_mask"] == "0xf00"
    m.kill("web", force=True)
    m.unload("web")
    m.delete("web")
    assert not os.path.exists(group)
    assert sorted(os.listdir(resctrl)) == ["info", "schemata"]


def test_a_group_that_cannot_be_removed_does_not_stop_a_delete(machine_factory, resctrl):
    """resctrl can refuse an rmdir (here a directory inside the group): the delete still
    completes, with an llc_group_left event, rather than stop half-done with a raw OSError
    (the instance kept, its cgroups gone, and "internal error" under the supervisor)."""
    m = _machine(machine_factory, llc_way_mask=0xFF00, resctrl_root=str(resctrl))
    m.create("web", "8M", cpus=[CPUS[-1]], llc_way_mask=0x0F00)
    group = m.resctrl.group(m.show("web")["id"])
    os.mkdir(os.path.join(group, "mon_groups"))
    assert m.delete("web")["state"] == "empty"
    assert m.show()["instances"] == []
    with open(os.path.join(m.run_dir, "events.log")) as f:
        left = [e for e in map(json.loads, f) if e["event"] == "llc_group_left"]
    assert left and left[-1]["name"] == "web" and left[-1]["error"], left
    m.create("web", "8M", cpus=[CPUS[-1]], llc_way_mask=0x0F00)   # its ways are free again


def _abandoned(machine_factory, run_dir, resctrl, names=("web",)):
    """A survivable machine with an LLC share per instance, whose host is then lost; returns
    (machine arguments, {name: (pid, group)})."""
    m = _machine(machine_factory, run_dir=run_dir, survive_host=True, llc_way_mask=0xFF00,
                 resctrl_root=str(resctrl))
    held = {}
    for n, name in enumerate(names):
        m.create(name, "8M", cpus=[CPUS[-1]], llc_way_mask=0x0100 << n)
        m.load(name, "kernels/echo.py")
        m.start(name)
        held[name] = (m.show(name)["pid"], m.resctrl.group(m.show(name)["id"]))
    return m.abandon(), held


def _reap(pid):
    try:
        os.kill(pid, signal.SIGKILL)       # (killed through its cgroup already, or not)
        os.waitpid(pid, 0)
    except (ProcessLookupError, ChildProcessError):
        pass


def test_an_abandoned_machines_groups_go_at_its_shutdown(run_dir, machine_factory, resctrl):
    """resctrl has few classes of service (num_closids, often 16): ``mkctl shutdown`` of a
    machine whose host died removes its instances' groups with their cgroups, found by the
    run directory's key as the cgroups and the arena are (a group left made a later one fail
    with ENOSPC). Another machine's group is left alone."""
    _, held = _abandoned(machine_factory, run_dir, resctrl)
    pid, group = held["web"]
    assert os.path.basename(group).startswith(f"multikernel-{rundir.machine_key(run_dir)}-")
    other = resctrl / "multikernel-elsewhere-0123456789abcdef-1"
    other.mkdir()
    try:
        r = subprocess.run(MKCTL + ["shutdown", "--run-dir", run_dir], capture_output=True,
                           text=True, timeout=60)
    finally:
        _reap(pid)
    assert r.returncode == 0, r.stderr
    assert not os.path.exists(group)
    assert sorted(os.listdir(resctrl)) == ["info", other.name, "schemata"]


def test_a_record_refused_at_adoption_leaves_no_group(run_dir, machine_factory, resctrl):
    """A new host refuses a record it cannot trust and kills that instance through its cgroup;
    its resctrl group goes too (close() removes groups of the instances it holds only)."""
    cfg, held = _abandoned(machine_factory, run_dir, resctrl, names=("web", "db"))
    state = adoption.read_state(run_dir)
    next(r for r in state["instances"] if r["name"] == "db")["cpus"] = [4095]
    adoption.write_state(run_dir, state)
    run = rundir.claim(run_dir)
    run.owned = True                     # removed when the new host closes
    try:
        new = machine_factory(run_dir=run, adopt=True, **cfg)
    finally:
        _reap(held["db"][0])
    assert [i["name"] for i in new.show()["instances"]] == ["web"]
    assert os.path.exists(held["web"][1]) and not os.path.exists(held["db"][1])


def test_without_resctrl_the_mask_is_kept_shown_and_said_unenforced(machine_factory, tmp_path):
    m = _machine(machine_factory, llc_way_mask=0xF, resctrl_root=str(tmp_path / "absent"))
    m.create("web", "8M", cpus=[CPUS[-1]], llc_way_mask=0x3)
    llc = m.show()["pool"]["llc"]
    assert llc["enforced"] is False and "not enforced" in llc["reason"]
    with open(os.path.join(m.run_dir, "events.log")) as f:
        events = [json.loads(line) for line in f]
    assert any(e["event"] == "llc_unenforced" and e["mask"] == "0xf" for e in events)
    tree = os.path.join(m.run_dir, "sys", "fs", "multikernel")
    with open(os.path.join(tree, "instances", "web", "device_tree"), "rb") as f:
        assert "llc-way-mask = <0x3>;" in to_dts(f.read())
    with open(os.path.join(tree, "device_tree"), "rb") as f:
        assert "llc-way-mask = <0xf>;" in to_dts(f.read())


def test_an_overlay_creates_with_the_mask_and_its_removal_rolls_back_with_it(machine_factory,
                                                                               resctrl):
    m = _machine(machine_factory, llc_way_mask=0xFF, resctrl_root=str(resctrl))
    apic = m.config.physical_ids[CPUS[-1]]
    m.apply_overlay(_create_overlay("web", _u32(0x30), cpus=(apic,)))
    assert m.show("web")["llc_way_mask"] == "0x30"
    with pytest.raises(MKError) as e:
        m.apply_overlay(_create_overlay("db", _u32(0x10), cpus=(apic,)))
    assert e.value.errno == errno.EBUSY and "db" not in {i["name"] for i in m.show()["instances"]}
    remove = dtb({"compatible": dt.OVERLAY_COMPATIBLE, "fragment@0": {
        "target-path": "/instances", "__overlay__": {"instance-remove": {
            "instance-name": "web"}}}})
    tx = m.apply_overlay(remove)["id"]
    assert m.show()["instances"] == []
    m.remove_overlay(tx)                       # rolled back: created again, with its ways
    assert m.show("web")["llc_way_mask"] == "0x30"


# -- mkctl ---------------------------------------------------------------------------------------
def test_mkctl_init_and_create_take_the_mask_and_show_it(run_dir):
    def mkctl(*args):
        return subprocess.run(MKCTL + [*args, "--run-dir", run_dir], capture_output=True,
                              text=True, timeout=120)
    r = mkctl("init", "--cpus", str(CPUS[-1]), "--memory", "64M", "--host-cpus", str(CPUS[0]),
              "--oversubscribe", "--llc-way-mask", "0xff")
    assert r.returncode == 0, r.stderr
    assert "LLC     ways 0xff for instances; NOT ENFORCED" in r.stdout
    r = mkctl("create", "web", "--cpus", str(CPUS[-1]), "--memory", "8M", "--llc-way-mask", "0xf")
    assert r.returncode == 0 and "llc ways 0xf" in r.stdout, r.stderr
    r = mkctl("create", "db", "--cpus", str(CPUS[-1]), "--memory", "8M", "--llc-way-mask", "0x3")
    assert r.returncode == 1 and "overlaps another instance's" in r.stderr
    assert "[EBUSY]" in r.stderr and "0xf0 are free" in r.stderr
    r = mkctl("show")
    assert "llc-way-mask: web 0xf" in r.stdout
    snap = json.loads(mkctl("show", "--format", "json").stdout)
    assert [i["llc_way_mask"] for i in snap["instances"]] == ["0xf"]
    r = mkctl("dump", "web")
    assert "llc-way-mask = <0xf>;" in r.stdout


# -- scenarios -----------------------------------------------------------------------------------
SCENARIO = """
[scenario]
name = "llc"
duration = "0.3s"

[machine]
oversubscribe = true
llc_way_mask = "0xff"

[[instance]]
name = "a"
kernel = "kernels.idle:IdleKernel"
llc_way_mask = "0x0f"

[[instance]]
name = "b"
kernel = "kernels.idle:IdleKernel"
llc_way_mask = {b}
"""


def test_a_scenario_declares_the_masks_and_a_bad_one_is_invalid_input(run_scenario):
    from partition.scenario.schema import ScenarioInvalid
    r = run_scenario(SCENARIO.format(b='"0xf0"'))
    assert r.passed
    with pytest.raises(ScenarioInvalid, match="overlaps another instance's") as e:
        run_scenario(SCENARIO.format(b='"0x18"'))
    assert e.value.errno == errno.EINVAL
    with pytest.raises(ScenarioInvalid, match="llc_way_mask.*expected an LLC way mask"):
        run_scenario(SCENARIO.format(b='"many"'))
