"""Reports: our records beside the papers' numbers (LOMO Table 1, GaLore Tables 2/3/6/11, 7B on a 24 GB card).

Per scenario: markdown (provenance first, so every number traces back to its runs), a CSV per table, charts
(report_charts), rich tables, and one static HTML page for everything (report_html). Paper columns appear only
where the run's setting matches the paper's; a value more than 5% off is flagged with its known cause.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pandas as pd
from rich.console import Console

from galore_bench import store
from galore_bench.errors import UserError
from galore_bench.report.galore import (
    GALORE_NOTE,
    TABLE2_NOTES,
    TABLE3_NOTE,
    galore_table,
    table2_grid,
    table2_table,
    table3_table,
)
from galore_bench.report.gpus import gpus_table
from galore_bench.report.html import HtmlSection, HtmlTable, render_html
from galore_bench.report.provenance import commit_of, provenance, shown
from galore_bench.report.quality import COST_NOTES, NOTES, cost_table, quality_table, study_points
from galore_bench.report.references import load_references, provenance_line
from galore_bench.report.successors import NOTES as SUCCESSORS_NOTES
from galore_bench.report.successors import successors_table
from galore_bench.report.table11 import TABLE11_NOTES, table11_table
from galore_bench.report.table_text import cell_text, csv_safe, md_text, rich_table, to_markdown
from galore_bench.report.tables import breakdown_table, fit_table, lomo_table, speed_table

FORMATS = ("md", "csv", "png", "svg", "html")


def runs_table(records: list[dict[str, Any]], labels: list[str], files: list[Path]) -> pd.DataFrame:
    """Per-run provenance for the HTML page: each table row's run label leads to its record file here."""
    packages = lambda r: (r.get("env") or {}).get("packages") or {}
    return pd.DataFrame([{"run": label, "method": r["method"]["name"], "model": r["model"]["name"],
                          "mode": r["mode"], "device": r["device"], "status": r["status"], "created": r.get("created"),
                          "git commit": commit_of(r),
                          "galore-bench": packages(r).get("galore-bench"), "torch": packages(r).get("torch"),
                          "record file": shown(f)} for r, label, f in zip(records, labels, files)])


SECTIONS = {
    "quality": ("Quality over seeds at each run's chosen learning rate (held-out test split)", NOTES),
    "step_cost": ("Step time over AdamW's, measured interleaved on the same model", COST_NOTES),
    "breakdown": ("Memory breakdown at the peak (LOMO Table 1 layout)", []),
    "speed": ("Throughput and quality (TGS = tokens per device per second)",
              ["A rate measured on a cpu device says nothing about a GPU's."]),
    "vs_lomo_table1": ("Against LOMO Table 1 (LLaMA-7B, batch 8 x 512; paper in GiB, printed 'GB')",
                       [("Compared with: each category's own maximum and the peak, the tracker's (storage bytes), "
                         "not an allocator reading: the paper lists category sizes and their sum."),
                        "The paper's `params` is our `weights`; it has no `other` column.",
                        ("The paper keeps fp16 weights and gradients with an fp32 master copy and fp32 moments "
                        "(AdamW, SGD) and runs LOMO in fp16; `precision` is each run's own (bf16-master holds the "
                        "bytes of the paper's fp16 recipe; bf16, fp16: pure, no master copy)."),
                        ("`loss`: full is today's transformers (an fp32 copy of the logits and an fp32 log-softmax, "
                         "since 4.31); model-dtype is the paper's code (transformers 4.30 returned fp16 logits and "
                         "LOMO's get_loss ran cross-entropy on a shifted copy of them, no upcast)."),
                        "The paper's totals without checkpointing are 1.00 more than the sum of their parts."]),
    "vs_galore_table2": ("Against GaLore Table 2: perplexity and memory (GB = 1e9 bytes)", TABLE2_NOTES),
    "galore_table2_grid": ("GaLore Table 2 layout: perplexity (memory GB) per method x model size", TABLE2_NOTES),
    "vs_galore_table6": ("Against GaLore Table 2 memory (Table 6 split, GB = 1e9 bytes)", [GALORE_NOTE]),
    "vs_galore_table11": ("Against GaLore Table 11 (LLaMA-1B, token batch 256, one A100, measured; GB = 1e9 bytes)",
                          TABLE11_NOTES),
    "vs_galore_table3": ("Against GaLore Table 3 memory (LLaMA-7B, 8-bit, rank 1024; GB = 1e9 bytes)", [TABLE3_NOTE]),
    "budget": ("Peak against the budget (GB = 1e9 bytes; paper: GaLore Sec. 5.5 / Fig. 1 where it matches)", []),
    "successors": ("GaLore's successors: the repositories' memory claims (BAdam's: Llama-3-8B) beside our readings",
                   SUCCESSORS_NOTES),
    "gpus": ("GPUs needed per model size (sharding applied to the traced step; LOMO Table 2's counts beside)",
             [("The paper prints GiB as 'GB'; it trains with DeepSpeed ZeRO-3 in fp16 mixed precision, ours is "
               "PyTorch FSDP2 in pure BF16.")]),
}


def build_tables(records: list[dict[str, Any]], labels: list[str], refs: dict) -> dict[str, pd.DataFrame]:
    """Every table that has rows; paper comparisons only where their paper table was found."""
    def beside(build, name: str) -> pd.DataFrame | None:
        return build(records, labels, refs[name]) if name in refs else None
    table2 = beside(table2_table, "galore_table2")
    tables = {"quality": quality_table(records, labels), "step_cost": cost_table(records, labels),
              "breakdown": breakdown_table(records, labels), "speed": speed_table(records, labels),
              "vs_lomo_table1": beside(lomo_table, "lomo_table1"), "vs_galore_table2": table2,
              "galore_table2_grid": table2_grid(table2) if table2 is not None else None,
              "vs_galore_table6": beside(galore_table, "galore_table6"),
              "vs_galore_table11": beside(table11_table, "galore_table11"),
              "vs_galore_table3": beside(table3_table, "galore_table3"),
              "budget": fit_table(records, labels, refs.get("galore_7b_totals")),
              "successors": beside(successors_table, "successors_7b_claims"),
              "gpus": gpus_table(records, refs.get("lomo_table2"))}
    return {name: df for name, df in tables.items() if df is not None}


def parse_formats(text: str | set[str]) -> set[str]:
    formats = {f.strip().lower() for f in (text.split(",") if isinstance(text, str) else text) if f.strip()}
    if not formats or formats - set(FORMATS):
        raise UserError(f"--format: got {text!r}, allowed: a comma-separated list of {', '.join(FORMATS)}")
    return formats


def _figures(scenario: str, records: list[dict[str, Any]], labels: list[str]) -> dict[str, tuple[str, Any]]:
    """name -> (caption, matplotlib Figure) for every chart these records can fill."""
    from galore_bench.report import charts

    modes = ", ".join(sorted({f"{r['mode']} on {r['device']}" for r in records}))
    figures = {"breakdown": (f"memory breakdown at the peak ({modes})",
                             charts.breakdown_figure(records, labels, f"{scenario}: memory breakdown at the peak "
                                                                      f"({modes})")),
               "throughput": (f"{charts.throughput_title(records)}: TGS per run",
                              charts.throughput_figure(records, labels, scenario)),
               "pareto": ("peak memory vs perplexity (Pareto front highlighted)",
                          charts.pareto_figure(*(study_points(records) or (records, labels)), scenario))}
    return {name: pair for name, pair in figures.items() if pair[1] is not None}


def _html_table(heading: str, notes: list[str], df: pd.DataFrame) -> HtmlTable:
    return HtmlTable(heading, [str(c) for c in df.columns], [[cell_text(v) for v in row] for row in
                     df.itertuples(index=False)], [pd.api.types.is_numeric_dtype(df[c]) for c in df.columns], notes)


def render_report(record_paths: list[Path], out: Path, formats: set[str], *,
                  console: Console | None = None) -> list[Path]:
    """Write every table and chart for the records (files or folders); returns the files written."""
    formats = parse_formats(formats)
    records, files, skipped = store.load_latest(record_paths)
    refs = load_references()
    (out := Path(out)).mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    sections: list[HtmlSection] = []
    for scenario in dict.fromkeys(r["scenario"] for r in records):  # records come sorted by scenario
        index = [i for i, r in enumerate(records) if r["scenario"] == scenario]
        group, sources = [records[i] for i in index], [files[i] for i in index]
        several = len({(r["mode"], r["device"]) for r in group}) > 1
        labels = [r["run"] + (f" [{r['mode']}, {r['device']}]" if several else "") for r in group]
        tables = build_tables(group, labels, refs)
        figures = _figures(scenario, group, labels) if formats & {"png", "svg", "html"} else {}
        if figures:
            from galore_bench.report import (
                charts as report_charts,  # matplotlib only when a chart is asked for
            )
        charts: list[tuple[str, Path]] = []
        for name, (caption, fig) in figures.items():
            paths = [store.inside(out, f"{scenario}_{name}.{ext}") for ext in ("png", "svg")
                     if ext in formats]
            report_charts.save(fig, paths)
            written += paths
            charts += [(caption, paths[0])] if paths else []
        for name, df in tables.items():
            if "csv" in formats:
                csv = store.inside(out, f"{scenario}_{name}.csv")
                csv_safe(df).to_csv(csv, index=False, float_format="%.6f")
                written.append(csv)
            if console is not None:
                console.print(rich_table(f"{scenario}: {SECTIONS[name][0]}", df))
        failed = [f"{label}: {r['status']}: {((r.get('error') or '').strip() or '-').splitlines()[0][:200]}"
                  for r, label in zip(group, labels) if r["status"] != "ok"]
        items = provenance(group, sources, skipped[scenario], provenance_line(list(refs)))
        if "md" in formats:
            lines = [f"# Memory report: {scenario}", "", *(f"- {md_text(item)}" for item in items), ""]
            lines += [f"![{caption}]({path.name})\n" for caption, path in charts]
            for name, df in tables.items():
                heading, notes = SECTIONS[name]
                lines += [f"## {heading}", "", to_markdown(df), ""] + [f"- {n}" for n in notes] + [""] * bool(notes)
            unfinished = [f"- {md_text(line)}" for line in failed]
            lines += ["## Runs that did not finish", "", *unfinished, ""] if failed else []
            (md := store.inside(out, f"{scenario}.md")).write_text("\n".join(lines))
            written.append(md)
        if "html" in formats:
            images = [(caption, store.inside(out, f"{scenario}_{name}.png").read_bytes() if "png" in formats
                       else report_charts.png_bytes(fig)) for name, (caption, fig) in figures.items()]
            items = [item for item in items if not item.startswith("record files:")]  # in the runs table
            sections.append(HtmlSection(scenario, items, _html_table("Runs and their record files", [],
                                                                     runs_table(group, labels, sources)),
                                        [_html_table(SECTIONS[n][0], SECTIONS[n][1], df) for n, df in tables.items()],
                                        images, failed))
    if "html" in formats:
        header = [f"{len(records)} record(s) from {', '.join(map(str, record_paths))}",
                  f"generated: {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}",
                  "every number traces to a record file: see each scenario's 'Runs and their record files'"]
        (out / "report.html").write_text(render_html(sections, "galore-bench report", header))
        written.append(out / "report.html")
    return written
