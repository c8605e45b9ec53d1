"""A kernel whose handler makes a request of its own: it answers a MK_MSG_USER request by
asking instance ``next=N`` and returning that answer (a chained RPC)."""

from partition import Kernel
from partition import MK_MSG_USER


class Relay(Kernel):
    heartbeat_interval = None

    def boot(self) -> None:
        self.next = int(self.params["next"])
        self.register_handler(MK_MSG_USER, self._relay)

    def _relay(self, msg):
        return [self.id, self.request(self.next, MK_MSG_USER, msg.payload, timeout=5.0)]
