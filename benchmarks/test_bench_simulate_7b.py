"""7b_4090 on a CPU: every run traced on fake tensors in <= 60 s wall and <= 2 GiB host RSS per run.

Runs the real sweep (one process per run) and prints per run: wall seconds, host peak RSS, simulated
peak and whether it fits the 24 GiB budget. The 7B BF16 weights must be exactly 6,738,415,616 x 2 bytes.
"""
from __future__ import annotations

from galore_bench.run.sweep import run_scenario
from galore_bench.spec.scenario import load_scenario
from galore_bench.store import load as load_record
from galore_bench.units import format_bytes


def test_7b_4090_simulates_within_time_and_memory(tmp_path, benchmark):
    scenario = load_scenario("7b_4090")
    paths = benchmark.pedantic(run_scenario, args=(scenario,), kwargs={"out": tmp_path, "mode": "simulate"},
                               rounds=1, iterations=1)
    rows = []
    for path in paths:
        record = load_record(path)
        assert record["status"] == "ok", (record["run"], record["error"])
        assert record["memory"]["breakdown"]["weights"] == 6_738_415_616 * 2
        assert record["wall_seconds"] <= 60, (record["run"], record["wall_seconds"])
        assert record["host_peak_rss_bytes"] <= 2 * 2**30, (record["run"], record["host_peak_rss_bytes"])
        rows.append(f"{record['run']:<22} {record['wall_seconds']:6.1f} s"
                    f"  RSS {format_bytes(record['host_peak_rss_bytes'])}"
                    f"  peak {format_bytes(record['memory']['peak_bytes'])}  fits 24 GiB: {record['budget']['fits']}")
        benchmark.extra_info[record["run"]] = {"wall_s": record["wall_seconds"], "rss": record["host_peak_rss_bytes"],
                                               "peak": record["memory"]["peak_bytes"]}
    print("\n" + "\n".join(rows))
    fits = {load_record(p)["run"]: load_record(p)["budget"]["fits"] for p in paths}
    assert fits["adamw"] is False and fits["galore8bit-layerwise"] is True
