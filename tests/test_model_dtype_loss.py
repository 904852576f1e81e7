"""The LOMO paper's loss path (model_dtype_loss.py): its values against transformers' loss, its bytes traced
against hand-computed sizes, and the estimate against the traced step."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from transformers import LlamaConfig, LlamaForCausalLM

from galore_bench.errors import UserError
from galore_bench.measure import training
from galore_bench.measure.estimate import estimate_run
from galore_bench.measure.tracker import MemoryTracker
from galore_bench.methods.base import TrainSettings
from galore_bench.model_dtype_loss import model_dtype_cross_entropy
from galore_bench.spec.scenario import parse_scenario

MODEL = {"hidden_size": 64, "intermediate_size": 172, "num_hidden_layers": 2, "num_attention_heads": 4,
         "vocab_size": 32000}


def _scenario(train: dict, runs: list[dict]) -> object:
    return parse_scenario({"model": MODEL, "train": {"batch_size": 2, "seq_len": 256, **train}, "runs": runs},
                          Path("paper_loss.toml"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_same_loss_and_gradients_as_transformers_loss_on_the_same_logits(dtype):
    """transformers' own loss (labels given to the model) is the oracle: in fp32 the two are the same numbers;
    in bf16 ours stays in bf16 (no upcast), so it agrees to bf16's precision only."""
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=4, vocab_size=97)
    model = LlamaForCausalLM(config).to(dtype)
    ids = torch.randint(0, 97, (3, 11))
    ids[0, 4] = -100  # an ignored label
    inputs = ids.clamp(min=0)
    theirs = model(input_ids=inputs, labels=ids).loss
    theirs.backward()
    their_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    ours = model_dtype_cross_entropy(model(input_ids=inputs).logits, ids)
    ours.backward()
    assert ours.dtype == dtype  # no fp32 copy: the loss comes out in the logits' dtype
    rtol, atol = (1e-5, 1e-6) if dtype == torch.float32 else (2e-2, 2e-3)
    torch.testing.assert_close(ours.float(), theirs.float(), rtol=rtol, atol=atol)
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad.float(), their_grads[name].float(), rtol=rtol * 5, atol=atol * 5)


def test_traced_bytes_are_the_logits_their_shifted_copy_and_its_log_softmax():
    """Hand-computed: forward holds T x V (logits) + 2 x S x V (the copy, the log-softmax) model-dtype values at
    once, S = T - B; it keeps the log-softmax; backward adds nll's and log-softmax's gradients, S x V each."""
    batch, seq, vocab = 2, 128, 1000
    shifted = batch * (seq - 1)
    tracker = MemoryTracker(round_to=1)
    with FakeTensorMode(), tracker:
        logits = torch.randn(batch, seq, vocab, dtype=torch.bfloat16, requires_grad=True)
        labels = torch.randint(0, vocab, (batch, seq))
        resident = tracker.current
        loss = model_dtype_cross_entropy(logits, labels)
        forward_peak, kept = tracker.peak - resident, tracker.current - resident
        tracker.reset_peak()
        loss.backward()
        backward_peak = tracker.peak - resident
    small = 64  # the loss, nll's total weight, the shifted targets' int64 view: a few bytes to a few kB
    assert forward_peak - 2 * shifted * vocab * 2 == pytest.approx(0, abs=shifted * 8 + small)  # logits resident
    assert kept == pytest.approx(shifted * vocab * 2, abs=shifted * 8 + small)
    # the logits' own gradient (T x V) comes after nll's and log-softmax's are freed: 3 x S x V is the largest
    assert backward_peak == pytest.approx(3 * shifted * vocab * 2, abs=shifted * 8 + small)


RUNS = [{"method": "adamw"}, {"method": "lomo"}, {"method": "adam8bit", "layerwise": True}, {"method": "inference"}]


@pytest.mark.parametrize(("precision", "checkpointing"), [("fp32", False), ("bf16", True), ("fp16", False)])
def test_estimate_within_two_percent_of_simulate(precision, checkpointing):
    """A 32000-token vocabulary on a 64-wide model: the loss path is most of the step (measured: within 0.1%)."""
    scenario = _scenario({"precision": precision, "loss": "model-dtype", "activation_checkpointing": checkpointing},
                         RUNS)
    for run in scenario.runs:
        traced = training.train_steps(scenario, run, fake=True, device="cpu", steps=2)["tracker"]
        guess = estimate_run(scenario, run)
        assert guess.peak_bytes == pytest.approx(traced.peak, rel=0.02), run.label
        for category in ("activations", "gradients") + (("other",) if run.method != "inference" else ()):
            assert guess.category_peaks[category] == pytest.approx(traced.category_peaks[category], rel=0.02,
                                                                   abs=4096), (run.label, category)


def test_a_run_of_its_own_loss_path_beside_one_on_the_full_path():
    """The per-run `loss` option: the same step traced in both paths, the difference being the two fp32
    logits-sized tensors (the upcast copy and the fp32 log-softmax) that become model-dtype ones."""
    scenario = _scenario({"precision": "bf16", "activation_checkpointing": True},
                         [{"method": "sgd"}, {"method": "sgd", "loss": "model-dtype", "label": "sgd-paper-loss"}])
    peaks = {run.label: training.train_steps(scenario, run, fake=True, device="cpu", steps=2)["tracker"]
             .category_peaks["activations"] for run in scenario.runs}
    tokens, shifted, vocab = 512, 510, MODEL["vocab_size"]
    full = tokens * vocab * 2 + 2 * tokens * vocab * 4  # logits, their fp32 copy, the fp32 log-softmax
    paper = tokens * vocab * 2 + 2 * shifted * vocab * 2  # logits, their shifted copy, its log-softmax
    assert peaks["sgd"] - peaks["sgd-paper-loss"] == pytest.approx(full - paper, rel=0.002)


def test_simulate_matches_measure_per_category():
    """Real CPU steps and traced ones, per category within the suite's 4 KiB, on the paper's loss path."""
    scenario = parse_scenario({"model": {**MODEL, "vocab_size": 4096},
                               "train": {"batch_size": 2, "seq_len": 32, "dtype": "fp32", "loss": "model-dtype"},
                               "runs": [{"method": "lomo"}]}, Path("paper_loss.toml"))
    run = scenario.runs[0]
    real = training.train_steps(scenario, run, fake=False, device="cpu", steps=2, round_to=1)["tracker"].breakdown()
    fake = training.train_steps(scenario, run, fake=True, device="cpu", steps=2, round_to=1)["tracker"].breakdown()
    for category in real:
        assert abs(fake[category] - real[category]) <= 4096, (category, real, fake)


def test_refused_under_autocast_and_named_in_the_record_settings():
    with pytest.raises(UserError, match=r"train.loss.*'full' or 'chunked' with bf16-mixed"):
        _scenario({"precision": "bf16-mixed", "loss": "model-dtype"}, [{"method": "adamw"}])
    with pytest.raises(UserError, match=r"runs\[0\].loss.*one of"):
        _scenario({}, [{"method": "adamw", "loss": "fused"}])
    scenario = _scenario({}, [{"method": "adamw", "loss": "model-dtype"}])
    from galore_bench.methods.precision import run_settings
    assert run_settings(TrainSettings(), scenario.runs[0].options).loss == "model-dtype"
