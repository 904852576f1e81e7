"""Reports: our records beside the papers' numbers (LOMO Table 1, GaLore Tables 2/6, 7B on a 24 GB card).

Per scenario: markdown (provenance first, so every number traces back to its runs), a CSV per table, a stacked
memory chart and rich tables. Paper columns appear only where the run's setting matches the paper's; a value
more than 5% off is flagged with its known cause (usually a different precision convention).
"""
from __future__ import annotations

import math
import os
import time
from collections import defaultdict
from itertools import groupby
from pathlib import Path
from typing import Any

import pandas as pd
from rich.console import Console
from rich.table import Table

from galore_bench.record import find_records, load_record
from galore_bench.scenario import UserError

GIB, GB = 2**30, 10**9
CATEGORIES = ("weights", "gradients", "optimizer_states", "activations", "other")
COLORS = ("#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8C8C8C")
FORMATS = ("md", "csv", "png", "svg")
FLAG_PERCENT = 5.0
REFERENCE_ENV = "GALORE_BENCH_REFERENCE"
REQUIRED = ("scenario", "run", "method", "mode", "device", "status", "model", "train", "budget", "memory")
GALORE_NAMES = {"adamw": "full_rank", "galore": "galore", "lowrank": "low_rank", "lora": "lora", "relora": "relora"}
# (method, layerwise) -> row of galore_memory_7b.csv (LLaMA-7B, token batch 256, no checkpointing)
FIT_ITEMS = {("adamw", False): "bf16_adam_baseline_total", ("adam8bit", False): "8bit_adam_total_implied",
             ("galore8bit", True): "8bit_galore_layerwise_total"}

LOMO_CAUSES = {  # (method or "*", quantity) -> why ours differs from LOMO Table 1
    ("adamw", "optimizer_states"): "paper: mixed precision, fp32 weight copy + two fp32 moments, 6.74e9 x (4+4+4) B = "
    "75.31 GiB; ours: pure BF16, two bf16 moments, no master copy (6.74e9 x 4 B)",
    ("sgd", "optimizer_states"): "the paper's 25.10 GiB is mixed precision's fp32 weight copy (6.74e9 x 4 B); "
    "pure-BF16 SGD without momentum keeps no state",
    ("lomo", "gradients"): "LOMO updates each parameter as soon as its gradient exists: the paper counts the one live "
    "gradient (0.24 GiB = 32000x4096 x 2 B); at our peak none is stored (one in flight counts as 'other')",
    ("*", "gradients"): "the peak falls inside backward, before every gradient exists (one in flight counts as 'other')",
    ("*", "activations"): "with checkpointing the activations depend on what is saved (layer inputs, logits, the "
    "loss's copy); activations recomputed in backward count as 'other'",
    ("*", "peak"): "our peak is one moment of the step; the paper's total adds every column as if all were live at "
    "once, so the differences above add up here",
}
ACTIVATIONS_FREED = ("our breakdown is a snapshot at the peak, which falls after the activations are freed (end of "
                     "backward / optimizer step); the paper lists each category's own size")
FIT_CAUSES = {
    "bf16_adam_baseline_total": "Figure 1 is an estimate adding 14 GB weights + 42 GB states and gradients + 2 GB "
    "activations as if all live at once; our peak is in the optimizer step, after the activations are freed "
    "(and 13.48 GB of weights is printed as 14)",
    "8bit_adam_total_implied": "derived, not printed (22.0 GB + the 24.5 GB saving of Sec. 5.5); no breakdown given",
    "8bit_galore_layerwise_total": "Sec. 5.5 is a measurement at a per-GPU token batch up to 500",
}
GALORE_NOTE = ("The paper's Table 2/6 memory is an estimate of BF16 weights + optimizer states; ours is what the "
               "run's storages hold at the peak (512-byte allocator rounding, adapters, projection matrices).")


def reference_dir() -> Path:
    """Where the papers' CSVs are: $GALORE_BENCH_REFERENCE, else shared/reference beside the checkout."""
    env = os.environ.get(REFERENCE_ENV)
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "reference"


def load_references(folder: Path) -> dict[str, pd.DataFrame]:
    """The reference tables that exist (a missing one just drops its paper columns)."""
    names = {"lomo": "lomo_table1.csv", "galore": "galore_table6_split.csv", "fit": "galore_memory_7b.csv"}
    return {key: pd.read_csv(folder / name, comment="#", dtype={"ac": str})
            for key, name in names.items() if (folder / name).is_file()}


def load_records(paths: list[Path]) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Records under the paths, newest per (scenario, run, mode, device); and older ones skipped, per scenario."""
    files = find_records([Path(p) for p in paths])
    if not files:
        raise UserError(f"no result records under {', '.join(map(str, paths))}: run `galore-bench run` first")
    records = [load_record(path) for path in files]
    for path, record in zip(files, records):
        if missing := [key for key in REQUIRED if key not in record]:
            raise UserError(f"{path}: not a galore-bench result record (missing {', '.join(missing)})")
    latest: dict[tuple, dict[str, Any]] = {}
    skipped: dict[str, int] = defaultdict(int)
    for record in sorted(records, key=lambda r: r.get("created") or ""):
        key = (record["scenario"], record["run"], record["mode"], record["device"])
        skipped[record["scenario"]] += key in latest
        latest[key] = record
    order = lambda r: (r["scenario"], r["model"].get("parameters") or 0, r.get("created") or "")
    return sorted(latest.values(), key=order), skipped


def _compare(ours: float | None, paper: float | None) -> tuple[float | None, bool]:
    """(ours - paper) / paper in %, and whether that is off by more than 5%; a paper zero matches only a zero."""
    if ours is None or paper is None or (isinstance(paper, float) and math.isnan(paper)):
        return None, False
    diff = (0.0 if abs(ours) < 0.005 else math.inf) if paper == 0 else (ours - paper) / paper * 100
    return diff, abs(diff) > FLAG_PERCENT


def _memory(record: dict[str, Any]) -> tuple[int | None, dict[str, int]]:
    """Peak bytes and breakdown; None and {} when the run died before measuring."""
    memory = record.get("memory") or {}
    return memory.get("peak_bytes"), memory.get("breakdown") or {}


def _per(value: float | None, unit: float | None) -> float | None:
    return value / unit if value is not None and unit else None


def breakdown_table(records: list[dict[str, Any]], labels: list[str]) -> pd.DataFrame:
    """LOMO Table 1 layout for our runs: each category in GiB and as a share of the peak."""
    rows = []
    for record, label in zip(records, labels):
        peak, parts = _memory(record)
        row = {"run": label, "method": record["method"]["name"], "model": record["model"]["name"],
               "status": record["status"], "peak GiB": _per(peak, GIB)}
        for cat in CATEGORIES:
            row.update({f"{cat} GiB": _per(parts.get(cat), GIB), f"{cat} %": _per(parts.get(cat), _per(peak, 100))})
        rows.append(row)
    return pd.DataFrame(rows)


def _lomo_row(record: dict[str, Any], paper: pd.DataFrame) -> pd.Series | None:
    """The LOMO Table 1 row for this run, only at the paper's setting (LLaMA-7B, batch 8 x 512)."""
    train = record["train"]
    if record["model"]["name"] != "7b" or (train.get("batch_size"), train.get("seq_len")) != (8, 512):
        return None
    ac = "yes" if train.get("activation_checkpointing") else "no"
    match = paper[(paper["optimizer"] == record["method"]["name"]) & (paper["ac"] == ac)]
    return match.iloc[0] if len(match) else None


def lomo_table(records: list[dict[str, Any]], labels: list[str], paper: pd.DataFrame) -> pd.DataFrame | None:
    """Each category of ours beside LOMO Table 1 (GiB), with the difference and the known cause."""
    rows = []
    for record, label in zip(records, labels):
        (peak, parts), ref = _memory(record), _lomo_row(record, paper)
        if ref is None or not peak:
            continue
        for quantity in (*CATEGORIES, "peak"):
            ours = (peak if quantity == "peak" else parts.get(quantity, 0)) / GIB
            column = {"weights": "params", "peak": "total_printed"}.get(quantity, quantity)
            theirs = float(ref[column]) if column in ref.index else None
            diff, flagged = _compare(ours, theirs)
            freed = quantity == "activations" and theirs and ours < 0.1 * theirs
            cause = ACTIVATIONS_FREED if freed else (LOMO_CAUSES.get((record["method"]["name"], quantity))
                                                     or LOMO_CAUSES.get(("*", quantity), ""))
            rows.append({"run": label, "ac": ref["ac"], "quantity": quantity, "ours GiB": ours,
                         "% of peak": ours * GIB / peak * 100, "paper GiB": theirs, "diff %": diff,
                         "flag": ">5%" if flagged else "", "cause": cause if flagged else ""})
    return pd.DataFrame(rows) if rows else None


def galore_table(records: list[dict[str, Any]], labels: list[str], paper: pd.DataFrame) -> pd.DataFrame | None:
    """Weights and optimizer states (GB, 1e9) beside GaLore Table 6, the split of Table 2's memory column."""
    rows = []
    for record, label in zip(records, labels):
        name, size, parts = GALORE_NAMES.get(record["method"]["name"]), record["model"]["name"], _memory(record)[1]
        match = paper[(paper["method"] == name) & (paper["size"] == size)]
        if name is None or not len(match) or not parts:
            continue
        row: dict[str, Any] = {"run": label, "method": name, "size": size}
        flags: list[str] = []
        for cat in ("weights", "optimizer_states"):
            ours, theirs = parts.get(cat, 0) / GB, float(match.iloc[0][f"{cat}_gb"])
            diff, flagged = _compare(ours, theirs)
            row.update({f"{cat} GB": ours, f"paper {cat} GB": theirs, f"{cat} diff %": diff})
            flags += [cat] if flagged else []
        rows.append({**row, "flag": ", ".join(flags)})
    return pd.DataFrame(rows) if rows else None


def fit_table(records: list[dict[str, Any]], labels: list[str], paper: pd.DataFrame | None) -> pd.DataFrame | None:
    """Peak against the budget, and the GaLore paper's 7B totals (22.0 GB for 8-bit layer-wise GaLore)."""
    rows = []
    for record, label in zip(records, labels):
        budget, peak, train = record["budget"], _memory(record)[0], record["train"]
        if not budget.get("bytes"):
            continue
        row: dict[str, Any] = {"run": label, "status": record["status"], "peak GiB": _per(peak, GIB),
                               "peak GB": _per(peak, GB), "budget": budget.get("text"), "fits": budget.get("fits"),
                               "headroom GiB": _per(budget["bytes"] - peak, GIB) if peak is not None else None}
        paper_setting = (record["model"]["name"] == "7b" and not train.get("activation_checkpointing")
                         and train.get("batch_size", 0) * train.get("seq_len", 0) == 256)
        key = (record["method"]["name"], bool(record["method"].get("layerwise")))
        item = FIT_ITEMS.get(key) if paper is not None and paper_setting else None
        match = paper[paper["item"] == item] if item else []
        if len(match):
            theirs = float(match.iloc[0]["value_gb"])
            diff, flagged = _compare(row["peak GB"], theirs)
            row.update({"paper GB": theirs, "paper kind": match.iloc[0]["kind"], "diff %": diff,
                        "flag": ">5%" if flagged else "", "cause": FIT_CAUSES[item] if flagged else ""})
        rows.append(row)
    return pd.DataFrame(rows) if rows else None


def plot_breakdown(records: list[dict[str, Any]], labels: list[str], title: str, paths: list[Path]) -> None:
    """GaLore Figure 4 style: stacked breakdown per run (one panel per model size), budget as a dashed line."""
    from matplotlib.figure import Figure  # no pyplot: no global backend state, renders with Agg
    from matplotlib.patches import Patch
    sizes = list(dict.fromkeys(r["model"]["name"] for r in records))
    groups = [[i for i, r in enumerate(records) if r["model"]["name"] == size] for size in sizes]
    fig = Figure(figsize=(max(6.5, 1.0 * len(records) + 3.5), 5.2), layout="constrained")
    axes = fig.subplots(1, len(sizes), squeeze=False, width_ratios=[len(g) for g in groups])[0]
    for ax, size, group in zip(axes, sizes, groups):
        budget = records[group[0]]["budget"].get("bytes")
        tops = [budget / GIB if budget else 1e-3]
        for x, i in enumerate(group):
            (peak, parts), record, bottom = _memory(records[i]), records[i], 0.0
            failed, peak = record["status"] != "ok", (peak or 0) / GIB
            for cat, color in zip(CATEGORIES, COLORS):
                height = parts.get(cat, 0) / GIB
                ax.bar(x, height, bottom=bottom, color=color, width=0.7, edgecolor="white" if not failed else "k",
                       hatch="//" if failed else None, linewidth=0.5)
                bottom += height
            if failed and not parts and budget:  # died before measuring: an empty hatched bar up to the budget
                ax.bar(x, budget / GIB, width=0.7, fill=False, hatch="//", edgecolor="crimson", linewidth=0.8)
                bottom = budget / GIB
            text = (f"{record['status'].upper()}\n" if failed else "") + (f"{peak:.3g}" if peak else "")
            ax.text(x, max(bottom, peak), text, ha="center", va="bottom", fontsize=8,
                    color="crimson" if failed else "black", fontweight="bold" if failed else "normal")
            tops.append(max(bottom, peak))
        if budget:
            ax.axhline(budget / GIB, ls="--", color="crimson", lw=1.2)
            ax.text(0.99, budget / GIB, f"budget {records[group[0]]['budget'].get('text') or ''}", color="crimson",
                    ha="right", va="bottom", fontsize=8, transform=ax.get_yaxis_transform())
        short = [labels[i].removesuffix(f"-{size}") for i in group]
        ax.set_xticks(range(len(group)), short, rotation=30, ha="right", fontsize=9)
        ax.set(ylim=(0, max(tops) * 1.18), xlim=(-0.6, len(group) - 0.4), axisbelow=True)
        ax.grid(axis="y", alpha=0.3)
        ax.set_title(f"LLaMA-{size.upper()}" if len(sizes) > 1 else "", fontsize=10)
    axes[0].set_ylabel("memory at the peak (GiB)")
    handles = [Patch(facecolor=c, label=cat.replace("_", " ")) for cat, c in zip(CATEGORIES, COLORS)]
    if any(r["status"] != "ok" for r in records):
        handles.append(Patch(facecolor="white", edgecolor="k", hatch="//", label="oom / error"))
    fig.legend(handles=handles, loc="outside lower center", ncols=len(handles), fontsize=8, frameon=False)
    fig.suptitle(title, fontsize=11)
    for path in paths:
        fig.savefig(path, dpi=130)


def _cell(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):  # a small model's 0.0047 GiB keeps 3 digits rather than printing 0.00
        return f"{value:.3g}" if math.isinf(value) or 0.0005 <= abs(value) < 0.05 else f"{value:.2f}"
    return ("yes" if value else "NO") if isinstance(value, bool) else str(value)


def to_markdown(df: pd.DataFrame) -> str:
    """A pipe table; numeric columns right-aligned, 2 decimals (no `tabulate` dependency)."""
    numeric = [pd.api.types.is_float_dtype(df[c]) or pd.api.types.is_integer_dtype(df[c]) for c in df.columns]
    lines = ["| " + " | ".join(df.columns) + " |", "| " + " | ".join("---:" if n else "---" for n in numeric) + " |"]
    lines += ["| " + " | ".join(_cell(v).replace("|", "\\|") for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines)


def rich_table(title: str, df: pd.DataFrame) -> Table:
    table = Table(title=title, title_justify="left")
    for column in df.columns:
        table.add_column(column, justify="right" if pd.api.types.is_numeric_dtype(df[column]) else "left",
                         overflow="fold", max_width=48 if column == "cause" else None)
    for row in df.itertuples(index=False):
        table.add_row(*(_cell(v) for v in row))
    return table


def provenance(scenario: str, records: list[dict[str, Any]], skipped: int, ref: Path, refs: dict) -> list[str]:
    """Where the numbers come from: enough to rerun them or to tell two reports apart."""
    def values(get) -> str:
        return ", ".join(sorted({str(v) for v in map(get, records)})) or "-"
    packages = lambda name: lambda r: ((r.get("env") or {}).get("packages") or {}).get(name)
    found = ", ".join(sorted(refs)) if refs else "not found: paper columns omitted (set GALORE_BENCH_REFERENCE)"
    return [f"# Memory report: {scenario}", "",
            f"- records used: {len(records)}" + (f" ({skipped} older duplicate(s) skipped)" if skipped else ""),
            f"- mode(s): {values(lambda r: r['mode'])}; device(s): {values(lambda r: r['device'])}",
            f"- git commit(s): {values(lambda r: (r.get('env') or {}).get('git_commit'))}",
            f"- galore-bench: {values(packages('galore-bench'))}; torch: {values(packages('torch'))}",
            f"- paper references ({ref}): {found}",
            f"- generated: {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}",
            "- units: GiB = 2^30 bytes, GB = 10^9 bytes; breakdowns are the composition at the peak", ""]


SECTIONS = {
    "breakdown": ("Memory breakdown at the peak (LOMO Table 1 layout)", []),
    "vs_lomo_table1": ("Against LOMO Table 1 (LLaMA-7B, batch 8 x 512; paper in GiB, printed 'GB')",
                       ["The paper's `params` is our `weights`; it has no `other` column.",
                        "The paper trains in mixed precision (fp16 + fp32 master copy); our runs are pure BF16.",
                        "The paper's totals without checkpointing are 1.00 more than the sum of their parts."]),
    "vs_galore_table6": ("Against GaLore Table 2 memory (Table 6 split, GB = 1e9 bytes)", [GALORE_NOTE]),
    "budget": ("Peak against the budget (GB = 1e9 bytes; paper: GaLore Sec. 5.5 / Fig. 1 where it matches)", []),
}


def build_tables(records: list[dict[str, Any]], labels: list[str], refs: dict) -> dict[str, pd.DataFrame]:
    """Every table that has rows; paper comparisons only where their reference CSV was found."""
    tables = {"breakdown": breakdown_table(records, labels),
              "vs_lomo_table1": lomo_table(records, labels, refs["lomo"]) if "lomo" in refs else None,
              "vs_galore_table6": galore_table(records, labels, refs["galore"]) if "galore" in refs else None,
              "budget": fit_table(records, labels, refs.get("fit"))}
    return {name: df for name, df in tables.items() if df is not None}


def parse_formats(text: str | set[str]) -> set[str]:
    formats = {f.strip().lower() for f in (text.split(",") if isinstance(text, str) else text) if f.strip()}
    if not formats or formats - set(FORMATS):
        raise UserError(f"--format: got {text!r}, allowed: a comma-separated list of {', '.join(FORMATS)}")
    return formats


def render_report(record_paths: list[Path], out: Path, formats: set[str], *,
                  console: Console | None = None) -> list[Path]:
    """Write every table and chart for the records (files or folders); returns the files written."""
    formats = parse_formats(formats)
    records, skipped = load_records(record_paths)
    refs = load_references(ref) if (ref := reference_dir()).is_dir() else {}
    (out := Path(out)).mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for scenario, grouped in groupby(records, key=lambda r: r["scenario"]):  # records come sorted by scenario
        group = list(grouped)
        several = len({(r["mode"], r["device"]) for r in group}) > 1
        labels = [r["run"] + (f" [{r['mode']}, {r['device']}]" if several else "") for r in group]
        tables = build_tables(group, labels, refs)
        charts = [out / f"{scenario}_breakdown.{ext}" for ext in ("png", "svg") if ext in formats]
        if charts:
            modes = ", ".join(sorted({f"{r['mode']} on {r['device']}" for r in group}))
            plot_breakdown(group, labels, f"{scenario}: memory breakdown at the peak ({modes})", charts)
            written += charts
        for name, df in tables.items():
            if "csv" in formats:
                df.to_csv(out / f"{scenario}_{name}.csv", index=False, float_format="%.6f")
                written.append(out / f"{scenario}_{name}.csv")
            if console is not None:
                console.print(rich_table(f"{scenario}: {SECTIONS[name][0]}", df))
        if "md" in formats:
            lines = provenance(scenario, group, skipped[scenario], ref, refs)
            if charts:
                lines += [f"![memory breakdown]({charts[0].name})", ""]
            for name, df in tables.items():
                heading, notes = SECTIONS[name]
                lines += [f"## {heading}", "", to_markdown(df), ""] + [f"- {n}" for n in notes] + [""] * bool(notes)
            failed = [f"- {label}: {r['status']}: {((r.get('error') or '').strip() or '-').splitlines()[0][:200]}"
                      for r, label in zip(group, labels) if r["status"] != "ok"]
            lines += ["## Runs that did not finish", "", *failed, ""] if failed else []
            (out / f"{scenario}.md").write_text("\n".join(lines))
            written.append(out / f"{scenario}.md")
    return written
