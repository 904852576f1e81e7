"""Before renting a GPU: does each run of a scenario fit a memory budget, and what is the largest batch that does?

The search runs on the estimate engine (closed form, instant, labelled an estimate); `confirm` re-checks the
answer with the simulate engine (the real step traced on fake tensors) at the batch found and one above it,
and replays that trace through the caching-allocator model: a GPU fails on reserved bytes, not allocated ones.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from galore_bench.measure import training
from galore_bench.measure.allocator import replay
from galore_bench.measure.estimate import estimate_run
from galore_bench.spec.scenario import RunSpec, Scenario

MAX_BATCH = 1 << 16


def with_batch(scenario: Scenario, batch_size: int) -> Scenario:
    return dataclasses.replace(scenario, train=dataclasses.replace(scenario.train, batch_size=batch_size))


def largest_batch(scenario: Scenario, run: RunSpec, budget: int) -> int:
    """The largest per-device batch whose estimated peak is within `budget` (0: not even batch 1 fits).

    Bisection is valid because every term of the estimate grows with the batch (activations, logits) or
    does not depend on it (weights, gradients, states).
    """
    def peak(batch: int) -> int:
        return estimate_run(with_batch(scenario, batch), run).peak_bytes

    if peak(1) > budget:
        return 0
    low, high = 1, 2
    while high < MAX_BATCH and peak(high) <= budget:
        low, high = high, high * 2
    if high >= MAX_BATCH and peak(MAX_BATCH) <= budget:
        return MAX_BATCH
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if peak(middle) <= budget else (low, middle)
    return low


TraceProgress = Callable[[str, int], None]


def _traced(scenario: Scenario, run: RunSpec, batch: int, budget: int,
            tracing: TraceProgress | None = None) -> tuple[int, dict[str, Any]]:
    """Simulated peak at `batch`, and that trace through the caching-allocator model capped at `budget`."""
    if tracing is not None:  # seconds per trace at 7B: say what is being traced
        tracing(run.label, batch)
    planned, steps = training.simulation_plan(run)
    tracker = training.train_steps(with_batch(scenario, batch), planned, fake=True, device="cpu",
                                   steps=steps)["tracker"]
    return tracker.peak, replay(tracker.events or [], budget)


def largest_batch_reserved(scenario: Scenario, run: RunSpec, budget: int, upper: int,
                           tracing: TraceProgress | None = None) -> int:
    """The largest batch below `upper` (where the allocator model ran out) that the model holds under the cap:
    bisection over traced steps (0: none). Fragmentation can make this smaller than the allocated answer."""
    low, high = 0, upper
    while high - low > 1:
        middle = (low + high) // 2
        held = _traced(scenario, run, middle, budget, tracing)[1]["out_of_memory"] is None
        low, high = (middle, high) if held else (low, middle)
    return low


def fit_rows(scenario: Scenario, budget: int, confirm: bool = False,
             tracing: TraceProgress | None = None) -> list[dict[str, Any]]:
    """Per run: the estimated peak at the scenario's batch, the largest batch within budget, and (confirm) the
    simulated peaks at that batch and one above, with the caching-allocator model's reserved bytes at it (and,
    when the model runs out there, the largest batch it holds)."""
    rows = []
    for run in scenario.runs:
        at_scenario = estimate_run(scenario, run)
        best = largest_batch(scenario, run, budget)
        row: dict[str, Any] = {"run": run.label, "model": run.model_name, "estimate_bytes": at_scenario.peak_bytes,
                               "fits": at_scenario.peak_bytes <= budget, "largest_batch": best,
                               "estimate_at_largest_bytes": estimate_run(with_batch(scenario, best), run).peak_bytes
                               if best else None}
        if confirm:
            row["simulate_above_largest_bytes"] = _traced(scenario, run, best + 1, budget, tracing)[0]
            row["simulate_at_largest_bytes"] = None
            if best:
                row["simulate_at_largest_bytes"], model = _traced(scenario, run, best, budget, tracing)
                row["allocator_model_at_largest"] = model  # reserved, and whether the cap holds (a model)
                if model["out_of_memory"]:
                    row["largest_batch_reserved"] = largest_batch_reserved(scenario, run, budget, best, tracing)
        rows.append(row)
    return rows
