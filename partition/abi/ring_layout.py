"""The IPI ring's bytes: the offsets of its header's fields and of a slot header's, the drop
filters' bounds and the doorbell answers. ring.py (the reference), _ring.c (its #defines) and
the tests share these; partition/abi/impl.py checks the C extension's copy against them before
anything uses it (docs/protocols.md draws the same layout). And the error a refused send raises,
which ring.py and port.py both answer with."""

from __future__ import annotations

import struct

from partition.abi import layout as L

# ring header offsets (head and tail on their own cache lines)
HEAD = 0
FENCE = 8                # u64 scratch: the pure-Python sender's full barrier is an exchange here
TAIL = 64
MODE = 132               # u32 receiver delivery mode: 0 interrupt, 1 poll, 2 hybrid
COUNTERS = 136           # u64 x 5
IDLE = 176               # u32 receiver is blocked on its doorbell (halted): ring it
SIGNALED = 184           # u64 a doorbell was rung since the receiver's last drain (coalescing)
# polling: on the line senders only read (besides the filters' hit counts), not on the line of
# the counters the receiver bumps for every message: a sender reads it after each publish, and
# on the counters' line that read moved a cache line between the cores for every message
POLLING = 192            # u8 (of a u64 of its own)
DOORBELLS = COUNTERS + 32  # u64 the 5th counter: doorbells senders rang here (atomic add)
FILTERS = 200            # NFILTER x 16: drop filters (u16 sender+1, u16, u32 type, until, hits)
DROPPED_FILTERED = 248   # u64 messages the filters dropped at their senders (atomic add)
NFILTER = 3              # filters at once; past that a flood is not filtered (only dropped)
FILTER_AFTER = 16        # unhandled messages of one (sender, type) within FILTER_MS set one
FILTER_MS = 10           # a filter lapses this long after its flood stops

# what a sender must do after publishing (Ring.send's answer)
DOORBELL_NONE, DOORBELL_WAKE, DOORBELL_SIGNAL = 0, 1, 2
#: a Port's answer when the peer entry no longer names the incarnation it was made for
REROUTE = -3
COUNTER_LIMIT = 1 << 62      # a counter past this was written, not counted
COUNTER_NAMES = ("received", "dropped_bad_size", "dropped_unknown_type", "dropped_abandoned",
                 "doorbells")
MODES = {"interrupt": 0, "poll": 1, "hybrid": 2}

# slot header
S_CPU = 0                # u64 sender physical cpu
S_TYPE = 8               # u32
S_SENDER = 12            # u32 sender instance id + 1 (0: not written yet)
S_SIZE = 16              # u64 data_size, published last
S_TICKET = 24            # u64 claim ticket (the head value claimed)
ABANDONED = (1 << 64) - 1

_COUNTERS = struct.Struct("<5Q")
_SLOT_HDR = struct.Struct("<QIIQQ")
_Q = struct.Struct("<Q")
_FILTER = struct.Struct("<HHIII")        # sender+1, 0, type, until ms, hits
_ZERO_HDR = bytes(L.RING_SLOT_HEADER)



class RingError(OSError):
    """A send refused by the ring; ``errno`` is ENOSPC, EMSGSIZE or ESRCH."""

    errno: int

    def __init__(self, code: int, message: str) -> None:
        super().__init__(code, message)


#: what the C extension must agree on (its LAYOUT, compared by impl.py)
C_LAYOUT = {"HEAD": HEAD, "TAIL": TAIL, "COUNTERS": COUNTERS, "POLLING": POLLING, "IDLE": IDLE,
            "SIGNALED": SIGNALED, "FILTERS": FILTERS, "DROPPED_FILTERED": DROPPED_FILTERED,
            "NFILTER": NFILTER, "FILTER_AFTER": FILTER_AFTER, "FILTER_MS": FILTER_MS,
            "S_CPU": S_CPU, "S_TYPE": S_TYPE, "S_SENDER": S_SENDER, "S_SIZE": S_SIZE,
            "S_TICKET": S_TICKET, "RING_HEADER_BYTES": L.RING_HEADER_BYTES,
            "RING_SLOT_HEADER": L.RING_SLOT_HEADER}
