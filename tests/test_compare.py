"""`galore-bench compare`: deltas equal hand-computed ones, folders match runs by (scenario, run) on the newest ok
record, --fail-above names what grew and sets the exit code, and bad input is a clear message with exit 1."""
from __future__ import annotations

import json
from io import StringIO
from pathlib import Path

import pandas as pd
import pytest
from rich.console import Console

from galore_bench.check.compare import deltas, parse_percent
from galore_bench.cli import main
from galore_bench.cli.compare import run as run_compare
from galore_bench.errors import UserError

from fixtures.records import make_record

MIB = 2**20


def record(run: str = "galore", *, scenario: str = "smoke_cpu", parts: dict[str, int], tps: float | None = None,
           perplexity: float | None = None, status: str = "ok", minute: int = 0,
           category_peaks: dict[str, int] | None = None) -> dict:
    """A measured tiny-model record (the shared factory); peak = sum of the parts."""
    return make_record(run, parts, scenario=scenario, mode="measure", device="cpu", status=status,
                       created=f"2026-01-01T00:{minute:02d}:00Z", tokens_per_second=tps, tgs=tps,
                       perplexity=perplexity, category_peaks=category_peaks)


def split(weights: int, gradients: int, optimizer_states: int, activations: int, other: int) -> dict[str, int]:
    return {"weights": weights * MIB, "gradients": gradients * MIB, "optimizer_states": optimizer_states * MIB,
            "activations": activations * MIB, "other": other * MIB}


# B against A: optimizer states +1000 MiB (+25%), activations -100 MiB (-20%), peak +900 MiB (+900/7600 = 11.84%),
# tokens/s and TGS 1000 -> 800 (-20%), perplexity 40 -> 42 (+5%); weights, gradients, other unchanged
A = record(parts=split(1000, 2000, 4000, 500, 100), tps=1000.0, perplexity=40.0)
B = record(parts=split(1000, 2000, 5000, 400, 100), tps=800.0, perplexity=42.0)


def write(path: Path, rec: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rec))
    return path


@pytest.fixture
def pair(tmp_path: Path) -> tuple[Path, Path]:
    return write(tmp_path / "a.json", A), write(tmp_path / "b.json", B)


def test_deltas_are_hand_computed():
    rows = {d.quantity: d for d in deltas(("smoke_cpu", "galore"), A, B)}
    assert list(rows) == ["peak", "weights", "gradients", "optimizer_states", "activations", "other", "tokens/s",
                          "TGS", "perplexity"]
    assert (rows["peak"].a, rows["peak"].b, rows["peak"].delta) == (7600 * MIB, 8500 * MIB, 900 * MIB)
    assert rows["peak"].percent == pytest.approx(900 / 7600 * 100)
    assert rows["optimizer_states"].delta == 1000 * MIB and rows["optimizer_states"].percent == pytest.approx(25.0)
    assert rows["activations"].delta == -100 * MIB and rows["activations"].percent == pytest.approx(-20.0)
    assert rows["weights"].delta == 0 and rows["weights"].percent == 0
    assert rows["tokens/s"].delta == -200 and rows["TGS"].percent == pytest.approx(-20.0)
    assert rows["perplexity"].delta == pytest.approx(2.0) and rows["perplexity"].percent == pytest.approx(5.0)


def test_csv_and_json_carry_the_raw_numbers(pair: tuple[Path, Path], tmp_path: Path):
    a, b = pair
    assert run_compare(a, b, fmt="csv", out=tmp_path / "d.csv", console=Console(file=StringIO())) == 0
    table = pd.read_csv(tmp_path / "d.csv").set_index("quantity")
    assert table.loc["optimizer_states", "A"] == 4000 * MIB and table.loc["optimizer_states", "B"] == 5000 * MIB
    assert table.loc["optimizer_states", "delta"] == 1000 * MIB and table.loc["peak", "unit"] == "bytes"
    assert table.loc["peak", "delta %"] == pytest.approx(11.842105, abs=1e-5)
    assert run_compare(a, b, out=tmp_path / "d.json", console=Console(file=StringIO())) == 0  # format from suffix
    data = json.loads((tmp_path / "d.json").read_text())
    assert data["runs"][0]["a"] == str(a) and data["runs"][0]["b"] == str(b)
    got = {d["quantity"]: d for d in data["deltas"]}
    assert got["TGS"]["a"] == 1000.0 and got["TGS"]["delta"] == -200.0 and got["perplexity"]["percent"] == 5.0


def test_console_table_and_markdown(pair: tuple[Path, Path], capsys: pytest.CaptureFixture):
    a, b = pair
    assert main(["compare", str(a), str(b)]) == 0
    out = capsys.readouterr().out
    assert "optimizer_states" in out and "+1000.00 MiB" in out and "+25.00%" in out and "-20.00%" in out
    assert main(["compare", str(a), str(b), "--format", "md"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("# Compare") and "| smoke_cpu | galore | peak | 7.42 GiB | 8.30 GiB | +900.00 MiB" in text
    assert "| perplexity | 40.00 | 42.00 | +2.00 | +5.00% |" in text


def test_fail_above_names_what_grew(pair: tuple[Path, Path], capsys: pytest.CaptureFixture):
    a, b = pair
    assert main(["compare", str(a), str(b), "--fail-above", "30"]) == 0
    assert main(["compare", str(a), str(b), "--fail-above", "20%"]) == 1
    err = capsys.readouterr().err
    assert "smoke_cpu/galore: optimizer_states grew +25.0% (3.91 GiB -> 4.88 GiB) > 20%" in err
    assert "peak grew" not in err and "perplexity" not in err  # only memory gates, and the peak grew 11.8%
    assert main(["compare", str(a), str(b), "--fail-above", "10", "--format", "json"]) == 1
    captured = capsys.readouterr()
    json.loads(captured.out)  # stdout stays parseable: the verdict goes to stderr
    assert "peak grew +11.8%" in captured.err and "optimizer_states grew" in captured.err
    # reversed, activations grew 400 -> 500 MiB; the optimizer states' and the peak's drops never fail
    assert main(["compare", str(b), str(a), "--fail-above", "0"]) == 1
    err = capsys.readouterr().err
    assert "activations grew +25.0%" in err and "optimizer_states" not in err and "peak" not in err


def test_growth_from_zero_and_category_peaks(tmp_path: Path, capsys: pytest.CaptureFixture):
    a = write(tmp_path / "a.json", record(parts=split(10, 0, 0, 0, 0), category_peaks={"gradients": 0}))
    b = write(tmp_path / "b.json", record(parts=split(10, 5, 0, 0, 0), category_peaks={"gradients": 8 * MIB}))
    rows = {d.quantity: d for d in deltas(("s", "r"), json.loads(a.read_text()), json.loads(b.read_text()))}
    assert rows["max gradients"].b == 8 * MIB and "tokens/s" not in rows  # throughput absent on both sides
    assert main(["compare", str(a), str(b), "--fail-above", "1000"]) == 1
    err = capsys.readouterr().err
    assert "gradients grew from 0 B to 5.00 MiB" in err and "max gradients grew from 0 B to 8.00 MiB" in err


def test_reserved_is_compared_where_both_sides_have_it(capsys: pytest.CaptureFixture, tmp_path: Path):
    """What the GPU reserves (its reading, or the allocator model's for simulate) is a memory row like the others."""
    a, b = json.loads(json.dumps(A)), json.loads(json.dumps(B))
    a["memory"]["allocator_model"] = {"peak_reserved_bytes": 8000 * MIB, "out_of_memory": None}
    b["memory"]["allocator_model"] = {"peak_reserved_bytes": 8800 * MIB, "out_of_memory": None}
    rows = {d.quantity: d for d in deltas(("smoke_cpu", "galore"), a, b)}
    assert rows["reserved"].delta == 800 * MIB and rows["reserved"].percent == pytest.approx(10.0)
    assert "reserved" not in {d.quantity for d in deltas(("smoke_cpu", "galore"), A, b)}  # one side only
    paths = write(tmp_path / "a.json", a), write(tmp_path / "b.json", b)
    assert main(["compare", *map(str, paths), "--fail-above", "12%"]) == 1  # optimizer states +25%
    err = capsys.readouterr().err
    assert "reserved" not in err  # +10% is under the gate
    assert main(["compare", *map(str, paths), "--fail-above", "5%"]) == 1
    assert "reserved grew +10.0%" in capsys.readouterr().err


def test_folders_match_runs_on_the_newest_ok_record(tmp_path: Path):
    old, new = tmp_path / "old", tmp_path / "new"
    write(old / "cpu/smoke_cpu/galore.1.json", record(parts=split(1, 1, 1, 1, 1), minute=1))
    write(old / "cpu/smoke_cpu/galore.2.json", A | {"created": "2026-01-01T00:02:00Z"})  # newest ok
    write(old / "cpu/smoke_cpu/galore.3.json", record(parts=split(9, 9, 9, 9, 9), status="oom", minute=3))
    write(old / "cpu/smoke_cpu/lomo.json", record("lomo", parts=split(1, 0, 0, 1, 0)))
    write(new / "cpu/smoke_cpu/galore.json", B)
    write(new / "cpu/other/adamw.json", record("adamw", scenario="other", parts=split(1, 1, 2, 1, 0)))
    stdout = StringIO()
    assert run_compare(old, new, fmt="json", console=Console(file=stdout)) == 0
    data = json.loads(stdout.getvalue())
    assert [(r["scenario"], r["run"]) for r in data["runs"]] == [("smoke_cpu", "galore")]
    assert data["runs"][0]["a"].endswith("galore.2.json")
    assert data["only_a"] == ["smoke_cpu/lomo (measure)"] and data["only_b"] == ["other/adamw (measure)"]
    peak = next(d for d in data["deltas"] if d["quantity"] == "peak")
    assert (peak["a"], peak["b"]) == (7600 * MIB, 8500 * MIB)


def test_engines_are_compared_only_with_the_same_engine(tmp_path: Path):
    """A newer simulate record in A must not be paired with B's measure record."""
    a, b = tmp_path / "a", tmp_path / "b"
    write(a / "cpu/smoke_cpu/galore.m.json", A)
    simulated = record(parts=split(0, 0, 0, 0, 0), minute=9) | {"mode": "simulate"}
    write(a / "cpu/smoke_cpu/galore.s.json", simulated)
    write(b / "cpu/smoke_cpu/galore.m.json", A)
    stdout = StringIO()
    assert run_compare(a, b, fmt="json", console=Console(file=stdout)) == 0
    data = json.loads(stdout.getvalue())
    assert [(r["a_mode"], r["b_mode"]) for r in data["runs"]] == [("measure", "measure")]
    assert data["only_a"] == ["smoke_cpu/galore (simulate)"]
    errors = StringIO()  # with a gate, the engine B lacks is a failure, not a silent pass
    assert run_compare(a, b, fail_above=5, console=Console(file=StringIO()), errors=Console(file=errors)) == 1
    assert "smoke_cpu/galore (simulate): no record in B" in errors.getvalue()


def test_the_gate_fails_when_b_ran_out_of_memory_or_is_missing(tmp_path: Path, capsys: pytest.CaptureFixture):
    oom = record(parts=split(0, 0, 0, 0, 0), status="oom", minute=5) | {"error": "OOM at 23.9 GiB: CUDA out of memory"}
    a_file, b_file = write(tmp_path / "a.json", A), write(tmp_path / "b.json", oom)
    assert run_compare(a_file, b_file, fail_above=5) == 1
    assert "smoke_cpu/galore: B is oom, not ok (OOM at 23.9 GiB" in capsys.readouterr().err
    a, b = tmp_path / "fa", tmp_path / "fb"
    write(a / "cpu/smoke_cpu/galore.json", A)
    write(a / "cpu/smoke_cpu/lomo.json", record("lomo", parts=split(1, 0, 0, 1, 0)))
    write(b / "cpu/smoke_cpu/galore.1.json", A)
    write(b / "cpu/smoke_cpu/galore.2.json", oom)  # only an older ok record: the newest ok one is used
    assert run_compare(a, b, fail_above=5) == 1
    assert "smoke_cpu/lomo (measure): no record in B" in capsys.readouterr().err
    assert run_compare(a, b) == 0  # without --fail-above nothing gates


def test_clear_errors(tmp_path: Path, pair: tuple[Path, Path], capsys: pytest.CaptureFixture):
    a, b = pair
    assert main(["compare", str(a), str(tmp_path / "missing.json")]) == 1
    assert "missing.json: no such file or folder" in capsys.readouterr().err
    foreign = tmp_path / "foreign.json"
    foreign.write_text(json.dumps({"loss": [1.0, 0.5]}))
    assert main(["compare", str(foreign), str(b)]) == 1
    assert "foreign.json: not a galore-bench result record" in capsys.readouterr().err
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(UserError, match="broken.json: not a readable JSON file"):
        run_compare(tmp_path / "broken.json", b)
    write(tmp_path / "x" / "lomo.json", record("lomo", parts=split(1, 0, 0, 0, 0)))
    write(tmp_path / "y" / "sgd.json", record("sgd", parts=split(1, 0, 0, 0, 0)))
    with pytest.raises(UserError, match=r"no common runs: .*x has smoke_cpu/lomo \(measure\); "
                                        r".*y has smoke_cpu/sgd \(measure\)"):
        run_compare(tmp_path / "x", tmp_path / "y")
    write(tmp_path / "z" / "oom.json", record(parts=split(1, 0, 0, 0, 0), status="oom"))
    with pytest.raises(UserError, match="1 record.s., none with status ok"):
        run_compare(tmp_path / "z", tmp_path / "y")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no result records"):
        run_compare(tmp_path / "empty", tmp_path / "y")
    with pytest.raises(UserError, match=r"--out: got .*d.txt, allowed a file name ending in .md, .csv, .json"):
        run_compare(a, b, out=tmp_path / "d.txt")
    with pytest.raises(UserError, match="allowed: md, csv, json"):
        run_compare(a, b, fmt="pdf")
    with pytest.raises(UserError, match=r"--out: got .*empty, a folder; allowed a file path such as"):
        run_compare(a, b, fmt="md", out=tmp_path / "empty")
    for bad in ("five", "-1", "nan"):
        with pytest.raises(UserError, match="--fail-above: got"):
            parse_percent(bad)
    assert parse_percent("2.5%") == 2.5 and parse_percent(0) == 0.0


def test_a_file_against_a_folder(tmp_path: Path):
    """One side a record file, the other a results folder: matched by scenario, run label and mode."""
    a_file = write(tmp_path / "a.json", A)
    folder = tmp_path / "b"
    write(folder / "cpu/smoke_cpu/galore.json", B)
    stdout = StringIO()
    assert run_compare(a_file, folder, fmt="json", console=Console(file=stdout)) == 0
    peak = next(d for d in json.loads(stdout.getvalue())["deltas"] if d["quantity"] == "peak")
    assert (peak["a"], peak["b"]) == (7600 * MIB, 8500 * MIB)


def test_two_files_of_different_runs_are_compared_with_a_note(tmp_path: Path, capsys: pytest.CaptureFixture):
    a = write(tmp_path / "a.json", A)
    other = record("lomo", scenario="lomo_7b", parts=split(1000, 0, 0, 500, 100))
    assert main(["compare", str(a), str(write(tmp_path / "b.json", other))]) == 0
    err = capsys.readouterr().err
    assert ("note: A is smoke_cpu/galore (tiny, measure), B is lomo_7b/lomo (tiny, measure): different scenario, "
            "run, method") in err
    assert main(["compare", str(a), str(write(tmp_path / "c.json", B))]) == 0
    assert "note:" not in capsys.readouterr().err  # the same run on both sides: nothing to say
