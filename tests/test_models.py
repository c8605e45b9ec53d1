"""The Promela models of the ring's protocols (models/, docs/protocols.md), verified with SPIN
by tools/verify_models.py: every model holds, every mutant and every documented finding is
refuted. Skipped, saying what to install, where SPIN or a C compiler is missing; CI installs
SPIN (.ci/run), so there it runs."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from helpers import CPUS, up, wait_until
from ringtool import claim

from partition import linux
from partition.abi import message as M
from partition.abi.ring import DOORBELL_WAKE

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))

import verify_models  # noqa: E402

_MISSING = verify_models.missing_tools()


@pytest.mark.system
@pytest.mark.slow       # every SPIN search: 40 s on 2 cores
@pytest.mark.skipif(_MISSING is not None, reason=f"SPIN models not verified: {_MISSING}")
def test_every_model_holds_and_every_mutant_is_refuted() -> None:
    if os.environ.get("MK_MODELS_VERIFIED") == verify_models.inputs_digest():
        # .ci/run ran this very command on these very models minutes ago, and stops on its
        # failure: the same 22 searches again would be 25 s of CPU for nothing
        pytest.skip("verified earlier in this CI job: tools/verify_models.py passed on these "
                    "models (MK_MODELS_VERIFIED, .ci/run)")
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


@pytest.mark.system
@pytest.mark.skipif(_MISSING is not None, reason=f"SPIN models not verified: {_MISSING}")
def test_a_mutant_that_is_not_refuted_fails_the_run() -> None:
    """The runner's verdict, on real searches: the hand-over model run as if it were a mutant
    (a -D switch the model does not know: no error) is a failure; its real mutant passes."""
    inert = verify_models.Check("inert", "liveupdate.pml", ("NOT_A_SWITCH",), "mutant", "nothing")
    unrefuted = verify_models.verify(inert)
    assert unrefuted.errors == 0 and unrefuted.states > 0 and not unrefuted.ok
    mutant = next(c for c in verify_models.CHECKS if c.name == "liveupdate/reset-on-handover")
    result = verify_models.verify(mutant)
    assert result.errors == 1 and result.ok and "assertion violated" in result.detail
    assert "NOT REFUTED" in verify_models.table([unrefuted])      # the same search's verdict


# -- counterexamples replayed against the real code ----------------------------------------
# healing/sweep-no-doorbell and healing/no-stall-doorbell (models/healing.pml, -DSLEEPING) are
# the code as it was: SPIN's trails end with a tickless receiver asleep on its doorbell while a
# message waits behind a dead sender's claim at its ring's tail. Here the same steps run on a
# real machine: a tickless receiver (kernels.idle, idle_timeout None: only a doorbell wakes it,
# its safety-net timer is an hour), a claim at its tail left by a sender that is dead, a
# message behind it (the host's send rings the receiver, which drains up to the claim and
# sleeps again); the message must still be taken within a few seconds.

IDLE = "kernels.idle:IdleKernel"
IPI_KERNELS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "kernels", "ipi.py")


def _asleep_behind_the_claim(machine, ring):
    """The receiver woke for the message behind the claim, drained up to it, and sleeps."""
    wait_until(machine, lambda: ring.counters()["doorbells"] >= 1 and ring.receiver_idle()
               and ring.stalled() == ring.tail)


def test_a_dead_senders_swept_claim_wakes_a_tickless_receiver(machine):
    """The trail of healing/sweep-no-doorbell: the sender wrote its id, stalled, and died; the
    host marks its claim ABANDONED, and must ring the receiver, which sleeps behind it."""
    idle = up(machine, "idle", IDLE)
    ring = machine.ring_of(idle["id"])
    dies = up(machine, "dies", IPI_KERNELS + ":DiesMidSend", f"target={idle['id']}", cpu=CPUS[0])
    wait_until(machine, lambda: "stalling before publish" in machine.console("dies"))
    machine.send("idle", M.MK_MSG_USER, "behind the claim")
    _asleep_behind_the_claim(machine, ring)
    os.kill(dies["pid"], 9)
    machine.wait_for("dies", "loaded")
    wait_until(machine, lambda: ring.tail == ring.head, timeout=5)
    counters = ring.counters()
    assert counters["dropped_abandoned"] == 1 and counters["received"] == 1


def test_a_claim_dead_before_its_id_wakes_a_tickless_receiver_to_reclaim_it(machine):
    """The trail of healing/no-stall-doorbell: the claimer died before it wrote its id (here
    the claim is made by hand: a claim and nothing else is what such a death leaves), so no
    sweep can name it; only the receiver's abandon_after (1 s) reclaims it, and a tickless
    receiver must be woken for that."""
    idle = up(machine, "idle", IDLE)
    ring = machine.ring_of(idle["id"])
    claim(ring)                                 # claimed, nothing written: its claimer died
    machine.send("idle", M.MK_MSG_USER, "behind the claim")
    _asleep_behind_the_claim(machine, ring)
    wait_until(machine, lambda: ring.tail == ring.head, timeout=6)
    counters = ring.counters()
    assert counters["dropped_abandoned"] == 1 and counters["received"] == 1


def test_a_late_ring_of_the_old_kernels_doorbell_wakes_the_new_one(machine):
    """The trail of liveupdate/tickless: a sender's Port, bound to the old kernel, checked the
    peer entry before the host wrote the new pid, and publishes after the new kernel's last look
    before its sleep: it finds the receiver idle and writes the *old* kernel's doorbell (its copy
    of the ring end, as the host gave it), and leaves ``signaled`` set, so no later send rings either. Here the
    test plays that sender with a copy of the old ring end; the new kernel is tickless."""
    up(machine, "idle", IDLE)
    inst = machine.get("idle")
    late = os.dup(inst.doorbell_fd)              # the Port's copy of the old kernel's doorbell
    try:
        machine.live_update("idle", IDLE)
        ring = machine.ring_of(inst.id)
        wait_until(machine, lambda: ring.receiver_idle() and ring.tail == ring.head)
        taken = ring.counters()["received"]
        door = ring.send(0, 0, M.MK_MSG_USER, b"late")
        assert door == DOORBELL_WAKE             # it sleeps, nobody rang since its drain
        assert linux.ring_doorbell(late)        # a reader is there: the host's kept end
        wait_until(machine, lambda: ring.tail == ring.head, timeout=5)
        assert ring.counters()["received"] == taken + 1
    finally:
        os.close(late)
