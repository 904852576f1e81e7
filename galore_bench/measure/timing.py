"""Step times into throughput: the timer around each training step, and tokens/s over the typical steps.

Kept apart from the training loop (training.py): these turn a run's wall times into figures, whichever engine
ran the steps.
"""
from __future__ import annotations

import statistics
import time
from typing import Any

import torch


class StepTimer:
    """Wall time per step, synchronised on CUDA so queued kernels are counted."""

    def __init__(self, device: str) -> None:
        self.device, self.times, self._start = device, list[float](), 0.0

    def __enter__(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()
        self._start = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()
        self.times.append(time.perf_counter() - self._start)


def throughput(step_times: list[float], tokens_per_step: int, device: str,
               special_steps: dict[str, set[int]] | None = None, tracked: list[int] | None = None) -> dict[str, Any]:
    """Tokens/s and TGS: median and spread over the steps after the first (warm-up: kernels, state creation).

    Steps named in `special_steps` (e.g. GaLore's SVD refreshes) are left out of the median and reported
    as their own figure, so a periodic cost neither hides in nor distorts the typical step. Steps in `tracked`
    ran under the memory tracker: they are left out too (its dispatch slows every operator), and the median
    of those after warm-up over the untracked median is kept as the tracker's measured overhead.
    """
    special = special_steps or {}
    excluded = set().union(*special.values()) if special else set()
    under_tracker = set(tracked or ())
    timed_steps = [i for i in range(1, len(step_times)) if i not in excluded | under_tracker]
    timed = [step_times[i] for i in timed_steps]
    if not timed:  # every step after warm-up was special: no typical step to report
        return {"tokens_per_second": None, "tgs": None, "mfu": None, "step_seconds": step_times,
                **{f"{name}_steps": sorted(steps) for name, steps in special.items()}}
    median = statistics.median(timed)
    rate = tokens_per_step / median
    result: dict[str, Any] = {
        "tokens_per_second": rate, "tgs": rate, "mfu": None, "device_kind": device,
        "label": "CPU throughput (not a GPU figure)" if device == "cpu" else f"{device} throughput",
        "timed_steps": len(timed), "timed_step_indices": timed_steps, "step_seconds_median": median,
        "step_seconds": step_times, "step_seconds_spread": (max(timed) - min(timed)) if len(timed) > 1 else 0.0}
    for name, steps in special.items():
        times = [step_times[i] for i in sorted(steps) if 1 <= i < len(step_times)]
        result[f"{name}_step_seconds_median"] = statistics.median(times) if times else None
        result[f"{name}_steps"] = sorted(steps)
    if tracked is not None:
        result["tracker_overhead"] = tracker_overhead(step_times, under_tracker - excluded, timed_steps)
    return result


def tracker_overhead(step_times: list[float], tracked: set[int], untracked: list[int]) -> dict[str, Any]:
    """Median tracked step time over median untracked step time (warm-up step 0 left out of both)."""
    tracked_steps = sorted(i for i in tracked if 1 <= i < len(step_times))
    ratio = (statistics.median(step_times[i] for i in tracked_steps)
             / statistics.median(step_times[i] for i in untracked)) if tracked_steps and untracked else None
    return {"ratio": ratio, "tracked_steps": tracked_steps, "untracked_steps": untracked,
            "what": "median step time with the memory tracker on / off, same run (a measured ratio)"}
