"""The real kerf (kerf-multikernel 0.4.0, unmodified) drives the emulator through ``mkctl kerf``.

Each step runs kerf's own command line, checks its exit code and words, and then checks that the
machine (``mkctl show --format json``) and the trees the host serves agree with what kerf did,
reading the trees with pylibfdt and with kerf's own parser.
"""

import json
import os
import signal
import struct
import subprocess
import sys
import time

import pytest

from partition import linux

HERE = os.path.dirname(os.path.abspath(__file__))
PICKY = os.path.join(HERE, "kernels", "picky.py")
MKCTL = [sys.executable, "-m", "partition.control.cli"]
CPUS = sorted(os.sched_getaffinity(0))
PHYS = linux.physical_cpu_ids()

kerf = pytest.importorskip("kerf", reason="kerf-multikernel is a test dependency")
libfdt = pytest.importorskip("libfdt")
from kerf.dtc.parser import DeviceTreeParser  # noqa: E402


def _bridge_works() -> str | None:
    if os.geteuid() != 0:
        return "the bridge needs root (mount namespace, FUSE, seccomp listener)"
    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse"
    return None


pytestmark = [pytest.mark.system,
              pytest.mark.skipif(_bridge_works() is not None, reason=str(_bridge_works()))]


def run_kerf(run_dir, *args, oversubscribe=False):
    cmd = MKCTL + ["kerf", "--run-dir", run_dir] + (["--oversubscribe"] if oversubscribe else [])
    return subprocess.run(cmd + ["--", *args], capture_output=True, text=True, timeout=120)


def ok(run_dir, *args, **kw):
    r = run_kerf(run_dir, *args, **kw)
    assert r.returncode == 0, f"kerf {' '.join(args)}: rc {r.returncode}\n{r.stdout}\n{r.stderr}"
    return r.stdout


def refused(run_dir, words, *args, rc=1):
    r = run_kerf(run_dir, *args)
    assert r.returncode == rc, f"kerf {' '.join(args)}: rc {r.returncode}\n{r.stdout}\n{r.stderr}"
    assert words in r.stdout + r.stderr, (words, r.stdout, r.stderr)
    return r


def show(run_dir, name=None):
    args = ["show"] + ([name] if name else []) + ["--run-dir", run_dir, "--format", "json"]
    r = subprocess.run(MKCTL + args, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def tree(run_dir, *parts):
    with open(os.path.join(run_dir, "sys", "fs", "multikernel", *parts), "rb") as f:
        return f.read()


def agree(run_dir, name):
    """The instance's tree, read with pylibfdt and with kerf's parser, says what the machine
    says it holds: id, physical CPUs, memory base and bytes."""
    inst = show(run_dir, name)
    blob = tree(run_dir, "instances", name, "device_tree")
    fdt = libfdt.Fdt(blob)
    res = fdt.path_offset("/resources")
    cells = bytes(fdt.getprop(res, "cpus"))
    assert sorted(struct.unpack(f">{len(cells) // 8}Q", cells)) == sorted(inst["physical_cpus"])
    assert fdt.getprop(res, "memory-base").as_uint64() == inst["memory_base"]
    assert fdt.getprop(res, "memory-bytes").as_uint64() == inst["memory_total"]
    parsed = DeviceTreeParser().parse_instance_dtb_from_bytes(blob)
    assert parsed.name == name and parsed.id == inst["id"]
    assert sorted(parsed.resources.cpus) == sorted(inst["physical_cpus"])
    return inst


def status(run_dir, name):
    return tree(run_dir, "instances", name, "status").decode().strip()


def test_kerf_whole_life(run_dir, tmp_path):
    """init, the refusals, create, load, start, show, update (memory grown; a shrink the kernel
    refuses rolled back), kill, kill --force, unload, delete: kerf's words, kerf's exit codes,
    and the machine agreeing after every step."""
    pool_cpu = CPUS[-1]
    apic = PHYS[pool_cpu]
    others = [PHYS[c] for c in CPUS if c != pool_cpu]
    out = ok(run_dir, "init", f"--cpus={apic}", "--memory=256MB")
    assert "Baseline applied" in out
    snap = show(run_dir)
    assert snap["pool"]["cpus"] == [pool_cpu] and snap["pool"]["memory_bytes"] == 256 << 20
    root = DeviceTreeParser().parse_dtb_from_bytes(tree(run_dir, "device_tree"))
    assert root.hardware.cpus.available == [apic] and root.hardware.cpus.available_free == [apic]
    assert [(r.base, r.size) for r in root.hardware.memory.regions] == \
        [(snap["pool"]["memory_base"], 256 << 20)]
    # kerf init on a live pool reconciles it (a /resources overlay): the same request is
    # nothing to do (growing and shrinking: test_kerf_init_on_a_live_pool_grows_and_shrinks_it)
    assert "Pool already matches the request" in ok(run_dir, "init", f"--cpus={apic}",
                                                    "--memory=256MB")
    assert show(run_dir)["pool"] == snap["pool"]

    # refusals with kerf's own exit codes, before and at the kernel
    if others:
        refused(run_dir, "Invalid APIC IDs requested", "create", "h", f"--cpus={others[0]}",
                "--memory=16MB")
    refused(run_dir, "exceeds memory pool", "create", "big", f"--cpus={apic}", "--memory=1GB")
    assert show(run_dir)["instances"] == []

    assert "Created instance 'web'" in ok(run_dir, "create", "web", f"--cpus={apic}",
                                          "--memory=64MB")
    assert status(run_dir, "web") == "ready"
    inst = agree(run_dir, "web")
    assert inst["state"] == "ready" and inst["memory_bytes"] == 64 << 20
    refused(run_dir, "are not available", "create", "other", f"--cpus={apic}", "--memory=16MB")
    refused(run_dir, "already exists", "create", "web", f"--cpus={apic}", "--memory=16MB")

    assert "Kernel loaded successfully" in ok(run_dir, "load", "web", f"--kernel={PICKY}",
                                              "--cmdline=refuse=shrink")
    assert status(run_dir, "web") == "loaded"
    assert show(run_dir, "web")["kernel_spec"] == PICKY
    refused(run_dir, "already has a kernel loaded", "load", "web", f"--kernel={PICKY}")

    assert "Boot command executed successfully" in ok(run_dir, "start", "web")
    inst = show(run_dir, "web")
    assert inst["state"] == "active" and inst["pid"]
    out = ok(run_dir, "show", "web")
    assert "Status:          active" in out and f"ID:              {inst['id']}" in out
    assert f"0x{inst['memory_base']:012x}" in out           # /proc/kimage's row, parsed by kerf

    # update: grow by a region the running kernel accepts; kerf places it from /proc/iomem
    assert "Updated instance 'web'" in ok(run_dir, "update", "web", "--memory=96MB")
    inst = agree(run_dir, "web")
    assert inst["memory_total"] == 96 << 20 and len(inst["regions"]) == 2
    iomem = open(os.path.join(run_dir, "proc", "iomem")).read()
    assert f"mk-instance-{inst['id']}-web-region-1" in iomem
    assert inst["resource_changes"]["accepted"] == 1
    # the kernel refuses to give it back: kerf fails, the machine is exactly as before
    before = show(run_dir)
    r = refused(run_dir, "Operation canceled", "update", "web", "--memory=64MB")
    assert "picky: no memory-remove" in r.stderr               # the bridge says why
    after = show(run_dir)
    assert after["instances"][0]["regions"] == before["instances"][0]["regions"]
    assert after["pool"] == before["pool"]
    assert [t["status"] for t in after["overlays"]][-1] == "failed"
    assert open(os.path.join(run_dir, "proc", "iomem")).read() == iomem

    # kerf dump writes the DTB the host serves, byte for byte
    ok(run_dir, "dump", "web", "-o", str(tmp_path / "web.dtb"))
    assert (tmp_path / "web.dtb").read_bytes() == tree(run_dir, "instances", "web", "device_tree")

    assert "Shutdown command executed successfully" in ok(run_dir, "kill", "web")
    assert status(run_dir, "web") == "loaded" and show(run_dir, "web")["pid"] is None
    refused(run_dir, "is not running", "kill", "web")
    ok(run_dir, "start", "web")
    assert status(run_dir, "web") == "active"
    assert "(force)" in ok(run_dir, "kill", "--force", "web")
    assert status(run_dir, "web") == "loaded"
    refused(run_dir, "Instance has a kernel loaded", "delete", "web")

    assert "Kernel unloaded successfully" in ok(run_dir, "unload", "web")
    assert status(run_dir, "web") == "ready" and show(run_dir, "web")["kernel"] is None
    ok(run_dir, "update", "web", "--memory=64MB")           # not running: nobody to ask
    assert show(run_dir, "web")["memory_total"] == 64 << 20
    assert "Deleted instance 'web'" in ok(run_dir, "delete", "web")
    snap = show(run_dir)
    assert snap["instances"] == [] and snap["pool"]["memory_available"] == 256 << 20
    out = ok(run_dir, "show")
    assert "No instances found" in out and "Available CPUs:  1 cpus" in out


def _iomem(run_dir):
    return open(os.path.join(run_dir, "proc", "iomem")).read()


def test_kerf_whole_life_with_growth_ends_in_delete(run_dir):
    """The real kerf's whole life of a grown instance (issue 20, items 1 and 2): init, create,
    load, start, update --memory (grown by a region), kill, start, kill --force, unload, delete.
    Every view says what it holds after the growth (show's table, show NAME, json, top, the
    instance's tree, iomem), and delete destroys it with what it holds, as mkctl delete and
    the real instance-remove do: its added region goes back to the pool."""
    apic = PHYS[CPUS[-1]]
    ok(run_dir, "init", f"--cpus={apic}", "--memory=64MB")
    ok(run_dir, "create", "db", f"--cpus={apic}", "--memory=16MB")
    ok(run_dir, "load", "db", f"--kernel={PICKY}")
    ok(run_dir, "start", "db")
    free0 = show(run_dir)["pool"]["memory_available"]
    assert "Updated instance 'db'" in ok(run_dir, "update", "db", "--memory=32MB")
    inst = agree(run_dir, "db")               # the tree's memory-bytes is what it holds
    assert inst["memory_total"] == 32 << 20 and len(inst["regions"]) == 2
    assert show(run_dir)["pool"]["memory_available"] == free0 - (16 << 20)
    assert show(run_dir)["instances"][0]["memory_total"] == 32 << 20
    table = subprocess.run(MKCTL + ["show", "--run-dir", run_dir], capture_output=True,
                           text=True, timeout=60).stdout
    row = next(line for line in table.splitlines() if " db " in line)
    assert " 32M " in row and " 16M " not in row, table
    one = subprocess.run(MKCTL + ["show", "db", "--run-dir", run_dir], capture_output=True,
                         text=True, timeout=60).stdout
    assert "32M at" in one and "boot region 16M, 1 added" in one, one
    top = subprocess.run(MKCTL + ["top", "--once", "--run-dir", run_dir], capture_output=True,
                         text=True, timeout=60).stdout
    assert "32M" in top and "16M" not in top, top
    assert _iomem(run_dir).count(f"mk-instance-{inst['id']}-db-region-") == 2

    assert "Shutdown command executed successfully" in ok(run_dir, "kill", "db")
    ok(run_dir, "start", "db")
    assert status(run_dir, "db") == "active"
    assert "(force)" in ok(run_dir, "kill", "--force", "db")
    assert "Kernel unloaded successfully" in ok(run_dir, "unload", "db")
    assert agree(run_dir, "db")["memory_total"] == 32 << 20      # still grown when ready
    assert "Deleted instance 'db'" in ok(run_dir, "delete", "db")
    snap = show(run_dir)
    assert snap["instances"] == [] and snap["pool"]["memory_available"] == 64 << 20
    assert "mk-instance-" not in _iomem(run_dir)
    assert not os.path.exists(os.path.join(run_dir, "sys", "fs", "multikernel", "instances", "db"))
    ok(run_dir, "create", "db", f"--cpus={apic}", "--memory=64MB")   # all of it is free again


def test_kerf_init_on_a_live_pool_grows_and_shrinks_it(run_dir):
    """kerf init on a live pool writes a /resources overlay (kerf 0.4's reconcile_pool): the pool
    grows by a chunk the host places, kerf creates and grows instances in it, a chunk in use is
    not asked back (kerf reads /proc/iomem), a CPU lent to an instance is EBUSY, sizes the host
    cannot give are ENOMEM, bad sizes never reach the host, the grown pool is adopted by a new
    host as it was, and once the chunk is free kerf shrinks the pool by it."""
    apic = PHYS[CPUS[-1]]
    ok(run_dir, "init", f"--cpus={apic}", "--memory=64MB")
    first = show(run_dir)["pool"]["chunks"]
    out = ok(run_dir, "init", f"--cpus={apic}", "--memory=96MB")
    assert "Memory to pool: 32 MB on node 0" in out and "Pool updated" in out
    pool = show(run_dir)["pool"]
    assert pool["memory_bytes"] == pool["memory_available"] == 96 << 20
    (new,) = [c for c in pool["chunks"] if c not in first]
    assert new[1] == 32 << 20
    root = DeviceTreeParser().parse_dtb_from_bytes(tree(run_dir, "device_tree"))
    assert sorted((r.base, r.size) for r in root.hardware.memory.regions) == \
        sorted(map(tuple, pool["chunks"]))
    assert _iomem(run_dir).count("Multikernel Memory Pool") == 2
    table = subprocess.run(MKCTL + ["show", "--run-dir", run_dir], capture_output=True,
                           text=True, timeout=60).stdout
    assert "memory 96M in 2 chunks (free 96M)" in table, table
    events = [json.loads(line) for line in open(os.path.join(run_dir, "events.log"))]
    assert [e["op"] for e in events if e["event"] == "pool_changed"] == ["memory-add"]

    ok(run_dir, "create", "db", f"--cpus={apic}", "--memory=16MB")
    ok(run_dir, "update", "db", "--memory=48MB")          # kerf places it at the top: new chunk
    assert show(run_dir, "db")["regions"][1][0] >= new[0]
    # the chunk holds db's memory: kerf does not ask for it (a busy chunk in iomem) and says so
    r = run_kerf(run_dir, "init", f"--cpus={apic}", "--memory=64MB")
    assert r.returncode == 0 and "still holds 32 MB more than requested" in r.stderr, r
    assert show(run_dir)["pool"] == show(run_dir)["pool"] | {"chunks": pool["chunks"]}
    before = show(run_dir)
    if len(CPUS) > 1:                                      # the pool's CPU is lent to db
        r = refused(run_dir, "Device or resource busy", "init", f"--cpus={PHYS[CPUS[0]]}",
                    "--memory=96MB")
        assert f"APIC ID {apic} is lent to 'db'" in r.stderr
    r = refused(run_dir, "Cannot allocate memory", "init", f"--cpus={apic}",
                "--memory=1000000GB")
    assert "left to give the pool" in r.stderr
    for bad in ("nanMB", "1000001KB", "-64MB"):             # kerf's own checks stop these
        assert run_kerf(run_dir, "init", f"--cpus={apic}", f"--memory={bad}").returncode != 0
    after = show(run_dir)
    assert after["pool"] == before["pool"] and after["instances"][0]["regions"] == \
        before["instances"][0]["regions"]

    # a new host adopts the grown pool as it was (the state file records its chunks)
    os.kill(after["machine"]["supervisor_pid"], signal.SIGKILL)
    _until(lambda: subprocess.run(MKCTL + ["adopt", "--run-dir", run_dir], capture_output=True,
                                  timeout=60).returncode == 0, timeout=20)
    assert show(run_dir)["pool"]["chunks"] == pool["chunks"]
    assert show(run_dir, "db")["regions"] == after["instances"][0]["regions"]

    ok(run_dir, "delete", "db")
    out = ok(run_dir, "init", f"--cpus={apic}", "--memory=64MB")
    assert f"Memory to host: {hex(new[0])} (32 MB)" in out
    pool = show(run_dir)["pool"]
    assert pool["chunks"] == first and pool["memory_available"] == 64 << 20
    assert _iomem(run_dir).count("Multikernel Memory Pool") == 1

    # kerf init --cpus none --memory none returns the whole pool (its CPUs leave first, so
    # the last chunk may go); kerf init fills it again, by overlay
    out = ok(run_dir, "init", "--cpus=none", "--memory=none")
    assert "CPUs to host" in out and "Memory to host" in out
    pool = show(run_dir)["pool"]
    assert (pool["cpus"], pool["chunks"], pool["memory_bytes"]) == ([], [], 0)
    assert "Multikernel Memory Pool" not in _iomem(run_dir)
    assert "Pool updated" in ok(run_dir, "init", f"--cpus={apic}", "--memory=32MB")
    pool = show(run_dir)["pool"]
    assert pool["cpus"] == [CPUS[-1]] and pool["memory_bytes"] == 32 << 20
    ok(run_dir, "create", "again", f"--cpus={apic}", "--memory=32MB")


def _baseline(tmp_path, cpus=None, memory=256 << 20):
    """A baseline as kerf makes it (its own generator), for kerf init --input."""
    from kerf.dtc.extractor import InstanceExtractor
    from kerf.models import (CPUAllocation, GlobalDeviceTree, HardwareInventory,
                             MemoryAllocation)
    cpus = cpus or [PHYS[c] for c in CPUS]
    t = GlobalDeviceTree(
        hardware=HardwareInventory(
            cpus=CPUAllocation(total=max(cpus) + 1, host_reserved=[], available=cpus),
            memory=MemoryAllocation(total_bytes=memory, host_reserved_bytes=0,
                                    requested={0: memory}),
            devices={}),
        instances={}, device_references={})
    path = tmp_path / "pool.dtb"
    path.write_bytes(InstanceExtractor().generate_global_dtb(t))
    return path


def _allowed(pid):
    with open(f"/proc/{pid}/status") as f:
        line = next(x for x in f if x.startswith("Cpus_allowed_list"))
    return linux_cpulist(line.split(":")[1].strip())


def linux_cpulist(text):
    out = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        out += range(int(lo), int(hi or lo) + 1)
    return out


@pytest.mark.skipif(len(CPUS) < 2, reason="a CPU change needs two CPUs in the pool")
def test_kerf_update_cpus_of_a_running_instance(run_dir, tmp_path):
    """A pool replayed from a kerf-made DTB (init --input) holding two CPUs; kerf update moves a
    running instance from one to both and then to the other: the kernel is asked (CPU_ADD,
    CPU_REMOVE), its process's affinity follows, and a CPU change it refuses is rolled back."""
    first, second = CPUS[0], CPUS[1]
    ok(run_dir, "init", "--input", str(_baseline(tmp_path, [PHYS[first], PHYS[second]])),
       oversubscribe=True)
    ok(run_dir, "create", "web", f"--cpus={PHYS[second]}", "--memory=32MB")
    ok(run_dir, "load", "web", f"--kernel={PICKY}")
    ok(run_dir, "start", "web")
    ok(run_dir, "update", "web", f"--cpus={PHYS[first]},{PHYS[second]}")
    inst = agree(run_dir, "web")
    assert sorted(inst["cpus"]) == [first, second]
    _until(lambda: _allowed(inst["pid"]) == [first, second])
    ok(run_dir, "update", "web", f"--cpus={PHYS[first]}")
    inst = agree(run_dir, "web")
    assert inst["cpus"] == [first]
    _until(lambda: _allowed(inst["pid"]) == [first])
    assert inst["resource_changes"]["accepted"] == 2
    console = subprocess.run(MKCTL + ["console", "web", "--run-dir", run_dir],
                             capture_output=True, text=True, timeout=60).stdout
    assert f"accepted cpu-add [{PHYS[first]}]" in console
    assert f"accepted cpu-remove [{PHYS[second]}]" in console

    # a kernel that refuses CPU changes: kerf fails, nothing moved
    ok(run_dir, "kill", "--force", "web")
    ok(run_dir, "unload", "web")
    ok(run_dir, "load", "web", f"--kernel={PICKY}", "--cmdline=refuse=cpu")
    ok(run_dir, "start", "web")
    before = show(run_dir)
    refused(run_dir, "Operation canceled", "update", "web", f"--cpus={PHYS[second]}")
    after = show(run_dir)
    assert after["instances"][0]["cpus"] == before["instances"][0]["cpus"] == [first]
    assert after["pool"]["cpus_available"] == before["pool"]["cpus_available"]
    _until(lambda: _allowed(after["instances"][0]["pid"]) == [first])
    ok(run_dir, "kill", "--force", "web")


def test_kerf_refuses_what_the_emulator_cannot_do(run_dir, tmp_path):
    """An image that is not a Python kernel, an initrd, devices: clear refusals, exit 1."""
    ok(run_dir, "init", f"--cpus={PHYS[CPUS[-1]]}", "--memory=64MB")
    ok(run_dir, "create", "a", f"--cpus={PHYS[CPUS[-1]]}", "--memory=16MB")
    elf = tmp_path / "vmlinux"
    elf.write_bytes(b"\x7fELF" + bytes(60))
    r = refused(run_dir, "kexec_file_load failed", "load", "a", f"--kernel={elf}")
    assert "Exec format error" in r.stderr
    initrd = tmp_path / "initrd.img"
    initrd.write_bytes(b"070701" + bytes(100))
    r = refused(run_dir, "kexec_file_load failed", "load", "a", f"--kernel={PICKY}",
                f"--initrd={initrd}")
    assert "initrd" in r.stderr
    assert show(run_dir, "a")["state"] == "ready"


def _until(cond, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


def test_kerf_load_takes_a_file_and_its_class(run_dir, tmp_path):
    """``kerf load --kernel=kv.py:Class``, as ``mkctl load`` takes it: kerf opens kv.py and the
    instance gets that class (a file of two kernels needs its class named: mkctl's own hint)."""
    ok(run_dir, "init", f"--cpus={PHYS[CPUS[-1]]}", "--memory=64MB")
    ok(run_dir, "create", "a", f"--cpus={PHYS[CPUS[-1]]}", "--memory=16MB")
    two = tmp_path / "kv.py"
    two.write_text("from partition import Kernel\n\n\nclass KVService(Kernel):\n    pass\n\n\n"
                   "class KVClient(Kernel):\n    pass\n")
    r = refused(run_dir, "kexec_file_load failed", "load", "a", f"--kernel={two}")
    assert f"name one: {two}:KVService" in r.stderr                  # mkctl's hint
    for args, cls in (([f"--kernel={two}:KVClient"], "KVClient"),
                      (["-k", f"{two}:KVService"], "KVService")):
        ok(run_dir, "load", "a", *args)
        assert show(run_dir, "a")["kernel"].endswith(f":{cls}"), show(run_dir, "a")
        ok(run_dir, "unload", "a")
    refused(run_dir, "does not exist", "load", "a", f"--kernel={tmp_path}/none.py:K", rc=3)
    assert show(run_dir, "a")["state"] == "ready"
