"""One ``mkctl kerf -- ARGS`` run: the real kerf, unmodified, against the emulator.

kerf runs in a private mount namespace (made in the child between fork and exec, so this process
and the supervisor it may start stay in the host's):

* ``/sys/fs/multikernel`` is the FUSE filesystem of bridge/sysfs.py, served from here;
* ``/proc`` is a tmpfs of links into the real procfs (kept at a private path), except ``iomem``
  and ``kimage``, which link to the machine's views; ``cpuinfo`` is the real one (the emulator
  does not take CPUs away from Linux, so the host lists them all);
* ``/var/lib`` and ``/run`` (kerf's state and its lock) are private tmpfs; kerf's state survives
  between runs in ``<run-dir>/kerf``.

A seccomp user-notification filter (bridge/trap.py) traps ``kexec_file_load``, ``reboot`` and
``mount``: they never reach the real kernel; this process answers each from the host. A real
``reboot`` or a kexec without KEXEC_MULTIKERNEL is refused with EPERM, whatever kerf asks.
Trapped arguments are untrusted: strings and sizes are bounded, and the image descriptor must
be a regular file whose path still names it (a Python kernel file is a valid kernel).
"""

from __future__ import annotations

import errno
import os
import select
import shutil
import stat
import sys
import tempfile

from partition import linux
from partition.bridge.fuse import FuseServer
from partition.bridge.sysfs import SysfsBackend, refuse
from partition.bridge.trap import Call, Trap, TrapError, spawn_trapped
from partition.control.client import Client, start_supervisor
from partition.errors import InvalidSpec, MKError, NotSupported, PermissionDenied
from partition.host import devicetree, rundir

MOUNTPOINT = "/sys/fs/multikernel"
CLONE_NEWNS = 0x00020000
MS_BIND = 0x1000
REBOOT_MAGIC = (0xFEE1DEAD, 672274793)
REBOOT_CMDS = {0x4D4B4C49: "start", 0x4D4B4C48: "halt", 0x4D4B4C46: "force"}
KEXEC_FILE_UNLOAD, KEXEC_FILE_NO_INITRAMFS, KEXEC_MULTIKERNEL = 0x1, 0x4, 0x10
KEXEC_MK_ID_MASK, KEXEC_MK_ID_SHIFT = 0xFFE0, 5
TRAPPED = ("kexec_file_load", "reboot", "mount")


def kerf_program() -> str:
    """The installed kerf's console script, next to this interpreter if on no PATH."""
    here = os.path.join(os.path.dirname(sys.executable), "kerf")
    found = here if os.path.exists(here) else shutil.which("kerf")
    if not found:
        raise NotSupported("kerf is not installed", "pip install kerf-multikernel==0.4.0")
    return found


class Bridge:
    def __init__(self, run_dir: str | None, oversubscribe: bool = False,
                 extras: dict[str, object] | None = None) -> None:
        self.run_dir = rundir.resolve(run_dir)
        self.oversubscribe = oversubscribe
        #: what ``mkctl kerf --llc-way-mask/--keyring/--require-signed`` adds to the pool kerf
        #: init starts (a baseline's own llc-way-mask wins)
        self.extras = dict(extras or {})
        self.backend = SysfsBackend(self.run_dir, self._start_machine)
        self.kernel_classes: dict[str, str] = {}     # kernel file (real path) -> class named

    def kerf_args(self, args: list[str]) -> list[str]:
        """kerf's arguments, with ``load --kernel=path.py:Class`` made one kerf can open:
        kerf opens the path it is given (``kv.py:KV`` "does not exist"), so it gets
        ``path.py`` and the class is remembered for its kexec_file_load of that file, as
        ``mkctl load`` takes ``path.py:Class``. Anything else passes unchanged."""
        if "load" not in args:
            return list(args)
        out = []
        take = False
        for a in args:
            for flag in ("--kernel=", "-k"):
                if take or (a.startswith(flag) and len(a) > len(flag)):
                    value = a if take else a[len(flag):]
                    a = a[:len(a) - len(value)] + self._class_named(value)
                    break
            take = a in ("--kernel", "-k")
            out.append(a)
        return out

    def _class_named(self, value: str) -> str:
        path, sep, cls = value.rpartition(":")
        if not sep or not path.endswith(".py") or not cls.isidentifier() or \
                os.path.exists(value) or not os.path.isfile(path):
            return value
        self.kernel_classes[os.path.realpath(path)] = cls
        return path

    # -- the baseline write, when no machine runs --------------------------------------------
    def _start_machine(self, base: devicetree.Baseline) -> None:
        phys = linux.physical_cpu_ids()
        logical = {p: c for c, p in phys.items()}
        unknown = [p for p in base.cpus if p not in logical]
        if unknown:
            raise InvalidSpec(f"Invalid APIC ID(s) specified: {unknown}. Valid APIC IDs on this "
                              f"system: {sorted(logical)}", "name CPUs by their apicid")
        if not base.cpus or base.memory_bytes <= 0:
            raise InvalidSpec("the baseline asks for no CPUs or no memory",
                              "kerf init --cpus=N --memory=SIZE")
        cpus = sorted(logical[p] for p in base.cpus)
        host = [c for c in sorted(os.sched_getaffinity(0)) if c not in cpus]
        extras = dict(self.extras)
        if base.llc_way_mask is not None:
            extras["llc_way_mask"] = base.llc_way_mask
        start_supervisor(self.run_dir, {
            "cpus": cpus, "memory": base.memory_bytes, "host_cpus": host,
            "oversubscribe": self.oversubscribe or not host, "console_bytes": 64 * 1024,
            "kill_timeout": 30.0, "protection": True, "survive_host": True, **extras})

    # -- kerf's namespace ----------------------------------------------------------------------
    def _namespace(self, scratch: str, fuse: FuseServer) -> None:
        """In the child, between fork and exec: everything kerf sees that is not the host's."""
        linux.unshare(CLONE_NEWNS)
        linux.mount(None, "/", None, linux.MS_REC | linux.MS_PRIVATE)
        realproc = os.path.join(scratch, "proc")
        linux.mount("/proc", realproc, None, MS_BIND | linux.MS_REC)
        # kerf's lock goes to /var/run, private below; a run directory under /run is carried
        keep_run = self.run_dir.startswith("/run/") and os.path.isdir(self.run_dir)
        if keep_run:
            linux.mount(self.run_dir, os.path.join(scratch, "run"), None, MS_BIND | linux.MS_REC)
        flags = linux.MS_NOSUID | linux.MS_NODEV
        linux.mount("tmpfs", "/sys/fs", "tmpfs", flags, "mode=0755,size=64k")
        os.mkdir(MOUNTPOINT)
        fuse.mount_here()
        linux.mount("tmpfs", "/proc", "tmpfs", flags, "mode=0755,size=1m")
        for name in os.listdir(realproc):
            if name not in ("iomem", "kimage"):
                os.symlink(os.path.join(realproc, name), os.path.join("/proc", name))
        for name in ("iomem", "kimage"):
            os.symlink(os.path.join(self.run_dir, "proc", name), os.path.join("/proc", name))
        linux.mount("tmpfs", "/var/lib", "tmpfs", flags, "mode=0755,size=16m")
        os.mkdir("/var/lib/kerf")
        state = os.path.join(self.run_dir, "kerf")
        if os.path.isdir(state):
            linux.mount(state, "/var/lib/kerf", None, MS_BIND)
        linux.mount("tmpfs", "/run", "tmpfs", flags, "mode=0755,size=1m")
        if keep_run:
            os.makedirs(self.run_dir, exist_ok=True)
            linux.mount(os.path.join(scratch, "run"), self.run_dir, None, MS_BIND | linux.MS_REC)

    # -- a run -----------------------------------------------------------------------------------
    def run(self, args: list[str]) -> int:
        if rundir.live_owner(self.run_dir) is not None:
            os.makedirs(os.path.join(self.run_dir, "kerf"), mode=0o700, exist_ok=True)
        scratch = tempfile.mkdtemp(prefix="mk-kerf-")
        for d in ("proc", "run"):
            os.mkdir(os.path.join(scratch, d))
        fuse = FuseServer(self.backend, MOUNTPOINT, mount=False)
        trap: Trap | None = None
        try:
            proc, trap = spawn_trapped([kerf_program(), *self.kerf_args(args)], TRAPPED,
                                       preexec_fn=lambda: self._namespace(scratch, fuse))
            pidfd = linux.pidfd_open(proc.pid)
            try:
                self._serve(fuse, trap, pidfd)
            finally:
                os.close(pidfd)
                if proc.poll() is None:
                    proc.kill()
                proc.wait()
            return int(proc.returncode)
        finally:
            if trap is not None:
                trap.close()
            fuse.close()
            shutil.rmtree(scratch, ignore_errors=True)

    def _serve(self, fuse: FuseServer, trap: Trap, pidfd: int) -> None:
        while True:
            served = [] if fuse.closed else [fuse.fileno()]
            watch = select.poll()        # not select(2): a big host's descriptors pass 1024
            for fd in (*served, trap.fileno(), pidfd):
                watch.register(fd, select.POLLIN)
            ready = [fd for fd, _ in watch.poll(1000)]
            if served and served[0] in ready:
                fuse.serve_pending()
            if trap.fileno() in ready:
                while (call := trap.receive()) is not None:
                    self._answer(trap, call)
            if pidfd in ready:
                return

    # -- trapped system calls ------------------------------------------------------------------
    def _answer(self, trap: Trap, call: Call) -> None:
        try:
            value = {"mount": self._mount, "reboot": self._reboot,
                     "kexec_file_load": self._kexec}[call.name](trap, call)
        except TrapError as exc:
            trap.reply(call, error=exc.errno or errno.EFAULT)
            return
        except MKError as exc:
            err = refuse(exc)
            trap.reply(call, error=err.errno or errno.EIO)
            return
        if trap.valid(call):
            trap.reply(call, value=value)

    def _mount(self, trap: Trap, call: Call) -> int:
        fstype = trap.read_string(call, call.args[2], 64) if call.args[2] else b""
        target = trap.read_string(call, call.args[1], 4096) if call.args[1] else b""
        if fstype == b"multikernel" and os.path.normpath(target.decode(errors="replace")) == \
                MOUNTPOINT:
            return 0                       # served already: the host answers for the kernel
        raise PermissionDenied(f"mount of {fstype.decode(errors='replace')!r} on "
                               f"{target.decode(errors='replace')!r} refused",
                               "the bridge mounts only the multikernel filesystem")

    def _reboot(self, trap: Trap, call: Call) -> int:
        m1, m2, cmd = (a & 0xFFFFFFFF for a in call.args[:3])
        if (m1, m2) != REBOOT_MAGIC:
            raise InvalidSpec("reboot with wrong magic numbers", "kerf passes 0xfee1dead")
        what = REBOOT_CMDS.get(cmd)
        if what is None:
            raise PermissionDenied(f"reboot command {cmd:#x} is not a multikernel one: the host "
                                   "is never rebooted from the bridge", "start, kill only")
        mk_id = int.from_bytes(trap.read_memory(call, call.args[3], 4), "little", signed=True)
        Client(self.run_dir).call("mk_reboot", cmd=what, id=mk_id)
        return 0

    def _kexec(self, trap: Trap, call: Call) -> int:
        kfd, ifd = (_s32(a) for a in call.args[:2])
        clen, cptr, flags = call.args[2], call.args[3], call.args[4]
        if not flags & KEXEC_MULTIKERNEL:
            raise PermissionDenied("kexec_file_load without KEXEC_MULTIKERNEL would replace the "
                                   "host kernel: refused", "load into an instance (--id)")
        mk_id = (flags & KEXEC_MK_ID_MASK) >> KEXEC_MK_ID_SHIFT
        client = Client(self.run_dir)
        if flags & KEXEC_FILE_UNLOAD:
            client.call("kexec_unload", id=mk_id)
            return 0
        if ifd != -1:
            raise NotSupported("an initrd: emulated kernels are Python classes and boot without "
                               "one", "leave --initrd out")
        cmdline = b""
        if cptr and clen:
            cmdline = trap.read_string(call, cptr, min(int(clen), 4096))
        fd = trap.take_fd(call, kfd)
        try:
            path = _image_path(fd)
        finally:
            os.close(fd)
        cls = self.kernel_classes.get(os.path.realpath(path))
        client.call("kexec_load", id=mk_id, kernel=f"{path}:{cls}" if cls else path,
                    cmdline=cmdline.decode("ascii", errors="replace"))
        return 0


def _s32(v: int) -> int:
    v &= 0xFFFFFFFF
    return v - (1 << 32) if v & 0x80000000 else v


def _image_path(fd: int) -> str:
    """The file kerf opened, as a path the supervisor can load: a regular file whose path still
    names the same inode (a bzImage kerf unpacked into a memfd, or an ELF vmlinux, is no
    emulated kernel: the loader says so with ENOEXEC)."""
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        raise NotSupported("the kernel image is not a regular file",
                           "pass a Python kernel file (kernels/*.py) as --kernel")
    path = os.readlink(f"/proc/self/fd/{fd}")
    try:
        named = os.stat(path)
    except OSError:
        named = None
    if named is None or (named.st_dev, named.st_ino) != (st.st_dev, st.st_ino):
        raise NotSupported(f"the kernel image {path!r} is no file on disk (a bzImage unpacked "
                           "into memory?)", "pass a Python kernel file (kernels/*.py) as --kernel")
    return path


def run(args: list[str], run_dir: str | None = None, oversubscribe: bool = False,
        extras: dict[str, object] | None = None) -> int:
    return Bridge(run_dir, oversubscribe, extras).run(args)

