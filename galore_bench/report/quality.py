"""A study's tables: held-out quality per method over seeds at its chosen learning rate, and step-time cost.

The choice of rate is recomputed here from the grid records (the lowest tune-split loss at the tuning seed) and
must agree with what the seed records say was chosen: a report never shows a rate its records did not choose.
"Beyond the seed spread" is a plain, conservative test stated in the table's note: every seed of the method
lands on the same side of every seed of AdamW (the two seed ranges do not overlap).
"""
from __future__ import annotations

import math
import statistics
from collections import defaultdict
from typing import Any

import pandas as pd

from galore_bench.errors import UserError
from galore_bench.report.tables import as_number

REFERENCE = "adamw"
NOTES = [
    ("Perplexity and bits per byte (NLL / ln 2) on the test split, which no choice was made on; the learning rate "
    "of each run was chosen from its grid by the tune split's loss at the first seed."),
    ("at grid edge: the chosen rate is the grid's smallest or largest, so the best rate may lie outside it (widen "
     "the grid before reading much into that method's row)."),
    "spread: sample standard deviation over seeds; low / high: the lowest and highest seed.",
    ("beyond spread: 'yes' when the method's seed range and AdamW's do not overlap (every seed on the same side), "
    "else 'no' (the difference is within seed-to-seed noise at this size)."),
]
COST_NOTES = [
    ("Each method's steps timed in turn with every other's, same model and batches, order rotated each round; "
    "ratio = median step time / AdamW's (wall clock; 'CPU time' uses the process's CPU time instead)."),
    ("GaLore's projector refresh (SVDs every update_proj_gap steps) is left out of its median and timed apart by a "
    "probe refreshing every step: 'refresh extra s' is one refresh's cost, 'amortised' adds it / update_proj_gap."),
]


def _tuning(record: dict[str, Any]) -> dict[str, Any] | None:
    tuning = record["quality"].get("tuning")
    return tuning if isinstance(tuning, dict) and isinstance(tuning.get("run"), str) else None


def _tune_loss(record: dict[str, Any]) -> float | None:
    held = record["quality"].get("tune_eval") or record["quality"].get("eval") or {}
    return as_number(held.get("nll")) if record["status"] == "ok" else None


def _stats(values: list[float]) -> dict[str, float | None]:
    return {"mean": statistics.fmean(values) if values else None,
            "spread": statistics.stdev(values) if len(values) > 1 else None,
            "low": min(values) if values else None, "high": max(values) if values else None}


def study_groups(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """run -> {method, grid, chosen lr, tune losses, the final records (chosen lr, every seed)}, in file order."""
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for record in records:
        if (tuning := _tuning(record)) is not None:
            groups[tuning["run"]].append(record)
    result = {}
    for run, members in groups.items():
        tunings = [_tuning(r) or {} for r in members]
        losses = {float(t["lr"]): _tune_loss(r) for r, t in zip(members, tunings) if t["role"] == "grid"}
        usable = {lr: loss for lr, loss in losses.items() if loss is not None}
        complete = set(losses) >= {float(lr) for lr in tunings[0].get("lr_grid") or []}
        chosen = min(usable, key=lambda lr: usable[lr]) if usable and complete else None  # never from part of a grid
        claimed = {t.get("chosen_lr") for t in tunings if t["role"] == "seed"}
        if claimed - {chosen}:
            raise UserError(f"{run}: the seed records say lr {', '.join(map(str, claimed))} was chosen, the grid "
                            f"records give {chosen}: records from different sweeps mixed in one folder?")
        final = [r for r, t in zip(members, tunings) if chosen is not None and float(t["lr"]) == chosen]
        final.sort(key=lambda r: int(r["train"]["seed"]))
        result[run] = {"method": members[0]["method"]["name"], "grid": sorted(tunings[0].get("lr_grid") or losses),
                       "chosen": chosen, "grid_done": len(losses),
                       "tune_nll": losses, "final": final,
                       "data": members[0]["quality"].get("data")}
    return result


def _verdict(ours: list[float], theirs: list[float]) -> str:
    if len(ours) < 2 or len(theirs) < 2:  # one seed has no spread to be beyond
        return "-"
    if max(ours) < min(theirs) or min(ours) > max(theirs):
        return "yes"
    return "no"


def quality_table(records: list[dict[str, Any]], labels: list[str]) -> pd.DataFrame | None:
    """One row per run of a study: grid, chosen rate, seeds, test perplexity mean / spread / range, vs AdamW."""
    groups = study_groups(records)
    if not groups:
        return None
    ppl = {run: [p for r in g["final"] if r["status"] == "ok" and (p := as_number(r["quality"]["perplexity"]))]
           for run, g in groups.items()}
    reference = next((run for run, g in groups.items() if g["method"] == REFERENCE), None)
    base = _stats(ppl[reference]) if reference else {}
    rows = []
    for run, group in groups.items():
        stats = _stats(ppl[run])
        nll = [n for r in group["final"] if r["status"] == "ok"
               and (n := as_number((r["quality"].get("eval") or {}).get("nll"))) is not None]
        mean, reference_mean = stats["mean"], base.get("mean")
        versus = (mean / reference_mean - 1) * 100 if mean and reference_mean else None
        seeds = " ".join(str(r["train"]["seed"]) for r in group["final"] if r["status"] == "ok")
        chosen = group["chosen"] if group["chosen"] is not None else \
            f"grid {group['grid_done']} of {len(group['grid'])} run"
        edge = len(group["grid"]) > 1 and group["chosen"] in (min(group["grid"]), max(group["grid"]))
        rows.append({"run": run, "method": group["method"], "lr grid": " ".join(f"{lr:g}" for lr in group["grid"]),
                     "chosen lr": chosen, "at grid edge": "yes" if edge else "", "seeds": seeds,
                     "test ppl mean": stats["mean"], "spread": stats["spread"], "low": stats["low"],
                     "high": stats["high"],
                     "bits/byte" if group["data"] == "wiki-bytes" else "nll":
                         statistics.fmean(nll) / (math.log(2) if group["data"] == "wiki-bytes" else 1) if nll
                         else None,
                     "vs AdamW %": versus,
                     "beyond spread": "-" if run == reference else _verdict(ppl[run], ppl[reference] if reference
                                                                            else [])})
    return pd.DataFrame(rows)


def cost_table(records: list[dict[str, Any]], labels: list[str]) -> pd.DataFrame | None:
    """Step time over AdamW's per method, from the interleaved measurement's records."""
    rows = []
    for record, label in zip(records, labels):
        section = record["throughput"].get("interleaved")
        if not isinstance(section, dict) or record["status"] != "ok":
            continue
        refresh = section.get("refresh") or {}
        rows.append({"run": label, "method": record["method"]["name"],
                     "step s (median)": as_number(section.get("step_seconds_median")),
                     "x AdamW": as_number(section.get("ratio")),
                     "x AdamW (CPU time)": as_number(section.get("ratio_cpu")),
                     "update_proj_gap": refresh.get("update_proj_gap"),
                     "refresh extra s": as_number(refresh.get("refresh_extra_seconds")),
                     "amortised extra s": as_number(refresh.get("amortised_extra_seconds")),
                     "x AdamW amortised": as_number(refresh.get("ratio_amortised", section.get("ratio"))),
                     "timed steps": section.get("timed_steps")})
    return pd.DataFrame(rows) if rows else None


def study_points(records: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[str]] | None:
    """One point per study run for the memory-vs-perplexity chart: its mean peak and mean test perplexity over
    the seeds at the chosen rate (the grid's other rates and the cost records are not points); None if no study."""
    groups = study_groups(records)
    points, labels = [], []
    for run, group in groups.items():
        done = [r for r in group["final"] if r["status"] == "ok"]
        peaks = [p for r in done if (p := r["memory"]["peak_bytes"])]
        ppl = [p for r in done if (p := as_number(r["quality"]["perplexity"])) is not None]
        if peaks and ppl:
            points.append({"status": "ok", "memory": {"peak_bytes": int(statistics.fmean(peaks))},
                           "quality": {"perplexity": statistics.fmean(ppl)}})
            labels.append(f"{run} (lr {group['chosen']:g})")
    return (points, labels) if groups else None
