"""The thin platform layer: every Linux call the stdlib does not wrap, in one place.

Kept small on purpose (as psutil keeps its ``_pslinux``): the rest of the emulator speaks in
domain terms and never touches ctypes. All symbols are resolved at import time, in the host,
so that a freshly forked instance never has to dlopen anything on its boot path.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import re
import select
import signal
from collections.abc import Callable

try:        # by its soname: find_library would run ldconfig in a child on every import
    _libc = ctypes.CDLL("libc.so.6", use_errno=True)
except OSError:  # pragma: no cover - not glibc
    _libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)

_prctl = _libc.prctl
_prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
_prctl.restype = ctypes.c_int

_munmap = _libc.munmap
_munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_munmap.restype = ctypes.c_int

_sched_getcpu = _libc.sched_getcpu
_sched_getcpu.argtypes = []
_sched_getcpu.restype = ctypes.c_int

_fallocate = _libc.fallocate
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
_fallocate.restype = ctypes.c_int

PR_SET_PDEATHSIG = 1
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02


def _check(rc: int, what: str) -> None:
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def set_parent_death_signal(sig: int = signal.SIGKILL) -> None:
    """Die with the host: an instance must never outlive the supervisor that owns its core."""
    _check(_prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0), "prctl(PR_SET_PDEATHSIG)")


def munmap(address: int, length: int) -> None:
    _check(_munmap(address, length), "munmap")


def sched_getcpu() -> int:
    return int(_sched_getcpu())


def punch_hole(fd: int, offset: int, length: int) -> None:
    """Give a range of a memfd back to the kernel; it reads as zeros afterwards (scrub, free)."""
    _check(_fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length),
           "fallocate(PUNCH_HOLE)")


def buffer_address(buf: object) -> int:
    """Address of a writable buffer (an mmap), so that a forked child can unmap it by hand."""
    c = ctypes.c_char.from_buffer(buf)  # type: ignore[arg-type]
    try:
        return ctypes.addressof(c)
    finally:
        del c


def physical_cpu_ids() -> dict[int, int]:
    """Logical CPU -> physical (APIC) id, as ``arch_cpu_physical_id()`` reports it.

    Falls back to the logical number where /proc/cpuinfo has no ``apicid`` (non-x86)."""
    ids: dict[int, int] = {}
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
    except OSError:
        text = ""
    for block in text.split("\n\n"):
        proc = re.search(r"^processor\s*:\s*(\d+)", block, re.M)
        apic = re.search(r"^apicid\s*:\s*(\d+)", block, re.M)
        if proc:
            ids[int(proc.group(1))] = int(apic.group(1)) if apic else int(proc.group(1))
    for cpu in os.sched_getaffinity(0):
        ids.setdefault(cpu, cpu)
    return ids


#: one ring of a doorbell: 8 bytes into its pipe (what an eventfd write took)
RING = (1).to_bytes(8, "little")

#: what a doorbell is not where containment cannot run (containment_supported): an
#: instance's /proc is not covered, so a peer can reopen a ring end for reading through it
UNCONTAINED_DOORBELLS = ("doorbells are not ring only: a peer can reopen a ring end through "
                         "/proc/self/fd and read another instance's wake-ups")


def doorbell() -> tuple[int, int]:
    """An instance's doorbell: (its own end, the ring end). A pipe, not an eventfd: whoever
    holds an eventfd can read it, and a peer that read the one the host gave it swallowed
    that instance's wake-ups (real hardware cannot swallow another core's IPI). The instance
    holds the pipe open for reading and writing (it sleeps on it, clears it, rings itself from
    a signal handler): the pipe opened again through /proc, since its two ends are one-way.
    The host and the peers hold the write end, which rings and cannot be read (nor reopened:
    an instance's /proc is covered, where containment runs; where it cannot, a peer can, and
    ``UNCONTAINED_DOORBELLS`` says so)."""
    r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        own = os.open(f"/proc/self/fd/{r}", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    except BaseException:
        os.close(w)
        raise
    finally:
        os.close(r)
    return own, w


def host_doorbell() -> tuple[int, int]:
    """The host's doorbell: (the read end it waits on, the ring end every instance holds).
    A pipe for the reason ``doorbell`` gives: an instance that read the host's eventfd
    swallowed the host's wake-ups (a peer's boot, which the host waits for on its doorbell,
    took 31 s instead of milliseconds)."""
    r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    return r, w


def doorbell_watch(ring_end: int) -> int:
    """A descriptor of the pipe behind a doorbell's ring end that becomes readable when the
    doorbell is rung: what the host keeps of a live update's predecessor, to forward the rings
    of late senders (lifecycle.py). Opened for reading and writing through /proc, as the
    instance's own end is: a reader that is also a writer never reads end-of-file, and rings
    never fail for want of a reader."""
    return os.open(f"/proc/self/fd/{ring_end}", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)


def _nowait_on_pipes() -> bool:
    """Whether ``pwritev2(RWF_NOWAIT)`` works on a pipe: Linux 6.4 and later (pipes got
    FMODE_NOWAIT then); before, it fails EOPNOTSUPP, and every ring would fail. Asked once
    at import, as _ring.c asks at its own (``_fastring.PIPE_NOWAIT``)."""
    flag = getattr(os, "RWF_NOWAIT", None)
    if flag is None:
        return False
    r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        os.pwritev(w, [RING], -1, flag)
    except OSError:
        return False
    finally:
        os.close(r)
        os.close(w)
    return True


#: rings are written with RWF_NOWAIT (never blocks, whatever a peer did to the shared ring
#: end's O_NONBLOCK); False on a kernel before 6.4: a plain write on the non-blocking end,
#: which a peer that cleared O_NONBLOCK on it and filled the pipe can make wait (README)
PIPE_NOWAIT = _nowait_on_pipes()


def ring_doorbell(fd: int) -> bool:
    """Ring a doorbell through its ring end. Never blocks, whatever a holder did to the
    shared file's flags (RWF_NOWAIT per call: a peer can clear O_NONBLOCK on the write end
    the host gave it; before Linux 6.4 a plain write, see PIPE_NOWAIT); a full pipe is rung
    already. False: it could not be rung (no reader: the instance is gone)."""
    try:
        if PIPE_NOWAIT:
            os.pwritev(fd, [RING], -1, os.RWF_NOWAIT)
        else:
            os.write(fd, RING)
    except BlockingIOError:
        pass
    except OSError:
        return False
    return True


def doorbell_clear(fd: int) -> None:
    """Take every ring pending on a doorbell's own end: a peer may have written any number of
    bytes in pieces of any size (an eventfd's ``os.eventfd_read`` would fail on a piece
    shorter than 8 bytes). Reads an eventfd too (one read takes its whole count)."""
    try:
        while len(os.read(fd, 4096)) == 4096:
            pass
    except BlockingIOError:
        pass


#: select(2) takes descriptors below this only; a host of hundreds of instances has more
FD_SETSIZE = 1024


def wait_readable(fd: int, timeout: float | None) -> bool:
    """Whether ``fd`` became readable within ``timeout`` seconds (None: no limit). select(2)
    where it can (microsecond timeouts), poll(2) for a descriptor above FD_SETSIZE, which
    select cannot take (poll counts whole milliseconds, rounded up)."""
    if fd < FD_SETSIZE:
        return bool(select.select([fd], [], [], None if timeout is None
                                  else max(0.0, timeout))[0])
    p = select.poll()
    p.register(fd, select.POLLIN)
    return bool(p.poll(None if timeout is None else max(0.0, timeout) * 1000.0))


def pidfd_open(pid: int) -> int:
    return os.pidfd_open(pid)


_boot_time: float | None = None


def process_start_time(pid: int) -> float:
    """When ``pid`` started, in seconds since the epoch, as psutil's ``create_time`` says it
    (boot time + the start tick in /proc/PID/stat), 0.0 if there is no such process. One read:
    psutil's reads /proc/PID/stat twice and /proc/stat once, 0.2 ms of every boot. The boot
    time is read once per process (it moves only if the wall clock is stepped)."""
    global _boot_time
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        start_ticks = int(stat[stat.rindex(b")") + 2:].split()[19])
        if _boot_time is None:
            with open("/proc/stat", "rb") as f:
                _boot_time = float(next(line for line in f if line.startswith(b"btime "))
                                   .split()[1])
    except (OSError, ValueError, IndexError, StopIteration):
        return 0.0
    return _boot_time + start_ticks / os.sysconf("SC_CLK_TCK")


# -- atomics on shared memory ----------------------------------------------------------------
# Several instances claim slots of one IPI ring at once: that needs a compare-and-swap, which
# Python lacks. libatomic (the GCC runtime, present wherever gcc is) exports it as a plain C
# function, callable through ctypes for about 0.7 us; a lock (fcntl) would cost 1.5 us per send
# and a sender killed while holding it would need recovery of its own.
try:
    _libatomic = ctypes.CDLL("libatomic.so.1")
except OSError as _exc:  # pragma: no cover - depends on the machine image
    raise ImportError("libatomic.so.1 is missing: install it (apt-get install libatomic1)") from _exc



def _atomic(name: str, restype: type, *argtypes: type) -> Callable[..., int]:
    fn = getattr(_libatomic, name)
    fn.argtypes = [ctypes.c_void_p, *argtypes]
    fn.restype = restype
    return fn


_cas8 = _atomic("__atomic_compare_exchange_8", ctypes.c_bool, ctypes.c_void_p, ctypes.c_uint64,
                ctypes.c_int, ctypes.c_int)
_xchg8 = _atomic("__atomic_exchange_8", ctypes.c_uint64, ctypes.c_uint64, ctypes.c_int)
_add8 = _atomic("__atomic_fetch_add_8", ctypes.c_uint64, ctypes.c_uint64, ctypes.c_int)
_add4 = _atomic("__atomic_fetch_add_4", ctypes.c_uint32, ctypes.c_uint32, ctypes.c_int)
_xchg4 = _atomic("__atomic_exchange_4", ctypes.c_uint32, ctypes.c_uint32, ctypes.c_int)
_SEQ_CST = 5
_expected = ctypes.c_uint64(0)
_expected_addr = ctypes.addressof(_expected)


def cas_u64(address: int, expected: int, desired: int) -> bool:
    """Atomically: if *address == expected, store desired and return True (a full barrier)."""
    _expected.value = expected
    return bool(_cas8(address, _expected_addr, desired, _SEQ_CST, _SEQ_CST))


def add_u64(address: int, value: int) -> int:
    """Atomic add (a counter several processes bump); returns the previous value."""
    return int(_add8(address, value, _SEQ_CST))


def add_u32(address: int, value: int) -> int:
    """Atomic add on a u32; returns the previous value."""
    return int(_add4(address, value, _SEQ_CST))


def exchange_u32(address: int, value: int) -> int:
    """Atomic exchange on a u32; returns the previous value."""
    return int(_xchg4(address, value, _SEQ_CST))


def exchange_u64(address: int, value: int) -> int:
    """Atomic store with a full barrier; returns the previous value."""
    return int(_xchg8(address, value, _SEQ_CST))


_syscall = _libc.syscall
_syscall.restype = ctypes.c_long
SYS_pidfd_getfd = 438


def pidfd_getfd(pidfd: int, targetfd: int) -> int:
    """Duplicate descriptor ``targetfd`` of the process behind ``pidfd`` into this process
    (Linux 5.6+, needs ptrace access to it: same user here)."""
    fd = _syscall(ctypes.c_long(SYS_pidfd_getfd), ctypes.c_int(pidfd), ctypes.c_int(targetfd),
                  ctypes.c_uint(0))
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"pidfd_getfd: {os.strerror(err)}")
    return int(fd)


# -- write attribution: userfaultfd write-protect (async) + PAGEMAP_SCAN ----------------------
# Linux 6.7+. The instance write-protects the foreign part of its mapping with a userfaultfd in
# asynchronous mode: the first write to a page is resolved by the kernel without any handler and
# leaves the page marked "written" in that process's page tables. The host reads and re-arms
# those marks through /proc/PID/pagemap. Soft-dirty bits would do the same, but
# CONFIG_MEM_SOFT_DIRTY is off in common kernels (this machine's included).
SYS_userfaultfd = 323
_UFFD_API = 0xAA
_UFFD_FEATURE_WP_UNPOPULATED = 1 << 13
_UFFD_FEATURE_WP_ASYNC = 1 << 15
_UFFDIO_REGISTER_MODE_WP = 2
_UFFDIO_WRITEPROTECT_MODE_WP = 1
_PAGE_IS_WRITTEN = 1 << 1
_PM_SCAN_WP_MATCHING = 1
_PM_SCAN_CHECK_WPASYNC = 2


def _ioc(direction: int, kind: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (kind << 8) | nr


_UFFDIO_API = _ioc(3, 0xAA, 0x3F, 24)
_UFFDIO_REGISTER = _ioc(3, 0xAA, 0x00, 32)
_UFFDIO_WRITEPROTECT = _ioc(3, 0xAA, 0x06, 24)
_PAGEMAP_SCAN = _ioc(3, ord("f"), 16, 96)
_ioctl = _libc.ioctl
_ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
_ioctl.restype = ctypes.c_int


class _PageRegion(ctypes.Structure):
    _fields_ = [("start", ctypes.c_uint64), ("end", ctypes.c_uint64),
                ("categories", ctypes.c_uint64)]


def _ioctl_checked(fd: int, request: int, arg: ctypes.Array, what: str) -> int:
    rc = _ioctl(fd, request, ctypes.addressof(arg))
    if rc < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return rc


def watch_writes(address: int, length: int) -> int:
    """Write-protect [address, address+length) of this process asynchronously; returns the
    userfaultfd, which must stay open for as long as the watch should last."""
    fd = _syscall(ctypes.c_long(SYS_userfaultfd), ctypes.c_int(os.O_CLOEXEC | os.O_NONBLOCK))
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"userfaultfd: {os.strerror(err)}")
    fd = int(fd)
    try:
        _ioctl_checked(fd, _UFFDIO_API, (ctypes.c_uint64 * 3)(
            _UFFD_API, _UFFD_FEATURE_WP_ASYNC | _UFFD_FEATURE_WP_UNPOPULATED, 0), "UFFDIO_API")
        _ioctl_checked(fd, _UFFDIO_REGISTER, (ctypes.c_uint64 * 4)(
            address, length, _UFFDIO_REGISTER_MODE_WP, 0), "UFFDIO_REGISTER")
        _ioctl_checked(fd, _UFFDIO_WRITEPROTECT, (ctypes.c_uint64 * 3)(
            address, length, _UFFDIO_WRITEPROTECT_MODE_WP), "UFFDIO_WRITEPROTECT")
    except BaseException:
        os.close(fd)
        raise
    return fd


def written_pages(pid: int, start: int, end: int, max_regions: int = 256) -> list[tuple[int, int]]:
    """Virtual ranges of process ``pid`` written since the last call, and protect them again.
    OSError(EPERM) when the range is not watched (see ``watch_writes``)."""
    fd = os.open(f"/proc/{pid}/pagemap", os.O_RDONLY | os.O_CLOEXEC)
    try:
        vec = (_PageRegion * max_regions)()
        arg = (ctypes.c_uint64 * 12)(
            96, _PM_SCAN_WP_MATCHING | _PM_SCAN_CHECK_WPASYNC, start, end, 0,
            ctypes.addressof(vec), max_regions, 0, 0, _PAGE_IS_WRITTEN, 0, _PAGE_IS_WRITTEN)
        out: list[tuple[int, int]] = []
        while True:
            n = _ioctl_checked(fd, _PAGEMAP_SCAN, arg, "PAGEMAP_SCAN")
            out.extend((vec[i].start, vec[i].end) for i in range(n))
            walk_end = arg[4]
            if n < max_regions or walk_end >= end:
                return out
            arg[2] = walk_end                   # the vector filled up: go on from there
    finally:
        os.close(fd)


def mappings_of(pid: int, name_part: str) -> list[tuple[int, int, int]]:
    """(start, end, file offset) of every mapping of a file whose path contains ``name_part``
    in process ``pid``, from /proc/PID/maps."""
    out = []
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            fields = line.split(None, 5)
            if len(fields) < 6 or name_part not in fields[5]:
                continue
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            out.append((lo, hi, int(fields[2], 16)))
    return out


# -- containment: mount namespace, capabilities, seccomp (guest/containment.py decides) ------
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long

CLONE_NEWNS = 0x00020000
CLONE_NEWIPC = 0x08000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 0x1, 0x2, 0x4, 0x8
MS_REC, MS_PRIVATE = 0x4000, 1 << 18
_NR = {"x86_64": {"mount_setattr": 442, "capset": 126, "seccomp": 317},
       "aarch64": {"mount_setattr": 442, "capset": 91, "seccomp": 277}}.get(os.uname().machine, {})


def unshare(flags: int) -> None:
    _check(_libc.unshare(ctypes.c_int(flags)), "unshare")


def setns(fd: int, nstype: int) -> None:
    """Join the namespaces ``nstype`` of the process behind pidfd ``fd`` (or of a ns file)."""
    _check(_libc.setns(ctypes.c_int(fd), ctypes.c_int(nstype)), "setns")


def mount(source: str | None, target: str, fstype: str | None, flags: int,
          data: str | None = None) -> None:
    def enc(s: str | None) -> bytes | None:
        return s.encode() if s is not None else None
    _check(_libc.mount(enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags),
                       enc(data)), f"mount {target}")


def umount(target: str, flags: int = 0) -> None:
    """umount2(2): ``flags`` 2 (MNT_DETACH) lets a busy mount go lazily."""
    _check(_libc.umount2(target.encode(), ctypes.c_int(flags)), f"umount {target}")


class _MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]


def remount_tree_readonly(path: str = "/") -> None:
    """mount_setattr(AT_RECURSIVE, MOUNT_ATTR_RDONLY): every mount under ``path``, in this
    mount namespace only."""
    attr = _MountAttr(1, 0, 0, 0)                 # MOUNT_ATTR_RDONLY
    rc = _syscall(ctypes.c_long(_NR["mount_setattr"]), ctypes.c_int(-100), path.encode(),
                  ctypes.c_uint(0x8000), ctypes.byref(attr), ctypes.c_size_t(ctypes.sizeof(attr)))
    _check(0 if rc == 0 else -1, "mount_setattr(AT_RECURSIVE, RDONLY)")


def prctl(option: int, arg2: int = 0, arg3: int = 0) -> None:
    _check(_prctl(option, arg2, arg3, 0, 0), f"prctl({option})")


def drop_capabilities() -> None:
    """Empty effective, permitted and inheritable sets (capset, header version 3)."""
    header = (ctypes.c_uint32 * 2)(0x20080522, 0)
    data = (ctypes.c_uint32 * 6)()
    rc = _syscall(ctypes.c_long(_NR["capset"]), ctypes.byref(header), ctypes.byref(data))
    _check(0 if rc == 0 else -1, "capset")


def install_seccomp(program: bytes) -> None:
    """seccomp(SECCOMP_SET_MODE_FILTER) with a classic BPF program (8 bytes an instruction);
    needs no_new_privs or CAP_SYS_ADMIN."""
    class _Fprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]
    buf = ctypes.create_string_buffer(program, len(program))
    prog = _Fprog(len(program) // 8, ctypes.cast(buf, ctypes.c_void_p))
    rc = _syscall(ctypes.c_long(_NR["seccomp"]), ctypes.c_uint(1), ctypes.c_uint(0),
                  ctypes.byref(prog))
    _check(0 if rc == 0 else -1, "seccomp(SET_MODE_FILTER)")


def containment_supported() -> bool:
    """The system calls above are known for this architecture."""
    return bool(_NR)
