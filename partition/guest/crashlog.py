"""The crash-consistency experiment's log: a writer that appends checksummed records to a file
through mmap, and a checker that says what a crash left of it.

The real multikernel project's experiment (../shared/reference/devices.md, DAXFS): an app in one
kernel writes a file in DAX memory through mmap, its kernel panics, is restarted, and a checker
finds a clean frontier with at most one torn page and no bad word. Here the file lives in a
machine's shared region (host/shared.py), the writer is a program of the writer's instance
(``python3 -m partition.guest.crashlog write /mnt/shared/log/records``) and the checker one of
another instance (``... check ...``). Standard library only: it runs inside a userland, whose
root is the host's, read-only.

The file (little-endian):

* **page 0, the header**: ``MKCRASH1``, record size, page size, seed, capacity (records), a
  CRC32 of those (they never change), then ``committed`` (records the writer has finished:
  stored after each record's commit word) and ``starts`` (how many times a writer opened it).
* **records**, from page 1 on, ``RECORD`` (256) bytes each, 16 a page, never straddling one.
  Record ``i`` (0-based) carries sequence number ``seq = i + 1`` and is 32 words of 8 bytes:
  word 0 a constant tag, word 1 ``seq``, words 2..30 the payload ``base[k] ^ seq`` (``base``
  drawn from the seed), word 31 the **commit word**: the CRC32 of words 0..30 beside a constant
  mark. Every word of a record is known in advance from ``(seed, seq)``, and none is zero.

The writer stores a record in two steps, words 0..30 then the commit word, into the mapping
(no write(2)); a kill between them leaves a torn record. The file itself is made whole
(sized, header written) under another name and renamed into place, so a kill while making it
never leaves a file without a header. On start it finds the frontier from
``committed`` on and writes from there, over whatever a killed writer half-stored.

What the checker counts, precisely:

* **records**: intact records from the start: record ``i`` is intact when all 32 of its words
  are the expected ones. The **frontier** is the byte offset of the first record that is not
  intact (the first record not intact bounds the log; every record before it is intact by
  this definition, and what follows is judged below).
* **bad words**: words of the record area that hold neither their expected value nor zero: a
  value the writer never stored there. A crash cannot make one (a store lands whole or not at
  all); corruption does. Allowed: 0.
* **torn pages**: pages holding a non-zero word in a record at or past the frontier: data the
  writer began storing but that is not part of the intact log. Allowed: at most one, and it
  must be the page of the frontier (the page the writer was in when it was killed).
* **lost records**: ``committed`` minus ``records`` when positive: records the writer had
  finished (and said so in the header) that are no longer intact. Allowed: 0.

The file is *clean* when all of those hold; ``check`` then exits 0, else 1 (2: not such a file).
Its last line of output is a JSON object of the figures, which a scenario's ``run`` action reads.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import random
import struct
import sys
import time
import zlib
from dataclasses import asdict, dataclass
from typing import TextIO

PAGE = 4096
RECORD = 256
WORDS = RECORD // 8
PER_PAGE = PAGE // RECORD
HEADER = PAGE                               # the records start on page 1
MAGIC = b"MKCRASH1"
TAG = 0x0001_0100_52434B4D                  # "MKCR", version 1, record size 256 >> 8
COMMIT_MARK = 0x21544D43                    # "CMT!", the commit word's upper half
PAYLOAD_WORDS = WORDS - 3
_HEAD = struct.Struct("<8sIIQQ")            # magic, record size, page size, seed, capacity
_HEAD_CRC = struct.Struct("<I")             # at 32: CRC32 of the 32 bytes before
_COUNTS = struct.Struct("<QQ")              # at 40: committed, starts
_COUNTS_AT = 40
_COMMIT = struct.Struct("<Q")
_ZERO_WORD = bytes(8)
_ZERO_RECORD = bytes(RECORD)
#: seq in every payload word at once: seq * _EVERY_WORD puts seq in each 8-byte lane
_EVERY_WORD = sum(1 << (64 * k) for k in range(PAYLOAD_WORDS))


class NotALog(ValueError):
    """The file is not a crash log this module wrote (EINVAL: wrong magic, sizes, header CRC)."""

    errno = 22


@dataclass(frozen=True)
class Header:
    seed: int
    capacity: int
    committed: int
    starts: int


class Records:
    """What every record of a log of ``seed`` must hold: built once, then two big-integer
    operations a record (the payload is ``base ^ seq`` in every word)."""

    def __init__(self, seed: int) -> None:
        base = random.Random(seed).randbytes(PAYLOAD_WORDS * 8)
        # a zero base word would make ``base ^ seq`` zero for one seq: no expected word is 0
        words = [w or 1 for w in struct.unpack(f"<{PAYLOAD_WORDS}Q", base)]
        self._base = sum(w << (64 * k) for k, w in enumerate(words))
        self._tag = struct.pack("<Q", TAG)

    def body(self, seq: int) -> bytes:
        """Words 0..30 of record ``seq``."""
        payload = (self._base ^ (seq * _EVERY_WORD)).to_bytes(PAYLOAD_WORDS * 8, "little")
        return self._tag + struct.pack("<Q", seq) + payload

    def image(self, seq: int) -> bytes:
        """All 256 bytes of record ``seq``: its body, then its commit word."""
        body = self.body(seq)
        return body + _COMMIT.pack(commit_word(body))


def commit_word(body: bytes) -> int:
    return zlib.crc32(body) | (COMMIT_MARK << 32)


def file_size(capacity: int) -> int:
    return HEADER + capacity * RECORD


def read_header(buf: bytes | mmap.mmap) -> Header:
    """The header of a log, checked: NotALog if it is not one."""
    if len(buf) < HEADER + RECORD:
        raise NotALog(f"{len(buf)} bytes: too short for a crash log")
    magic, rsize, psize, seed, capacity = _HEAD.unpack_from(buf, 0)
    if magic != MAGIC or rsize != RECORD or psize != PAGE:
        raise NotALog(f"not a crash log (magic {magic!r}, record size {rsize}, page {psize})")
    (crc,) = _HEAD_CRC.unpack_from(buf, _HEAD.size)
    if crc != zlib.crc32(bytes(buf[:_HEAD.size])):
        raise NotALog("the header's CRC does not match: seed and capacity cannot be trusted")
    if file_size(capacity) != len(buf):
        raise NotALog(f"the header says {capacity} records ({file_size(capacity)} bytes), "
                      f"the file has {len(buf)} bytes")
    committed, starts = _COUNTS.unpack_from(buf, _COUNTS_AT)
    return Header(seed, capacity, committed, starts)


def _new_header(seed: int, capacity: int) -> bytes:
    head = _HEAD.pack(MAGIC, RECORD, PAGE, seed, capacity)
    return head + _HEAD_CRC.pack(zlib.crc32(head)) + bytes(4) + _COUNTS.pack(0, 0)


# -- the writer ---------------------------------------------------------------------------
def write(path: str, seed: int, capacity: int, count: int | None = None, rate: float = 0.0,
          out: TextIO | None = None) -> int:
    """Append records to the log at ``path`` (made with ``capacity`` records if absent) until
    ``count`` records are in it (default: full), at ``rate`` records a second (0: as fast as
    it goes). Returns the frontier it stopped at."""
    if not os.path.exists(path):
        _create(path, seed, capacity)
    fd = os.open(path, os.O_RDWR)
    try:
        with mmap.mmap(fd, 0, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE) as m:
            head = read_header(m)
            if head.seed != seed:
                raise NotALog(f"the log was started with seed {head.seed}, not {seed}")
            _COUNTS.pack_into(m, _COUNTS_AT, head.committed, head.starts + 1)
            return _append(m, Records(seed), head, count, rate, out)
    finally:
        os.close(fd)


def _create(path: str, seed: int, capacity: int) -> None:
    """Make the log whole beside ``path``, then rename it there: a writer killed while making
    it leaves no headerless file behind (the next one makes it again)."""
    new = path + ".new"
    fd = os.open(new, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(fd, file_size(capacity))
        os.pwrite(fd, _new_header(seed, capacity), 0)
    finally:
        os.close(fd)
    os.rename(new, path)


def _append(m: mmap.mmap, recs: Records, head: Header, count: int | None, rate: float,
            out: TextIO | None) -> int:
    view = memoryview(m)
    frontier = min(head.committed, head.capacity)
    while frontier < head.capacity and \
            view[HEADER + frontier * RECORD:HEADER + (frontier + 1) * RECORD] == \
            recs.image(frontier + 1):
        frontier += 1
    stop = head.capacity if count is None else min(count, head.capacity)
    print(f"crashlog writer: start {head.starts + 1}, frontier at record {frontier} "
          f"(header says {head.committed} committed), writing to {stop}",
          file=out or sys.stdout, flush=True)
    pack_commit, pack_counts = _COMMIT.pack_into, struct.Struct("<Q").pack_into
    t0, n0 = time.monotonic(), frontier
    while frontier < stop:
        seq = frontier + 1
        at = HEADER + frontier * RECORD
        body = recs.body(seq)
        view[at:at + RECORD - 8] = body                       # store 1: words 0..30
        pack_commit(m, at + RECORD - 8, commit_word(body))    # store 2: the commit word
        pack_counts(m, _COUNTS_AT, seq)                       # then the header's count
        frontier = seq
        if rate > 0 and frontier % PER_PAGE == 0:           # pace by the page
            ahead = t0 + (frontier - n0) / rate - time.monotonic()
            if ahead > 0:
                time.sleep(ahead)
    view.release()
    return frontier


# -- the checker --------------------------------------------------------------------------
@dataclass
class Check:
    records: int            # intact records before the frontier
    frontier: int           # byte offset of the first record that is not intact
    capacity: int
    written: int            # records holding any non-zero word
    torn_pages: int
    torn_page_at: int       # page number of the torn page, -1 if none
    bad_words: int
    committed: int
    lost_records: int
    writer_starts: int
    clean: bool


def check_buffer(buf: bytes | mmap.mmap) -> Check:
    """The figures of a log held in ``buf`` (the module docstring defines each)."""
    head = read_header(buf)
    recs = Records(head.seed)
    view = memoryview(buf)
    records = -1
    written = bad = 0
    torn: set[int] = set()
    for i in range(head.capacity):
        at = HEADER + i * RECORD
        slot = view[at:at + RECORD]
        if slot == _ZERO_RECORD:
            if records < 0:
                records = i
            continue
        written += 1
        want = recs.image(i + 1)
        if slot == want:
            if records >= 0:                    # intact, but past a record that is not
                torn.add(at // PAGE)
            continue
        if records < 0:
            records = i
        torn.add(at // PAGE)
        for k in range(0, RECORD, 8):
            word = slot[k:k + 8]
            if word != want[k:k + 8] and word != _ZERO_WORD:
                bad += 1
    view.release()
    if records < 0:
        records = head.capacity
    frontier = HEADER + records * RECORD
    frontier_page = frontier // PAGE
    lost = max(0, head.committed - records)
    clean = bad == 0 and lost == 0 and torn <= {frontier_page}
    return Check(records=records, frontier=frontier, capacity=head.capacity, written=written,
                 torn_pages=len(torn), torn_page_at=min(torn) if torn else -1, bad_words=bad,
                 committed=head.committed, lost_records=lost, writer_starts=head.starts,
                 clean=clean)


def check(path: str) -> Check:
    """The figures of the log at ``path``, read through a read-only mapping."""
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            raise NotALog("the file is empty: no writer ever opened it")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            return check_buffer(m)


# -- the command line ---------------------------------------------------------------------
def _size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    text = text.strip().upper()
    n = int(text[:-1]) * units[text[-1]] if text[-1:] in units else int(text)
    if n < HEADER + PAGE or (n - HEADER) % RECORD:
        raise argparse.ArgumentTypeError(f"{text}: a size of at least 8K, whole records past "
                                         "the header page (e.g. 16M)")
    return n


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python3 -m partition.guest.crashlog",
                                description="the crash-consistency log: write or check it")
    sub = p.add_subparsers(dest="verb", required=True)
    w = sub.add_parser("write", help="append records through mmap (docs/userland.md)")
    w.add_argument("path")
    w.add_argument("--seed", type=int, default=0, help="the payloads' seed (default 0)")
    w.add_argument("--size", type=_size, default=_size("16M"),
                   help="the file's size when it is made (default 16M)")
    w.add_argument("--count", type=int, default=None, help="stop at this many records")
    w.add_argument("--rate", type=float, default=0.0,
                   help="records a second (default 0: as fast as it goes)")
    c = sub.add_parser("check", help="the figures, as text and a JSON line; exit 1 if unclean")
    c.add_argument("path")
    a = p.parse_args(argv)
    try:
        if a.verb == "write":
            if not 0 <= a.seed < 2**64:
                p.error("--seed must be in 0..2^64-1")
            end = write(a.path, a.seed, (a.size - HEADER) // RECORD, a.count, a.rate)
            print(f"crashlog writer: stopped at record {end}", flush=True)
            return 0
        r = check(a.path)
    except (NotALog, OSError) as exc:
        print(f"crashlog: {a.path}: {exc}", file=sys.stderr)
        return 2
    print(f"crashlog check: {r.records} intact records (frontier at byte {r.frontier}), "
          f"{r.torn_pages} torn page(s), {r.bad_words} bad word(s), {r.lost_records} lost of "
          f"{r.committed} committed, {r.writer_starts} writer start(s): "
          f"{'clean' if r.clean else 'NOT CLEAN'}")
    print(json.dumps(asdict(r)), flush=True)
    return 0 if r.clean else 1


if __name__ == "__main__":
    sys.exit(main())
