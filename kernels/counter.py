"""The counter kernel: visible work that lives in its partition and survives a reboot.

Layout at the start of the partition (little-endian):
    0   8  magic  b"MKCOUNT\\0"
    8   8  count  incremented once per tick
    16  8  boots  incremented at every boot

Because a halt does not scrub the partition (only delete does), the count resumes where the
previous run stopped: the emulated memory behaves like the real machine's RAM across a kexec.
Cmdline: ``interval=SECONDS`` between increments (default 0.01), ``report=N`` printk every N
counts (default 100), ``panic_at=N`` panic when the count reaches N (a fault to experiment with).
"""

import struct
import time

from partition import Kernel

MAGIC = b"MKCOUNT\x00"
HEADER = struct.Struct("<8sQQ")


class CounterKernel(Kernel):
    def boot(self) -> None:
        p = self.os.params
        self.interval = float(p.get("interval", "0.01"))
        self.report = max(1, int(p.get("report", "100")))
        self.panic_at = int(p["panic_at"]) if "panic_at" in p else None
        magic, count, boots = HEADER.unpack_from(self.os.memory, 0)
        if magic != MAGIC:
            count, boots = 0, 0
        boots += 1
        HEADER.pack_into(self.os.memory, 0, MAGIC, count, boots)
        self.idle_timeout = self.interval
        self.next_at = time.monotonic()
        self.os.printk(f"counter kernel: boot {boots}, resuming at count {count}")

    def tick(self) -> bool:
        now = time.monotonic()
        if now < self.next_at:
            return False          # idle until the next increment is due
        self.next_at = now + self.interval
        magic, count, boots = HEADER.unpack_from(self.os.memory, 0)
        count += 1
        HEADER.pack_into(self.os.memory, 0, MAGIC, count, boots)
        if count % self.report == 0:
            self.os.printk(f"count={count}")
        if self.panic_at is not None and count >= self.panic_at:
            self.os.panic(f"count reached panic_at={self.panic_at}")
        return False

    def shutdown(self) -> None:
        _, count, _ = HEADER.unpack_from(self.os.memory, 0)
        self.os.printk(f"counter kernel: halting at count {count}")


def read_count(raw: bytes) -> int:
    """Host-side reader for tests and tools: the count from the first 24 bytes of a partition."""
    magic, count, _ = HEADER.unpack_from(raw, 0)
    return count if magic == MAGIC else -1
