"""``mkctl exec -it``: a real terminal into an instance's userland, relayed through a pty.

mkctl opens a pty; its slave becomes the program's controlling terminal inside the userland
(guest/userland.py: setsid + TIOCSCTTY in the program's process), its master stays here. mkctl's
own terminal is put in raw mode, so every key, Ctrl-C and Ctrl-Z included, travels as a byte to
the pty, whose line discipline inside turns it into a signal for the foreground job *inside*
(not for mkctl); a shell there has job control. Output comes back the other way as it is. The
window size is copied onto the master at start and on every SIGWINCH (the kernel then sends
SIGWINCH to the foreground job inside, as a terminal emulator's resize does). mkctl's terminal
is restored on the way out however it ends: the program's exit, an exception, SIGTERM or SIGHUP.

Like ``docker exec`` and ``kubectl exec``: ``-t`` alone gives the program a terminal but reads
nothing from mkctl's stdin (a Ctrl-C typed at mkctl is passed to the pty as the interrupt
character); ``-i`` relays mkctl's stdin, which plain ``mkctl exec`` already does.
"""

from __future__ import annotations

import errno
import fcntl
import os
import select
import signal
import struct
import termios
import tty
from types import FrameType
from typing import Any

from partition.errors import NotATerminal

#: bytes moved per read, either way
CHUNK = 65536
#: after the userland is gone: how long to wait for output still in the pty's buffers
DRAIN_S = 0.5


def require_terminal(fd: int = 0) -> None:
    """``-t`` needs a terminal on mkctl's stdin (its size, its raw mode): refused otherwise,
    as docker's "the input device is not a TTY"."""
    if not os.isatty(fd):
        raise NotATerminal("the input device is not a TTY: -t gives the command a terminal "
                           "and needs one on mkctl's stdin",
                           "run mkctl from a terminal, or drop -t (plain exec and -i relay "
                           "stdin as a stream)")


def open_pty(size_from: int | None = 0) -> tuple[int, int]:
    """A fresh pty (master, slave), the window size of ``size_from`` already on it."""
    master, slave = os.openpty()
    if size_from is not None:
        copy_window_size(size_from, master)
    return master, slave


def window_size(fd: int) -> tuple[int, int]:
    """(rows, columns) of the terminal ``fd``."""
    rows, cols, _, _ = struct.unpack("HHHH", fcntl.ioctl(fd, termios.TIOCGWINSZ, bytes(8)))
    return rows, cols


def copy_window_size(src: int, master: int) -> None:
    """TIOCGWINSZ of ``src`` onto ``master``: nothing when ``src`` is not a terminal."""
    try:
        size = fcntl.ioctl(src, termios.TIOCGWINSZ, bytes(8))
    except OSError:
        return
    fcntl.ioctl(master, termios.TIOCSWINSZ, size)


class RawMode:
    """mkctl's terminal in raw mode for the time of a ``with``, restored on the way out; a
    SIGTERM or SIGHUP to mkctl ends the ``with`` (SystemExit) so that it is restored then too."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.saved: list[Any] | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> RawMode:
        self.saved = termios.tcgetattr(self.fd)

        def leave(sig: int, _frame: FrameType | None) -> None:
            raise SystemExit(128 + sig)
        for sig in (signal.SIGTERM, signal.SIGHUP):
            self._previous[sig] = signal.signal(sig, leave)
        tty.setraw(self.fd, termios.TCSANOW)
        return self

    def __exit__(self, *_exc: object) -> None:
        if self.saved is not None:
            termios.tcsetattr(self.fd, termios.TCSADRAIN, self.saved)
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)  # type: ignore[arg-type]


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view):]
        except BlockingIOError:
            select.select([], [fd], [], 1.0)


def relay(master: int, done: int, stdin: int | None = 0, stdout: int = 1) -> None:
    """Copy ``stdin`` (None: nothing) to the pty and the pty to ``stdout`` until the program's
    side of the pty is closed by everyone (EIO) or ``done`` (the relay process's pidfd) is
    readable; then the output still buffered is drained."""
    sources = [master, done] + ([stdin] if stdin is not None else [])
    gone_at: float | None = None
    while True:
        timeout = None if gone_at is None else DRAIN_S
        try:
            ready, _, _ = select.select(sources, [], [], timeout)
        except InterruptedError:                      # SIGWINCH: sizes are copied in its handler
            continue
        if not ready:                                 # drained: nothing more after the exit
            return
        if master in ready:
            try:
                data = os.read(master, CHUNK)
            except OSError as exc:
                if exc.errno != errno.EIO:
                    raise
                data = b""
            if not data:                              # every slave closed: the userland is gone
                return
            _write_all(stdout, data)
        if stdin is not None and stdin in ready:
            data = os.read(stdin, CHUNK)
            if data:
                _write_all(master, data)
            else:                                     # mkctl's input ended: the pty's EOF
                _write_all(master, bytes([termios.tcgetattr(master)[6][termios.VEOF][0]]))
                sources.remove(stdin)
                stdin = None
        if done in ready and gone_at is None:
            sources.remove(done)
            gone_at = 0.0


def interactive(master: int, done: int, stdin_open: bool) -> None:
    """The whole of ``-t``'s side in mkctl: raw mode (when stdin is relayed and a terminal),
    window size followed on SIGWINCH, the relay, everything restored."""
    def resize(_sig: int, _frame: FrameType | None) -> None:
        copy_window_size(0, master)

    def interrupt(_sig: int, _frame: FrameType | None) -> None:   # -t alone: Ctrl-C at mkctl
        _write_all(master, bytes([termios.tcgetattr(master)[6][termios.VINTR][0]]))

    old_winch = signal.signal(signal.SIGWINCH, resize)
    old_int = signal.signal(signal.SIGINT, signal.SIG_IGN if stdin_open else interrupt)
    try:
        if stdin_open and os.isatty(0):
            with RawMode(0):
                relay(master, done, 0)
        else:
            relay(master, done, 0 if stdin_open else None)
    finally:
        signal.signal(signal.SIGWINCH, old_winch)
        signal.signal(signal.SIGINT, old_int)
