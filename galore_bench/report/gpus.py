"""How many GPUs each run needs: the table a simulated world-size search (`world_size = [1, 2, ...]`) answers.

One row per record: the smallest world size whose per-rank peak fits the budget, the per-GPU peak there
and at every candidate, beside the LOMO paper's Table 2 GPU count where the method and size match, and
a sentence explaining any difference from the numbers themselves.
Run: galore-bench gpus results/ --out reports/cpu-simulate
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from galore_bench import store
from galore_bench.errors import UserError
from galore_bench.report.provenance import provenance
from galore_bench.report.references import paper_table, provenance_line
from galore_bench.report.table_text import csv_safe, md_text
from galore_bench.units import gib

PAPER = "lomo_table2"  # LOMO (arXiv 2306.09782) Table 2: GPUs and memory per GPU on RTX 3090s


def paper_rows(paper: pd.DataFrame | None) -> dict[tuple[str, str], dict[str, Any]]:
    """(size, optimizer) -> the paper's row; empty without the paper table."""
    rows = [] if paper is None else paper.to_dict("records")
    return {(row["model"], row["optimizer"]): row for row in rows}


def _gb(n: float | None) -> str:
    return "-" if n is None else f"{gib(n):.2f}"


def explain(row: dict[str, Any], budget: int, dist: dict[str, Any]) -> str:
    """Why our count is what it is, and why it differs from the paper's (from the record's own numbers)."""
    ours, paper, by_n = row["gpus_needed"], row["paper_gpus"], row["by_world_size"]
    b, n = dist["breakdown_at_count"], ours or row["world_size"]
    parts = (f"at {n} GPU(s): weights {_gb(b['weights'])} + gradients {_gb(b['gradients'])} + optimizer states "
             f"{_gb(b['optimizer_states'])} + activations {_gb(b['activations'])} + other {_gb(b['other'])} GiB")
    parts += (" (one device, no FSDP2)" if n == 1 else
              f" (other includes FSDP2's gathered units and unsharded gradients, {_gb(dist['transient_backward'])} GiB"
              " in backward)")
    smaller = [n for n in by_n if ours and n < ours]
    why_not_fewer = (f"; {smaller[-1]} GPU(s) would need {_gb(by_n[smaller[-1]])} GiB > {_gb(budget)} GiB"
                     if smaller else "")
    if paper is None:
        return "no paper row for this size" + "; " + parts + why_not_fewer
    if ours == paper:
        peak, printed = row["peak_bytes"], row["paper_memory_gb"]
        gap = f"{100 * (gib(peak) / printed - 1):+.0f}% vs the paper's {printed:.2f} per GPU" if printed else ""
        return (f"same count; {parts}{why_not_fewer}; peak {gap} (paper: DeepSpeed ZeRO-3's own buffers and fp16 "
                "mixed precision; ours: FSDP2, pure BF16)")
    if ours is None:
        return f"does not fit on any of {list(by_n)} GPUs; {parts}"
    at_paper = by_n.get(paper)
    direction = "more" if ours > paper else "fewer"
    detail = (f"at the paper's {paper} GPU(s) our per-GPU peak is {_gb(at_paper)} GiB vs the {_gb(budget)} GiB budget"
              if at_paper is not None else f"the paper's count {paper} was not among the candidates")
    return (f"{direction} than the paper: {detail}; {parts}. The paper's ZeRO-3 fetches smaller parameter "
            "buckets and overlaps differently, so its transient buffers are not ours")


def fit_rows(records: list[dict[str, Any]], papers: dict[tuple[str, str], dict[str, str]]) -> list[dict[str, Any]]:
    rows = []
    for record in records:
        dist = record["distributed"] or {}
        if record["status"] != "ok" or not dist.get("candidates"):
            continue
        size, method = record["model"]["name"], record["method"]["name"]
        paper = papers.get((size, method))
        by_n = {c["world_size"]: c["peak_bytes"] for c in dist["candidates"]}
        row = {"scenario": record["scenario"], "run": record["run"], "model": size, "method": method,
               "parameters_b": round(record["model"]["parameters"] / 1e9, 2), "strategy": dist["strategy"],
               "fsdp_unit": dist.get("fsdp_unit"), "gpus_needed": dist.get("gpus_needed"),
               "world_size": dist["world_size"], "peak_bytes": dist["max_rank_peak_bytes"],
               "paper_gpus": int(paper["gpus"]) if paper else None,
               "paper_memory_gb": float(paper["memory_per_gpu"]) if paper else None, "by_world_size": by_n}
        extra = {"breakdown_at_count": record["memory"]["breakdown"],
                 "transient_backward": (dist.get("transient_bytes") or {}).get("backward", 0)}
        row["explanation"] = explain(row, record["budget"]["bytes"] or 0, extra)
        rows.append(row)
    return rows


def gpus_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """One row per model size: GPUs needed, per-GPU peak at that count and at every count tried, the paper's."""
    sizes = sorted({n for r in rows for n in r["by_world_size"]})
    return pd.DataFrame([{
        "model": r["model"], "params (B)": f"{r['parameters_b']:.2f}", "method": r["method"],
        "GPUs needed": r["gpus_needed"] or f">{sizes[-1]}", "per-GPU peak GiB": _gb(r["peak_bytes"]),
        "paper GPUs": r["paper_gpus"] or "-",
        "paper per-GPU (printed GB)": "-" if r["paper_memory_gb"] is None else f"{r['paper_memory_gb']:.2f}",
        **{f"peak GiB @{n}": _gb(r["by_world_size"].get(n)) for n in sizes}, "explanation": r["explanation"]}
        for r in rows])


def gpus_table(records: list[dict[str, Any]], paper: pd.DataFrame | None) -> pd.DataFrame | None:
    """The GPUs-needed table for `galore-bench report`, when the records hold world-size searches."""
    rows = fit_rows(records, paper_rows(paper))
    return gpus_frame(rows) if rows else None


def write_pages(records: list[dict[str, Any]], files: list[Path], skipped: dict[str, int],
                out: Path) -> list[Path]:
    """<scenario>_gpus.md and .csv per scenario with world-size searches, from loaded records and files."""
    papers = paper_rows(paper_table(PAPER))
    rows = fit_rows(records, papers)
    if not rows:
        raise UserError("no ok record with a world-size search (distributed.world_size = [..]) among the records")
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for scenario in sorted({r["scenario"] for r in rows}):
        csv_path, md_path = (store.inside(out, f"{scenario}_gpus.{ext}") for ext in ("csv", "md"))
        mine = [r for r in rows if r["scenario"] == scenario]
        used = [(rec, f) for rec, f in zip(records, files) if rec["scenario"] == scenario]
        budget = next(rec["budget"]["text"] for rec, _ in used)
        frame = gpus_frame(mine)
        head, table = list(frame.columns), frame.values.tolist()
        csv_safe(frame).to_csv(csv_path, index=False)
        info = provenance([rec for rec, _ in used], [f for _, f in used], skipped.get(scenario, 0),
                          provenance_line([PAPER] if papers else []))
        first = mine[0]
        md = [f"# GPUs needed: {scenario}", "", *[f"- {line}" for line in info],
              f"- budget per GPU: {budget}; strategy {first['strategy']}"
              + (f", FSDP2 units: {first['fsdp_unit']}" if first["fsdp_unit"] else "")
              + "; world size 1 = one device, no wrapper",
              f"- how: {(used[0][0].get('distributed') or {}).get('how')}", "",
              "| " + " | ".join(head) + " |", "| " + " | ".join("---" for _ in head) + " |",
              *["| " + " | ".join(md_text(str(c)).replace("|", "\\|") for c in row) + " |" for row in table], "",
              "- The paper prints GiB as 'GB' (its Table 1: 6.74e9 x 2 B = 12.55 'GB'); its 30B is LLaMA-33B, as ours.",
              "- The paper trains with DeepSpeed ZeRO-3 and fp16 mixed precision; ours is PyTorch FSDP2 in pure BF16."]
        md_path.write_text("\n".join(md) + "\n")
        written += [md_path, csv_path]
    return written
