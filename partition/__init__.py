"""multikernel partition emulator: the public API lives here and only here.

    from partition import Machine, Kernel

    with Machine(cpus="1", memory="256M") as m:
        m.create("a", cpus="1", memory="64M")
        m.load("a", "kernels.counter:CounterKernel")
        m.exec("a")
        print(m.console("a"))
"""

from .errors import (AlreadyExists, BadKernelImage, BootFailed, BootTimeout, InvalidSpec, MKError,
                     NoSuchInstance, NotLoaded, OutOfMemory, PermissionDenied, ResourceBusy,
                     SupervisorUnavailable)
from .instance import State
from .kernel import Kernel, KernelPanic
from .machine import Machine

__all__ = [
    "Machine", "Kernel", "KernelPanic", "State",
    "MKError", "InvalidSpec", "PermissionDenied", "ResourceBusy", "NoSuchInstance",
    "AlreadyExists", "OutOfMemory", "NotLoaded", "BadKernelImage", "BootTimeout", "BootFailed",
    "SupervisorUnavailable",
]
__version__ = "0.1.0"
