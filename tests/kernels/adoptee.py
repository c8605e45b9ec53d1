"""A kernel that attacks its next host: it waits for its host to die (its doorbell channel, whose
other end only the host held, reads end-of-file), then does ``attack=`` to the descriptors a new
host takes from it at adoption (host/adoption.py), or to itself. It writes ``MKADOPT:<what>`` at
the start of its partition when it is ready (``armed``) and when it has done it (``done``), so
that a test can read from the arena, with no host to ask, that it may run ``mkctl adopt`` now.
Loaded by path in tests/test_survival_hostile.py.

Attacks (each on its own fd numbers: ``ctx.doorbell_fd`` and ``ctx.host_doorbell_fd``, which are
the numbers the dead host wrote to machine.json as ``child_fds``):

* ``pipe-doorbell``: a pipe's read end where its doorbell was;
* ``memfd-hostbell``: a memfd where the host doorbell was (its doorbell stays);
* ``eventfd-hostbell``: an eventfd of its own where the host doorbell was;
* ``leak``: an eventfd of its own, counter 0x5eed, where its doorbell was, and a pipe where the
  host doorbell was; then it sleeps in ``tick`` so that nothing reads that counter;
* ``exit-at-adoption``: it watches the host's entry of the peer table, which a new host writes
  just before it adopts, and exits at once when the pid there changes;
* ``fork``: it tries to fork (its seccomp filter kills it for that);
* ``scribble``: garbage in its own page (reason, progress, mailbox answer) and in the header of
  the host's ring, where the new host will look first.
"""

import os
import socket
import time

from partition import Kernel

MARK = b"MKADOPT:"
LEAK_COUNT = 0x5EED


class Adoptee(Kernel):
    heartbeat_interval = None
    idle_timeout = 0.02

    def mark(self, what: str) -> None:
        data = MARK + what.encode() + b"\0"
        self.memory[0:len(data)] = data
        self.printk(f"adoptee: {what}")

    def host_pid(self) -> int:
        return int.from_bytes(self.ctx.peers[28:32], "little")      # the host's peer entry

    def host_dead(self) -> bool:
        try:
            return self.ctx.channel.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        except BlockingIOError:
            return False
        except OSError:
            return True

    def boot(self) -> None:
        self.attack = self.params.get("attack", "")
        self.old_host = self.host_pid()
        self.keep: list[int] = []          # the other ends, kept open
        self.done = False
        self.mark("booted")

    def tick(self) -> bool:
        if self.done or not self.attack or not self.host_dead():
            return False
        self.done = True
        getattr(self, "attack_" + self.attack.replace("-", "_"))()
        return False

    # -- the attacks -----------------------------------------------------------------------
    def attack_pipe_doorbell(self) -> None:
        r, w = os.pipe()
        os.dup2(r, self.ctx.doorbell_fd, inheritable=False)
        self.keep += [r, w]
        self.mark("done")

    def attack_memfd_hostbell(self) -> None:
        fd = os.memfd_create("not-a-doorbell")
        os.dup2(fd, self.ctx.host_doorbell_fd, inheritable=False)
        self.keep.append(fd)
        self.mark("done")

    def attack_eventfd_hostbell(self) -> None:
        fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        os.dup2(fd, self.ctx.host_doorbell_fd, inheritable=False)
        self.keep.append(fd)
        self.mark("done")

    def attack_leak(self) -> None:
        ev = os.eventfd(LEAK_COUNT, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        r, w = os.pipe()
        os.dup2(ev, self.ctx.doorbell_fd, inheritable=False)
        os.dup2(w, self.ctx.host_doorbell_fd, inheritable=False)
        self.keep += [ev, r, w]
        self.mark("done")
        while True:                       # nothing of this process reads that counter again
            time.sleep(1)

    def attack_exit_at_adoption(self) -> None:
        self.mark("armed")
        old = self.old_host
        peers = self.ctx.peers
        while int.from_bytes(peers[28:32], "little") == old:
            pass
        os._exit(0)

    def attack_fork(self) -> None:
        self.mark("armed")
        if os.fork() == 0:
            os._exit(0)
        self.mark("forked")

    def attack_scribble(self) -> None:
        own = self.ctx.own
        own.reason_len = 0xFFFFFFFF
        own.buf[own.base + 128:own.base + 256] = b"\xff" * 128
        own.progress = 2 ** 64 - 1
        own.ack_generation = 0xFFFFFFFF
        ring = self.endpoint.ring_of(0)
        tail = int.from_bytes(ring.buf[64:72], "little")
        ring.buf[0:8] = (tail + 100000).to_bytes(8, "little")      # head far past the ring
        try:
            os.eventfd_write(self.ctx.host_doorbell_fd, 1)
        except OSError:
            pass
        self.mark("done")
