"""What the trampoline does to an instance before any kernel code runs, so that a faulty or
hostile kernel can harm only what the real machine would let it harm (its own partition and the
areas shared by design).

In order:

1. **cgroups**: it writes itself into the cgroups the host made for it (host/cgroups.py):
   its CPUs, a memory limit, a process limit, and one switch that kills all it forked;
2. **a private mount namespace**: every mount read-only (a kernel's scratch space is its
   partition); ``/proc`` covered by an empty tmpfs (no other process, and no host descriptor
   under ``/proc/<pid>/fd``, is reachable from it);
3. **no privileges**: no real-time priority (``RLIMIT_RTPRIO`` 0), the securebits that stop
   uid 0 from meaning anything, every capability dropped from every set, ``no_new_privs``;
4. **seccomp**: a filter that kills the process (SIGSYS) on any system call an instance of the
   real machine could not make: signalling another process (``kill`` and friends only on
   itself; ``pidfd_send_signal`` only with the IPI signal, on the pidfds the host gave it),
   ptrace and cross-process memory access, taking descriptors from other processes, mounts and
   namespaces, re-pinning or real-time scheduling, reboot, kexec, modules, io_uring (which
   would bypass the filter), and x32 system calls.

The uid stays 0, stripped of every capability: the interpreter and kernel images live in
directories only root may enter on this project's machines (``/root/.pyenv``), and the mount
namespace already denies writes. So a kernel may still *read* what root may read; it can write
nothing outside the arena, signal nothing but its own process and its peers' doorbells, and
start nothing that outlives it. docs/architecture.md has the whole trust model.
"""

from __future__ import annotations

import os
import resource
import struct

from partition import linux
from partition.abi.constants import IPI_SIGNAL

# prctl options and securebits
PR_CAPBSET_DROP, PR_SET_SECUREBITS, PR_CAP_AMBIENT, PR_SET_NO_NEW_PRIVS = 24, 28, 47, 38
PR_CAP_AMBIENT_CLEAR_ALL = 4
SECUREBITS_LOCKED_NOROOT = 0x2F     # NOROOT, NO_SETUID_FIXUP, KEEP_CAPS_LOCKED and their locks
CAP_LAST = 63                        # dropping a cap the kernel does not know fails: stop there

# seccomp_data offsets and return actions; classic BPF opcodes
_NR_OFF, _ARCH_OFF, _ARG0_OFF = 0, 4, 16
RET_ALLOW, RET_KILL_PROCESS = 0x7FFF0000, 0x80000000
_LD_W_ABS, _JEQ_K, _JSET_K, _RET_K = 0x20, 0x15, 0x45, 0x06
AUDIT_ARCH_X86_64 = 0xC000003E
X32_SYSCALL_BIT = 0x40000000

#: killed outright: what no instance of the real machine can do (x86_64 numbers)
FORBIDDEN_X86_64 = {
    "ptrace": 101, "process_vm_readv": 310, "process_vm_writev": 311, "process_madvise": 440,
    "pidfd_open": 434, "pidfd_getfd": 438, "kcmp": 312,
    "mount": 165, "umount2": 166, "pivot_root": 155, "chroot": 161, "unshare": 272, "setns": 308,
    "open_tree": 428, "move_mount": 429, "fsopen": 430, "fsconfig": 431, "fsmount": 432,
    "fspick": 433, "mount_setattr": 442, "name_to_handle_at": 303, "open_by_handle_at": 304,
    "reboot": 169, "kexec_load": 246, "kexec_file_load": 320, "init_module": 175,
    "finit_module": 313, "delete_module": 176, "bpf": 321, "perf_event_open": 298,
    "userfaultfd": 323, "swapon": 167, "swapoff": 168, "acct": 163, "quotactl": 179,
    "settimeofday": 164, "clock_settime": 227, "adjtimex": 159, "clock_adjtime": 305,
    "sethostname": 170, "setdomainname": 171, "iopl": 172, "ioperm": 173, "syslog": 103,
    "add_key": 248, "request_key": 249, "keyctl": 250,
    "sched_setaffinity": 203, "sched_setscheduler": 144, "sched_setparam": 142,
    "sched_setattr": 314, "io_uring_setup": 425, "io_uring_enter": 426, "io_uring_register": 427,
}
#: allowed only with the process itself as the target (arg 0): raise(), pthread_kill()
SELF_ONLY_X86_64 = {"kill": 62, "tkill": 200, "tgkill": 234, "rt_sigqueueinfo": 129,
                    "rt_tgsigqueueinfo": 297}
PIDFD_SEND_SIGNAL_X86_64 = 424


def _insn(code: int, jt: int, jf: int, k: int) -> bytes:
    return struct.pack("<HBBI", code, jt, jf, k & 0xFFFFFFFF)


def seccomp_program(own_pid: int) -> bytes:
    """The filter, as classic BPF: arch check, x32 check, the forbidden list, the self-only
    signals (``own_pid``), the IPI-only pidfd signal; everything else is allowed."""
    forbidden = sorted(FORBIDDEN_X86_64.values())
    self_only = sorted(SELF_ONLY_X86_64.values())
    head: list[tuple[int, int, int, int]] = []      # (code, jt, jf, k) with symbolic jumps
    KILL, ALLOW, SELF, IPI = -1, -2, -3, -4
    head.append((_LD_W_ABS, 0, 0, _ARCH_OFF))
    head.append((_JEQ_K, 0, KILL, AUDIT_ARCH_X86_64))
    head.append((_LD_W_ABS, 0, 0, _NR_OFF))
    head.append((_JSET_K, KILL, 0, X32_SYSCALL_BIT))
    head += [(_JEQ_K, KILL, 0, nr) for nr in forbidden]
    head += [(_JEQ_K, SELF, 0, nr) for nr in self_only]
    head.append((_JEQ_K, IPI, 0, PIDFD_SEND_SIGNAL_X86_64))
    head.append((_RET_K, 0, 0, RET_ALLOW))
    labels = {SELF: len(head)}
    tail = [(_LD_W_ABS, 0, 0, _ARG0_OFF), (_JEQ_K, ALLOW, KILL, own_pid)]
    labels[IPI] = len(head) + len(tail)
    tail += [(_LD_W_ABS, 0, 0, _ARG0_OFF + 8), (_JEQ_K, ALLOW, KILL, int(IPI_SIGNAL))]
    labels[ALLOW] = len(head) + len(tail)
    labels[KILL] = labels[ALLOW] + 1
    tail += [(_RET_K, 0, 0, RET_ALLOW), (_RET_K, 0, 0, RET_KILL_PROCESS)]
    out = []
    for i, (code, jt, jf, k) in enumerate(head + tail):
        rel = [labels[j] - i - 1 if j < 0 else j for j in (jt, jf)]
        assert all(0 <= r < 256 for r in rel), "a BPF jump beyond 255 instructions"
        out.append(_insn(code, rel[0], rel[1], k))
    return b"".join(out)


def join_cgroups(procs_files: list[str]) -> None:
    for path in procs_files:
        with open(path, "w") as f:
            f.write("0")                      # "0": the writing process itself


def private_mounts() -> None:
    """Every mount read-only (a kernel's scratch space is its partition), and /proc hidden."""
    linux.unshare(linux.CLONE_NEWNS)
    linux.mount(None, "/", None, linux.MS_REC | linux.MS_PRIVATE)
    linux.remount_tree_readonly("/")
    linux.mount("tmpfs", "/proc", "tmpfs",
                linux.MS_NOSUID | linux.MS_NODEV | linux.MS_NOEXEC | linux.MS_RDONLY,
                "size=4k,mode=555")


def drop_privileges() -> None:
    resource.setrlimit(resource.RLIMIT_RTPRIO, (0, 0))
    linux.prctl(PR_SET_SECUREBITS, SECUREBITS_LOCKED_NOROOT)
    for cap in range(CAP_LAST + 1):
        try:
            linux.prctl(PR_CAPBSET_DROP, cap)
        except OSError:
            break                             # past the kernel's last capability
    linux.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)
    linux.drop_capabilities()
    linux.prctl(PR_SET_NO_NEW_PRIVS, 1)


def contain(cgroup_procs: list[str]) -> list[str]:
    """All four steps; returns what could not be done here (an empty list on this project's
    machines), for the console and the host's event log."""
    missing = []
    join_cgroups(cgroup_procs)
    if not cgroup_procs:
        missing.append("cgroups")
    if not linux.containment_supported():
        return [*missing, f"namespaces, capabilities and seccomp on {os.uname().machine}"]
    private_mounts()
    drop_privileges()
    if os.uname().machine == "x86_64":
        linux.install_seccomp(seccomp_program(os.getpid()))
    else:
        missing.append(f"seccomp on {os.uname().machine}")
    return missing
