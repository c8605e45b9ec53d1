"""pytest plugin (registered as ``multikernel``): experiments as ordinary pytest tests.

Fixtures:
- ``machine``: a fresh in-process Machine on every CPU this process may use, host on CPU 0,
  **oversubscribed** (instances may share cores; on a 2-core workstation there is no other way to
  run two instances). Torn down after the test, whatever happened in it.
- ``machine_factory``: build machines with your own arguments; all are torn down.
- ``run_scenario``: run a scenario (a path, or TOML text) and get its ``RunResult``; assert on
  ``result.passed``, ``result.metrics[...]`` or ``result.expectations``. The machine it builds
  is torn down before the result is returned.

Teardown also checks that nothing leaked: no child process of the test is left behind.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

import psutil
import pytest

from partition.host.machine import Machine


@pytest.fixture
def machine_factory() -> Iterator[Callable[..., Machine]]:
    made: list[Machine] = []

    def make(**kwargs: Any) -> Machine:
        m = Machine(**kwargs)
        made.append(m)
        return m

    try:
        yield make
    finally:
        for m in made:
            m.close(timeout=2.0)
        leftovers = psutil.Process().children(recursive=True)
        if leftovers:
            for p in leftovers:
                p.kill()
            pytest.fail(f"machine left processes behind: {[p.pid for p in leftovers]}")


@pytest.fixture
def machine(machine_factory: Callable[..., Machine]) -> Machine:
    cpus = sorted(os.sched_getaffinity(0))
    return machine_factory(cpus=cpus, memory="256M", host_cpus=[cpus[0]], oversubscribe=True)


@pytest.fixture
def run_scenario(tmp_path: Any) -> Callable[..., Any]:
    from partition import scenario

    def run(source: str) -> Any:
        """``source``: a scenario file, or TOML text (anything containing a newline)."""
        if "\n" in source:
            path = tmp_path / "scenario.toml"
            path.write_text(source)
            source = str(path)
        return scenario.run(scenario.load(source))
    return run
