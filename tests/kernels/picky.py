"""A kernel with opinions about its resources, for the runtime-change tests (kerf update).

Command line: ``refuse=memory`` or ``refuse=cpu`` refuses those changes with a reason
(``refuse=shrink``: only memory leaving it);
``panic=memory`` panics inside the memory hook; ``hang=memory`` stops answering (it spins in the
hook past the host's RES_ACK wait); ``slow=SECONDS`` takes that long over every change (answers
each, late). Without any, every change is accepted and remembered, and
``query`` answers what it saw.
"""

import time

from partition import Kernel, RefuseResource


class Picky(Kernel):
    heartbeat_interval = None

    def boot(self) -> None:
        self.seen: list[str] = []

    def _judge(self, kind: str, what: str) -> None:
        p = self.params
        time.sleep(float(p.get("slow", "0")))
        if p.get("panic") == kind:
            self.panic(f"picky: {what} is more than I can take")
        if p.get("hang") == kind:
            self.printk(f"picky: hanging in {what}")
            time.sleep(3600)
        if p.get("refuse") == kind or (p.get("refuse") == "shrink" and "remove" in what
                                           and kind == "memory"):
            raise RefuseResource(f"picky: no {what}, thank you")
        self.seen.append(what)
        self.printk(f"picky: accepted {what}")

    def on_cpu_add(self, cpus: list[int]) -> None:
        self._judge("cpu", f"cpu-add {cpus}")

    def on_cpu_remove(self, cpus: list[int]) -> None:
        self._judge("cpu", f"cpu-remove {cpus}")

    def on_memory_add(self, base: int, size: int) -> None:
        self._judge("memory", f"memory-add {base:#x}+{size:#x}")

    def on_memory_remove(self, base: int, size: int) -> None:
        self._judge("memory", f"memory-remove {base:#x}+{size:#x}")

    def tick(self) -> bool:
        return self.idle(0.05)
