"""``mkctl console NAME``: an instance's console, read, followed, and typed on (mktty-like).

Three ways to use it:

- plain: the log as it is now, then exit (scripts read a crash's last lines this way);
- ``-f``: follow it as ``tail -f`` does, reading only;
- two-way, with ``-i`` (or ``-f`` on a terminal mkctl holds in the foreground): every line
  typed (or piped in) is sent to the instance with the ``console_input`` op, its kernel's
  ``on_console_input`` hook and its userland's ``/dev/console`` get it, while the output is
  followed as ``-f`` does. End of input (Ctrl-D on a terminal) ends it after a short drain, so
  that what the kernel answers to the last line is shown (0.5 s; up to 2 s while nothing has
  come since that line); Ctrl-C ends it at once.

The terminal stays in its own (cooked) mode: its line discipline edits the line, and the line
goes when Enter is pressed, as on a serial console. The real mktty (devices.md) is a character
device; here the supervisor's socket carries each line, and the host checks it (UTF-8 text, at
most ``INPUT_LINE_MAX`` bytes: host/consoleinput.py). A line too long is refused here already,
without buffering it whole. Output is escaped as everywhere (``--raw`` for the bytes).
"""

from __future__ import annotations

import os
import select
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from partition.abi.console import INPUT_LINE_MAX
from partition.errors import ConsoleLineTooLong, MKError
from partition.terminal import printable

#: after end of input, how long output is still followed (at least two reads' intervals), and
#: at most how long while nothing has come since the last line was sent: a kernel answers a
#: line in microseconds, on a loaded machine in a few hundred milliseconds; one that never
#: answers costs DRAIN_MAX_S
DRAIN_S = 0.5
DRAIN_MAX_S = 2.0
#: the most read from the input at once
READ_BYTES = 64 * 1024


def new_console_text(shown: str, text: str) -> str:
    """What ``text`` (a console read now) has that ``shown`` (read before) had not: the tail
    past the old text, or past its last line once the console's ring has wrapped."""
    if text.startswith(shown):
        return text[len(shown):]
    last = shown.rstrip("\n").rpartition("\n")[2]
    if last:
        at = text.rfind(last + "\n")
        if at >= 0:
            return text[at + len(last) + 1:]
    return text


def at_terminal(fd: int = 0) -> bool:
    """mkctl reads a terminal it holds in the foreground and writes to one: typing is what its
    user does there. (A background mkctl reading its terminal would be stopped by SIGTTIN.)"""
    try:
        return os.isatty(fd) and os.isatty(1) and os.tcgetpgrp(fd) == os.getpgrp()
    except OSError:
        return False


@dataclass(frozen=True)
class TooLong:
    """A line the reader dropped for its length (its bytes, newline excluded)."""

    size: int


class LineReader:
    """Lines from the input, as they complete: each with its newline (the host drops it), or
    ``TooLong`` for one past ``limit`` bytes, which is dropped as it comes rather than held
    whole. At end of input a last line without its newline counts as a line."""

    def __init__(self, limit: int = INPUT_LINE_MAX) -> None:
        self.limit = limit
        self.eof = False
        self._buf = bytearray()
        self._dropped = 0            # bytes of an overlong line dropped so far (0: none)

    def feed(self, data: bytes) -> list[bytes | TooLong]:
        """What ``data`` (a read's bytes; b"": end of input) completes."""
        out: list[bytes | TooLong] = []
        if not data:
            self.eof = True
            data = b"\n" if self._buf or self._dropped else b""
        self._buf += data
        while (nl := self._buf.find(b"\n")) >= 0:
            line = bytes(self._buf[:nl + 1])
            del self._buf[:nl + 1]
            size = len(line) - (2 if line.endswith(b"\r\n") else 1)
            if self._dropped or size > self.limit:
                out.append(TooLong(self._dropped + size))
                self._dropped = 0
            else:
                out.append(line)
        if len(self._buf) > self.limit + 1:      # (+1: a "\r" before its newline)
            self._dropped += len(self._buf)
            self._buf.clear()
        return out


class Session:
    """One two-way console: output followed, input sent line by line.

    ``tty``: a person types; a refused line is said and the session goes on (the instance
    may come back: a restart, ``mkctl start``; a watched experiment refuses every line and is
    still followed). Otherwise (a pipe, a file) the first refusal ends it with the refusal
    (mkctl exits 1), as a script wants: what came before it was sent, nothing after it."""

    def __init__(self, call: Callable[..., Any], name: str, show: Callable[[str], str],
                 text: str, interval: float, stdin: int = 0, tty: bool = False) -> None:
        self.call, self.name, self.show, self.text = call, name, show, text
        self.interval, self.stdin, self.tty = interval, stdin, tty
        self.reader = LineReader()
        #: output came since the last line was sent (or none was sent): the drain may end
        self.answered = True

    def run(self) -> bool:
        """Until end of input and its drain (True), or the console can no longer be read
        (False, said on stderr). Ctrl-C is the caller's (KeyboardInterrupt)."""
        ended: float | None = None         # when the input ended
        while True:
            if ended is None:
                if self._take_input():
                    ended = time.monotonic()
            else:
                time.sleep(self.interval)
            if not self.catch_up():
                return False
            if ended is not None:
                waited = time.monotonic() - ended
                if waited >= max(DRAIN_S, 2 * self.interval) and \
                        (self.answered or waited >= DRAIN_MAX_S):
                    return True

    def _take_input(self) -> bool:
        """Wait up to an interval for input, and send each line it completes; True at the end
        of input. A refusal that ends the session shows the output before it first."""
        try:
            if not select.select([self.stdin], [], [], self.interval)[0]:
                return False
            data = os.read(self.stdin, READ_BYTES)
        except (OSError, ValueError):       # (no stdin at all, or closed under us: its end)
            data = b""
        try:
            for item in self.reader.feed(data):
                self._send(item)
        except MKError:
            self.catch_up()     # what the lines before it brought, then the refusal
            raise
        return self.reader.eof

    def _send(self, item: bytes | TooLong) -> None:
        try:
            if isinstance(item, TooLong):
                raise ConsoleLineTooLong(f"console input of {item.size} bytes: a line is at "
                                         f"most {self.reader.limit} bytes", "type shorter lines")
            self.call("console_input", name=self.name, data=item)
            self.answered = False
        except MKError as exc:      # too long, not text, the instance not running, ...
            if not self.tty:
                raise
            print(printable(f"mkctl console: line not sent: {exc}"), file=sys.stderr)

    def catch_up(self) -> bool:
        """Show what the console has that was not shown yet; False once it cannot be read."""
        try:
            now = self.call("console", name=self.name)
        except MKError as exc:
            print(printable(f"mkctl console: stopped following: {exc}"), file=sys.stderr)
            return False
        new = new_console_text(self.text, now)
        if new:
            sys.stdout.write(self.show(new))
            sys.stdout.flush()
            self.answered = True
        self.text = now
        return True


def follow(call: Callable[..., Any], name: str, show: Callable[[str], str], text: str,
           interval: float) -> None:
    """``-f``: as ``tail -f``, reads only (the console op drives nothing), until the console
    can no longer be read or Ctrl-C (the caller's)."""
    session = Session(call, name, show, text, interval)
    while True:
        time.sleep(interval)
        if not session.catch_up():
            return
