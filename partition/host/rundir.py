"""Where a machine keeps its socket, views and event log, and how stale ones are recognised.

Two machines side by side differ only in their run directory. The default is per user
(``$XDG_RUNTIME_DIR/multikernel`` or ``/tmp/multikernel-<uid>``); ``--run-dir`` or ``MK_RUN_DIR``
choose another.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import stat

from partition.errors import PermissionDenied, ResourceBusy

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


def machine_key(run_dir: str) -> str:
    """What a machine's objects outside its run directory are named after (its arena's shared
    memory name, its cgroups, its memfd): ``<basename>-<hash of the real path>``. Unique to
    the run directory, not to its last component: ``/tmp/a/mk`` and ``/tmp/b/mk`` are two
    machines, and a shutdown or init of one must never find the other's objects. A new host
    of the same directory (adoption) computes the same key, with no file to trust."""
    import hashlib  # (here: every mkctl verb imports this module; few get here)
    real = os.path.realpath(run_dir)
    base = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in os.path.basename(real))
    digest = hashlib.blake2b(real.encode(errors="surrogateescape"), digest_size=8).hexdigest()
    return f"{base[:40]}-{digest}"


def live_owner(run_dir: str) -> int | None:
    """PID of the live machine that owns ``run_dir``, None if none. Ownership is the lock on
    the directory (``lock``), held for the machine's life by its process and, while it starts,
    by the ``mkctl init`` that starts it (then the pid file may not exist yet: -1)."""
    try:
        fd = os.open(run_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        held = True
    else:
        held = False
        fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
    if not held:
        return None
    try:
        with open(os.path.join(run_dir, PIDFILE)) as f:
            pid = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return -1
    import psutil  # (here: every mkctl verb imports this module; few get here)
    try:
        if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
            return -1
    except psutil.Error:
        return -1
    return pid


def lock(path: str) -> int:
    """Create ``path`` safely if it is missing (mode 0700, whatever the umask) and take its
    lock; returns the locked descriptor. Refused: a path that is a symbolic link or not a
    directory, one owned by another user (somebody may have made it to catch our socket),
    and one whose lock a live machine holds."""
    try:
        os.mkdir(path, 0o700)
        os.chmod(path, 0o700)
    except FileExistsError:
        pass
    except FileNotFoundError:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        os.mkdir(path, 0o700)
        os.chmod(path, 0o700)
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        raise PermissionDenied(f"run directory {path} is not a directory (a link or a file)",
                               "remove it, or choose another --run-dir")
    if st.st_uid not in (os.getuid(), 0) or (st.st_uid == 0 and os.getuid() != 0):
        raise PermissionDenied(f"run directory {path} belongs to uid {st.st_uid}, not to you "
                               f"(uid {os.getuid()})",
                               "someone else made it: remove it as root, or choose another "
                               "--run-dir")
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC | os.O_NOFOLLOW)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        owner = live_owner(path)
        who = f"supervisor pid {owner}" if owner and owner > 0 else "one is starting"
        raise ResourceBusy(f"a machine is already running in {path} ({who})",
                           "mkctl shutdown it first, or choose another --run-dir") from None
    return fd


def clear(path: str) -> None:
    """Remove what a dead machine left in ``path`` (its lock is ours), keeping the directory."""
    for entry in os.listdir(path):
        full = os.path.join(path, entry)
        if os.path.isdir(full) and not os.path.islink(full):
            shutil.rmtree(full, ignore_errors=True)
        else:
            try:
                os.unlink(full)
            except FileNotFoundError:
                pass


class RunDir:
    """A run directory a machine holds, with its lock: ``owned`` when the machine made it (and
    removes it whole), else only what the machine put there goes. (A plain class: a dataclass
    costs every mkctl verb 7 ms of imports.)"""

    __slots__ = ("lock_fd", "owned", "path")

    def __init__(self, path: str, owned: bool, lock_fd: int) -> None:
        self.path = path
        self.owned = owned
        self.lock_fd = lock_fd

    def release(self) -> None:
        if self.owned:
            shutil.rmtree(self.path, ignore_errors=True)
        else:
            for sub in ("proc", "sys"):
                shutil.rmtree(os.path.join(self.path, sub), ignore_errors=True)
            for f in (EVENTS, PIDFILE):
                try:
                    os.unlink(os.path.join(self.path, f))
                except FileNotFoundError:
                    pass
        if self.lock_fd >= 0:
            os.close(self.lock_fd)
            self.lock_fd = -1


def claim(run_dir: str | None, lock_fd: int = -1) -> RunDir:
    """Take ``run_dir`` for a machine of this process (a fresh private one when None), with its
    lock: ``lock_fd`` when the caller holds it already (the daemon inherits the one ``mkctl
    init`` took), else taken here. The pid file names the new owner."""
    if run_dir is None:
        import tempfile
        path = tempfile.mkdtemp(prefix="mk-", dir=TMPFS_BASE)
        out = RunDir(path, owned=True, lock_fd=lock(path))
    elif lock_fd >= 0:
        out = RunDir(os.path.abspath(run_dir), owned=False, lock_fd=lock_fd)
    else:
        path = os.path.abspath(run_dir)
        existed = os.path.isdir(path)
        out = RunDir(path, owned=not existed, lock_fd=lock(path))
    with open(os.path.join(out.path, PIDFILE), "w") as f:
        f.write(f"{os.getpid()}\n")
    return out
