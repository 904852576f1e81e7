"""successors_7b: every run with estimate terms, its estimate within 2% of its simulate trace at LLaMA-7B.

Slow (a 7B trace is tens of seconds per run); the fast twins are tests/test_estimate.py's per-method checks at
tiny and 60M, which hold every registered method with estimate terms to the same 2%.
"""
from __future__ import annotations

import pytest

from galore_bench.measure import training
from galore_bench.measure.estimate import estimate_run
from galore_bench.methods import REGISTRY
from galore_bench.spec.scenario import load_scenario

SCENARIO = load_scenario("successors_7b")
TOLERANCE = 0.02


@pytest.mark.slow
@pytest.mark.parametrize("run", [r for r in SCENARIO.runs if REGISTRY[r.method].estimate is not None],
                         ids=lambda r: r.label)
def test_estimate_within_two_percent_of_simulate_at_7b(run):
    planned, steps = training.simulation_plan(SCENARIO, run)
    traced = training.train_steps(SCENARIO, planned, fake=True, device="cpu", steps=steps)["tracker"]
    guess = estimate_run(SCENARIO, run)
    assert traced.breakdown()["weights"] == 6_738_415_616 * 2
    checks = {"peak": (guess.peak_bytes, traced.peak)}
    checks |= {c: (guess.category_peaks[c], traced.category_peaks[c])
               for c in ("weights", "gradients", "optimizer_states", "activations")}
    off = {what: (ours - truth) / max(truth, 1) for what, (ours, truth) in checks.items()}
    assert all(abs(x) <= TOLERANCE for x in off.values()), off
