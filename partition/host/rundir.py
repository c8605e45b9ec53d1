"""Where a machine keeps its socket, views and event log, and how stale ones are recognised.

Two machines side by side differ only in their run directory. The default is per user
(``$XDG_RUNTIME_DIR/multikernel`` or ``/tmp/multikernel-<uid>``); ``--run-dir`` or ``MK_RUN_DIR``
choose another.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass

import psutil

from partition.errors import MKError

ENV = "MK_RUN_DIR"
SOCKET = "mkctl.sock"
PIDFILE = "machine.pid"
EVENTS = "events.log"
SUPERVISOR_LOG = "supervisor.log"


# Views are rewritten (write + rename) on every state change: ~0.25 ms per file on ext4, ~0.02 ms
# on tmpfs. Run directories therefore live on a tmpfs, like /run on a real system.
TMPFS_BASE = "/dev/shm" if os.path.isdir("/dev/shm") else "/tmp"


def default_run_dir() -> str:
    base = os.environ.get("XDG_RUNTIME_DIR")
    if base and os.path.isdir(base):
        return os.path.join(base, "multikernel")
    return os.path.join(TMPFS_BASE, f"multikernel-{os.getuid()}")


def resolve(run_dir: str | None) -> str:
    return os.path.abspath(run_dir or os.environ.get(ENV) or default_run_dir())


def live_owner(run_dir: str) -> int | None:
    """PID of the machine that owns run_dir, if that process still runs; None otherwise."""
    try:
        with open(os.path.join(run_dir, PIDFILE)) as f:
            pid = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return None
    except psutil.Error:
        return None
    return pid


@dataclass
class RunDir:
    """A run directory a machine holds: ``owned`` when the machine made it (and removes it
    whole), else only what the machine put there goes."""

    path: str
    owned: bool

    def release(self) -> None:
        if self.owned:
            shutil.rmtree(self.path, ignore_errors=True)
            return
        for sub in ("proc", "sys"):
            shutil.rmtree(os.path.join(self.path, sub), ignore_errors=True)
        for f in (EVENTS, PIDFILE):
            try:
                os.unlink(os.path.join(self.path, f))
            except FileNotFoundError:
                pass


def claim(run_dir: str | None) -> RunDir:
    """Take ``run_dir`` for a machine of this process (a fresh private one when None): refused
    while another live machine owns it; the pid file names the new owner."""
    if run_dir is None:
        out = RunDir(tempfile.mkdtemp(prefix="mk-", dir=TMPFS_BASE), owned=True)
    else:
        path = os.path.abspath(run_dir)
        owner = live_owner(path)
        if owner is not None and owner != os.getpid():
            raise MKError(f"run directory {path} belongs to running machine pid {owner}",
                          "mkctl shutdown it first, or choose another --run-dir")
        owned = not os.path.isdir(path)
        if owned:
            os.makedirs(path, mode=0o755)
        out = RunDir(path, owned)
    with open(os.path.join(out.path, PIDFILE), "w") as f:
        f.write(f"{os.getpid()}\n")
    return out
