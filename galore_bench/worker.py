"""One run in its own process: fresh peak counters, and a crash here cannot take the sweep down.

Started by the runner from a fork server that has already imported torch and transformers (a new
interpreter would spend ~8 s importing them per run); reports each step and the record it wrote.
"""
from __future__ import annotations

import dataclasses
import os
import resource
import signal
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from galore_bench import engine
from galore_bench.models import parameter_count
from galore_bench.record import empty_record, write_record
from galore_bench.scenario import RunSpec, Scenario, load_scenario
from galore_bench.units import format_bytes

FAULT_ENV = "GALORE_BENCH_FAULT"  # test hook: "kill:<run label>" makes that run die mid-way (SIGKILL)
CPU_MEASURE_MAX_PARAMS = 200_000_000  # beyond this, real CPU steps take minutes: auto simulates instead


def resolve_mode(requested: str, run: RunSpec, device: str) -> str:
    """auto: real steps when the device can hold and run them in reasonable time, else fake-tensor trace."""
    if requested != "auto":
        return requested
    if device == "cuda":
        return "measure"
    return "measure" if parameter_count(run.model) <= CPU_MEASURE_MAX_PARAMS else "simulate"


class _Reporter:
    """Sends progress and the final record path to the parent over a pipe."""

    def __init__(self, conn: Any) -> None:
        self.conn = conn

    def __call__(self, **message: Any) -> None:
        self.conn.send(message)


_emit: Callable[..., None] = lambda **message: None


_FAULT: str | None = None


def _maybe_fault(run: RunSpec, step: int) -> None:
    if _FAULT == f"kill:{run.label}" and step >= 1:
        os.kill(os.getpid(), signal.SIGKILL)


def execute(scenario: Scenario, run: RunSpec, mode: str, steps: int | None) -> dict[str, Any]:
    """Run one method and return its record (status oom/error instead of raising)."""
    device = engine.pick_device()
    mode = resolve_mode(mode, run, device)
    record = empty_record(scenario.to_dict(), {"label": run.label, "method": run.method, "options": run.options},
                          mode, engine.device_name(device) if mode == "measure" else "cpu")
    if mode == "simulate":
        record["device"] = f"simulated-{engine.device_name(device)}"
    record["model"].update(name=run.model_name, shape=dataclasses.asdict(run.model),
                           parameters=parameter_count(run.model))
    started = time.perf_counter()
    try:
        _train(record, scenario, run, mode, device, steps)
        record["status"] = "ok"
    except torch.OutOfMemoryError as exc:
        record["status"] = "oom"
        record["error"] = f"OOM at {format_bytes(torch.cuda.max_memory_allocated())}: {str(exc).splitlines()[0]}"
    except Exception as exc:  # a failing method is a result of the sweep, not the end of it
        record["error"] = f"{type(exc).__name__}: {exc}"
        record["traceback"] = traceback.format_exc()
    record["wall_seconds"] = time.perf_counter() - started
    # host memory of this run's process (for simulate: the cost of tracing on this machine)
    record["host_peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    peak, budget = record["memory"].get("peak_bytes"), scenario.budget_bytes
    if budget is not None:
        if record["status"] == "oom":
            record["budget"]["fits"] = False
        elif peak is not None:
            record["budget"]["fits"] = peak <= budget
    return record


def _train(record: dict[str, Any], scenario: Scenario, run: RunSpec, mode: str, device: str,
           steps: int | None) -> None:
    fake = mode == "simulate"
    n_steps = engine.SIMULATE_STEPS if fake else max(2, steps or scenario.train.steps)
    if device == "cuda" and scenario.budget_bytes and not fake:
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, scenario.budget_bytes / total))

    def progress(done: int, total: int) -> None:
        _emit(step=done, of=total)
        _maybe_fault(run, done)

    result = engine.train_steps(scenario, run, fake=fake, device=device if not fake else "cpu", steps=n_steps,
                                progress=progress)
    tracker, model = result["tracker"], result["model"]
    breakdown = tracker.breakdown()
    memory: dict[str, Any] = {"peak_bytes": tracker.peak, "breakdown": breakdown, "source": "tracker",
                              "steady_state_from_step": 2}
    if result["cuda"]:
        allocated = result["cuda"]["allocated_bytes"]
        breakdown["other"] += allocated - tracker.peak  # allocator blocks the tracker did not attribute
        memory.update(peak_bytes=allocated, source="torch.cuda.memory_stats", cuda=result["cuda"],
                      tracker_peak_bytes=tracker.peak)
    elif not fake:
        import psutil

        memory["process_rss_bytes"] = psutil.Process().memory_info().rss
    record["memory"] = memory
    record["model"]["trainable_parameters"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    record["method"]["implementation"] = result["trainer_info"]
    if not fake:
        tokens = scenario.train.batch_size * scenario.train.seq_len * scenario.train.grad_accum
        record["throughput"] = engine.throughput(result["step_times"], tokens, device)
        record["quality"]["losses"] = result["losses"]
        record["quality"]["final_loss"] = result["losses"][-1] if result["losses"] else None


def child_main(request: dict[str, Any], conn: Any, stderr_path: str) -> None:
    """Entry point of the run's own process (started from the runner's fork server)."""
    global _emit, _FAULT
    with open(stderr_path, "w") as err:
        os.dup2(err.fileno(), 2)
    sys.stderr = open(2, "w", closefd=False)
    _emit, _FAULT = _Reporter(conn), request.get("fault")
    torch.set_num_threads(request.get("threads") or torch.get_num_threads())
    scenario = load_scenario(request["scenario"])
    run = scenario.runs[request["run_index"]]
    record = execute(scenario, run, request["mode"] or scenario.mode, request.get("steps"))
    path = write_record(record, Path(request["out"]))
    _emit(record=str(path), status=record["status"])
    conn.close()
