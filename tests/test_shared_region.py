"""The machine's shared regions (host/shared.py), DAXFS-like: a file a program in one instance
writes through mmap is read intact by a program in another, and after the writer's kernel
panics; the region goes with the machine; bad input is refused with nothing left behind.
Real supervisors, real instances, real userlands."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from partition.errors import MountNameEscapes
from partition.guest import userland

pytestmark = pytest.mark.system   # runs real processes (supervisors, instances, userlands)

HERE = os.path.dirname(os.path.abspath(__file__))
PICKY = os.path.join(HERE, "kernels", "picky.py")
MKCTL = [sys.executable, "-m", "partition.control.cli"]
CPUS = sorted(os.sched_getaffinity(0))
PYTHON = os.path.realpath(sys.executable)
HOST_CPUS = ",".join(map(str, CPUS[:-1])) or "none"

#: 1 MiB of records written through a shared mapping, each 4 KiB page stamped with its number
#: and a CRC of its body; prints the file's SHA-256
WRITER = textwrap.dedent("""
    import hashlib, mmap, os, struct, zlib
    path = '/mnt/shared/db/log'
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    os.ftruncate(fd, 1 << 20)
    m = mmap.mmap(fd, 1 << 20, mmap.MAP_SHARED)
    for page in range(256):
        body = bytes((page + i) & 0xff for i in range(4088))
        m[page * 4096:(page + 1) * 4096] = struct.pack('<II', page, zlib.crc32(body)) + body
    m.flush()
    print(hashlib.sha256(m).hexdigest())
""")
#: checks every page's stamp through its own mapping; prints the file's SHA-256
READER = textwrap.dedent("""
    import hashlib, mmap, os, struct, zlib
    fd = os.open('/mnt/shared/db/log', os.O_RDONLY)
    m = mmap.mmap(fd, 0, mmap.MAP_SHARED, mmap.PROT_READ)
    for page in range(256):
        n, crc = struct.unpack_from('<II', m, page * 4096)
        assert (n, crc) == (page, zlib.crc32(m[page * 4096 + 8:(page + 1) * 4096])), page
    print(hashlib.sha256(m).hexdigest())
""")


def mk(run_dir, *args):
    return subprocess.run(MKCTL + [args[0], "--run-dir", run_dir, *args[1:]],
                          capture_output=True, text=True, timeout=60)


def mounted(path: str) -> bool:
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == path for line in f)


@pytest.fixture
def two_instances(run_dir):
    """A machine with an 8 MiB region ``db`` and two running instances naming it."""
    for args in (("init", "--cpus", str(CPUS[-1]), "--memory", "64M", "--host-cpus", HOST_CPUS,
                  "--oversubscribe", "--shared", "db:8M", "--shared", "scratch:4M"),
                 ("create", "a", "--cpus", str(CPUS[-1]), "--memory", "8M", "--shared", "db"),
                 ("create", "b", "--cpus", str(CPUS[-1]), "--memory", "8M", "--shared", "db"),
                 ("load", "a", "--kernel", PICKY), ("load", "b", "--kernel", PICKY),
                 ("start", "a"), ("start", "b")):
        r = mk(run_dir, *args)
        assert r.returncode == 0, r.stderr
    return run_dir


def test_a_file_written_through_mmap_outlives_its_writers_panic(two_instances):
    run_dir = two_instances
    region = os.path.join(run_dir, "shared", "db")
    assert mounted(region)
    w = mk(run_dir, "exec", "a", "--", PYTHON, "-c", WRITER)
    assert w.returncode == 0, w.stderr
    written = w.stdout.strip()
    r = mk(run_dir, "exec", "b", "--", PYTHON, "-c", READER)
    assert (r.returncode, r.stdout.strip()) == (0, written), r.stderr
    # the data is the machine's: the same bytes on the host's side of the mount
    assert os.path.getsize(os.path.join(region, "log")) == 1 << 20
    assert mk(run_dir, "fault", "a", "panic").returncode == 0
    r = mk(run_dir, "exec", "b", "--", PYTHON, "-c", READER)
    assert (r.returncode, r.stdout.strip()) == (0, written), r.stderr
    # the region is a directory of its own, writable; the /mnt around it is not, the region
    # it does not name is not there, and its host path (in the run directory) is covered
    r = mk(run_dir, "exec", "b", "--", "/bin/sh", "-c",
           "echo x > /mnt/shared/db/b.txt && ! touch /mnt/other 2>/dev/null && "
           f"! test -e {region}/log && ls /mnt/shared/db/../")
    assert (r.returncode, r.stdout.split()) == (0, ["db"]), r.stderr
    assert os.path.exists(os.path.join(region, "b.txt"))


def test_the_region_is_shown_and_goes_with_the_machine(two_instances):
    run_dir = two_instances
    snap = json.loads(mk(run_dir, "show", "--format", "json").stdout)
    regions = {r["name"]: r for r in snap["machine"]["shared"]}
    assert (regions["db"]["size"], regions["scratch"]["size"]) == (8 << 20, 4 << 20)
    assert {i["name"]: i.get("shared") for i in snap["instances"]} == {"a": ["db"], "b": ["db"]}
    with open(os.path.join(run_dir, "proc", "iomem")) as f:
        iomem = f.read()
    db = regions["db"]["base"]
    assert f"{db:08x}-{db + (8 << 20) - 1:08x} : daxfs (db)\n" in iomem
    assert "daxfs (scratch)" in iomem
    assert "SHARED  db 8M" in mk(run_dir, "show").stdout
    region = os.path.join(run_dir, "shared", "db")
    with open("/proc/self/mountinfo") as f:
        opts = next(line for line in f if line.split()[4] == region)
    assert "tmpfs" in opts and "size=8192k" in opts
    assert mk(run_dir, "shutdown").returncode == 0
    assert not mounted(region) and not os.path.exists(run_dir)


def test_bad_input_is_refused_with_nothing_left(run_dir):
    base = ("init", "--cpus", str(CPUS[-1]), "--memory", "16M", "--host-cpus", HOST_CPUS,
            "--oversubscribe")
    for shared, code in (("big:32M", "ENOSPC"), ("../up:4M", "EINVAL"), ("a/b:4M", "EINVAL"),
                         ("nosize", "EINVAL"), ("odd:4097", "EINVAL")):
        r = mk(run_dir, *base, "--shared", shared)
        assert r.returncode != 0 and code in r.stderr, (shared, r.stderr)
        assert not os.path.exists(run_dir)
    r = mk(run_dir, *base, "--shared", "db:4M")
    assert r.returncode == 0, r.stderr
    r = mk(run_dir, "create", "a", "--cpus", str(CPUS[-1]), "--memory", "4M", "--shared", "nope")
    assert r.returncode != 0 and "no shared region 'nope'" in r.stderr and "ENOENT" in r.stderr
    assert json.loads(mk(run_dir, "show", "--format", "json").stdout)["instances"] == []


def test_the_launcher_refuses_a_mount_name_that_escapes(tmp_path):
    for name in ("../etc", "a/b", "..", ""):
        identity = userland.Identity(name="u", cpus=[CPUS[-1]], cgroup_procs=[],
                                     shared={name: str(tmp_path)})
        with pytest.raises(MountNameEscapes):
            userland.start(identity, ["/bin/true"])


def test_the_launcher_binds_a_region_read_write(tmp_path):
    identity = userland.Identity(name="u", cpus=[CPUS[-1]], cgroup_procs=[],
                                 shared={"r": str(tmp_path)})
    started = userland.start(identity, ["/bin/sh", "-c", "echo hi > /mnt/shared/r/f"])
    assert started.wait() == 0, started.reason
    assert (tmp_path / "f").read_text() == "hi\n"


def test_a_machine_in_process_unmounts_its_regions_on_close():
    from partition.errors import NoSuchSharedRegion, SharedRegionTooLarge
    from partition.host.machine import Machine
    run = f"/dev/shm/mkt-shared-{os.getpid()}"
    with pytest.raises(SharedRegionTooLarge):
        Machine(cpus=[CPUS[-1]], memory="16M", host_cpus=HOST_CPUS, oversubscribe=True,
                run_dir=run, shared={"db": "32M"})
    assert not os.path.exists(run)
    with Machine(cpus=[CPUS[-1]], memory="16M", host_cpus=HOST_CPUS, oversubscribe=True,
                 run_dir=run, shared={"db": "4M"}) as m:
        region = os.path.join(run, "shared", "db")
        assert mounted(region)
        with pytest.raises(NoSuchSharedRegion):
            m.create("a", "4M", cpus=[CPUS[-1]], shared=["db", "other"])
        assert m.show()["instances"] == []
        assert m.create("a", "4M", cpus=[CPUS[-1]], shared=["db"])["shared"] == ["db"]
    assert not mounted(region) and not os.path.exists(run)


def test_a_dead_hosts_region_is_unmounted_by_shutdown(run_dir):
    import signal
    import time
    r = mk(run_dir, "init", "--cpus", str(CPUS[-1]), "--memory", "16M", "--host-cpus", HOST_CPUS,
           "--oversubscribe", "--shared", "db:4M")
    assert r.returncode == 0, r.stderr
    region = os.path.join(run_dir, "shared", "db")
    host = json.loads(mk(run_dir, "show", "--format", "json").stdout)["machine"]["supervisor_pid"]
    os.kill(host, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while os.path.exists(f"/proc/{host}") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert mounted(region)                 # a host's death unmounts nothing
    assert mk(run_dir, "shutdown").returncode == 0
    assert not mounted(region) and not os.path.exists(run_dir)


def test_a_scenario_declares_regions_and_names_them():
    from partition.scenario import schema
    doc = {"scenario": {"name": "s"}, "machine": {"shared": {"db": "4M"}},
           "instance": [{"name": "a", "kernel": "kernels.idle:IdleKernel", "shared": ["db"]}]}
    sc = schema.check(doc, "t.toml")
    assert sc.machine["shared"] == {"db": "4M"} and sc.instances[0]["shared"] == ["db"]
    with pytest.raises(schema.ScenarioInvalid) as ei:
        schema.check({**doc, "machine": {"shared": ["db:4M"]}}, "t.toml")
    assert any("'shared'" in p for p in ei.value.problems)


def test_a_baseline_device_tree_declares_a_region(run_dir, tmp_path):
    from partition import linux
    apic = linux.physical_cpu_ids()[CPUS[-1]]
    base = tmp_path / "pool.dts"
    base.write_text(f"/dts-v1/;\n/ {{\n\tresources {{\n\t\tcpus = /bits/ 64 <{apic}>;\n"
                    "\t\tmemory@0 { size = /bits/ 64 <0x1000000>; numa-node-id = <0>; };\n"
                    "\t\tdaxfs@db { size = /bits/ 64 <0x400000>; };\n\t};\n};\n")
    r = mk(run_dir, "init", "--input", str(base), "--host-cpus", HOST_CPUS, "--oversubscribe")
    assert r.returncode == 0, r.stderr
    snap = json.loads(mk(run_dir, "show", "--format", "json").stdout)
    assert [(s["name"], s["size"]) for s in snap["machine"]["shared"]] == [("db", 4 << 20)]
    assert mounted(os.path.join(run_dir, "shared", "db"))


#: appends checksummed 4 KiB records through a shared mapping, one every 2 ms, until killed
APPENDER = textwrap.dedent("""
    import mmap, os, struct, time, zlib
    fd = os.open('/mnt/shared/db/journal', os.O_RDWR | os.O_CREAT, 0o644)
    os.ftruncate(fd, 4 << 20)
    m = mmap.mmap(fd, 4 << 20, mmap.MAP_SHARED)
    for n in range(1024):
        body = bytes((n * 7 + i) & 0xff for i in range(4084))
        m[n * 4096:(n + 1) * 4096] = struct.pack('<III', 0x4D4B4A52, n, zlib.crc32(body)) + body
        time.sleep(0.002)
    time.sleep(600)
""")
#: the frontier: records before it intact, at most one torn page, nothing written after it
CHECKER = textwrap.dedent("""
    import mmap, os, struct, zlib
    fd = os.open('/mnt/shared/db/journal', os.O_RDONLY)
    m = mmap.mmap(fd, 0, mmap.MAP_SHARED, mmap.PROT_READ)
    good = torn = 0
    pages = len(m) // 4096
    while good < pages:
        magic, n, crc = struct.unpack_from('<III', m, good * 4096)
        if (magic, n) != (0x4D4B4A52, good) or zlib.crc32(m[good * 4096 + 12:(good + 1) * 4096]) != crc:
            break
        good += 1
    rest = good
    if rest < pages and any(m[rest * 4096:(rest + 1) * 4096]):
        torn, rest = 1, rest + 1
    bad = sum(1 for p in range(rest, pages) if any(m[p * 4096:(p + 1) * 4096]))
    print(good, torn, bad)
""")


def test_records_appended_until_a_panic_leave_a_clean_frontier(two_instances):
    """The real project's crash-consistency check, once: a program appends records through
    mmap, its kernel panics under it, a program of another instance finds a clean frontier."""
    import time
    run_dir = two_instances
    journal = os.path.join(run_dir, "shared", "db", "journal")
    writer = subprocess.Popen(MKCTL + ["exec", "--run-dir", run_dir, "a", "--", PYTHON, "-c",
                                       APPENDER], stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30

        def stamped(n: int) -> bool:
            try:
                with open(journal, "rb") as f:
                    f.seek(n * 4096 + 4)
                    return f.read(4) == n.to_bytes(4, "little")
            except OSError:
                return False
        while not stamped(50):
            assert time.monotonic() < deadline and writer.poll() is None, writer.stderr
            time.sleep(0.01)
        assert mk(run_dir, "fault", "a", "panic").returncode == 0
        assert writer.wait(timeout=30) == 137                 # killed with its kernel
    finally:
        if writer.poll() is None:
            writer.kill()
        writer.wait()
    r = mk(run_dir, "exec", "b", "--", PYTHON, "-c", CHECKER)
    assert r.returncode == 0, r.stderr
    good, torn, bad = map(int, r.stdout.split())
    assert 50 <= good < 1024 and torn <= 1 and bad == 0, (good, torn, bad)
