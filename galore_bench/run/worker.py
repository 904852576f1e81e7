"""One run in its own process: fresh peak counters, and a crash here cannot take the sweep down.

Started by the runner from a fork server that has already imported torch and transformers (a new
interpreter would spend ~8 s importing them per run); reports each step and the record it wrote.
"""
from __future__ import annotations

import atexit
import ctypes
import dataclasses
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable
from multiprocessing import forkserver, reduction
from pathlib import Path
from typing import Any, cast

import psutil
import torch

from galore_bench import data_bytes, readings, store
from galore_bench.data import data_info, evaluate_perplexity
from galore_bench.measure import flops, resolve_mode, timing, training
from galore_bench.measure.allocator import replay
from galore_bench.measure.estimate import EstimateUnavailable, estimate_run
from galore_bench.methods import REGISTRY, precision
from galore_bench.record import MemorySection, RunRecord
from galore_bench.run import assemble
from galore_bench.run.request import RunRequest
from galore_bench.spec.scenario import RunSpec, Scenario

MEMORY_STEPS = 2  # measure's tracked steps: step 1 creates the optimizer states, step 2 is the steady peak
FAULT_ENV = "GALORE_BENCH_FAULT"  # test hook: "kill:<run label>" makes that run die mid-way (SIGKILL)


class _Reporter:
    """Sends progress and the final record path to the parent over a pipe."""

    def __init__(self, conn: Any) -> None:
        self.conn = conn

    def __call__(self, **message: Any) -> None:
        send_or_leave(self.conn, message)


def send_or_leave(conn: Any, message: dict[str, Any]) -> None:
    """A pipe the sweep no longer reads means the sweep is gone: leave quietly, never record that as the
    run's error (a BrokenPipeError record would count as a failed run in reports and compare)."""
    try:
        conn.send(message)
    except OSError:  # BrokenPipeError, ConnectionResetError
        os._exit(0)


class InheritedFile:
    """An open file handed to a fork-server child as a descriptor: the parent's stderr capture has no name
    on disk, so a parent killed by SIGKILL leaves no temp file behind."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def __reduce__(self) -> tuple[Any, ...]:  # multiprocessing sends the descriptor with the process
        return _inherited, (reduction.DupFd(self.fd),)


def _inherited(dup: Any) -> InheritedFile:
    return InheritedFile(dup.detach())


def die_with_parent() -> None:
    """Linux: the kernel kills this child when its parent (the fork server, which exits with the sweep) dies,
    so a sweep stopped by SIGKILL leaves no orphan running; elsewhere the pipe check above is the guard."""
    parent = os.getppid()
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # 1: PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent died before the kernel was told
        os._exit(0)


_emit: Callable[..., None] = lambda **message: None


_FAULT: str | None = None


def _maybe_fault(run: RunSpec, step: int) -> None:
    if _FAULT == f"kill:{run.label}" and step >= 1:
        os.kill(os.getpid(), signal.SIGKILL)


def execute(scenario: Scenario, run: RunSpec, mode: str | None, steps: int | None,
            snapshot_dir: Path | None = None) -> RunRecord:
    """Run one method and return its record (status oom/error instead of raising).

    `snapshot_dir`: also write the CUDA caching allocator's memory snapshot (measure on CUDA only) beside the
    record there, for PyTorch's memory_viz.
    """
    device = training.pick_device()
    if mode not in ("estimate", "simulate", "measure"):  # the sweep resolves it; a bare call may ask for auto
        mode = resolve_mode(scenario, run, mode, device)
    record = assemble.new_record(scenario, run, mode, training.record_device(mode, device))
    started = time.perf_counter()
    try:
        if mode == "estimate":  # its memory section is completed by close_record
            _estimate(cast(dict[str, Any], record), scenario, run)
        else:
            snapshot = (store.record_path(snapshot_dir, record).with_suffix(".snapshot.pickle")
                        if snapshot_dir else None)
            _train(record, scenario, run, mode, device, steps, snapshot)
        record["status"] = "ok"
    except Exception as exc:  # noqa: BLE001 - a failing method is a result of the sweep, not the end of it
        assemble.failed(record, exc, device)
    return assemble.close_record(record, scenario, started)


def _remove_forkserver_folder() -> None:
    """At the fork server's exit (its sweep ended or was killed by SIGKILL): the socket folder multiprocessing
    made for it, which a killed sweep can no longer remove. Runs in the fork server only (it preloads this)."""
    server = forkserver._forkserver
    address = getattr(server, "_forkserver_address", None)
    if getattr(server, "_forkserver_pid", None) is not None or not isinstance(address, str):
        return  # the sweep's own process (it knows the server's pid), or no server started
    folder = os.path.dirname(address)
    if os.path.basename(folder).startswith("pymp-"):
        shutil.rmtree(folder, ignore_errors=True)


atexit.register(_remove_forkserver_folder)


def child_io(stderr: InheritedFile | str, threads: int | None) -> None:
    """A run's own process: dies with its parent, stderr into the file the parent reads back (a handed-over
    descriptor, or a path), the thread count it was given."""
    die_with_parent()
    if isinstance(stderr, InheritedFile):
        os.dup2(stderr.fd, 2)
        os.close(stderr.fd)
    else:
        with open(stderr, "w") as err:
            os.dup2(err.fileno(), 2)
    sys.stderr = open(2, "w", closefd=False)  # noqa: SIM115 - lives as long as the process
    torch.set_num_threads(threads or torch.get_num_threads())


def _estimate_fields(scenario: Scenario, run: RunSpec, target: str = "gpu") -> dict[str, Any]:
    """The closed-form estimate as a record stores it (labelled an estimate; tests hold it to simulate)."""
    result = estimate_run(scenario, run, target)
    fields = {"peak_bytes": result.peak_bytes, "breakdown": result.breakdown, "category_peaks": result.category_peaks,
              "peak_moment": result.moment, "moments": result.moments, "terms": result.terms, "target": target}
    return fields | ({"phase": result.phase} if result.phase else {})


def _estimate_beside(memory: MemorySection, scenario: Scenario, run: RunSpec, target: str) -> dict[str, Any] | None:
    """The estimate a simulate / measure run is checked against; a method without estimate terms has none,
    and the record says why (`estimate_unavailable`) instead of an error."""
    try:
        return _estimate_fields(scenario, run, target)
    except EstimateUnavailable as exc:
        memory["estimate_unavailable"] = str(exc)
        return None


def _estimate(record: dict[str, Any], scenario: Scenario, run: RunSpec) -> None:
    fields = _estimate_fields(scenario, run)
    record["memory"] = {"peak_bytes": fields["peak_bytes"], "breakdown": fields["breakdown"],
                        "category_peaks": fields["category_peaks"], "source": "estimate (closed-form formulas)",
                        "estimate": fields, "readings": readings.estimated(fields["peak_bytes"])}


def _special_steps(run: RunSpec, steps: int) -> dict[str, set[int]]:
    """Steps with a periodic extra cost, timed apart (the method's hook; GaLore: its SVD refreshes)."""
    periodic = REGISTRY[run.method].periodic_steps
    return periodic(run.options, steps) if periodic is not None else {}


SOURCES = {"wiki": "wiki-offline {} split", "wiki-bytes": "wiki-offline bytes, {} split",
           "synthetic": "synthetic (labelled; not real text)"}


def _evaluator(scenario: Scenario, run: RunSpec, device: str,
               split: str = "validation") -> Callable[[torch.nn.Module], dict[str, Any]]:
    """Perplexity on held-out batches of the scenario's data (never the training batches)."""
    batches = training.training_batches(scenario, run.model.vocab_size, split=split)
    held_out = [b for _, b in zip(range(scenario.eval_batches), batches)]
    source = SOURCES[scenario.data].format(split)

    def evaluate(model: torch.nn.Module) -> dict[str, Any]:
        return {**evaluate_perplexity(model, [b.to(device) for b in held_out]), "data": source}

    return evaluate


def _train(record: RunRecord, scenario: Scenario, run: RunSpec, mode: str, device: str,
           steps: int | None, snapshot: Path | None = None) -> None:
    fake = mode == "simulate"
    # measure: the tracker on for the memory window (warm-up + steady step), then at least one step timed without it
    traced, n_steps = (training.simulation_plan(scenario, run) if fake
                       else (run, max(MEMORY_STEPS + 1, steps or scenario.train.steps)))
    if not fake and n_steps != scenario.train.steps:  # the LR schedule and the data length follow --steps
        scenario = dataclasses.replace(scenario, train=dataclasses.replace(scenario.train, steps=n_steps))
        record["train"]["steps"] = n_steps  # the record says how many steps ran
    if device == "cuda" and scenario.budget_bytes and not fake:
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, scenario.budget_bytes / total))

    def progress(done: int, total: int) -> None:
        _emit(step=done, of=total)
        _maybe_fault(run, done)

    tune_split, final_split = training.held_out_splits(scenario.data)
    evaluate = _evaluator(scenario, run, device, tune_split) if scenario.eval_batches and not fake else None
    recording = snapshot is not None and device == "cuda" and not fake
    if recording:
        torch.cuda.memory._record_memory_history(max_entries=200_000)
    result = training.train_steps(scenario, traced, fake=fake, device=device if not fake else "cpu", steps=n_steps,
                                  progress=progress, evaluate=evaluate, evaluate_every=scenario.eval_every,
                                  track_steps=None if fake else MEMORY_STEPS)
    if recording and snapshot is not None:
        snapshot.parent.mkdir(parents=True, exist_ok=True)
        torch.cuda.memory._dump_snapshot(str(snapshot))
        torch.cuda.memory._record_memory_history(enabled=None)
    plan = REGISTRY[run.method].trace_plan
    memory = assemble.traced_memory(result, extra_step=plan.extra_step if fake and plan is not None else None)
    if fake:  # what a GPU would reserve (and whether the cap holds), from the same trace: a model, labelled

        tracker = result["tracker"]
        memory["allocator_model"] = assemble.cross_check(
            record, "allocator_model",
            lambda: replay(tracker.events or [], scenario.budget_bytes, steady_from=tracker.steady_from_event))
        memory["readings"] = readings.simulated(memory["allocator_model"])
    elif not result["cuda"]:
        memory["process_rss_bytes"] = psutil.Process().memory_info().rss
    target = "gpu" if fake or device == "cuda" else "cpu"  # what 'auto' implementations resolved to
    memory["estimate"] = assemble.cross_check(record, "estimate",
                                              lambda: _estimate_beside(memory, scenario, run, target))
    if fake and memory["estimate"] and memory["estimate"].get("phase"):  # simulation_plan traced that phase
        memory["traced_phase"] = memory["estimate"]["phase"]
    if snapshot is not None:
        memory.update(assemble.snapshot_fields(snapshot, recording))  # type: ignore[typeddict-item]
    assemble.fill_trained(record, memory, result)
    if fake:
        return
    tokens = assemble.tokens_per_step(scenario)
    speed = timing.throughput(result["step_times"], tokens, device, _special_steps(run, n_steps),
                                tracked=result["tracked_steps"])
    counted = lambda: _flops(scenario, run, speed, record["device"])
    speed.update(assemble.cross_check(record, "flops", counted) or {})
    provenance = None
    if scenario.data in ("wiki", "wiki-bytes"):  # what the text and tokenizer were: versions, hashes, split, counts
        provenance = assemble.cross_check(record, "data_provenance",
                                          data_info if scenario.data == "wiki" else data_bytes.info)
    model = result["model"]
    final = None
    if evaluate is not None:  # the final figure on its own split where the data has one (never chosen on)
        last = _evaluator(scenario, run, device, final_split) if final_split != tune_split else evaluate
        final = assemble.cross_check(record, "perplexity", lambda: {"step": n_steps, **last(model)})
        if last is not evaluate:
            record["quality"]["tune_eval"] = assemble.cross_check(record, "tune_eval",
                                                                  lambda: {"step": n_steps, **evaluate(model)})
    assemble.fill_steps(record, result, speed, final, provenance)


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
    recipe = precision.precision_of(train, run.options)  # the peak of the dtype the matmuls run in
    utilisation = flops.mfu(model_flops_per_step, speed["step_seconds_median"], device_name,
                            recipe.compute or recipe.weights)
    return {"mfu": utilisation["mfu"], "flops": {
        "counted_per_step": counted["flops_per_step"], "counted_per_token": counted["flops_per_token"],
        "counted_with": counted["counted_with"], "not_counted": counted["not_counted"],
        "model_flops_per_token": per_token, "model_flops_formula": formula,
        "peak_flops": utilisation["peak_flops"], "peak_source": utilisation["peak_source"],
        "achieved_model_flops_per_second": utilisation["achieved_flops_per_second"]}}


def child_main(request: RunRequest, conn: Any, stderr: InheritedFile | str) -> None:
    """Entry point of the run's own process (started from the runner's fork server)."""
    global _emit, _FAULT
    child_io(stderr, request.threads)
    _emit, _FAULT = _Reporter(conn), request.fault
    scenario, run = request.load()
    snapshots = request.out if request.memory_snapshot else None
    record = execute(scenario, run, request.mode, request.steps, snapshots)
    path = store.write(record, request.out)
    _emit(record=str(path), status=record["status"])
    conn.close()
