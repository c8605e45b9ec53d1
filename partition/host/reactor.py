"""The host's event loop: one epoll selector, each descriptor registered with its handler.

Every descriptor the host watches (an instance's pidfd, its doorbell channel, its loader's
report pipe, a parked process's pidfd, a live update's old doorbell, the host's own doorbells)
carries a ``Watch``: what it is (``kind``, for a reader), the instance it belongs to, and the
handler the loop calls when it is readable. The loop itself knows none of them.
"""

from __future__ import annotations

import selectors
import socket
from collections.abc import Callable
from typing import Any, NamedTuple

from partition.host.instance import Instance

FileLike = int | socket.socket


class Watch(NamedTuple):
    """One watched descriptor: its kind, its instance (None: the host's own), its handler."""

    kind: str
    inst: Instance | None
    on_ready: Callable[[Instance | None], None]

    def fire(self) -> None:
        self.on_ready(self.inst)


class Reactor:
    """The selector and the handlers of one machine's descriptors."""

    def __init__(self) -> None:
        self.selector = selectors.EpollSelector()

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
        handled = 0
        for key, _ in self.selector.select(timeout):
            key.data.fire()
            handled += 1
        return handled

    def fileno(self) -> int:
        return self.selector.fileno()

    def close(self) -> None:
        self.selector.close()
