"""Report charts: GaLore Figure 4 style memory bars, throughput bars and a memory-vs-perplexity Pareto scatter.

Each function returns a matplotlib Figure (no pyplot: no global backend state, renders with Agg) or None when
the records hold nothing to draw, so the caller decides where it goes: a PNG/SVG file or a data URI in HTML.
"""
from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any

from matplotlib import rc_context
from matplotlib.artist import Artist
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from galore_bench.record import breakdown_of, peak_of
from galore_bench.report.tables import as_number
from galore_bench.units import CATEGORIES, GIB

COLORS = ("#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8C8C8C")  # one per memory category
FAILED = "crimson"
OFF_SCALE = 2.5  # a budget this many times the tallest bar is named, not drawn
SIZE_COLORS = ("#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3", "#937860")


def _short(label: str, size: str) -> str:
    return label.removesuffix(f"-{size}")


def _budget_text(budget: dict[str, Any]) -> str:
    """'budget 80 GB (74.5 GiB)': the scenario's own words, and the chart's unit when they differ."""
    text = budget.get("text") or ""
    in_gib = "" if text.endswith("GiB") else f" ({budget['bytes'] / GIB:.3g} GiB)"
    return f"budget {text}{in_gib}"


def breakdown_figure(records: list[dict[str, Any]], labels: list[str], title: str) -> Figure:
    """Stacked breakdown per run (one panel per model size), budget as a dashed line, failed runs hatched in red."""
    sizes = list(dict.fromkeys(r["model"]["name"] for r in records))
    groups = [[i for i, r in enumerate(records) if r["model"]["name"] == size] for size in sizes]
    fig = Figure(figsize=(max(6.5, 1.0 * len(records) + 3.5), 5.2), layout="constrained")
    axes = fig.subplots(1, len(sizes), squeeze=False, width_ratios=[len(g) for g in groups])[0]
    drawn: dict[str, bool] = {}  # budget lines drawn, by their legend text
    for ax, size, group in zip(axes, sizes, groups):
        budget = records[group[0]]["budget"].get("bytes")
        measured = [(peak_of(records[i]) or 0) / GIB for i in group]
        budget_text = _budget_text(records[group[0]]["budget"]) if budget else ""
        if budget and all(records[i]["status"] == "ok" for i in group) and budget / GIB > OFF_SCALE * max(measured):
            # an 80 GB budget over 5 GiB bars would flatten them: name it in a corner instead of drawing it
            ax.text(0.99, 0.98, f"{budget_text}: above the scale", color=FAILED, ha="right", va="top", fontsize=8,
                    transform=ax.transAxes)
            budget = None
        # a run that died before measuring gets a hatched bar up to the budget, else up to the tallest measured one
        stand_in = budget / GIB if budget else max(measured + [0.0]) or 1.0
        tops = [stand_in]
        for x, i in enumerate(group):
            record, parts, bottom = records[i], breakdown_of(records[i]), 0.0
            failed, peak = record["status"] != "ok", measured[x]
            for cat, color in zip(CATEGORIES, COLORS):
                height = parts.get(cat, 0) / GIB
                ax.bar(x, height, bottom=bottom, color=color, width=0.7, edgecolor="white" if not failed else "k",
                       hatch="//" if failed else None, linewidth=0.5)
                bottom += height
            if failed and not parts:
                ax.bar(x, stand_in, width=0.7, fill=False, hatch="//", edgecolor=FAILED, linewidth=0.8)
                ax.plot([x], [stand_in / 2], marker="X", markersize=14, color=FAILED, linestyle="none")
                bottom = stand_in
            text = (f"{record['status'].upper()}\n" if failed else "") + (f"{peak:.3g}" if peak else "")
            ax.text(x, max(bottom, peak), text, ha="center", va="bottom", fontsize=8,
                    color=FAILED if failed else "black", fontweight="bold" if failed else "normal")
            tops.append(max(bottom, peak))
        if budget:  # named in the legend: a label on the line would collide with the bars it crosses
            ax.axhline(budget / GIB, ls="--", color=FAILED, lw=1.2)
            drawn[budget_text] = True
        ax.set_xticks(range(len(group)), [_short(labels[i], size) for i in group], rotation=30, ha="right",
                      fontsize=9)
        ax.set(ylim=(0, max(tops) * 1.18), xlim=(-0.6, len(group) - 0.4), axisbelow=True)
        ax.grid(axis="y", alpha=0.3)
        ax.set_title(f"LLaMA-{size.upper()}" if len(sizes) > 1 else "", fontsize=10)
    axes[0].set_ylabel("memory at the peak (GiB)")
    handles: list[Artist] = [Patch(facecolor=c, label=cat.replace("_", " ")) for cat, c in zip(CATEGORIES, COLORS)]
    if any(r["status"] != "ok" for r in records):
        handles.append(Patch(facecolor="white", edgecolor=FAILED, hatch="//", label="oom / error"))
    handles += [Line2D([], [], ls="--", color=FAILED, lw=1.2, label=text) for text in drawn]
    fig.legend(handles=handles, loc="outside lower center", ncols=len(handles), fontsize=8, frameon=False)
    fig.suptitle(title, fontsize=11)
    return fig


def throughput_title(records: list[dict[str, Any]]) -> str:
    """'CPU throughput' when every timed run ran on the CPU: a CPU rate says nothing about a GPU's."""
    timed = [r for r in records if as_number((r.get("throughput") or {}).get("tgs")) is not None] or records
    devices = sorted({str(r["device"]) for r in timed})
    return "CPU throughput" if devices == ["cpu"] else f"throughput on {', '.join(devices)}"


def throughput_figure(records: list[dict[str, Any]], labels: list[str], title: str) -> Figure | None:
    """TGS (tokens per device per second) per run, one bar colour per model size; None when no run was timed."""
    timed = [(r, label) for r, label in zip(records, labels)
             if r["status"] == "ok" and as_number((r.get("throughput") or {}).get("tgs")) is not None]
    if not timed:
        return None
    sizes = list(dict.fromkeys(r["model"]["name"] for r, _ in timed))
    methods = list(dict.fromkeys(_short(label, r["model"]["name"]) for r, label in timed))
    width = 0.8 / len(sizes)
    fig = Figure(figsize=(max(6.5, 0.9 * len(methods) * len(sizes) + 3), 4.8), layout="constrained")
    ax = fig.subplots()
    for k, size in enumerate(sizes):
        for r, label in timed:
            if r["model"]["name"] != size:
                continue
            x = methods.index(_short(label, size)) - 0.4 + width * (k + 0.5)
            tgs = float(r["throughput"]["tgs"])  # a finite number: `timed` holds only those
            ax.bar(x, tgs, width=width * 0.9, color=SIZE_COLORS[k % len(SIZE_COLORS)])
            ax.text(x, tgs, f"{tgs:,.0f}", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(methods)), methods, rotation=30, ha="right", fontsize=9)
    ax.set_ylabel("TGS: tokens per device per second")
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    ax.margins(y=0.15)
    if len(sizes) > 1:
        ax.legend(handles=[Patch(color=SIZE_COLORS[k % len(SIZE_COLORS)], label=f"LLaMA-{s.upper()}")
                           for k, s in enumerate(sizes)], fontsize=8, frameon=False)
    fig.suptitle(f"{title}: {throughput_title([r for r, _ in timed])}", fontsize=11)
    return fig


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both memory and perplexity (lower is better on both)."""
    front, best = [], math.inf
    for i in sorted(range(len(points)), key=lambda i: points[i]):
        if points[i][1] < best:
            front.append(i)
            best = points[i][1]
    return front


def label_offsets(points: list[tuple[float, float, str]], width_pt: float = 330.0, height_pt: float = 230.0,
                  line_pt: float = 10.0) -> list[float]:
    """Vertical offsets (points) for each point's label, so that labels of close points do not print over one
    another: in an approximate plot box of `width_pt` x `height_pt`, a label whose box would overlap one placed
    before it moves the fewest lines up or down that frees it (20 runs on one chart crowd at similar memory and
    perplexity)."""
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x_span, y_span = (max(xs) - min(xs)) or 1.0, (max(ys) - min(ys)) or 1.0
    placed: list[tuple[float, float, float]] = []  # left, bottom, width of each label's box
    offsets = []
    for x, y, label in points:
        left, width = (x - min(xs)) / x_span * width_pt + 5, 4.6 * len(label)  # about 4.6 points a character
        bottom = (y - min(ys)) / y_span * height_pt
        shifts = (5.0 + line_pt * k * sign for k in range(len(points) + 1) for sign in (-1, 1))  # nearest first
        dy = next(d for d in shifts if not any(left < l2 + w2 and l2 < left + width and abs(bottom + d - b2) < line_pt
                                               for l2, b2, w2 in placed))
        placed.append((left, bottom + dy, width))
        offsets.append(dy)
    return offsets


def pareto_figure(records: list[dict[str, Any]], labels: list[str], title: str) -> Figure | None:
    """Peak memory against perplexity, the Pareto front highlighted; None unless >= 2 ok runs have both."""
    found: list[tuple[float, float, str]] = []
    for record, label in zip(records, labels):
        peak, perplexity = peak_of(record), as_number((record.get("quality") or {}).get("perplexity"))
        if record["status"] == "ok" and peak and perplexity is not None:
            found.append((peak / GIB, perplexity, label))
    if len(found) < 2:
        return None
    front = pareto_front([(mem, ppl) for mem, ppl, _ in found])
    fig = Figure(figsize=(6.8, 4.8), layout="constrained")
    ax = fig.subplots()
    rest = [p for i, p in enumerate(found) if i not in front]
    ax.scatter([p[0] for p in rest], [p[1] for p in rest], s=40, color="#8C8C8C", label="dominated")
    line = [found[i] for i in front]
    ax.step([p[0] for p in line], [p[1] for p in line], where="post", color=FAILED, lw=1.2, alpha=0.6)
    ax.scatter([p[0] for p in line], [p[1] for p in line], s=90, marker="D", color=FAILED, zorder=3,
               label="Pareto front (lower memory and perplexity)")
    for (mem, ppl, label), dy in zip(found, label_offsets([(mem, ppl, label) for mem, ppl, label in found])):
        ax.annotate(label, (mem, ppl), textcoords="offset points", xytext=(5, dy), fontsize=8)
    ax.set(xlabel="peak memory (GiB)", ylabel="perplexity")
    ax.grid(alpha=0.3)
    ax.margins(0.15)
    ax.legend(fontsize=8, frameon=False)
    fig.suptitle(f"{title}: memory vs perplexity", fontsize=11)
    return fig


def save(fig: Figure, paths: list[Path]) -> None:
    """Write the figure to each path; SVG keeps its text as text (searchable, and smaller)."""
    with rc_context({"svg.fonttype": "none"}):
        for path in paths:
            fig.savefig(path, dpi=130)


def png_bytes(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    return buffer.getvalue()
