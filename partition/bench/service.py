"""The kernels of ``mkctl bench update`` (also samples: ``kernels.service``).

``Service`` answers PING requests with the request's number and counts every request it ever
answered in the first page of its partition, which it hands over to its successor with KHO when
it halts for a live update (``ServiceV2`` is the same service, a new version). ``Pinger`` asks
its ``peer=ID`` every ``interval=`` seconds and records, in its partition, the CLOCK_MONOTONIC
time of every answer: the host reads them to find the longest time without an answer around
each update. Result layout of the pinger's partition (little-endian u64): 0 asked, 8 answered,
16 lost (no answer within 1 s, or refused), 24 wrong (an answer to another question), 32 the
number of times recorded, then the times in ns from offset 64 (at most ``MAX_TIMES``).
"""

from __future__ import annotations

import struct
import time

from partition.abi.message import MK_MSG_USER, Message
from partition.abi.ring import RingError
from partition.guest.kernel import Kernel

PING = MK_MSG_USER + 0x22
STATE = struct.Struct("<QQ")              # magic, answered (the service's page 0)
MAGIC = 0x53455256494345
COUNTS = struct.Struct("<QQQQQ")          # asked, answered, lost, wrong, times recorded
TIMES_AT = 64
MAX_TIMES = 200_000


class Service(Kernel):
    heartbeat_interval = None
    version = 1

    def boot(self) -> None:
        kept = self.os.kho_restore("state")
        self.answered = 0
        if kept is not None:
            magic, answered = STATE.unpack_from(kept, 0)
            if magic == MAGIC:
                self.answered = answered
        self.os.register_handler(PING, self._ping)

    def _ping(self, msg: Message) -> object:
        self.answered += 1
        return msg.payload

    def shutdown(self) -> None:
        STATE.pack_into(self.os.memory, 0, MAGIC, self.answered)
        if self.os.handing_over:
            self.os.kho_preserve("state", 0, 4096)

    def tick(self) -> bool:
        return False


class ServiceV2(Service):
    version = 2


class Pinger(Kernel):
    heartbeat_interval = None

    def boot(self) -> None:
        self.peer = int(self.os.params["peer"])
        self.interval = float(self.os.params.get("interval", "0.001"))
        self.idle_timeout = self.interval
        self.asked = self.answered = self.lost = self.wrong = self.times = 0
        self.due = time.monotonic()

    def tick(self) -> bool:
        now = time.monotonic()
        if now < self.due or self.os.halting:
            return False
        self.due = now + self.interval
        self.asked += 1
        try:
            got = self.os.request(self.peer, PING, self.asked, timeout=1.0)
        except RingError:
            self.lost += 1
        else:
            if got == self.asked:
                self.answered += 1
                if self.times < MAX_TIMES:
                    struct.pack_into("<Q", self.os.memory, TIMES_AT + 8 * self.times,
                                     time.monotonic_ns())
                    self.times += 1
            else:
                self.wrong += 1
        COUNTS.pack_into(self.os.memory, 0, self.asked, self.answered, self.lost, self.wrong,
                         self.times)
        return True
