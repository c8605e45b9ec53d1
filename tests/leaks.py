"""What a test left behind, told apart from what other machines on the host made meanwhile.

The host is shared: another user's experiment, or another test run, may start a machine while a
test runs, and its run directory, arena and cgroups appear beside the test's own. Which is which
is decided by ownership, never by names (a name embeds a run directory's name, which nobody
chooses for the others, and its format is the machine's business):

- the processes that hold an object: the pid in a run directory's pid file; whoever has the
  directory or a shared-memory object open or mapped (a machine's host keeps its run directory's
  lock open and maps its arena, its instances map the arena); the owner pid a cgroup's name
  carries and the processes in the cgroup;
- whether each of them belongs to this test session: a descendant of this process, or a process
  that left its parent (``mkctl init`` starts its machine in a new session, adopted by init) but
  carries the session's mark in its environment (``MK_TEST_SESSION``, set by conftest at import,
  inherited by everything the tests start). The machine's processes retitle themselves
  (setproctitle), which by default writes over the environment /proc shows; the session sets
  ``SPT_NOENV=1`` so that the title stays within the original command line instead (titles
  longer than that are cut; the tests that read titles read a daemon's, whose command line
  is long).

An object held by live processes none of which is the session's was made by somebody else, and is
not the test's leak; an object of another user is never ours, nor one that goes away within
``SETTLE_S`` (a machine that just ended removes its objects after its processes). An object no
live process holds and that stays was left by the test (its makers are gone), and counts,
whatever its name. That is the one case this cannot tell apart: a machine of somebody else's
whose host was SIGKILLed during the test and whose objects stay until its owner cleans up
(its dead pid says nothing more about whose it was); the report then names the dead pid.
"""

from __future__ import annotations

import os
import re
import time
import uuid
from collections.abc import Callable

import psutil

MARK = "MK_TEST_SESSION"
SESSION = f"{os.getpid()}-{uuid.uuid4().hex[:12]}"
SHM = "/dev/shm"
PIDFILE = "machine.pid"
_CGROUP_OWNER = re.compile(r"^multikernel-s?(\d+)-")


def mark_session() -> None:
    """Mark everything this process starts from now on as the session's."""
    os.environ[MARK] = SESSION
    os.environ["SPT_NOENV"] = "1"


def shm_entries() -> set[str]:
    return set(os.listdir(SHM)) if os.path.isdir(SHM) else set()


def cgroup_base() -> str | None:
    """The hierarchy the machines' cgroup directories (host/cgroups.py) are looked for in."""
    for base in ("/sys/fs/cgroup/pids", "/sys/fs/cgroup"):
        if os.path.isdir(base):
            return base
    return None


def cgroup_entries() -> set[str]:
    base = cgroup_base()
    return {e for e in os.listdir(base) if e.startswith("multikernel-")} if base else set()


def _session_of(proc: psutil.Process) -> bool:
    try:
        return proc.environ().get(MARK) == SESSION
    except (psutil.Error, OSError):
        return False                 # another user's, or one that just ended


def is_ours(pid: int) -> bool:
    """``pid`` is this process, a descendant of it, or carries this session's mark (or one of
    its ancestors does: a kernel forked by the session's daemon)."""
    try:
        proc = psutil.Process(pid)
        chain = [proc, *proc.parents()]
    except psutil.Error:
        return False
    return any(p.pid == os.getpid() or _session_of(p) for p in chain)


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def holders(path: str) -> set[int]:
    """Live processes that have ``path`` open or mapped (those of this user: /proc hides the
    others' descriptors, and another user's objects are told apart by their owner)."""
    out: set[int] = set()
    for pid in psutil.pids():
        base = f"/proc/{pid}"
        try:
            for fd in os.listdir(f"{base}/fd"):
                try:
                    if os.readlink(f"{base}/fd/{fd}") == path:
                        out.add(pid)
                        break
                except OSError:
                    continue
            if pid not in out:
                with open(f"{base}/maps") as f:
                    if any(line.rstrip("\n").endswith(" " + path) for line in f):
                        out.add(pid)
        except OSError:
            continue
    return {p for p in out if _alive(p)}


def _pidfile(path: str) -> set[int]:
    try:
        with open(os.path.join(path, PIDFILE)) as f:
            return {int(f.read().split()[0])}
    except (OSError, ValueError, IndexError):
        return set()


def _procs(path: str) -> set[int]:
    """Every process in the cgroup directory ``path`` and below."""
    out: set[int] = set()
    for top, _dirs, files in os.walk(path):
        if "cgroup.procs" in files:
            try:
                with open(os.path.join(top, "cgroup.procs")) as f:
                    out |= {int(p) for p in f.read().split()}
            except (OSError, ValueError):
                pass
    return out


#: how long an object nobody holds is watched before it counts as left behind: a machine that
#: just ended (another's, or one of the session's on its way out) removes its objects after its
#: processes are gone. 1 s was too short beside another test session on a loaded 2-core
#: machine: a foreign `mkctl shutdown` took longer, and its run directory was blamed on the
#: test that happened to be ending (a real leak stays, and is still caught)
SETTLE_S = 5.0


def _foreign(path: str, owners: Callable[[], set[int]]) -> bool:
    """Whether ``path`` is somebody else's, from its ``owners`` (looked at again while they
    are all gone and the object stays, up to ``SETTLE_S``)."""
    deadline = time.monotonic() + SETTLE_S
    while True:
        try:
            if os.lstat(path).st_uid != os.getuid():
                return True          # another user's
        except FileNotFoundError:
            return True              # removed by whoever made it: not left behind
        live = {p for p in owners() if _alive(p)}
        if live:
            return not any(is_ours(p) for p in live)
        if time.monotonic() >= deadline:
            return False             # nobody holds it, and it stays: left behind
        time.sleep(0.1)


def foreign_shm(entry: str) -> bool:
    """A /dev/shm entry (a run directory, an arena, ...) that another machine holds."""
    path = os.path.join(SHM, entry)
    return _foreign(path, lambda: holders(path) | _pidfile(path))


def cgroup_owners(entry: str) -> set[int]:
    """The pids a machine's cgroup directory names or holds (its host's, its instances')."""
    path = os.path.join(cgroup_base() or "", entry)
    named = _CGROUP_OWNER.match(entry)
    return ({int(named.group(1))} if named else set()) | _procs(path)


def foreign_cgroup(entry: str) -> bool:
    """A machine's cgroup directory that another machine holds."""
    base = cgroup_base()
    if base is None:
        return True
    return _foreign(os.path.join(base, entry), lambda: cgroup_owners(entry))


def leaks(shm_before: set[str], cgroups_before: set[str]) -> tuple[list[str], list[str]]:
    """(/dev/shm entries, cgroup directories) made since the snapshots and left by the
    session: what somebody else holds is not counted."""
    shm = sorted(e for e in shm_entries() - shm_before if not foreign_shm(e))
    cgroups = sorted(e for e in cgroup_entries() - cgroups_before if not foreign_cgroup(e))
    return shm, cgroups


def explain(path: str, pids: set[int]) -> str:
    """Why ``path`` was counted: for a failing test's message."""
    who = ", ".join(f"{p} ({'alive' if _alive(p) else 'gone'}"
                    f"{', ours' if _alive(p) and is_ours(p) else ''})" for p in sorted(pids))
    return f"{os.path.basename(path)} [{who or 'held by nobody'}]"


def explain_shm(entry: str) -> str:
    path = os.path.join(SHM, entry)
    return explain(path, holders(path) | _pidfile(path))


def explain_cgroup(entry: str) -> str:
    return explain(os.path.join(cgroup_base() or "", entry), cgroup_owners(entry))
