"""What the host keeps of one instance's userland (host/userlands.py runs them): the run
record and its boot programs, the check of a program list, and the two process chores of a
userland's start (an init killed and reaped when it cannot be booked; the console pty made
quiet). Apart so that userlands.py is the lifecycle alone."""

from __future__ import annotations

import os
import shlex
import signal
import termios
from dataclasses import dataclass, field
from typing import Any

from partition.errors import InvalidSpec
from partition.guest import userinit

#: how long ``ensure`` drives the machine for the init's "ready" (a bounded handshake)
READY_S = 10.0
#: how much of the init's pipe and of the console is read per turn (a flood waits its turn)
READ_PER_TURN = 4096
#: a console line longer than this is cut (and written) there
LINE_MAX = 512
#: the boots whose programs an instance keeps (its latest ones)
BOOTS_KEPT = 8
#: what the host keeps of the init's records still unparsed (a record is at most 520 bytes)
PENDING_MAX = 8192
CONSOLE_TAG = "[console] "
ARGV_MAX, ARG_MAX = 64, 4096

@dataclass
class Program:
    """A boot program in one boot: its argv, and what became of it."""

    index: int
    argv: list[str]
    generation: int
    status: int | str = "starting"     # starting, running, an exit status, or lost (the
    reason: str = ""                   # userland ended first)

    def to_dict(self) -> dict[str, Any]:
        return {"index": self.index, "argv": list(self.argv), "generation": self.generation,
                "status": self.status, "reason": self.reason}


@dataclass
class Run:
    """One userland of one instance: what the host holds for it."""

    inst_id: int
    name: str
    generation: int
    pid: int
    pidfd: int
    start: int
    report: int
    console: int                  # the pty's master
    slave: int                    # held, so the master never hangs up while no program has it
    programs: list[Program] = field(default_factory=list)
    ready: bool = False
    ended: bool = False
    failure: str = ""
    pending: bytearray = field(default_factory=bytearray)
    line: bytearray = field(default_factory=bytearray)
    #: made ahead of its kernel's boot (``park``): the write end of its go pipe, and what it
    #: was made for (identity, programs), compared when the kernel is active; -1 once it runs
    go: int = -1
    made_for: tuple[Any, ...] = ()
    ahead: bool = False           # parked, not (yet) the instance's run: ends unrecorded


def check_programs(programs: Any) -> list[list[str]]:
    """A list of programs, each a string (split as a shell would, without one: shlex) or a
    list of strings; InvalidSpec otherwise."""
    if programs is None:
        return []
    if not isinstance(programs, list) or len(programs) > userinit.PROGRAMS_MAX:
        raise InvalidSpec(f"programs must be a list of at most {userinit.PROGRAMS_MAX} "
                          f"commands, got {str(programs)[:80]!r}",
                          "e.g. programs = [\"/bin/sh -c 'echo hi'\"]")
    out = []
    for p in programs:
        try:
            argv = shlex.split(p) if isinstance(p, str) else p
        except ValueError as exc:
            raise InvalidSpec(f"program {p[:80]!r} cannot be split: {exc}",
                              "quote it as a shell would") from None
        if not isinstance(argv, list) or not argv or len(argv) > ARGV_MAX or any(
                not isinstance(a, str) or not a or "\0" in a or len(a) > ARG_MAX
                for a in argv):
            raise InvalidSpec(f"program {str(p)[:80]!r} is not a command: a non-empty list of "
                              f"at most {ARGV_MAX} non-empty strings",
                              "e.g. '/bin/echo hello' or [\"/bin/echo\", \"hello\"]")
        out.append([str(a) for a in argv])
    return out


def kill_and_reap(pid: int, pidfd: int) -> None:
    """An init forked but not taken into the host's books (a later step failed): killed (by
    its pidfd where there is one; else by pid, which cannot be reused: it is our child, not
    reaped) and reaped now."""
    try:
        if pidfd >= 0:
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        else:
            os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    try:
        os.waitpid(pid, 0)
    except ChildProcessError:
        pass


def quiet(slave: int) -> None:
    """The console pty as a console: no echo of what is typed (the host's ``feed``), output unchanged."""
    attrs = termios.tcgetattr(slave)
    attrs[1] &= ~termios.OPOST
    attrs[3] &= ~(termios.ECHO | termios.ECHONL)
    termios.tcsetattr(slave, termios.TCSANOW, attrs)
