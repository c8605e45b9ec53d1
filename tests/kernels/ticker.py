"""A kernel that measures its own loop: ``Ticker`` ticks every 5 ms and publishes the longest
gap between two of its ticks (``max_gap_ms``) and how many it made (``ticks``). What runs in its
loop besides (a probe's agent) shows up as gaps."""

import time

from partition import Kernel


class Ticker(Kernel):
    heartbeat_interval = None
    idle_timeout = 0.005

    def boot(self) -> None:
        self.last = time.monotonic()
        self.ticks = 0
        self.max_gap = 0.0

    def tick(self) -> bool:
        now = time.monotonic()
        if now - self.last < 0.005:
            return False
        self.max_gap = max(self.max_gap, now - self.last)
        self.last = now
        self.ticks += 1
        self.metric("ticks", self.ticks)
        self.metric("max_gap_ms", round(self.max_gap * 1e3))
        return False
