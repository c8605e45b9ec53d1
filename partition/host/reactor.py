"""The host's event loop: one epoll selector, each descriptor registered with its handler.

Every descriptor the host watches (an instance's pidfd, its doorbell channel, its loader's
report pipe, a parked process's pidfd, a live update's old doorbell, the host's own doorbells)
carries a ``Watch``: what it is (``kind``, for a reader), the instance it belongs to, and the
handler the loop calls when it is readable. The loop itself knows none of them but one: an
instance's death (``EXIT``, its pidfd) is handled before whatever else is ready in the same turn,
and ``expect`` lets a handler that sees a death coming (a channel hanging up) have it handled at
once: the failure's record is timed from the pidfd's notice (issue 20, docs/benchmarks.md).

A handler reads what instances wrote (their pipes, consoles, records), which is untrusted input:
one that raises must not end the host, whose loop serves every other instance. So an exception
out of a handler is reported (``on_failure``: the ``handler_failed`` event) and, if the
descriptor is an instance's, it is no longer watched; the loop goes on. The host's own (its
doorbells, the userlands' bell: ``inst`` None) stay watched: every instance needs them, and
their handlers take the readiness (clear the doorbell) before they do anything that can fail.
Only KeyboardInterrupt and SystemExit (not Exceptions) pass through: no handler raises an
MKError for a waiting verb to see (the verbs raise their own after their wait), so none is
lost.
"""

from __future__ import annotations

import math
import select
import selectors
import socket
from collections.abc import Callable
from typing import Any, NamedTuple

from partition.host.instance import EXIT, Instance

#: told of a handler that raised: its watch (dropped already) and the exception
OnFailure = Callable[["Watch", Exception], None]

FileLike = int | socket.socket
#: the kinds handled first when several descriptors are ready at once: a death before the
#: hang-up of its channel (which its process closes moments before its pidfd says it exited),
#: its messages and its peers'; their handlers are told of it by the state it leaves
FIRST = frozenset({EXIT})


class Watch(NamedTuple):
    """One watched descriptor: its kind, its instance (None: the host's own), its handler."""

    kind: str
    inst: Instance | None
    on_ready: Callable[[Instance | None], None]

    def fire(self) -> None:
        self.on_ready(self.inst)


class Reactor:
    """The selector and the handlers of one machine's descriptors."""

    def __init__(self, on_failure: OnFailure | None = None) -> None:
        self.selector = selectors.EpollSelector()
        #: told of each handler that raised (the machine's: an event); None: nobody is told
        self.on_failure = on_failure
        #: how many handlers raised (their watches dropped)
        self.failures = 0

    def watch(self, fd: FileLike, kind: str, inst: Instance | None,
              on_ready: Callable[[Any], None]) -> None:
        self.selector.register(fd, selectors.EVENT_READ, Watch(kind, inst, on_ready))

    def rewatch(self, fd: FileLike, kind: str, inst: Instance | None,
                on_ready: Callable[[Any], None]) -> None:
        """A descriptor watched already changes hands (a parked pidfd becomes a run's)."""
        self.selector.modify(fd, selectors.EVENT_READ, Watch(kind, inst, on_ready))

    def unwatch(self, fd: FileLike) -> None:
        """Stop watching ``fd``; one not watched (or closed already) is no error."""
        try:
            self.selector.unregister(fd)
        except (KeyError, ValueError):
            pass

    def dispatch(self, timeout: float | None) -> int:
        """Wait up to ``timeout`` for readable descriptors; call each one's handler."""
        ready = self.selector.select(timeout)
        if len(ready) > 1:       # deaths first (FIRST); the rest in the kernel's order
            ready.sort(key=lambda event: event[0].data.kind not in FIRST)
        for key, _ in ready:
            self._fire(key)
        return len(ready)

    def _fire(self, key: selectors.SelectorKey) -> None:
        """Call one descriptor's handler, if it is still watched as it was when the turn's
        wait returned; one that raises is reported (and loses its watch, an instance's), the
        loop and every other descriptor's handler go on."""
        watch: Watch = key.data
        try:                             # a handler earlier in this turn may have unwatched it
            if self.selector.get_key(key.fileobj).data is not watch:
                return                   # (and its number may be another descriptor's now)
        except (KeyError, ValueError, RuntimeError):     # (RuntimeError: closed meanwhile)
            return
        try:
            watch.fire()
        except Exception as exc:         # (KeyboardInterrupt, SystemExit: through)
            self.failures += 1
            try:                         # an instance's watch, still this one: dropped
                if watch.inst is not None and self.selector.get_key(key.fileobj).data is watch:
                    self.selector.unregister(key.fileobj)
            except (KeyError, ValueError, RuntimeError):
                pass                     # (closed or unwatched by the handler already)
            if self.on_failure is not None:
                self.on_failure(watch, exc)

    def expect(self, fd: FileLike, timeout: float) -> bool:
        """``fd``, a watched descriptor, is about to be readable: wait up to ``timeout`` for it
        alone and call its handler now rather than a turn later. Whether it was called. (An
        instance's pidfd once its channel hung up: its process closes its descriptors while
        it exits, a few microseconds before the pidfd says so.)"""
        try:
            key = self.selector.get_key(fd)
        except (KeyError, ValueError):          # not watched (any more): nothing to expect
            return False
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        if not poller.poll(math.ceil(timeout * 1e3)):
            return False
        self._fire(key)
        return True

    def fileno(self) -> int:
        return self.selector.fileno()

    def close(self) -> None:
        self.selector.close()
