"""Seeded random moments: a fault's or an action's ``at = "random(2s, 6s)"``.

An experiment such as the crash-consistency one (scenarios/crash-consistency.toml) must hit its
writer at moments nobody chose, yet be repeatable: the time is drawn from the scenario's
``seed`` (``[scenario]``, also ``mkctl run --seed``), uniformly between the two durations, to
the millisecond. Each item draws from a generator of its own, seeded by ``"SEED/NAME"``, so
adding, removing or reordering other items changes none of its draws; the same seed and name
give the same time on every machine and Python 3 version (``random.Random`` with a string seed
hashes it with SHA-512, not with ``hash()``). The drawn time replaces ``at`` before any other
check, so every rule (before the end of the run, ...) holds for the time actually used, and
the report keeps both: ``at`` (drawn) and ``at_random`` (the range).

Deliberately small: one distribution, one seed for the whole file. A later issue generalises
seeds (probes, payloads, several streams).
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

_RANDOM = re.compile(r"\s*random\s*\((?P<low>[^,()]*),(?P<high>[^,()]*)\)\s*")
EXPECTED = 'a duration like "1.5s", or random(LOW, HIGH) like "random(2s, 6s)"'


@dataclass(frozen=True)
class Draw:
    """``random(low, high)`` as written: seconds, low < high; drawn by ``resolve``."""

    low: float
    high: float


def timed(duration: Callable[[Any], float]) -> Callable[[Any], float | Draw]:
    """A checker for ``at``: a ``duration`` as before, or ``random(LOW, HIGH)`` of two."""
    def check(v: Any) -> float | Draw:
        if isinstance(v, str) and v.strip().startswith("random"):
            m = _RANDOM.fullmatch(v)
            if m is None:
                raise ValueError(EXPECTED)
            try:
                low, high = duration(m["low"].strip()), duration(m["high"].strip())
            except ValueError as exc:
                raise ValueError(f"random(LOW, HIGH) of two durations ({exc})") from None
            if not low < high:
                raise ValueError("random(LOW, HIGH) with LOW < HIGH")
            return Draw(low, high)
        try:
            return duration(v)
        except ValueError:
            raise ValueError(EXPECTED) from None
    return check


def draw(seed: int, name: str, low: float, high: float) -> float:
    """The moment item ``name`` fires for ``seed``: uniform in [low, high], to the ms."""
    return round(random.Random(f"{seed}/{name}").uniform(low, high), 3)


def resolve(problems: list[str], seed: int, items: list[tuple[str, dict[str, Any]]],
            duration_s: float) -> None:
    """Replace every ``Draw`` in the ``at`` of ``items`` (``(kind, table)`` pairs) by its
    drawn time, keeping the range as ``at_random``. A range that reaches the end of the run is
    a problem whatever the seed draws (so that ``--seed`` cannot make a valid file invalid)."""
    for kind, item in items:
        at = item.get("at")
        if not isinstance(at, Draw):
            continue
        if at.high >= duration_s:
            problems.append(f"[[{kind}]] {item.get('name')!r}: at = random({at.low:g}s, "
                            f"{at.high:g}s) reaches past the end of the run ({duration_s:g}s)")
        item["at"] = draw(seed, str(item.get("name")), at.low, min(at.high, duration_s))
        item["at_random"] = [at.low, at.high]
