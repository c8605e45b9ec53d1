"""Console input: a line typed on an instance's console, to its kernel and its userland.

The real machine's console is mktty (../shared/reference/devices.md): a spawn kernel boots with
``console=mktty0``, and what is typed on ``/dev/mktty`` after choosing an instance reaches that
kernel as a message of type "MKTY" with input = 1. Here a typed line goes

- to the kernel, as a host command of the emulator's own type ``MK_EMU_MKTY`` (0x3F07: the
  real type number is not in the reference) with ``op = MKTY_INPUT`` (1, the real input
  value): numbered and digested like every host command, so no peer can type for the host; the
  kernel's ``on_console_input`` hook gets the line (guest/commands.py);
- then to the instance's userland's ``/dev/console``, through ``sinks``: each is a
  ``feed(name, data) -> bool`` (True when a userland took the bytes); the host's userlands
  are wired in by whoever builds them (``ConsoleInput(..., sinks=[userlands.feed])``).

A line is checked before anything moves: UTF-8 text (invalid bytes are refused, never
replaced), one line (a trailing newline is dropped; another is refused), at most ``MAX_LINE``
bytes and no more than one ring slot of the machine carries. A refused line changes nothing. The
event log records each line's length, never its content (a typed password is nobody's record).
"""

from __future__ import annotations

import errno
from collections.abc import Callable, Iterable
from typing import Any

from partition.abi import message as M
from partition.abi.console import INPUT_LINE_MAX
from partition.abi.ring_layout import RingError
from partition.errors import ConsoleLineTooLong, ConsoleNotText, NotLoaded, ResourceBusy
from partition.host.events import EventLog
from partition.host.instance import Instance, State

#: the longest line the console takes, in UTF-8 bytes without its newline (2 KiB)
MAX_LINE = INPUT_LINE_MAX

#: the host's userland's ``feed(instance name, bytes) -> bool``: True when a userland took it
Sink = Callable[[str, bytes], bool]
#: ``HostIPC.command``: a host command to a running instance (numbered, digested, sent)
Command = Callable[..., Any]


def check_line(data: bytes | str) -> str:
    """The one line ``data`` holds, as text: one trailing newline (``\\n`` or ``\\r\\n``)
    dropped. ConsoleLineTooLong past ``MAX_LINE`` bytes or for a newline inside;
    ConsoleNotText for bytes that are not UTF-8 (or a str that does not encode to it)."""
    if isinstance(data, str):
        try:
            raw = data.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise ConsoleNotText(f"console input is not text: character {exc.start} cannot be "
                                 "written as UTF-8", "type text (UTF-8)") from None
    else:
        raw = bytes(data)
    if raw.endswith(b"\n"):
        raw = raw[:-2] if raw.endswith(b"\r\n") else raw[:-1]
    if len(raw) > MAX_LINE:
        raise ConsoleLineTooLong(f"console input of {len(raw)} bytes: a line is at most "
                                 f"{MAX_LINE} bytes", "type shorter lines")
    if b"\n" in raw:
        raise ConsoleLineTooLong("console input holds more than one line",
                                 "send one line at a time")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConsoleNotText(f"console input is not UTF-8 text: byte {exc.start} "
                             f"(0x{raw[exc.start]:02x}) is invalid; nothing was sent",
                             "type text (UTF-8)") from None


class ConsoleInput:
    """The host's side of typed console input: checks a line, then hands it to the kernel and
    to the userland's ``/dev/console`` (``sinks``), counts it and logs it."""

    def __init__(self, command: Command, events: EventLog, slot_bytes: int,
                 sinks: Iterable[Sink] = ()) -> None:
        self._command = command
        self._events = events
        self._slot_bytes = slot_bytes
        #: where a line goes besides the kernel: the userland's ``feed`` (see the docstring)
        self.sinks: list[Sink] = list(sinks)

    def deliver(self, inst: Instance, data: bytes | str) -> dict[str, Any]:
        """Type one line on ``inst``'s console. NotLoaded unless its kernel runs; the line's
        refusals (check_line, a slot too small); ResourceBusy when its ring is full."""
        line = check_line(data)
        if inst.state != State.ACTIVE or inst.pid is None:
            raise NotLoaded(f"instance {inst.name!r} is {inst.state.value}: console input goes "
                            "to a running kernel", f"mkctl start {inst.name}, then type again")
        body = {"op": M.MKTY_INPUT, "line": line}
        room = self._slot_bytes
        if len(M.encode(M.MK_EMU_MKTY, 0, 0, {"seq": 1 << 62, "body": body})) > room:
            raise ConsoleLineTooLong(f"a console line of {len(line.encode())} bytes does not "
                                     f"fit this machine's {room}-byte ring slots",
                                     "type shorter lines, or use larger ring slots "
                                     "(Machine(ring_slot_bytes=...))")
        try:
            self._command(inst, M.MK_EMU_MKTY, body)
        except RingError as exc:
            if exc.errno == errno.ENOSPC:
                raise ResourceBusy(f"instance {inst.name!r} takes no console input now: its "
                                   "IPI ring is full", "type again once its kernel drains "
                                   f"its ring (mkctl show {inst.name})") from None
            raise ConsoleLineTooLong(str(exc), "type shorter lines") from None
        raw = line.encode("utf-8") + b"\n"
        userland = False
        for sink in self.sinks:
            try:
                userland = bool(sink(inst.name, raw)) or userland
            except OSError as exc:      # the userland's console went away meanwhile
                self._events.warning("console_input_unfed", instance=inst.id, name=inst.name,
                                     error=str(exc))
        inst.count("console_lines")
        self._events.info("console_input", instance=inst.id, name=inst.name,
                          bytes=len(raw) - 1, userland=userland)
        return {"name": inst.name, "bytes": len(raw) - 1, "kernel": True, "userland": userland}
