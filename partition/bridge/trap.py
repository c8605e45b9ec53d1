"""kerf's ``kexec_file_load``, ``reboot`` and ``mount``, answered by the host instead of the kernel.

The real kerf loads, starts and stops instances with these three calls; on the host they must
never run (a real reboot would take the machine down). kerf runs under a seccomp filter that
hands exactly them to a supervisor (SECCOMP_RET_USER_NOTIF), which reads their arguments from
kerf's memory and answers each itself; with the listener closed they fail ENOSYS. kerf is
untrusted: reads are bounded, and a call is checked still pending after its memory is read.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import select
import socket
import struct
import subprocess
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from partition import linux

#: per architecture: the trapped calls, AUDIT_ARCH_*, and the number of seccomp(2)
_TABLES: dict[str, tuple[dict[str, int], int, int]] = {
    "x86_64": ({"kexec_file_load": 320, "reboot": 169, "mount": 165}, 0xC000003E, 317),
    "aarch64": ({"kexec_file_load": 294, "reboot": 142, "mount": 40}, 0xC00000B7, 277),
}
MACHINE = os.uname().machine
_TABLE = _TABLES.get(MACHINE)
#: the system calls this module can trap, by name, for this architecture (empty elsewhere)
SYSCALLS: dict[str, int] = dict(_TABLE[0]) if _TABLE else {}
AUDIT_ARCH = _TABLE[1] if _TABLE else 0
_SYS_SECCOMP = _TABLE[2] if _TABLE else -1
_NAMES = {nr: name for name, nr in SYSCALLS.items()}

MAX_READ = 1 << 20                  # the most one read_memory call copies
PAGE_SIZE = mmap.PAGESIZE
SPAWN_TIMEOUT = 5.0                 # seconds spawn_trapped waits for the child's listener
MAX_ERRNO = 4095

# classic BPF (as partition/guest/containment.py builds it): seccomp_data offsets, opcodes
_NR_OFF, _ARCH_OFF = 0, 4
_LD_W_ABS, _JEQ_K, _JSET_K, _RET_K = 0x20, 0x15, 0x45, 0x06
RET_KILL_PROCESS, RET_USER_NOTIF, RET_ALLOW = 0x80000000, 0x7FC00000, 0x7FFF0000
X32_SYSCALL_BIT = 0x40000000

PR_SET_NO_NEW_PRIVS = 38
SECCOMP_SET_MODE_FILTER = 1
SECCOMP_FILTER_FLAG_NEW_LISTENER = 1 << 3
PIDFD_THREAD = os.O_EXCL            # pidfd_open: the pid may be a thread's (Linux 6.9+)

# struct seccomp_notif {u64 id; u32 pid; u32 flags; struct seccomp_data {s32 nr; u32 arch;
# u64 instruction_pointer; u64 args[6]}}; struct seccomp_notif_resp {u64 id; s64 val;
# s32 error; u32 flags}
_NOTIF = struct.Struct("<QIIiIQ6Q")
_RESP = struct.Struct("<QqiI")
IOCTL_NOTIF_RECV = 0xC0502100       # _IOWR('!', 0, struct seccomp_notif)
IOCTL_NOTIF_SEND = 0xC0182101       # _IOWR('!', 1, struct seccomp_notif_resp)
IOCTL_NOTIF_ID_VALID = 0x40082102   # _IOW('!', 2, __u64)
IOCTL_NOTIF_ID_VALID_OLD = 0x80082102  # _IOR('!', 2, __u64): the number before Linux 5.17

try:        # a handle of our own: setting argtypes here must not touch partition.linux's
    _libc = ctypes.CDLL("libc.so.6", use_errno=True)
except OSError:  # pragma: no cover - not glibc
    _libc = ctypes.CDLL(None, use_errno=True)

_syscall = _libc.syscall
_syscall.restype = ctypes.c_long
_ioctl = _libc.ioctl
_ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
_ioctl.restype = ctypes.c_int


class _Iovec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


class _Fprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


_process_vm_readv = _libc.process_vm_readv
_process_vm_readv.argtypes = [ctypes.c_int, ctypes.POINTER(_Iovec), ctypes.c_ulong,
                              ctypes.POINTER(_Iovec), ctypes.c_ulong, ctypes.c_ulong]
_process_vm_readv.restype = ctypes.c_ssize_t


class TrapError(OSError):
    """A trapped call could not be served as asked; ``errno`` says why (and is what a supervisor
    would normally send back to the caller)."""


def _error(err: int, what: str) -> TrapError:
    return TrapError(err, f"{what}: {os.strerror(err)}")


def _insn(code: int, jt: int, jf: int, k: int) -> bytes:
    return struct.pack("<HBBI", code, jt, jf, k & 0xFFFFFFFF)


def _number(name: str) -> int:
    try:
        return SYSCALLS[name]
    except KeyError:
        raise ValueError(f"no system call {name!r} to trap on {MACHINE} "
                         f"(known: {', '.join(sorted(SYSCALLS)) or 'none'})") from None


def notify_program(names: Iterable[str]) -> bytes:
    """The filter, as classic BPF: another architecture's calling convention (and, on x86_64,
    any x32 call) kills the process; the named calls go to the listener; all else is allowed."""
    numbers = sorted({_number(n) for n in names})
    prog: list[tuple[int, int, int, int]] = [
        (_LD_W_ABS, 0, 0, _ARCH_OFF),
        (_JEQ_K, 1, 0, AUDIT_ARCH), (_RET_K, 0, 0, RET_KILL_PROCESS),
        (_LD_W_ABS, 0, 0, _NR_OFF),
    ]
    if MACHINE == "x86_64":
        prog += [(_JSET_K, 0, 1, X32_SYSCALL_BIT), (_RET_K, 0, 0, RET_KILL_PROCESS)]
    for nr in numbers:
        prog += [(_JEQ_K, 0, 1, nr), (_RET_K, 0, 0, RET_USER_NOTIF)]
    prog.append((_RET_K, 0, 0, RET_ALLOW))
    return b"".join(_insn(*insn) for insn in prog)


def _install(program: bytes) -> int:
    """no_new_privs, then the filter with a new listener; the listener fd (close-on-exec)."""
    linux.prctl(PR_SET_NO_NEW_PRIVS, 1)
    buf = ctypes.create_string_buffer(program, len(program))
    prog = _Fprog(len(program) // 8, ctypes.addressof(buf))
    fd = _syscall(ctypes.c_long(_SYS_SECCOMP), ctypes.c_uint(SECCOMP_SET_MODE_FILTER),
                  ctypes.c_uint(SECCOMP_FILTER_FLAG_NEW_LISTENER), ctypes.byref(prog))
    if fd < 0:
        raise _error(ctypes.get_errno(), "seccomp(SET_MODE_FILTER, NEW_LISTENER)")
    return int(fd)


def install_listener(names: Iterable[str]) -> int:
    """Put the calling process (and all it will exec) under ``notify_program(names)``; returns
    the listener descriptor, which is close-on-exec: hand it to the supervisor before exec."""
    return _install(notify_program(names))


@dataclass(frozen=True)
class Call:
    id: int                                      # the notification cookie
    pid: int                                     # the calling thread, in our pid namespace
    name: str                                    # "reboot", "kexec_file_load", "mount"
    args: tuple[int, int, int, int, int, int]    # raw u64 arguments


class Trap:
    """The supervisor's end of the filter: receive a trapped call, read what it points at,
    answer it. Single-threaded use; owns the listener descriptor."""

    def __init__(self, listener_fd: int, pid: int) -> None:
        self._fd = listener_fd
        self.pid = pid
        self._id_valid = IOCTL_NOTIF_ID_VALID
        self._pidfd: int | None
        try:            # the traced process's own pidfd: pinned now, it can never name another
            self._pidfd = linux.pidfd_open(pid)
        except OSError:
            self._pidfd = None

    def fileno(self) -> int:
        return self._fd

    def __enter__(self) -> Trap:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _listener(self) -> int:
        if self._fd < 0:
            raise ValueError("the trap is closed")
        return self._fd

    def receive(self) -> Call | None:
        """The next trapped call, or None when none is pending (never blocks)."""
        fd = self._listener()
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        if not any(ev & select.POLLIN for _, ev in poller.poll(0)):
            return None
        buf = ctypes.create_string_buffer(_NOTIF.size)      # zeroed, as RECV demands
        if _ioctl(fd, IOCTL_NOTIF_RECV, ctypes.addressof(buf)) < 0:
            err = ctypes.get_errno()
            if err in (errno.ENOENT, errno.EINTR):  # the caller died or was interrupted
                return None
            raise _error(err, "SECCOMP_IOCTL_NOTIF_RECV")
        cookie, pid, _flags, nr, _arch, _ip, *args = _NOTIF.unpack(buf.raw)
        return Call(cookie, pid, _NAMES.get(nr, f"syscall {nr}"),
                    (args[0], args[1], args[2], args[3], args[4], args[5]))

    def valid(self, call: Call) -> bool:
        """The call still waits for its answer (its caller lives, so its pid is its own)."""
        fd = self._listener()
        cookie = ctypes.c_uint64(call.id)
        while True:
            if _ioctl(fd, self._id_valid, ctypes.addressof(cookie)) == 0:
                return True
            err = ctypes.get_errno()
            if err == errno.ENOENT:
                return False
            if err in (errno.EINVAL, errno.ENOTTY) and self._id_valid != IOCTL_NOTIF_ID_VALID_OLD:
                self._id_valid = IOCTL_NOTIF_ID_VALID_OLD      # a kernel older than 5.17
                continue
            raise _error(err, "SECCOMP_IOCTL_NOTIF_ID_VALID")

    def read_memory(self, call: Call, address: int, size: int) -> bytes:
        """``size`` bytes at ``address`` in the caller. TrapError EINVAL for a size over
        MAX_READ, EFAULT for memory it cannot read in full, ENOENT when the call is gone."""
        if not 0 <= size <= MAX_READ:
            raise TrapError(errno.EINVAL, f"read of {size} bytes (at most {MAX_READ})")
        if size == 0:
            return b""
        if call.pid <= 0 or address <= 0 or address + size > 1 << 64:
            raise TrapError(errno.EFAULT, f"bad address {address:#x} (+{size}) in pid {call.pid}")
        buf = ctypes.create_string_buffer(size)
        local, remote = _Iovec(ctypes.addressof(buf), size), _Iovec(address, size)
        got = _process_vm_readv(call.pid, ctypes.byref(local), 1, ctypes.byref(remote), 1, 0)
        if got != size:
            why = os.strerror(ctypes.get_errno()) if got < 0 else f"short read ({got})"
            raise TrapError(errno.EFAULT, f"cannot read {size} bytes at {address:#x} in pid "
                                          f"{call.pid}: {why}")
        if not self.valid(call):
            raise TrapError(errno.ENOENT, f"call {call.id:#x} of pid {call.pid} is gone")
        return buf.raw

    def read_string(self, call: Call, address: int, limit: int = 4096) -> bytes:
        """The NUL-terminated string at ``address``, without its NUL; ``limit`` bytes at most,
        the NUL included, read a page at a time so that a string ending just before an unmapped
        page reads. ENAMETOOLONG when no NUL comes within ``limit``."""
        if not 1 <= limit <= MAX_READ:
            raise TrapError(errno.EINVAL, f"string limit {limit} (1 to {MAX_READ})")
        out = bytearray()
        while len(out) < limit:
            at = address + len(out)
            chunk = self.read_memory(call, at, min(PAGE_SIZE - at % PAGE_SIZE, limit - len(out)))
            end = chunk.find(0)
            if end >= 0:
                return bytes(out + chunk[:end])
            out += chunk
        raise TrapError(errno.ENAMETOOLONG, f"no NUL within {limit} bytes at {address:#x}")

    def _pidfd_of(self, call: Call) -> tuple[int, bool]:
        """A pidfd for the caller, and whether it is ours to close."""
        if call.pid == self.pid and self._pidfd is not None:
            return self._pidfd, False
        if call.pid <= 0:
            raise TrapError(errno.ESRCH, "the caller is outside this pid namespace")
        try:
            return os.pidfd_open(call.pid, PIDFD_THREAD), True
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
        return os.pidfd_open(call.pid), True            # before 6.9: a process only

    def take_fd(self, call: Call, fd: int) -> int:
        """A duplicate, here and close-on-exec, of the caller's descriptor ``fd``; TrapError
        EBADF when there is none or the call is gone. The file is the caller's choice: check it
        (fstat) before trusting it."""
        if not 0 <= fd <= 0x7FFFFFFF:
            raise TrapError(errno.EBADF, f"descriptor {fd} of pid {call.pid}")
        try:
            pidfd, owned = self._pidfd_of(call)
            try:
                if not self.valid(call):   # the pidfd names the caller, not a pid's successor
                    raise TrapError(errno.ENOENT, "the call is gone")
                return linux.pidfd_getfd(pidfd, fd)      # the kernel sets O_CLOEXEC on it
            finally:
                if owned:
                    os.close(pidfd)
        except OSError as exc:
            raise TrapError(errno.EBADF, f"cannot take descriptor {fd} of pid {call.pid}: "
                                         f"{exc.strerror}") from exc

    def reply(self, call: Call, value: int = 0, error: int = 0) -> None:
        """Answer the call: it returns ``value``, or fails with the positive errno ``error``.
        A caller that is gone (killed, or interrupted) is no error."""
        if not 0 <= error <= MAX_ERRNO:
            raise ValueError(f"errno {error} out of range")
        if not -(1 << 63) <= value < 1 << 63:
            raise ValueError(f"return value {value} does not fit a long")
        buf = ctypes.create_string_buffer(
            _RESP.pack(call.id, 0 if error else value, -error, 0), _RESP.size)
        if _ioctl(self._listener(), IOCTL_NOTIF_SEND, ctypes.addressof(buf)) < 0:
            err = ctypes.get_errno()
            if err != errno.ENOENT:
                raise _error(err, "SECCOMP_IOCTL_NOTIF_SEND")

    def close(self) -> None:
        """Let go of the listener: a call still waiting, and every later one, fails ENOSYS."""
        if self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)


def _drain(sock: socket.socket) -> bytes:
    """What the child sent, without waiting; any descriptor in it is closed."""
    sock.setblocking(False)
    try:
        msg, fds, _flags, _addr = socket.recv_fds(sock, 4096, 4)
    except OSError:
        return b""
    for fd in fds:
        os.close(fd)
    return msg


def _end(proc: subprocess.Popen[bytes]) -> None:
    with proc:                          # closes its pipes and reaps it
        if proc.poll() is None:
            proc.kill()


def spawn_trapped(argv: list[str], names: Iterable[str], **popen_kwargs: Any
                  ) -> tuple[subprocess.Popen[bytes], Trap]:
    """Start ``argv`` under ``notify_program(names)``: the filter goes on in the child just
    before exec (so the program never runs without it) and its listener comes back here over
    a socketpair. Other keyword arguments go to Popen."""
    program = notify_program(names)
    user_preexec: Callable[[], object] | None = popen_kwargs.pop("preexec_fn", None)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)

    def preexec() -> None:                          # in the child, between fork and exec
        if user_preexec is not None:
            user_preexec()
        try:
            fd = _install(program)
        except OSError as exc:
            try:
                theirs.send(b"E%d:%s" % (exc.errno or 0, str(exc.strerror or exc).encode()))
            except OSError:
                pass
            raise
        socket.send_fds(theirs, [b"F"], [fd])
        os.close(fd)

    try:
        try:
            proc: subprocess.Popen[bytes] = subprocess.Popen(argv, preexec_fn=preexec, **popen_kwargs)
        except subprocess.SubprocessError as exc:
            msg = _drain(ours)
            err, _, why = msg[1:].partition(b":")
            raise TrapError(int(err) if msg[:1] == b"E" and err.isdigit() else errno.ECHILD,
                            f"{argv[0]}: the seccomp listener could not be set up in the child: "
                            f"{why.decode(errors='replace') or exc}") from exc
        except BaseException:
            _drain(ours)            # exec failed after the listener was sent: close it
            raise
        theirs.close()
        try:
            ours.settimeout(SPAWN_TIMEOUT)
            try:
                msg, fds, _flags, _addr = socket.recv_fds(ours, 4096, 4)
            except TimeoutError:
                raise TrapError(errno.ETIMEDOUT, f"{argv[0]} (pid {proc.pid}): no seccomp "
                                f"listener within {SPAWN_TIMEOUT} s") from None
            if msg[:1] != b"F" or len(fds) != 1:
                for fd in fds:
                    os.close(fd)
                raise TrapError(errno.ECHILD, f"{argv[0]} (pid {proc.pid}) exited or exec'd "
                                              "without handing over its seccomp listener")
            return proc, Trap(fds[0], proc.pid)
        except BaseException:
            _end(proc)
            raise
    finally:
        ours.close()
        theirs.close()
