"""ppl_cpu: quality per method on real offline text. The full run (about 10 minutes on 2 idle cores) is marked slow;
CI runs a short version (3 steps of the full-rank run) that checks the wiring: real text, held-out perplexity."""
from __future__ import annotations

import dataclasses
import math

import pytest

from galore_bench.run.sweep import run_scenario
from galore_bench.run.worker import execute
from galore_bench.spec.scenario import load_scenario
from galore_bench.store import load as load_record


def test_ppl_cpu_short(benchmark):
    scenario = load_scenario("ppl_cpu")
    scenario = dataclasses.replace(scenario, eval_batches=2, eval_every=0)
    record = benchmark.pedantic(execute, args=(scenario, scenario.runs[0], "measure", 3), rounds=1, iterations=1)
    assert record["status"] == "ok", record["error"]
    quality = record["quality"]
    assert quality["data"] == "wiki" and quality["eval"]["data"].startswith("wiki-offline validation")
    provenance = quality["data_provenance"]
    assert provenance["text"]["version"] == "0.0.7" and len(provenance["tokenizer"]["sha256"]) == 64
    assert quality["eval"]["tokens"] == 2 * 8 * 63
    # 3 steps from random weights: perplexity is exp(held-out mean NLL), still near a uniform guess over the
    # 32000-token vocabulary (ln 32000 = 10.37)
    assert len(quality["losses"]) == 3 and math.isfinite(quality["perplexity"])
    assert quality["perplexity"] == pytest.approx(math.exp(quality["eval"]["nll"]), rel=1e-6)
    assert abs(quality["eval"]["nll"] - math.log(32000)) < 0.3


@pytest.mark.slow
def test_ppl_cpu_ordering(tmp_path, benchmark):
    """The orderings this machine showed (reports/cpu-measure): LoRA/ReLoRA behind full rank, low-rank last."""
    paths = benchmark.pedantic(run_scenario, args=(load_scenario("ppl_cpu"),), kwargs={"out": tmp_path},
                               rounds=1, iterations=1)
    ppl = {load_record(p)["run"]: load_record(p)["quality"]["perplexity"] for p in paths}
    benchmark.extra_info.update(ppl)
    print("\n" + "\n".join(f"{run:<14} {value:8.1f}" for run, value in sorted(ppl.items(), key=lambda kv: kv[1])))
    assert ppl["adamw"] < min(ppl["lora"], ppl["relora"]) < ppl["lowrank"]
    assert ppl["galore"] < ppl["lowrank"]
