"""A kernel that forges the RESOURCE protocol, for tests/test_resize.py. Loaded by path.

Command line: ``attack=`` one of

- ``cpu-add``: sends a CPU_ADD for CPU ``cpu=`` to instance ``target=``, once as itself (a
  request, whose answer it notes) and twice in raw slots that claim the host as sender, with the
  command number the host's peer entry shows and the next one;
- ``ack``: for ``seconds=`` seconds, watches the ring of instance ``target=`` for RESOURCE
  requests (the bytes of a consumed slot stay in the ring) and answers each one to the host as
  if it were the target, with a RES_ACK of status 0; also sends RES_ACK-looking responses with
  made-up message ids.

It notes what it did in its own partition (``len u32`` then lines), like tests/kernels/hostile.py.
"""

import random
import time

from partition import Kernel
from partition.abi import layout as L
from partition.abi import message as M

RESOURCE = (M.MK_MSG_CPU_ADD, M.MK_MSG_CPU_REMOVE, M.MK_MSG_MEM_ADD, M.MK_MSG_MEM_REMOVE)


class Forger(Kernel):
    heartbeat_interval = None

    def note(self, text: str) -> None:
        data = (text + "\n").encode()
        at = int.from_bytes(self.memory[0:4], "little") + 4
        self.memory[at:at + len(data)] = data
        self.memory[0:4] = (at - 4 + len(data)).to_bytes(4, "little")
        self.printk(f"forger: {text}")

    def boot(self) -> None:
        self.attack = self.params.get("attack", "")
        self.target = int(self.params.get("target", "0"))
        self.note(f"attack {self.attack}")

    def tick(self) -> bool:
        if self.attack:
            attack, self.attack = self.attack, ""
            try:
                getattr(self, "attack_" + attack.replace("-", "_"))()
            except Exception as exc:
                self.note(f"failed: {type(exc).__name__}: {exc}")
            self.note("done")
        return False

    def _raw(self, ring_id: int, sender: int, mtype: int, subtype: int, msg_id: int,
             payload: object) -> None:
        """One published slot with a sender id of our choosing, and the receiver rung."""
        from ringtool import claim, fill, publish
        ring = self.endpoint.ring_of(ring_id)
        data = M.encode(mtype, subtype, msg_id, payload)
        off = fill(ring, claim(ring), sender, 0, mtype, data)
        publish(ring, off, len(data))

    # -- the attacks -----------------------------------------------------------------------
    def attack_cpu_add(self) -> None:
        cpu = int(self.params.get("cpu", "1"))
        body = {"cpus": [cpu], "logical": [cpu]}
        seq = int.from_bytes(self.ctx.peers[self.target * 64 + 36:self.target * 64 + 40],
                             "little")
        answer = self.request(self.target, M.MK_MSG_CPU_ADD, {"seq": seq + 1, "body": body},
                              timeout=5.0)
        self.note(f"as itself: {answer!r}")
        for s in (seq, seq + 1):
            self._raw(self.target, 0, M.MK_MSG_CPU_ADD, 0, 1, {"seq": s, "body": body})
            self.note(f"as the host, seq {s}: sent")

    def attack_ack(self) -> None:
        ring = self.endpoint.ring_of(self.target)
        ack = {"type": M.MK_MSG_RES_ACK, "status": 0, "reason": "forged"}
        for mtype in RESOURCE:            # blind: ids nobody waits for
            self._raw(0, self.target, mtype, M.SUB_RESPONSE, random.getrandbits(63) | 1, ack)
        seen: set[int] = set()
        end = time.monotonic() + float(self.params.get("seconds", "5"))
        while time.monotonic() < end and not self.halting:
            for i in range(ring.nslots):
                p = L.RING_HEADER_BYTES + i * ring.stride + L.RING_SLOT_HEADER
                mtype, sub, mid, _ = M.HEADER.unpack_from(ring.buf, p)
                if mtype in RESOURCE and sub & M.SUB_REQUEST and mid not in seen:
                    seen.add(mid)
                    self._raw(0, self.target, mtype, M.SUB_RESPONSE, mid, ack)
                    self.note(f"answered {mtype:#x} request {mid:#x} as {self.target}")
            time.sleep(0.001)
