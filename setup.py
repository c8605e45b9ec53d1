"""Only for the optional C half of the IPI ring (partition/abi/_fastring.c and the translation
units it names: _ring.c, _message.c, _port.c); everything else is in pyproject.toml.
``optional=True``: without a C compiler the install still succeeds and the ring runs its
pure-Python implementation (``mkctl bench ipi`` says which one it measured).

The extension carries one SHA-256 over all its sources (partition/abi/_*.c and _*.h, in name
order, each name then its bytes): partition/abi/impl.py refuses a stale build (a failed rebuild
leaves the previous .so in place, and ``optional=True`` says so only in a warning) and the tests
fail on one. impl.py computes the same digest the same way."""

import glob
import hashlib
import os

from setuptools import Extension, setup

_DIR = os.path.join("partition", "abi")
_FILES = sorted(glob.glob(os.path.join(_DIR, "_*.c")) + glob.glob(os.path.join(_DIR, "_*.h")),
                key=os.path.basename)
_digest = hashlib.sha256()
for _path in _FILES:
    with open(_path, "rb") as f:
        _digest.update(os.path.basename(_path).encode() + b"\0" + f.read())

setup(ext_modules=[Extension("partition.abi._fastring",
                             [p for p in _FILES if p.endswith(".c")], optional=True,
                             depends=[p for p in _FILES if p.endswith(".h")],
                             define_macros=[("FASTRING_SOURCE_SHA256",
                                             f'"{_digest.hexdigest()}"')],
                             extra_compile_args=["-O2", "-Wall", "-fvisibility=hidden"])])
