"""Exceptions of the emulator, each carrying the errno the real multikernel would return.

Every refusal a user can see is one of these. The message names the problem, ``hint`` names the
fix, and ``errno``/``code`` let scripts branch on the kind of failure exactly as they would on the
kernel's return value (EINVAL for a bad spec, EBUSY for a resource in use, ENOENT for no such
instance, ...). They cross the supervisor socket as plain dicts and are rebuilt on the client side,
so ``mkctl`` and the in-process ``Machine`` raise the same classes.
"""

from __future__ import annotations

import errno as _errno
from typing import Any


class MKError(Exception):
    """Base class: a refused or failed multikernel operation."""

    errno: int = _errno.EIO

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    @property
    def code(self) -> str:
        return _errno.errorcode.get(self.errno, str(self.errno))

    def __str__(self) -> str:
        text = f"{self.message} [{self.code}]"
        if self.hint:
            text += f"\n  fix: {self.hint}"
        return text

    def to_wire(self) -> dict[str, Any]:
        return {"class": type(self).__name__, "message": self.message, "hint": self.hint}

    @staticmethod
    def from_wire(data: dict[str, Any]) -> MKError:
        cls = _CLASSES.get(str(data.get("class")), MKError)
        return cls(str(data.get("message")), data.get("hint"))


class InvalidSpec(MKError):
    """A request that can never succeed as written (bad CPU list, size, name, ...)."""

    errno = _errno.EINVAL


class PermissionDenied(MKError):
    """The request touches something reserved (the host's CPUs)."""

    errno = _errno.EPERM


class ResourceBusy(MKError):
    """The resource exists but is taken, or the instance is in the wrong state."""

    errno = _errno.EBUSY


class NoSuchInstance(MKError):
    errno = _errno.ENOENT


class AlreadyExists(MKError):
    errno = _errno.EEXIST


class OutOfMemory(MKError):
    """The memory pool cannot hold the requested partition."""

    errno = _errno.ENOMEM


class NotLoaded(MKError):
    """The instance has no image loaded or is not running."""

    errno = _errno.ESRCH


class BadKernelImage(MKError):
    """The kernel spec does not import, or what it names is not a kernel."""

    errno = _errno.ENOEXEC


class BootTimeout(MKError):
    """The boot CPU did not answer the spawn mailbox in time."""

    errno = _errno.ETIMEDOUT


class BootFailed(MKError):
    """The instance died or refused during boot."""

    errno = _errno.EIO


class SupervisorUnavailable(MKError):
    """No supervisor answers on the run directory's socket."""

    errno = _errno.ECONNREFUSED


class NotSupported(MKError):
    """Something the real system does that the emulator cannot (devices, io_uring rings)."""

    errno = _errno.EOPNOTSUPP


class ZygoteError(MKError):
    """The zygote (guest/zygote.py) could not fork an instance, or is gone. ``sent``: it came
    after the request went, so the zygote may have forked for it."""

    errno = _errno.ECHILD
    sent = False


class ResourceRefused(MKError):
    """A running kernel refused a runtime resource change (its RES_ACK said no, or it never
    answered); the transaction was rolled back."""

    errno = _errno.ECANCELED


class KeyRejected(MKError):
    """A kernel image's signature did not verify, or an image without one was loaded where
    signatures are required (kexec_file_load's EKEYREJECTED under KEXEC_SIG_FORCE/lockdown)."""

    errno = _errno.EKEYREJECTED


class KeyUnavailable(MKError):
    """A kernel image is signed by a key the host's keyring does not hold (the real
    ``pkcs7_validate_trust``'s ENOKEY)."""

    errno = _errno.ENOKEY


_CLASSES: dict[str, type[MKError]] = {
    c.__name__: c
    for c in (
        MKError, InvalidSpec, PermissionDenied, ResourceBusy, NoSuchInstance, AlreadyExists,
        OutOfMemory, NotLoaded, BadKernelImage, BootTimeout, BootFailed, SupervisorUnavailable,
        NotSupported, ResourceRefused, ZygoteError, KeyRejected, KeyUnavailable,
    )
}


class RootfsMissing(MKError):
    """An instance's root directory (``--rootfs``) does not exist or is not a directory."""

    errno = _errno.ENOENT


class RootfsUnreadable(MKError):
    """An instance's root directory exists but cannot be listed (its own errno is in the
    message)."""

    errno = _errno.EACCES


class ProcessLimitZero(MKError):
    """An instance whose process limit is 0 can run no program at all: a userland is refused
    before anything is started, rather than failing at its first fork."""

    errno = _errno.EINVAL


class ProcessLimitInvalid(MKError):
    """A process limit that is not a whole number of processes the pids cgroup can hold
    (negative, NaN, a fraction, or past the kernel's ``pid_max`` ceiling of 4194304)."""

    errno = _errno.EINVAL


class NotATerminal(MKError):
    """``mkctl exec -t`` without a terminal on mkctl's stdin: no size to give, no raw mode."""

    errno = _errno.ENOTTY


_CLASSES.update({c.__name__: c for c in (RootfsMissing, RootfsUnreadable, ProcessLimitZero,
                                         ProcessLimitInvalid, NotATerminal)})


class SharedRegionTooLarge(MKError):
    """A machine's shared region (``--shared NAME:SIZE``) larger than the pool it sits beside:
    the real DAXFS region is carved from the machine's memory, so none can outgrow it."""

    errno = _errno.ENOSPC


class NoSuchSharedRegion(MKError):
    """An instance names a shared region (``create --shared NAME``) the machine does not have."""

    errno = _errno.ENOENT


class MountNameEscapes(MKError):
    """A mount name with ``/``, ``..`` or a NUL: it would leave the directory it is mounted in
    (``/mnt/shared/NAME``)."""

    errno = _errno.EINVAL


_CLASSES.update({c.__name__: c for c in (SharedRegionTooLarge, NoSuchSharedRegion,
                                          MountNameEscapes)})


class UserlandFailed(MKError):
    """An instance's userland could not be brought up (its init failed to set it up, or did
    not say it was ready in time), or it ended while a command was joining it."""

    errno = _errno.EIO


_CLASSES[UserlandFailed.__name__] = UserlandFailed


class ConsoleLineTooLong(MKError):
    """A line typed on an instance's console longer than the console takes (2 KiB, or what
    one ring slot of the machine carries: host/consoleinput.py), or more than one line."""

    errno = _errno.EMSGSIZE


class ConsoleNotText(MKError):
    """Console input that is not UTF-8 text: refused whole, never replaced, so that what a
    kernel is handed is exactly what was typed."""

    errno = _errno.EILSEQ


_CLASSES.update({c.__name__: c for c in (ConsoleLineTooLong, ConsoleNotText)})
