"""The two seccomp filters of an instance, built by name with libseccomp for the running
architecture: the kernel process's (strict: it kills) and its userland's (wide: it refuses).

Why libseccomp and not classic BPF assembled by hand (what guest/containment.py did until issue
22): the hand program carried x86-64 numbers, so no other architecture had a filter; libseccomp
resolves every name for the architecture it runs on, checks the architecture and the x32 ABI
itself, and orders the syscall dispatch as a binary tree (``CTL_OPTIMIZE`` 2), so a system call
the filter does not name (read, write, futex: almost every call) passes in 11 to 15
instructions instead of the hand program's 98 (one test per listed call), on every call.
Measured on this project's x86-64 machine (2 vCPU,
shared, so noisy): the hand kernel filter was 266 instructions; libseccomp's is 362 (the
two-value argument sets below cost a few masked comparisons each). Built and loaded in a fresh
fork (as an instance does), the hand one took ~1 ms, libseccomp's 2-7 ms (median 3-7 ms over
40 interleaved runs; ~2 ms warm, tests/test_filters.py::test_measured). That cost is paid at
``load``, in the parked incarnation, never on the timed boot path (docs/benchmarks.md): a
price worth a filter that exists on every architecture and reads as a policy.

libseccomp allows one comparison per argument in a rule, and a rule whose action is the
default's is refused; so "argument in {0, own pid}" is written as its complement, the union of
ranges around the two values (``_outside``), each range a few masked comparisons.

Which bits a comparison reads depends on which way it refuses. A rule that refuses when an
argument *equals* a value (``fcntl``'s and ``ioctl``'s command, ``setpriority``'s ``which``, a
socket family) must read only the bits the kernel reads: those arguments are C ``int``s, the
kernel truncates them to their low 32 bits, so they are matched with ``MASKED_EQ`` on
``0xFFFFFFFF``; a plain ``EQ`` compares all 64, and ``setpriority(0x100000002, ...)`` would
slip past a rule on ``PRIO_USER`` (2) while the kernel reads it as ``PRIO_USER``. A rule that
refuses when an argument is *not* an allowed value (``kill`` only on itself, ``_outside``) may
compare all 64 bits: a high half the kernel would ignore only ever makes it refuse more.
"""

from __future__ import annotations

import ctypes.util
import errno
import importlib
import itertools
import os
import tempfile
from types import ModuleType
from typing import TYPE_CHECKING

from partition.abi.constants import IPI_SIGNAL

#: the libraries pyseccomp looks up at import, by soname: its ``find_library`` would run
#: ``ldconfig -p`` in a child twice on every import of the emulator (every mkctl call, the host,
#: the zygote), as partition/linux.py's libc lookup avoids too
_SONAMES = {"c": "libc.so.6", "seccomp": "libseccomp.so.2"}


def _import_pyseccomp() -> ModuleType:
    real = ctypes.util.find_library
    ctypes.util.find_library = lambda name: _SONAMES.get(name) or real(name)
    try:
        return importlib.import_module("pyseccomp")
    except OSError:                                  # not under those sonames: look them up
        ctypes.util.find_library = real
        return importlib.import_module("pyseccomp")
    finally:
        ctypes.util.find_library = real


if TYPE_CHECKING:
    import pyseccomp as sc  # type: ignore[import-untyped]
else:
    sc = _import_pyseccomp()

#: what a kernel process is killed for (SIGSYS): what no instance of the real machine can do
KERNEL_FORBIDDEN = (
    "ptrace", "process_vm_readv", "process_vm_writev", "process_madvise", "process_mrelease",
    "pidfd_open", "pidfd_getfd", "kcmp",
    "mount", "umount2", "pivot_root", "chroot", "unshare", "setns", "open_tree", "move_mount",
    "fsopen", "fsconfig", "fsmount", "fspick", "mount_setattr", "name_to_handle_at",
    "open_by_handle_at",
    "reboot", "kexec_load", "kexec_file_load", "init_module", "finit_module", "delete_module",
    "bpf", "perf_event_open", "userfaultfd", "swapon", "swapoff", "acct", "quotactl",
    "quotactl_fd", "settimeofday", "clock_settime", "adjtimex", "clock_adjtime", "sethostname",
    "setdomainname", "iopl", "ioperm", "syslog", "add_key", "request_key", "keyctl",
    "lookup_dcookie", "vhangup", "uselib", "personality", "memfd_secret", "migrate_pages",
    "move_pages",
    "sched_setaffinity", "sched_setscheduler", "sched_setparam", "sched_setattr",
    "io_uring_setup", "io_uring_enter", "io_uring_register",
    # the limits every root process shares (inotify instances, queued signals, message queue
    # bytes are counted per user, and the uid is 0): a kernel needs none of these
    "inotify_init", "inotify_init1", "timer_create", "mq_open", "fanotify_init", "fanotify_mark",
    # a kernel is one process: no fork (a forked child's own violations would die unseen), and
    # no sockets of its own (its only socket is the doorbell channel the host gave it)
    "fork", "vfork", "socket", "socketpair", "connect", "bind", "listen", "accept", "accept4",
    "flock",
)
#: allowed to a kernel only with itself as the target (argument 0): raise(), pthread_kill()
KERNEL_SELF_ONLY = ("kill", "tkill", "tgkill", "rt_sigqueueinfo", "rt_tgsigqueueinfo")
#: fcntl commands that reach other processes or lock others out: F_SETLK, F_SETLKW,
#: F_SETOWN, F_SETSIG, F_SETOWN_EX, F_OFD_SETLK, F_OFD_SETLKW, F_SETLEASE, F_NOTIFY; and
#: F_SETPIPE_SZ: a peer holds the write end of another instance's doorbell pipe, and would
#: resize that instance's object (no knob real hardware has on another core's IPI)
FCNTL_FORBIDDEN = (6, 7, 8, 10, 15, 37, 38, 1024, 1026, 1031)
#: ioctls that aim SIGIO at a process: FIOSETOWN, SIOCSPGRP
IOCTL_FORBIDDEN = (0x8901, 0x8902)
CLONE_THREAD = 0x00010000
PRIO_PROCESS, PRIO_USER, IOPRIO_WHO_PROCESS, IOPRIO_WHO_USER = 0, 2, 1, 3
_LOW32 = 0xFFFFFFFF
_ALL64 = (1 << 64) - 1

#: refused to a userland (EPERM, as to a process without the capability): what reaches outside
#: the instance. pidfd_open and pidfd_getfd too: a descriptor is a door the PID namespace does
#: not guard (a process inside that held one of the host's, or a pidfd of a process outside,
#: would pass it on). ptrace, process_vm_* and kcmp stay allowed: the PID namespace lets them
#: name only the userland's own processes, the one that is not a program (the init, which
#: never execs) is not dumpable so they cannot reach it, and since Linux 4.8 a tracer cannot
#: step a tracee past its filter (Docker's default profile allows them for the same reason)
USERLAND_REFUSED = (
    "pidfd_open", "pidfd_getfd",
    "mount", "umount2", "pivot_root", "chroot", "setns", "open_tree", "move_mount", "fsopen",
    "fsconfig", "fsmount", "fspick", "mount_setattr", "open_by_handle_at",
    "kexec_load", "kexec_file_load", "init_module", "finit_module", "delete_module",
    "bpf", "perf_event_open", "userfaultfd", "io_uring_setup", "io_uring_enter",
    "io_uring_register", "add_key", "request_key", "keyctl",
    "settimeofday", "clock_settime", "adjtimex", "clock_adjtime", "swapon", "swapoff", "acct",
    "quotactl", "quotactl_fd", "iopl", "ioperm", "syslog", "lookup_dcookie", "vhangup",
    "uselib", "sethostname", "setdomainname", "fanotify_init", "sched_setattr",
    # reboot(2): refused like any unprivileged reboot, but a user notification its init
    # answers (restarting the instance) in a userland's filters (``reboot_notify``)
    "reboot",
)
#: what counts against a budget uid 0 shares with the host and every instance, refused to a
#: userland until instances have uids of their own, with the error a program sees when the
#: budget is spent (it copes: a file watcher falls back to polling). Inotify instances (128 a
#: user): a userland that took them all left the host's root processes EMFILE. POSIX message
#: queue bytes (RLIMIT_MSGQUEUE, counted per user, whatever the IPC namespace). POSIX timers:
#: each holds a queued signal counted per user, checked against the *receiver's*
#: RLIMIT_SIGPENDING: 256 timers inside would leave every kernel (its limit is 256,
#: guest/containment.py) unable to be sent a doorbell signal (EAGAIN)
USERLAND_BUDGETS = {"inotify_init": errno.EMFILE, "inotify_init1": errno.EMFILE,
                    "mq_open": errno.EMFILE, "timer_create": errno.EAGAIN}
#: namespace flags a userland may not create (clone, unshare): CLONE_NEWTIME, NEWNS,
#: NEWCGROUP, NEWUTS, NEWIPC, NEWUSER (which would hand it capabilities back), NEWPID, NEWNET
NAMESPACE_FLAGS = (0x80, 0x00020000, 0x02000000, 0x04000000, 0x08000000, 0x10000000,
                   0x20000000, 0x40000000)
#: socket families a userland may open: AF_UNIX, AF_INET, AF_INET6, AF_NETLINK (route only)
SOCKET_FAMILIES = (1, 2, 10, 16)
AF_NETLINK, NETLINK_ROUTE = 16, 0
INET_FAMILIES = (2, 10)
SOCK_TYPE_MASK, SOCK_RAW, SOCK_PACKET = 0xF, 3, 10
#: real-time policies: SCHED_FIFO, SCHED_RR, SCHED_DEADLINE (SCHED_RESET_ON_FORK masked off)
REALTIME_POLICIES = (1, 2, 6)
_POLICY_MASK = _LOW32 & ~0x40000000
#: ioctls that push input into the terminal mkctl runs in (TIOCSTI, TIOCLINUX): the classic
#: way out of a container through a shared tty
TTY_INJECTING = (0x5412, 0x541C)


def _outside(arg: int, values: tuple[int, ...]) -> list[sc.Arg]:
    """Comparisons of argument ``arg``, one per rule, whose union is every 64-bit value *not*
    in ``values``: below the least, above the greatest, and each gap between as aligned
    power-of-two blocks (a masked equality each)."""
    vs = sorted(set(values))
    out: list[sc.Arg] = []
    if vs[0] > 0:
        out.append(sc.Arg(arg, sc.LT, vs[0]))
    for lo, hi in itertools.pairwise(vs):
        out += [sc.Arg(arg, sc.MASKED_EQ, mask, start) for start, mask in _blocks(lo + 1, hi - 1)]
    if vs[-1] < _ALL64:
        out.append(sc.Arg(arg, sc.GT, vs[-1]))
    return out


def _blocks(lo: int, hi: int) -> list[tuple[int, int]]:
    """[lo, hi] as (start, mask) blocks: value & mask == start for exactly the block."""
    out = []
    while lo <= hi:
        size = lo & -lo if lo else 1 << 64
        while size > hi - lo + 1:
            size >>= 1
        out.append((lo, _ALL64 & ~(size - 1)))
        lo += size
    return out


def _known(name: str) -> bool:
    """The name is a system call of this architecture (fork has none on aarch64)."""
    return sc.resolve_syscall(sc.Arch.NATIVE, name) >= 0


def _new(default: int) -> sc.SyscallFilter:
    f = sc.SyscallFilter(default)
    f.set_attr(sc.Attr.ACT_BADARCH, sc.KILL_PROCESS)  # another ABI (x32, i386 int 0x80)
    f.set_attr(sc.Attr.CTL_OPTIMIZE, 2)                # a binary tree, not a chain of calls
    return f


def _rule(f: sc.SyscallFilter, action: int, name: str, *args: sc.Arg) -> None:
    if _known(name):
        f.add_rule(action, name, *args)


def kernel_filter(own_pid: int) -> sc.SyscallFilter:
    """The kernel process's filter: kill (SIGSYS, the whole process) on any call an instance of
    the real machine could not make; everything else allowed. ``own_pid`` is the only target
    its self-only calls may name."""
    kill = sc.KILL_PROCESS
    f = _new(sc.ALLOW)
    for name in KERNEL_FORBIDDEN:
        _rule(f, kill, name)
    for name in KERNEL_SELF_ONLY:
        _rule(f, kill, name, sc.Arg(0, sc.NE, own_pid))
    for name in ("prlimit64", "get_robust_list"):
        for cmp in _outside(0, (0, own_pid)):
            _rule(f, kill, name, cmp)
    # (which, who): PRIO_PROCESS / IOPRIO_WHO_PROCESS of itself; a process group or "every
    # process of my uid" (PRIO_USER with who 0) would reach every other instance
    for name, which in (("setpriority", PRIO_PROCESS), ("ioprio_set", IOPRIO_WHO_PROCESS)):
        _rule(f, kill, name, sc.Arg(0, sc.NE, which))
        for cmp in _outside(1, (0, own_pid)):
            _rule(f, kill, name, cmp)
    _rule(f, kill, "pidfd_send_signal", sc.Arg(1, sc.NE, int(IPI_SIGNAL)))
    for cmd in FCNTL_FORBIDDEN:
        _rule(f, kill, "fcntl", sc.Arg(1, sc.MASKED_EQ, _LOW32, cmd))
    for req in IOCTL_FORBIDDEN:
        _rule(f, kill, "ioctl", sc.Arg(1, sc.MASKED_EQ, _LOW32, req))
    _rule(f, kill, "clone", sc.Arg(0, sc.MASKED_EQ, CLONE_THREAD, 0))   # threads only
    _rule(f, sc.ERRNO(errno.ENOSYS), "clone3")        # its flags sit in memory: libc falls back
    return f


def userland_filter(reboot_notify: bool = False) -> sc.SyscallFilter:
    """A userland's filter: fork, exec, threads, pipes, signals and sockets among its own
    processes; EPERM for what would reach outside the instance (its PID and network namespaces
    already scope kill, ptrace and connect). Not checked here, and why: the CPUs a thread may be
    pinned to (a cpumask is behind a pointer; the instance's cpuset cgroup confines
    sched_setaffinity anyway) and the memory and process counts (its cgroups).
    ``reboot_notify``: reboot(2) becomes a user notification to the filter's listener (the
    userland's init, guest/userinit.py, which has the host restart the instance)."""
    no = sc.ERRNO(errno.EPERM)
    f = _new(sc.ALLOW)
    for name in USERLAND_REFUSED:
        if reboot_notify and name == "reboot":
            _rule(f, sc.NOTIFY, name)
            continue
        _rule(f, no, name)
    for name, error in USERLAND_BUDGETS.items():
        _rule(f, sc.ERRNO(error), name)
    for flag in NAMESPACE_FLAGS:
        _rule(f, no, "unshare", sc.Arg(0, sc.MASKED_EQ, flag, flag))
        _rule(f, no, "clone", sc.Arg(0, sc.MASKED_EQ, flag, flag))
    _rule(f, sc.ERRNO(errno.ENOSYS), "clone3")        # its flags sit in memory: libc falls back
    for cmp in _outside(0, SOCKET_FAMILIES):
        _rule(f, no, "socket", cmp)
    for family in INET_FAMILIES:                     # raw IP: crafted packets (netlink's
        for kind in (SOCK_RAW, SOCK_PACKET):         # SOCK_RAW is only its datagram kind)
            _rule(f, no, "socket", sc.Arg(0, sc.MASKED_EQ, _LOW32, family),
                  sc.Arg(1, sc.MASKED_EQ, SOCK_TYPE_MASK, kind))
    _rule(f, no, "socket", sc.Arg(0, sc.MASKED_EQ, _LOW32, AF_NETLINK),
          sc.Arg(2, sc.NE, NETLINK_ROUTE))
    for policy in REALTIME_POLICIES:
        _rule(f, no, "sched_setscheduler", sc.Arg(1, sc.MASKED_EQ, _POLICY_MASK, policy))
    # every process of a uid, and the uid is 0: every root process of the host
    _rule(f, no, "setpriority", sc.Arg(0, sc.MASKED_EQ, _LOW32, PRIO_USER))
    _rule(f, no, "ioprio_set", sc.Arg(0, sc.MASKED_EQ, _LOW32, IOPRIO_WHO_USER))
    for req in TTY_INJECTING:
        _rule(f, no, "ioctl", sc.Arg(1, sc.MASKED_EQ, _LOW32, req))
    return f


def program(f: sc.SyscallFilter) -> bytes:
    """The classic BPF libseccomp generates for ``f`` (what ``load`` installs)."""
    with tempfile.TemporaryFile() as out:
        f.export_bpf(out)
        out.seek(0)
        return out.read()


def install(f: sc.SyscallFilter) -> None:
    """Load ``f`` into this thread (and what it forks and executes from now on); the caller
    has set no_new_privs."""
    f.load()


def listener(f: sc.SyscallFilter) -> int:
    """The user-notification descriptor of ``f``, loaded with a NOTIFY rule (libseccomp asks
    for a listener then; pyseccomp has no call for the descriptor itself)."""
    fd = int(sc._libseccomp.seccomp_notify_fd(f._filter))
    if fd < 0:
        raise OSError(-fd, f"seccomp_notify_fd: {os.strerror(-fd)}")
    return fd


def supported() -> bool:
    """libseccomp knows this architecture (it resolves a name every architecture has)."""
    return _known("read")
