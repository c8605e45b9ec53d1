"""An instance's ``PeerDirectory`` (guest/endpoint.py): where a kernel learns about its peers.

Separate from the endpoint because it is the one part that reads the shared peer-state table
the host writes (mapped read-only: what it says is the host's word) and asks the host for
doorbells over the instance's channel; the endpoint itself only sends and receives, and the
host's end reuses it with its own directory (partition.host.hostipc).
"""

from __future__ import annotations

import errno
import os
import socket
import time
from typing import Any

from partition.abi import doorbell
from partition.abi import slot as S
from partition.abi.constants import HOST_ID, IPI_SIGNAL, MAX_INSTANCES, STATE_ACTIVE
from partition.abi.ring import RingError
from partition.guest.endpoint import NO_DOORBELL, Doorbell


class PeerTable:
    """An instance's directory: the host's peer table (mapped read-only: what it says is the
    host's word) for states, pids and redirects, and the host, over the instance's doorbell
    channel, for doorbells. Nothing another instance wrote is used here."""

    #: a doorbell the host did not give (it was not driven in time) is asked again after this
    RETRY_S = 0.1

    def __init__(self, peers: memoryview, own: S.OwnPage, host_doorbell_fd: int,
                 channel: socket.socket | None) -> None:
        self.peers = peers
        self.own = own
        self.host_doorbell_fd = host_doorbell_fd
        self.channel = channel
        self._missing: dict[int, float] = {}       # target -> when the host last failed us

    def route(self, target: int) -> tuple[int, int]:
        if target.__class__ is int and 0 <= target < MAX_INSTANCES:
            state, pid = S.STATE_PID.unpack_from(self.peers, target * S.PEER_BYTES + S.PEER_STATE)
            if state == STATE_ACTIVE:
                return target, pid
            # a dead target whose role a standby took over: address the standby (one hop)
            via = S.U32.unpack_from(self.peers, target * S.PEER_BYTES + S.PEER_REDIRECT)[0]
            if 0 < via <= MAX_INSTANCES:
                state, pid = S.STATE_PID.unpack_from(self.peers,
                                                     (via - 1) * S.PEER_BYTES + S.PEER_STATE)
                if state == STATE_ACTIVE:
                    return via - 1, pid
        S.bump(self.own.buf, self.own.base + S.OWN_IPI_ESRCH)
        raise RingError(errno.ESRCH, f"instance {target} is not active")

    def doorbell(self, target: int, pid: int) -> tuple[Doorbell, list[int]]:
        if target == HOST_ID:
            return (self.host_doorbell_fd, 0, 0), []
        if pid <= 0 or self.channel is None:
            return NO_DOORBELL, []
        status, got_pid, _, fds = doorbell.ask(self.channel, target, 2.0)
        if status or got_pid != pid:     # gone, or rebooted since we read the table
            for fd in fds:
                os.close(fd)
            self._missing[target] = time.monotonic()
            return NO_DOORBELL, []
        self._missing.pop(target, None)
        return (fds[0], fds[1], int(IPI_SIGNAL)), fds

    def entry(self, target: int, pid: int) -> tuple[Any, int, int, int] | None:
        return self.peers, target * S.PEER_BYTES + S.PEER_STATE, STATE_ACTIVE, pid

    def retry(self, target: int) -> bool:
        """Ask the host again for a doorbell it could not give a moment ago."""
        since = self._missing.get(target)
        return since is not None and time.monotonic() - since > self.RETRY_S

    def incarnation(self, target: int) -> Any:
        """One read of the entry, no closure and no record object (those cost 0.4 to 0.75 us
        a request): the (epoch, state, pid) that ``alive`` compares against, every 2 ms."""
        if target == HOST_ID or not 0 <= target < MAX_INSTANCES:
            return None
        return S.EPOCH_STATE_PID.unpack_from(self.peers, target * S.PEER_BYTES)

    def alive(self, target: int, incarnation: Any) -> bool:
        if target == HOST_ID:
            return True
        if incarnation is None:
            return False
        # the same incarnation, or its successor by a live update (same service epoch: the
        # request waits in the ring for the new kernel, or the old one answered it)
        epoch, state, pid = S.EPOCH_STATE_PID.unpack_from(self.peers, target * S.PEER_BYTES)
        return state == STATE_ACTIVE and (pid == incarnation[2] or epoch == incarnation[0])

    def refused(self, code: int) -> None:
        if code == errno.ENOSPC:
            S.bump(self.own.buf, self.own.base + S.OWN_IPI_RING_FULL)
