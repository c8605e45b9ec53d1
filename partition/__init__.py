"""multikernel partition emulator: the public API lives here and only here.

    from partition import Machine, Kernel

    with Machine(cpus="1", memory="256M") as m:
        m.create("a", cpus="1", memory="64M")
        m.load("a", "kernels.counter:CounterKernel")
        m.exec("a")
        print(m.console("a"))
"""

from typing import TYPE_CHECKING, Any

from .errors import (AlreadyExists, BadKernelImage, BootFailed, BootTimeout, InvalidSpec, MKError,
                     NoSuchInstance, NotLoaded, OutOfMemory, PermissionDenied, ResourceBusy,
                     SupervisorUnavailable)

if TYPE_CHECKING:
    from .instance import State
    from .kernel import Kernel, KernelPanic
    from .machine import Machine

# The machine and the kernel base pull in structlog, msgpack, ctypes and the rest; a `mkctl`
# command only talks to the supervisor and needs none of it. They load on first use (PEP 562).
_LAZY = {"Machine": ".machine", "Kernel": ".kernel", "KernelPanic": ".kernel",
         "State": ".instance"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'partition' has no attribute {name!r}")

__all__ = [
    "Machine", "Kernel", "KernelPanic", "State",
    "MKError", "InvalidSpec", "PermissionDenied", "ResourceBusy", "NoSuchInstance",
    "AlreadyExists", "OutOfMemory", "NotLoaded", "BadKernelImage", "BootTimeout", "BootFailed",
    "SupervisorUnavailable",
]
__version__ = "0.1.0"
