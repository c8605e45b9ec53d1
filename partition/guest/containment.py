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
   uid 0 from meaning anything, every capability dropped from every set, ``no_new_privs``,
   and not dumpable (no process of the same uid may ptrace it or take its descriptors);
4. **seccomp**: a filter that kills the process (SIGSYS) on any system call an instance of the
   real machine could not make: signalling another process by any path (``kill`` and friends
   only on itself; ``pidfd_send_signal`` only with the IPI signal, on the pidfds the host gave
   it; ``F_SETOWN``/``F_SETSIG``/``FIOSETOWN``, which aim SIGIO; ``prlimit`` on another),
   ptrace and cross-process memory access, taking descriptors from other processes, mounts and
   namespaces, re-pinning or real-time scheduling, reboot, kexec, modules, io_uring (which
   would bypass the filter), file locks and leases (a read-only file can still be locked
   against others), sockets of its own (the doorbell channel is its only one), forking (a
   kernel is one process; threads are allowed), and x32 system calls. The filter is built by
   name with libseccomp for the running architecture (guest/filters.py, ``kernel_filter``).

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

from partition import linux
from partition.guest import filters

# prctl options and securebits
PR_CAPBSET_DROP, PR_SET_SECUREBITS, PR_CAP_AMBIENT, PR_SET_NO_NEW_PRIVS = 24, 28, 47, 38
PR_CAP_AMBIENT_CLEAR_ALL = 4
PR_SET_DUMPABLE = 4
SECUREBITS_LOCKED_NOROOT = 0x2F     # NOROOT, NO_SETUID_FIXUP, KEEP_CAPS_LOCKED and their locks
CAP_LAST = 63                        # dropping a cap the kernel does not know fails: stop there
SIGPENDING = 256                     # RLIMIT_SIGPENDING of an instance


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
    """No real-time priority, a small signal budget, no capabilities, no new privileges, and
    not dumpable: a process of the same uid 0 and no capabilities (a program of a userland, a
    peer kernel) cannot ptrace this one, read its ``/proc/<pid>/fd`` or take its descriptors
    with ``pidfd_getfd`` (the host, with CAP_SYS_PTRACE, still can: adoption does)."""
    linux.prctl(PR_SET_DUMPABLE, 0)
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
    if filters.supported():
        filters.install(filters.kernel_filter(os.getpid()))
    else:
        missing.append(f"seccomp on {os.uname().machine}")
    return missing
