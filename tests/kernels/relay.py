"""A kernel whose handler makes a request of its own: it answers a MK_MSG_USER request by
asking instance ``next=N`` and returning that answer (a chained RPC)."""

import errno
import os

from partition import Kernel
from partition import MK_MSG_USER
from partition import RingError


class Relay(Kernel):
    heartbeat_interval = None

    def boot(self) -> None:
        self.next = int(self.params["next"])
        self.register_handler(MK_MSG_USER, self._relay)

    def _relay(self, msg):
        return [self.id, self.request(self.next, MK_MSG_USER, msg.payload, timeout=5.0)]


class Asker(Kernel):
    """Answers a MK_MSG_USER request ``[type, payload, timeout]`` by asking instance ``next=N``
    that (its own request, from inside its drain) and returning ``["ok", answer]``, or
    ``["error", errno name]`` when the request failed."""
    heartbeat_interval = None

    def boot(self) -> None:
        self.next = int(self.params["next"])
        self.register_handler(MK_MSG_USER, self._ask)
        # which request this kernel's services hold: the C fast path is a builtin
        self.register_handler(MK_MSG_USER + 1, lambda msg: type(self.os.request).__name__)

    def _ask(self, msg):
        msg_type, payload, timeout = msg.payload
        try:
            return ["ok", self.request(self.next, msg_type, payload, timeout=timeout)]
        except RingError as exc:
            return ["error", errno.errorcode[exc.errno]]


class Quitter(Kernel):
    """Dies (exit 3, no answer) on the first MK_MSG_USER request."""
    heartbeat_interval = None

    def boot(self) -> None:
        self.register_handler(MK_MSG_USER, lambda msg: os._exit(3))
