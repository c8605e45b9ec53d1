"""The one place that decides whether the C half of the IPI ring is used: the extension
``partition.abi._fastring`` (partition/abi/_fastring.c and its translation units) when it is
built, current and agrees with ring_layout.py, else nobody's C at all. ring.py, message.py and
port.py each bind their names once from ``FAST`` at the bottom of the module (their
selectors); nothing else asks.

The boundary of the C half, in one sentence (docs/messages.md, "The C half"): C does the
per-message hot path of the IPI ring and nothing else (claim, publish and doorbell; wait and
consume; the mk_message codec on the slot; a Port's bound send and the dispatch of a handled
message), and leaves every decision about an unusual slot or header to the Python reference,
which implements all of it and runs alone without the extension.

``MK_PURE_RING=1`` forces the Python reference; ``MK_REQUIRE_C=1`` (.ci/run) makes the tests
fail, not skip, where the extension is missing."""

from __future__ import annotations

import glob
import hashlib
import os
from types import ModuleType

from partition.abi import ring_layout as RL


def source_digest(directory: str = os.path.dirname(__file__)) -> str | None:
    """The SHA-256 of the C sources as setup.py computes it (every _*.c and _*.h here, in name
    order, each name then its bytes); None for an install without sources."""
    files = sorted(glob.glob(os.path.join(directory, "_*.c")) +
                   glob.glob(os.path.join(directory, "_*.h")), key=os.path.basename)
    if not files:
        return None
    digest = hashlib.sha256()
    try:
        for path in files:
            with open(path, "rb") as f:
                digest.update(os.path.basename(path).encode() + b"\0" + f.read())
    except OSError:
        return None
    return digest.hexdigest()


def stale(module: object) -> bool:
    """Was the extension built from other sources than the ones beside it? A failed rebuild
    leaves the previous build in place (the extension is optional, so pip only warns), and
    its layout may still match while its behaviour does not."""
    digest = source_digest()
    return digest is not None and getattr(module, "SOURCE_SHA256", "") != digest


def _load() -> tuple[ModuleType | None, bool]:
    """(the extension, or None; whether a stale one was refused)."""
    try:
        from partition.abi import _fastring  # type: ignore[attr-defined]
    except ImportError:  # pragma: no cover - no compiler at install time
        return None, False
    if os.environ.get("MK_PURE_RING") == "1":
        return None, False
    if _fastring.LAYOUT != RL.C_LAYOUT or _fastring.REROUTE != RL.REROUTE:
        return None, False
    if stale(_fastring):
        return None, True
    return _fastring, False


#: the extension when it is used; None: the Python reference runs alone
FAST, STALE = _load()
#: which implementation this process uses ("c" or "python"); benchmarks report it
IMPLEMENTATION = "c" if FAST is not None else "python"
