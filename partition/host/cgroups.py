"""One cgroup per instance: the CPUs it may run on, the memory it may use, the processes it may
have, and a way to kill every one of them at once.

An instance's kernel is untrusted code running as a process: without this it could re-pin
itself onto the host's CPU, allocate far past its partition through a memfd, and fork children
that outlive its halt. Its cgroup is made by the host before the boot (``prepare``), joined by
the trampoline before any kernel code runs, and killed whole when the instance halts, so that
nothing it forked survives it.

Where: under the host's own cgroup in each hierarchy (so that whatever limits the host lives
under still count), in ``multikernel-<pid>-<key>/i<id>`` (``s<pid>`` for a survivable
machine; ``<key>``: ``rundir.machine_key``, the run directory's basename and a hash of its real
path, so that two run directories never share one). cgroup v1 (cpuset, memory, pids, freezer:
what this project's machines have) and v2 (cpuset, memory, pids and ``cgroup.kill``) are both
supported; a machine with neither runs its instances uncontained and says so
(``containment_unavailable``).

Limits: ``cpuset.cpus`` = the instance's CPUs; memory = the partition + the kernel's heap limit
(``mk_heap``, 256M by default) + ``ALLOWANCE`` for the interpreter and its mappings; ``pids`` =
the instance's process limit (``create --pids-max``; ``PIDS_MAX`` by default).

The instance's userland (host/userlands.py, ``mkctl exec``) lives in the same cgroups but for
one nested directory, ``i<id>/userland``, in the freezer (v1) or the one hierarchy (v2): its
limits are still the instance's (hierarchical), and a kill of the instance still takes it, but
it can be frozen alone while the kernel runs on (a ``hang-spin``: a kernel spinning in its loop
schedules nothing else on its CPUs, so its programs stop; the kernel itself must go on spinning
for the watchdog to see it make no progress).
"""

from __future__ import annotations

import os
import re
import signal
import time

from partition.host.userspec import PIDS_MAX_DEFAULT

ALLOWANCE = 96 << 20       # the interpreter, its libraries and page tables, beyond the heap
PIDS_MAX = PIDS_MAX_DEFAULT  # processes and threads of one instance, unless create says
V1_CONTROLLERS = ("cpuset", "memory", "pids", "freezer")
#: the nested directory of an instance's cgroup its userland joins (freezable on its own)
USERLAND = "userland"
_MOUNT = "/sys/fs/cgroup"


def _read(path: str) -> str:
    with open(path) as f:
        return f.read().strip()


def _write(path: str, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


def _own_paths() -> dict[str, str]:
    """controller (or "" for v2) -> this process's cgroup path, from /proc/self/cgroup."""
    out: dict[str, str] = {}
    with open("/proc/self/cgroup") as f:
        for line in f:
            _, ctrls, path = line.rstrip("\n").split(":", 2)
            for c in ctrls.split(",") if ctrls else [""]:
                out[c] = path
    return out


class Cgroups:
    """The cgroups of one machine's instances."""

    def __init__(self, run_name: str, survivable: bool = False,
                 adopt: dict[str, str] | None = None) -> None:
        self.mode: str | None = None
        self.bases: dict[str, str] = {}         # controller -> the machine's directory
        self.reaped = 0                          # processes left by dead machines, killed here
        #: instances whose freezers were last seen thawed, or thawed here: only this host
        #: freezes them (freeze, freeze_userland), so ``frozen`` need not read the files again
        #: until it does (two reads of a v1 freezer.state on every kill took 0.25 ms)
        self._thawed: set[int] = set()
        own = _own_paths()
        # a dead owner's directories are recognisable by its pid, and reaped by the next
        # machine; a survivable machine's ("s<pid>") are left for a host to adopt, or for
        # mkctl shutdown of the abandoned machine
        run_name = f"{'s' if survivable else ''}{os.getpid()}-{run_name}"
        try:
            self.reaped = reap_stale()
        except OSError:
            pass
        if adopt:
            self.bases = {c: b for c, b in adopt.items() if os.path.isdir(b)}
            self.mode = ("v2" if "" in self.bases else "v1") if self.bases else None
            self.why = "" if self.mode else "the adopted machine's cgroups are gone"
            return
        try:
            if os.path.exists(os.path.join(_MOUNT, "cgroup.controllers")):
                self._setup_v2(own.get("", "/"), run_name)
            elif all(os.path.isdir(os.path.join(_MOUNT, c)) for c in V1_CONTROLLERS):
                self._setup_v1(own, run_name)
        except OSError as exc:
            self.why = f"{exc}"
            self.close()
            self.mode = None
        else:
            self.why = "" if self.mode else "no cgroup v1 or v2 controllers at /sys/fs/cgroup"

    # -- the machine's directories ---------------------------------------------------------
    def _setup_v1(self, own: dict[str, str], run_name: str) -> None:
        for c in V1_CONTROLLERS:
            parent = os.path.join(_MOUNT, c, own.get(c, "/").lstrip("/"))
            base = os.path.join(parent, f"multikernel-{run_name}")
            os.makedirs(base, exist_ok=True)
            self.bases[c] = base
            if c == "cpuset":              # a v1 cpuset starts empty: inherit the parent's
                parent = os.path.dirname(base)
                _write(os.path.join(base, "cpuset.cpus"), _read(os.path.join(parent, "cpuset.cpus")))
                _write(os.path.join(base, "cpuset.mems"), _read(os.path.join(parent, "cpuset.mems")))
        self.mode = "v1"

    def _setup_v2(self, own: str, run_name: str) -> None:
        parent = os.path.join(_MOUNT, own.lstrip("/"))
        base = os.path.join(parent, f"multikernel-{run_name}")
        os.makedirs(base, exist_ok=True)
        _write(os.path.join(base, "cgroup.subtree_control"), "+cpuset +memory +pids")
        self.bases[""] = base
        self.mode = "v2"

    # -- one instance ----------------------------------------------------------------------
    def _dirs(self, instance_id: int) -> dict[str, str]:
        return {c: os.path.join(b, f"i{instance_id}") for c, b in self.bases.items()}

    def prepare(self, instance_id: int, cpus: list[int], memory_limit: int,
                pids_max: int = PIDS_MAX) -> list[str]:
        """Make (or reset) the instance's cgroups; returns the ``cgroup.procs`` files the
        trampoline writes itself into."""
        if self.mode is None:
            return []
        cpulist = ",".join(str(c) for c in cpus)
        dirs = self._dirs(instance_id)
        for c, d in dirs.items():
            os.makedirs(d, exist_ok=True)
            if self.mode == "v1":
                if c == "cpuset":
                    base = self.bases[c]
                    _write(os.path.join(d, "cpuset.mems"), _read(os.path.join(base, "cpuset.mems")))
                    self._cpus(d, cpulist, _read(os.path.join(base, "cpuset.cpus")))
                elif c == "memory":
                    _write(os.path.join(d, "memory.limit_in_bytes"), str(memory_limit))
                elif c == "pids":
                    _write(os.path.join(d, "pids.max"), str(pids_max))
            else:
                self._cpus(d, cpulist, "")
                _write(os.path.join(d, "memory.max"), str(memory_limit))
                _write(os.path.join(d, "pids.max"), str(pids_max))
        self._userland_dir(instance_id)
        return [os.path.join(d, "cgroup.procs") for d in dirs.values()]

    @staticmethod
    def _cpus(d: str, cpulist: str, fallback: str) -> None:
        """The instance's CPUs; CPUs this machine lacks are the trampoline's to refuse (it
        fails to pin, with the reason), so the cgroup keeps the machine's meanwhile."""
        try:
            _write(os.path.join(d, "cpuset.cpus"), cpulist)
        except OSError:
            _write(os.path.join(d, "cpuset.cpus"), fallback)

    def _userland_dir(self, instance_id: int) -> str | None:
        """``i<id>/userland`` in the freezer (v1) or the one hierarchy (v2), made if missing
        (an instance prepared by an older host); None without cgroups or the instance's."""
        if self.mode is None:
            return None
        parent = self._dirs(instance_id).get("freezer" if self.mode == "v1" else "")
        if parent is None or not os.path.isdir(parent):
            return None
        d = os.path.join(parent, USERLAND)
        try:
            os.mkdir(d)
        except FileExistsError:
            pass
        return d

    def procs_files(self, instance_id: int) -> list[str]:
        """The ``cgroup.procs`` files a process of the instance's userland writes itself into
        (its init, mkctl exec's relay): the instance's cgroups, but the freezer's (v1) or the
        hierarchy's (v2) nested ``userland`` last, which it so ends in. The instance's own
        directory comes first in v2 too: a check that the kernel is still in them
        (``userland.in_cgroups_of``) finds it there."""
        if self.mode is None:
            return []
        out = [os.path.join(d, "cgroup.procs") for c, d in self._dirs(instance_id).items()
               if os.path.isdir(d) and c != "freezer"]
        nested = self._userland_dir(instance_id)
        if nested is not None:
            out.append(os.path.join(nested, "cgroup.procs"))
        return out

    def set_cpus(self, instance_id: int, cpus: list[int]) -> None:
        """A runtime CPU change (host/resize.py): the cpuset follows; in v1 the kernel moves
        every task of the cgroup onto the new set itself."""
        if self.mode is None:
            return
        dirs = self._dirs(instance_id)
        d = dirs.get("cpuset") or dirs.get("")
        if d and os.path.isdir(d):
            _write(os.path.join(d, "cpuset.cpus"), ",".join(str(c) for c in cpus))

    def members(self, instance_id: int) -> list[int]:
        """Every process in the instance's cgroup (its kernel and whatever it forked, its
        userland's nested directory included: v1's pids hierarchy has none)."""
        if self.mode is None:
            return []
        d = self._dirs(instance_id)["pids" if self.mode == "v1" else ""]
        out: list[int] = []
        for where in (d, os.path.join(d, USERLAND)):
            try:
                out += [int(p) for p in _read(os.path.join(where, "cgroup.procs")).split()]
            except (OSError, ValueError):
                pass
        return out

    def oom_kills(self, instance_id: int) -> int:
        """How many processes the instance's memory limit has killed (its OOM killer)."""
        if self.mode is None:
            return 0
        d = self._dirs(instance_id)["memory" if self.mode == "v1" else ""]
        name = "memory.oom_control" if self.mode == "v1" else "memory.events"
        try:
            for line in _read(os.path.join(d, name)).splitlines():
                key, _, value = line.partition(" ")
                if key == "oom_kill":
                    return int(value)
        except (OSError, ValueError):
            pass
        return 0

    def _freeze_file(self, instance_id: int, userland: bool = False) -> str | None:
        """The file that freezes the instance's cgroup (v1's freezer, v2's ``cgroup.freeze``),
        or with ``userland`` its userland's nested one; None without them."""
        if self.mode is None:
            return None
        dirs = self._dirs(instance_id)
        d = dirs.get("freezer") if self.mode == "v1" else dirs.get("")
        if d is not None and userland:
            d = os.path.join(d, USERLAND)
        if d is None or not os.path.isdir(d):
            return None
        return os.path.join(d, "freezer.state" if self.mode == "v1" else "cgroup.freeze")

    def freeze(self, instance_id: int) -> bool:
        """Stop every process of the instance where it stands (a hang-stop: the kernel and its
        whole userland, as a hung machine stops everything on it); False where there is no
        freezer. Only a kill (``kill``, which thaws) or ``thaw`` lets them run again."""
        return self._freeze(instance_id, userland=False)

    def freeze_userland(self, instance_id: int) -> bool:
        """Stop every process of the instance's userland where it stands, the kernel running
        on (a hang-spin: the kernel spins, so nothing else runs on its CPUs); False where there
        is no freezer. As ``freeze``, only a kill or ``thaw`` lets them run again."""
        return self._freeze(instance_id, userland=True)

    def _freeze(self, instance_id: int, userland: bool) -> bool:
        path = self._freeze_file(instance_id, userland=userland)
        if path is None:
            return False
        self._thawed.discard(instance_id)
        _write(path, "FROZEN" if self.mode == "v1" else "1")
        return True

    def frozen(self, instance_id: int) -> bool:
        """The instance's cgroup, or its userland's alone, is frozen or freezing (``freeze``,
        ``freeze_userland``). Read from the files once, then known until this host freezes it
        again (a thawed one stays thawed: nothing else freezes an instance)."""
        if instance_id in self._thawed:
            return False
        for userland in (False, True):
            path = self._freeze_file(instance_id, userland)
            try:
                state = _read(path) if path else ""
            except OSError:
                continue
            if state in ("FROZEN", "FREEZING", "1"):
                return True
        self._thawed.add(instance_id)
        return False

    def thaw(self, instance_id: int) -> None:
        """Let the instance's processes run again, its userland's too: those SIGKILLed
        meanwhile die now. (The userland's first: while the instance's is still frozen,
        nothing of it runs in between.)"""
        for userland in (True, False):
            path = self._freeze_file(instance_id, userland)
            if path is not None:
                _write(path, "THAWED" if self.mode == "v1" else "0")
        self._thawed.add(instance_id)

    def kill(self, instance_id: int, keep: int | None = None, reap: bool = False) -> int:
        """SIGKILL every process of the instance (but ``keep``: a live update's loaded
        successor); returns how many there were. Frozen first (v1), so that none forks while
        the others are being killed; thawed after, whoever froze it (a hang-stop too). With
        ``keep``, v2 (no per-process freeze here) kills nothing: a kernel cannot fork, so its
        run leaves nothing behind to kill."""
        if self.mode is None:
            return 0
        pids = [p for p in self.members(instance_id) if p != keep]
        if (self.mode == "v2" or not pids) and self.frozen(instance_id):
            self.thaw(instance_id)      # (a hang-stop's: a kill ends it, as in v1 below)
        if not pids or (keep is not None and self.mode == "v2"):
            return 0
        if self.mode == "v2":
            _write(os.path.join(self._dirs(instance_id)[""], "cgroup.kill"), "1")
            return len(pids)
        freezer = os.path.join(self._dirs(instance_id)["freezer"], "freezer.state")
        try:
            _write(freezer, "FROZEN")
            pids = [p for p in self.members(instance_id) if p != keep]
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        finally:
            self.thaw(instance_id)     # the userland's too (a hang-spin froze it alone)
        if reap:                # those that are this process's children (a host in-process)
            for pid in pids:
                try:
                    os.waitpid(pid, 0)
                except ChildProcessError:
                    pass
        return len(pids)

    def remove(self, instance_id: int) -> None:
        """Kill what is left and remove the instance's cgroups (delete, shutdown)."""
        if self.mode is None:
            return
        self.kill(instance_id)
        for d in self._dirs(instance_id).values():
            _rmdir_tree(d)
        self._thawed.discard(instance_id)     # (its id may be another's next, made anew)

    def close(self) -> None:
        for base in self.bases.values():
            if not os.path.isdir(base):
                continue
            _rmdir_tree(base)
        self.bases = {}


def _stale_in(parent: str) -> list[str]:
    """The cgroups under ``parent`` of machines whose host died (``multikernel-<pid>-...``
    with no such process): a kernel's children outlive a host that was SIGKILLed, and
    ``reap_stale`` is where they end."""
    try:
        entries = os.listdir(parent)
    except OSError:
        return []
    out = []
    for entry in entries:
        if not entry.startswith("multikernel-"):
            continue
        try:
            owner = int(entry.split("-")[1])
        except (IndexError, ValueError):
            continue
        if owner == os.getpid() or os.path.exists(f"/proc/{owner}"):
            continue
        out.append(os.path.join(parent, entry))
    return out


def survivable_dirs(run_name: str) -> list[tuple[str, str]]:
    """(controller, directory) of every survivable machine's cgroup for the run directory
    whose key is ``run_name`` (``multikernel-s<pid>-<key>``, ``rundir.machine_key``), found by
    scanning the hierarchies this process lives in, not by believing a file."""
    out: list[tuple[str, str]] = []
    own = _own_paths()
    pattern = re.compile(rf"^multikernel-s\d+-{re.escape(run_name)}$")
    if os.path.exists(os.path.join(_MOUNT, "cgroup.controllers")):
        parents = {"": os.path.join(_MOUNT, own.get("", "/").lstrip("/"))}
    else:
        parents = {c: os.path.join(_MOUNT, c, own.get(c, "/").lstrip("/")) for c in V1_CONTROLLERS}
    for c, parent in parents.items():
        try:
            entries = sorted(os.listdir(parent))
        except OSError:
            continue
        out += [(c, os.path.join(parent, e)) for e in entries if pattern.match(e)]
    return out


def _kill_in(path: str) -> int:
    """SIGKILL what runs in one instance cgroup directory and its nested userland's."""
    killed = 0
    for where in (path, os.path.join(path, USERLAND)):
        try:
            for pid in _read(os.path.join(where, "cgroup.procs")).split():
                try:
                    os.kill(int(pid), signal.SIGKILL)
                    killed += 1
                except ProcessLookupError:
                    pass
        except OSError:
            pass
    return killed


def _thaw_in(path: str) -> None:
    """Thaw one instance cgroup directory and its nested userland's, whichever froze them (a
    hang-stop, a hang-spin), so that the processes killed there die."""
    for where in (os.path.join(path, USERLAND), path):
        for name, value in (("freezer.state", "THAWED"), ("cgroup.freeze", "0")):
            try:
                _write(os.path.join(where, name), value)
            except OSError:
                pass


def kill_and_remove_one(path: str) -> int:
    """Kill what runs in one instance cgroup directory (its nested userland's too) and remove
    it. A frozen one is thawed after the kill, or its processes would never die."""
    killed = _kill_in(path)
    _thaw_in(path)
    _rmdir_tree(path)
    return killed


def kill_and_remove(bases: list[str]) -> int:
    """Kill every process in the instance cgroups under ``bases`` and remove them (an abandoned
    survivable machine's, at mkctl shutdown); returns how many were killed. Every hierarchy's
    processes are killed, then every freezer thawed, then the directories removed: a frozen
    process dies only once thawed, and no directory of another hierarchy that holds it can be
    removed before."""
    subs = []
    for base in bases:
        try:
            entries = os.listdir(base)
        except OSError:
            continue
        subs += [os.path.join(base, e) for e in entries if os.path.isdir(os.path.join(base, e))]
    killed = sum(_kill_in(path) for path in subs)
    for path in subs:
        _thaw_in(path)
    for path in subs:
        _rmdir_tree(path)
    for base in bases:
        if os.path.isdir(base):
            _rmdir(base)
    return killed


def reap_stale() -> int:
    """Clear every hierarchy of the cgroups that dead hosts left; returns the processes killed
    (``mkctl shutdown`` of a stale machine, and every new machine, call this)."""
    own = _own_paths()
    if os.path.exists(os.path.join(_MOUNT, "cgroup.controllers")):
        parents = [os.path.join(_MOUNT, own.get("", "/").lstrip("/"))]
    else:
        parents = [os.path.join(_MOUNT, c, own.get(c, "/").lstrip("/")) for c in V1_CONTROLLERS]
    # every hierarchy's at once: a frozen process dies only when its freezer is thawed
    return kill_and_remove([base for parent in parents for base in _stale_in(parent)])


def _rmdir_tree(path: str) -> None:
    """rmdir a cgroup and the cgroups nested in it, deepest first (a cgroup directory holds
    only its control files, which go with it)."""
    try:
        entries = os.listdir(path)
    except OSError:
        entries = []
    for entry in entries:
        sub = os.path.join(path, entry)
        if os.path.isdir(sub) and not os.path.islink(sub):
            _rmdir_tree(sub)
    _rmdir(path)


def _rmdir(path: str, patience: float = 2.0) -> None:
    """rmdir a cgroup; its last processes may take a moment to leave after SIGKILL."""
    deadline = time.monotonic() + patience
    while True:
        try:
            os.rmdir(path)
            return
        except FileNotFoundError:
            return
        except OSError:
            if time.monotonic() > deadline:
                return
            time.sleep(0.005)
