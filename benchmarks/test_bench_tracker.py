"""What the memory tracker costs a training step: tracked / untracked step time, on one CPU thread.

The tracker (a TorchDispatchMode) sees every operator in Python; `measure` therefore times its steps with the
tracker off (issue 21) and keeps the ratio measured in the run itself (`throughput.tracker_overhead`). This
benchmark gives the same ratio on its own: two identical AdamW trainers, one stepping under the tracker, the
other not, alternating step by step so machine noise hits both alike; the ratio of medians is printed and kept
in extra_info. A small model (many small operators) shows the tracker's share at its largest; `wide` is a
larger one where the operators' own work dominates (slow: `-m slow`).
Run: python -m pytest -q -s benchmarks/test_bench_tracker.py -p no:cacheprovider --benchmark-enable
"""
from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from bench_threads import one_thread  # noqa: F401 (a fixture, requested by name)
from test_bench_overheads import ROUNDS
from test_bench_overheads import _time_pairs as time_pairs

from galore_bench.measure.tracker import MemoryTracker
from galore_bench.models import ModelShape, build_model

SHAPES = {"small": ModelShape(64, 172, 2, 4, 512, source="benchmark model"),
          "wide": ModelShape(512, 1376, 2, 8, 4096, source="benchmark model")}


pytestmark = pytest.mark.usefixtures("one_thread")  # one intra-op thread (bench_threads.py)


def _trainer(shape: ModelShape, tracker: MemoryTracker | None) -> Callable[[], None]:
    """One AdamW training step of a fresh model, under `tracker` when given (its hooks on the model too)."""
    model = build_model(shape, "fp32", seed=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(0, shape.vocab_size, (2, 64), generator=torch.Generator().manual_seed(1))
    if tracker is not None:
        tracker.watch_model(model)

    def step() -> None:
        def run() -> None:
            model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        if tracker is None:
            run()
            return
        with tracker:
            run()

    step()  # warm-up: optimizer states, first-call costs
    return step


@pytest.mark.parametrize("size", ["small", pytest.param("wide", marks=pytest.mark.slow)])
def test_bench_tracker_overhead(benchmark, size):
    tracker = MemoryTracker(round_to=1)
    steps = {"tracked": _trainer(SHAPES[size], tracker), "untracked": _trainer(SHAPES[size], None)}
    medians = time_pairs(benchmark, steps)  # alternating pairs, as the other overhead benchmarks time them
    ratio = medians["tracked"] / medians["untracked"]
    benchmark.extra_info["tracked_over_untracked"] = ratio
    print(f"\n{size}: tracked / untracked step time = {ratio:.3f} (median of {ROUNDS + 5} pairs)")
    assert tracker.peak > 0  # the tracked side really ran under the tracker
    assert ratio > 1.0  # the tracker's dispatch only adds work
