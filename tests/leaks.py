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
  inherited by everything the tests start, executed or only forked: ``_mark_forks``). The
  machine's processes retitle themselves (setproctitle), which by default writes over the
  environment /proc shows; the session sets ``SPT_NOENV=1`` so that the title stays within
  the original command line instead (titles longer than that are cut; the tests that read
  titles read a daemon's, whose command line is long).

An object held by live processes none of which is the session's was made by somebody else, and is
not the test's leak; an object of another user is never ours, nor one that goes away within
``SETTLE_S`` (a machine that just ended removes its objects after its processes). An object no
live process holds and that stays was left by the test (its makers are gone), and counts,
whatever its name. That is the one case this cannot tell apart: a machine of somebody else's
whose host was SIGKILLed during the test and whose objects stay until its owner cleans up
(its dead pid says nothing more about whose it was); the report then names the dead pid.

Under pytest-xdist each worker is a session of its own (its own mark, set at its conftest's
import), so a worker's test is never blamed for the live objects of another worker's machines.
That one case, though, is then an everyday one: another worker's test kills a host on purpose
and removes what it left a few seconds later. So sessions keep a ledger (``Ledger``): which
test each one runs, and whether it is still running it. An object nobody holds is counted only
after every session that was running a test when it was found has finished that test's body
and fixtures (its own check then sees the object, and blames its test if it is still there).
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import os
import re
import shutil
import tempfile
import time
import uuid

import psutil

MARK = "MK_TEST_SESSION"
SESSION = f"{os.getpid()}-{uuid.uuid4().hex[:12]}"
SHM = "/dev/shm"
PIDFILE = "machine.pid"
_CGROUP_OWNER = re.compile(r"^multikernel-s?(\d+)-")


def mark_session() -> None:
    """Mark everything this process starts from now on as the session's: what it executes
    (``os.environ``) and what it forks without executing (``_mark_forks``)."""
    os.environ[MARK] = SESSION
    os.environ["SPT_NOENV"] = "1"
    _mark_forks()


PR_SET_MM, PR_SET_MM_MAP = 35, 14
#: the environment block /proc/<pid>/environ shows for this process and its forks (kept alive
#: here: the kernel reads it from this memory)
_ENVIRON_BLOCK: ctypes.Array[ctypes.c_char] | None = None


class _MMMap(ctypes.Structure):
    """struct prctl_mm_map (linux/prctl.h)."""

    _fields_ = [(name, ctypes.c_uint64) for name in (
        "start_code", "end_code", "start_data", "end_data", "start_brk", "brk", "start_stack",
        "arg_start", "arg_end", "env_start", "env_end")] + [
        ("auxv", ctypes.c_void_p), ("auxv_size", ctypes.c_uint32), ("exe_fd", ctypes.c_uint32)]


#: where each of _MMMap's addresses but brk is in /proc/<pid>/stat (field N: index N - 3 after
#: the command's closing parenthesis)
_STAT_FIELDS = {"start_code": 26, "end_code": 27, "start_stack": 28, "start_data": 45,
                "end_data": 46, "start_brk": 47, "arg_start": 48, "arg_end": 49,
                "env_start": 50, "env_end": 51}


def _mark_forks() -> None:
    """/proc/<pid>/environ shows the block the process was *executed* with, not ``os.environ``:
    the mark set above reaches the programs this process executes, but not the processes it
    forks without executing (a machine's in-process kernels, its zygote, a host that survives
    in a fork), and once such a process is orphaned (its host killed, on purpose or not) no
    ancestor ties it to the session any more: an arena it maps would count as another
    machine's. So this process's environment block is pointed (PR_SET_MM_MAP, which needs no
    capability) at a copy that carries the mark, which every fork inherits. (A child
    subreaper would keep them descendants instead, but then their zombies are this process's
    to reap, racing the tests' own waits and the hosts' wait on their kernels' statuses, and
    a zombie looks alive to whoever waits for a process that is not its child.) Where the
    kernel refuses, the check is as it was."""
    global _ENVIRON_BLOCK
    try:
        with open("/proc/self/environ", "rb") as f:
            executed = f.read()
        with open("/proc/self/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        now = {name: int(fields[n - 3]) for name, n in _STAT_FIELDS.items()}
    except (OSError, ValueError, IndexError):
        return
    keep = [e for e in executed.split(b"\0")
            if e and not e.startswith((MARK.encode() + b"=", b"SPT_NOENV="))]
    block = b"\0".join([f"{MARK}={SESSION}".encode(), b"SPT_NOENV=1", *keep]) + b"\0"
    buf = ctypes.create_string_buffer(block, len(block))
    libc = ctypes.CDLL(None, use_errno=True)
    libc.sbrk.restype = ctypes.c_void_p
    mm = _MMMap(**now, brk=libc.sbrk(0) or 0, auxv=None, auxv_size=0, exe_fd=0xFFFFFFFF)
    mm.env_start = ctypes.addressof(buf)
    mm.env_end = mm.env_start + len(block)
    if libc.prctl(PR_SET_MM, PR_SET_MM_MAP, ctypes.byref(mm), ctypes.sizeof(mm), 0) == 0:
        _ENVIRON_BLOCK = buf


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


def holders_of(paths: set[str]) -> dict[str, set[int]]:
    """Live processes that have each of ``paths`` open or mapped, in one pass over /proc
    (those of this user: /proc hides the others' descriptors, and another user's objects are
    told apart by their owner). One pass, since under xdist a test's window sees several
    objects of the other workers' machines appear, each to be looked at."""
    out: dict[str, set[int]] = {p: set() for p in paths}
    if not paths:
        return out
    for pid in psutil.pids():
        base = f"/proc/{pid}"
        try:
            for fd in os.listdir(f"{base}/fd"):
                try:
                    target = os.readlink(f"{base}/fd/{fd}")
                except OSError:
                    continue
                if target in out:
                    out[target].add(pid)
            with open(f"{base}/maps") as f:
                for line in f:
                    target = line.rstrip("\n").rsplit(" ", 1)[-1]
                    if target in out:
                        out[target].add(pid)
        except OSError:
            continue
    return {p: {q for q in pids if _alive(q)} for p, pids in out.items()}


def holders(path: str) -> set[int]:
    """Live processes that have ``path`` open or mapped."""
    return holders_of({path})[path]


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


#: how long an object nobody holds waits, beyond ``SETTLE_S``, for the other workers' tests
#: that were running when it was found to end (a stale worker's ledger entry is waited out)
OTHERS_S = 180.0


class Ledger:
    """What each test session on this host is doing, for the others to read: a file per
    session (an xdist worker is one) in a directory of this user's, named by the session's mark
    (its pid first) and holding the number of the test it is at and whether it is ``running``
    it (setup, body, teardown of its other fixtures) or ``checking`` (its leak check, or one a
    test asked for). A session that died without removing its file is told by its pid.

    It also keeps the lock that lets an ``alone`` test run by itself: one per xdist run
    (``PYTEST_XDIST_TESTRUNUID``), in a directory the controller removes at the end."""

    def __init__(self) -> None:
        self.dir = os.path.join(tempfile.gettempdir(), f"mk-test-ledger-{os.getuid()}")
        self.me = SESSION
        self.run_dir: str | None = None
        self.of_run(os.environ.get("PYTEST_XDIST_TESTRUNUID"))    # set in xdist's workers
        self.seq = 0
        self.phase = "checking"
        self._held: tuple[int, int] | None = None
        self._held_alone = False

    def of_run(self, run: str | None) -> None:
        """The xdist run this session is part of (its workers', or its controller's)."""
        self.run_dir = os.path.join(tempfile.gettempdir(), f"mk-test-alone-{run}") if run else None

    def running(self) -> None:
        """A test starts: its fixtures are set up next."""
        self.seq += 1
        self._write("running")

    def checking(self) -> None:
        """The test's body and fixtures are done; what it left is looked at."""
        self._write("checking")

    def _write(self, phase: str) -> None:
        self.phase = phase
        os.makedirs(self.dir, mode=0o700, exist_ok=True)
        tmp = os.path.join(self.dir, f".{self.me}.tmp")
        with open(tmp, "w") as f:
            f.write(f"{self.seq} {phase}")
        os.replace(tmp, os.path.join(self.dir, self.me))

    def _read(self, session: str) -> str | None:
        try:
            with open(os.path.join(self.dir, session)) as f:
                return f.read()
        except OSError:
            return None              # a session that ended

    def others_running(self) -> dict[str, str]:
        """The other sessions running a test now, and their entries."""
        try:
            sessions = os.listdir(self.dir)
        except OSError:
            return {}
        out = {}
        for session in sessions:
            if session.startswith(".") or session == self.me:
                continue
            try:
                alive = _alive(int(session.split("-", 1)[0]))
            except ValueError:
                continue
            if not alive:            # killed: its file stays, it runs nothing
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(self.dir, session))
                continue
            entry = self._read(session)
            if entry is not None and entry.endswith(" running"):
                out[session] = entry
        return out

    def moved_on(self, seen: dict[str, str]) -> bool:
        """Every session in ``seen`` is done with the test it was running then."""
        return all(self._read(w) != entry for w, entry in seen.items())

    def enter(self, alone: bool) -> None:
        """Take the run's lock for one test: shared by every test, exclusive for one that
        must run ``alone`` (it measures time or load: another worker's machines would skew
        it). A turnstile taken on the way in lets a waiting ``alone`` test in before the
        tests that come after it (without it, shared holders would never all be out). An
        exclusive lock kept from the test before (``leave(keep=True)``) is used again."""
        if self.run_dir is None:
            return
        if self._held is not None:
            if self._held_alone == alone:
                return
            self.leave()
        os.makedirs(self.run_dir, mode=0o700, exist_ok=True)
        gate = os.open(os.path.join(self.run_dir, "turnstile"), os.O_RDWR | os.O_CREAT, 0o600)
        lock = os.open(os.path.join(self.run_dir, "lock"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(gate, fcntl.LOCK_EX)
            try:
                fcntl.flock(lock, fcntl.LOCK_EX if alone else fcntl.LOCK_SH)
            finally:
                fcntl.flock(gate, fcntl.LOCK_UN)
        except BaseException:
            os.close(lock)
            os.close(gate)
            raise
        self._held, self._held_alone = (gate, lock), alone

    def leave(self, keep: bool = False) -> None:
        """Release the run's lock after a test; ``keep`` an exclusive one for the next test,
        itself ``alone`` (the other workers' tests are then drained once for a run of them)."""
        if self._held is None or (keep and self._held_alone):
            return
        for fd in self._held:
            os.close(fd)             # closing releases the lock
        self._held = None

    def close(self, controller: bool) -> None:
        """The session ends: its entry goes; the xdist controller, last out, removes the run's
        lock."""
        self.leave()
        with contextlib.suppress(OSError):
            os.unlink(os.path.join(self.dir, self.me))
        with contextlib.suppress(OSError):
            os.rmdir(self.dir)       # unless another session's entry is there
        if controller and self.run_dir is not None:
            shutil.rmtree(self.run_dir, ignore_errors=True)


LEDGER = Ledger()


def _owners(paths: set[str]) -> dict[str, set[int]]:
    """The live processes each object is held by or names: for a /dev/shm entry, whoever has
    it open or mapped and the pid in a run directory's pid file; for a cgroup directory, the
    owner pid its name carries and the processes in it."""
    base = cgroup_base() or ""
    shm = {p for p in paths if os.path.dirname(p) == SHM}
    held = holders_of(shm)
    out = {}
    for path in paths:
        if path in shm:
            pids = held[path] | _pidfile(path)
        else:
            pids = cgroup_owners(os.path.relpath(path, base))
        out[path] = {p for p in pids if _alive(p)}
    return out


def _left_behind(paths: set[str], settle: float = SETTLE_S) -> set[str]:
    """Those of ``paths`` the session left: held by its processes, or held by nobody and
    staying (for ``settle`` seconds, and until the other workers' tests running then have
    ended)."""
    pending, left = set(paths), set()
    deadline = time.monotonic() + settle
    waiting_for: dict[str, str] | None = None
    final = False
    checking_before = LEDGER.phase
    try:
        while pending:
            owners = _owners(pending)
            for path in sorted(pending):
                try:
                    if os.lstat(path).st_uid != os.getuid():
                        pending.discard(path)            # another user's
                        continue
                except FileNotFoundError:
                    pending.discard(path)                # removed by whoever made it
                    continue
                if owners[path]:
                    pending.discard(path)
                    if any(is_ours(p) for p in owners[path]):
                        left.add(path)                   # the session's, alive
            if not pending:
                break
            if final:
                left |= pending                          # nobody holds them, and they stay
                break
            now = time.monotonic()
            if now >= deadline:
                if waiting_for is None:
                    LEDGER.checking()                    # nobody waits for us meanwhile
                    waiting_for = LEDGER.others_running()
                if LEDGER.moved_on(waiting_for) or now >= deadline + OTHERS_S:
                    final = True                         # one more look, then they count
                    continue
            time.sleep(0.1)
    finally:
        if waiting_for is not None and checking_before == "running":
            LEDGER._write("running")                     # a check a test asked for
    return left


def foreign_shm(entry: str) -> bool:
    """A /dev/shm entry (a run directory, an arena, ...) that another machine holds."""
    return not _left_behind({os.path.join(SHM, entry)})


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
    return not _left_behind({os.path.join(base, entry)})


def leaks(shm_before: set[str], cgroups_before: set[str],
          settle: float = SETTLE_S) -> tuple[list[str], list[str]]:
    """(/dev/shm entries, cgroup directories) made since the snapshots and left by the
    session: what somebody else holds is not counted. ``settle``: how long an object nobody
    holds is watched first (``SETTLE_S``; shorter only where a test makes the object itself
    and no machine of its own is on its way out)."""
    base = cgroup_base()
    shm = {os.path.join(SHM, e) for e in shm_entries() - shm_before}
    cgroups = {os.path.join(base, e) for e in cgroup_entries() - cgroups_before} if base else set()
    left = _left_behind(shm | cgroups, settle)
    return (sorted(os.path.basename(p) for p in left & shm),
            sorted(os.path.basename(p) for p in left & cgroups))


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
