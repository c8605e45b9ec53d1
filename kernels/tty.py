"""The console kernel: answers what is typed on its console, as a kernel on mktty0 would.

``kernels.tty:TtyKernel`` prints each line it is handed (``mkctl console -i NAME``, the host's
``console_input``) back on its console as ``console: <line>``, and counts them (metric
``console_lines``). Two words do more: ``uptime`` prints how long it has run, ``panic``
panics it (the host records it; nothing else on the machine notices). It is tickless: between
two lines it costs nothing.

    mkctl load tty --kernel kernels.tty:TtyKernel && mkctl start tty
    echo hello | mkctl console -i tty        # ... console: hello
"""

import time

from partition import Kernel


class TtyKernel(Kernel):
    idle_timeout = None

    def boot(self) -> None:
        self.lines = 0
        self.booted_at = time.monotonic()
        self.os.metric("console_lines", 0)
        self.os.printk("tty kernel: type a line (mkctl console -i NAME)")

    def on_console_input(self, line: str) -> None:
        self.lines += 1
        self.os.metric("console_lines", self.lines)
        self.os.printk(f"console: {line}")
        word = line.strip()
        if word == "uptime":
            self.os.printk(f"up {time.monotonic() - self.booted_at:.1f} s, "
                           f"{self.lines} line(s) typed")
        elif word == "panic":
            self.os.panic("asked to on the console")
