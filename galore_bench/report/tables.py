"""Report tables: our records laid out like the papers' tables, the paper's numbers beside ours where the
setting matches, and a value more than 5% off flagged with its known cause (usually a different convention).

Here: the breakdown, LOMO Table 1, speed, the budget table and the shared number helpers; the GaLore paper's
tables are in report/galore.py, how a table is written as text in report/table_text.py. Every builder returns a
pandas DataFrame (None when no run fits it); report/render.py decides where tables go.
"""
from __future__ import annotations

import math
from typing import Any

import pandas as pd

from galore_bench.record import breakdown_of, category_peaks_of, peak_of, reading_of, reserved_of
from galore_bench.units import CATEGORIES, GB, GIB

FLAG_PERCENT = 5.0
# (method, layerwise) -> claim in the galore_7b_totals table (LLaMA-7B, token batch 256, no checkpointing)
FIT_ITEMS = {("adamw", False): "bf16_adam_baseline_total", ("adam8bit", False): "8bit_adam_total_implied",
             ("galore8bit", True): "8bit_galore_layerwise_total"}

LOMO_CAUSES = {  # (method or "*", quantity) -> why ours differs from LOMO Table 1
    ("adamw", "optimizer_states"): "paper: fp32 weight copy + two fp32 moments, 6.74e9 x (4+4+4) B = 75.31 GiB; "
    "this run has no master copy (train.precision bf16-master gives the paper's)",
    ("sgd", "optimizer_states"): "the paper's 25.10 GiB is the fp32 weight copy (6.74e9 x 4 B); this run has no "
    "master copy and SGD without momentum keeps no state (train.precision bf16-master gives the paper's)",
    ("lomo", "gradients"): "LOMO updates each parameter as soon as its gradient exists: the paper counts the one live "
    "gradient (0.24 GiB = 32000x4096 x 2 B); at our peak none is stored (one in flight counts as 'other')",
    ("*", "gradients"): "the peak falls inside backward, before every gradient exists "
    "(one in flight counts as 'other')",
    ("*", "activations"): "our own maximum is at the end of forward: with checkpointing, the saved layer inputs "
    "(1.00 GiB), the final norm's and LM head's inputs (0.1) and the loss's logits-sized tensors, with today's fp32 "
    "copy of the logits and fp32 log-softmax (0.49 GiB each) that the paper's code had not (loss 'model-dtype')",
    ("*", "peak"): "our peak is one moment of the step; the paper's total adds every column as if all were live at "
    "once, so the differences above add up here",
}
ACTIVATIONS_FREED = ("our breakdown is a snapshot at the peak, which falls after the activations are freed (end of "
                     "backward / optimizer step); the paper lists each category's own size")
FIT_CAUSES = {
    "bf16_adam_baseline_total": "Figure 1 is an estimate adding 14 GB weights + 42 GB states and gradients + 2 GB "
    "activations; our peak is the optimizer step (activations freed), where foreach AdamW, PyTorch's default on a "
    "GPU, holds a full-size temporary of the second moments (13.5 GB) that the estimate leaves out",
    "8bit_adam_total_implied": "derived, not printed (22.0 GB + the 24.5 GB saving of Sec. 5.5); no breakdown given",
    "8bit_galore_layerwise_total": "Sec. 5.5 is a measurement at a per-GPU token batch up to 500",
}


def as_number(value: Any) -> float | None:
    """A finite float, or None for null/NaN (a figure the run did not reach, or its engine lacks)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def paper_diff(ours: float | None, paper: float | None) -> tuple[float | None, bool]:
    """(ours - paper) / paper in %, and whether that is off by more than 5%; a paper zero matches only a zero."""
    if ours is None or paper is None or (isinstance(paper, float) and math.isnan(paper)):
        return None, False
    diff = (0.0 if abs(ours) < 0.005 else math.inf) if paper == 0 else (ours - paper) / paper * 100
    return diff, abs(diff) > FLAG_PERCENT


def per_unit(value: float | None, unit: float | None) -> float | None:
    return value / unit if value is not None and unit else None


def _setting(record: dict[str, Any], strategy: str | None = None, world: int | None = None) -> tuple:
    """What an inference run must share with a training run to be its floor: model, tokens, dtype, mode, device,
    and, per rank, the world size and FSDP2's offload and unit. A DDP rank holds a whole replica: its floor is
    the single-device one (inference itself cannot run under DDP: nothing requires a gradient)."""
    train, spread = record["train"], record["distributed"] or {}
    strategy = strategy if strategy is not None else spread.get("strategy")
    world = world if world is not None else spread.get("world_size") or 1
    base = (record["model"]["name"], train.get("batch_size"), train.get("seq_len"), train.get("dtype"),
            record["mode"], record["device"])
    if strategy in (None, "single", "ddp") or world == 1:
        return (*base, 1, None, None)
    return (*base, world, spread.get("cpu_offload"), spread.get("fsdp_unit"))


def _inference_floors(records: list[dict[str, Any]]) -> dict[tuple, int]:
    """Peak of each finished inference run per setting; a simulated sweep over world sizes gives one per size."""
    runs = sorted((r for r in records if r["method"]["name"] == "inference" and r["status"] == "ok"
                   and peak_of(r)), key=lambda r: r["created"], reverse=True)
    floors: dict[tuple, int] = {}
    for record in runs:  # the newest run at its own setting first, then the sweeps' other sizes where none ran
        floors.setdefault(_setting(record), peak_of(record) or 0)
    for record in runs:
        for candidate in (record["distributed"] or {}).get("candidates", []):
            floors.setdefault(_setting(record, candidate["strategy"], candidate["world_size"]),
                              candidate["peak_bytes"])
    return floors


def breakdown_table(records: list[dict[str, Any]], labels: list[str]) -> pd.DataFrame:
    """LOMO Table 1 layout for our runs: each category in GiB and as a share of the peak; with an inference run
    of the same setting, each peak as a multiple of it (LOMO's claim: memory close to inference)."""
    floors = _inference_floors(records)
    rows = []
    for record, label in zip(records, labels):
        peak, parts = peak_of(record), breakdown_of(record)
        row = {"run": label, "method": record["method"]["name"], "model": record["model"]["name"],
               "status": record["status"], "peak GiB": per_unit(peak, GIB)}
        for cat in CATEGORIES:
            row.update({f"{cat} GiB": per_unit(parts.get(cat), GIB),
                        f"{cat} %": per_unit(parts.get(cat), per_unit(peak, 100))})
        if floors:
            row["x inference"] = per_unit(peak, floors.get(_setting(record)))
        rows.append(row)
    return pd.DataFrame(rows)


def _lomo_row(record: dict[str, Any], paper: pd.DataFrame) -> pd.Series | None:
    """The LOMO Table 1 row for this run, only at the paper's setting (LLaMA-7B, batch 8 x 512)."""
    train = record["train"]
    if record["model"]["name"] != "7b" or (train.get("batch_size"), train.get("seq_len")) != (8, 512):
        return None
    ac = "yes" if train.get("activation_checkpointing") else "no"
    checkpointing = paper["activation_checkpointing"]
    match = paper[(paper["optimizer"] == record["method"]["name"]) & (checkpointing == ac)]
    return match.iloc[0] if len(match) else None


def _paper_loss_cause(record: dict[str, Any], records: list[dict[str, Any]], labels: list[str],
                      theirs: float | None) -> str:
    """The measured cause of a full-loss run's activations cell: the same method and precision traced on the
    paper's loss path (loss 'model-dtype'), when such a run is in the report; '' when none is."""
    for other, label in zip(records, labels):
        same = (other["method"]["name"], other["train"].get("precision"), other["train"].get("loss")) == (
            record["method"]["name"], record["train"].get("precision"), "model-dtype")
        own = (category_peaks_of(other) or breakdown_of(other)).get("activations") if same else None
        if own and theirs:
            delta = ((category_peaks_of(record) or breakdown_of(record)).get("activations", 0) - own) / GIB
            return (f"measured: the same step on the paper's loss path (run {label}: model-dtype logits, their "
                    f"shifted copy and its model-dtype log-softmax, as LOMO's get_loss on transformers 4.30) traces "
                    f"{own / GIB:.2f} GiB ({(own / GIB - theirs) / theirs * 100:+.1f}%); the {delta:.2f} GiB between "
                    "them is today's fp32 copy of the logits and fp32 log-softmax (transformers 4.31+) in place "
                    "of the model-dtype copy and log-softmax")
    return ""


def lomo_table(records: list[dict[str, Any]], labels: list[str], paper: pd.DataFrame) -> pd.DataFrame | None:
    """Each category of ours beside LOMO Table 1 (GiB), with the difference and the known cause.

    The paper lists each category's own size, so the comparison uses each category's own maximum over the
    step (`memory.category_peaks`) where the record has it; the composition at the peak is shown beside it.
    A run on transformers' loss path takes its activations cause from a run on the paper's, when there is one.
    """
    rows = []
    for record, label in zip(records, labels):
        (peak, parts), ref = (peak_of(record), breakdown_of(record)), _lomo_row(record, paper)
        if ref is None or not peak:
            continue
        own = category_peaks_of(record)
        for quantity in (*CATEGORIES, "peak"):
            at_peak = (peak if quantity == "peak" else parts.get(quantity, 0)) / GIB
            ours = (own.get(quantity, at_peak * GIB) / GIB) if own and quantity != "peak" else at_peak
            column = "total" if quantity == "peak" else quantity
            theirs = float(ref[column]) if column in ref.index else None
            diff, flagged = paper_diff(ours, theirs)
            freed = quantity == "activations" and theirs and ours < 0.1 * theirs
            cause = ACTIVATIONS_FREED if freed else (LOMO_CAUSES.get((record["method"]["name"], quantity))
                                                     or LOMO_CAUSES.get(("*", quantity), ""))
            train = record["train"]
            if quantity == "activations" and not freed and train.get("loss", "full") == "full":
                cause = _paper_loss_cause(record, records, labels, theirs) or cause
            rows.append({"run": label, "precision": train.get("precision") or train.get("dtype"),
                         "loss": train.get("loss", "full"),
                         "ac": ref["activation_checkpointing"], "quantity": quantity,
                         "ours GiB": ours,
                         "at peak GiB": at_peak, "% of peak": at_peak * GIB / peak * 100, "paper GiB": theirs,
                         "diff %": diff, "flag": ">5%" if flagged else "", "cause": cause if flagged else ""})
    return pd.DataFrame(rows) if rows else None


def speed_table(records: list[dict[str, Any]], labels: list[str]) -> pd.DataFrame | None:
    """Throughput and quality per run (measured runs only: a simulated run has neither); empty columns dropped."""
    rows = []
    for record, label in zip(records, labels):
        speed, quality = record["throughput"], record["quality"]
        values = {"tokens/s": speed.get("tokens_per_second"), "TGS": speed.get("tgs"), "MFU": speed.get("mfu"),
                  "step s (median)": speed.get("step_seconds_median"), "final loss": quality.get("final_loss"),
                  "perplexity": quality.get("perplexity")}
        values = {key: as_number(value) for key, value in values.items()}
        if any(value is not None for value in values.values()):
            rows.append({"run": label, "method": record["method"]["name"], "model": record["model"]["name"],
                         "device": record["device"], "status": record["status"], **values})
    return pd.DataFrame(rows).dropna(axis=1, how="all") if rows else None


def reading_bytes(record: dict[str, Any]) -> dict[str, int | None]:
    """allocated, reserved and device_total in bytes (None where the record has none); a record without readings
    (written by hand) shows its peak as allocated."""
    allocated = reading_of(record, "allocated")
    total = reading_of(record, "device_total")
    return {"allocated": allocated["bytes"] if allocated else peak_of(record), "reserved": reserved_of(record)[0],
            "device_total": total["bytes"] if total else None}


def _reserved(record: dict[str, Any]) -> dict[str, Any]:
    reserved, source = reserved_of(record)
    if not source:
        return {}
    found = reading_bytes(record)
    return {"allocated GiB": per_unit(found["allocated"], GIB), "reserved GiB": per_unit(reserved, GIB),
            "reserved from": source, "device total GiB": per_unit(found["device_total"], GIB)}


def _best_reading(record: dict[str, Any], theirs: float) -> str:
    """The reading (or the tracker's peak) nearest a paper figure in GB, with its difference."""
    candidates = {"peak": peak_of(record), **reading_bytes(record)}
    diffs = {name: paper_diff(per_unit(value, GB), theirs)[0] for name, value in candidates.items()}
    known = {name: diff for name, diff in diffs.items() if diff is not None}
    if not known:
        return "-"
    name = min(known, key=lambda n: abs(known[n]))
    return f"{name.replace('_', ' ')} ({known[name]:+.1f}%)"


def fit_table(records: list[dict[str, Any]], labels: list[str], paper: pd.DataFrame | None) -> pd.DataFrame | None:
    """Peak against the budget, and the GaLore paper's 7B totals (22.0 GB for 8-bit layer-wise GaLore)."""
    rows = []
    for record, label in zip(records, labels):
        budget, peak, train = record["budget"], peak_of(record), record["train"]
        if not budget.get("bytes"):
            continue
        row: dict[str, Any] = {"run": label, "status": record["status"], "peak GiB": per_unit(peak, GIB),
                               "peak GB": per_unit(peak, GB), "budget": budget.get("text"), "fits": budget.get("fits"),
                               "headroom GiB": per_unit(budget["bytes"] - peak, GIB) if peak is not None else None,
                               **_reserved(record)}
        paper_setting = (record["model"]["name"] == "7b" and not train.get("activation_checkpointing")
                         and train.get("batch_size", 0) * train.get("seq_len", 0) == 256)
        key = (record["method"]["name"], bool(record["method"].get("layerwise")))
        item = FIT_ITEMS.get(key) if paper_setting else None
        match = paper[paper["claim"] == item] if paper is not None and item is not None else pd.DataFrame()
        if item is not None and len(match):
            theirs = float(match.iloc[0]["memory"])
            diff, flagged = paper_diff(row["peak GB"], theirs)
            row.update({"paper GB": theirs, "paper kind": match.iloc[0]["kind"], "diff %": diff,
                        "compared with": "peak", "best reading": _best_reading(record, theirs),
                        "flag": ">5%" if flagged else "", "cause": FIT_CAUSES[item] if flagged else ""})
        rows.append(row)
    return pd.DataFrame(rows) if rows else None
