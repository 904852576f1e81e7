"""Every registered method trains the tiny model through the normal runner (smoke_cpu), loss falling."""
from __future__ import annotations

import math

from galore_bench.flops import hand_count
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
        quality, speed = record["quality"], record["throughput"]
        assert quality["data"] == "synthetic" and quality["eval"]["tokens"] == 2 * 4 * 63  # 2 held-out batches
        assert 1.0 < quality["perplexity"] < 1000.0  # vocab 512: an untrained model sits near 512
        assert quality["perplexity"] == math.exp(quality["eval"]["nll"])
        assert speed["flops"]["counted_per_step"] > 0 and speed["mfu"] is None  # no peak table entry for CPUs
        assert "CPU" in speed["flops"]["peak_source"] and speed["label"].startswith("CPU throughput")
        if record["method"]["name"] == "adamw" and not record["method"].get("layerwise"):
            by_hand = hand_count(scenario.model, scenario.train.batch_size, scenario.train.seq_len)
            assert speed["flops"]["counted_per_step"] == by_hand["flops_per_step"]
        if record["method"]["name"].startswith("galore"):  # update_proj_gap = 3: step 3 refreshes the projectors
            assert speed["svd_refresh_steps"] == [0, 3] and speed["svd_refresh_step_seconds_median"] > 0
