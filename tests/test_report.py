"""Reports: numbers read back from the markdown/CSV equal the records', paper columns equal the reference CSVs,
the >5% flags are right, the chart is a real picture, and a record we cannot read is a clear error."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from galore_bench.cli import main
from galore_bench.record import SCHEMA_VERSION
from galore_bench.report import REFERENCE_ENV, render_report
from galore_bench.scenario import UserError

GIB = 2**30
W7B = 6_738_415_616 * 2  # LLaMA-7B weights in BF16: 12.55 GiB
SHIPPED = Path(__file__).resolve().parents[2] / "shared" / "reference"
# the same rows as shared/reference, so these tests do not depend on that folder being beside the checkout
REFERENCE = {
    "lomo_table1.csv": """# LOMO Table 1 (GiB)
optimizer,ac,params,gradients,optimizer_states,activations,total_printed
adamw,no,12.55,12.55,75.31,45.61,147.02
adamw,yes,12.55,12.55,75.31,1.79,102.20
sgd,yes,12.55,12.55,25.10,1.79,51.99
lomo,yes,12.55,0.24,0.00,1.79,14.58
""",
    "galore_table6_split.csv": """# GaLore Table 6 (GB)
method,size,weights_gb,optimizer_states_gb
full_rank,60m,0.12,0.23
galore,60m,0.12,0.13
""",
    "galore_memory_7b.csv": """# GaLore 7B memory
item,value_gb,kind,source
bf16_adam_baseline_total,58,printed,Fig.1
8bit_galore_layerwise_total,22.0,printed,Sec.5.5
8bit_adam_total_implied,46.5,derived,22.0 + 24.5
""",
}


def make_record(run: str, method: str, parts: dict[str, int] | None, *, scenario: str = "lomo_7b",
                model: str = "7b", batch: int = 8, seq: int = 512, ac: bool = True, status: str = "ok",
                budget: int | None = 24 * GIB, layerwise: bool = False, minute: int = 0) -> dict:
    """A record as the worker writes it, with only what a report reads, and known byte counts."""
    peak = sum(parts.values()) if parts else None
    return {"schema_version": SCHEMA_VERSION, "scenario": scenario, "run": run,
            "method": {"name": method, "layerwise": layerwise}, "mode": "simulate", "device": "simulated-cpu",
            "status": status, "error": None if status == "ok" else "OutOfMemoryError: CUDA out of memory",
            "model": {"name": model, "parameters": 6_738_415_616 if model == "7b" else 58_073_600},
            "train": {"batch_size": batch, "seq_len": seq, "dtype": "bf16", "activation_checkpointing": ac},
            "budget": {"bytes": budget, "text": "24 GiB" if budget else None,
                       "fits": None if budget is None else status == "ok" and peak <= budget},
            "memory": {"peak_bytes": peak, "breakdown": parts}, "throughput": {"tgs": None},
            "quality": {"perplexity": None},
            "env": {"git_commit": "abc1234", "packages": {"galore-bench": "0.1.0", "torch": "2.13.0+cpu"}},
            "created": f"2026-01-01T00:{minute:02d}:00Z"}


def parts(weights=0, gradients=0, optimizer_states=0, activations=0, other=0) -> dict[str, int]:
    return {"weights": weights, "gradients": gradients, "optimizer_states": optimizer_states,
            "activations": activations, "other": other}


LOMO_RUNS = [  # crafted: adamw activations exact, sgd activations +6% (flag), lomo activations +4% (no flag)
    make_record("adamw", "adamw", parts(W7B, W7B, 2 * W7B, round(1.79 * GIB)), minute=1),
    make_record("sgd", "sgd", parts(W7B, W7B, 0, round(1.79 * 1.06 * GIB), 100 * 2**20), minute=2),
    make_record("lomo", "lomo", parts(W7B, round(0.24 * GIB), 0, round(1.79 * 1.04 * GIB)), minute=3),
]
GALORE_RUNS = [  # full-rank optimizer states +10% (flag), GaLore weights +3% (no flag)
    make_record("adamw-60m", "adamw", parts(120_000_000, 5_000_000, 253_000_000), scenario="galore_table2",
                model="60m", batch=8, seq=256, ac=False, budget=None, minute=4),
    make_record("galore-60m", "galore", parts(123_600_000, 5_000_000, 130_000_000), scenario="galore_table2",
                model="60m", batch=8, seq=256, ac=False, budget=None, minute=5),
]
FIT_RUNS = [
    make_record("adamw", "adamw", parts(W7B, W7B, 2 * W7B, 512, 524_299_264), scenario="7b_4090", batch=1,
                seq=256, ac=False, minute=6),
    make_record("adam8bit", "adam8bit", None, scenario="7b_4090", batch=1, seq=256, ac=False, status="oom",
                minute=7),
    make_record("galore8bit-layerwise", "galore8bit", parts(W7B, 90_177_536, 5_700_723_712, 1_526_530_560,
                233_180_672), scenario="7b_4090", batch=1, seq=256, ac=False, layerwise=True, minute=8),
]


@pytest.fixture
def reference(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "reference"
    folder.mkdir()
    for name, text in REFERENCE.items():
        (folder / name).write_text(text)
    monkeypatch.setenv(REFERENCE_ENV, str(folder))
    return folder


def write_records(folder: Path, records: list[dict]) -> Path:
    for record in records:
        path = folder / record["device"] / record["scenario"] / f"{record['run']}.{record['mode']}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record))
    return folder


def md_table(text: str, heading: str) -> list[dict[str, str]]:
    """The pipe table under the first '## heading...' of a markdown file, as dicts of cell text."""
    lines = [line for line in text.split(f"## {heading}", 1)[1].splitlines()[1:] if line.strip()]
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[:next(
        (i for i, line in enumerate(lines) if not line.startswith("|")), len(lines))]]
    return [dict(zip(rows[0], row)) for row in rows[2:]]


@pytest.fixture
def lomo_report(tmp_path: Path, reference: Path) -> tuple[Path, list[Path]]:
    out = tmp_path / "out"
    return out, render_report([write_records(tmp_path / "results", LOMO_RUNS)], out, {"md", "csv", "png"})


def test_breakdown_numbers_equal_the_records(lomo_report):
    out, written = lomo_report
    assert {p.name for p in written} >= {"lomo_7b.md", "lomo_7b_breakdown.csv", "lomo_7b_breakdown.png",
                                         "lomo_7b_vs_lomo_table1.csv"}
    text = (out / "lomo_7b.md").read_text()
    assert text.startswith("# Memory report: lomo_7b")
    for needle in ("records used: 3", "simulate", "simulated-cpu", "abc1234", "galore-bench: 0.1.0", "2.13.0+cpu"):
        assert needle in text.split("##")[0]
    rows = {row["run"]: row for row in md_table(text, "Memory breakdown at the peak")}
    csv = pd.read_csv(out / "lomo_7b_breakdown.csv").set_index("run")
    for record in LOMO_RUNS:
        peak = record["memory"]["peak_bytes"]
        assert rows[record["run"]]["weights GiB"] == "12.55"
        assert rows[record["run"]]["peak GiB"] == f"{peak / GIB:.2f}"
        for cat, value in record["memory"]["breakdown"].items():
            assert csv.loc[record["run"], f"{cat} GiB"] == pytest.approx(value / GIB, abs=1e-6)
            assert csv.loc[record["run"], f"{cat} %"] == pytest.approx(value / peak * 100, abs=1e-6)
            assert rows[record["run"]][f"{cat} %"] == f"{value / peak * 100:.2f}"


def test_lomo_paper_columns_and_flags(lomo_report, reference: Path):
    out, _ = lomo_report
    table = pd.read_csv(out / "lomo_7b_vs_lomo_table1.csv", keep_default_na=False)
    paper = pd.read_csv(reference / "lomo_table1.csv", comment="#")
    for row in table.to_dict("records"):
        expected = paper[(paper.optimizer == row["run"]) & (paper.ac == "yes")].iloc[0]
        column = {"weights": "params", "peak": "total_printed"}.get(row["quantity"], row["quantity"])
        if column == "other":
            assert row["paper GiB"] == ""  # the paper has no 'other' column
        else:
            assert float(row["paper GiB"]) == pytest.approx(expected[column])
    flagged = {(r.run, r.quantity) for r in table.itertuples() if r.flag}
    assert flagged == {("adamw", "optimizer_states"), ("adamw", "peak"), ("sgd", "optimizer_states"),
                       ("sgd", "activations"), ("sgd", "peak")}
    cause = table.set_index(["run", "quantity"])["cause"]
    assert "fp32" in cause["adamw", "optimizer_states"] and "75.31" in cause["adamw", "optimizer_states"]
    assert "fp32 weight copy" in cause["sgd", "optimizer_states"]
    assert cause["lomo", "activations"] == "" and cause["sgd", "activations"]
    md = {(r["run"], r["quantity"]): r for r in md_table((out / "lomo_7b.md").read_text(), "Against LOMO Table 1")}
    assert md["adamw", "optimizer_states"]["paper GiB"] == "75.31" and md["adamw", "optimizer_states"]["flag"]
    assert md["sgd", "activations"]["diff %"] == "6.00" and md["lomo", "activations"]["diff %"] == "4.00"


def test_png_is_a_real_picture(lomo_report):
    from matplotlib.image import imread

    png = lomo_report[0] / "lomo_7b_breakdown.png"
    assert png.stat().st_size > 5_000
    pixels = imread(png)[..., :3].reshape(-1, 3)
    assert pixels.std() > 0.05 and len(np.unique(pixels, axis=0)) > 20


def test_galore_table2_memory_against_table6(tmp_path: Path, reference: Path):
    out = tmp_path / "out"
    render_report([write_records(tmp_path / "results", GALORE_RUNS)], out, {"md", "csv"})
    table = pd.read_csv(out / "galore_table2_vs_galore_table6.csv", keep_default_na=False).set_index("run")
    assert list(table["method"]) == ["full_rank", "galore"]
    assert table.loc["adamw-60m", "weights GB"] == pytest.approx(0.12)
    assert table.loc["adamw-60m", "paper optimizer_states GB"] == pytest.approx(0.23)
    assert table.loc["adamw-60m", "optimizer_states diff %"] == pytest.approx(10.0)
    assert table.loc["galore-60m", "weights diff %"] == pytest.approx(3.0)
    assert table.loc["adamw-60m", "flag"] == "optimizer_states" and table.loc["galore-60m", "flag"] == ""
    md = {r["run"]: r for r in md_table((out / "galore_table2.md").read_text(), "Against GaLore Table 2")}
    assert md["galore-60m"]["paper optimizer_states GB"] == "0.13" and md["galore-60m"]["weights GB"] == "0.12"
    assert not (out / "galore_table2_budget.csv").exists()  # no budget in that scenario


def test_7b_budget_table_and_oom_run(tmp_path: Path, reference: Path):
    out = tmp_path / "out"
    written = render_report([write_records(tmp_path / "results", FIT_RUNS)], out, {"md", "csv", "png", "svg"})
    assert out / "7b_4090_breakdown.svg" in written
    table = pd.read_csv(out / "7b_4090_budget.csv").set_index("run").fillna({"flag": ""})
    layerwise = table.loc["galore8bit-layerwise"]
    assert layerwise["peak GB"] == pytest.approx(21_027_443_712 / 1e9) and layerwise["paper GB"] == 22.0
    assert layerwise["fits"] and layerwise["flag"] == "" and layerwise["diff %"] == pytest.approx(-4.42, abs=0.01)
    assert table.loc["adamw", "paper GB"] == 58 and table.loc["adamw", "flag"] == ">5%"
    assert table.loc["adam8bit", "status"] == "oom" and not table.loc["adam8bit", "fits"]
    assert np.isnan(table.loc["adam8bit", "peak GiB"])
    text = (out / "7b_4090.md").read_text()
    rows = {r["run"]: r for r in md_table(text, "Peak against the budget")}
    assert rows["adamw"]["fits"] == "NO" and rows["galore8bit-layerwise"]["fits"] == "yes"
    assert "adam8bit: oom: OutOfMemoryError" in text


def test_without_reference_the_report_still_renders(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv(REFERENCE_ENV, str(tmp_path / "nowhere"))
    out = tmp_path / "out"
    render_report([write_records(tmp_path / "results", LOMO_RUNS)], out, {"md", "csv"})
    assert "paper columns omitted" in (out / "lomo_7b.md").read_text()
    assert (out / "lomo_7b_breakdown.csv").exists() and not (out / "lomo_7b_vs_lomo_table1.csv").exists()


@pytest.mark.skipif(not SHIPPED.is_dir(), reason="shared/reference not beside the checkout")
def test_shipped_reference_is_found_by_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv(REFERENCE_ENV, raising=False)
    render_report([write_records(tmp_path / "results", LOMO_RUNS[:1])], tmp_path / "out", {"csv"})
    table = pd.read_csv(tmp_path / "out" / "lomo_7b_vs_lomo_table1.csv").set_index("quantity")
    assert table.loc["optimizer_states", "paper GiB"] == 75.31


def test_unreadable_records_are_clear_errors(tmp_path: Path, reference: Path):
    other = tmp_path / "other.json"
    other.write_text(json.dumps({**LOMO_RUNS[0], "schema_version": SCHEMA_VERSION + 1}))
    with pytest.raises(UserError, match="schema_version"):
        render_report([other], tmp_path / "out", {"md"})
    foreign = tmp_path / "foreign.json"
    foreign.write_text(json.dumps({"schema_version": SCHEMA_VERSION, "loss": 1.0}))
    with pytest.raises(UserError, match="not a galore-bench result record"):
        render_report([foreign], tmp_path / "out", {"md"})
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no result records"):
        render_report([tmp_path / "empty"], tmp_path / "out", {"md"})
    with pytest.raises(UserError, match="allowed"):
        render_report([foreign], tmp_path / "out", {"pdf"})


def test_cli_report(tmp_path: Path, reference: Path, capsys: pytest.CaptureFixture):
    results = write_records(tmp_path / "results", LOMO_RUNS)
    assert main(["report", str(results), "--out", str(tmp_path / "out"), "--format", "md,csv"]) == 0
    assert (tmp_path / "out" / "lomo_7b.md").exists() and not (tmp_path / "out" / "lomo_7b_breakdown.png").exists()
    assert "Against LOMO Table 1" in capsys.readouterr().out
    assert main(["report", str(tmp_path / "missing"), "--out", str(tmp_path / "out")]) == 1
