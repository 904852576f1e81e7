"""Sweeps across machines: each run of a scenario as a submitit job, records back in the same results folder.

`local` runs the jobs as subprocesses of this machine (what works here); `slurm` submits them to a
cluster whose nodes see the same filesystem. A distributed run is one job of `world_size` tasks; each
task gets torchrun's env contract from submitit (TorchDistributedEnvironment) and rank 0 writes the record.
"""
from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from galore_bench.errors import UserError
from galore_bench.measure.training import pick_device
from galore_bench.record import write_record
from galore_bench.run import ranks
from galore_bench.run.sweep import check_mode, existing_record
from galore_bench.run.worker import died_record, execute
from galore_bench.spec.scenario import Scenario, load_scenario, selected_runs

EXECUTORS = ("local", "slurm")


def parse_options(pairs: Iterable[str]) -> dict[str, Any]:
    """KEY=VALUE strings (submitit parameter names: timeout_min, slurm_partition, nodes...) to a dict."""
    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UserError(f"--cluster-option {pair!r}: expected KEY=VALUE, e.g. slurm_partition=gpu")
        options[key] = int(value) if value.isdigit() else value
    return options


def run_job(request: dict[str, Any]) -> str | None:
    """Body of one job (every task of it): one run of the scenario; returns the record path on rank 0."""
    if request.get("threads"):
        torch.set_num_threads(request["threads"])
    scenario = load_scenario(request["scenario"])
    run, out, spec = scenario.runs[request["run_index"]], Path(request["out"]), scenario.distributed
    requested = request["mode"] or scenario.mode
    if spec is None:
        return str(write_record(execute(scenario, run, requested, request["steps"]), out))
    if ranks.resolve_mode(requested, run, spec, pick_device()) == "simulate":
        if _task_rank() != 0:  # a job sized for real ranks that resolved to simulate here: one record
            return None
        return str(write_record(ranks.simulate_record(scenario, run), out))
    if "RANK" not in os.environ:
        from submitit.helpers import TorchDistributedEnvironment

        TorchDistributedEnvironment().export()
    device = ranks.rank_device(int(os.environ["LOCAL_RANK"]))
    with ranks.process_group(spec, device) as backend:
        path = ranks.run_ranked(scenario, run, backend, device, request["steps"], out)
    return str(path) if path else None


def _task_rank() -> int:
    """This task's global rank within its job (0 outside submitit)."""
    if "RANK" in os.environ:
        return int(os.environ["RANK"])
    try:
        from submitit import JobEnvironment

        return JobEnvironment().global_rank
    except Exception:  # noqa: BLE001 - not inside a submitit job
        return 0


def _tasks(scenario: Scenario, mode: str | None) -> int:
    """Processes one job needs: world_size for a real distributed run, else one."""
    spec = scenario.distributed
    if spec is None or (mode or scenario.mode) == "simulate" or len(spec.world_sizes) > 1:
        return 1
    return spec.world_size


def submit_scenario(scenario: Scenario, *, out: Path, executor: str = "local", mode: str | None = None,
                    steps: int | None = None, options: dict[str, Any] | None = None,
                    skip_existing: bool = False, threads: int | None = None, log=print,
                    only: str | None = None) -> list[Path]:
    """Submit every run (or those `only` names), wait for them, return the record paths (a failed job leaves an
    error record)."""
    check_mode(scenario, mode)
    try:
        import submitit
    except ImportError:
        raise UserError("submitit is not installed: pip install 'galore-bench[cluster]'") from None
    if executor not in EXECUTORS:
        raise UserError(f"--submitit {executor!r}: allowed one of {', '.join(EXECUTORS)}")
    out = out.resolve()
    runner = submitit.AutoExecutor(folder=out / ".submitit" / "%j", cluster=executor)
    options = dict(options or {})
    nodes = int(options.pop("nodes", 1))
    tasks = _tasks(scenario, mode)
    if tasks % nodes:
        raise UserError(f"nodes={nodes} does not divide world_size {tasks}")
    parameters: dict[str, Any] = {"timeout_min": 60, "nodes": nodes, "tasks_per_node": tasks // nodes, **options}
    if executor == "slurm" and tasks > 1:
        parameters.setdefault("gpus_per_node", tasks // nodes)
    runner.update_parameters(name=f"galore-bench-{scenario.name}", **parameters)
    jobs: list[tuple[Any, Any]] = []  # (run, submitted job or the existing record's path)
    paths: list[Path] = []
    for index, run in selected_runs(scenario, only):
        done = existing_record(out, scenario, run.label) if skip_existing else None
        if done is not None:
            jobs.append((run, done))
            continue
        request = {"scenario": str(Path(scenario.path).resolve()), "run_index": index, "mode": mode, "steps": steps,
                   "out": str(out), "threads": threads}
        job = runner.submit(run_job, request)
        log(f"submitted {run.label}: {executor} job {job.job_id} ({tasks} task(s))")
        jobs.append((run, job))
    for run, job in jobs:
        if isinstance(job, Path):
            paths.append(job)
            continue
        try:
            results = job.results()  # one value per task; rank 0's is the record path
            found = next((Path(r) for r in results if r), None)
            error = None if found else "job finished without a record"
        except Exception as exc:  # noqa: BLE001 - a failed job is a result of the sweep
            found, error = None, f"{executor} job {job.job_id} failed: {exc}"
        if found is None:
            found = died_record(scenario, run, mode or scenario.mode, error or "job failed", out)
        paths.append(found)
    return paths


__all__ = ["EXECUTORS", "parse_options", "run_job", "submit_scenario"]
