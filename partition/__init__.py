"""multikernel partition emulator: the public API lives here and only here.

    from partition import Machine, Kernel

    with Machine(cpus="1", memory="256M") as m:
        m.create("a", cpus="1", memory="64M")
        m.load("a", "kernels.counter:CounterKernel")
        m.exec("a")
        print(m.console("a"))
"""

from typing import TYPE_CHECKING, Any

from partition.errors import (
    AlreadyExists,
    BadKernelImage,
    BootFailed,
    BootTimeout,
    InvalidSpec,
    MKError,
    NoSuchInstance,
    NotLoaded,
    OutOfMemory,
    PermissionDenied,
    ResourceBusy,
    SupervisorUnavailable,
)

if TYPE_CHECKING:
    from partition.abi.message import MK_MSG_USER, Message
    from partition.abi.ring import RingError
    from partition.guest.kernel import Kernel, KernelPanic, RefuseResource
    from partition.host.instance import State
    from partition.host.machine import Machine

# The machine and the kernel base pull in structlog, msgpack, ctypes and the rest; a `mkctl`
# command only talks to the supervisor and needs none of it. They load on first use (PEP 562).
_LAZY = {"Machine": "partition.host.machine", "Kernel": "partition.guest.kernel",
         "KernelPanic": "partition.guest.kernel", "RefuseResource": "partition.guest.kernel",
         "State": "partition.host.instance",
         "RingError": "partition.abi.ring", "Message": "partition.abi.message",
         "MK_MSG_USER": "partition.abi.message"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'partition' has no attribute {name!r}")

__all__ = [
    "MK_MSG_USER",
    "AlreadyExists",
    "BadKernelImage",
    "BootFailed",
    "BootTimeout",
    "InvalidSpec",
    "Kernel",
    "KernelPanic",
    "MKError",
    "Machine",
    "Message",
    "NoSuchInstance",
    "NotLoaded",
    "OutOfMemory",
    "PermissionDenied",
    "RefuseResource",
    "ResourceBusy",
    "RingError",
    "State",
    "SupervisorUnavailable",
]
__version__ = "0.1.0"
