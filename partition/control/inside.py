"""``mkctl exec NAME -- CMD ARGS``: a command run inside a running instance (kerf 0.4's exec).

The command runs in a userland of the instance (guest/userland.py): in the instance's cgroups
(its cpuset, memory limit and process limit, and it dies with the instance), pinned to its CPUs,
in PID, UTS, IPC, mount, network and cgroup namespaces of its own (it sees only its own
processes, the instance's name as hostname, a read-only root with private /tmp, /run and
/var/tmp, a fresh /proc and only ``lo``), without capabilities and under the userland seccomp
filter (guest/filters.py: fork, exec, pipes, signals among its own processes and local sockets
allowed; mounts, new namespaces, kexec, modules, bpf, raw sockets, real-time scheduling
refused). Its stdin, stdout and stderr are mkctl's, so they are relayed as they are; its exit
status is mkctl's (128 + N for a signal N, 127 when it could not be started). The real kerf
reaches a command over multikernel vsock; the emulator has no vsock, so this is the emulator's
own path to the same result (docs/kerf.md, docs/userland.md).

With ``-t`` (``-it`` for a shell) the command gets a terminal instead: a pty whose slave is its
controlling terminal inside, mkctl's terminal in raw mode relaying both ways (control/terminal.py),
so job control, Ctrl-C to the foreground job inside and the window size work as in a terminal.

Every exec joins the instance's one userland (host/userlands.py starts it with the kernel, or
at the first exec; guest/userjoin.py joins it): two execs into one instance see each other's
processes, share /tmp and reach each other over 127.0.0.1, and what a command leaves running
(a server) stays there until the instance's kernel ends.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Any

from partition import linux
from partition.control import terminal
from partition.control.client import Client
from partition.errors import NotLoaded
from partition.guest import userjoin, userland

EXIT_CANNOT_START = userland.EXIT_CANNOT_START


def run(run_dir: str | None, name: str, argv: list[str], tty: bool = False,
        interactive: bool = False) -> int:
    """Run ``argv`` inside the instance ``name``; its exit status. ``tty``: on a pty of its
    own (mkctl's stdin must be a terminal); ``interactive`` with it: mkctl's stdin relayed to
    it (without ``tty``, stdin is the command's own, as it always was)."""
    if tty:
        terminal.require_terminal(0)
    client = Client(run_dir)
    info: dict[str, Any] = client.call("exec_into", name=name, argv=argv)
    kernel, procs = int(info["pid"]), list(info["procs"])
    # the kernel, held while its cgroups are read; closed before the relay is forked: a
    # pidfd a process inside inherited would hand the kernel's descriptors to it
    pidfd = linux.pidfd_open(kernel)
    try:
        halted = not userland.in_cgroups_of(kernel, procs)
    finally:
        os.close(pidfd)
    if halted:
        raise NotLoaded(f"instance {name!r} halted while the command was being set up",
                        f"mkctl start {name}, then try again")
    target = userjoin.Target(name=name, init_pid=int(info["init"]),
                             init_start=int(info["init_start"]), cpus=list(info["cpus"]),
                             cgroup_procs=procs, kernel_pid=kernel)
    if tty:
        code, started = _on_terminal(target, argv, interactive)
    else:
        started = _join(target, argv)
        # as a shell waits for its foreground job: Ctrl-C is the command's to act on
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            code = started.wait()
        finally:
            signal.signal(signal.SIGINT, previous)
    if started.reason:
        print(f"mkctl exec: {argv[0]}: could not be started inside {name!r}: "
              f"{started.reason}", file=sys.stderr)
    return code


def _join(target: userjoin.Target, argv: list[str],
          terminal: int | None = None) -> userland.Userland:
    try:
        return userjoin.join(target, argv, terminal=terminal)
    except ProcessLookupError:
        raise NotLoaded(f"instance {target.name!r} halted while the command was being set up",
                        f"mkctl start {target.name}, then try again") from None


def _on_terminal(target: userjoin.Target, argv: list[str],
                 interactive: bool) -> tuple[int, userland.Userland]:
    """``-t``: the command on a fresh pty (the window size of mkctl's terminal already on
    it), relayed until its userland is gone; the pty closed, the userland reaped, always."""
    master, slave = terminal.open_pty(0)
    try:
        started = _join(target, argv, terminal=slave)
    except BaseException:
        os.close(master)
        raise
    finally:
        os.close(slave)                     # the program's alone now: its end is our EIO
    done = os.pidfd_open(started.pid)
    try:
        terminal.interactive(master, done, interactive)
    except BaseException:
        # mkctl is leaving (SIGTERM, SIGHUP, an error): the terminal hangs up, and as a
        # hangup would, that ends the program (the init then kills what it left)
        started.signal(signal.SIGHUP)
        raise
    finally:
        os.close(done)
        os.close(master)
        code = started.wait()
    return code, started
