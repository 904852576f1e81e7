"""The `successors` table: GaLore's successors' own LLaMA-7B memory claims (their repositories' scripts and READMEs)
beside our readings of the same recipe, and which reading each claim is closest to.

A claim names no measuring tool, so each is set beside the three readings of the matching run (readings.py):
allocated (the allocator's block peak), reserved (the CUDA allocator's when measured, the caching-allocator model's
when simulated) and device_total (what nvidia-smi shows: measured through NVML, estimated in simulate), each read
in GB (1e9) and in GiB. A claim matches a run of the same method, per-layer setting, token batch (batch x 256),
checkpointing and (GaLore) rank on the claim's model in BF16; a claim for INT8 weights is shown beside our BF16-weight
run of that recipe (the weight bytes named), and a claim with no run at its setting is listed without ours. A
fine-tuning claim (BAdam's, Llama-3-8B) is set beside our run of its recipe at the scenario's setting, the
difference of batch, length and checkpointing named in the note.
"""
from __future__ import annotations

from typing import Any

import pandas as pd

from galore_bench.record import peak_of, reading_of, reserved_of
from galore_bench.report.tables import paper_diff, per_unit
from galore_bench.units import GB, GIB

SEQ_LEN = 256
NOTES = [
    ("Claims: the repositories' 'memory cost' comments (galore_bench/report/reference/successors_7b_claims.csv, "
     "from ../shared/reference/external/galore_family_readmes.csv); none says how it was read. A tool like "
     "nvidia-smi shows the reserved pool plus the CUDA context and library workspaces: our device_total (an "
     "estimate from published context sizes in simulate, galore_bench/readings.py). A run over the budget shows "
     "its traced peak as allocated (the allocator model stops at the budget)."),
    ("closest reading: the one of allocated / reserved x GB / GiB nearest the claim; a claim more than 5% from "
     "every reading is flagged."),
]


def _matches(record: dict[str, Any], claim: pd.Series) -> bool:
    """The same recipe on the claim's model in BF16; and, unless the claim's setting is 'any', its batch, length
    256 and checkpointing."""
    train, method = record["train"], record["method"]
    recipe = (record["model"]["name"] == claim["model"] and record["status"] == "ok" and train.get("dtype") == "bf16"
              and method["name"] == claim["method"]
              and _per_layer(method) == (claim["per_layer"] == "yes")
              and (method["name"] != "galore8bit" or method.get("rank") == int(claim["rank"])))
    return recipe and (claim["setting"] == "any" or _setting_differs(record, claim) == "")


def _setting_differs(record: dict[str, Any], claim: pd.Series) -> str:
    """How our run's batch, length and checkpointing differ from the claim's ('' where they agree)."""
    train = record["train"]
    ours = (train.get("batch_size"), train.get("seq_len"), bool(train.get("activation_checkpointing")))
    if ours == (int(claim["batch"]), SEQ_LEN, claim["grad_ckpt"] == "yes") and claim["model"] == "7b":
        return ""
    return (f"our run: batch {ours[0]} x {ours[1]} tokens, checkpointing {'on' if ours[2] else 'off'}; the claim's: "
            f"batch {claim['batch']}, checkpointing {'on' if claim['grad_ckpt'] == 'yes' else 'off'} "
            "(a fine-tuning setting this scenario does not reproduce)")


def _per_layer(method: dict[str, Any]) -> bool:
    """Per-layer updates: asked for (`layerwise`), or what the method always does (Q-GaLore's implementation)."""
    return bool(method.get("layerwise") or (method.get("implementation") or {}).get("layerwise"))


def _readings(record: dict[str, Any]) -> dict[str, float | None]:
    """allocated, reserved, device_total in GB and GiB. Where the allocator model ran out of memory at the budget it
    read only part of the step: allocated is then the traced peak (storage bytes), the other two are absent."""
    stopped = "OOM" in str(reserved_of(record)[1] or "")
    fallback = {"allocated": peak_of(record), "reserved": None if stopped else reserved_of(record)[0],
                "device_total": None}  # a record of schema 2 or before has no readings
    values: dict[str, float | None] = {}
    for name in ("allocated", "reserved", "device_total"):
        found = None if stopped else reading_of(record, name)
        held = found["bytes"] if found else fallback[name]
        values[f"{name} GB"], values[f"{name} GiB"] = per_unit(held, GB), per_unit(held, GIB)
    return values


def _closest(readings: dict[str, float | None], claimed: float) -> tuple[str, float | None, bool]:
    """(the reading nearest the claim, its difference in %, whether every reading is more than 5% off)."""
    diffs = {name: paper_diff(value, claimed) for name, value in readings.items() if value is not None}
    if not diffs:
        return "", None, False
    name = min(diffs, key=lambda n: abs(diffs[n][0] or 0.0))
    return name, diffs[name][0], all(off for _, off in diffs.values())


def _claim_row(claim: pd.Series, record: dict[str, Any] | None, label: str) -> dict[str, Any]:
    claimed = float(claim["memory"])
    low = claim.get("memory_low")
    row: dict[str, Any] = {"claim": claim["row"], "source": claim["source"], "gpu": claim["gpu"],
                           "claim GB": claimed, "claim low GB": None if pd.isna(low) else float(low),
                           "our run": label or "-"}
    if record is None:
        return {**row, "note": "no run of this recipe at this setting"}
    readings = _readings(record)
    name, diff, off = _closest(readings, claimed)
    note = ""
    weights, parameters = record["memory"]["breakdown"].get("weights", 0), record["model"].get("parameters") or 0
    if claim["weights"] == "int8" and parameters and weights / parameters > 1.5:
        note = (f"the claim keeps INT8 weights; our run holds {weights / parameters:.2f} B per weight "
                f"({weights / GB:.2f} GB), not INT8 (q_apollo_mini and qgalore store INT8 weights)")
    note = "; ".join(text for text in (note, _setting_differs(record, claim)) if text)
    return {**row, **readings, "closest reading": name, "diff %": diff, "flag": ">5%" if off else "", "note": note}


def successors_table(records: list[dict[str, Any]], labels: list[str], claims: pd.DataFrame) -> pd.DataFrame | None:
    """One row per claim and matching run (or per claim, without ours, when no run matches); None when no run
    matches any claim (a scenario at another setting)."""
    rows, matched = [], False
    for _, claim in claims.iterrows():
        found = [(r, label) for r, label in zip(records, labels) if _matches(r, claim)]
        matched = matched or bool(found)
        rows += [_claim_row(claim, r, label) for r, label in found] or [_claim_row(claim, None, "")]
    return pd.DataFrame(rows) if matched else None
