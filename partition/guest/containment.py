"""What the trampoline does to an instance before any kernel code runs, so that a faulty or
hostile kernel can harm only what the real machine would let it harm (its own partition and the
areas shared by design).

In order:

1. **cgroups**: it writes itself into the cgroups the host made for it (host/cgroups.py):
   its CPUs, a memory limit, a process limit, and one switch that kills all it forked;
2. **private mount and IPC namespaces**: every mount read-only (a kernel's scratch space is its
   partition); ``/proc`` covered by an empty tmpfs (no other process, and no host descriptor
   under ``/proc/<pid>/fd``, is reachable from it); ``/dev`` holding only null, zero, full,
   random and urandom (no disk, tty, kvm, kmsg or userfaultfd node); the machine's run
   directory covered (its socket and event log out of reach); SysV IPC and POSIX message
   queues of its own, gone with it;
3. **no privileges**: no real-time priority (``RLIMIT_RTPRIO`` 0), the securebits that stop
   uid 0 from meaning anything, every capability dropped from every set, ``no_new_privs``;
4. **seccomp**: a filter that kills the process (SIGSYS) on any system call an instance of the
   real machine could not make: signalling another process by any path (``kill`` and friends
   only on itself; ``pidfd_send_signal`` only with the IPI signal, on the pidfds the host gave
   it; ``F_SETOWN``/``F_SETSIG``/``FIOSETOWN``, which aim SIGIO; ``prlimit`` on another),
   ptrace and cross-process memory access, taking descriptors from other processes, mounts and
   namespaces, re-pinning or real-time scheduling, reboot, kexec, modules, io_uring (which
   would bypass the filter), file locks and leases (a read-only file can still be locked
   against others), sockets of its own (the doorbell channel is its only one), forking (a
   kernel is one process; threads are allowed), and x32 system calls.

The uid stays 0, stripped of every capability: the interpreter and kernel images live in
directories only root may enter on this project's machines (``/root/.pyenv``), and the mount
namespace already denies writes. So a kernel may still *read* what root may read; it can write
nothing outside the arena, signal nothing but its own process and its peers' doorbells, and
start nothing that outlives it. docs/architecture.md has the whole trust model.
"""

from __future__ import annotations

import os
import resource
import stat
import struct

from partition import linux
from partition.abi.constants import IPI_SIGNAL

# prctl options and securebits
PR_CAPBSET_DROP, PR_SET_SECUREBITS, PR_CAP_AMBIENT, PR_SET_NO_NEW_PRIVS = 24, 28, 47, 38
PR_CAP_AMBIENT_CLEAR_ALL = 4
SECUREBITS_LOCKED_NOROOT = 0x2F     # NOROOT, NO_SETUID_FIXUP, KEEP_CAPS_LOCKED and their locks
CAP_LAST = 63                        # dropping a cap the kernel does not know fails: stop there
SIGPENDING = 256                     # RLIMIT_SIGPENDING of an instance

# seccomp_data offsets and return actions; classic BPF opcodes
_NR_OFF, _ARCH_OFF, _ARG0_OFF = 0, 4, 16
RET_ALLOW, RET_KILL_PROCESS = 0x7FFF0000, 0x80000000
_LD_W_ABS, _JEQ_K, _JSET_K, _RET_K = 0x20, 0x15, 0x45, 0x06
AUDIT_ARCH_X86_64 = 0xC000003E
X32_SYSCALL_BIT = 0x40000000

#: killed outright: what no instance of the real machine can do (x86_64 numbers)
FORBIDDEN_X86_64 = {
    "ptrace": 101, "process_vm_readv": 310, "process_vm_writev": 311, "process_madvise": 440,
    "process_mrelease": 448, "pidfd_open": 434, "pidfd_getfd": 438, "kcmp": 312,
    "mount": 165, "umount2": 166, "pivot_root": 155, "chroot": 161, "unshare": 272, "setns": 308,
    "open_tree": 428, "move_mount": 429, "fsopen": 430, "fsconfig": 431, "fsmount": 432,
    "fspick": 433, "mount_setattr": 442, "name_to_handle_at": 303, "open_by_handle_at": 304,
    "reboot": 169, "kexec_load": 246, "kexec_file_load": 320, "init_module": 175,
    "finit_module": 313, "delete_module": 176, "bpf": 321, "perf_event_open": 298,
    "userfaultfd": 323, "swapon": 167, "swapoff": 168, "acct": 163, "quotactl": 179,
    "quotactl_fd": 443, "settimeofday": 164, "clock_settime": 227, "adjtimex": 159,
    "clock_adjtime": 305, "sethostname": 170, "setdomainname": 171, "iopl": 172, "ioperm": 173,
    "syslog": 103, "add_key": 248, "request_key": 249, "keyctl": 250, "lookup_dcookie": 212,
    "vhangup": 153, "uselib": 134, "personality": 135, "memfd_secret": 447,
    "migrate_pages": 256, "move_pages": 279,
    "sched_setaffinity": 203, "sched_setscheduler": 144, "sched_setparam": 142,
    "sched_setattr": 314, "io_uring_setup": 425, "io_uring_enter": 426, "io_uring_register": 427,
    # the limits every root process shares (inotify instances, queued signals, message queue
    # bytes are counted per user, and the uid is 0): a kernel needs none of these
    "inotify_init": 253, "inotify_init1": 294, "timer_create": 222, "mq_open": 240,
    "fanotify_init": 300, "fanotify_mark": 301,
    # a kernel is one process: no fork (a forked child's own violations would die unseen), and
    # no sockets of its own (its only socket is the doorbell channel the host gave it)
    "fork": 57, "vfork": 58, "socket": 41, "socketpair": 53, "connect": 42, "bind": 49,
    "listen": 50, "accept": 43, "accept4": 288, "flock": 73,
}
#: allowed only with the process itself as the target (arg 0): raise(), pthread_kill()
SELF_ONLY_X86_64 = {"kill": 62, "tkill": 200, "tgkill": 234, "rt_sigqueueinfo": 129,
                    "rt_tgsigqueueinfo": 297}
PRLIMIT64, FCNTL, IOCTL, CLONE, CLONE3, PIDFD_SEND_SIGNAL = 302, 72, 16, 56, 435, 424
#: allowed only on the process itself (0 or its own pid in argument 1, or 0 for
#: get_robust_list): a peer shares uid 0 and no capabilities, so the kernel's own permission
#: check would let it renice, re-prioritise or inspect another instance
SETPRIORITY, IOPRIO_SET, GET_ROBUST_LIST = 141, 251, 274
PRIO_PROCESS, IOPRIO_WHO_PROCESS = 0, 1
#: fcntl commands that reach other processes or lock others out: F_SETLK, F_SETLKW,
#: F_SETOWN, F_SETSIG, F_SETOWN_EX, F_OFD_SETLK, F_OFD_SETLKW, F_SETLEASE, F_NOTIFY; and
#: F_SETPIPE_SZ: a peer holds the write end of another instance's doorbell pipe, and would
#: resize that instance's object (no knob real hardware has on another core's IPI)
FCNTL_FORBIDDEN = (6, 7, 8, 10, 15, 37, 38, 1024, 1026, 1031)
#: ioctls that aim SIGIO at a process: FIOSETOWN, SIOCSPGRP
IOCTL_FORBIDDEN = (0x8901, 0x8902)
CLONE_THREAD = 0x00010000
RET_ERRNO_ENOSYS = 0x00050000 | 38


def _insn(code: int, jt: int, jf: int, k: int) -> bytes:
    return struct.pack("<HBBI", code, jt, jf, k & 0xFFFFFFFF)


def _arg(n: int) -> int:
    return _ARG0_OFF + 8 * n          # the low 32 bits of argument n (little-endian)


def _block(nr: int, body: list[tuple[int, int, int, int]]) -> list[tuple[int, int, int, int]]:
    """``if nr == <nr>: body`` (every body ends in a return); jumps stay local."""
    return [(_JEQ_K, 0, len(body), nr), *body]


def _one_of(arg: int, values: tuple[int, ...], hit: int, miss: int
            ) -> list[tuple[int, int, int, int]]:
    """Load argument ``arg``; return ``hit`` if it is one of ``values``, else ``miss``."""
    out = [(_LD_W_ABS, 0, 0, _arg(arg))]
    for v in values:
        out += [(_JEQ_K, 0, 1, v), (_RET_K, 0, 0, hit)]
    return [*out, (_RET_K, 0, 0, miss)]


def _which_who(process: int, own_pid: int) -> list[tuple[int, int, int, int]]:
    """Allow (which, who) = (``process``, 0 or ``own_pid``) only."""
    return [(_LD_W_ABS, 0, 0, _arg(0)), (_JEQ_K, 1, 0, process), (_RET_K, 0, 0, RET_KILL_PROCESS),
            *_one_of(1, (0, own_pid), RET_ALLOW, RET_KILL_PROCESS)]


def seccomp_program(own_pid: int) -> bytes:
    """The filter, as classic BPF: arch check, x32 check, the forbidden list, then the calls
    allowed with some arguments only; everything else is allowed. Every block returns, so no
    jump leaves its block and the program has no jump farther than a few instructions."""
    prog: list[tuple[int, int, int, int]] = [
        (_LD_W_ABS, 0, 0, _ARCH_OFF),
        (_JEQ_K, 1, 0, AUDIT_ARCH_X86_64), (_RET_K, 0, 0, RET_KILL_PROCESS),
        (_LD_W_ABS, 0, 0, _NR_OFF),
        (_JSET_K, 0, 1, X32_SYSCALL_BIT), (_RET_K, 0, 0, RET_KILL_PROCESS),
    ]
    for nr in sorted(FORBIDDEN_X86_64.values()):
        prog += _block(nr, [(_RET_K, 0, 0, RET_KILL_PROCESS)])
    for nr in sorted(SELF_ONLY_X86_64.values()):
        prog += _block(nr, _one_of(0, (own_pid,), RET_ALLOW, RET_KILL_PROCESS))
    prog += _block(PRLIMIT64, _one_of(0, (0, own_pid), RET_ALLOW, RET_KILL_PROCESS))
    # (which, who): PRIO_PROCESS (0) / IOPRIO_WHO_PROCESS (1) of itself; a process group or
    # "every process of my uid" (PRIO_USER with who 0) would reach every other instance
    prog += _block(SETPRIORITY, _which_who(PRIO_PROCESS, own_pid))
    prog += _block(IOPRIO_SET, _which_who(IOPRIO_WHO_PROCESS, own_pid))
    prog += _block(GET_ROBUST_LIST, _one_of(0, (0, own_pid), RET_ALLOW, RET_KILL_PROCESS))
    prog += _block(PIDFD_SEND_SIGNAL, _one_of(1, (int(IPI_SIGNAL),), RET_ALLOW,
                                              RET_KILL_PROCESS))
    prog += _block(FCNTL, _one_of(1, FCNTL_FORBIDDEN, RET_KILL_PROCESS, RET_ALLOW))
    prog += _block(IOCTL, _one_of(1, IOCTL_FORBIDDEN, RET_KILL_PROCESS, RET_ALLOW))
    prog += _block(CLONE, [(_LD_W_ABS, 0, 0, _arg(0)), (_JSET_K, 0, 1, CLONE_THREAD),
                           (_RET_K, 0, 0, RET_ALLOW), (_RET_K, 0, 0, RET_KILL_PROCESS)])
    prog += _block(CLONE3, [(_RET_K, 0, 0, RET_ERRNO_ENOSYS)])   # libc falls back to clone
    prog.append((_RET_K, 0, 0, RET_ALLOW))
    return b"".join(_insn(*insn) for insn in prog)


def join_cgroups(procs_files: list[str]) -> None:
    for path in procs_files:
        with open(path, "w") as f:
            f.write("0")                      # "0": the writing process itself


#: the device nodes an instance keeps: nothing that reaches hardware, the host's log or a tty
DEVICES = {"null": (1, 3), "zero": (1, 5), "full": (1, 7), "random": (1, 8), "urandom": (1, 9)}


def private_mounts(hide: list[str]) -> None:
    """A mount namespace where every mount is read-only (a kernel's scratch space is its
    partition), /proc is hidden, /dev holds only null, zero, full, random and urandom, and the
    directories in ``hide`` (the machine's run directory) are covered by an empty tmpfs; and an
    IPC namespace of its own, so SysV segments and message queues neither reach the host's nor
    outlive the instance."""
    linux.unshare(linux.CLONE_NEWNS | linux.CLONE_NEWIPC)
    linux.mount(None, "/", None, linux.MS_REC | linux.MS_PRIVATE)
    ro = linux.MS_NOSUID | linux.MS_NODEV | linux.MS_NOEXEC | linux.MS_RDONLY
    linux.mount("tmpfs", "/dev", "tmpfs", linux.MS_NOSUID | linux.MS_NOEXEC, "size=4k,mode=755")
    for name, (major, minor) in DEVICES.items():
        os.mknod(f"/dev/{name}", 0o666 | stat.S_IFCHR, os.makedev(major, minor))
    for path in hide:
        if os.path.isdir(path):
            linux.mount("tmpfs", path, "tmpfs", ro, "size=4k,mode=555")
    linux.remount_tree_readonly("/")
    linux.mount("tmpfs", "/proc", "tmpfs", ro, "size=4k,mode=555")


def drop_privileges() -> None:
    resource.setrlimit(resource.RLIMIT_RTPRIO, (0, 0))
    # signals queued to it count against root's shared budget: a small one of its own
    resource.setrlimit(resource.RLIMIT_SIGPENDING, (SIGPENDING, SIGPENDING))
    linux.prctl(PR_SET_SECUREBITS, SECUREBITS_LOCKED_NOROOT)
    for cap in range(CAP_LAST + 1):
        try:
            linux.prctl(PR_CAPBSET_DROP, cap)
        except OSError:
            break                             # past the kernel's last capability
    linux.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)
    linux.drop_capabilities()
    linux.prctl(PR_SET_NO_NEW_PRIVS, 1)


def contain(cgroup_procs: list[str], hide: list[str] | None = None) -> list[str]:
    """All four steps; returns what could not be done here (an empty list on this project's
    machines), for the console and the host's event log."""
    missing = []
    join_cgroups(cgroup_procs)
    if not cgroup_procs:
        missing.append("cgroups")
    if not linux.containment_supported():
        return [*missing, f"namespaces, capabilities and seccomp on {os.uname().machine} "
                          f"({linux.UNCONTAINED_DOORBELLS})"]
    private_mounts(hide or [])
    drop_privileges()
    if os.uname().machine == "x86_64":
        linux.install_seccomp(seccomp_program(os.getpid()))
    else:
        missing.append(f"seccomp on {os.uname().machine}")
    return missing
