"""The bridge's trust boundaries (partition/bridge/), driven by a hostile program instead of kerf.

``mkctl kerf`` runs kerf in a private mount namespace, serves it /sys/fs/multikernel over FUSE
and answers its kexec_file_load, reboot and mount from the host through a seccomp trap. Here the
bridge runs tests/bridge_progs/hostile.py in kerf's place (``kerf_program`` is pointed at it:
which program runs is the only thing changed) against a live machine with one instance. The
program attacks the filesystem and the trapped calls and reports, as JSON on stdout, what each
attempt got back; the machine must come out of it as it went in, and nothing of the bridge may
stay behind in the host's mount namespace or /tmp.

One machine serves the module: it is started with ``mkctl init`` (so its supervisor is no child
of this process) and always shut down. Each bridge run is a ``python -c`` child in a session of
its own, killed as a group if it outlives its deadline.
"""

import errno
import json
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
import uuid

import libfdt
import psutil
import pytest
from helpers import CPUS, MKCTL
from kerf.dtc.extractor import InstanceExtractor
from kerf.dtc.overlay import OverlayGenerator
from kerf.dtc.parser import DeviceTreeParser
from kerf.models import (
    CPUAllocation,
    GlobalDeviceTree,
    HardwareInventory,
    Instance,
    InstanceResources,
    MemoryAllocation,
)
from kerf.pool_diff import PoolDiff

from partition.bridge.trap import SYSCALLS
from partition.control.client import Client

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
HOSTILE = os.path.join(HERE, "bridge_progs", "hostile.py")
MB = 1 << 20
NAME = "web"
GHOST_ID = 300                       # no instance has it
E = errno.errorcode                  # errno -> its name, as the program reports it

pytestmark = [
    pytest.mark.system,
    pytest.mark.skipif(not SYSCALLS, reason="no system call table for this architecture"),
    pytest.mark.skipif(os.geteuid() != 0, reason="the bridge mounts: root only"),
    pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="no /dev/fuse"),
]

#: run the bridge with kerf_program() pointed at PROG: argv is RUN_DIR PROG TIMEOUT ARGS...
BRIDGE = """
import sys
import partition.bridge.session as session
run_dir, prog, timeout, *args = sys.argv[1:]
session.kerf_program = lambda: prog
bridge = session.Bridge(run_dir)
sys.exit(bridge.run(args))
"""


# -- the blobs the program writes ---------------------------------------------------------------


def _kerf_tree(instances=None):
    hw = HardwareInventory(
        cpus=CPUAllocation(total=len(CPUS), host_reserved=[], available=[CPUS[-1]]),
        memory=MemoryAllocation(total_bytes=0, host_reserved_bytes=0, requested={0: 64 * MB}),
        topology=None, devices={})
    return GlobalDeviceTree(hardware=hw, instances=instances or {}, device_references={})


def _kerf_create(name, iid):
    inst = Instance(name=name, id=iid, resources=InstanceResources(
        cpus=[CPUS[-1]], memory_base=0, memory_bytes=4 * MB, devices=[]))
    return bytes(OverlayGenerator().generate_overlay(_kerf_tree(), _kerf_tree({name: inst})))


def corrupt_overlay() -> bytes:
    """A kerf removal overlay whose target-path FDT_PROP tag is garbled: the node walk passes,
    the property lookup fails inside libfdt (FDT_ERR_BADSTRUCTURE)."""
    blob = bytearray(OverlayGenerator().generate_removal_overlay("ghost"))
    off = struct.unpack_from(">I", blob, 8)[0]
    tag = blob.index(b"fragment@0\0", off) + len(b"fragment@0\0")
    tag += -(tag - off) % 4
    assert struct.unpack_from(">I", blob, tag)[0] == 3               # FDT_PROP
    blob[tag] ^= 0xFF
    return bytes(blob)


def corrupt_baseline() -> bytes:
    """kerf's baseline with the root node's FDT_BEGIN_NODE tag garbled."""
    blob = bytearray(InstanceExtractor().generate_global_dtb(_kerf_tree()))
    blob[struct.unpack_from(">I", blob, 8)[0]] ^= 0xFF
    return bytes(blob)


def blobs() -> dict[str, bytes]:
    noise = bytearray(random.Random(0x6D6B).randbytes(300))
    noise[0] = 0x42                                                   # never the DTB magic
    magic = struct.pack(">I", 0xD00DFEED)
    return {
        "garbage": b"this is not a device tree, it is garbage\n",
        "random": bytes(noise),
        "truncated": _kerf_create("evil", 7)[:70],
        "short": magic[:3],
        "huge header": magic + struct.pack(">I", 0x7FFFFFFF) + bytes(32),
        "tiny header": magic + struct.pack(">I", 8) + bytes(32),
        "kerf baseline": bytes(InstanceExtractor().generate_global_dtb(_kerf_tree())),
        "invalid overlay": _kerf_create("evil", 0),                  # id 0 is the host's
        # a device into the pool: refused as it is read (the emulator has none)
        "pool overlay": bytes(OverlayGenerator().generate_pool_overlay(PoolDiff(
            devices_to_pool=["0000:01:00.0"]))),
        "corrupt overlay": corrupt_overlay(),
        "corrupt baseline": corrupt_baseline(),
    }


#: what a refused whole write of each blob gets: (overlays/new, device_tree while a machine runs)
REFUSED = {
    "garbage": ("EINVAL", "EINVAL"),
    "random": ("EINVAL", "EINVAL"),
    "truncated": ("EINVAL", "EINVAL"),                 # at close: the tree never completed
    "short": ("EINVAL", "EINVAL"),
    "huge header": ("EINVAL", "EINVAL"),
    "tiny header": ("EINVAL", "EINVAL"),
    "kerf baseline": ("EINVAL", "EBUSY"),              # a baseline is no overlay; the pool is set
    "invalid overlay": ("EINVAL", "EINVAL"),
    "pool overlay": (E[errno.EOPNOTSUPP], "EINVAL"),
}
CORRUPT = ("corrupt overlay", "corrupt baseline")


# -- the machine and the runs -----------------------------------------------------------------


def mkctl(run_dir, *args, check=True):
    p = subprocess.run(MKCTL + ["--run-dir", run_dir, *args], capture_output=True, text=True,
                       timeout=60, cwd=ROOT)
    if check and p.returncode != 0:
        raise AssertionError(f"mkctl {' '.join(args)} -> {p.returncode}\n{p.stdout}\n{p.stderr}")
    return p


def bridge(run_dir, prog, cfg, phase, timeout=None, deadline=90.0, need_report=True):
    """One bridge run of the hostile program: (exit status, its report, the bridge's stderr,
    seconds). Without ``need_report``, a program that printed nothing has the report None."""
    argv = [sys.executable, "-c", BRIDGE, run_dir, prog, "" if timeout is None else str(timeout),
            cfg, phase]
    t0 = time.monotonic()
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=deadline)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"the bridge ({phase}) outlived {deadline} s\n{err[-3000:]}") from None
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    seconds = time.monotonic() - t0
    if not out and not need_report:
        return proc.returncode, None, err, seconds
    try:
        report = json.loads(out)
    except ValueError:
        raise AssertionError(f"no report from the program ({phase}, exit {proc.returncode}):\n"
                             f"stdout: {out[-2000:]}\nstderr: {err[-3000:]}") from None
    assert report["phase"] == phase
    return proc.returncode, report["report"], err, seconds


def mounts() -> set[tuple[str, str, str]]:
    with open("/proc/self/mounts") as f:
        return {tuple(line.split()[:3]) for line in f}


def scratch_dirs() -> set[str]:
    tmp = tempfile.gettempdir()
    return {os.path.join(tmp, n) for n in os.listdir(tmp) if n.startswith("mk-kerf-")}


def settled(show: dict) -> dict:
    """``show`` less what moves by itself: the event counters."""
    show = json.loads(json.dumps(show))
    show["machine"].pop("events", None)
    return show


@pytest.fixture(scope="module")
def machine():
    run_dir = f"/dev/shm/mkt-{uuid.uuid4().hex[:8]}"
    try:
        mkctl(run_dir, "init", "--cpus", str(CPUS[-1]), "--memory", "64M")
        mkctl(run_dir, "create", NAME, "--cpus", str(CPUS[-1]), "--memory", "4M")
        yield run_dir
    finally:
        if os.path.exists(run_dir):
            mkctl(run_dir, "shutdown", check=False)
        assert not os.path.exists(run_dir), "the machine's run directory outlived its shutdown"


@pytest.fixture(scope="module")
def program(tmp_path_factory):
    """The hostile program as an executable with a #! line, and its configuration file."""
    d = tmp_path_factory.mktemp("hostile")
    prog = d / "kerf"
    with open(HOSTILE) as f:
        prog.write_text(f"#!{sys.executable}\n" + f.read())
    prog.chmod(0o755)
    return d, str(prog)


@pytest.fixture(scope="module")
def attack(machine, program):
    """The three hostile runs against the machine, and the host's state around them."""
    d, prog = program
    before_show = Client(machine).call("show")
    iid = next(i["id"] for i in before_show["instances"] if i["name"] == NAME)
    cfg = d / "cfg.json"
    cfg.write_text(json.dumps({
        "blobs": {k: v.hex() for k, v in blobs().items()}, "name": NAME, "id": iid,
        "ghost_id": GHOST_ID, "syscalls": SYSCALLS, "kernel_file": prog,
        "scratch_file": str(d / "gone.py")}))
    before_mounts, before_scratch = mounts(), scratch_dirs()
    runs = {phase: bridge(machine, prog, str(cfg), phase) for phase in ("fs", "trap", "ns")}
    iomem_outside = open(os.path.join(machine, "proc", "iomem")).read()
    tree_outside = open(os.path.join(machine, "sys", "fs", "multikernel", "device_tree"),
                        "rb").read()
    return {
        "run_dir": machine, "id": iid, "runs": runs,
        "show": (before_show, Client(machine).call("show")),
        "mounts": (before_mounts, mounts()), "scratch": (before_scratch, scratch_dirs()),
        "iomem outside": iomem_outside, "tree outside": tree_outside,
    }


def report(attack, phase) -> dict:
    return attack["runs"][phase][1]


def refusal(steps: dict) -> str | None:
    """The one step of an open-write-close that failed, as its errno's name (None if all
    passed); the test fails if more than one did."""
    said = [steps["open"], *steps.get("write", []), *([steps["close"]] if "close" in steps else [])]
    failed = [s for s in said if s != "ok"]
    assert len(failed) <= 1, steps
    return failed[0] if failed else None


# -- the runs themselves ------------------------------------------------------------------------


def test_every_hostile_run_ends_and_the_bridge_passes_on_its_exit_status(attack):
    for phase, (status, _report, err, seconds) in attack["runs"].items():
        assert status == 0, (phase, err[-2000:])
        assert seconds < 60, (phase, seconds)
        assert "Traceback" not in err, (phase, err[-3000:])


# -- the filesystem -----------------------------------------------------------------------------


@pytest.mark.parametrize("what", sorted(REFUSED))
def test_a_hostile_tree_written_to_the_write_side_is_refused(attack, what):
    r = report(attack, "fs")
    want_new, want_tree = REFUSED[what]
    assert refusal(r["overlays/new"][what]) == want_new, r["overlays/new"][what]
    assert refusal(r["device_tree"][what]) == want_tree, r["device_tree"][what]


def test_how_a_refusal_reaches_the_writer(attack):
    r = report(attack, "fs")
    new = r["overlays/new"]
    assert new["garbage"] == {"open": "ok", "write": ["EINVAL"], "close": "ok"}     # bad magic
    assert new["truncated"] == {"open": "ok", "write": ["ok"], "close": "EINVAL"}   # incomplete
    assert new["truncated in pieces"] == {"open": "ok", "write": ["ok"] * 3, "close": "EINVAL"}
    assert r["device_tree"]["kerf baseline"] == {"open": "ok", "write": ["EBUSY"], "close": "ok"}
    assert r["second write"] == ["EINVAL", "EBUSY"]      # a refused descriptor stays refused
    assert r["pwrite at 100"] == "EINVAL"                # a tree is written from offset 0


def test_the_host_says_why_on_the_bridges_stderr(attack):
    err = attack["runs"]["fs"][2]
    assert "mkctl kerf: the host refused: the baseline device tree was written already" in err
    assert "Instance ID must be in range 1-511, got 0 [EINVAL]" in err
    assert "no devices to move into or out of the pool" in err


def test_nothing_but_the_two_write_sides_can_be_changed(attack):
    r = report(attack, "fs")
    assert r["read overlays/new"] == "EACCES"
    for f in ("write status", "write id", "write instance device_tree"):
        assert r[f] == {"open": "EACCES"}, f
    assert r["create file"] == r["create in root"] == r["mknod"] == "EACCES"
    assert r["mkdir instance"] == r["mkdir overlay"] == "EPERM"
    assert r["rmdir tx_999"] == "ENOENT"
    assert r["rmdir instances"] == r["rmdir instance"] == "EPERM"
    assert r["unlink status"] == r["unlink device_tree"] == "EPERM"
    assert r["rename"] != "ok" and r["symlink"] != "ok"
    assert r["mode after chmod"] == "0o644"              # a chmod is taken, and changes nothing
    assert r["listing"] == ["device_tree", "instances", "overlays"]
    assert r["instances"] == [NAME]
    assert r["overlays"] == ["new"]                      # no transaction was ever made
    assert r["status"] == "ready"


@pytest.mark.parametrize("what", CORRUPT)
def test_a_structurally_corrupt_tree_is_refused_with_einval(attack, what):
    r = report(attack, "fs")
    assert refusal(r["overlays/new"][what]) == "EINVAL", r["overlays/new"][what]
    assert refusal(r["device_tree"][what]) in ("EINVAL", "EBUSY"), r["device_tree"][what]


def test_a_structurally_corrupt_tree_is_still_refused(attack):
    """Whatever the errno, a corrupt tree never goes through."""
    r = report(attack, "fs")
    for what in CORRUPT:
        assert refusal(r["overlays/new"][what]) not in (None, "EBUSY"), what
        assert refusal(r["device_tree"][what]) is not None, what


# -- the trapped calls --------------------------------------------------------------------------


def test_reboot_is_answered_by_the_host_and_never_reaches_the_kernel(attack):
    r = report(attack, "trap")
    assert r["reboot unknown cmd"] == "EPERM"            # the real kernel would say EINVAL
    assert r["reboot unknown cmd from a child"] == "EPERM"
    assert r["reboot bad magic"] == r["reboot bad magic2"] == "EINVAL"
    assert r["reboot start bogus pointer"] == "EFAULT"
    assert r["reboot start null pointer"] == "EFAULT"
    assert r["reboot start no instance"] == "ESRCH"
    assert r["reboot halt id 0"] == "EINVAL"             # id 0 is the host


def test_kexec_file_load_is_answered_by_the_host(attack):
    r = report(attack, "trap")
    notsup = E[errno.EOPNOTSUPP]
    assert r["kexec no MK flag"] == r["kexec no MK flag, no initramfs"] == "EPERM"
    assert r["kexec no such instance"] == "ESRCH"
    assert r["kexec no such instance from a thread"] == "ESRCH"
    assert r["kexec unload no such instance"] == "ESRCH"
    assert r["kexec id 0"] == "EINVAL"
    assert r["kexec initrd"] == notsup
    for how in ("memfd", "memfd from a thread", "memfd from a child", "cmdline, memfd",
                "deleted file", "directory", "pipe"):
        assert r[f"kexec {how}"] == notsup, how
    assert r["kexec closed fd"] == "EBADF"
    assert r["kexec bogus cmdline"] == r["kexec bogus cmdline, memfd"] == "EFAULT"


def test_mount_is_answered_by_the_host(attack):
    r = report(attack, "trap")
    assert r["mount tmpfs"] == r["mount bind"] == r["mount multikernel elsewhere"] == "EPERM"
    assert r["mount bogus fstype"] == "EFAULT"
    assert r["mount multikernel"] == r["mount multikernel, dotted"] == "ret 0"
    assert r["mounts at /var/lib/kerf"] == 1             # none of them reached the kernel


def test_the_trap_says_why_on_the_bridges_stderr(attack):
    err = attack["runs"]["trap"][2]
    assert "reboot command 0x12345678 is not a multikernel one" in err
    assert "without KEXEC_MULTIKERNEL would replace the host kernel" in err
    assert f"no instance has id {GHOST_ID} [ESRCH]" in err
    assert "is no file on disk" in err and "not a regular file" in err
    assert "mount of 'tmpfs' on '/var/lib/kerf' refused" in err


# -- the machine ----------------------------------------------------------------------------


def test_the_machine_comes_out_untouched(attack):
    before, after = attack["show"]
    assert settled(after) == settled(before)
    (web,) = after["instances"]
    assert (web["name"], web["state"], web["kernel"], web["boots"]) == (NAME, "ready", None, 0)
    assert after["overlays"] == []
    pid = after["machine"]["supervisor_pid"]
    assert psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    assert Client(attack["run_dir"]).call("ping")["pid"] == pid


# -- the namespace --------------------------------------------------------------------------


def test_inside_the_namespace_kerf_sees_the_emulator(attack):
    r = report(attack, "ns")
    assert "Multikernel Memory Pool" in r["iomem"]
    assert r["iomem"] == attack["iomem outside"]         # the machine's view, not the host's
    assert r["proc self pid"] and r["proc self fds"] and r["cpuinfo"]
    assert r["kimage readable"] == "ok"
    blob = bytes.fromhex(r["device_tree"])
    assert blob[:4] == b"\xd0\x0d\xfe\xed"
    assert blob == attack["tree outside"]
    show = attack["show"][1]
    pool = DeviceTreeParser().parse_dtb_from_bytes(blob).hardware
    phys = show["pool"]["physical_ids"]
    assert pool.cpus.available == sorted(phys[str(c)] for c in show["pool"]["cpus"])
    assert pool.memory.memory_pool_bytes == show["pool"]["memory_bytes"]
    assert libfdt.Fdt(blob).path_offset("/resources") >= 0
    assert r["var lib kerf"]
    m = r["mounts"]
    assert m["/sys/fs/multikernel"] == "fuse"
    assert m["/proc"] == m["/var/lib"] == m["/run"] == m["/sys/fs"] == "tmpfs"
    assert (r["uid"], r["no_new_privs"], r["seccomp"]) == (0, "1", "2")   # under the filter


def test_outside_the_namespace_nothing_is_left(attack):
    before, after = attack["mounts"]
    added = after - before
    ours = {m for m in added if m[2] in ("fuse", "proc") or "mk-kerf-" in m[1]
            or m[1] in ("/sys/fs", "/sys/fs/multikernel", "/proc", "/var/lib", "/var/lib/kerf",
                        "/run")}
    assert not ours, ours
    assert ("multikernel", "/sys/fs/multikernel", "fuse") not in after
    link = report(attack, "ns")["proc self link"]
    scratch = os.path.dirname(os.path.dirname(link))
    assert link == os.path.join(scratch, "proc", "self")
    assert os.path.basename(scratch).startswith("mk-kerf-")
    assert os.path.dirname(scratch) == tempfile.gettempdir()
    assert not os.path.exists(scratch)
    b_scratch, a_scratch = attack["scratch"]
    assert scratch not in a_scratch and scratch not in b_scratch


@pytest.mark.skipif(shutil.which("unshare") is None, reason="no unshare(1) to mount fusectl")
def test_a_program_that_exits_holding_a_thousand_half_written_overlays(machine, program):
    """A program holds 1000 descriptors of overlays/new, each half a tree, and its FUSE
    connection is aborted (fusectl) before it exits: the bridge passes on its exit status with
    no traceback, and the machine is as it was (no half tree was committed)."""
    d, prog = program
    abort_file = d / "abort-conn"
    cfg = d / "hold.json"
    cfg.write_text(json.dumps({"blobs": {k: v.hex() for k, v in blobs().items()}, "hold": 1000,
                               "abort_file": str(abort_file)}))
    before = settled(Client(machine).call("show"))

    def abort() -> None:
        deadline = time.monotonic() + 60
        while not abort_file.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        conn = abort_file.read_text().strip()
        assert conn.isdigit()
        # fusectl in a mount namespace of its own: the host's mounts are not touched
        subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c",
                        "mount -t fusectl none /sys/fs/fuse/connections && "
                        f"echo 1 > /sys/fs/fuse/connections/{conn}/abort"], check=True,
                       timeout=30)

    aborter = threading.Thread(target=abort, daemon=True)
    aborter.start()
    status, said, err, _ = bridge(machine, prog, str(cfg), "hold")
    aborter.join(timeout=60)
    assert status == 0 and "Traceback" not in err, err
    assert said["held"] == 1000 and said["refused"] == {"after abort": "ENOTCONN"}, said
    assert settled(Client(machine).call("show")) == before
