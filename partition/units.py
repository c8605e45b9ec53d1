"""Parsing and printing of the two quantities users type: memory sizes and CPU lists.

Both follow the kerf/cpuset conventions (``8GB`` means 8 GiB, ``1-3,5`` is a CPU list) so that
command lines move between the emulator and the real tool unchanged.
"""

from __future__ import annotations

import math
import re

from partition.errors import InvalidSpec

PAGE_SIZE = 4096

_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_SIZE_RE = re.compile(r"^\s*(\d+)\s*([kmgt]?)(i?b)?\s*$", re.IGNORECASE)
_BYTES_RE = re.compile(r"^\s*\d+\s*$")

#: the largest size a machine (its pool, an instance) may have: half of x86-64's 128 TiB of
#: user address space, since the host maps the whole arena at once. Checked here, where a size
#: is read, so that 10**30 G is refused by name instead of failing the arena's mmap, or
#: overflowing the off_t of its ftruncate, far away in a supervisor being started.
MAX_SIZE = 1 << 46


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
                f"cannot parse {what} size {str(text)[:40]!r}",
                "write a byte count with an optional unit, e.g. 4096, 64K, 256M, 8G",
            )
        # a number of more digits than any size has is refused before int() reads it (a
        # 5000-digit one would be int()'s ValueError, not ours)
        digits = m.group(1).lstrip("0") or "0"
        value = int(digits) * _UNITS[m.group(2).lower()] if len(digits) <= 20 else MAX_SIZE + 1
    if value <= 0:
        raise InvalidSpec(f"{what} size must be greater than zero, got {text!r}",
                          "give at least one 4 KiB page, e.g. 4K")
    if value > MAX_SIZE:
        shown = str(text) if len(str(text)) <= 40 else str(text)[:37] + "..."
        raise InvalidSpec(f"{what} size {shown} is beyond what one machine can map (at most "
                          f"{format_size(MAX_SIZE)})", f"give at most {format_size(MAX_SIZE)}, "
                                                       "e.g. 1G")
    return value


def require_page_aligned(nbytes: int, what: str = "memory",
                         typed: str | int | None = None) -> None:
    """``typed``: the size as the user wrote it. A small number without a unit (``64``) is a
    byte count that was almost always meant in MiB: the fix says so (64M), not "use 4K"."""
    if nbytes % PAGE_SIZE:
        lo = nbytes - nbytes % PAGE_SIZE
        unitless = not isinstance(typed, bool) and (
            isinstance(typed, int) or (isinstance(typed, str) and bool(_BYTES_RE.match(typed))))
        if unitless and nbytes < 1 << 16:
            hint = (f"a size without a unit is a number of bytes: did you mean {nbytes}M? "
                    f"(write the unit: {nbytes}K, {nbytes}M or {nbytes}G)"
                    + ("; as bytes, 4K (the smallest size)" if not lo else ""))
        elif lo:
            hint = f"use {format_size(lo)} or {format_size(lo + PAGE_SIZE)}"
        else:
            hint = f"use {format_size(PAGE_SIZE)} (the smallest size), or a multiple of it"
        raise InvalidSpec(
            f"{what} size {nbytes} bytes is not a multiple of the 4 KiB page size", hint)


def format_size(nbytes: int) -> str:
    """Shortest exact binary-unit spelling: 268435456 -> '256M', 12288 -> '12K'."""
    for unit, factor in (("T", 1 << 40), ("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if nbytes and nbytes % factor == 0:
            return f"{nbytes // factor}{unit}"
    return f"{nbytes}B"


#: CPU numbers are below this (Linux's largest NR_CPUS); checked before a range is expanded
MAX_CPUS = 8192


def parse_cpulist(text: str | list[int] | tuple[int, ...], what: str = "CPU list") -> list[int]:
    """Parse ``1-3,5`` (cpuset syntax) or a list of ints into a sorted list without repeats.
    Every number is checked against MAX_CPUS before any range is expanded: ``1-100000000``
    is refused at once instead of building a list of a hundred million CPUs."""
    if isinstance(text, (list, tuple)):
        if len(text) > MAX_CPUS:
            raise InvalidSpec(f"{what} names {len(text)} CPUs, more than any machine has "
                              f"({MAX_CPUS})", "give the CPUs of this machine (nproc)")
        cpus: set[int] = set()
        for c in text:
            if isinstance(c, bool) or not isinstance(c, int) or not 0 <= c < MAX_CPUS:
                raise InvalidSpec(f"bad CPU number {c!r} in {what}",
                                  f"CPU numbers are integers in 0..{MAX_CPUS - 1}")
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
            if len(m.group(1)) > 6 or len(m.group(2) or "") > 6:
                raise InvalidSpec(f"CPU number in {part!r} of {what} is beyond any machine "
                                  f"(CPUs are 0..{MAX_CPUS - 1})", "give the CPUs of this machine")
            lo = int(m.group(1))
            hi = int(m.group(2)) if m.group(2) is not None else lo
            if hi >= MAX_CPUS:
                raise InvalidSpec(f"CPU {hi} in {what} is beyond any machine (CPUs are "
                                  f"0..{MAX_CPUS - 1})", "give the CPUs of this machine (nproc)")
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


def seconds(value: object, what: str, lo: float, hi: float, *, lo_open: bool = True) -> float:
    """A time in seconds, checked: a real number (not a bool), finite, in ``(lo, hi]`` (or
    ``[lo, hi]`` with ``lo_open=False``). NaN and the infinities are refused by name: a NaN
    compares false with everything, so a plain range check would let it through."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidSpec(f"{what} must be a number of seconds, got {value!r}", f"e.g. {what}=5")
    v = float(value)
    if not math.isfinite(v):
        raise InvalidSpec(f"{what} must be a finite number of seconds, got {value!r}",
                          f"e.g. {what}=5")
    if (v <= lo if lo_open else v < lo) or v > hi:
        bound = f"({lo:g}, {hi:g}]" if lo_open else f"[{lo:g}, {hi:g}]"
        raise InvalidSpec(f"{what} must be in {bound} seconds, got {value!r}", f"e.g. {what}=5")
    return v
