"""A kernel that scribbles on its own console's header once booted (the red team's, issue 22):
the right magic and capacity, and a head of ``head=`` (default 2**64-1: an append by anyone who
trusts it overflows the header's 64 bits). It says nothing after: its own printk would go
through the header it broke."""

from partition import Kernel
from partition.abi import layout as L


class Scribbler(Kernel):
    heartbeat_interval = None

    def boot(self) -> None:
        console = self.os.printk.__self__          # (its ConsoleWriter)
        head = int(self.os.params.get("head", str(2**64 - 1)))
        L.CONSOLE_HEADER.pack_into(console.buf, 0, L.CONSOLE_MAGIC, console.cap, head)
