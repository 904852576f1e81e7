"""Every registered method trains the tiny model through the normal runner (smoke_cpu), loss falling."""
from __future__ import annotations

import math

import pytest
import torch

from galore_bench.measure.flops import hand_count
from galore_bench.methods import REGISTRY
from galore_bench.run.sweep import run_scenario
from galore_bench.spec.scenario import load_scenario
from galore_bench.store import load as load_record


def test_smoke_cpu_every_method_learns(tmp_path):
    scenario = load_scenario("smoke_cpu")
    assert {run.method for run in scenario.runs} == set(REGISTRY)
    paths = run_scenario(scenario, out=tmp_path)
    assert len(paths) == len(scenario.runs) == 31
    peaks = {}
    for path in paths:
        record = load_record(path)
        assert record["status"] == "ok", (record["run"], record["error"], record.get("traceback"))
        losses = record["quality"]["losses"]
        assert len(losses) == scenario.train.steps
        peaks[record["run"]] = record["memory"]["peak_bytes"]
        if record["method"]["name"] == "inference":  # the forward alone: nothing to learn, nothing stored for it
            by_hand = hand_count(scenario.model, scenario.train.batch_size, scenario.train.seq_len)
            flops = record["throughput"]["flops"]
            assert flops["counted_per_step"] == by_hand["forward"]
            assert flops["model_flops_per_token"] * 3 == by_hand["model_flops_per_token"]
            assert record["memory"]["category_peaks"]["gradients"] == 0
            assert record["memory"]["category_peaks"]["optimizer_states"] == 0
            continue
        assert losses[-1] < losses[0], (record["run"], losses)
        memory = record["memory"]
        assert sum(memory["breakdown"].values()) == memory["peak_bytes"] > 0
        quality, speed = record["quality"], record["throughput"]
        assert quality["data"] == "synthetic" and quality["eval"]["tokens"] == 2 * 4 * 63  # 2 held-out batches
        assert 1.0 < quality["perplexity"] < 1000.0  # vocab 512: an untrained model sits near 512
        assert speed["flops"]["counted_per_step"] > 0 and speed["mfu"] is None  # no peak table entry for CPUs
        assert "CPU" in speed["flops"]["peak_source"] and speed["label"].startswith("CPU throughput")
        if record["method"]["name"] == "adamw" and not record["method"].get("layerwise"):
            by_hand = hand_count(scenario.model, scenario.train.batch_size, scenario.train.seq_len)
            assert speed["flops"]["counted_per_step"] == by_hand["flops_per_step"]
        if record["run"] == "lomo-clip":  # two backward passes per step, the second one updating
            assert record["method"]["implementation"]["backward_passes"] == 2
        if record["method"]["name"] in ("galore", "galore8bit", "fira"):  # update_proj_gap = 3: step 3 refreshes
            assert speed["svd_refresh_steps"] == [3] and speed["svd_refresh_step_seconds_median"] > 0
            # neither warm-up step 0, nor step 1 (run under the tracker, for memory), nor the refresh
            assert speed["timed_steps"] == scenario.train.steps - 3
    assert peaks["inference"] < min(peak for run, peak in peaks.items() if run != "inference")


@pytest.mark.parametrize("data", ["synthetic", "wiki"])
def test_validation_perplexity_is_held_out_and_computed_independently(write_scenario, data):
    """The run's evaluator: batches disjoint from the training ones, perplexity = exp(mean NLL) by hand."""
    import torch.nn.functional as F

    from galore_bench.measure.training import training_batches
    from galore_bench.models import build_model
    from galore_bench.run.worker import _evaluator

    from conftest import TINY_HEADER

    vocab = "" if data == "synthetic" else "vocab_size = 32000\n"
    body = TINY_HEADER.replace('size = "tiny"', 'hidden_size = 32\nintermediate_size = 64\nnum_hidden_layers = 1\n'
                               'num_attention_heads = 2\n' + vocab) if data == "wiki" else TINY_HEADER
    body += f'[eval]\ndata = "{data}"\nbatches = 2\n[[runs]]\nmethod = "sgd"\n'
    scenario = load_scenario(str(write_scenario(body)))
    run = scenario.runs[0]
    held_out = [b for _, b in zip(range(2), training_batches(scenario, run.model.vocab_size, split="validation"))]
    training = [b for _, b in zip(range(50), training_batches(scenario, run.model.vocab_size))]
    train_rows = {tuple(row.tolist()) for batch in training for row in batch}
    assert not any(tuple(row.tolist()) in train_rows for batch in held_out for row in batch)
    model = build_model(run.model, "fp32", seed=3)
    result = _evaluator(scenario, run, "cpu")(model)
    with torch.no_grad():
        nll = [F.cross_entropy(model(input_ids=b, use_cache=False).logits[:, :-1].flatten(0, 1), b[:, 1:].flatten(),
                               reduction="none") for b in held_out]
    by_hand = math.exp(torch.cat(nll).double().mean().item())
    assert result["tokens"] == sum(b[:, 1:].numel() for b in held_out)
    assert result["perplexity"] == pytest.approx(by_hand, rel=1e-5)
