"""Every registered method trains the tiny model through the normal runner (smoke_cpu), loss falling."""
from __future__ import annotations

from galore_bench.methods import REGISTRY
from galore_bench.record import load_record
from galore_bench.runner import run_scenario
from galore_bench.scenario import load_scenario


def test_smoke_cpu_every_method_learns(tmp_path):
    scenario = load_scenario("smoke_cpu")
    assert {run.method for run in scenario.runs} == set(REGISTRY)
    paths = run_scenario(scenario, out=tmp_path)
    assert len(paths) == len(scenario.runs) == 11
    for path in paths:
        record = load_record(path)
        assert record["status"] == "ok", (record["run"], record["error"], record.get("traceback"))
        losses = record["quality"]["losses"]
        assert len(losses) == scenario.train.steps
        assert losses[-1] < losses[0], (record["run"], losses)
        memory = record["memory"]
        assert sum(memory["breakdown"].values()) == memory["peak_bytes"] > 0
