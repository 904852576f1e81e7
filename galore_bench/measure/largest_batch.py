"""Before renting a GPU: does each run of a scenario fit a memory budget, and what is the largest batch (or the
longest sequence) that does?

The search runs on the estimate engine (closed form, instant, labelled an estimate); `confirm` re-checks the
answer with the simulate engine (the real step traced on fake tensors) at the value found and one step above it,
and replays that trace through the caching-allocator model: a GPU fails on reserved bytes, not allocated ones.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from galore_bench.errors import UserError
from galore_bench.measure import training
from galore_bench.measure.allocator import replay
from galore_bench.measure.estimate import estimate_run
from galore_bench.spec.scenario import MAX_TOKENS, RunSpec, Scenario

MAX_BATCH = 1 << 16
MAX_SEQ_LEN = 1 << 22  # 4M tokens: beyond every published context window
SEARCHES = ("batch_size", "seq_len")  # the train setting a fit search varies; the other stays the scenario's


def with_train(scenario: Scenario, **changes: Any) -> Scenario:
    return dataclasses.replace(scenario, train=dataclasses.replace(scenario.train, **changes))


def with_batch(scenario: Scenario, batch_size: int) -> Scenario:
    return with_train(scenario, batch_size=batch_size)


def search_limit(scenario: Scenario, search: str) -> int:
    """The largest value a search may try: the scenario's own bound on tokens per micro-batch, and a cap."""
    other = scenario.train.seq_len if search == "batch_size" else scenario.train.batch_size
    return min(MAX_BATCH if search == "batch_size" else MAX_SEQ_LEN, MAX_TOKENS // other)


def largest(scenario: Scenario, run: RunSpec, budget: int, search: str = "batch_size", multiple_of: int = 1) -> int:
    """The largest `train.<search>` (a multiple of `multiple_of`) whose estimated peak is within `budget`, the
    other train settings as the scenario has them (0: not even the smallest fits).

    Bisection is valid because every term of the estimate grows with the batch and the sequence length
    (activations, logits, attention's log-sum-exp) or does not depend on them (weights, gradients, states).
    """
    top = search_limit(scenario, search) // multiple_of

    def fits(steps: int) -> bool:
        return estimate_run(with_train(scenario, **{search: steps * multiple_of}), run).peak_bytes <= budget

    if top < 1 or not fits(1):
        return 0
    low, high = 1, 2
    while high < top and fits(high):
        low, high = high, high * 2
    if high >= top:
        if fits(top):
            return top * multiple_of
        high = top
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low * multiple_of


def largest_batch(scenario: Scenario, run: RunSpec, budget: int) -> int:
    """The largest per-device batch whose estimated peak is within `budget` (0: not even batch 1 fits)."""
    return largest(scenario, run, budget, "batch_size")


def longest_seq_len(scenario: Scenario, run: RunSpec, budget: int, multiple_of: int = 1) -> int:
    """The longest sequence (a multiple of `multiple_of`) at the scenario's batch whose estimated peak is within
    `budget` (0: none)."""
    return largest(scenario, run, budget, "seq_len", multiple_of)


TraceProgress = Callable[[str, str, int], None]


def _traced(scenario: Scenario, run: RunSpec, budget: int, search: str, value: int,
            tracing: TraceProgress | None = None) -> tuple[int, dict[str, Any]]:
    """Simulated peak at `train.<search> = value`, and that trace through the allocator model capped at `budget`."""
    if tracing is not None:  # seconds per trace at 7B: say what is being traced
        tracing(run.label, search, value)
    planned, steps = training.simulation_plan(scenario, run)
    tracker = training.train_steps(with_train(scenario, **{search: value}), planned, fake=True, device="cpu",
                                   steps=steps)["tracker"]
    return tracker.peak, replay(tracker.events or [], budget)


def largest_reserved(scenario: Scenario, run: RunSpec, budget: int, upper: int, search: str = "batch_size",
                     multiple_of: int = 1, tracing: TraceProgress | None = None) -> int:
    """The largest value below `upper` (where the allocator model ran out) that the model holds under the cap:
    bisection over traced steps (0: none). Fragmentation can make this smaller than the allocated answer."""
    low, high = 0, upper // multiple_of
    while high - low > 1:
        middle = (low + high) // 2
        held = _traced(scenario, run, budget, search, middle * multiple_of, tracing)[1]["out_of_memory"] is None
        low, high = (middle, high) if held else (low, middle)
    return low * multiple_of


def fit_rows(scenario: Scenario, budget: int, confirm: bool = False, tracing: TraceProgress | None = None,
             search: str = "batch_size", multiple_of: int = 1) -> list[dict[str, Any]]:
    """Per run: the estimated peak at the scenario's settings, the largest `search` value within budget, and
    (confirm) the simulated peaks there and one step (`multiple_of`) above, with the caching-allocator model's
    reserved bytes there (and, when the model runs out, the largest value it holds). Batch searches also keep
    their historical keys (largest_batch, largest_batch_reserved). A run the estimate refuses is a row with
    `refused` (the estimate's message) and nothing else; the other runs are still searched."""
    rows = []
    for run in scenario.runs:
        try:
            at_scenario = estimate_run(scenario, run)
        except UserError as refused:  # no closed form for this run (a method without terms, QLoRA on Phi-3)
            rows.append({"run": run.label, "model": run.model_name, "search": search, "refused": str(refused)})
            continue
        best = largest(scenario, run, budget, search, multiple_of)
        row: dict[str, Any] = {"run": run.label, "model": run.model_name, "estimate_bytes": at_scenario.peak_bytes,
                               "fits": at_scenario.peak_bytes <= budget, "search": search, "largest": best,
                               "estimate_at_largest_bytes": estimate_run(with_train(scenario, **{search: best}),
                                                                         run).peak_bytes if best else None}
        if confirm:
            row["simulate_above_largest_bytes"] = _traced(scenario, run, budget, search, best + multiple_of,
                                                          tracing)[0]
            row["simulate_at_largest_bytes"] = None
            if best:
                row["simulate_at_largest_bytes"], model = _traced(scenario, run, budget, search, best, tracing)
                row["allocator_model_at_largest"] = model  # reserved, and whether the cap holds (a model)
                if model["out_of_memory"]:
                    row["largest_reserved"] = largest_reserved(scenario, run, budget, best, search, multiple_of,
                                                               tracing)
        if search == "batch_size":
            row["largest_batch"] = best
            if "largest_reserved" in row:
                row["largest_batch_reserved"] = row["largest_reserved"]
        rows.append(row)
    return rows
