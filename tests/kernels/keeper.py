"""Kernels for the KHO and live-update tests (tests/test_liveupdate.py). Loaded by path.

``Keeper``: on a run with nothing handed over, writes a pattern in page 1 (``A``) and page 2
(``B``) of its partition and preserves page 1 as ``name=`` (URL-quoted; default ``a``), and with
``keep_rest=1`` keeps the rest too. On a run that finds it (``kho_restore``) it says so on the
console with the first bytes, and writes nothing: ``keeper: restored <hex>`` or ``keeper: fresh``.

``Lying``: writes a hostile KHO table out straight into its own page (bypassing
``kho_preserve``), the count set to ``declared=`` (default 1000), then idles.

``LongName``: writes a table out of one entry whose name fills all 32 bytes (no NUL).

``Slow``: the ``stateful.Counter`` service (same PING type, same state page, no console lines)
whose ``shutdown()`` saves and preserves its state and then takes ``linger=`` seconds more (a
flush, say) before it returns.

``Stuck``: the ``stateful.Counter`` service (same PING type, same state page), whose
``shutdown()`` preserves its state and then never returns: the halt must be forced.

``Spoiler``: for ``seconds=`` seconds, against instance ``target=``: forges SHUTDOWN commands
with ``handover`` in raw slots that claim the host as sender (the command numbers the host's
peer entry shows, and the next ones), and floods it with messages of a type nobody handles.
It counts what it did in its console (``spoiler: forged F flooded N refused R``).
"""

import struct
import time

from partition import MK_MSG_USER, Kernel, RingError
from partition.abi import message as M

PAGE = 4096
PATTERN_A = bytes(range(256)) * 16          # one page
PATTERN_B = b"\xb5" * PAGE

PING = MK_MSG_USER + 0x21
STATE = struct.Struct("<QQ")                # as tests/kernels/stateful.py
MAGIC = 0x4B484F5354415445
JUNK = MK_MSG_USER + 0x5A                   # a type no kernel here handles


class Keeper(Kernel):
    heartbeat_interval = None

    def boot(self) -> None:
        from urllib.parse import unquote
        name = unquote(self.params.get("name", "a"))
        got = self.kho_restore(name)
        if got is not None:
            self.printk(f"keeper: restored {bytes(got[:8]).hex()}")
            return
        self.printk("keeper: fresh")
        self.memory[PAGE:2 * PAGE] = PATTERN_A
        self.memory[2 * PAGE:3 * PAGE] = PATTERN_B
        self.kho_preserve(name, PAGE, PAGE)
        if self.params.get("keep_rest") == "1":
            self.kho_keep_rest()


class Lying(Kernel):
    heartbeat_interval = None

    def boot(self) -> None:
        size = len(self.memory)
        self.memory[0:PAGE] = PATTERN_A
        self.memory[4 * PAGE:5 * PAGE] = PATTERN_B
        table = [
            ("good", 0, PAGE, 0),                       # kept
            ("mis", PAGE + 1, PAGE, 0),                 # misaligned offset
            ("odd", 2 * PAGE, 100, 0),                  # misaligned size
            ("past", size - PAGE, 2 * PAGE, 0),         # runs past the partition
            ("far", 1 << 62, PAGE, 0),                  # far outside
            ("zero", 3 * PAGE, 0, 0),                   # empty
            ("over", 0, 2 * PAGE, 0),                   # overlaps "good"
            ("good", 4 * PAGE, PAGE, 0),                # duplicate name
            ("caf\u00e9", 5 * PAGE, PAGE, 0),           # not ASCII
            ("a\0b", 6 * PAGE, PAGE, 0),                # a NUL inside
            ("", 7 * PAGE, PAGE, 0),                    # no name
            ("\x01ctl", 8 * PAGE, PAGE, 0),             # a control character
            ("second", 4 * PAGE, PAGE, 0),              # kept
        ]
        own = self.ctx.own
        own.write_kho(table, out=True)
        own.kho_declared = int(self.params.get("declared", "1000"))
        own.kho_flags = 0xFFFFFFFF if self.params.get("flags") == "all" else 0
        self.printk("lying: table written")


class LongName(Kernel):
    heartbeat_interval = None

    def boot(self) -> None:
        self.memory[0:PAGE] = PATTERN_A
        self.ctx.own.write_kho([("x" * 32, 0, PAGE, 0)], out=True)


class Slow(Kernel):
    heartbeat_interval = None

    def boot(self) -> None:
        kept = self.kho_restore("state")
        self.handled = STATE.unpack_from(kept, 0)[1] if kept is not None else 0
        self.register_handler(PING, self._ping)

    def _ping(self, msg):
        self.handled += 1
        return msg.payload

    def shutdown(self) -> None:
        STATE.pack_into(self.memory, 0, MAGIC, self.handled)
        if self.handing_over:
            self.kho_preserve("state", 0, PAGE)
        end = time.monotonic() + float(self.params.get("linger", "0.3"))
        while time.monotonic() < end:
            time.sleep(0.01)


class Stuck(Kernel):
    heartbeat_interval = None

    def boot(self) -> None:
        kept = self.kho_restore("state")
        self.handled = STATE.unpack_from(kept, 0)[1] if kept is not None else 0
        self.register_handler(PING, self._ping)
        self.printk(f"stuck: up at {self.handled}")

    def _ping(self, msg):
        self.handled += 1
        return msg.payload

    def shutdown(self) -> None:
        STATE.pack_into(self.memory, 0, MAGIC, self.handled)
        self.kho_preserve("state", 0, PAGE)
        self.printk(f"stuck: halting at {self.handled}, and never returning")
        while True:
            time.sleep(3600)


class Spoiler(Kernel):
    heartbeat_interval = None

    def boot(self) -> None:
        self.target = int(self.params["target"])
        self.seconds = float(self.params.get("seconds", "3"))
        self.end = time.monotonic() + self.seconds
        self.forged = self.flooded = self.refused = 0
        self.printk("spoiler: armed")

    def _raw(self, payload: object) -> None:
        from ringtool import claim, fill, publish
        ring = self.endpoint.ring_of(self.target)
        data = M.encode(M.MK_MSG_SHUTDOWN, 0, 1, payload)
        off = fill(ring, claim(ring), 0, 0, M.MK_MSG_SHUTDOWN, data)    # sender: the host
        publish(ring, off, len(data))

    def tick(self) -> bool:
        if self.end is None:
            return False
        if time.monotonic() >= self.end:
            self.end = None
            self.printk(f"spoiler: forged {self.forged} flooded {self.flooded} "
                        f"refused {self.refused}")
            return False
        t = self.target
        seq = int.from_bytes(self.ctx.peers[t * 64 + 36:t * 64 + 40], "little")
        for s in (seq, seq + 1):
            try:
                self._raw({"seq": s, "body": {"timeout_s": 10.0, "handover": True}})
                self.forged += 1
            except RingError:
                self.refused += 1
        for _ in range(16):
            try:
                self.send(t, JUNK, b"x" * 64)
                self.flooded += 1
            except RingError:
                self.refused += 1
        time.sleep(0.005)
        return True
