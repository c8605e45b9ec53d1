"""Kernels for the IPI tests: senders, a collector, a dead-in-the-middle sender."""

import errno
import struct
import time

from partition import Kernel
from partition import MK_MSG_USER
from partition import RingError
from ringtool import claim, fill

SEQ = MK_MSG_USER + 0x10
COLLECTED = MK_MSG_USER + 0x11


class Collector(Kernel):
    """Appends (sender, seq) of every SEQ message to its partition: u32 n, then pairs."""
    heartbeat_interval = None

    def boot(self):
        self.n = 0
        self.register_handler(SEQ, self._seq)
        self.register_handler(COLLECTED, lambda msg: self.n)

    def _seq(self, msg):
        struct.pack_into("<II", self.memory, 8 + 8 * self.n, msg.sender, msg.payload)
        self.n += 1
        struct.pack_into("<I", self.memory, 0, self.n)


class Sequencer(Kernel):
    """Sends count=N numbered messages to target=T, retrying on ENOSPC."""
    heartbeat_interval = None

    def boot(self):
        self.target = int(self.params["target"])
        self.count = int(self.params["count"])
        self.sent = 0

    def tick(self):
        while self.sent < self.count:
            try:
                self.send(self.target, SEQ, self.sent)
                self.sent += 1
            except RingError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                time.sleep(0.0005)
                return True
        if self.sent == self.count:
            self.printk(f"sent {self.count}")
            self.sent += 1
        return False


class Deaf(Kernel):
    """Never drains its ring: the host can fill it. Declared a polling receiver, so nobody
    interrupts it either (a polling receiver gets no doorbell)."""
    heartbeat_interval = None
    mode = "poll"

    def run(self):
        while not self.halting:
            time.sleep(0.01)


class DiesMidSend(Kernel):
    """Claims a slot in target=T's ring, writes half a message, then stalls (test kills it)."""
    heartbeat_interval = None

    def boot(self):
        ring = self.endpoint.ring_of(int(self.params["target"]))
        ticket = claim(ring)
        fill(ring, ticket, self.id, self.endpoint.cpu, SEQ, b"\x00" * 8)   # never published
        self.printk(f"claimed slot {ticket}, stalling before publish")

    def run(self):
        while True:
            time.sleep(1)
