"""Kernels that misbehave on purpose, for the host's failure paths. Loaded by path in tests."""

import time

from partition import Kernel


class Stubborn(Kernel):
    """Ignores graceful halt requests: its own loop never looks at ``halting``."""

    def run(self) -> None:
        self.printk("stubborn: ignoring halt requests")
        while True:
            time.sleep(0.01)


class PanicAtBoot(Kernel):
    def boot(self) -> None:
        self.printk("about to panic")
        self.panic("test panic at boot")


class CrashInTick(Kernel):
    """An unhandled exception in kernel code: must be recorded as a panic with the traceback."""

    def tick(self) -> bool:
        raise ZeroDivisionError("division by zero in tick")


class Halter(Kernel):
    """Halts voluntarily after its first tick."""

    def tick(self) -> bool:
        self.printk("done, halting")
        self.halt("work finished")
        return True


class Scribbler(Kernel):
    """Writes a pattern into its partition so the host can read it back."""

    def boot(self) -> None:
        self.memory[0:8] = b"SCRIBBLE"
        self.memory[len(self.memory) - 4:] = b"TAIL"
        self.printk("scribbled")


#: what a kernel that wants the operator's terminal writes: OSC 0 retitles the window, OSC 52
#: sets the clipboard, CSI 2J clears the screen, U+202E reverses it,
#: 0x9b is a one-byte CSI
ESCAPES = ("\x1b]0;pwned\x07", "\x1b]52;c;cm0gLXJmIH4=\x07", "\x1b[2J", "\u202e",
           "\x9b31m")


class Escaper(Kernel):
    """printk's and panics with terminal control sequences: the host's views must show them
    escaped, never act on them."""

    def boot(self) -> None:
        self.printk("escaper: " + "".join(ESCAPES))

    def tick(self) -> bool:
        self.panic("escaper panics: " + "".join(ESCAPES))


class EscaperAtBoot(Kernel):
    """Its boot() raises with terminal control sequences: the refusal of start quotes it."""

    def boot(self) -> None:
        raise RuntimeError("escaper at boot: " + "".join(ESCAPES))
