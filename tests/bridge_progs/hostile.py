"""A hostile stand-in for kerf, run by the bridge (partition/bridge/session.py) in kerf's place.

tests/test_bridge_hostile.py copies this file next to a ``#!`` line naming its interpreter and
makes the bridge run it as ``PROG CONFIG PHASE``. It uses the standard library only (it runs in
kerf's private mount namespace, under the seccomp trap) and prints one JSON object on stdout:
for every attempt, what came back (``"ok"`` or the errno's name, per step).

Phases: ``fs`` attacks /sys/fs/multikernel, ``trap`` makes the trapped calls with hostile
arguments through ctypes, ``ns`` reports what the namespace looks like from inside, ``sleep``
outlives a timeout, ``hold`` exits holding descriptors of overlays/new half written.
It never calls reboot with a real reboot, halt, power-off, restart or CAD command: only the
multikernel commands (which the real kernel does not know) and 0x12345678.
"""

import ctypes
import errno
import functools
import json
import os
import sys
import threading
import time

ROOT = "/sys/fs/multikernel"


def err_name(exc: OSError) -> str:
    return errno.errorcode.get(exc.errno or 0, str(exc.errno))


def attempt(fn) -> str:
    try:
        fn()
        return "ok"
    except OSError as exc:
        return err_name(exc)


def write_blob(path: str, data: bytes, chunks: int = 1) -> dict:
    """open, write (in ``chunks`` pieces), close: what each step said."""
    out = {}
    try:
        fd = os.open(path, os.O_WRONLY)
    except OSError as exc:
        return {"open": err_name(exc)}
    out["open"] = "ok"
    try:
        step = max(1, -(-len(data) // chunks))
        writes = []
        for at in range(0, len(data), step):
            try:
                os.write(fd, data[at:at + step])
                writes.append("ok")
            except OSError as exc:
                writes.append(err_name(exc))
                break
        out["write"] = writes
    finally:
        out["close"] = attempt(lambda: os.close(fd))
    return out


# -- /sys/fs/multikernel --------------------------------------------------------------------


def phase_fs(cfg: dict) -> dict:
    blobs = {k: bytes.fromhex(v) for k, v in cfg["blobs"].items()}
    new, tree = f"{ROOT}/overlays/new", f"{ROOT}/device_tree"
    inst = f"{ROOT}/instances/{cfg['name']}"
    r: dict = {"overlays/new": {}, "device_tree": {}}
    for what, data in blobs.items():
        r["overlays/new"][what] = write_blob(new, data)
        r["device_tree"][what] = write_blob(tree, data)
    # a truncated tree in several writes: each write is taken, the close refuses
    r["overlays/new"]["truncated in pieces"] = write_blob(new, blobs["truncated"], chunks=3)

    def second_write():                  # after a refused write, the descriptor is spent
        fd = os.open(new, os.O_WRONLY)
        try:
            first = attempt(lambda: os.write(fd, b"garbage!garbage!"))
            again = attempt(lambda: os.write(fd, blobs["kerf baseline"]))
        finally:
            os.close(fd)
        return [first, again]
    r["second write"] = second_write()

    def pwrite():
        fd = os.open(new, os.O_WRONLY)
        try:
            return attempt(lambda: os.pwrite(fd, blobs["kerf baseline"], 100))
        finally:
            os.close(fd)
    r["pwrite at 100"] = pwrite()

    r["read overlays/new"] = attempt(lambda: open(new, "rb").read())
    r["open overlays/new rdwr"] = attempt(lambda: os.close(os.open(new, os.O_RDWR)))
    r["write status"] = write_blob(f"{inst}/status", b"running\n")
    r["write id"] = write_blob(f"{inst}/id", b"7\n")
    r["write instance device_tree"] = write_blob(f"{inst}/device_tree", blobs["kerf baseline"])
    r["create file"] = attempt(lambda: os.close(os.open(f"{inst}/evil", os.O_WRONLY | os.O_CREAT,
                                                        0o644)))
    r["create in root"] = attempt(lambda: os.close(os.open(f"{ROOT}/evil", os.O_WRONLY | os.O_CREAT,
                                                           0o644)))
    r["mknod"] = attempt(lambda: os.mknod(f"{ROOT}/overlays/fifo", 0o600 | 0o010000))
    r["mkdir instance"] = attempt(lambda: os.mkdir(f"{ROOT}/instances/evil"))
    r["mkdir overlay"] = attempt(lambda: os.mkdir(f"{ROOT}/overlays/tx_5"))
    r["rmdir tx_999"] = attempt(lambda: os.rmdir(f"{ROOT}/overlays/tx_999"))
    r["rmdir instances"] = attempt(lambda: os.rmdir(f"{ROOT}/instances"))
    r["rmdir instance"] = attempt(lambda: os.rmdir(inst))
    r["unlink status"] = attempt(lambda: os.unlink(f"{inst}/status"))
    r["unlink device_tree"] = attempt(lambda: os.unlink(tree))
    r["rename"] = attempt(lambda: os.rename(f"{inst}/status", f"{inst}/status2"))
    r["symlink"] = attempt(lambda: os.symlink("/etc/passwd", f"{ROOT}/link"))
    r["chmod"] = attempt(lambda: os.chmod(tree, 0o777))
    r["mode after chmod"] = oct(os.stat(tree).st_mode & 0o7777)
    r["listing"] = sorted(os.listdir(ROOT))
    r["instances"] = sorted(os.listdir(f"{ROOT}/instances"))
    r["overlays"] = sorted(os.listdir(f"{ROOT}/overlays"))
    with open(f"{inst}/status") as f:
        r["status"] = f.read().strip()
    return r


# -- the trapped calls ----------------------------------------------------------------------

libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
MK_START, MK_HALT = 0x4D4B4C49, 0x4D4B4C48
MAGIC1, MAGIC2 = 0xFEE1DEAD, 672274793
KEXEC_NO_INITRAMFS, KEXEC_UNLOAD, KEXEC_MULTIKERNEL = 0x4, 0x1, 0x10


def syscall(nr: int, *args) -> str:
    conv = [a if not isinstance(a, int) else ctypes.c_long(a) for a in args]
    ctypes.set_errno(0)
    ret = libc.syscall(ctypes.c_long(nr), *conv)
    if ret == -1:
        e = ctypes.get_errno()
        return errno.errorcode.get(e, str(e))
    return f"ret {ret}"


def phase_trap(cfg: dict) -> dict:
    nr = cfg["syscalls"]
    reboot = functools.partial(syscall, nr["reboot"])
    kexec = functools.partial(syscall, nr["kexec_file_load"])
    mount = functools.partial(syscall, nr["mount"])
    iid, ghost = cfg["id"], cfg["ghost_id"]

    def mk(i: int) -> int:
        return KEXEC_MULTIKERNEL | (i << 5)

    r: dict = {}
    no_such = ctypes.c_int(ghost)
    zero = ctypes.c_int(0)
    r["reboot unknown cmd"] = reboot(MAGIC1, MAGIC2, 0x12345678, 0)
    r["reboot bad magic"] = reboot(0xDEADBEEF, MAGIC2, 0x12345678, 0)
    r["reboot bad magic2"] = reboot(MAGIC1, 0x12345678, MK_START, ctypes.byref(no_such))
    r["reboot start bogus pointer"] = reboot(MAGIC1, MAGIC2, MK_START, 0x10)
    r["reboot start null pointer"] = reboot(MAGIC1, MAGIC2, MK_START, 0)
    r["reboot start no instance"] = reboot(MAGIC1, MAGIC2, MK_START, ctypes.byref(no_such))
    r["reboot halt id 0"] = reboot(MAGIC1, MAGIC2, MK_HALT, ctypes.byref(zero))

    disk = os.open(cfg["kernel_file"], os.O_RDONLY)        # a regular file on disk
    gone_path = cfg["scratch_file"]
    with open(gone_path, "w") as f:
        f.write("# deleted\n")
    gone = os.open(gone_path, os.O_RDONLY)
    os.unlink(gone_path)
    memfd = os.memfd_create("kernel")
    os.write(memfd, b"class Kernel: pass\n")
    folder = os.open("/", os.O_RDONLY | os.O_DIRECTORY)
    rd, wr = os.pipe()
    cmdline = ctypes.create_string_buffer(b"console=hvc0")
    try:
        # no KEXEC_MULTIKERNEL: fd -1, so that nothing could load even if the call went through
        r["kexec no MK flag"] = kexec(-1, -1, 0, 0, 0)
        r["kexec no MK flag, no initramfs"] = kexec(-1, -1, 0, 0, KEXEC_NO_INITRAMFS)
        r["kexec no such instance"] = kexec(disk, -1, 0, 0, mk(ghost) | KEXEC_NO_INITRAMFS)
        r["kexec id 0"] = kexec(disk, -1, 0, 0, mk(0))
        r["kexec unload no such instance"] = kexec(-1, -1, 0, 0, mk(ghost) | KEXEC_UNLOAD)
        r["kexec initrd"] = kexec(disk, disk, 0, 0, mk(iid))
        r["kexec memfd"] = kexec(memfd, -1, 0, 0, mk(iid) | KEXEC_NO_INITRAMFS)
        r["kexec deleted file"] = kexec(gone, -1, 0, 0, mk(iid) | KEXEC_NO_INITRAMFS)
        r["kexec directory"] = kexec(folder, -1, 0, 0, mk(iid) | KEXEC_NO_INITRAMFS)
        r["kexec pipe"] = kexec(rd, -1, 0, 0, mk(iid) | KEXEC_NO_INITRAMFS)
        r["kexec closed fd"] = kexec(987, -1, 0, 0, mk(iid) | KEXEC_NO_INITRAMFS)
        r["kexec bogus cmdline"] = kexec(-1, -1, 16, 0x10, mk(iid) | KEXEC_NO_INITRAMFS)
        r["kexec bogus cmdline, memfd"] = kexec(memfd, -1, 4096, 0x1000, mk(iid))
        r["kexec cmdline, memfd"] = kexec(memfd, -1, len(cmdline), cmdline, mk(iid))

        # the same from a second thread, and from a child process (the filter is inherited)
        box: dict = {}
        t = threading.Thread(target=lambda: box.update(
            memfd=kexec(memfd, -1, 0, 0, mk(iid)), ghost=kexec(disk, -1, 0, 0, mk(ghost))))
        t.start()
        t.join()
        r["kexec memfd from a thread"] = box["memfd"]
        r["kexec no such instance from a thread"] = box["ghost"]
        pr, pw = os.pipe()
        pid = os.fork()
        if pid == 0:
            try:
                os.close(pr)
                said = [reboot(MAGIC1, MAGIC2, 0x12345678, 0), kexec(memfd, -1, 0, 0, mk(iid))]
                os.write(pw, json.dumps(said).encode())
            finally:
                os._exit(0)
        os.close(pw)
        with os.fdopen(pr) as f:
            said = json.loads(f.read() or "[null, null]")
        os.waitpid(pid, 0)
        r["reboot unknown cmd from a child"], r["kexec memfd from a child"] = said
    finally:
        for fd in (disk, gone, memfd, folder, rd, wr):
            os.close(fd)

    r["mount tmpfs"] = mount(b"tmpfs", b"/var/lib/kerf", b"tmpfs", 0, None)
    r["mount bind"] = mount(b"/", b"/var/lib/kerf", None, 0x1000, None)
    r["mount multikernel elsewhere"] = mount(b"none", b"/var/lib/kerf", b"multikernel", 0, None)
    r["mount bogus fstype"] = mount(b"none", b"/var/lib/kerf", 0x10, 0, None)
    r["mount multikernel"] = mount(b"none", b"/sys/fs/multikernel", b"multikernel", 0, None)
    r["mount multikernel, dotted"] = mount(b"none", b"/sys/fs/./multikernel/", b"multikernel",
                                           0, None)
    with open("/proc/self/mountinfo") as f:
        r["mounts at /var/lib/kerf"] = sum(1 for line in f
                                           if line.split()[4] == "/var/lib/kerf")
    return r


# -- the namespace --------------------------------------------------------------------------


def phase_ns(cfg: dict) -> dict:
    r: dict = {}
    with open("/proc/iomem") as f:
        r["iomem"] = f.read()
    r["proc self link"] = os.readlink("/proc/self")
    with open("/proc/self/status") as f:
        pid_line = next(line for line in f if line.startswith("Pid:"))
    r["proc self pid"] = int(pid_line.split()[1]) == os.getpid()
    r["proc self fds"] = len(os.listdir("/proc/self/fd")) > 0
    r["cpuinfo"] = os.path.getsize("/proc/cpuinfo") >= 0 and bool(open("/proc/cpuinfo").read())
    r["kimage readable"] = attempt(lambda: open("/proc/kimage").read())
    with open(f"{ROOT}/device_tree", "rb") as f:
        blob = f.read()
    r["device_tree"] = blob.hex()
    r["var lib kerf"] = os.path.isdir("/var/lib/kerf")
    with open("/proc/self/mountinfo") as f:
        infos = [line.split() for line in f]
    r["mounts"] = {i[4]: i[i.index("-") + 1] for i in infos}
    r["uid"] = os.getuid()
    r["no_new_privs"] = next(line.split()[1] for line in open("/proc/self/status")
                             if line.startswith("NoNewPrivs:"))
    r["seccomp"] = next(line.split()[1] for line in open("/proc/self/status")
                        if line.startswith("Seccomp:"))
    return r


def phase_hold(cfg: dict) -> dict:
    """Exit holding ``cfg["hold"]`` descriptors of overlays/new, each with half a tree written
    and never closed by the program: the kernel closes them all as the process dies."""
    data = bytes.fromhex(cfg["blobs"]["invalid overlay"])
    fds, said = [], {}
    for _ in range(cfg["hold"]):
        try:
            fd = os.open(f"{ROOT}/overlays/new", os.O_WRONLY)
        except OSError as exc:
            said[err_name(exc)] = said.get(err_name(exc), 0) + 1
            continue
        fds.append(fd)
        try:
            os.write(fd, data[:len(data) // 2])
        except OSError as exc:
            said[err_name(exc)] = said.get(err_name(exc), 0) + 1
    if cfg.get("abort_file"):            # the test aborts the FUSE connection from outside
        with open(cfg["abort_file"] + ".tmp", "w") as f:
            f.write(str(os.minor(os.stat(ROOT).st_dev)))
        os.rename(cfg["abort_file"] + ".tmp", cfg["abort_file"])
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and attempt(lambda: os.stat(ROOT)) == "ok":
            time.sleep(0.05)
        said["after abort"] = attempt(lambda: os.stat(ROOT))
    return {"held": len(fds), "refused": said}


def phase_sleep(cfg: dict) -> dict:
    """Outlive the bridge's timeout, if it has one."""
    time.sleep(cfg["sleep"])
    return {"slept": cfg["sleep"]}


def main() -> int:
    with open(sys.argv[1]) as f:
        cfg = json.load(f)
    phase = sys.argv[2]
    report = {"fs": phase_fs, "trap": phase_trap, "ns": phase_ns, "sleep": phase_sleep,
              "hold": phase_hold}[phase](cfg)
    print(json.dumps({"phase": phase, "report": report}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
