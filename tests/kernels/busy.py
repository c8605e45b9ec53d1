"""A kernel that is always busy (its tick always has work), so that every doorbell it gets is
the IPI signal rather than its eventfd; and one that counts what it is sent."""

from partition import MK_MSG_USER, Kernel


class Busy(Kernel):
    heartbeat_interval = None

    def boot(self) -> None:
        self.got = 0
        self.register_handler(MK_MSG_USER, self._count)

    def _count(self, msg) -> int:
        self.got += 1
        return self.got

    def tick(self) -> bool:
        sum(range(2000))      # work between two bytecodes: the signal lands in the middle
        return True
