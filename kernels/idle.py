"""The idle kernel: boots, says so, and halts its CPU until something rings the doorbell.

The smallest useful image: the boot benchmark runs it, and it is the control in isolation
experiments (an instance that costs nothing while it waits). It is tickless: no timer wakes
it, so it sends heartbeats only when something woke it, and a host watchdog rings it before it
would call it hung (``mkctl bench scale`` fills a machine with 511 of these).
"""

from partition import Kernel


class IdleKernel(Kernel):
    idle_timeout = None

    def boot(self) -> None:
        os = self.os
        os.printk(f"idle kernel up on CPUs {os.cpus} (physical {os.physical_cpus}), "
                  f"{len(os.memory)} bytes at 0x{os.memory_base:x}")

    def shutdown(self) -> None:
        self.os.printk("idle kernel: shutdown requested, parking")
