"""Fuzz driver for the C half (partition/abi/_fastring.c and its translation units), run by
tests/test_fuzz.py in a process that has an AddressSanitizer build of the extension loaded
(LD_PRELOAD=libasan). Every ring header and slot is what a hostile instance could have written
there; the C drain, send, Port, encoder and decoder, and the Waiter's waits and request
(_waiter.c), must neither read nor write outside the buffer they were given, whatever they
find, and keep the ring's invariants (tail never passes head; a drain takes at most ``limit``
slots; the Waiter puts its owner's ``_in_drain`` back).

    python3 tests/fuzz_ring.py EXTENSION.so SECONDS SEED
"""

import importlib.machinery
import importlib.util
import os
import random
import struct
import sys
import time

import msgpack

so, seconds, seed = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
loader = importlib.machinery.ExtensionFileLoader("partition.abi._fastring", so)
spec = importlib.util.spec_from_file_location("partition.abi._fastring", so, loader=loader)
fast = importlib.util.module_from_spec(spec)
loader.exec_module(fast)

from partition.abi import layout as L  # noqa: E402
from partition.abi import message as M  # noqa: E402
from partition.abi import ring as R  # noqa: E402
from partition.abi.message import Message  # noqa: E402

fast.configure(Message, lambda b: msgpack.unpackb(b, raw=False, strict_map_key=False),
               msgpack.Packer(use_bin_type=True, autoreset=True).pack)
rng = random.Random(seed)
EDGES = [0, 1, 7, 8, 19, 20, 21, 255, 256, 4095, 4096, 4097, 2 ** 32 - 1, 2 ** 63,
         2 ** 64 - 2, R.ABANDONED]


def u64() -> int:
    return rng.choice(EDGES) if rng.random() < 0.5 else rng.getrandbits(64)


def fill_slot(buf: bytearray, off: int, t: int, slot_bytes: int) -> None:
    size = rng.choice([rng.randrange(0, slot_bytes + 1), u64(), 0, slot_bytes, slot_bytes + 1])
    ticket = (t if rng.random() < 0.7 else u64()) % 2 ** 64
    sender = rng.choice([0, 1, 2, 513, 2 ** 32 - 1, rng.getrandbits(32)])
    mtype = rng.choice([0x4000, 0x3F0F, 0, 2 ** 32 - 1, rng.getrandbits(32)])
    R._SLOT_HDR.pack_into(buf, off, rng.getrandbits(64), mtype, sender, size & (2 ** 64 - 1),
                          ticket)
    n = min(slot_bytes, rng.randrange(0, 64))
    payload = bytes(rng.getrandbits(8) for _ in range(n))
    if rng.random() < 0.5 and n >= 20:        # an mk_message header that may lie
        payload = struct.pack("<IIQI", mtype, rng.getrandbits(32), rng.getrandbits(64),
                              rng.choice([n - 20, n, 0, 2 ** 32 - 1])) + payload[20:]
    buf[off + L.RING_SLOT_HEADER:off + L.RING_SLOT_HEADER + n] = payload
    if rng.random() < 0.2:          # an answer to the Waiter's request, from its target or not
        answer = M.encode(0x4100, M.SUB_RESPONSE, MID, rng.choice([None, 7, b"x" * 30]))
        if len(answer) <= slot_bytes:
            R._SLOT_HDR.pack_into(buf, off, 0, 0x4100, rng.choice([TARGET + 1, sender]),
                                  len(answer), ticket)
            buf[off + L.RING_SLOT_HEADER:off + L.RING_SLOT_HEADER + len(answer)] = answer


class Owner:
    """The runtime a Waiter raises ``_in_drain`` on."""
    _in_drain = False


class Messenger:
    """What ``Waiter.request`` calls when the answer is not there after its first wait."""
    last_target = -1

    def wait(self, timeout: float) -> None:
        pass

    def requested(self, *args: object) -> str:
        return "not answered"


def handler(msg: Message) -> object:
    if rng.random() < 0.05:
        raise ValueError("a handler that fails")
    return msg.payload


def waiter_round(view: memoryview, slots: int, stride: int, slot_bytes: int, limit: int,
                 handled: bytearray | None, doorbell: int) -> None:
    """The Waiter (_waiter.c) on the hostile ring: its waits, and a request whose send goes
    through a Port into the same ring and whose answer may be among what is there."""
    waiting: dict[int, int] = {}
    responses: dict[int, Message] = {}
    handlers = {0x4000: handler, 0x3F0F: handler}
    port = fast.Port(view, slots, stride, slot_bytes, 1, 0, None, 0, -1, -1, 0, None, 0, 0, 0)
    replies = (waiting, responses, handlers, {TARGET: port, 513: port}, lambda *a: None)
    owner = Owner()
    w = fast.Waiter(view, slots, stride, slot_bytes, limit,
                    handled if handled is not None else bytearray(8192), deliver, replies, owner,
                    lambda got, lim, h, d: got[0], waiting, doorbell)
    msgr = Messenger()
    w.bind(msgr, {TARGET: port}, lambda bits: MID, 0.0, lambda *a, **k: "slow", None)
    for call in (lambda: w.spin(rng.choice([0.0, 1.0])), lambda: w(0.0),
                 lambda: w.ask(port, 0x4100, MID, b"q", TARGET, 0.0),
                 lambda: w.request(TARGET, 0x4100, None, 0.0),
                 lambda: w.request(TARGET + 1, 0x4100)):
        if rng.random() < 0.5:
            waiting[MID ^ 2] = TARGET                  # another request pending, or none
        try:
            got = call()
        except ValueError:
            got = None
        if got is not None and got is not w and got not in ("slow", "not answered"):
            answered.append(got)
        assert owner._in_drain is False
        waiting.clear()
        responses.clear()
    port.close()


#: the request id the Waiter's requests carry, which some hostile slots answer (from the right
#: sender or not)
MID = 0x1234567
TARGET = 2


def deliver(mtype: int, sender: int, cpu: int, data: bytes) -> bool:
    fast.decode(data, sender, cpu)
    r = rng.random()
    if r < 0.02:
        raise ValueError("a handler that fails")
    return r < 0.8


answered: list[object] = []        # the Waiter's requests answered from the hostile ring
doorbell = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)   # an interrupt-mode Waiter's halts on it
rounds = 0
deadline = time.monotonic() + seconds
while time.monotonic() < deadline:
    slots = rng.choice([1, 2, 8, 64])
    slot_bytes = rng.choice([64, 128, 4096])
    lay = L.ArenaLayout(pool_bytes=4 << 20, console_bytes=4096, ring_slots=slots,
                        ring_slot_bytes=slot_bytes)
    size = L.RING_HEADER_BYTES + slots * lay.slot_stride
    buf = bytearray(size)
    tail = rng.choice([0, 5, 2 ** 63, 2 ** 64 - 3, rng.getrandbits(64)])
    head = rng.choice([tail, tail + 1, tail + slots, tail + slots + 1, tail - 1,
                       rng.getrandbits(64)]) % 2 ** 64
    struct.pack_into("<Q", buf, R.HEAD, head)
    struct.pack_into("<Q", buf, R.TAIL, tail)
    for off in (R.POLLING, R.IDLE, R.SIGNALED, R.FILTERS, R.FILTERS + 16, R.FILTERS + 32):
        if rng.random() < 0.3:
            struct.pack_into("<Q", buf, off, u64())
    for k in range(slots):
        fill_slot(buf, L.RING_HEADER_BYTES + k * lay.slot_stride, tail + k, slot_bytes)
    view = memoryview(buf)
    handled = None if rng.random() < 0.3 else bytearray(rng.getrandbits(8) for _ in range(
        rng.choice([0, 1, 8192])))
    limit = rng.choice([1, 8, 64, 1000])
    try:
        got = fast.drain(view, slots, lay.slot_stride, slot_bytes, limit, handled, deliver,
                         rng.random() < 0.5)
    except ValueError:
        got = None
    if got is not None:
        delivered, more, consumed = got
        assert 0 <= consumed <= limit, got
    t2, h2 = struct.unpack_from("<Q", buf, R.TAIL)[0], struct.unpack_from("<Q", buf, R.HEAD)[0]
    assert (t2 - tail) % 2 ** 64 <= limit, (tail, t2)
    # a send into whatever is there: it claims inside the buffer or refuses
    data = bytes(rng.getrandbits(8) for _ in range(rng.choice([0, 20, slot_bytes, slot_bytes + 1])))
    rc = fast.send(view, slots, lay.slot_stride, slot_bytes, 1, 0, None, 0, 0x4000, data)
    assert rc in (0, -1, -2) or rc > 0, rc
    # a Port (_port.c) into the same hostile ring: bytes, and a message it encodes in place
    # (_message.c), with a peer entry that may or may not name its incarnation
    peers = bytearray(rng.getrandbits(8) for _ in range(16))
    port = fast.Port(view, slots, lay.slot_stride, slot_bytes, 2, 0, None, 0, -1, -1, 0,
                     memoryview(peers).toreadonly(), 8, *struct.unpack_from("<II", peers, 8)
                     if rng.random() < 0.7 else (1, 2))
    rc = port(0x4000, data)
    assert rc in (0, -1, -2, fast.REROUTE) or rc > 0, rc
    payload = rng.choice([data, None, True, 5, 2 ** 40, "text", [data], {"k": data}])
    rc = port.message(0x4000, 0, rng.getrandbits(64), payload)
    assert rc in (0, -1, -2, fast.REROUTE) or rc > 0, rc
    sent, rc = port.messages(0x4000, 0, 1, [payload] * rng.randrange(4))
    port.close()
    waiter_round(view, slots, lay.slot_stride, slot_bytes, limit, handled,
                 doorbell[0] if rng.random() < 0.3 else -1)
    for _ in range(4):
        junk = bytes(rng.getrandbits(8) for _ in range(rng.choice([0, 19, 20, 21, 60])))
        fast.decode(junk, 1, 0)
        fast.encode(0x4000, 0, 1, rng.choice([junk, None, 127, 128, -1, [junk]]))
    view.release()
    rounds += 1
print(f"fuzz: {rounds} rounds in {seconds:g} s, seed {seed} ({len(answered)} answers the "
      "Waiter took from the ring): no fault")
