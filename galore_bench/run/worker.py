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

import psutil
import torch

from galore_bench.data import data_info, evaluate_perplexity
from galore_bench.measure import flops, training
from galore_bench.measure.allocator import replay
from galore_bench.measure.estimate import estimate_run
from galore_bench.methods import REGISTRY
from galore_bench.models import parameter_count
from galore_bench.record import empty_record, record_path, write_record
from galore_bench.spec.scenario import RunSpec, Scenario, load_scenario
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


def execute(scenario: Scenario, run: RunSpec, mode: str, steps: int | None,
            snapshot_dir: Path | None = None) -> dict[str, Any]:
    """Run one method and return its record (status oom/error instead of raising).

    `snapshot_dir`: also write the CUDA caching allocator's memory snapshot (measure on CUDA only) beside the
    record there, for PyTorch's memory_viz.
    """
    device = training.pick_device()
    mode = resolve_mode(mode, run, device)
    record = new_record(scenario, run, mode, training.record_device(mode, device))
    started = time.perf_counter()
    try:
        if mode == "estimate":
            _estimate(record, scenario, run)
        else:
            snapshot = record_path(snapshot_dir, record).with_suffix(".snapshot.pickle") if snapshot_dir else None
            _train(record, scenario, run, mode, device, steps, snapshot)
        record["status"] = "ok"
    except torch.OutOfMemoryError as exc:
        record["status"] = "oom"
        at = f" at {format_bytes(torch.cuda.max_memory_allocated())}" if device == "cuda" else ""
        record["error"] = f"OOM{at}: {str(exc).splitlines()[0]}"
    except Exception as exc:  # noqa: BLE001 - a failing method is a result of the sweep, not the end of it
        record["error"] = f"{type(exc).__name__}: {exc}"
        record["traceback"] = traceback.format_exc()
    return close_record(record, scenario, started)


def new_record(scenario: Scenario, run: RunSpec, mode: str, device: str) -> dict[str, Any]:
    """The record skeleton of one run, with its model's size (single-device and distributed runs alike)."""
    record = empty_record(scenario.to_dict(), {"label": run.label, "method": run.method, "options": run.options},
                          mode, device)
    record["model"].update(name=run.model_name, shape=dataclasses.asdict(run.model),
                           parameters=parameter_count(run.model))
    record["quality"]["data"] = scenario.data
    return record


def died_record(scenario: Scenario, run: RunSpec, mode: str, error: str, out: Path) -> Path:
    """The record of a run whose process died (killed, segfault, a failed job): the sweep records it and goes on."""
    record = new_record(scenario, run, mode, "unknown")
    record["error"] = error
    return write_record(record, out)


def child_io(stderr_path: str, threads: int | None) -> None:
    """A run's own process: stderr into the file the parent reads back, the thread count it was given."""
    with open(stderr_path, "w") as err:
        os.dup2(err.fileno(), 2)
    sys.stderr = open(2, "w", closefd=False)  # noqa: SIM115 - lives as long as the process
    torch.set_num_threads(threads or torch.get_num_threads())


def close_record(record: dict[str, Any], scenario: Scenario, started: float) -> dict[str, Any]:
    """Wall time, this process's host memory (for simulate: the cost of tracing here), the budget verdict."""
    record["wall_seconds"] = time.perf_counter() - started
    record["host_peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    peak, budget = record["memory"].get("peak_bytes"), scenario.budget_bytes
    if budget is not None:
        ok = record["status"] == "ok" and peak is not None
        record["budget"]["fits"] = False if record["status"] == "oom" else (peak <= budget if ok else None)
    return record


def _estimate_fields(scenario: Scenario, run: RunSpec, target: str = "gpu") -> dict[str, Any]:
    """The closed-form estimate as a record stores it (labelled an estimate; tests hold it to simulate)."""
    result = estimate_run(scenario, run, target)
    return {"peak_bytes": result.peak_bytes, "breakdown": result.breakdown, "category_peaks": result.category_peaks,
            "peak_moment": result.moment, "moments": result.moments, "terms": result.terms, "target": target}


def _estimate(record: dict[str, Any], scenario: Scenario, run: RunSpec) -> None:
    fields = _estimate_fields(scenario, run)
    record["memory"] = {"peak_bytes": fields["peak_bytes"], "breakdown": fields["breakdown"],
                        "category_peaks": fields["category_peaks"], "source": "estimate (closed-form formulas)",
                        "estimate": fields}


def _cross_check(record: dict[str, Any], key: str, compute: Callable[[], Any]) -> Any:
    """A figure computed beside the measurement: its failure is noted, never turns a finished run into an error."""
    try:
        return compute()
    except Exception as exc:  # noqa: BLE001 - a cross-check's failure is recorded, never raised
        record.setdefault("cross_check_errors", {})[key] = f"{type(exc).__name__}: {exc}"
        return None


def _special_steps(run: RunSpec, steps: int) -> dict[str, set[int]]:
    """Steps with a periodic extra cost, timed apart: GaLore's SVD refresh of every projector."""
    if run.method.startswith("galore"):  # step 0 (the first SVD, state creation) is warm-up either way
        return {"svd_refresh": {i for i in range(1, steps) if i % run.options["update_proj_gap"] == 0}}
    return {}


def _evaluator(scenario: Scenario, run: RunSpec, device: str) -> Callable[[torch.nn.Module], dict[str, Any]]:
    """Validation perplexity on held-out batches of the scenario's data (never the training batches)."""
    batches = training.training_batches(scenario, run.model.vocab_size, split="validation")
    held_out = [b for _, b in zip(range(scenario.eval_batches), batches)]
    source = "wiki-offline validation split" if scenario.data == "wiki" else "synthetic (labelled; not real text)"

    def evaluate(model: torch.nn.Module) -> dict[str, Any]:
        return {**evaluate_perplexity(model, [b.to(device) for b in held_out]), "data": source}

    return evaluate


def _train(record: dict[str, Any], scenario: Scenario, run: RunSpec, mode: str, device: str,
           steps: int | None, snapshot: Path | None = None) -> None:
    fake = mode == "simulate"
    traced, n_steps = training.simulation_plan(run) if fake else (run, max(2, steps or scenario.train.steps))
    if not fake and n_steps != scenario.train.steps:  # the LR schedule and the data length follow --steps
        scenario = dataclasses.replace(scenario, train=dataclasses.replace(scenario.train, steps=n_steps))
    if device == "cuda" and scenario.budget_bytes and not fake:
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, scenario.budget_bytes / total))

    def progress(done: int, total: int) -> None:
        _emit(step=done, of=total)
        _maybe_fault(run, done)

    evaluate = _evaluator(scenario, run, device) if scenario.eval_batches and not fake else None
    recording = snapshot is not None and device == "cuda" and not fake
    if recording:
        torch.cuda.memory._record_memory_history(max_entries=200_000)
    result = training.train_steps(scenario, traced, fake=fake, device=device if not fake else "cpu", steps=n_steps,
                                progress=progress, evaluate=evaluate, evaluate_every=scenario.eval_every)
    if recording and snapshot is not None:
        snapshot.parent.mkdir(parents=True, exist_ok=True)
        torch.cuda.memory._dump_snapshot(str(snapshot))
        torch.cuda.memory._record_memory_history(enabled=None)
    tracker, model = result["tracker"], result["model"]
    breakdown = tracker.breakdown()
    memory: dict[str, Any] = {"peak_bytes": tracker.peak, "breakdown": breakdown, "source": "tracker",
                              "category_peaks": dict(tracker.category_peaks), "steady_state_from_step": 2}
    if fake and traced is not run:  # GaLore: step 3 refreshed every projector; step 2 alone is the plain step
        memory.update(includes_svd_refresh=True, peak_without_svd_refresh_bytes=result["step_peaks"][1])
    if fake:  # what a GPU would reserve (and whether the cap holds), from the same trace: a model, labelled

        memory["allocator_model"] = _cross_check(record, "allocator_model",
                                                 lambda: replay(tracker.events or [], scenario.budget_bytes))
    if result["cuda"]:
        allocated = result["cuda"]["allocated_bytes"]
        breakdown["other"] += allocated - tracker.peak  # allocator blocks the tracker did not attribute
        memory.update(peak_bytes=allocated, source="torch.cuda.memory_stats", cuda=result["cuda"],
                      tracker_peak_bytes=tracker.peak)
    elif not fake:
        memory["process_rss_bytes"] = psutil.Process().memory_info().rss
    target = "gpu" if fake or device == "cuda" else "cpu"  # what 'auto' implementations resolved to
    memory["estimate"] = _cross_check(record, "estimate", lambda: _estimate_fields(scenario, run, target))
    if snapshot is not None:
        memory["snapshot"] = snapshot.name if recording else None
        memory["snapshot_note"] = ("open it at https://pytorch.org/memory_viz" if recording else
                                   "not written: memory snapshots come from the CUDA allocator (measure mode on a GPU)")
    record["memory"] = memory
    record["model"]["trainable_parameters"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    record["method"]["implementation"] = result["trainer_info"]
    if not fake:
        train = scenario.train
        tokens = train.batch_size * train.seq_len * train.grad_accum
        speed = training.throughput(result["step_times"], tokens, device, _special_steps(run, n_steps))
        speed.update(_cross_check(record, "flops", lambda: _flops(scenario, run, speed, record["device"])) or {})
        record["throughput"] = speed
        record["quality"]["losses"] = result["losses"]
        record["quality"]["final_loss"] = result["losses"][-1] if result["losses"] else None
        if scenario.data == "wiki":  # what the text and tokenizer were: packages, versions, hashes, split, counts

            record["quality"]["data_provenance"] = _cross_check(record, "data_provenance", data_info)
        final = _cross_check(record, "perplexity", lambda: {"step": n_steps, **evaluate(model)}) if evaluate else None
        if final is not None:
            record["quality"].update(perplexity=final["perplexity"], eval=final, evals=[*result["evals"], final])


def _flops(scenario: Scenario, run: RunSpec, speed: dict[str, Any], device_name: str) -> dict[str, Any]:
    """Counted FLOPs of the method's step, PaLM model FLOPs, and MFU against the device's peak (GPU only)."""
    train = scenario.train
    counted = flops.count_step_flops(scenario, run)
    model = flops.hand_count(run.model, train.batch_size, train.seq_len, train.activation_checkpointing)
    per_token, formula = model["model_flops_per_token"], model["model_flops_formula"]
    if not REGISTRY[run.method].trains:  # forward only: PaLM's forward third
        per_token, formula = per_token // 3, flops.FORWARD_MODEL_FLOPS_FORMULA
    model_flops_per_step = per_token * train.batch_size * train.seq_len * train.grad_accum
    if speed.get("step_seconds_median") is None:
        return {}
    utilisation = flops.mfu(model_flops_per_step, speed["step_seconds_median"], device_name, train.dtype)
    return {"mfu": utilisation["mfu"], "flops": {
        "counted_per_step": counted["flops_per_step"], "counted_per_token": counted["flops_per_token"],
        "counted_with": counted["counted_with"], "not_counted": counted["not_counted"],
        "model_flops_per_token": per_token, "model_flops_formula": formula,
        "peak_flops": utilisation["peak_flops"], "peak_source": utilisation["peak_source"],
        "achieved_model_flops_per_second": utilisation["achieved_flops_per_second"]}}


def child_main(request: dict[str, Any], conn: Any, stderr_path: str) -> None:
    """Entry point of the run's own process (started from the runner's fork server)."""
    global _emit, _FAULT
    child_io(stderr_path, request.get("threads"))
    _emit, _FAULT = _Reporter(conn), request.get("fault")
    scenario = load_scenario(request["scenario"])
    run = scenario.runs[request["run_index"]]
    record = execute(scenario, run, request["mode"] or scenario.mode, request.get("steps"),
                     Path(request["out"]) if request.get("memory_snapshot") else None)
    path = write_record(record, Path(request["out"]))
    _emit(record=str(path), status=record["status"])
    conn.close()
