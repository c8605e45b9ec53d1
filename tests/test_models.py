"""The Promela models of the ring's protocols (models/, docs/protocols.md), verified with SPIN
by tools/verify_models.py: every model holds, every mutant and every documented finding is
refuted. Skipped, saying what to install, where SPIN or a C compiler is missing; CI installs
SPIN (.ci/run), so there it runs."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))

import verify_models  # noqa: E402

_MISSING = verify_models.missing_tools()


@pytest.mark.skipif(_MISSING is not None, reason=f"SPIN models not verified: {_MISSING}")
def test_every_model_holds_and_every_mutant_is_refuted() -> None:
    run = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "verify_models.py")],
                         capture_output=True, text=True, timeout=600, check=False)
    assert run.returncode == 0, run.stdout + run.stderr
    for check in verify_models.CHECKS:
        assert check.name in run.stdout


def test_each_model_has_a_mutant_and_names_the_code_it_mirrors() -> None:
    """A model no mutant is checked against could be one that cannot fail; a model that does
    not say which code it mirrors cannot be kept in step with it."""
    models = {c.model for c in verify_models.CHECKS}
    assert models == {f for f in os.listdir(verify_models.MODELS) if f.endswith(".pml")}
    for model in models:
        kinds = {c.kind for c in verify_models.CHECKS if c.model == model}
        assert {"model", "mutant"} <= kinds, model
        with open(os.path.join(verify_models.MODELS, model)) as f:
            text = f.read()
        for check in verify_models.CHECKS:
            if check.model == model:
                for define in check.defines:
                    assert define in text, (model, define)
        assert "_fastring.c" in text or "ring.py" in text, model


def test_a_mutant_that_is_not_refuted_fails_the_run() -> None:
    """The runner's verdict itself: a mutant with no error is a failure, a model with one too."""
    check = verify_models.CHECKS[1]
    assert check.kind == "mutant"
    assert not verify_models.Result(check, 0, 10, 0.1, "").ok
    assert verify_models.Result(check, 1, 10, 0.1, "").ok
    model = verify_models.CHECKS[0]
    assert model.kind == "model"
    assert not verify_models.Result(model, 1, 10, 0.1, "").ok
    assert not verify_models.Result(model, -1, 0, 0.1, "depth").ok
