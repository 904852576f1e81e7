"""The runner end to end: real CPU training through worker processes, records, crash isolation, resume."""
from __future__ import annotations

import dataclasses
import json
import pickle

import pytest

from galore_bench.errors import UserError
from galore_bench.measure import resolve_mode
from galore_bench.record import problems_in
from galore_bench.run.request import RunRequest
from galore_bench.run.sweep import run_scenario
from galore_bench.run.worker import FAULT_ENV
from galore_bench.spec.scenario import load_scenario
from galore_bench.store import load as load_record

from conftest import TINY_HEADER
from fixtures.records import GIB, make_record, parts, write_record

BREAKDOWN = parts(int(12.55 * GIB), int(0.09 * GIB), int(5.31 * GIB), int(1.42 * GIB), int(0.22 * GIB))

TWO_RUNS = TINY_HEADER + """
[[runs]]
method = "adamw"
lr = 3e-3
[[runs]]
method = "sgd"
lr = 0.3
"""


def test_sweep_trains_and_writes_valid_records(write_scenario, tmp_path):
    scenario = load_scenario(str(write_scenario(TWO_RUNS, "two")))
    paths = run_scenario(scenario, out=tmp_path / "results")
    assert len(paths) == 2
    for path, run in zip(paths, scenario.runs):
        record = load_record(path)
        assert record["status"] == "ok", record["error"]
        assert record["run"] == run.label and record["mode"] == "measure"
        losses = record["quality"]["losses"]
        assert len(losses) == 4 and losses[-1] < losses[0], losses
        breakdown = record["memory"]["breakdown"]
        assert sum(breakdown.values()) == record["memory"]["peak_bytes"]
        assert breakdown["weights"] == 164_672 * 4  # tiny model, fp32, counted by hand in test_models_records
        assert record["throughput"]["tokens_per_second"] > 0


def test_records_written_by_a_sweep_are_schema_3_with_every_field(write_scenario, tmp_path):
    scenario = load_scenario(str(write_scenario(TWO_RUNS, "fields")))
    for mode in ("estimate", "simulate"):
        path = run_scenario(scenario, out=tmp_path / mode, mode=mode, only="adamw")[0]
        record = json.loads(path.read_text())  # the file itself, not an upgraded copy
        assert record["schema_version"] == 3 and record["mode"] == mode and record["status"] == "ok"
        assert problems_in(record) == []  # every v3 field present: estimate's memory section completed too
        assert record["memory"]["cuda"] is None and record["distributed"] is None
        kinds = {reading["kind"] for reading in record["memory"]["readings"].values()}
        assert kinds == ({"estimate"} if mode == "estimate" else {"model", "estimate"})


def test_a_run_request_crosses_into_a_child_process_as_one_frozen_value(tmp_path):
    request = RunRequest("smoke_cpu", 0, tmp_path, mode="simulate", steps=3, threads=1)
    assert pickle.loads(pickle.dumps(request)) == request
    with pytest.raises(dataclasses.FrozenInstanceError):
        request.mode = "measure"  # type: ignore[misc]
    scenario, run = request.load()
    assert (scenario.name, run.label) == ("smoke_cpu", scenario.runs[0].label)


def test_auto_mode_resolves_by_device_and_model_size(write_scenario):
    small = load_scenario(str(write_scenario(TWO_RUNS, "small")))
    run = small.runs[0]
    assert resolve_mode(small, run, "auto", "cpu") == "measure"  # 164,672 parameters: real steps on a CPU
    assert resolve_mode(small, run, "simulate", "cuda") == "simulate"  # an explicit mode is kept
    big = load_scenario("7b_4090")
    assert resolve_mode(big, big.runs[0], "auto", "cpu") == "simulate"  # 6.7e9 > 2e8: a trace instead
    assert resolve_mode(big, big.runs[0], "auto", "cuda") == "measure"


def test_killed_run_leaves_finished_records_and_sweep_continues(write_scenario, tmp_path, monkeypatch):
    body = TWO_RUNS + '[[runs]]\nmethod = "adamw"\nlabel = "adamw-again"\n'
    scenario = load_scenario(str(write_scenario(body, "three")))
    monkeypatch.setenv(FAULT_ENV, "kill:sgd")  # the middle run dies mid-way by SIGKILL
    paths = run_scenario(scenario, out=tmp_path / "results")
    records = [load_record(p) for p in paths]
    assert [r["status"] for r in records] == ["ok", "error", "ok"]
    assert "code -9" in records[1]["error"]
    first_before = paths[0].read_bytes()
    monkeypatch.delenv(FAULT_ENV)
    resumed = run_scenario(scenario, out=tmp_path / "results", skip_existing=True)
    assert resumed[0] == paths[0] and resumed[2] == paths[2]  # finished records reused, untouched
    assert paths[0].read_bytes() == first_before
    assert load_record(resumed[1])["status"] == "ok"


def test_runs_option_selects_by_label_and_keeps_each_run_its_own_settings(write_scenario, tmp_path):
    """--runs sgd runs the second run of the file (lr 0.3, its own method), not the first one renumbered."""
    from galore_bench.cli import main

    path = write_scenario(TWO_RUNS, "pick")
    out = tmp_path / "results"
    assert main(["run", "--scenario", str(path), "--runs", "sgd", "--mode", "estimate", "--out", str(out)]) == 0
    (only,) = [load_record(p) for p in out.rglob("*.json")]
    assert only["run"] == "sgd" and only["method"]["name"] == "sgd" and only["method"]["lr"] == 0.3
    with pytest.raises(UserError, match=r"--runs: pick has no run labelled adam, lomo; its runs: adamw, sgd"):
        run_scenario(load_scenario(str(path)), out=out, only="adamw, adam,lomo")
    with pytest.raises(UserError, match=r"--runs: pick has no run labelled ' , '; its runs: adamw, sgd"):
        run_scenario(load_scenario(str(path)), out=out, only=" , ")


def test_memory_snapshot_is_refused_with_a_note_without_cuda(write_scenario, tmp_path):
    """The allocator snapshot exists only for CUDA measure runs; elsewhere the record says why it is missing."""
    import torch

    from galore_bench.run.worker import execute

    if torch.cuda.is_available():
        pytest.skip("checks the CPU answer")
    scenario = load_scenario(str(write_scenario(TINY_HEADER + '[[runs]]\nmethod = "sgd"\n')))
    record = execute(scenario, scenario.runs[0], "measure", 2, snapshot_dir=tmp_path)
    assert record["status"] == "ok"
    assert record["memory"]["snapshot"] is None and "CUDA allocator" in record["memory"]["snapshot_note"]
    assert not list(tmp_path.rglob("*.pickle"))


def test_results_table_shows_reserved_from_the_gpu_or_the_allocator_model(tmp_path):
    from rich.console import Console

    from galore_bench.cli.run import results_table

    simulated = make_record("galore", BREAKDOWN, allocator_model={"peak_reserved_bytes": int(20.44 * GIB),
                                                                    "out_of_memory": None})
    capped = make_record("adamw", BREAKDOWN,
                         allocator_model={"peak_reserved_bytes": 23 * GIB, "out_of_memory": "..."})
    measured = make_record("galore", BREAKDOWN, created="2026-01-02T00:00:00Z",
                           cuda={"reserved_bytes": 20 * GIB})
    paths = [write_record(tmp_path, r, f"{i}.json") for i, r in enumerate((simulated, capped, measured))]
    console = Console(width=250, record=True)
    console.print(results_table(paths))
    lines = console.export_text().splitlines()
    header = next([c.strip() for c in line.split("┃")] for line in lines if line.startswith("┃"))
    assert header[11] == "reserved"  # after run, mode, status, peak, the five categories and fits
    cells = [[c.strip() for c in line.split("│")] for line in lines if line.startswith("│")]
    assert [row[11] for row in cells] == ["20.44 GiB", "OOM", "20.00 GiB"]


@pytest.mark.parametrize(("extra", "message"), [
    (["--out", "{file}"], "--out: got {file}, a file; allowed a folder"),
    (["--steps", "0"], "--steps: got 0, allowed an int >= 2"),
    (["--cluster-option", "timeout_min=5"], "--cluster-option: given without --submitit"),
    (["--runs", ""], "--runs: args has no run labelled ''; its runs: adamw, sgd"),
])
def test_run_refuses_bad_arguments_before_any_run(write_scenario, tmp_path, capsys, extra, message):
    from galore_bench.cli import main

    path, file = write_scenario(TWO_RUNS, "args"), tmp_path / "a-file"
    file.write_text("")
    argv = ["run", "--scenario", str(path), "--mode", "estimate", *[a.format(file=file) for a in extra]]
    if "--out" not in extra:
        argv += ["--out", str(tmp_path / "results")]
    assert main(argv) == 1
    assert message.format(file=file) in capsys.readouterr().err
    assert not (tmp_path / "results").exists()


def test_run_exits_1_when_a_run_crashed_but_not_for_an_out_of_memory(write_scenario, tmp_path, capsys, monkeypatch):
    from galore_bench.cli import main
    from galore_bench.cli.run import exit_status

    monkeypatch.setenv(FAULT_ENV, "kill:sgd")
    assert main(["run", "--scenario", str(write_scenario(TWO_RUNS, "dies")), "--out", str(tmp_path / "r")]) == 1
    err = capsys.readouterr().err
    assert "run sgd failed: worker exited with code -9" in err and "1 of 2 run(s) failed" in err
    assert len(list((tmp_path / "r").rglob("*.json"))) == 2  # the error record is kept beside the good one
    oom = write_record(tmp_path / "oom", make_record("adamw", BREAKDOWN, status="oom"))
    assert exit_status([oom]) == 0  # "OOM at 23.9 GiB" is a result
