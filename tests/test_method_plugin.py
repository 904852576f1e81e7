"""A method defined in one file inside tests/ (plugin_method.py) plugs into the registry, estimate, simulate,
measure and the reports, with no other file edited: GALORE_BENCH_METHODS names the file."""
from __future__ import annotations

import json
from importlib.metadata import EntryPoint
from pathlib import Path

import pandas as pd
import pytest

from galore_bench import methods
from galore_bench.cli import main
from galore_bench.errors import UserError
from galore_bench.measure.estimate import EstimateUnavailable, estimate
from galore_bench.measure.largest_batch import fit_rows, largest_batch
from galore_bench.methods import PLUGIN_ENV, REGISTRY
from galore_bench.models import ZOO, build_model
from galore_bench.spec.scenario import load_scenario, parse_scenario
from tests.conftest import TINY_HEADER

PLUGIN = Path(__file__).with_name("plugin_method.py")
RUNS = '[[runs]]\nmethod = "heavyball"\nmomentum = 0.8\n[[runs]]\nmethod = "adamw"\n'


def velocity_bytes(round_to: int) -> int:
    """By hand, from the real tiny model: one fp32 velocity per parameter, each rounded up to `round_to` bytes."""
    model = build_model(ZOO["tiny"], "fp32")
    return sum(-(-p.numel() * 4 // round_to) * round_to for p in model.parameters())


def records(results: Path) -> dict[tuple[str, str], dict]:
    found = [json.loads(path.read_text()) for path in results.rglob("*.json")]
    return {(r["run"], r["mode"]): r for r in found}


def test_a_plugin_method_runs_in_every_mode_and_reaches_the_report(write_scenario, tmp_path, monkeypatch, capsys):
    path, results = write_scenario(TINY_HEADER + RUNS), tmp_path / "results"
    monkeypatch.delenv(PLUGIN_ENV, raising=False)
    assert main(["run", "--scenario", str(path), "--mode", "estimate", "--out", str(results)]) == 1
    assert "runs[0].method: got 'heavyball'" in capsys.readouterr().err  # unknown without the plugin
    # a run before the variable is set starts the fork server without it: later workers must still see it
    write_scenario(TINY_HEADER + '[[runs]]\nmethod = "adamw"\n', name="plain")
    assert main(["run", "--scenario", str(tmp_path / "plain.toml"), "--mode", "estimate",
                 "--out", str(tmp_path / "plain")]) == 0
    monkeypatch.setenv(PLUGIN_ENV, str(PLUGIN))
    assert "heavyball" in REGISTRY and "sketch" in REGISTRY
    for mode in ("estimate", "simulate", "measure"):
        assert main(["run", "--scenario", str(path), "--mode", mode, "--out", str(results)]) == 0
    found = records(results)
    assert len(found) == 6 and all(r["status"] == "ok" for r in found.values())
    guess, traced, measured = (found[("heavyball", mode)] for mode in ("estimate", "simulate", "measure"))

    assert guess["method"] == {"name": "heavyball", "momentum": 0.8, "lr": 1e-3, "weight_decay": 0.0, "label": "",
                               "precision": "", "loss": "",
                               "implementation": None}  # an estimate builds no optimizer
    assert guess["memory"]["estimate"]["terms"]["optimizer_states"] == velocity_bytes(512) == 659_968
    assert traced["memory"]["category_peaks"]["optimizer_states"] == velocity_bytes(512)
    assert measured["memory"]["category_peaks"]["optimizer_states"] == velocity_bytes(1)  # a CPU run: exact bytes
    assert guess["memory"]["peak_bytes"] == pytest.approx(traced["memory"]["peak_bytes"], rel=0.02)
    assert traced["memory"]["estimate"]["peak_bytes"] == guess["memory"]["peak_bytes"]  # the cross-check
    adamw = found[("adamw", "simulate")]["memory"]["category_peaks"]["optimizer_states"]
    assert adamw == 2 * velocity_bytes(512) + 512 * len(list(build_model(ZOO["tiny"], "fp32").parameters()))
    assert measured["method"]["implementation"] == {"optimizer": "tests.plugin_method.HeavyBall"}
    assert len(measured["quality"]["losses"]) == 4 and measured["throughput"]["tokens_per_second"] > 0

    capsys.readouterr()
    assert main(["report", str(results), "--out", str(tmp_path / "out"), "--format", "md,csv"]) == 0
    table = pd.read_csv(tmp_path / "out" / "case_breakdown.csv").set_index("run")  # GiB, 6 decimals
    states = table["optimizer_states GiB"]
    assert states["heavyball [simulate, simulated-cpu]"] == pytest.approx(velocity_bytes(512) / 2**30, abs=1e-6)
    assert states["heavyball [measure, cpu]"] == pytest.approx(velocity_bytes(1) / 2**30, abs=1e-6)
    assert (table["method"] == "heavyball").sum() == 3  # estimate, simulate, measure
    speed = pd.read_csv(tmp_path / "out" / "case_speed.csv")
    assert speed.loc[speed["method"] == "heavyball", "tokens/s"].iloc[0] > 0
    assert "| heavyball [measure, cpu] | heavyball | tiny | cpu | ok |" in (tmp_path / "out" / "case.md").read_text()


def test_a_method_without_estimate_terms_is_refused_by_estimate_and_fit(write_scenario, tmp_path, monkeypatch,
                                                                        capsys):
    monkeypatch.setenv(PLUGIN_ENV, str(PLUGIN))
    message = ("estimate: method 'sketch' has no closed-form estimate terms (a sketch: its bytes are not written "
               "down yet); run it in simulate or measure mode")
    with pytest.raises(EstimateUnavailable) as refused:
        estimate(ZOO["tiny"], "sketch", {}, batch_size=1, seq_len=8, dtype="bf16")
    assert str(refused.value) == message
    path, results = write_scenario(TINY_HEADER + '[[runs]]\nmethod = "sketch"\n'), tmp_path / "results"
    capsys.readouterr()
    assert main(["fit", "--scenario", str(path)]) == 0  # a refused run is a row saying why, not an abort
    shown = capsys.readouterr()
    assert "refused: estimate: method 'sketch'" in shown.out.replace("\n", " ") and shown.err == ""
    assert main(["run", "--scenario", str(path), "--mode", "estimate", "--out", str(results)]) == 1
    assert f"run sketch failed: EstimateUnavailable: {message}" in capsys.readouterr().err
    assert main(["run", "--scenario", str(path), "--mode", "simulate", "--out", str(results)]) == 0
    simulated = records(results)[("sketch", "simulate")]
    assert simulated["status"] == "ok" and simulated["memory"]["peak_bytes"] > 0
    assert simulated["memory"]["estimate"] is None and simulated["memory"]["estimate_unavailable"] == message
    assert simulated["cross_check_errors"] == {}


def test_fit_searches_the_other_runs_when_one_is_refused(write_scenario, monkeypatch):
    """The refused run is a row with the estimate's message; the run after it gets its largest batch."""
    monkeypatch.setenv(PLUGIN_ENV, str(PLUGIN))
    scenario = load_scenario(str(write_scenario(TINY_HEADER + '[[runs]]\nmethod = "sketch"\n\n[[runs]]\n'
                                                'method = "adamw"\n')))
    refused, searched = fit_rows(scenario, 64 << 20, search="batch_size")
    assert refused == {"run": "sketch", "model": "tiny", "search": "batch_size",
                       "refused": ("estimate: method 'sketch' has no closed-form estimate terms (a sketch: its bytes "
                                   "are not written down yet); run it in simulate or measure mode")}
    assert searched["run"] == "adamw" and searched["largest"] == largest_batch(scenario, scenario.runs[1], 64 << 20)
    assert searched["largest"] > 0


def test_scenario_validation_knows_the_plugin_options_and_strategies(monkeypatch):
    monkeypatch.setenv(PLUGIN_ENV, str(PLUGIN))
    runs = [{"method": "heavyball", "momentum": -1.0, "nesterov": True}]
    with pytest.raises(UserError) as bad:
        parse_scenario({"model": {"size": "tiny"}, "runs": runs}, Path("plugin.toml"))
    assert "runs[0].momentum: got -1.0, allowed a number >= 0" in str(bad.value)
    assert ("runs[0].nesterov: got 'nesterov', allowed one of method, model, lr_grid, lr, weight_decay, label, "
            "precision, loss, momentum") in str(bad.value)
    sharded = {"model": {"size": "tiny"}, "runs": [{"method": "heavyball"}],
               "distributed": {"strategy": "fsdp2", "world_size": 2}}
    with pytest.raises(UserError, match="another strategy: a test plugin runs on one device"):
        parse_scenario({**sharded, "mode": "simulate"}, Path("plugin.toml"))


def test_the_registry_follows_the_variable_and_names_a_broken_plugin(monkeypatch, tmp_path):
    monkeypatch.setenv(PLUGIN_ENV, str(PLUGIN))
    assert list(REGISTRY)[-2:] == ["heavyball", "sketch"]  # after the shipped methods, in the file's order
    monkeypatch.setenv(PLUGIN_ENV, "")
    assert "heavyball" not in REGISTRY
    empty = tmp_path / "empty_plugin.py"
    empty.write_text("X = 1\n")
    monkeypatch.setenv(PLUGIN_ENV, str(empty))
    with pytest.raises(UserError, match="empty_plugin.py: defines no METHODS"):
        REGISTRY.get("adamw")
    monkeypatch.setenv(PLUGIN_ENV, "no_such_module_for_galore_bench")
    with pytest.raises(UserError, match="cannot import method plugin no_such_module_for_galore_bench"):
        list(REGISTRY)
    clash = tmp_path / "clash_plugin.py"
    clash.write_text("from galore_bench.methods import adamw\nMETHOD = adamw.METHOD.__class__(\n"
                     "    name='sgd', summary='a second sgd', build=adamw.build)\n")
    monkeypatch.setenv(PLUGIN_ENV, str(clash))
    with pytest.raises(UserError, match="method name 'sgd' is already registered"):
        list(REGISTRY)


def test_an_installed_package_adds_methods_through_its_entry_point(monkeypatch):
    point = EntryPoint(name="heavy", value="tests.plugin_method", group=methods.ENTRY_POINT_GROUP)
    monkeypatch.delenv(PLUGIN_ENV, raising=False)
    monkeypatch.setattr(methods.importlib.metadata, "entry_points",
                        lambda group: [point] if group == methods.ENTRY_POINT_GROUP else [])
    REGISTRY.reload()
    try:
        assert list(REGISTRY)[-2:] == ["heavyball", "sketch"]
        assert REGISTRY["heavyball"].estimate is not None
    finally:
        monkeypatch.undo()
        REGISTRY.reload()
    assert "heavyball" not in REGISTRY
