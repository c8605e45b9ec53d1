"""The shape of a request on the supervisor's socket, checked field by field before any verb
sees it: ``ARGS`` names every op's arguments with a check and whether it is required;
``check_request`` applies them, ``check_numbers`` refuses NaN and the infinities anywhere.

Separate from the daemon (daemon.py) and the verbs (daemonops.py): this is the one place the
wire's untrusted input is judged, shared by the supervisor's socket and the scenario watcher's.
"""

from __future__ import annotations

import math
import reprlib
from collections.abc import Callable, Collection
from typing import Any, NoReturn

from partition.errors import InvalidSpec

# -- the wire's arguments, verb by verb ----------------------------------------------------
# Every field of a request is checked here before any verb sees it: a frame from one client
# is untrusted input, and a TypeError or an unhashable value raised from deep inside the
# machine while another client's verb waits would fail that other verb instead. The machine
# checks meanings (a name's instance, a size's room); these check shapes, types and ranges.
Check = Callable[[str, Any], None]
MAX_TEXT = 4096             # a name, a kernel spec, a command line (kimage.MAX_CMDLINE)
MAX_ITEMS = 4096            # a CPU list, an argv, fault options
MAX_INT = (1 << 63) - 1     # what the pool's arithmetic and msgpack's int64 take


def _refuse(name: str, value: Any, want: str, example: str) -> NoReturn:
    shown = reprlib.repr(value)         # (bounded in depth and length, whatever came)
    raise InvalidSpec(f"argument {name!r} must be {want}, got {shown}", f"e.g. {example}")


def _text(name: str, value: Any) -> None:
    if not isinstance(value, str) or len(value) > MAX_TEXT:
        _refuse(name, value, f"text of at most {MAX_TEXT} characters", f"{name}=\"db\"")


def _flag(name: str, value: Any) -> None:
    if not isinstance(value, bool):     # "no" and 0 are not false here: only false is
        _refuse(name, value, "true or false", f"{name}=true")


def _integer(lo: int, hi: int) -> Check:
    def check(name: str, value: Any) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            _refuse(name, value, f"an integer in {lo}..{hi}", f"{name}={max(lo, 1)}")
    return check


def _number(lo: float, hi: float) -> Check:
    def check(name: str, value: Any) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or \
                not math.isfinite(value) or not lo <= value <= hi:
            _refuse(name, value, f"a finite number in [{lo:g}, {hi:g}]", f"{name}=5")
    return check


def _cpus(name: str, value: Any) -> None:
    if isinstance(value, str):
        _text(name, value)
    elif not isinstance(value, list) or len(value) > MAX_ITEMS or any(
            isinstance(c, bool) or not isinstance(c, int) or not 0 <= c < MAX_ITEMS
            for c in value):
        _refuse(name, value, "a CPU list (text) or a list of CPU numbers", f"{name}=\"1-3\"")


def _size(name: str, value: Any) -> None:
    if isinstance(value, str):
        _text(name, value)
    elif isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_INT:
        _refuse(name, value, "a size (text such as 64M, or bytes)", f"{name}=\"64M\"")


def _instance(name: str, value: Any) -> None:
    """An instance's name, or (console, console_input) its id: 0 or "host" is the host's."""
    if isinstance(value, int) and not isinstance(value, bool):
        _integer(0, 511)(name, value)
    else:
        _text(name, value)


def _options(name: str, value: Any) -> None:
    if not isinstance(value, dict) or len(value) > MAX_ITEMS or any(
            not isinstance(k, str) or isinstance(v, bool) or not isinstance(v, (int, float))
            or (isinstance(v, float) and not math.isfinite(v)) or not -MAX_INT <= v <= MAX_INT
            for k, v in value.items()):
        _refuse(name, value, "a map of option names to finite numbers", f"{name}={{\"seconds\": 2}}")


def _argv(name: str, value: Any) -> None:
    if not isinstance(value, list) or len(value) > MAX_ITEMS or \
            any(not isinstance(a, str) or len(a) > MAX_TEXT for a in value):
        _refuse(name, value, f"a list of at most {MAX_ITEMS} strings", f"{name}=[\"ps\"]")


def _programs(name: str, value: Any) -> None:
    """Boot programs: each a command line (text) or an argv (host/userlands.py splits and
    judges them)."""
    if not isinstance(value, list) or len(value) > MAX_ITEMS or any(
            not (isinstance(p, str) and len(p) <= MAX_TEXT) and not (
                isinstance(p, list) and len(p) <= MAX_ITEMS
                and all(isinstance(a, str) and len(a) <= MAX_TEXT for a in p))
            for p in value):
        _refuse(name, value, f"a list of at most {MAX_ITEMS} commands (text or lists of text)",
                f"{name}=[\"/bin/echo hi\"]")


def _mask(name: str, value: Any) -> None:
    """An LLC way mask: text (hex or decimal) or an integer of at most 64 bits; host/llc.py
    judges the bits themselves."""
    if isinstance(value, str):
        _text(name, value)
    elif isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 1 << 64:
        _refuse(name, value, "a bit mask (text such as 0x0f, or an integer)", f"{name}=\"0x0f\"")


def _limit(name: str, value: Any) -> None:
    """A process limit: an integer or text; host/userspec.py judges the number itself, so that
    every way in (mkctl, the wire, a scenario) refuses it in the same words."""
    if isinstance(value, str):
        _text(name, value)
    elif isinstance(value, bool) or not isinstance(value, int) or not -MAX_INT <= value <= MAX_INT:
        _refuse(name, value, "a number of processes", f"{name}=256")


def _typed(name: str, value: Any) -> None:
    """A line typed on a console: bytes (what a terminal gave, judged by the host: UTF-8, one
    line, its bound) or text, of at most MAX_TEXT bytes here (host/consoleinput.py's bound is
    smaller, and says so in its own words)."""
    if not isinstance(value, (bytes, str)) or len(value) > MAX_TEXT:
        _refuse(name, value, f"one line of console input (bytes or text, at most {MAX_TEXT})",
                f"{name}=b\"help\\n\"")


def _blob(name: str, value: Any) -> None:
    if not isinstance(value, bytes):
        _refuse(name, value, "bytes (a DTBO)", "data=<the overlay's bytes>")


_SECONDS = _number(0, 86400)
#: an instance id: its range (1..511) is the pool's and kerf's to refuse, in their words
_ID = _integer(0, MAX_INT)
#: op -> {argument: (check, required)}; every op of ``daemonops.ops`` and ``shutdown`` has one
#: (tests/test_supervisor.py checks that they name the same arguments)
ARGS: dict[str, dict[str, tuple[Check, bool]]] = {
    "ping": {},
    "shutdown": {},
    "show": {"name": (_text, False), "brief": (_flag, False)},
    "create": {"name": (_text, True), "memory": (_size, True), "cpus": (_cpus, False),
               "cpu_count": (_integer(0, MAX_INT), False), "id": (_ID, False),
               "recovery": (_text, False), "max_restarts": (_integer(0, 1000), False),
               "restart_window": (_SECONDS, False), "watchdog": (_SECONDS, False),
               "standby_for": (_text, False), "preserve_memory": (_flag, False),
               "llc_way_mask": (_mask, False), "pids_max": (_limit, False),
               "rootfs": (_text, False), "shared": (_argv, False)},
    "update": {"name": (_text, True), "recovery": (_text, False),
               "max_restarts": (_integer(0, 1000), False), "restart_window": (_SECONDS, False),
               "watchdog": (_SECONDS, False), "preserve_memory": (_flag, False)},
    "fault": {"name": (_text, True), "kind": (_text, True), "options": (_options, False)},
    "load": {"name": (_text, True), "kernel": (_text, True), "cmdline": (_text, False),
             "cwd": (_text, False), "programs": (_programs, False)},
    "start": {"name": (_text, True), "wait": (_flag, False)},
    "exec": {"name": (_text, True), "wait": (_flag, False)},
    "kill": {"name": (_text, True), "force": (_flag, False), "timeout": (_SECONDS, False)},
    "unload": {"name": (_text, True)},
    "delete": {"name": (_text, True)},
    "console": {"name": (_instance, True)},
    "console_input": {"name": (_instance, True), "data": (_typed, True)},
    "overlay": {"data": (_blob, True)},
    "overlay_remove": {"tx": (_integer(0, MAX_INT), True)},
    "resize": {"name": (_text, True), "cpus": (_cpus, False), "memory": (_size, False)},
    "dump": {"name": (_text, False)},
    "kexec_load": {"id": (_ID, True), "kernel": (_text, True), "cmdline": (_text, False)},
    "kexec_unload": {"id": (_ID, True)},
    "mk_reboot": {"cmd": (_text, True), "id": (_ID, True)},
    "exec_into": {"name": (_text, True), "argv": (_argv, False)},
    "live_update": {"name": (_text, True), "kernel": (_text, True), "cmdline": (_text, False),
                    "quiesce": (_number(0, 3600), False)},
}


def check_request(req: Any, ops: Collection[str]) -> tuple[str, dict[str, Any]]:
    """(op, args) of a request whose every field has the type and range its verb takes, or
    InvalidSpec naming the field; an argument given as null is left out (its default).
    ``ops``: the verbs this socket serves (another op is the caller's to refuse)."""
    if not isinstance(req, dict) or not isinstance(req.get("op"), str) or \
            not isinstance(req.get("args", {}), dict):
        raise InvalidSpec("malformed request: expected {op: str, args: map}",
                          "use mkctl, or follow docs/architecture.md")
    op, args = req["op"], {k: v for k, v in req.get("args", {}).items() if v is not None}
    check_numbers(args)
    schema = ARGS.get(op) if op in ops else None
    if schema is None:
        return op, args
    extra = set(args) - set(schema)
    if extra:
        raise InvalidSpec(f"unknown argument(s) {sorted(extra)} for {op!r}",
                          f"allowed: {sorted(schema)}")
    for name, (check, required) in schema.items():
        if name in args:
            check(name, args[name])
        elif required:
            raise InvalidSpec(f"{op!r} needs the argument {name!r}", f"allowed: {sorted(schema)}")
    return op, args


def check_numbers(value: Any, where: str = "arguments") -> None:
    """NaN and the infinities are refused anywhere in a request, before any verb sees them.
    Walked with a stack of its own: a frame nested a thousand deep is refused by its schema,
    not met with a RecursionError here."""
    todo = [(value, where)]
    while todo:
        value, where = todo.pop()
        if isinstance(value, float) and not math.isfinite(value):
            raise InvalidSpec(f"{where} holds {value!r}, which is not a finite number",
                              "give a finite number")
        if isinstance(value, dict):
            todo += [(v, f"argument {k!r}") for k, v in value.items()]
        elif isinstance(value, (list, tuple)):
            todo += [(v, where) for v in value]
