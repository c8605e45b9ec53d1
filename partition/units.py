"""Parsing and printing of the two quantities users type: memory sizes and CPU lists.

Both follow the kerf/cpuset conventions (``8GB`` means 8 GiB, ``1-3,5`` is a CPU list) so that
command lines move between the emulator and the real tool unchanged.
"""

from __future__ import annotations

import re

from partition.errors import InvalidSpec

PAGE_SIZE = 4096

_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_SIZE_RE = re.compile(r"^\s*(\d+)\s*([kmgt]?)(i?b)?\s*$", re.IGNORECASE)


def parse_size(text: str | int, what: str = "memory") -> int:
    """Parse ``4096``, ``64K``, ``256M``, ``8GB``, ``1GiB`` into bytes (binary units)."""
    if isinstance(text, bool):
        raise InvalidSpec(f"{what} size must be a number of bytes, got {text!r}")
    if isinstance(text, int):
        value = text
    else:
        m = _SIZE_RE.match(str(text))
        if not m:
            raise InvalidSpec(
                f"cannot parse {what} size {text!r}",
                "write a byte count with an optional unit, e.g. 4096, 64K, 256M, 8G",
            )
        value = int(m.group(1)) * _UNITS[m.group(2).lower()]
    if value <= 0:
        raise InvalidSpec(f"{what} size must be greater than zero, got {text!r}",
                          "give at least one 4 KiB page, e.g. 4K")
    return value


def require_page_aligned(nbytes: int, what: str = "memory") -> None:
    if nbytes % PAGE_SIZE:
        lo = nbytes - nbytes % PAGE_SIZE
        raise InvalidSpec(
            f"{what} size {nbytes} bytes is not a multiple of the 4 KiB page size",
            f"use {format_size(lo) if lo else '4K'} or {format_size(lo + PAGE_SIZE)}",
        )


def format_size(nbytes: int) -> str:
    """Shortest exact binary-unit spelling: 268435456 -> '256M', 12288 -> '12K'."""
    for unit, factor in (("T", 1 << 40), ("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if nbytes and nbytes % factor == 0:
            return f"{nbytes // factor}{unit}"
    return f"{nbytes}B"


def parse_cpulist(text: str | list[int] | tuple[int, ...], what: str = "CPU list") -> list[int]:
    """Parse ``1-3,5`` (cpuset syntax) or a list of ints into a sorted list without repeats."""
    if isinstance(text, (list, tuple)):
        cpus: set[int] = set()
        for c in text:
            if isinstance(c, bool) or not isinstance(c, int) or c < 0:
                raise InvalidSpec(f"bad CPU number {c!r} in {what}", "CPU numbers are integers >= 0")
            cpus.add(c)
    else:
        cpus = set()
        s = str(text).strip()
        if not s:
            raise InvalidSpec(f"empty {what}", "give CPUs like 1 or 1-3,5")
        for part in s.split(","):
            part = part.strip()
            m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
            if not m:
                raise InvalidSpec(f"cannot parse {what} {text!r} at {part!r}",
                                  "use cpuset syntax, e.g. 1 or 1-3,5")
            lo = int(m.group(1))
            hi = int(m.group(2)) if m.group(2) is not None else lo
            if hi < lo:
                raise InvalidSpec(f"descending range {part!r} in {what}", f"write {hi}-{lo}")
            cpus.update(range(lo, hi + 1))
    if not cpus:
        raise InvalidSpec(f"empty {what}", "give CPUs like 1 or 1-3,5")
    return sorted(cpus)


def format_cpulist(cpus: list[int] | set[int] | tuple[int, ...]) -> str:
    """Inverse of parse_cpulist: [1,2,3,5] -> '1-3,5'; [] -> '' ."""
    out: list[str] = []
    items = sorted(set(cpus))
    i = 0
    while i < len(items):
        j = i
        while j + 1 < len(items) and items[j + 1] == items[j] + 1:
            j += 1
        out.append(str(items[i]) if i == j else f"{items[i]}-{items[j]}")
        i = j + 1
    return ",".join(out)
