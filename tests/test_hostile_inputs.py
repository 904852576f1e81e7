"""Hostile and careless input, issue 23 causes 9, 10, 11, 13 and 14: damaged records, budget numbers, unbounded
sizes, pathological parse input and output that a spreadsheet or markdown viewer would misread."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from galore_bench.cli import main

RECORDS = Path(__file__).resolve().parents[1] / "reports" / "cpu-simulate" / "records" / "simulated-cpu"
BIG = "1" + "0" * 400  # json reads it as an int no float can hold


def one_message(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    """Run the CLI; assert it refused with exit 1 and one message, no traceback; return that message."""
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.startswith("galore-bench: error: "), err
    return err


# -- 10. a record's fields hold the wrong type: one message naming the file and field -----------------------
DAMAGE = [  # (field path, value written there); "BIG" becomes a 400-digit number in the file
    (("memory", "allocator_model"), 7), (("memory", "allocator_model"), "BIG"),
    (("memory", "breakdown", "activations"), "BIG"), (("memory", "category_peaks", "weights"), None),
    (("memory", "breakdown", "optimizer_states"), float("inf")), (("memory", "peak_bytes"), "12"),
    (("model", "name"), -3), (("model", "parameters"), [1, "q"]), (("train", "dtype"), {"a": 1}),
    (("train", "batch_size"), "8"), (("quality", "losses"), [float("nan")]), (("method", "name"), 5),
    (("throughput", "tgs"), "fast"), (("budget", "fits"), "yes"), (("memory", "peak_bytes"), float("nan")),
]


def damaged_folder(tmp_path: Path, path: tuple[str, ...], value: object) -> Path:
    source = sorted((RECORDS / "lomo_7b").glob("*.json"))
    record = json.loads(source[0].read_text())
    node = record
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    folder = tmp_path / "records" / "simulated-cpu" / "lomo_7b"
    folder.mkdir(parents=True)
    shutil.copy(source[1], folder / source[1].name)
    text = json.dumps(record).replace('"BIG"', BIG)  # json.dumps writes NaN and Infinity, as a damaged file may
    (folder / "damaged.simulate.20260101T000000Z.json").write_text(text)
    return tmp_path / "records"


@pytest.mark.parametrize("path,value", DAMAGE, ids=[".".join(p) + f"={v!r}"[:20] for p, v in DAMAGE])
def test_a_damaged_record_is_one_message_in_report_compare_and_check(tmp_path, capsys, path, value):
    records = damaged_folder(tmp_path, path, value)
    budgets = tmp_path / "budgets.toml"
    budgets.write_text('[[budget]]\nscenario = "lomo_7b"\nrun = "*"\npeak = "100 GiB"\n')
    for argv in (["report", str(records), "--out", str(tmp_path / "report")],
                 ["compare", str(records), str(records)], ["check", "--budgets", str(budgets), str(records)]):
        err = one_message(capsys, argv)
        assert "damaged.simulate.20260101T000000Z.json: " in err and ".".join(path) in err, err
    assert not (tmp_path / "report").exists()


# -- 11. budget limits: finite numbers >= 0 below 2**63; a bare grow_max is a fraction no larger than 1 ----------
BAD_LIMITS = ["grow_max = nan", "grow_max = inf", 'grow_max = "nan%"', 'grow_max = "1e400%"', "grow_max = 5",
              "grow_max = -0.1", 'peak = "nan GiB"', 'peak = "-5 GiB"', 'gradients = "-1 GiB"', 'peak = "1e400 GiB"',
              f'peak = "{BIG} B"', "tgs_min = nan", "tgs_min = -5", "perplexity_max = inf", f"tgs_min = {BIG}"]


@pytest.mark.parametrize("line", BAD_LIMITS, ids=[line[:30] for line in BAD_LIMITS])
def test_a_budget_limit_that_is_not_a_finite_number_at_least_0_is_refused(tmp_path, capsys, line):
    budgets = tmp_path / "budgets.toml"
    budgets.write_text(f'[[budget]]\nscenario = "lomo_7b"\nrun = "*"\nbaseline = "{RECORDS}"\n{line}\n')
    err = one_message(capsys, ["check", "--budgets", str(budgets), str(RECORDS)])
    key = line.split(" =")[0]
    assert f"budgets.toml: budget[0].{key}: got " in err and len(err) < 400, err
    if key == "grow_max":
        assert '"500%"' in err  # says how to write a large growth on purpose


@pytest.mark.parametrize("grow,fraction", [('"5%"', 0.05), ("0.05", 0.05), ('"500%"', 5.0), ("1", 1.0)])
def test_grow_max_as_a_percentage_or_a_fraction_up_to_1(tmp_path, grow, fraction):
    from galore_bench.check.rules import load_budgets
    budgets = tmp_path / "budgets.toml"
    budgets.write_text(f'[[budget]]\nscenario = "lomo_7b"\nrun = "*"\nbaseline = "{RECORDS}"\ngrow_max = {grow}\n')
    assert {rule.grow for rule in load_budgets(budgets)} == {fraction}
