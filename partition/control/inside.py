"""``mkctl exec NAME -- CMD ARGS``: a command run inside a running instance (kerf 0.4's exec).

The command is a process under the instance: it joins the instance's cgroups (its cpuset, memory
limit and pids limit, and it dies with the instance), is pinned to its CPUs, enters its mount and
IPC namespaces (the read-only root, no /proc, the minimal /dev the kernel sees), drops every
capability and runs under the same seccomp filter as the kernel (guest/containment.py: no fork,
no sockets, signals to itself only). Its stdin, stdout and stderr are mkctl's, so they are
relayed as they are; its exit status is mkctl's (128 + N for a signal N, 127 when it could not be
started). The real kerf reaches a command over multikernel vsock; the emulator has no vsock, so
this is the emulator's own path to the same result (docs/kerf.md).
"""

from __future__ import annotations

import os
import sys
from typing import Any

from partition import linux
from partition.control.client import Client
from partition.errors import NotLoaded
from partition.guest.containment import drop_privileges, join_cgroups, seccomp_program

CLONE_NEWNS, CLONE_NEWIPC = 0x00020000, 0x08000000
EXIT_CANNOT_START = 127


def _in_cgroups_of(pid: int, procs: list[str]) -> bool:
    """``pid`` is still the instance's (in its cgroup): it did not die and get reused."""
    for path in procs:
        try:
            with open(path) as f:
                if str(pid) in f.read().split():
                    return True
        except OSError:
            pass
    return not procs


def run(run_dir: str | None, name: str, argv: list[str]) -> int:
    info: dict[str, Any] = Client(run_dir).call("exec_into", name=name, argv=argv)
    pidfd = linux.pidfd_open(int(info["pid"]))
    try:
        if not _in_cgroups_of(int(info["pid"]), list(info["procs"])):
            raise NotLoaded(f"instance {name!r} halted while the command was being set up",
                            f"mkctl start {name}, then try again")
        r, w = os.pipe2(os.O_CLOEXEC)
        child = os.fork()
        if child == 0:                                      # the command, from here on
            try:
                os.close(r)
                join_cgroups(list(info["procs"]))
                os.sched_setaffinity(0, info["cpus"])
                linux.setns(pidfd, CLONE_NEWNS | CLONE_NEWIPC)
                os.chdir("/")
                drop_privileges()
                if os.uname().machine == "x86_64":
                    linux.install_seccomp(seccomp_program(os.getpid()))
                os.execvp(argv[0], argv)
            except BaseException as exc:                    # report, then die
                try:
                    os.write(w, f"{type(exc).__name__}: {exc}".encode()[:1000])
                finally:
                    os._exit(EXIT_CANNOT_START)
        os.close(w)
        why = b""
        while chunk := os.read(r, 4096):
            why += chunk
        os.close(r)
        _, status = os.waitpid(child, 0)
    finally:
        os.close(pidfd)
    if why:
        print(f"mkctl exec: {argv[0]}: could not be started inside {name!r}: "
              f"{why.decode(errors='replace')}", file=sys.stderr)
    if os.WIFSIGNALED(status):
        return 128 + os.WTERMSIG(status)
    return os.waitstatus_to_exitcode(status)
