"""What ``create`` says of an instance's userland, checked before anything is reserved: its
process limit (the pids cgroup's ``pids.max``) and its root directory (``--rootfs``).

One place for both checks, so that mkctl's options, the daemon's ``create``, a scenario's
``[[instance]]`` and a survivable machine's adoption refuse the same values in the same words.
"""

from __future__ import annotations

import math
import os

from partition.errors import ProcessLimitInvalid, ProcessLimitZero, RootfsMissing

PIDS_MAX_DEFAULT = 64          # processes and threads of one instance, when create names none
PIDS_MAX_CEILING = 4194304     # the kernel's own pid_max ceiling: no cgroup holds more


def check_pids_max(value: object, name: str = "the instance") -> int:
    """``value`` as a process limit (an int in 1..4194304; text of digits is accepted, as from
    a command line), or ``ProcessLimitZero`` / ``ProcessLimitInvalid`` naming the fix."""
    fix = f"give a whole number of processes in 1..{PIDS_MAX_CEILING} (default {PIDS_MAX_DEFAULT})"
    n: int | None = None
    if isinstance(value, bool):
        n = None
    elif isinstance(value, int):
        n = value
    elif isinstance(value, float) and math.isfinite(value) and value.is_integer():
        n = int(value)
    elif isinstance(value, str) and value.strip().lstrip("+-").isdigit():
        n = int(value.strip())
    if n == 0:
        raise ProcessLimitZero(f"{name} would have a process limit of 0: no program could run "
                               "in it, not even the first", fix)
    if n is None or not 1 <= n <= PIDS_MAX_CEILING:
        shown = repr(value) if not isinstance(value, str) else repr(value[:40])
        raise ProcessLimitInvalid(f"process limit {shown} of {name} is not a number of "
                                  f"processes in 1..{PIDS_MAX_CEILING}", fix)
    return n


def check_rootfs(path: object, name: str = "the instance") -> str:
    """``path`` as an instance's root: an existing directory, made absolute (the daemon and
    mkctl may have different working directories), or ``RootfsMissing`` naming the fix."""
    if not isinstance(path, str) or not path or "\0" in path:
        raise RootfsMissing(f"rootfs {path!r} of {name} is not a path",
                            "give the directory of an unpacked root filesystem")
    absolute = os.path.abspath(path)
    if not os.path.isdir(absolute):
        why = "does not exist" if not os.path.lexists(absolute) else "is not a directory"
        raise RootfsMissing(f"rootfs {path!r} of {name} {why}",
                            "give the directory of an unpacked root filesystem (e.g. a "
                            "container image's, holding /bin, /proc, /dev, /tmp)")
    return absolute
