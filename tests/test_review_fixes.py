"""Edges a second read of the restructuring found: records written in the same second, a GPU name that is not a
file name, a run's step count under --steps, the torchrun entry's labels, paths the system refuses, broken plugins."""
from __future__ import annotations

import json
from importlib.metadata import EntryPoint
from pathlib import Path

import pytest

from galore_bench import methods, store
from galore_bench.cli import main
from galore_bench.errors import UserError
from galore_bench.measure import training
from galore_bench.methods import PLUGIN_ENV, REGISTRY
from galore_bench.record_upgrade import upgrade_2_to_3

from conftest import TINY_HEADER
from fixtures.records import make_record, parts  # version 2 records: upgrade_2_to_3 before store.write


def test_of_two_records_written_in_the_same_second_the_later_one_is_newest(tmp_path: Path):
    first = store.write(upgrade_2_to_3(make_record("adamw", parts(weights=100))), tmp_path)
    second = store.write(upgrade_2_to_3(make_record("adamw", parts(weights=200))), tmp_path)
    assert second.name.endswith("-1.json")  # write's own name for the second file of that second
    chosen = store.newest(store.load_all([tmp_path]))
    assert [path for path, _ in chosen.values()] == [second] and first != second
    assert store.finished(tmp_path, "smoke_cpu", "adamw", "simulate") == second


def test_a_gpu_name_outside_the_safe_set_becomes_a_folder_name(monkeypatch):
    monkeypatch.setattr(training.torch.cuda, "get_device_name", lambda: "AMD Instinct MI250X / MI250")
    assert training.device_name("cuda") == "AMD-Instinct-MI250X-MI250"


def test_the_record_says_how_many_steps_ran_under_steps(write_scenario, tmp_path: Path):
    path = write_scenario(TINY_HEADER + '[[runs]]\nmethod = "sgd"\n')
    assert main(["run", "--scenario", str(path), "--mode", "measure", "--steps", "5", "--out", str(tmp_path)]) == 0
    (file,) = store.find([tmp_path])
    record = json.loads(file.read_text())
    assert record["train"]["steps"] == 5 == len(record["quality"]["losses"])


def test_the_torchrun_entry_refuses_a_label_the_scenario_does_not_have(write_scenario, tmp_path: Path, capsys):
    path = write_scenario(TINY_HEADER + '[distributed]\nstrategy = "ddp"\n[[runs]]\nmethod = "sgd"\n')
    assert main(["ranks", "--scenario", str(path), "--label", "sgdd", "--mode", "simulate",
                 "--out", str(tmp_path)]) == 1
    assert "has no run labelled sgdd" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["run", "report"])
def test_an_out_path_the_system_refuses_is_one_message(tmp_path: Path, capsys, command):
    out = str(tmp_path / ("x" * 300))
    args = ["run", "--scenario", "smoke_cpu", "--mode", "estimate", "--out", out] if command == "run" \
        else ["report", str(tmp_path), "--out", out]
    if command == "report":
        store.write(upgrade_2_to_3(make_record("adamw", parts(weights=100))), tmp_path)
    assert main(args) == 1
    err = capsys.readouterr().err
    assert err.startswith("galore-bench: error: ") and "Traceback" not in err


def test_a_broken_entry_point_plugin_is_one_message(monkeypatch):
    point = EntryPoint(name="broken", value="no_such_module_for_galore_bench:METHODS", group=methods.ENTRY_POINT_GROUP)
    monkeypatch.delenv(PLUGIN_ENV, raising=False)
    monkeypatch.setattr(methods.importlib.metadata, "entry_points",
                        lambda group: [point] if group == methods.ENTRY_POINT_GROUP else [])
    REGISTRY.reload()  # read again on next use
    try:
        with pytest.raises(UserError, match=r"entry point broken \(galore_bench.methods\): cannot load"):
            REGISTRY["adamw"]
    finally:
        monkeypatch.undo()
        REGISTRY.reload()
    assert "adamw" in REGISTRY
