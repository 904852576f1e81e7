"""Sweeps across machines: each run of a scenario as a submitit job, records back in the same results folder.

`local` runs the jobs as subprocesses of this machine (what works here); `slurm` submits them to a
cluster whose nodes see the same filesystem. A distributed run is one job of `world_size` tasks; each
task gets torchrun's env contract from submitit (TorchDistributedEnvironment) and rank 0 writes the record.
"""
from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from galore_bench import store
from galore_bench.errors import UserError
from galore_bench.measure import resolve_mode
from galore_bench.measure.training import pick_device
from galore_bench.run import ranks
from galore_bench.run.assemble import died_record
from galore_bench.run.request import RunRequest
from galore_bench.run.worker import execute
from galore_bench.spec.scenario import Scenario, selected_runs

EXECUTORS = ("local", "slurm")


def parse_options(pairs: Iterable[str]) -> dict[str, Any]:
    """KEY=VALUE strings (submitit parameter names: timeout_min, slurm_partition, nodes...) to a dict; a
    number is passed as an int or float, as submitit checks each parameter's type."""
    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.isidentifier():
            raise UserError(f"--cluster-option {pair[:80]!r}: expected KEY=VALUE, e.g. slurm_partition=gpu")
        number = re.fullmatch(r"[0-9]{1,15}(\.[0-9]{0,15})?", value)
        options[key] = value if number is None else float(value) if number.group(1) else int(value)
    nodes = options.get("nodes", 1)
    if not (isinstance(nodes, int) and 1 <= nodes <= 100_000):
        raise UserError(f"--cluster-option nodes={nodes!r:.80}: allowed a whole number from 1 to 100,000")
    return options


def run_job(request: RunRequest) -> str | None:
    """Body of one job (every task of it): one run of the scenario; returns the record path on rank 0."""
    if request.threads:
        torch.set_num_threads(request.threads)
    scenario, run = request.load()
    spec = scenario.distributed
    if spec is None:
        return str(store.write(execute(scenario, run, request.mode, request.steps), request.out))
    if resolve_mode(scenario, run, request.mode, pick_device()) == "simulate":
        if _task_rank() != 0:  # a job sized for real ranks that resolved to simulate here: one record
            return None
        return str(store.write(ranks.simulate_record(scenario, run), request.out))
    if "RANK" not in os.environ:
        from submitit.helpers import TorchDistributedEnvironment

        TorchDistributedEnvironment().export()
    device = ranks.rank_device(int(os.environ["LOCAL_RANK"]))
    with ranks.process_group(spec, device) as backend:
        path = ranks.run_ranked(scenario, run, backend, device, request.steps, request.out)
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


def _modes(scenario: Scenario, mode: str | None, executor: str) -> dict[str, str]:
    """Each run's engine by label. A cluster's nodes have GPUs, so 'auto' is resolved for one there; local
    jobs run on this machine's device."""
    device = "cuda" if executor == "slurm" else pick_device()
    return {run.label: resolve_mode(scenario, run, mode, device) for run in scenario.runs}


def _tasks(scenario: Scenario, modes: dict[str, str]) -> int:
    """Processes one job needs: world_size for a real distributed run, else one."""
    spec = scenario.distributed
    if spec is None:
        return 1
    return 1 if set(modes.values()) == {"simulate"} else spec.world_size


def submit_scenario(scenario: Scenario, *, out: Path, executor: str = "local", mode: str | None = None,
                    steps: int | None = None, options: dict[str, Any] | None = None,
                    skip_existing: bool = False, threads: int | None = None, log=print,
                    only: str | None = None) -> list[Path]:
    """Submit every run (or those `only` names), wait for them, return the record paths (a failed job leaves an
    error record)."""
    modes = _modes(scenario, mode, executor)  # refuses a mode the scenario cannot run, before any job
    tasks = _tasks(scenario, modes)
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
    if tasks % nodes:
        raise UserError(f"nodes={nodes} does not divide world_size {tasks}")
    parameters: dict[str, Any] = {"timeout_min": 60, "nodes": nodes, "tasks_per_node": tasks // nodes, **options}
    if executor == "slurm" and tasks > 1:
        parameters.setdefault("gpus_per_node", tasks // nodes)
    try:
        runner.update_parameters(name=f"galore-bench-{scenario.name}", **parameters)
    except (AssertionError, NameError, TypeError, ValueError) as exc:  # submitit's checks of each parameter
        raise UserError(f"--cluster-option: {str(exc).splitlines()[0][:200]}") from None
    jobs: list[tuple[Any, Any]] = []  # (run, submitted job or the existing record's path)
    paths: list[Path] = []
    for index, run in selected_runs(scenario, only):
        done = store.finished(out, scenario.name, run.label, modes[run.label]) if skip_existing else None
        if done is not None:
            jobs.append((run, done))
            continue
        request = RunRequest(str(Path(scenario.path).resolve()), index, out, mode, steps, threads,
                             validated=scenario)  # a queued job runs what was validated, not a later edit
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
            died = died_record(scenario, run, modes[run.label], error or "job failed")
            found = store.write(died, out)
        paths.append(found)
    return paths


__all__ = ["EXECUTORS", "parse_options", "run_job", "submit_scenario"]
