"""A kernel for the console-input tests (tests/test_console_input.py). Loaded by path.

``on_console_input`` prints ``typist: <line>``; the line ``boom`` makes the hook raise (a
kernel's own bug: a panic of this instance, nothing more). Command line ``forge=NAME``: at boot,
type on instance NAME's console as a peer would, with the MKTY command the host sends, its
sender its own id and a command number past the host's; the target must ignore it.
"""

from partition import Kernel
from partition.abi import message as M


class Typist(Kernel):
    idle_timeout = None

    def boot(self) -> None:
        target = self.os.params.get("forge")
        if target:
            peer = self.os.peer_id(target)
            if peer is None:
                self.os.printk(f"typist: no instance {target!r} to forge for")
                return
            body = {"op": M.MKTY_INPUT, "line": "forged"}
            for seq in range(1, 4):
                self.os.send(peer, M.MK_EMU_MKTY, {"seq": seq, "body": body})
            self.os.printk(f"typist: forged MKTY input to {target}")

    def on_console_input(self, line: str) -> None:
        if line == "boom":
            raise RuntimeError("typist: the hook blew up")
        self.os.printk(f"typist: {line}")
