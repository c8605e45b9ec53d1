"""The echo kernel: answers pings, counts streams; with ``role=ping`` or ``role=stream`` it is
the other end of the latency benchmark.

Roles (cmdline ``role=``):
- ``echo`` (default): a request of type MK_MSG_USER is answered with its own payload; one-way
  messages of type ``STREAM`` are counted; a ``COUNT`` request returns the count.
- ``ping target=N count=K size=B``: K round trips to instance N, each timed; results go to the
  partition (see ``RESULTS``), then the kernel idles.
- ``stream target=N count=K size=B batch=M``: K one-way messages as fast as the ring accepts
  them, M to a ``send_many`` call (default 32; 1: a ``send`` each); a full ring is back
  pressure (drain, then retry); then a COUNT request; the elapsed time and the count go to the
  partition.

Partition layout of a result: u32 magic 'ECHO', u32 done, u64 n, f64 elapsed_s, then n f64
round-trip times in microseconds.
"""

import errno
import struct
import time

from partition.abi.message import MK_MSG_USER, Message
from partition.abi.ring import RingError
from partition.guest.kernel import Kernel

STREAM = MK_MSG_USER + 1
COUNT = MK_MSG_USER + 2
RESULTS = struct.Struct("<IIQd")
MAGIC = 0x4F484345


class EchoKernel(Kernel):
    heartbeat_interval = None          # keep the measured path free of host traffic

    def boot(self) -> None:
        p = self.os.params
        self.role = p.get("role", "echo")
        self.received = 0
        self.os.register_handler(MK_MSG_USER, lambda msg: msg.payload)
        self.os.register_handler(STREAM, self._on_stream)
        self.os.register_handler(COUNT, lambda msg: self.received)
        self.done = self.role == "echo"
        if not self.done:
            self.target = int(p["target"])
            self.count = int(p.get("count", "10000"))
            self.payload = b"x" * int(p.get("size", "64"))
            self.batch = max(1, int(p.get("batch", "32")))
        self.os.printk(f"echo kernel: role {self.role}, mode {self.mode}, CPUs {self.os.cpus}")

    def _on_stream(self, msg: Message) -> None:
        self.received += 1

    def tick(self) -> bool:
        if self.done:
            return False
        self.done = True
        if self.role == "ping":
            self._ping()
        elif self.role == "stream":
            self._stream()
        return True

    def _ping(self) -> None:
        out = self.os.memory
        perf = time.perf_counter_ns
        off = RESULTS.size
        request = self.os.request       # bound once: the messenger's own, no frame before it
        target, payload = self.target, self.payload
        t_all = time.perf_counter()
        for i in range(self.count):
            t0 = perf()
            request(target, MK_MSG_USER, payload, 10.0)
            struct.pack_into("<d", out, off + 8 * i, (perf() - t0) / 1000.0)
        RESULTS.pack_into(out, 0, MAGIC, 1, self.count, time.perf_counter() - t_all)

    def _stream(self) -> None:
        """``batch`` messages to a ``send_many`` call (cmdline ``batch=``, default 32; 1: one
        ``send`` each); a full ring is back pressure: drain, then send the rest."""
        sent = 0
        full = 0
        t0 = time.perf_counter()
        batch = [self.payload] * self.batch
        while sent < self.count:
            if self.batch == 1:
                try:
                    self.os.send(self.target, STREAM, self.payload)
                    sent += 1
                    continue
                except RingError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
            else:
                left = self.count - sent
                n = self.os.send_many(self.target, STREAM, batch if left >= self.batch
                                      else batch[:left])
                sent += n
                if n == min(left, self.batch):
                    continue
            full += 1
            self.os.poll_ipis()
        got = self.os.request(self.target, COUNT, None, timeout=30.0)
        elapsed = time.perf_counter() - t0
        RESULTS.pack_into(self.os.memory, 0, MAGIC, 1, int(got), elapsed)
        struct.pack_into("<d", self.os.memory, RESULTS.size, float(full))
        self.os.printk(f"stream: {sent} sent, {got} received, {full} ENOSPC, {elapsed:.3f} s")


def read_results(raw: bytes) -> tuple[bool, int, float]:
    magic, done, n, elapsed = RESULTS.unpack_from(raw, 0)
    return magic == MAGIC and done == 1, n, elapsed
