"""Hostile and careless input, issue 23 causes 9, 10, 11, 13 and 14: damaged records, budget numbers, unbounded
sizes, pathological parse input and output that a spreadsheet or markdown viewer would misread."""
from __future__ import annotations

import contextlib
import io
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from galore_bench.cli import main

RECORDS = Path(__file__).resolve().parents[1] / "reports" / "cpu-simulate" / "records" / "simulated-cpu"
BIG = "1" + "0" * 400  # json reads it as an int no float can hold
BIG_INT = int(BIG)


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


def run_argv(path: Path, mode: str) -> list[str]:
    return ["run", "--scenario", str(path), "--mode", mode, "--out", str(path.parent / "o")]


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


# -- 9. sizes beyond any real training are refused at validation; auto never measures what the host cannot hold
TOO_LARGE = [("model", "num_hidden_layers = 1025", "model.num_hidden_layers", "to 1,024"),
             ("model", "hidden_size = 65600", "model.hidden_size", "to 65,536"),
             ("model", "vocab_size = 10000001", "model.vocab_size", "to 10,000,000"),
             ("train", "batch_size = 100000\nseq_len = 100000", "train.batch_size * train.seq_len",
              "at most 1,000,000,000 tokens"),
             ("train", f"steps = {BIG}", "train.steps", "to 1,000,000")]
SHAPE = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4}


@pytest.mark.parametrize("table,line,field,bound", TOO_LARGE, ids=[t[2] for t in TOO_LARGE])
def test_a_size_beyond_any_real_training_is_refused_with_its_bound(write_scenario, capsys, table, line, field,
                                                                   bound):
    shape = {k: v for k, v in SHAPE.items() if k not in line}
    model = "\n".join(f"{k} = {v}" for k, v in shape.items()) + (f"\n{line}" if table == "model" else "")
    train = line if table == "train" else ""
    path = write_scenario(f"[model]\n{model}\n[train]\n{train}\n[[runs]]\nmethod = \"sgd\"\n")
    err = one_message(capsys, run_argv(path, "estimate"))
    assert f"{field}: got " in err and bound in err and len(err) < 500, err
    assert not (path.parent / "o").exists()


HUGE_BATCH = '[model]\nsize = "tiny"\n[train]\nbatch_size = 1000\nseq_len = 1000000\n[[runs]]\nmethod = "sgd"\n'



def test_auto_simulates_on_a_cpu_what_the_host_memory_cannot_hold(write_scenario):
    import psutil

    from galore_bench.measure import host_bytes_needed, resolve_mode
    from galore_bench.spec.scenario import load_scenario
    scenario = load_scenario(str(write_scenario(HUGE_BATCH)))
    run = scenario.runs[0]
    assert host_bytes_needed(scenario, run) > psutil.virtual_memory().total  # a tiny model, a billion tokens
    assert resolve_mode(scenario, run, None, "cpu") == "simulate"
    small = load_scenario(str(write_scenario(HUGE_BATCH.replace("1000000", "32").replace("1000", "2"))))
    assert resolve_mode(small, small.runs[0], None, "cpu") == "measure"  # what the host holds is measured


def test_a_forced_measure_that_cannot_fit_the_host_is_refused_up_front(write_scenario, capsys):
    from galore_bench.measure import host_bytes_needed
    from galore_bench.spec.scenario import load_scenario
    path = write_scenario(HUGE_BATCH)
    scenario = load_scenario(str(path))
    need = host_bytes_needed(scenario, scenario.runs[0])
    err = one_message(capsys, run_argv(path, "measure"))
    assert "needs about" in err and f"({need:,} bytes, estimated)" in err and "--mode simulate" in err, err
    assert not (path.parent / "o").exists()


# -- 13. pathological parse input: deep nesting, thousands of digits, FIFOs, submitit options ----------------
DEEP = ["a = " + "[" * 1000 + "]" * 1000, "a = " + "{b = " * 1000 + "1" + "}" * 1000, "a = 1" + "0" * 5000]


@pytest.mark.parametrize("document", DEEP, ids=["deep-array", "deep-table", "5000-digits"])
def test_pathological_toml_is_one_message_for_scenarios_and_budgets(tmp_path, capsys, document):
    path = tmp_path / "deep.toml"
    path.write_text(document)
    one_message(capsys, ["run", "--scenario", str(path), "--mode", "estimate", "--out", str(tmp_path / "o")])
    err = one_message(capsys, ["check", "--budgets", str(path), str(RECORDS)])
    assert len(err) < 500, err


def test_a_huge_record_nesting_is_one_message(tmp_path, capsys):
    folder = tmp_path / "r" / "d" / "s"
    folder.mkdir(parents=True)
    (folder / "x.simulate.1.json").write_text('{"scenario": ' + "[" * 100_000 + "]" * 100_000 + "}")
    assert "nested too deeply" in one_message(capsys, ["compare", str(tmp_path / "r"), str(RECORDS)])


@pytest.mark.parametrize("budget", ["1" + "0" * 400 + " GiB", "9000 PiB", "99999999999999999999 TiB"])
def test_fit_budget_beyond_2_63_bytes_is_one_message(capsys, budget):
    err = one_message(capsys, ["fit", "--scenario", "7b_4090", "--budget", budget])
    assert "--budget: got " in err and len(err) < 500, err


def test_a_fifo_named_json_is_refused_not_waited_on(tmp_path, capsys):
    import os
    shutil.copytree(RECORDS / "lomo_7b", tmp_path / "r" / "d" / "lomo_7b")
    os.mkfifo(tmp_path / "r" / "d" / "lomo_7b" / "pipe.simulate.1.json")
    assert main(["report", str(tmp_path / "r"), "--out", str(tmp_path / "out")]) == 0  # skipped in a folder
    assert "Traceback" not in capsys.readouterr().err
    pipe = tmp_path / "r" / "d" / "lomo_7b" / "pipe.simulate.1.json"
    err = one_message(capsys, ["compare", str(pipe), str(RECORDS)])
    assert "not a regular file" in err


@pytest.mark.parametrize("command", ["run", "report", "compare", "check"])
def test_a_path_argument_the_system_refuses_is_one_message(tmp_path, capsys, command):
    name = "x" * 300 + (".toml" if command == "run" else ".json")
    argv = {"run": ["run", "--scenario", name, "--out", str(tmp_path / "o")],
            "report": ["report", name, "--out", str(tmp_path / "o")], "compare": ["compare", name, str(RECORDS)],
            "check": ["check", "--budgets", name, str(RECORDS)]}[command]
    assert len(one_message(capsys, argv)) < 1000  # the name is shown once or twice, not a traceback


@pytest.mark.parametrize("option,says", [("nodes=0", "nodes=0: allowed a whole number"),
                                         ("nodes=x", "allowed a whole number"), ("=3", "expected KEY=VALUE"),
                                         ("a b=1", "expected KEY=VALUE")])
def test_a_bad_cluster_option_is_one_message(option, says):
    from galore_bench.errors import UserError
    from galore_bench.run.cluster import parse_options
    with pytest.raises(UserError, match=says):
        parse_options([option])
    assert parse_options(["mem_gb=1.5", "timeout_min=30", "slurm_partition=gpu"]) == {
        "mem_gb": 1.5, "timeout_min": 30, "slurm_partition": "gpu"}  # numbers typed as submitit checks them


def test_an_option_submitit_refuses_is_one_message(write_scenario, tmp_path, capsys):
    pytest.importorskip("submitit")
    path = write_scenario('[model]\nsize = "tiny"\n[train]\nsteps = 1\n[[runs]]\nmethod = "sgd"\n')
    for option in ("timeout_min=abc", "bogus=1"):
        err = one_message(capsys, ["run", "--scenario", str(path), "--mode", "estimate", "--out",
                                   str(tmp_path / "o"), "--submitit", "local", "--cluster-option", option])
        assert "--cluster-option" in err, err


# -- 14. output: a long list of problems is cut; markdown and CSV cells cannot carry HTML or formulas --------
def test_a_message_lists_at_most_50_problems_and_counts_the_rest(write_scenario, capsys):
    runs = "".join(f'[[runs]]\nmethod = "nope{i}"\n' for i in range(5000))
    path = write_scenario('[model]\nsize = "tiny"\n' + runs)
    err = one_message(capsys, run_argv(path, "estimate"))
    assert err.count("runs[") == 50 and "... and 4,950 more" in err and err.startswith(
        "galore-bench: error: 5000 problem(s)"), err[-300:]


HOSTILE_TEXT = '=HYPERLINK("http://x")<img src=x onerror=alert(1)>&amp;'


def test_record_text_is_neither_html_in_markdown_nor_a_formula_in_csv(tmp_path):
    import csv

    source = min((RECORDS / "lomo_7b").glob("*.json"))
    record = json.loads(source.read_text())
    record["run"], record["model"]["name"] = HOSTILE_TEXT, "@SUM(A1)"
    folder = tmp_path / "records" / "d" / "lomo_7b"
    folder.mkdir(parents=True)
    (folder / source.name).write_text(json.dumps(record))
    assert main(["report", str(tmp_path / "records"), "--out", str(tmp_path / "hostile"), "--format", "md,csv"]) == 0
    assert main(["report", str(source), "--out", str(tmp_path / "plain"), "--format", "md,csv"]) == 0
    md = (tmp_path / "hostile" / "lomo_7b.md").read_text()
    assert "<img" not in md and "&lt;img src=x onerror=alert(1)>&amp;amp;" in md
    for table in (tmp_path / "hostile").glob("*.csv"):
        with table.open() as handle, (tmp_path / "plain" / table.name).open() as plain_handle:
            rows, plain = list(csv.reader(handle)), list(csv.reader(plain_handle))
        cells = [(cell, before) for row, plain_row in zip(rows, plain) for cell, before in zip(row, plain_row)]
        assert not [cell for cell, _ in cells if cell[:1] and cell[0] in "=+-@" and not _is_number(cell)], table.name
        assert any(cell == "'" + HOSTILE_TEXT for cell, _ in cells), table.name
        assert [c for c, b in cells if _is_number(b)] == [b for _, b in cells if _is_number(b)]  # numbers as were


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def test_csv_safe_prefixes_only_text_that_would_be_a_formula():
    import pandas as pd

    from galore_bench.report.table_text import csv_safe
    frame = pd.DataFrame({"label": ["=1+1", "+x", "-x", "@x", "-1.5", "ok", "-", "- (0.35 GB)", "- (1)+cmd"],
                          "n": [-1.0, 2, 3, 4, 5, 6, 7, 8, 9]})
    assert csv_safe(frame)["label"].tolist() == ["'=1+1", "'+x", "'-x", "'@x", "-1.5", "ok", "-", "- (0.35 GB)",
                                                 "'- (1)+cmd"]
    assert csv_safe(frame)["n"].tolist() == frame["n"].tolist()


# -- properties: generated damage to a real record, generated budget files ----------------------------------
def _paths(value: object, prefix: tuple = ()) -> list[tuple]:
    """Every field path in a record (a list by its first item)."""
    items = value.items() if isinstance(value, dict) else [(0, value[0])] if isinstance(value, list) and value \
        else []
    return [path for key, item in items for path in [(*prefix, key), *_paths(item, (*prefix, key))]]


RECORD = json.loads(min((RECORDS / "lomo_7b").glob("*.json")).read_text())
WRONG_VALUES = (st.none() | st.booleans() | st.integers(-3, 3) | st.floats() | st.sampled_from(["BIG", "12", ""])
                | st.text(max_size=6) | st.lists(st.integers(), max_size=2) | st.dictionaries(st.text(max_size=3),
                                                                                          st.integers(), max_size=2))
EXAMPLES = settings(max_examples=int(os.environ.get("HYPOTHESIS_EXAMPLES", "25")), deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])


def _answers(argv: list[str]) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(argv)
    return code, err.getvalue()


@EXAMPLES
@given(st.lists(st.tuples(st.sampled_from(_paths(RECORD)), WRONG_VALUES), min_size=1, max_size=3))
def test_generated_record_damage_is_read_or_refused_with_one_message(damage):
    with tempfile.TemporaryDirectory() as folder:
        record = json.loads(json.dumps(RECORD))
        for path, value in damage:
            node: Any = record
            for key in path[:-1]:  # an earlier damage may have replaced a parent: then this one is dropped
                node = node.get(key) if isinstance(node, dict) else node[0] if isinstance(node, list) and node else None
            if isinstance(node, dict) or isinstance(node, list) and node and path[-1] == 0:
                node[path[-1]] = value
        root = Path(folder)
        (root / "r" / "d" / "lomo_7b").mkdir(parents=True)
        (root / "r" / "d" / "lomo_7b" / "x.simulate.1.json").write_text(json.dumps(record).replace('"BIG"', BIG))
        (root / "b.toml").write_text('[[budget]]\nscenario = "lomo_7b"\nrun = "*"\npeak = "100 GiB"\n')
        for argv in (["report", str(root / "r"), "--out", str(root / "out"), "--format", "md,csv"],
                     ["compare", str(root / "r"), str(root / "r")], ["check", "--budgets", str(root / "b.toml"),
                                                                     str(root / "r")]):
            code, message = _answers(argv)
            assert code in (0, 1) and "Traceback" not in message, message
            assert code == 0 or message.startswith("galore-bench: error: ") or argv[0] == "check", message


def toml_value(value: Any) -> str:
    """One TOML value, inline: JSON's strings, lists and keys are TOML's; NaN and infinities are spelled."""
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else "inf" if value > 0 else "-inf"
    if isinstance(value, list):
        return "[" + ", ".join(map(toml_value, value)) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {toml_value(v)}" for k, v in value.items()) + "}"
    return json.dumps(value)


BUDGET_KEYS = st.sampled_from(["peak", "reserved", "gradients", "tgs_min", "perplexity_max", "grow_max", "run",
                               "mode", "baseline", "scenario"])


@EXAMPLES
@given(st.dictionaries(BUDGET_KEYS, WRONG_VALUES | st.sampled_from(["2%", "1 GiB", "nan%", "1e400 GiB"]),
                       min_size=1, max_size=4))
def test_a_generated_budget_file_is_checked_or_refused_with_one_message(table):
    with tempfile.TemporaryDirectory() as folder:
        budgets = Path(folder) / "b.toml"
        body = {"scenario": "lomo_7b", **{k: (BIG_INT if v == "BIG" else v) for k, v in table.items()
                                          if v is not None}}
        budgets.write_text("[[budget]]\n" + "".join(f"{k} = {toml_value(v)}\n" for k, v in body.items()))
        code, message = _answers(["check", "--budgets", str(budgets), str(RECORDS)])
        assert code in (0, 1) and "Traceback" not in message, message
        assert len(message) < 5000, message[:500]
