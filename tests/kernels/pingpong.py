"""A request/response pair for the host-survival tests: ``Server`` answers, ``Client`` asks its
``peer=ID`` every ``interval=`` seconds and keeps count: asked, answered, lost (no answer within
1 s), wrong (an answer to another question: a duplicate). It prints the counts every 50
requests and at halt: ``pingpong: asked A answered B lost C wrong D``."""

import time

from partition import MK_MSG_USER, Kernel, RingError

PING = MK_MSG_USER + 0x21


class Server(Kernel):
    heartbeat_interval = None

    def boot(self) -> None:
        self.register_handler(PING, lambda msg: msg.payload)

    def tick(self) -> bool:
        return self.idle(0.1)


class Client(Kernel):
    heartbeat_interval = None

    def boot(self) -> None:
        self.peer = int(self.params["peer"])
        self.interval = float(self.params.get("interval", "0.005"))
        self.idle_timeout = self.interval        # the loop's idle: one interval at most
        self.asked = self.answered = self.lost = self.wrong = 0
        self.due = time.monotonic()

    def _say(self) -> None:
        self.printk(f"pingpong: asked {self.asked} answered {self.answered} lost {self.lost} "
                    f"wrong {self.wrong}")

    def tick(self) -> bool:
        now = time.monotonic()
        if now < self.due:
            return False                         # the loop idles (idle_timeout) or is rung
        self.due = now + self.interval
        self.asked += 1
        try:
            got = self.request(self.peer, PING, self.asked, timeout=1.0)
        except RingError:
            self.lost += 1
        else:
            if got == self.asked:
                self.answered += 1
            else:
                self.wrong += 1
        if self.asked % 50 == 0:
            self._say()
        return True

    def shutdown(self) -> None:
        self._say()
