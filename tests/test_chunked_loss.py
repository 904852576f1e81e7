"""The chunked cross-entropy against transformers' own loss, and its memory in every engine."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode
from transformers import LlamaConfig, LlamaForCausalLM

from galore_bench.chunked_loss import chunked_cross_entropy, chunked_loss
from galore_bench.errors import UserError
from galore_bench.measure import training
from galore_bench.measure.estimate import estimate_run
from galore_bench.measure.loss_path import loss_path
from galore_bench.measure.tracker import MemoryTracker
from galore_bench.models import ModelShape
from galore_bench.spec.scenario import parse_scenario

TOLERANCE = {torch.float32: (1e-5, 1e-6), torch.bfloat16: (2e-2, 2e-3)}  # (rtol, atol) of torch.testing


def _model(dtype: torch.dtype, tied: bool) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=4, vocab_size=97, tie_word_embeddings=tied)
    return LlamaForCausalLM(config).to(dtype)


def _loss_and_grads(model: torch.nn.Module, ids: torch.Tensor, labels: torch.Tensor, chunk: int | None):
    model.zero_grad(set_to_none=True)
    if chunk is None:
        loss = model(input_ids=ids, labels=labels).loss
    else:
        with chunked_loss(model, chunk):
            loss = model(input_ids=ids, labels=labels).loss
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("chunk", [1, 7, 16, 1000])  # a single token, a non-divisor, a divisor, more than all
def test_same_loss_and_gradients_as_transformers(dtype, tied, chunk):
    """Shifted labels, -100 ignored, mean over counted tokens: the model's own loss and every gradient."""
    model = _model(dtype, tied)
    ids = torch.randint(0, 97, (3, 16))
    labels = ids.clone()
    labels[0, 5:9] = -100  # ignored positions, as padding would be
    labels[2, -1] = -100
    reference, expected = _loss_and_grads(model, ids, labels, None)
    ours, grads = _loss_and_grads(model, ids, labels, chunk)
    rtol, atol = TOLERANCE[dtype]
    torch.testing.assert_close(ours, reference.float(), rtol=rtol, atol=atol)
    for name, grad in expected.items():
        torch.testing.assert_close(grads[name].float(), grad.float(), rtol=rtol, atol=atol, msg=name)
    assert model(input_ids=ids).logits.shape == (3, 16, 97)  # the block left the model as it was


def test_direct_call_matches_torch_cross_entropy_with_aligned_labels_and_a_divisor():
    hidden = torch.randn(5, 8, requires_grad=True)
    weight = torch.randn(11, 8, requires_grad=True)
    targets = torch.tensor([3, -100, 0, 10, 4])
    ours = chunked_cross_entropy(hidden, weight, targets, chunk_tokens=2, shift=False, num_items_in_batch=7)
    reference = F.cross_entropy(hidden @ weight.t(), targets, ignore_index=-100, reduction="sum") / 7
    torch.testing.assert_close(ours, reference)
    torch.testing.assert_close(torch.autograd.grad(ours, (hidden, weight)),
                               torch.autograd.grad(reference, (hidden, weight)))
    with pytest.raises(ValueError, match="chunk_tokens"):
        chunked_cross_entropy(hidden, weight, targets, chunk_tokens=0)


def test_no_tensor_as_large_as_all_logits_exists_in_forward_or_backward():
    """Traced on fake tensors: the largest storage of forward + backward is one chunk's fp32 logits (hand count:
    64 tokens x 5000 x 4 bytes), never the 2048 tokens' (40 MB)."""
    tokens, vocab, width, chunk = 2048, 5000, 16, 64
    with FakeTensorMode():
        hidden = torch.randn(tokens, width, dtype=torch.bfloat16, requires_grad=True)
        weight = torch.randn(vocab, width, dtype=torch.bfloat16, requires_grad=True)
        labels = torch.randint(0, vocab, (tokens,))
        tracker = MemoryTracker(record_events=True)
        with tracker:
            chunked_cross_entropy(hidden, weight, labels, chunk_tokens=chunk).backward()
    largest = max(size for _, size in tracker.events or [])
    assert largest == max(chunk * vocab * 4, vocab * width * 2)  # the weight's gradient (160 kB) is smaller here
    assert largest == chunk * vocab * 4


def _scenario(loss: str, dtype: str, runs: list[dict], **train) -> object:
    model = {"hidden_size": 64, "intermediate_size": 172, "num_hidden_layers": 2, "num_attention_heads": 4,
             "vocab_size": 32000}
    return parse_scenario({"model": model, "train": {"batch_size": 2, "seq_len": 256, "dtype": dtype, "loss": loss,
                                                    "loss_chunk_tokens": 100, **train}, "runs": runs},
                          Path("chunked.toml"))


RUNS = [{"method": "adamw"}, {"method": "lomo"}, {"method": "adam8bit", "layerwise": True}, {"method": "inference"}]


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_estimate_within_two_percent_of_simulate_on_the_loss_path(dtype):
    """A vocabulary of 32000 on a 64-wide model: the loss path is most of the step (measured: within 0.1%)."""
    scenario = _scenario("chunked", dtype, RUNS)
    for run in scenario.runs:
        traced = training.train_steps(scenario, run, fake=True, device="cpu", steps=2)["tracker"]
        guess = estimate_run(scenario, run)
        assert guess.peak_bytes == pytest.approx(traced.peak, rel=0.02), run.label
        # the inference estimate leaves 'other' (5 KiB of buffers) unmodelled, as it did before the chunked loss
        for category in ("activations", "gradients") + (("other",) if run.method != "inference" else ()):
            assert guess.category_peaks[category] == pytest.approx(traced.category_peaks[category], rel=0.02,
                                                                   abs=4096), (run.label, category)


def test_chunked_loss_cuts_the_traced_peak_as_the_estimate_says():
    """Same step, both paths, traced: the difference is the loss path's, and the closed form predicts it."""
    peaks = {}
    for loss in ("full", "chunked"):
        scenario = _scenario(loss, "bf16", [{"method": "lomo"}])
        peaks[loss] = training.train_steps(scenario, scenario.runs[0], fake=True, device="cpu", steps=2)["tracker"].peak
    shape = ModelShape(64, 172, 2, 4, 32000)
    full, chunked = loss_path(shape, 512, 2, "full"), loss_path(shape, 512, 2, "chunked", 100)
    predicted = (full.backward_activations + full.backward_other) - (chunked.backward_activations
                                                                   + chunked.backward_other)
    assert peaks["full"] - peaks["chunked"] == pytest.approx(predicted, rel=0.01)
    assert peaks["chunked"] < peaks["full"] / 5


@pytest.mark.parametrize("run", [{"method": "adamw", "impl": "for-loop"}, {"method": "lomo"},
                                 {"method": "galore", "rank": 8, "layerwise": True}])
def test_simulate_matches_measure_per_category_with_the_chunked_loss(run):
    """Real CPU steps and traced ones, byte for byte per category (the suite's 4 KiB), chunked loss on."""
    model = {"hidden_size": 64, "intermediate_size": 172, "num_hidden_layers": 2, "num_attention_heads": 4,
             "vocab_size": 4096}
    scenario = parse_scenario({"model": model, "train": {"batch_size": 2, "seq_len": 32, "dtype": "fp32",
                                                         "loss": "chunked", "loss_chunk_tokens": 24},
                               "runs": [run]}, Path("chunked.toml"))
    run = scenario.runs[0]
    real = training.train_steps(scenario, run, fake=False, device="cpu", steps=2, round_to=1)["tracker"].breakdown()
    fake = training.train_steps(scenario, run, fake=True, device="cpu", steps=2, round_to=1)["tracker"].breakdown()
    for category in real:
        assert abs(fake[category] - real[category]) <= 4096, (category, real, fake)


def test_scenario_refuses_an_unknown_loss_and_chunking_with_distributed():
    with pytest.raises(UserError, match=r"train.loss.*one of full, chunked"):
        _scenario("fused", "bf16", RUNS)
    with pytest.raises(UserError, match="loss_chunk_tokens"):
        _scenario("chunked", "bf16", RUNS, loss_chunk_tokens=0)
    raw = {"model": {"size": "tiny"}, "train": {"loss": "chunked"}, "runs": [{"method": "adamw"}],
           "distributed": {"strategy": "ddp", "world_size": 2}}
    with pytest.raises(UserError, match=r"train.loss.*'full' with \[distributed\]"):
        parse_scenario(raw, Path("chunked.toml"))


@pytest.mark.parametrize("chunk", [None, 100, 512])
def test_the_loss_path_alone_traced_is_the_estimates_backward_moment(chunk):
    """The report's first view (report/loss_path.py): the loss on resident inputs, traced, against the closed
    form's loss-backward bytes (full: the fp32 log-softmax and its two gradients; chunked: both gradients of
    the loss's inputs, one chunk, the bookkeeping)."""
    from galore_bench.report.loss_path import traced_loss_path

    shape = ModelShape(64, 172, 2, 4, 32000)
    traced = traced_loss_path(shape, 512, "bf16", chunk)
    terms = loss_path(shape, 512, 2, "full" if chunk is None else "chunked", chunk or 1)
    assert traced == pytest.approx(terms.backward_activations + terms.backward_other, rel=0.01)
