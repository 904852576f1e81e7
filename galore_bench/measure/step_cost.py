"""Step-time cost of each method relative to a reference (AdamW), measured interleaved in one process.

Every method gets its own copy of the same model (same seed) and the same batches; the methods then take turns,
a block of `steps` steps each, the order rotated every round, so a busy neighbour or a frequency change slows
all of them alike instead of whichever happened to run then. The ratio is of medians over all timed steps.

A method with a periodic extra step (GaLore's projector refresh, every `update_proj_gap` steps) is timed twice:
as configured, where the refresh steps are left out of its median, and as a probe that refreshes on every
step. The probe's median minus the plain median is one refresh's cost; divided by update_proj_gap it is what
the refresh adds to an average step, shown apart from the typical step and then added for the amortised ratio.
"""
from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Any

import torch

from galore_bench.measure.tracker import MemoryTracker
from galore_bench.measure.training import build_trainer, training_batches
from galore_bench.methods import REGISTRY, Trainer
from galore_bench.spec.scenario import RunSpec, Scenario

PROBE_SUFFIX = "+refresh-every-step"


def refresh_probe(run: RunSpec) -> RunSpec | None:
    """The run refreshing its projectors on every step, for a method with a periodic refresh; else None."""
    if REGISTRY[run.method].periodic_steps is None or "update_proj_gap" not in run.options:
        return None
    return dataclasses.replace(run, options={**run.options, "update_proj_gap": 1}, label=run.label + PROBE_SUFFIX)


def _periodic(run: RunSpec, total: int) -> set[int]:
    """Steps of a plainly configured run that do the periodic extra work (left out of its median)."""
    steps_of = REGISTRY[run.method].periodic_steps
    if steps_of is None or run.label.endswith(PROBE_SUFFIX):
        return set()
    return set().union(*steps_of(run.options, total).values())


def _step(trainer: Trainer, batch: torch.Tensor, step: int) -> None:
    loss = trainer.model(input_ids=batch, labels=batch, use_cache=False).loss
    trainer.backward(loss)
    trainer.update(step)


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def interleaved_cost(scenario: Scenario, runs: list[RunSpec], reference: str, rounds: int,
                     steps: int) -> dict[str, dict[str, Any]]:
    """label -> the `throughput.interleaved` section of that run's record (the probes fold into their run's)."""
    if reference not in [run.label for run in runs]:
        raise ValueError(f"the reference run {reference!r} is not among {[run.label for run in runs]}")
    timed = list(runs) + [probe for run in runs if (probe := refresh_probe(run)) is not None]
    trainers: dict[str, Trainer] = {}
    for run in timed:
        tracker = MemoryTracker(round_to=1)
        trainers[run.label] = build_trainer(scenario, run, "cpu", tracker, None)
        tracker.unwatch()  # its gradient hooks would be timed with the step
    batches = training_batches(scenario, runs[0].model.vocab_size).forever()
    total = 1 + rounds * steps
    periodic = {run.label: _periodic(run, total) for run in timed}
    first = next(batches)
    for trainer in trainers.values():  # step 0: optimizer states created, GaLore's first SVD; not timed
        _step(trainer, first, 0)
    wall: dict[str, list[float]] = {label: [] for label in trainers}
    cpu: dict[str, list[float]] = {label: [] for label in trainers}
    labels = list(trainers)
    for r in range(rounds):
        block = [next(batches) for _ in range(steps)]
        for label in labels[r % len(labels):] + labels[:r % len(labels)]:
            for k, batch in enumerate(block):
                step = 1 + r * steps + k
                started, started_cpu = time.perf_counter(), time.process_time()
                _step(trainers[label], batch, step)
                if step not in periodic[label]:
                    wall[label].append(time.perf_counter() - started)
                    cpu[label].append(time.process_time() - started_cpu)
    ref_wall, ref_cpu = _median(wall[reference]), _median(cpu[reference])
    result: dict[str, dict[str, Any]] = {}
    for run in runs:
        median, median_cpu = _median(wall[run.label]), _median(cpu[run.label])
        refresh, amortised = None, median
        if (probe := refresh_probe(run)) is not None and median is not None:
            every = _median(wall[probe.label])
            gap = int(run.options["update_proj_gap"])
            extra = max(0.0, (every or median) - median)
            amortised = median + extra / gap
            refresh = {"update_proj_gap": gap, "refresh_step_seconds_median": every, "refresh_extra_seconds": extra,
                       "amortised_extra_seconds": extra / gap, "ratio_amortised": amortised / ref_wall
                       if ref_wall else None, "probe": probe.label}
        result[run.label] = {
            "reference": reference, "ratio": median / ref_wall if median and ref_wall else None,
            "ratio_cpu": median_cpu / ref_cpu if median_cpu and ref_cpu else None,
            "step_seconds_median": median, "refresh": refresh, "rounds": rounds, "steps_per_round": steps,
            "order": labels, "timed_steps": len(wall[run.label]),
            "amortised_step_seconds": amortised}
    return result
