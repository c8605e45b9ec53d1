"""``mkctl exec`` into an instance's running userland: the command's process born inside it.

The userland (its init, namespaces and mounts) is the host's (host/userlands.py, whose init is
guest/userinit.py); a command joins it: mkctl forks a *relay*, which joins the instance's
cgroups and, by a pidfd of the init (checked to be the one the host named, by its start time),
the init's PID, mount, UTS, IPC, network and cgroup namespaces with one setns(2); then it forks
the command's process, born inside the PID namespace, which pins itself to the instance's CPUs,
drops its privileges and installs the userland filter as guest/userland.py's programs do, and
execs. The relay relays its exit status and dies with mkctl (forwarding a SIGHUP, as a hung-up
terminal would); what the command leaves behind stays in the userland, reaped by its init.
"""

from __future__ import annotations

import array
import os
import signal
import socket
import stat
from dataclasses import dataclass

from partition import linux
from partition.guest import filters, userinit
from partition.guest.containment import drop_privileges
from partition.guest.userland import (
    CLONE_NEWCGROUP,
    CLONE_NEWIPC,
    CLONE_NEWNET,
    CLONE_NEWNS,
    CLONE_NEWPID,
    CLONE_NEWUTS,
    EXIT_CANNOT_START,
    MNT_DETACH,
    UMOUNT_NOFOLLOW,
    Userland,
    attach_mount,
    clone_mount,
    enter_relay,
    exec_program,
    exit_code,
    tell,
)


@dataclass(frozen=True)
class Target:
    """A running instance-wide userland, as the host names it to ``mkctl exec``: its init's
    pid and start (field 22 of /proc/PID/stat, in clock ticks: a pid reused since reads
    another), and what the command's process joins besides its namespaces."""

    name: str
    init_pid: int
    init_start: int
    cpus: list[int]
    cgroup_procs: list[str]
    kernel_pid: int | None = None


def start_ticks(pid: int) -> int | None:
    """When ``pid`` started (clock ticks since boot), None if there is no such process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
        return int(raw[raw.rindex(b")") + 2:].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def join(target: Target, argv: list[str], env: dict[str, str] | None = None,
         stdout: int | None = None, terminal: int | None = None) -> Userland:
    """Start ``argv`` inside the running userland ``target`` (host/userlands.py started it):
    a *relay* forked here joins the instance's cgroups and the init's namespaces by a pidfd
    (setns, Linux 5.8), checked to be the init the host named, then forks the program, which
    is so born inside the PID namespace, pins itself, drops its privileges, installs the
    userland filter and execs. Two commands joined so see each other's processes, share /tmp
    and reach each other over 127.0.0.1. ``stdout`` and ``terminal`` as for ``start``; what
    the program leaves behind (a server it started) stays in the userland, whose init reaps
    it. ProcessLookupError: the init is gone, or is not the one named."""
    if not argv:
        raise ValueError("no program to run")
    pidfd = linux.pidfd_open(target.init_pid)
    try:
        if start_ticks(target.init_pid) != target.init_start:
            raise ProcessLookupError(f"the userland of {target.name!r} ended while the "
                                     "command was being set up")
        # the pty, as a mount detached from this namespace, to show under its name inside
        tree = _terminal_tree(terminal) if terminal is not None else None
        r, w = os.pipe2(os.O_CLOEXEC)
        caller = os.getpid()
        relay = os.fork()
        if relay == 0:
            try:
                os.close(r)
                _join_relay(target, pidfd, tree, argv, env, w, caller, stdout, terminal)
            except BaseException as exc:                  # report, then die
                tell(w, exc)
            os._exit(EXIT_CANNOT_START)
        os.close(w)
        if tree is not None:
            os.close(tree[1])
        return Userland(relay, r)
    finally:
        os.close(pidfd)


def _join_relay(target: Target, pidfd: int, tree: tuple[str, int] | None, argv: list[str],
                env: dict[str, str] | None, why: int, caller: int, stdout: int | None,
                terminal: int | None) -> None:
    """The caller-side child of ``join``: it ends with the caller (a SIGHUP it forwards, as a
    hung-up terminal would), joins, forks the program inside and relays its status."""
    enter_relay(caller, signal.SIGHUP, target.name, target.cgroup_procs, target.kernel_pid,
                why, stdout, terminal, pidfd, tree[1] if tree else None)
    linux.setns(pidfd, CLONE_NEWPID | CLONE_NEWNS | CLONE_NEWUTS | CLONE_NEWIPC
                | CLONE_NEWNET | CLONE_NEWCGROUP)
    os.close(pidfd)
    shown = _show_terminal(*tree) if tree is not None else None
    rdev = os.fstat(terminal).st_rdev if terminal is not None else 0
    main = os.fork()
    if main == 0:
        try:
            linux.set_parent_death_signal(0)
            if terminal is None:
                os.setpgid(0, 0)     # a group of its own: what it leaves there ends with it
            if target.cpus:
                os.sched_setaffinity(0, target.cpus)
            drop_privileges()
            _install_filter()
            exec_program(argv, env, stdout, terminal)
        except BaseException as exc:                  # report, then die
            tell(why, exc, argv[0])
        os._exit(EXIT_CANNOT_START)
    os.close(why)
    if terminal is not None:                          # the program's alone: its EOF is ours
        os.close(terminal)

    def forward(sig: int, _frame: object) -> None:
        try:
            os.killpg(main, sig)
        except (ProcessLookupError, PermissionError):
            pass
        if sig == signal.SIGHUP:                      # the caller is gone: so is its relay
            _hide_terminal(shown, rdev)
            os._exit(128 + sig)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, forward)
    # the program's exit seen, not yet reaped (its pid, so its group's, stays its own), then
    # what it left in its process group killed, as a hung-up terminal would: a program that
    # is to outlive its command leaves the group (setsid) and stays in the userland
    os.waitid(os.P_PID, main, os.WEXITED | os.WNOWAIT)
    try:
        os.killpg(main, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    _, status = os.waitpid(main, 0)
    _hide_terminal(shown, rdev)
    os._exit(exit_code(status))


def _install_filter() -> None:
    """The userland filter, its reboot(2) a user notification whose listener goes to the
    userland's init (guest/userinit.py answers it: the instance restarts). Were the init not to
    take it, a reboot would fail (ENOSYS), never reach anything else."""
    own = filters.userland_filter(reboot_notify=True)
    filters.install(own)
    listener = filters.listener(own)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            # (sendmsg: Python 3.11's send_fds drops its address)
            s.sendmsg([b"l"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                array.array("i", [listener]))], socket.MSG_DONTWAIT,
                      userinit.REBOOT_INBOX)     # (a full inbox: no reboot, never a hang)
    except OSError:
        pass
    finally:
        os.close(listener)


def _terminal_tree(terminal: int) -> tuple[str, int] | None:
    """The pty's name and a detached bind mount of it (open_tree), made in the caller's mount
    namespace, where the pty is; None when it has no /dev/pts name."""
    try:
        name = os.ttyname(terminal)
        if not name.startswith("/dev/pts/"):
            return None
        return name, clone_mount(name)
    except OSError:
        return None


def _show_terminal(name: str, tree: int) -> str | None:
    """In the userland's mount namespace: the pty bound at its own name under /dev/pts (that
    one pty, never the host's devpts), so ``tty`` and ttyname(3) work inside. The userland's
    /dev/pts is a tmpfs no program inside can write (guest/userland.py: owned by nobody), so
    the name is the relay's own; made without following anything all the same. None (a
    nameless terminal) if that fails."""
    try:
        try:
            os.close(os.open(name, os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_WRONLY
                             | os.O_CLOEXEC, 0o600))
        except FileExistsError:          # a relay killed before it hid its pty: only a file
            mode = os.lstat(name).st_mode          # or a pty (never a link) is shown over
            if not (stat.S_ISREG(mode) or stat.S_ISCHR(mode)):
                return None
        attach_mount(tree, name)
        return name
    except OSError:
        return None
    finally:
        os.close(tree)


def _hide_terminal(name: str | None, rdev: int) -> None:
    """The pty's name gone from the userland's /dev/pts again (the relay's last act): its
    mount taken off only if the name still shows this pty (``rdev``), never through a link."""
    if name is None:
        return
    try:
        st = os.lstat(name)
        if stat.S_ISCHR(st.st_mode) and st.st_rdev == rdev:
            linux.umount(name, MNT_DETACH | UMOUNT_NOFOLLOW)
        if stat.S_ISREG(os.lstat(name).st_mode):
            os.unlink(name)
    except OSError:
        pass
