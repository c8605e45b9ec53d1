"""A kernel written against the old API (services as ``Kernel`` methods): it must still work,
and say how many DeprecationWarnings its old spellings raised (metric ``warned``) and of which
kind (``deprecated``: how many of them were DeprecationWarnings). Loaded by path in tests."""

import warnings

from partition import Kernel
from partition.abi.message import MK_MSG_USER


class OldStyle(Kernel):
    idle_timeout = 0.05

    def boot(self):
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            self.printk("oldstyle: up")          # warns once, then a plain attribute
            self.printk("oldstyle: again")
            self.register_handler(MK_MSG_USER, lambda msg: [self.id, msg.payload])
            self.memory[0:8] = b"OLDSTYLE"
            for _ in range(2):
                assert not self.halting          # read anew each time: warns each time
        self.os.metric("warned", len(seen))
        self.os.metric("deprecated", sum(w.category is DeprecationWarning for w in seen))
