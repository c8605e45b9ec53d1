"""The doorbell channel: how an instance gets a peer's doorbell from the host, and only there.

A doorbell is two descriptors: the ring end of the peer's doorbell (the write end of a pipe,
written to wake it from its HLT, which cannot be read: partition/linux.py ``doorbell``) and a
pidfd of the peer's process (signalled with the IPI signal when it is busy). An instance never makes
either from what another instance wrote: it asks the host over its own end of a SOCK_SEQPACKET
socketpair made at boot, naming a target id, and the host answers from its own records with the
descriptors attached (SCM_RIGHTS), or with an error. A pidfd names one process for good, so a
pid that was reused meanwhile can never be signalled by mistake.

Request: ``<I`` target id. Reply: ``<IIIIQ`` status (0 or an errno), target, pid, 0,
generation, plus two descriptors when status is 0.
"""

from __future__ import annotations

import errno
import os
import socket
import struct

REQUEST = struct.Struct("<I")
REPLY = struct.Struct("<IIIIQ")


def ask(sock: socket.socket, target: int, timeout: float) -> tuple[int, int, int, list[int]]:
    """(status, pid, generation, [ring end, pidfd]) for ``target``; status ETIMEDOUT when the host
    did not answer in time. Replies to earlier, timed-out requests are skipped."""
    sock.settimeout(timeout)
    try:
        sock.send(REQUEST.pack(target))
        while True:
            data, fds, _, _ = socket.recv_fds(sock, REPLY.size, 2)
            if len(data) != REPLY.size:
                _close(fds)
                return errno.EPROTO, 0, 0, []
            status, tgt, pid, _, gen = REPLY.unpack(data)
            if tgt != target:                # a late answer to an earlier question
                _close(fds)
                continue
            if status == 0 and len(fds) != 2:
                _close(fds)
                return errno.EPROTO, 0, 0, []
            return status, pid, gen, fds
    except TimeoutError:
        return errno.ETIMEDOUT, 0, 0, []
    except OSError as exc:
        return exc.errno or errno.EIO, 0, 0, []


def answer(sock: socket.socket, target: int, status: int, pid: int = 0, generation: int = 0,
           fds: tuple[int, int] | None = None) -> None:
    """The host's side: one reply, never blocking (a full socket drops it: the instance times
    out and asks again)."""
    payload = REPLY.pack(status, target & 0xFFFFFFFF, pid, 0, generation)
    try:
        if fds is None:
            sock.send(payload, socket.MSG_DONTWAIT)
        else:
            socket.send_fds(sock, [payload], list(fds), socket.MSG_DONTWAIT)
    except (BlockingIOError, OSError):
        pass


def _close(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)
