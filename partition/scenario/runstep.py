"""A scenario's ``run`` action: a program started inside an instance at a moment of the
timeline, in a fresh userland of its own (guest/userland.py: the instance's cgroups, CPUs,
filter and shared regions), with its exit status and the figures it prints as metrics of the
action.

Why an action and not only an instance's boot programs: an experiment's *check* (the
crash-consistency checker, scenarios/crash-consistency.toml) runs once, at a moment the
scenario picks, and its figures must reach ``expect``: ``check.bad_words == 0``. So a program
started here may end its output with a JSON object on its last line; the names the action
declares in ``metrics`` are read from it (numbers or booleans; anything else is no value), and
``exit_status`` is the program's (127: it could not be started; 128 + N: killed by signal N,
which is also what a program gets when its instance dies under it).

The program is instance-side: its output is read without blocking while the run goes on (the
loop keeps driving the machine), only its last ``TAIL`` bytes are kept, and nothing it prints
is trusted beyond the declared names and their types. It has until ``timeout`` (default 30 s)
from its start; then its userland is hung up (SIGTERM to its init, SIGKILL to the relay 2 s
later). The end of the run waits for every program still running, up to its own timeout.
Its stdin is the runner's (as ``mkctl exec``'s is mkctl's) and its stderr too, so a program's
complaint is seen where the run is watched.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from partition.errors import NotLoaded
from partition.guest import userland
from partition.host.machine import Machine

#: bytes of a program's output kept (the last ones: its figures are on its last line)
TAIL = 64 << 10
#: bytes of a program's output read per step at most (a flood waits its turn), and once it
#: exited (what its pipe holds: at most the pipe's size, 1 MiB unless raised, if nothing that
#: outlived it still writes there)
READ_PER_STEP = 256 << 10
LAST_READ = 2 << 20
#: seconds a program has by default, from its start
TIMEOUT = 30.0
#: seconds between the SIGTERM of a timed-out program's userland and SIGKILL of its relay
GRACE = 2.0


def argv_of(program: Any) -> list[str] | None:
    """``"cmd arg ..."`` (shlex, no shell) or ``["cmd", "arg"]``: the argv, or None if it is
    neither (or empty)."""
    if isinstance(program, str):
        try:
            argv = shlex.split(program)
        except ValueError:
            return None
    elif isinstance(program, list) and all(isinstance(a, str) for a in program):
        argv = list(program)
    else:
        return None
    return argv if argv and argv[0] and not any("\0" in a for a in argv) else None


def check_actions(actions: list[dict[str, Any]]) -> list[str]:
    """The problems of the ``run`` actions' own keys (schema.py checks the rest): a program to
    run, and ``metrics`` only where a program prints them."""
    problems = []
    for a in actions:
        where = f"[[action]] {a.get('name')!r}"
        if a.get("do") == "run":
            program = (a.get("args") or {}).get("program")
            if program is None:
                problems.append(f"{where}: run needs args.program, e.g. "
                                "{ program = \"python3 -m mod check FILE\" }")
            elif argv_of(program) is None:
                problems.append(f"{where}: args.program is {program!r}; expected a command "
                                "line like \"cmd arg ...\" (no shell) or a list of strings")
        elif "metrics" in a:
            problems.append(f"{where}: key 'metrics' is read from a run action's program; "
                            f"a {a.get('do')!r} action has none")
    return problems


@dataclass
class Started:
    """A program of a run action, from the runner's side."""

    action: str
    argv: list[str]
    started: userland.Userland
    out: int                                  # its stdout's read end, non-blocking
    deadline: float
    tail: bytearray = field(default_factory=bytearray)
    hung_up_at: float | None = None
    status: int | None = None


class Programs:
    """Every run action's program: started, watched each turn, reaped, measured."""

    def __init__(self) -> None:
        self.running: dict[str, Started] = {}
        self.done: dict[str, Started] = {}

    def start(self, m: Machine, action: dict[str, Any]) -> dict[str, Any]:
        """Start the action's program in a fresh userland of its target (active: else
        NotLoaded, as ``mkctl exec``)."""
        inst = m.get(action["target"])
        procs = m.cgroups.procs_files(inst.id)
        if inst.state.value != "active" or inst.pid is None or \
                not userland.in_cgroups_of(inst.pid, procs):
            raise NotLoaded(f"instance {inst.name!r} is {inst.state.value}; run starts a "
                            "program inside a running instance", "run it after the boot")
        args = action["args"]
        argv = argv_of(args["program"]) or []
        identity = userland.Identity(name=inst.name, cpus=list(inst.cpus), cgroup_procs=procs,
                                     rootfs=inst.rootfs, hide=[m.run_dir], kernel_pid=inst.pid,
                                     shared=m.shared.mounts(inst.shared))
        r, w = os.pipe2(os.O_CLOEXEC)
        try:
            started = userland.start(identity, argv, stdout=w)
        except BaseException:
            os.close(r)
            raise
        finally:
            os.close(w)
        os.set_blocking(r, False)
        timeout = float(args.get("timeout", TIMEOUT))
        self.running[action["name"]] = Started(action["name"], argv, started, r,
                                               time.monotonic() + timeout)
        return {"pid": started.pid}

    def step(self) -> None:
        """Read what each program printed, reap those that ended, hang up those past their
        time. Never blocks."""
        now = time.monotonic()
        for name, p in list(self.running.items()):
            self._drain(p)
            if _exited(p.started.pid):
                p.status = p.started.wait()            # reaps at once: it has exited
                self._drain(p, LAST_READ)               # (what its pipe still holds)
                os.close(p.out)
                self.done[name] = self.running.pop(name)
            elif p.hung_up_at is None and now >= p.deadline:
                p.hung_up_at = now
                p.started.signal(signal.SIGTERM)
            elif p.hung_up_at is not None and now >= p.hung_up_at + GRACE:
                try:
                    os.kill(p.started.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass

    def finish(self, wait: Callable[[float], Any]) -> None:
        """Wait for every program still running (up to its timeout, then the grace), calling
        ``wait(seconds)`` in between: the machine goes on being driven."""
        while self.running:
            self.step()
            if self.running:
                wait(0.01)

    def close(self) -> None:
        """Teardown: kill what is left (the run was interrupted) and reap it."""
        for p in self.running.values():
            try:
                os.kill(p.started.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.status = p.started.wait()
            os.close(p.out)
        self.running.clear()

    def metrics(self, action: dict[str, Any]) -> dict[str, Any]:
        """The action's metrics: done (exit 0), error (why not), exit_status, output (its last
        lines) and each declared figure from its last line (None: not printed, or not a number
        or boolean). A program never started has no done or error here: the action's own
        record says why."""
        names = action.get("metrics", [])
        p = self.done.get(action["name"])
        if p is None:
            none: dict[str, Any] = {"exit_status": None, "output": [], **{n: None for n in names}}
            if action["name"] in self.running:          # (the run was interrupted)
                return {"done": False, "error": "still running when the run ended", **none}
            return none                                 # never started: the action says why
        lines = bytes(p.tail).decode(errors="replace").splitlines()
        figures = _figures(lines[-1] if lines else "", names)
        error = None
        if p.status != 0:
            error = (f"it could not be started: {p.started.reason}" if p.status == 127 and
                     p.started.reason else f"it exited with status {p.status}")
            if p.hung_up_at is not None:
                error += " (hung up: still running after its timeout)"
        return {"done": p.status == 0, "error": error, "exit_status": p.status,
                "output": [line[:200] for line in lines[-10:]], **figures}

    @staticmethod
    def _drain(p: Started, limit: int = READ_PER_STEP) -> None:
        """What the program printed since, up to ``limit`` bytes: a program that writes
        faster than the runner reads (or a process it left holding its stdout) has its turn
        bounded; the rest waits for the next step, the run goes on."""
        left = limit
        while left > 0:
            try:
                chunk = os.read(p.out, min(65536, left))
            except (BlockingIOError, OSError):
                return
            if not chunk:
                return
            left -= len(chunk)
            p.tail += chunk
            if len(p.tail) > TAIL:
                del p.tail[:len(p.tail) - TAIL]


def _exited(pid: int) -> bool:
    """The relay has exited (not reaped: ``Userland.wait`` does that)."""
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True


def _figures(line: str, names: list[str]) -> dict[str, Any]:
    try:
        data = json.loads(line)
    except ValueError:
        data = None
    if not isinstance(data, dict):
        data = {}
    out: dict[str, Any] = {}
    for n in names:
        v = data.get(n)
        ok = isinstance(v, bool) or (isinstance(v, (int, float)) and math.isfinite(v))
        out[n] = v if ok else None
    return out
