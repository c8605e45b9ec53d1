"""Kernels that find each other by name and publish metrics of their own.

``Asker`` asks the instance called ``peer=NAME`` (found with ``peer_id``, whatever its id) every
10 ms and publishes ``answered`` and ``errors`` with ``metric``; the echo kernel answers."""

import time

from partition import MK_MSG_USER, Kernel, RingError


class Asker(Kernel):
    heartbeat_interval = None
    idle_timeout = 0.01

    def boot(self) -> None:
        self.peer = self.peer_id(self.params["peer"])
        self.answered = self.errors = 0
        self.due = time.monotonic()
        self.printk(f"asker: {self.params['peer']} is instance {self.peer}")

    def tick(self) -> bool:
        now = time.monotonic()
        if now < self.due or self.peer is None:
            return False
        self.due = now + 0.01
        try:
            if self.request(self.peer, MK_MSG_USER, "ping", timeout=1.0) == "ping":
                self.answered += 1
            else:
                self.errors += 1
        except RingError:
            if self.answered:            # before the first answer the peer may not be up yet
                self.errors += 1
        self.metric("answered", self.answered)
        self.metric("errors", self.errors)
        return True
