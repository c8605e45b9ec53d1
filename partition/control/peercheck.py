"""Where a client of the supervisor's socket comes from: the host's side of the machine, or an
instance (of this machine or of any other) that must not drive a machine.

The socket's credentials alone cannot tell them apart: a program in a userland runs as uid 0
(without capabilities, docs/userland.md), as the operator does, and it can see another
machine's run directory, socket included. So the daemon looks at the peer's process itself
(docs/architecture.md, the trust model): one in another PID namespace than the supervisor's
(every userland has its own) or in any machine's instance cgroup (``multikernel-*/i<id>``: a
kernel, its parked successor, whatever they forked) is refused. The process is held by a
pidfd while it is looked at (SO_PEERPIDFD, or pidfd_open of SO_PEERCRED's pid), and is checked
to be alive after the look: what was read was that process's, never a later one's at its pid.
"""

from __future__ import annotations

import os
import re
import signal
import socket

#: SO_PEERPIDFD (Linux 6.5): a pidfd of the process that connected, from the kernel itself
SO_PEERPIDFD = 77
#: the cgroup directories of every machine's instances (host/cgroups.py:
#: ``multikernel-<pid>-<key>/i<id>``, and whatever lies under one): not a systemd unit or a
#: machine's own base that happens to be named ``multikernel-...``
INSTANCE_CGROUP = re.compile(r"/multikernel-[^/]+/i[0-9]+(/|$)")


def _nspid_depth(status: str) -> int:
    """How many PID namespaces a process's ``NSpid:`` line names (1: the proc mount's own)."""
    for line in status.splitlines():
        if line.startswith("NSpid:"):
            return len(line.split()) - 1
    return 1                              # (a kernel without NSpid: no namespaces to tell)


def _own_depth() -> int:
    with open("/proc/self/status") as f:
        return _nspid_depth(f.read())


def _in_instance_cgroup(cgroup: str) -> bool:
    """``/proc/PID/cgroup`` names an instance's cgroup of any machine, in any hierarchy."""
    return any(INSTANCE_CGROUP.search(line.split(":", 2)[-1]) for line in cgroup.splitlines())


def _pidfd(sock: socket.socket, pid: int) -> int:
    try:
        return sock.getsockopt(socket.SOL_SOCKET, SO_PEERPIDFD)
    except OSError:                       # (before Linux 6.5)
        return os.pidfd_open(pid)


def refusal(sock: socket.socket, pid: int) -> str:
    """Why the process behind ``sock`` (SO_PEERCRED's ``pid``) may not drive a machine, or ""
    when it is on the host's side of its machines."""
    if pid <= 0:                          # not visible from here: another namespace's
        return "its process is in another PID namespace"
    try:
        pidfd = _pidfd(sock, pid)
    except OSError:
        return "its process is gone"
    try:
        try:
            with open(f"/proc/{pid}/status") as f:
                status = f.read()
            with open(f"/proc/{pid}/cgroup") as f:
                cgroup = f.read()
        except OSError:
            return "its process is gone"
        try:
            signal.pidfd_send_signal(pidfd, 0)
        except ProcessLookupError:
            return "its process is gone"  # (what was read may be a later process's)
        except PermissionError:
            pass                          # alive, and not ours to signal: enough
        if _nspid_depth(status) != _own_depth():
            return "its process is in another PID namespace (an instance's userland)"
        if _in_instance_cgroup(cgroup):
            return "its process is in an instance's cgroup"
        return ""
    finally:
        os.close(pidfd)
