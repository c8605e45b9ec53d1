"""Scenarios: declarative experiments with a verdict, a report and a picture (``mkctl run``).

Public API: ``load`` a file into a checked ``Scenario``, ``run`` it into a ``RunResult``.
"""

from partition.scenario.runner import Runner, RunResult
from partition.scenario.schema import Scenario, ScenarioInvalid, check, load


def run(scenario: Scenario, progress=None) -> RunResult:   # type: ignore[no-untyped-def]
    """Run a checked scenario on a fresh machine, torn down afterwards whatever happens."""
    return Runner(scenario, progress).run()


__all__ = ["RunResult", "Runner", "Scenario", "ScenarioInvalid", "check", "load", "run"]
