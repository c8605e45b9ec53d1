"""A service with state that survives a live update (KHO), for tests and ``mkctl bench update``.

``Counter`` answers PING requests with ``[version, handled]``: ``handled`` counts every request
this service ever answered, across live updates, kept in the first page of the partition and
handed over with ``kho_preserve`` when it halts for one. ``CounterV2`` is the same service, a
new version. ``Broken`` panics in ``boot()`` (a bad update, rolled back). The client is
``pingpong.Client``.
"""

import struct

from partition import MK_MSG_USER, Kernel

PING = MK_MSG_USER + 0x21
STATE = struct.Struct("<QQ")          # magic, handled
MAGIC = 0x4B484F5354415445


class Counter(Kernel):
    heartbeat_interval = None
    version = 1

    def boot(self) -> None:
        kept = self.kho_restore("state")
        if kept is not None:
            magic, self.handled = STATE.unpack_from(kept, 0)
            assert magic == MAGIC
            self.printk(f"counter v{self.version}: resumed at {self.handled}")
        else:
            self.handled = 0
        self.register_handler(PING, self._ping)

    def _ping(self, msg):
        self.handled += 1
        return msg.payload

    def shutdown(self) -> None:
        STATE.pack_into(self.memory, 0, MAGIC, self.handled)
        if self.handing_over:
            self.kho_preserve("state", 0, 4096)
        self.printk(f"counter v{self.version}: halting at {self.handled}, "
                    f"handing over: {self.handing_over}")

    def tick(self) -> bool:
        return False


class CounterV2(Counter):
    version = 2


class Broken(Counter):
    version = 3

    def boot(self) -> None:
        self.panic("broken: this update does not boot")


class SlowBoot(Counter):
    """A new version whose ``boot()`` outlasts the host's deadline: it says its pid, then
    sleeps. A live update to it times out and is rolled back; the host must kill it first."""
    version = 4

    def boot(self) -> None:
        import os
        import time
        self.printk(f"slowboot: pid {os.getpid()}")
        time.sleep(float(self.params.get("seconds", "60")))
        super().boot()
