"""A study's trainings (spec/study.py): each run's lr grid at the tuning seed, the choice, the other seeds, and the
interleaved step-time cost written as one record per method.

The choice is made from the records read back from disk, so a resumed sweep (--skip-existing) chooses exactly
as an uninterrupted one, and a report can check it (report/quality.py recomputes it from the grid records).
"""
from __future__ import annotations

import dataclasses
import math
import time
from typing import Any

from galore_bench import store
from galore_bench.measure.step_cost import interleaved_cost
from galore_bench.measure.training import held_out_splits, record_device
from galore_bench.record import RunRecord
from galore_bench.run import assemble
from galore_bench.spec.scenario import RunSpec, Scenario
from galore_bench.spec.study import StudySpec, grid_label

Training = tuple[Scenario, RunSpec]
REFERENCE_METHOD = "adamw"


def study_of(scenario: Scenario) -> StudySpec:
    if scenario.study is None:
        raise ValueError(f"{scenario.name} has no [study]")
    return scenario.study


def grid_of(run: RunSpec) -> tuple[float, ...]:
    """The learning rates a run is tried at: its grid, or its one lr."""
    return run.lr_grid or (float(run.options["lr"]),)


def one_training(scenario: Scenario, run: RunSpec, lr: float, seed: int, role: str,
             chosen: dict[str, Any] | None = None) -> Training:
    """One training of a study: the run at this lr and seed, as a scenario of its own (the worker reloads
    nothing: the seed is the scenario's train.seed, which seeds the model and the batch order)."""
    label = grid_label(run.label, lr, seed)
    tuning = {"run": run.label, "lr_grid": list(grid_of(run)), "lr": lr, "seed": seed,
              "seeds": list(study_of(scenario).seeds), "role": role,
              "tune_split": training_splits(scenario)[0], "final_split": training_splits(scenario)[1],
              **(chosen or {})}
    spec = dataclasses.replace(run, options={**run.options, "lr": lr, "label": label}, label=label, lr_grid=(),
                               tuning=tuning)
    return dataclasses.replace(scenario, train=dataclasses.replace(scenario.train, seed=seed), runs=(spec,)), spec


def training_splits(scenario: Scenario) -> tuple[str, str]:
    return held_out_splits(scenario.data)


def grid_trainings(scenario: Scenario, run: RunSpec) -> list[Training]:
    return [one_training(scenario, run, lr, study_of(scenario).tune_seed, "grid") for lr in grid_of(run)]


def tune_loss(record: dict[str, Any]) -> float | None:
    """The held-out loss a grid chooses by: the tune split's where the data has one, else the validation's."""
    quality = record["quality"]
    held = quality.get("tune_eval") or quality.get("eval") or {}
    nll = held.get("nll") if record["status"] == "ok" else None
    return float(nll) if isinstance(nll, (int, float)) and math.isfinite(nll) else None


def choose(records: list[Any]) -> dict[str, Any]:
    """{'chosen_lr': the grid record's lr with the lowest tune loss (None if every one failed or diverged),
    'tune_nll': lr -> that loss}."""
    losses = {str(r["quality"]["tuning"]["lr"]): tune_loss(r) for r in records}
    usable = {lr: nll for lr, nll in losses.items() if nll is not None}
    return {"chosen_lr": float(min(usable, key=lambda lr: usable[lr])) if usable else None, "tune_nll": losses}


def seed_trainings(scenario: Scenario, run: RunSpec, chosen: dict[str, Any]) -> list[Training]:
    """The other seeds at the chosen rate (none when no grid value trained)."""
    if chosen["chosen_lr"] is None:
        return []
    return [one_training(scenario, run, chosen["chosen_lr"], seed, "seed", chosen)
            for seed in study_of(scenario).seeds[1:]]


def cost_records(scenario: Scenario, runs: list[tuple[RunSpec, float]], device: str) -> list[RunRecord]:
    """One record per run with its interleaved step-time cost (label `<run>@cost`), AdamW the reference.
    If the measurement fails, each record says so (status error), as a failed training would."""
    study = study_of(scenario)
    specs = [dataclasses.replace(run, options={**run.options, "lr": lr}) for run, lr in runs]
    reference = next((s.label for s in specs if s.method == REFERENCE_METHOD), specs[0].label)
    cost_scenario = dataclasses.replace(scenario, train=dataclasses.replace(scenario.train, seed=study.tune_seed))
    started = time.perf_counter()
    records = []
    for spec in specs:
        label = f"{spec.label}@cost"
        named = dataclasses.replace(spec, label=label, options={**spec.options, "label": label})
        records.append(assemble.new_record(cost_scenario, named, "measure", record_device("measure", device)))
    try:
        cost = interleaved_cost(cost_scenario, specs, reference, study.cost_rounds, study.cost_steps)
    except Exception as exc:  # noqa: BLE001 - recorded like a failed run, the sweep's records are kept
        for record in records:
            assemble.failed(record, exc, device)
        return [assemble.close_record(r, cost_scenario, started) for r in records]
    tokens = assemble.tokens_per_step(cost_scenario)
    for record, spec in zip(records, specs):
        section = cost[spec.label]
        median = section["step_seconds_median"]
        speed: dict[str, Any] = {"tokens_per_second": tokens / median if median else None,
                                 "tgs": tokens / median if median else None, "step_seconds_median": median,
                                 "label": "CPU throughput (not a GPU figure)", "interleaved": section}
        record["throughput"].update(speed)  # type: ignore[typeddict-item]
        record["status"] = "ok"
    return [assemble.close_record(r, cost_scenario, started) for r in records]


def write_all(records: list[RunRecord], out: Any) -> list[Any]:
    return [store.write(record, out) for record in records]
