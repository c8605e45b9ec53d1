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
import signal

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)

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


def eventfd(initval: int = 0, nonblocking: bool = True) -> int:
    flags = os.EFD_CLOEXEC | (os.EFD_NONBLOCK if nonblocking else 0)
    return os.eventfd(initval, flags)


def eventfd_drain(fd: int) -> int:
    """Read and reset a non-blocking eventfd; 0 when nothing was pending."""
    try:
        return os.eventfd_read(fd)
    except BlockingIOError:
        return 0


def pidfd_open(pid: int) -> int:
    return os.pidfd_open(pid)


# -- atomics on shared memory ----------------------------------------------------------------
# Several instances claim slots of one IPI ring at once: that needs a compare-and-swap, which
# Python lacks. libatomic (the GCC runtime, present wherever gcc is) exports it as a plain C
# function, callable through ctypes for about 0.7 us; a lock (fcntl) would cost 1.5 us per send
# and a sender killed while holding it would need recovery of its own.
try:
    _libatomic = ctypes.CDLL("libatomic.so.1")
except OSError as _exc:  # pragma: no cover - depends on the machine image
    raise ImportError("libatomic.so.1 is missing: install it (apt-get install libatomic1)") from _exc

_cas8 = _libatomic.__atomic_compare_exchange_8
_cas8.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint64, ctypes.c_int, ctypes.c_int]
_cas8.restype = ctypes.c_bool
_xchg8 = _libatomic.__atomic_exchange_8
_xchg8.argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_int]
_xchg8.restype = ctypes.c_uint64
_SEQ_CST = 5
_expected = ctypes.c_uint64(0)
_expected_addr = ctypes.addressof(_expected)


def cas_u64(address: int, expected: int, desired: int) -> bool:
    """Atomically: if *address == expected, store desired and return True (a full barrier)."""
    _expected.value = expected
    return bool(_cas8(address, _expected_addr, desired, _SEQ_CST, _SEQ_CST))


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
