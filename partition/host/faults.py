"""Fault injection, the host's side: the kinds and the check of a request (guest/faults.py
carries out the inside kinds). Each kind is a real event in a real process, not a simulation.

Outside faults are done by the host to the process (``kill``: SIGKILL; ``hang-stop``: SIGSTOP).
Inside faults are asked of the kernel through its ring (message ``MK_EMU_FAULT``, an emulator
invention) and carried out by the kernel's own code, in its own process:

- ``panic``: the kernel panics (console oops, HALTED to the host);
- ``hang-spin``: the kernel spins without making progress (its progress counter stops);
- ``wild-write``: the kernel writes to a physical address outside its partition. With
  protection on it never had that memory mapped: the access faults inside the offender (a
  kernel oops: "unable to handle page fault"); with protection off the whole arena is mapped and
  the write lands in the victim;
- ``ipi-storm``: the kernel floods a peer's ring with messages;
- ``cpu-hog``: the kernel burns its cores for a while (still making progress);
- ``mem-hog``: the kernel allocates beyond its heap limit (RLIMIT_AS) and fails alone.
"""

from __future__ import annotations

from typing import Any

from partition.errors import InvalidSpec

OUTSIDE = ("kill", "hang-stop")
INSIDE = ("panic", "hang-spin", "wild-write", "ipi-storm", "cpu-hog", "mem-hog")
KINDS = OUTSIDE + INSIDE



def validate(kind: str, options: dict[str, Any]) -> dict[str, Any]:
    """Check a fault request completely before anything is done (CLI and scenario input)."""
    if kind not in KINDS:
        raise InvalidSpec(f"unknown fault kind {kind!r}", f"one of: {', '.join(KINDS)}")
    allowed = {"wild-write": {"address", "bytes"}, "ipi-storm": {"target", "count"},
               "cpu-hog": {"seconds"}, "mem-hog": {"bytes"}}.get(kind, set())
    extra = set(options) - allowed
    if extra:
        raise InvalidSpec(f"fault {kind!r} takes no option(s) {sorted(extra)}",
                          f"its options: {sorted(allowed) or 'none'}")
    out = dict(options)
    for key in ("address", "bytes", "target", "count"):
        if key in out:
            v = out[key]
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise InvalidSpec(f"fault option {key} must be a non-negative integer, got {v!r}",
                                  f"e.g. {key}=4096")
    if "seconds" in out:
        v = out["seconds"]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v <= 3600:
            raise InvalidSpec(f"fault option seconds must be in (0, 3600], got {v!r}",
                              "e.g. seconds=2")
    if kind == "wild-write" and "address" not in out:
        raise InvalidSpec("wild-write needs address (a physical address)",
                          "e.g. --address 0x... (a victim's memory_base from mkctl show)")
    if kind == "ipi-storm" and "target" not in out:
        raise InvalidSpec("ipi-storm needs target (an instance id)", "e.g. --target 2")
    return out
