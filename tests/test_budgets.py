"""Budgets: TOML validation, verdicts against records, the `check` command and assert_memory_budget."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from galore_bench.check.budgets import assert_memory_budget, evaluate, load_budgets
from galore_bench.cli import main
from galore_bench.errors import UserError
from galore_bench.spec.scenario import load_scenario

from conftest import TINY_HEADER
from fixtures import records
from fixtures.records import GIB as GiB

BREAKDOWN = {"weights": int(12.55 * GiB), "gradients": int(0.09 * GiB), "optimizer_states": int(5.31 * GiB),
             "activations": int(1.42 * GiB), "other": int(0.22 * GiB)}
LABEL = "galore8bit-layerwise"


def make_record(breakdown: dict[str, int], run: str = LABEL, created: str = "2026-01-01T00:00:00Z",
                status: str = "ok") -> dict:
    """A simulated 7b_4090 record (the shared factory) that measured 120 tokens/s and perplexity 30."""
    method = next(r for r in load_scenario("7b_4090").runs if r.label == run).method
    return records.make_record(run, dict(breakdown), method=method, scenario="7b_4090", model="7b",
                               created=created, status=status, budget=24 * GiB, tokens_per_second=120.0,
                               tgs=120.0, perplexity=30.0, final_loss=3.4)


write = records.write_record


def budgets_file(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "budgets.toml"
    path.write_text(body)
    return path


RULES = f"""
[[budget]]
scenario = "7b_4090"
run = "{LABEL}"
peak = "19.65 GiB"
tgs_min = 100.0
perplexity_max = 40.0
baseline = "baseline"
grow_max = "2%"
"""


def test_passing_records_exit_0(tmp_path, capsys):
    write(tmp_path / "baseline", make_record(BREAKDOWN))
    results = tmp_path / "results"
    write(results, make_record({**BREAKDOWN, "optimizer_states": BREAKDOWN["optimizer_states"] + 2**20}))
    # an older, worse record and a newer failed one are ignored: the newest ok record counts
    write(results, make_record({**BREAKDOWN, "weights": 30 * GiB}, created="2025-01-01T00:00:00Z"))
    write(results, make_record({**BREAKDOWN, "weights": 30 * GiB}, created="2027-01-01T00:00:00Z", status="oom"))
    rc = main(["check", "--budgets", str(budgets_file(tmp_path, RULES)), str(results)])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "0 violation(s)" in out


def test_gradient_copy_regression_is_named(tmp_path, capsys):
    """A method that keeps an extra copy of its gradients: gradients double, the check says so."""
    write(tmp_path / "baseline", make_record(BREAKDOWN))
    doubled = {**BREAKDOWN, "gradients": 2 * BREAKDOWN["gradients"]}
    results = tmp_path / "results"
    write(results, make_record(doubled))
    path = budgets_file(tmp_path, RULES)

    verdicts = evaluate(load_budgets(path), [json.loads(p.read_text()) for p in results.glob("*.json")])
    failed = [v for v in verdicts if not v.ok]
    assert [v.rule.field for v in failed] == ["peak", "gradients"]  # peak grew > 2%, and gradients itself
    growth = "gradients +92.16 MiB"
    assert all(growth in v.message for v in failed), [v.message for v in failed]
    assert failed[1].message == (f"7b_4090/{LABEL}: gradients 184.32 MiB > budget 94.00 MiB (baseline 92.16 MiB +2%) "
                                 "(+90.32 MiB; largest growth vs baseline: gradients +92.16 MiB)")

    rc = main(["check", "--budgets", str(path), str(results)])
    out = capsys.readouterr().out
    assert rc == 1
    assert f"largest growth vs baseline: {growth}" in out


def test_absolute_limit_without_baseline_names_largest_category(tmp_path):
    rules = load_budgets(budgets_file(tmp_path, f'[[budget]]\nscenario = "7b_4090"\nrun = "{LABEL}"\n'
                                               'peak = "19 GiB"\n'))
    [verdict] = evaluate(rules, [make_record(BREAKDOWN)])
    assert not verdict.ok
    assert verdict.message == (f"7b_4090/{LABEL}: peak 19.59 GiB > budget 19.00 GiB "
                               "(+604.16 MiB; largest category: weights 12.55 GiB)")


def test_missing_record_and_star_expand_to_every_run(tmp_path):
    rules = load_budgets(budgets_file(tmp_path, '[[budget]]\nscenario = "7b_4090"\nrun = "*"\npeak = "60 GiB"\n'))
    assert {r.run for r in rules} == {r.label for r in load_scenario("7b_4090").runs}
    verdicts = evaluate(rules, [make_record(BREAKDOWN)])
    assert [v.ok for v in verdicts if v.rule.run == LABEL] == [True]
    missing = [v.message for v in verdicts if not v.ok]
    assert len(missing) == len(rules) - 1
    assert "no ok record for 7b_4090/adamw" in missing


def test_a_mode_key_counts_only_records_of_that_mode(tmp_path):
    body = f'[[budget]]\nscenario = "7b_4090"\nrun = "{LABEL}"\nmode = "simulate"\npeak = "20 GiB"\n'
    rules = load_budgets(budgets_file(tmp_path, body))
    simulated = make_record(BREAKDOWN)  # 19.59 GiB, simulate
    estimated = make_record({**BREAKDOWN, "weights": 0}, created="2026-02-01T00:00:00Z")  # newer, smaller
    estimated["mode"] = "estimate"
    [verdict] = evaluate(rules, [simulated, estimated])
    assert verdict.ok and verdict.value == sum(BREAKDOWN.values())  # the newer estimate does not stand in
    [verdict] = evaluate(rules, [estimated])
    assert not verdict.ok and verdict.message == f"no ok simulate record for 7b_4090/{LABEL}"


def test_check_reports_a_missing_record_once_and_apart_from_violations(tmp_path, capsys):
    body = '[[budget]]\nscenario = "7b_4090"\nrun = "adamw"\npeak = "70 GiB"\ngradients = "13 GiB"\n'
    (tmp_path / "empty").mkdir()
    assert main(["check", "--budgets", str(budgets_file(tmp_path, body)), str(tmp_path / "empty")]) == 1
    out = capsys.readouterr().out
    assert out.count("no ok record for 7b_4090/adamw under") == 1
    assert "0 ok, 0 violation(s), 2 rule(s) without a record" in out


@pytest.mark.parametrize("body, problem", [
    ('', "budget: got 'no [[budget]] table', allowed at least one"),
    ('scenario = "7b_9999"\npeak = "22 GiB"', "budget[0].scenario: got '7b_9999', allowed one of"),
    ('scenario = "7b_4090"\npeak = "22 GiB"\nlatency_max = 3', "budget[0].latency_max: got 'latency_max', allowed"),
    ('scenario = "7b_4090"\npeak = "22 gigs"', "budget[0].peak: got '22 gigs', allowed a size"),
    ('scenario = "7b_4090"\nrun = "adamx"\npeak = "22 GiB"', "budget[0].run: got 'adamx', allowed '*' or one of"),
    ('scenario = "7b_4090"\npeak = "0 GiB"', "budget[0].peak: got '0 GiB', allowed a size > 0"),
    ('scenario = "7b_4090"\nmode = "guess"\npeak = "1 GiB"', "budget[0].mode: got 'guess', allowed one of estimate"),
    ('scenario = "7b_4090"\nbaseline = "."\ngrow_max = "-50%"',
     "budget[0].grow_max: got '-50%', allowed a finite percentage >= 0"),
    ('scenario = "7b_4090"\nbaseline = "."\ngrow_max = true',
     "budget[0].grow_max: got True, allowed a finite percentage >= 0"),
])
def test_bad_budget_files(tmp_path, capsys, body, problem):
    path = budgets_file(tmp_path, ("[[budget]]\n" + body + "\n") if body else "")
    with pytest.raises(UserError, match=re.escape(problem)):
        load_budgets(path)
    assert main(["check", "--budgets", str(path), str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert f"{path}: {problem}" in err


def test_all_problems_reported_at_once(tmp_path):
    path = budgets_file(tmp_path, '[[budget]]\nscenario = "nope"\npeak = "22 gigs"\nfoo = 1\n'
                                  '[[budget]]\nscenario = "lomo_7b"\ngrow_max = "2%"\n')
    with pytest.raises(UserError) as info:
        load_budgets(path)
    text = str(info.value)
    assert "4 problem(s)" in text
    for where in ("budget[0].scenario", "budget[0].peak", "budget[0].foo", "budget[1].grow_max"):
        assert f"{path}: {where}: got" in text


def test_assert_memory_budget():
    record = make_record(BREAKDOWN)
    assert_memory_budget(record, peak="20 GiB", gradients="100 MiB")  # within: no error
    assert_memory_budget(BREAKDOWN, peak=20 * GiB)  # a bare breakdown: peak is its sum
    with pytest.raises(AssertionError, match=r"7b_4090/galore8bit-layerwise: gradients 92.16 MiB > budget "
                                             r"50.00 MiB \(\+42.16 MiB; largest category: weights 12.55 GiB\)"):
        assert_memory_budget(record, gradients="50 MiB")
    grown = {**BREAKDOWN, "gradients": 2 * BREAKDOWN["gradients"]}
    with pytest.raises(AssertionError, match=r"largest growth vs baseline: gradients \+92.16 MiB"):
        assert_memory_budget(grown, peak="19.6 GiB", baseline=BREAKDOWN)
    with pytest.raises(TypeError, match="unknown field"):
        assert_memory_budget(record, gradient="1 GiB")


def test_reserved_budget_reads_the_gpu_then_the_allocator_model(tmp_path):
    """A 24 GiB card fails on reserved bytes: the budget reads the CUDA allocator's figure when measured and the
    caching-allocator model's when simulated, and an allocator-model OOM fails the rule outright."""
    rules = load_budgets(budgets_file(tmp_path, f'[[budget]]\nscenario = "7b_4090"\nrun = "{LABEL}"\n'
                                                'reserved = "21 GiB"\n'))
    simulated = make_record(BREAKDOWN)
    simulated["memory"]["allocator_model"] = {"peak_reserved_bytes": int(20.44 * GiB), "out_of_memory": None}
    (verdict,) = evaluate(rules, [simulated])
    assert verdict.ok and verdict.value == int(20.44 * GiB)
    simulated["memory"]["allocator_model"]["peak_reserved_bytes"] = 22 * GiB
    (verdict,) = evaluate(rules, [simulated])
    assert not verdict.ok and "reserved 22.00 GiB > budget 21.00 GiB" in verdict.message
    measured = make_record(BREAKDOWN, created="2026-01-02T00:00:00Z")
    measured["memory"]["cuda"] = {"reserved_bytes": 20 * GiB}
    assert evaluate(rules, [simulated, measured])[0].value == 20 * GiB  # the newest record: the GPU's reading
    simulated["memory"]["allocator_model"] = {"peak_reserved_bytes": 23 * GiB, "out_of_memory": "1 bytes ..."}
    (verdict,) = evaluate(rules, [simulated])
    assert not verdict.ok and "runs out of memory" in verdict.message


def test_assert_memory_budget_reads_reserved_from_the_record():
    record = make_record(BREAKDOWN)
    record["memory"]["allocator_model"] = {"peak_reserved_bytes": 30 * GiB, "out_of_memory": None}
    assert_memory_budget(record, reserved="31 GiB")
    with pytest.raises(AssertionError, match="reserved 30.00 GiB > budget 1.00 GiB"):
        assert_memory_budget(record, reserved="1 GiB")
    with pytest.raises(AssertionError, match="reserved not measured"):
        assert_memory_budget(BREAKDOWN, reserved="1 GiB")  # a bare breakdown has no reserved figure


def test_a_budget_on_your_own_scenario_file_runs_and_checks_it(tmp_path, capsys):
    (tmp_path / "mine.toml").write_text(TINY_HEADER + '[[runs]]\nmethod = "sgd"\n[[runs]]\nmethod = "adamw"\n')
    body = '[[budget]]\nscenario = "mine.toml"\nrun = "sgd"\nmode = "simulate"\npeak = "{}"\n'
    [rule] = load_budgets(budgets_file(tmp_path, body.format("1 GiB")))
    assert (rule.scenario, rule.scenario_file) == ("mine", str(tmp_path / "mine.toml"))  # beside the budgets file
    results = tmp_path / "results"
    assert main(["check", "--budgets", str(tmp_path / "budgets.toml"), "--run", str(results)]) == 0
    assert [p.name.split(".")[0] for p in results.rglob("*.json")] == ["sgd"]  # only the run a rule names
    budgets_file(tmp_path, body.format("1 KiB"))
    assert main(["check", "--budgets", str(tmp_path / "budgets.toml"), str(results)]) == 1
    assert "mine/sgd: peak" in capsys.readouterr().out


def test_a_mode_key_also_picks_the_baseline_of_that_mode(tmp_path, capsys):
    """A newer estimate record in the baseline folder does not become the simulate rule's baseline."""
    write(tmp_path / "baseline", make_record(BREAKDOWN))  # simulate
    estimated = make_record({k: v // 2 for k, v in BREAKDOWN.items()}, created="2026-02-01T00:00:00Z")
    estimated["mode"] = "estimate"
    write(tmp_path / "baseline", estimated)
    body = f'[[budget]]\nscenario = "7b_4090"\nrun = "{LABEL}"\nmode = "simulate"\nbaseline = "baseline"\n' \
           'grow_max = "2%"\n'
    rules = load_budgets(budgets_file(tmp_path, body))
    assert all(v.ok for v in evaluate(rules, [make_record(BREAKDOWN)]))  # against the simulate baseline: no growth
    results = tmp_path / "results"
    write(results, make_record(BREAKDOWN))
    (tmp_path / "baseline").rename(tmp_path / "old")
    (tmp_path / "baseline").mkdir()
    write(tmp_path / "baseline", estimated)  # only an estimate: the simulate rule has no baseline
    assert main(["check", "--budgets", str(tmp_path / "budgets.toml"), str(results)]) == 1
    out = " ".join(capsys.readouterr().out.split())
    assert out.count(f"no ok simulate baseline record for 7b_4090/{LABEL}") == 1  # once, not once per field
    assert "no baseline" in out and "0 ok, 0 violation(s), 6 rule(s) without a record or baseline" in out
