"""Per-instance console (kmsg) buffer: a byte ring in the arena, written by one instance.

The host reads it at any time, also after the instance died, which is the point: the last lines
of a crashed kernel are where the reason is. The reader treats the header as untrusted input,
because a faulty kernel can scribble over its own console: a bad magic or a head beyond reason
yields what can be salvaged, never an exception in the host.
"""

from __future__ import annotations

import time

from partition.abi import layout as L

#: console input (mktty's input, host/consoleinput.py): the longest line a kernel is handed, in
#: UTF-8 bytes without its newline. 2 KiB, so that the line and its host command fit one ring
#: slot of the default 4 KiB with room to spare
INPUT_LINE_MAX = 2048
#: the largest head a writer accepts from a header it reads: 2**62 bytes is beyond any
#: console's life, and far enough below 2**64 that no append makes it overflow the header's
#: 64 bits (a kernel that wrote 2**64-1 there once crashed the host appending to it)
HEAD_MAX = 1 << 62


def format_console(buf: memoryview | bytearray) -> None:
    """Host side: (re)initialise a console buffer to empty."""
    cap = len(buf) - L.CONSOLE_DATA
    buf[: L.CONSOLE_DATA] = bytes(L.CONSOLE_DATA)
    L.CONSOLE_HEADER.pack_into(buf, 0, L.CONSOLE_MAGIC, cap, 0)


def heal_console(buf: memoryview | bytearray) -> str:
    """A writer's first look at a header someone else may have scribbled on: a bad magic or
    capacity formats the buffer afresh; a head beyond HEAD_MAX is brought back into range,
    keeping the retained text in order (the same offset in the ring, one lap in). Why it was
    healed, or "" when it was sound."""
    cap = len(buf) - L.CONSOLE_DATA
    magic, got_cap, head = L.CONSOLE_HEADER.unpack_from(buf, 0)
    if magic != L.CONSOLE_MAGIC or got_cap != cap:
        format_console(buf)
        return "magic or capacity overwritten" if magic or got_cap or head else ""
    if head > HEAD_MAX:
        L.CONSOLE_HEADER.pack_into(buf, 0, L.CONSOLE_MAGIC, cap, cap + head % cap if cap else 0)
        return f"head {head} beyond reason"
    return ""


class ConsoleWriter:
    """Instance side: ``printk`` appends timestamped lines; the head is published last."""

    def __init__(self, buf: memoryview, boot_ns: int | None = None) -> None:
        self.buf = buf
        self.cap = len(buf) - L.CONSOLE_DATA
        self.boot_ns = time.monotonic_ns() if boot_ns is None else boot_ns
        #: why the header read at the start was healed (rewritten), "" if it was sound
        self.healed = heal_console(buf)
        self.head = L.CONSOLE_HEADER.unpack_from(buf, 0)[2]
        self.data = buf[L.CONSOLE_DATA:]

    def write(self, text: str) -> int:
        raw = text.encode("utf-8", "replace")
        if len(raw) > self.cap:
            raw = raw[-self.cap:]
        # the head as published, not as we last left it: a predecessor of this instance (a
        # live update loads this image while the old kernel still writes) may have moved it
        magic, cap, head = L.CONSOLE_HEADER.unpack_from(self.buf, 0)
        if magic == L.CONSOLE_MAGIC and cap == self.cap and self.head < head <= HEAD_MAX:
            self.head = head
        pos = self.head % self.cap
        first = min(len(raw), self.cap - pos)
        self.data[pos:pos + first] = raw[:first]
        if first < len(raw):
            self.data[0:len(raw) - first] = raw[first:]
        self.head += len(raw)
        L.CONSOLE_HEADER.pack_into(self.buf, 0, L.CONSOLE_MAGIC, self.cap, self.head)
        return len(text)

    def printk(self, message: str) -> None:
        t = (time.monotonic_ns() - self.boot_ns) / 1e9
        lines = str(message).splitlines() or [""]
        self.write("".join(f"[{t:12.6f}] {line}\n" for line in lines))

    def flush(self) -> None:  # file-like, so sys.stdout can point here
        pass


def read_console(buf: memoryview | bytes) -> str:
    """Host side: the retained text, oldest first, validated against the buffer's real size."""
    if len(buf) < L.CONSOLE_DATA:
        return ""
    magic, cap, head = L.CONSOLE_HEADER.unpack_from(buf, 0)
    real_cap = len(buf) - L.CONSOLE_DATA
    if magic != L.CONSOLE_MAGIC or cap != real_cap:
        return "<console header corrupted: magic or capacity overwritten; buffer shown raw>\n" + \
            bytes(buf[L.CONSOLE_DATA:]).rstrip(b"\x00").decode("utf-8", "replace")
    data = bytes(buf[L.CONSOLE_DATA:])
    if head <= cap:
        raw = data[:head]
    else:
        pos = head % cap
        raw = data[pos:] + data[:pos]
        nl = raw.find(b"\n")           # drop the partial first line the ring cut through
        if 0 <= nl < len(raw) - 1:
            raw = raw[nl + 1:]
    return raw.decode("utf-8", "replace")
