"""Measurements to a record: the one place that fills a RunRecord, single-device and distributed runs alike.

The engines return their own results (a train_steps dict, a sharding trace, each rank's numbers); the run
processes hand them here and write what comes back through galore_bench.store.
"""
from __future__ import annotations

import dataclasses
import math
import platform
import resource
import subprocess
import time
import traceback
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any, cast

import torch

from galore_bench import readings
from galore_bench.measure import timing
from galore_bench.methods import precision
from galore_bench.models import model_record, parameter_count
from galore_bench.record import (
    SCHEMA_VERSION,
    DistributedSection,
    EnvSection,
    MemorySection,
    QualitySection,
    RunRecord,
)
from galore_bench.spec.distributed import DistributedSpec
from galore_bench.spec.scenario import RunSpec, Scenario
from galore_bench.units import format_bytes

TRACKED_PACKAGES = ("galore-bench", "torch", "transformers", "bitsandbytes", "peft", "galore-torch",
                    "lomo-optim")


def environment() -> EnvSection:
    """Versions and commit: enough to tell two records' provenance apart."""
    versions: dict[str, str | None] = {}
    for name in TRACKED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    commit = _git("rev-parse", "--short", "HEAD")
    # the code that ran differs from that commit when the package or the scenarios have uncommitted changes
    changed = None if commit is None else _git("status", "--porcelain", "--", ":/galore_bench", ":/scenarios")
    dirty = None if changed is None else changed != ""
    return {"python": platform.python_version(), "platform": platform.platform(), "packages": versions,
            "git_commit": commit, "git_dirty": dirty}


def _git(*args: str) -> str | None:
    """Output of git in this package's checkout; None outside one (an installed wheel), or on error."""
    try:
        done = subprocess.run(["git", *args], capture_output=True, text=True, cwd=Path(__file__).parent,
                              timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def empty_memory(**measured: Any) -> MemorySection:
    """A memory section with every field, null where not measured, then what `measured` gives."""
    memory = {"peak_bytes": None, "breakdown": None, "category_peaks": None, "source": None,
              "steady_state_from_step": None, "estimate": None, "allocator_model": None, "cuda": None,
              "readings": None}
    return cast(MemorySection, memory | measured)


def new_record(scenario: Scenario, run: RunSpec, mode: str, device: str) -> RunRecord:
    """One run's record skeleton: every field present, null where not measured, status error until set."""
    return {
        "schema_version": SCHEMA_VERSION, "scenario": scenario.name, "run": run.label,
        "method": {"name": run.method, **run.options, "implementation": None},
        "mode": mode, "device": device, "status": "error", "error": None, "traceback": None,
        "cross_check_errors": {},
        "model": {"name": run.model_name, "parameters": parameter_count(run.model),
                  "trainable_parameters": None, "shape": model_record(run.model)},
        "train": dataclasses.asdict(precision.run_settings(scenario.train, run.options)),  # as this run trains
        "budget": {"bytes": scenario.budget_bytes, "text": scenario.budget_text, "fits": None},
        "memory": empty_memory(),
        "throughput": {"tokens_per_second": None, "tgs": None, "mfu": None},
        "quality": cast(QualitySection, {"final_loss": None, "perplexity": None, "losses": [], "data": scenario.data,
                                         **({"tuning": run.tuning} if run.tuning is not None else {})}),
        "distributed": None, "env": environment(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "wall_seconds": None, "host_peak_rss_bytes": None,
    }


def died_record(scenario: Scenario, run: RunSpec, mode: str, error: str) -> RunRecord:
    """The record of a run whose process died (killed, segfault, a failed job): kept, the sweep goes on."""
    record = new_record(scenario, run, mode, "unknown")
    record["error"] = error
    return record


def failed(record: RunRecord, exc: BaseException, device: torch.device | str) -> None:
    """A run that raised: out of memory (with the CUDA peak reached) or an error with its traceback."""
    if isinstance(exc, torch.OutOfMemoryError):
        record["status"] = "oom"
        on_gpu = torch.device(device).type == "cuda"
        at = f" at {format_bytes(torch.cuda.max_memory_allocated(device))}" if on_gpu else ""
        record["error"] = f"OOM{at}: {str(exc).splitlines()[0]}"
    else:
        record["status"] = "error"
        record["error"], record["traceback"] = f"{type(exc).__name__}: {exc}", traceback.format_exc()


def close_record(record: RunRecord, scenario: Scenario, started: float) -> RunRecord:
    """Every memory field present, wall time, this process's host memory (for simulate: the cost of tracing
    here), the budget verdict."""
    record["memory"] = empty_memory(**record["memory"])  # an engine that set only what it measures
    record["wall_seconds"] = time.perf_counter() - started
    record["host_peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    peak, budget = record["memory"]["peak_bytes"], scenario.budget_bytes
    if budget is not None:
        measured = record["status"] == "ok" and peak is not None
        record["budget"]["fits"] = False if record["status"] == "oom" else (
            peak <= budget if measured and peak is not None else None)
    return record


def cross_check(record: RunRecord, key: str, compute: Callable[[], Any]) -> Any:
    """A figure computed beside the measurement: its failure is noted, never makes a finished run an error."""
    try:
        return compute()
    except Exception as exc:  # noqa: BLE001 - a cross-check's failure is recorded, never raised
        record["cross_check_errors"][key] = f"{type(exc).__name__}: {exc}"
        return None


# -- single device -----------------------------------------------------------------------------------
def traced_memory(result: dict[str, Any], extra_step: str | None) -> MemorySection:
    """The tracker's peak and composition; on a GPU the allocator's peak, its surplus counted as 'other'."""
    tracker, cuda = result["tracker"], result["cuda"]
    breakdown = tracker.breakdown()
    measured: dict[str, Any] = {"peak_bytes": tracker.peak, "source": "tracker"}
    if extra_step:  # the method's trace plan: the last step had its periodic cost (GaLore: "svd_refresh")
        measured |= {f"includes_{extra_step}": True, f"peak_without_{extra_step}_bytes": result["step_peaks"][1]}
    if cuda:
        breakdown["other"] += cuda["allocated_bytes"] - tracker.peak  # blocks the tracker did not label
        measured |= {"peak_bytes": cuda["allocated_bytes"], "source": "torch.cuda.memory_stats", "cuda": cuda,
                     "tracker_peak_bytes": tracker.peak, "readings": readings.measured_cuda(cuda)}
    elif result.get("device_type") == "cpu":  # a real CPU step (simulate fills its readings from the replay)
        measured["readings"] = readings.measured_cpu(tracker.peak)
    return empty_memory(breakdown=breakdown, category_peaks=dict(tracker.category_peaks),
                        steady_state_from_step=2, **measured)


def snapshot_fields(snapshot: Path, recorded: bool) -> dict[str, Any]:
    """Where the CUDA allocator's snapshot went, or why there is none."""
    return {"snapshot": snapshot.name if recorded else None,
            "snapshot_note": "open it at https://pytorch.org/memory_viz" if recorded else
            "not written: memory snapshots come from the CUDA allocator (measure mode on a GPU)"}


def fill_trained(record: RunRecord, memory: MemorySection, result: dict[str, Any]) -> None:
    """The memory section and what the built model and trainer say about themselves."""
    record["memory"] = memory
    record["model"]["trainable_parameters"] = _trainable(result["model"])
    record["method"]["implementation"] = result["trainer_info"]


def _trainable(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def fill_steps(record: RunRecord, result: dict[str, Any], speed: dict[str, Any], final: dict[str, Any] | None,
               provenance: Any = None) -> None:
    """Throughput and training quality of real steps; `final` is the last validation (None without one)."""
    record["throughput"] = speed  # type: ignore[typeddict-item]
    quality = record["quality"]
    quality["losses"] = result["losses"]
    quality["final_loss"] = result["losses"][-1] if result["losses"] else None
    if provenance is not None:
        quality["data_provenance"] = provenance
    if final is not None:
        quality["perplexity"], quality["eval"] = final["perplexity"], final
        quality["evals"] = [*result["evals"], final]
    if diverged := non_finite_to_null(quality):
        quality["non_finite"] = diverged


def non_finite_to_null(section: Any, where: str = "") -> list[str]:
    """A diverged run's NaN or infinite losses are a result, but JSON has no such numbers: each becomes null in
    place, and the fields are returned so the record can name them (store.write refuses any that are left)."""
    items = list(section.items()) if isinstance(section, dict) else list(enumerate(section))
    found = []
    for key, value in items:
        field = f"{where}.{key}" if where else str(key)
        if isinstance(value, float) and not math.isfinite(value):
            section[key] = None
            found.append(field)
        elif isinstance(value, (dict, list)):
            found += non_finite_to_null(value, field)
    return found


def tokens_per_step(scenario: Scenario) -> int:
    train = scenario.train
    return train.batch_size * train.seq_len * train.grad_accum


# -- distributed --------------------------------------------------------------------------------------
def distributed_section(spec: DistributedSpec, world_size: int, backend: str | None, simulated: bool,
                        how: str, ranks: list[dict[str, Any]]) -> DistributedSection:
    worst = max(ranks, key=lambda r: r.get("peak_bytes") or 0) if ranks else {}
    return {"world_size": world_size, "strategy": spec.strategy, "cpu_offload": spec.cpu_offload,
            "fsdp_unit": spec.fsdp_unit if spec.strategy == "fsdp2" else None, "backend": backend,
            "simulated": simulated, "how": how, "ranks": ranks,
            "max_rank_peak_bytes": worst.get("peak_bytes"), "max_rank": worst.get("rank")}


def fill_simulated(record: RunRecord, spec: DistributedSpec, budget: int | None,
                   results: list[dict[str, Any]], single_device_peak: int, how: str, trainer: Any) -> None:
    """A world-size search: the record stands at the smallest world size that fits the budget (without a
    budget the smallest asked for; if none fits, the largest), every candidate kept beside it."""
    candidates = [{**c, "fits": None if budget is None else c["peak_bytes"] <= budget} for c in results]
    fitting = [c for c in candidates if c["fits"]]
    chosen = fitting[0] if fitting else candidates[0 if budget is None else -1]
    n = chosen["world_size"]
    ranks = [{"rank": r, "peak_bytes": chosen["peak_bytes"], "breakdown": chosen["breakdown"],
              "host_bytes": chosen["host_bytes"]} for r in range(n)]
    section = distributed_section(spec, n, None, True, how, ranks)
    section["candidates"], section["transient_bytes"] = candidates, chosen["transient_bytes"]
    section["gpus_needed"], section["single_device_peak_bytes"] = (n if fitting else None), single_device_peak
    record["distributed"] = section
    record["memory"] = empty_memory(peak_bytes=chosen["peak_bytes"], breakdown=dict(chosen["breakdown"]),
                                    source="tracker + sharding arithmetic (max over ranks)",
                                    steady_state_from_step=2)
    record["memory"]["readings"] = readings.sharded_simulation(chosen["peak_bytes"])
    record["model"]["trainable_parameters"] = _trainable(trainer.model)
    record["method"]["implementation"] = trainer.info
    record["status"] = "ok"


def fill_ranks(record: RunRecord, scenario: Scenario, spec: DistributedSpec, results: list[dict[str, Any]],
               backend: str, device: torch.device, world: int | None = None) -> None:
    """The record from the ranks' results (all of them, or the one that failed and reports for the run)."""
    world = world or len(results)
    failures = [r for r in results if r["status"] != "ok"]
    offloaded = spec.cpu_offload and device.type == "cpu"
    how = (f"{world} processes, {backend} process group, torch {spec.strategy}; each rank's own tracker "
           "(DTensors counted by their local shard)"
           + ("; CPU offload on a CPU device: the offloaded shards stay in the memory counted" * offloaded))
    keep = ("rank", "peak_bytes", "breakdown", "local_parameter_bytes", "weights_sha256", "status", "error")
    ranks = [{k: r[k] for k in keep if k in r} | {"final_loss": (r.get("losses") or [None])[-1]}
             for r in results]
    non_finite_to_null(ranks)  # a diverged rank's loss: null (strict JSON)
    record["distributed"] = distributed_section(spec, world, backend, False, how, ranks)
    if failures:
        record["status"] = "oom" if any(r["status"] == "oom" for r in failures) else "error"
        record["error"] = "; ".join(f"rank {r['rank']}: {r['error']}" for r in failures)
        record["traceback"] = next((r["traceback"] for r in failures if "traceback" in r), None)
        return
    worst = max(results, key=lambda r: r["peak_bytes"])
    source = "torch.cuda.memory_stats, max over ranks" if "cuda" in worst else "tracker, max over ranks"
    record["memory"] = empty_memory(peak_bytes=worst["peak_bytes"], breakdown=dict(worst["breakdown"]),
                                    source=source, steady_state_from_step=worst["steady_state_from_step"])
    record["memory"]["readings"] = (readings.measured_cuda(worst["cuda"]) if "cuda" in worst
                                    else readings.measured_cpu(worst["peak_bytes"]))  # the rank with the peak
    first = results[0]
    rate = timing.throughput(first["step_seconds"], tokens_per_step(scenario), device.type)
    if rate.get("tokens_per_second") is not None:
        rate["tokens_per_second"] *= world  # every rank trains its own batch; tgs stays per rank
    fill_steps(record, {"losses": first["losses"], "evals": []}, rate, None)
    sharded = spec.strategy == "fsdp2"
    record["model"]["trainable_parameters"] = (sum(r["trainable_parameters"] for r in results) if sharded
                                               else first["trainable_parameters"])
    record["method"]["implementation"] = first["implementation"]
    record["status"] = "ok"
