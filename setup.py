"""Only for the optional C fast path of the IPI ring (partition/_fastring.c); everything else is
in pyproject.toml. ``optional=True``: without a C compiler the install still succeeds and the
ring runs its pure-Python implementation (``mkctl bench ipi`` says which one it measured)."""

from setuptools import Extension, setup

setup(ext_modules=[Extension("partition._fastring", ["partition/_fastring.c"], optional=True,
                             extra_compile_args=["-O2", "-Wall"])])
