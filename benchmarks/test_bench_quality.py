"""quality_cpu: quality per method on offline text read as bytes (the README's quality table). The full study
(about 15 minutes on 2 idle cores: `scripts/quality_cpu`) is not run here; CI times a short version (3 steps of
the AdamW run at its grid's first rate) that checks the wiring: byte-level text, the held-out test split, and
a perplexity that starts near a uniform guess over the 258 symbols."""
from __future__ import annotations

import dataclasses
import math

import pytest

from galore_bench.run import study
from galore_bench.run.worker import execute
from galore_bench.spec.scenario import load_scenario


def test_quality_cpu_short(benchmark):
    scenario = load_scenario("quality_cpu")
    scenario = dataclasses.replace(scenario, eval_batches=2, eval_every=0)
    run = scenario.runs[0]
    one_scenario, spec = study.one_training(scenario, run, study.grid_of(run)[0], 0, "grid")
    record = benchmark.pedantic(execute, args=(one_scenario, spec, "measure", 3), rounds=1, iterations=1)
    assert record["status"] == "ok", record["error"]
    quality = record["quality"]
    assert quality["eval"]["data"] == "wiki-offline bytes, test split"
    assert quality["data_provenance"]["tokenizer"]["vocab_size"] == 258
    assert quality["eval"]["tokens"] == 2 * scenario.train.batch_size * (scenario.train.seq_len - 1)
    # 3 steps from random weights: still near a uniform guess over the 258-symbol vocabulary (ln 258 = 5.55)
    assert len(quality["losses"]) == 3 and math.isfinite(quality["perplexity"])
    assert quality["perplexity"] == pytest.approx(math.exp(quality["eval"]["nll"]), rel=1e-6)
    assert abs(quality["eval"]["nll"] - math.log(258)) < 0.3
