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

Each exec is a userland of its own for now: two execs into one instance do not see each other's
processes (the instance-wide userland that boots with the kernel is issue 22's next step).
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
from partition.guest import userland

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
    # the kernel, held while its cgroups are read; closed before the userland is forked,
    # whose init never execs: a pidfd it inherited would hand the kernel's descriptors to
    # any program inside (pidfd_getfd)
    pidfd = linux.pidfd_open(kernel)
    try:
        halted = not userland.in_cgroups_of(kernel, procs)
    finally:
        os.close(pidfd)
    if halted:
        raise NotLoaded(f"instance {name!r} halted while the command was being set up",
                        f"mkctl start {name}, then try again")
    identity = userland.Identity(name=name, cpus=list(info["cpus"]), cgroup_procs=procs,
                                 rootfs=info.get("rootfs"), hide=[client.run_dir],
                                 kernel_pid=kernel, shared=dict(info.get("shared") or {}))
    if tty:
        code, started = _on_terminal(identity, argv, interactive)
    else:
        started = userland.start(identity, argv)
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


def _on_terminal(identity: userland.Identity, argv: list[str],
                 interactive: bool) -> tuple[int, userland.Userland]:
    """``-t``: the command on a fresh pty (the window size of mkctl's terminal already on
    it), relayed until its userland is gone; the pty closed, the userland reaped, always."""
    master, slave = terminal.open_pty(0)
    try:
        started = userland.start(identity, argv, terminal=slave)
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
