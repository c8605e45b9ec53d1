"""A Port: a send bound to one peer's ring (and, with a peer entry, to one incarnation of the
peer) that encodes the message, publishes it and rings the doorbell itself. This module is the
reference of _port.c's ``Port``, answer for answer, and the bound sender the pure-Python ring
hands out (``Ring.sender``); the C one is what an endpoint binds when the extension is there.

Answers, as the C Port's: 0 (sent, doorbell rung if one was due), an errno (> 0: ENOSPC,
EMSGSIZE; nothing sent), a doorbell it could not ring (-1 wake, -2 signal: sent, the doorbell is
the caller's to ring), or REROUTE (-3: the peer entry names another incarnation; nothing sent).
A doorbell is (wake_fd, signal_pidfd, signo): ``wake_fd`` is written for a halted receiver,
``signo`` sent through the pidfd for a busy one; pidfd 0 means "always ``wake_fd``" (the host's
way), below 0 "no signal possible"."""

from __future__ import annotations

import signal
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from partition import linux
from partition.abi.message import encode
from partition.abi.ring_layout import DOORBELL_WAKE, REROUTE, RingError

if TYPE_CHECKING:
    from partition.abi.ring import Ring

#: (wake_fd, signal_pidfd, signo): no doorbell to ring (the answer says which was due)
NO_DOORBELL = (-1, -1, 0)


class RingClosed(ValueError):
    """A send through a Port that was closed (as the C Port's ValueError)."""


class Port:
    """``Port(ring, sender_id, sender_cpu, counter, doorbell, entry)``: ``counter`` = (buffer,
    offset of a u64) counts every send just before it is published, or None; ``entry`` = (peer
    table, offset of the target's (state, pid), state, pid): each send checks it first, or None:
    no check."""

    def __init__(self, ring: Ring, sender_id: int, sender_cpu: int,
                 counter: tuple[memoryview, int] | None, doorbell: tuple[int, int, int],
                 entry: tuple[Any, int, int, int] | None) -> None:
        self._ring: Ring | None = ring
        self._sender = sender_id
        self._cpu = sender_cpu
        self._counter = counter
        self._doorbell = doorbell
        self._entry = entry
        if entry is not None:
            peers, at, _, _ = entry
            if at < 0 or at % 4 or at + 8 > len(peers):
                raise ValueError("peer entry outside the table")

    @property
    def current(self) -> bool:
        """Does the peer entry still name the incarnation this Port was made for?"""
        if self._ring is None:
            return False
        if self._entry is None:
            return True
        peers, at, state, pid = self._entry
        return bytes(peers[at:at + 8]) == (state.to_bytes(4, "little") +
                                           pid.to_bytes(4, "little"))

    def __call__(self, msg_type: int, data: bytes) -> int:
        ring = self._open()
        if not self.current:
            return REROUTE
        try:
            door = ring.send(self._sender, self._cpu, msg_type & 0xFFFFFFFF, data, self._counter)
        except RingError as exc:
            return exc.errno
        return self._ring_doorbell(door) if door else 0

    def message(self, msg_type: int, subtype: int, msg_id: int, payload: Any) -> int:
        """The mk_message (message.encode) sent as ``self(msg_type, bytes)`` would."""
        self._open()
        if not 0 <= msg_type <= 0xFFFFFFFF or not 0 <= subtype <= 0xFFFFFFFF:
            raise OverflowError("message type and subtype are u32")
        return self(msg_type, encode(msg_type, subtype, msg_id, payload))

    def messages(self, msg_type: int, subtype: int, first_id: int,
                 payloads: Sequence[Any]) -> tuple[int, int]:
        """``message`` for each payload in turn (ids first_id, first_id + 1, ...) until an answer
        other than 0: (how many went, that answer). A doorbell it could not ring counts the
        message that needed it as sent."""
        sent, rc = 0, 0
        for payload in tuple(payloads):
            rc = self.message(msg_type, subtype, first_id + sent, payload)
            if rc:
                if rc < 0 and rc != REROUTE:
                    sent += 1
                break
            sent += 1
        return sent, rc

    def close(self) -> None:
        self._ring = None

    def _open(self) -> Ring:
        if self._ring is None:
            raise RingClosed("the port is closed")
        return self._ring

    def _ring_doorbell(self, door: int) -> int:
        """0 when the doorbell ``door`` (DOORBELL_WAKE or _SIGNAL) was rung here, else -door."""
        wake_fd, pidfd, signo = self._doorbell
        try:
            if door == DOORBELL_WAKE or pidfd == 0:
                if wake_fd < 0 or not linux.ring_doorbell(wake_fd):
                    return -door
            elif pidfd > 0:         # a pidfd from the host: one process, for good
                try:
                    signal.pidfd_send_signal(pidfd, signo)
                except ProcessLookupError:
                    pass
            else:
                return -door
        except OSError:
            return -door
        return 0

