"""Only for the optional C fast path of the IPI ring (partition/abi/_fastring.c); everything else is
in pyproject.toml. ``optional=True``: without a C compiler the install still succeeds and the
ring runs its pure-Python implementation (``mkctl bench ipi`` says which one it measured).

The extension carries the SHA-256 of the source it was built from: ring.py refuses a stale
build (a failed rebuild leaves the previous .so in place, and ``optional=True`` says so only in
a warning) and the tests fail on one."""

import hashlib
import os

from setuptools import Extension, setup

_SOURCE = os.path.join("partition", "abi", "_fastring.c")
with open(_SOURCE, "rb") as f:
    _DIGEST = hashlib.sha256(f.read()).hexdigest()

setup(ext_modules=[Extension("partition.abi._fastring", [_SOURCE], optional=True,
                             define_macros=[("FASTRING_SOURCE_SHA256", f'"{_DIGEST}"')],
                             extra_compile_args=["-O2", "-Wall"])])
