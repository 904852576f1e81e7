"""Training precisions (methods/precision.py): simulate against a real CPU step, estimate against simulate,
hand-counted bytes for the master copy and autocast's weight-cast cache, and the refusals."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_estimate import estimate_vs_simulate_failures

from galore_bench.errors import UserError
from galore_bench.measure import training
from galore_bench.measure.estimate import estimate_run
from galore_bench.measure.tracker import MemoryTracker
from galore_bench.methods.base import PRECISION_NAMES
from galore_bench.methods.precision import PRECISIONS, precision_of
from galore_bench.models import ZOO, matrix_shapes, parameter_count
from galore_bench.optim.master import TraceableGradScaler
from galore_bench.spec.scenario import parse_scenario
from galore_bench.units import CUDA_BLOCK

RECIPES = ("bf16-mixed", "fp16-mixed", "bf16-master")
METHODS = {"adamw": {"method": "adamw", "impl": "for-loop"}, "sgd": {"method": "sgd"},
           "lora": {"method": "lora", "rank": 8, "impl": "for-loop"}, "galore": {"method": "galore", "rank": 8}}


def _scenario(size: str, train: dict, runs: list[dict]):
    return parse_scenario({"model": {"size": size}, "train": train, "runs": runs}, Path("precision-test.toml"))


def test_every_precision_is_offered_as_a_run_option():
    assert PRECISION_NAMES == ("", *PRECISIONS)


@pytest.mark.parametrize("size", ["tiny", pytest.param("60m", marks=pytest.mark.slow)])
@pytest.mark.parametrize("precision", RECIPES)
@pytest.mark.parametrize("method", METHODS)
def test_simulate_matches_a_real_cpu_step_per_category(precision, method, size):
    """Fake-tensor steps predict real CPU steps byte for byte: autocast's casts, the scaler, the master copy."""
    scenario = _scenario(size, {"batch_size": 2, "seq_len": 32, "precision": precision}, [METHODS[method]])
    run = scenario.runs[0]
    real = training.train_steps(scenario, run, fake=False, device="cpu", steps=2, round_to=1)
    fake = training.train_steps(scenario, run, fake=True, device="cpu", steps=2, round_to=1)
    real_bytes, fake_bytes = real["tracker"].breakdown(), fake["tracker"].breakdown()
    for category in real_bytes:
        assert abs(fake_bytes[category] - real_bytes[category]) <= 4096, (category, real_bytes, fake_bytes)
    assert real["losses"][1] < real["losses"][0] + 0.05  # a real update happened, in the run's precision


def _estimate_failures(size: str, train: dict, only: tuple[str, ...] = ()) -> list[str]:
    """Every method the precision allows (layer-wise and LOMO where it can), estimate vs simulate, 2%."""
    chosen = PRECISIONS[train["precision"]]
    runs = [{"method": m, "rank": 16} if m in ("lora", "relora", "galore", "galore8bit", "lowrank") else {"method": m}
            for m in ("adamw", "sgd", "adafactor", "adam8bit", "galore", "galore8bit", "lora", "lowrank")]
    runs.append({"method": "adamw", "impl": "for-loop", "label": "adamw-for-loop"})
    if not chosen.master:
        runs += [{"method": "relora", "rank": 16}, {"method": "inference"}]
    if not chosen.master and not chosen.scaler:
        runs += [{"method": "lomo"}, {"method": "adamw", "layerwise": True},
                 {"method": "galore", "rank": 16, "layerwise": True}]
    scenario = _scenario(size, train, [run for run in runs if not only or run["method"] in only])
    return estimate_vs_simulate_failures(scenario, tolerance=0.02)


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointing"])
@pytest.mark.parametrize("precision", RECIPES)
def test_estimate_within_two_percent_of_simulate_on_tiny(precision, checkpointing):
    """Three methods (the fast twin of the every-method test below)."""
    train = {"batch_size": 8, "seq_len": 128, "precision": precision, "activation_checkpointing": checkpointing}
    assert not _estimate_failures("tiny", train, only=("adamw", "sgd", "lora"))


@pytest.mark.slow
@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointing"])
@pytest.mark.parametrize("precision", RECIPES)
def test_estimate_within_two_percent_of_simulate_on_tiny_for_every_method(precision, checkpointing):
    train = {"batch_size": 8, "seq_len": 128, "precision": precision, "activation_checkpointing": checkpointing}
    assert not _estimate_failures("tiny", train)


@pytest.mark.slow
@pytest.mark.parametrize("precision", RECIPES)
def test_estimate_within_two_percent_of_simulate_on_60m(precision):
    assert not _estimate_failures("60m", {"batch_size": 2, "seq_len": 128, "precision": precision})


@pytest.mark.slow
@pytest.mark.parametrize("precision", RECIPES)
def test_estimate_within_two_percent_of_simulate_at_7b(precision):
    """LOMO Table 1's setting (checkpointing on), the methods it compares."""
    runs = [{"method": "adamw"}, {"method": "sgd"}] + ([] if PRECISIONS[precision].master else [{"method": "lomo"}])
    runs = [r for r in runs if not (PRECISIONS[precision].scaler and r["method"] == "lomo")]
    scenario = _scenario("7b", {"batch_size": 8, "seq_len": 512, "precision": precision,
                                "activation_checkpointing": True}, runs)
    for run in scenario.runs:
        traced = training.train_steps(scenario, run, fake=True, device="cpu", steps=2)["tracker"]
        guess = estimate_run(scenario, run)
        assert guess.peak_bytes == pytest.approx(traced.peak, rel=0.02), run.label
        for category in ("weights", "gradients", "optimizer_states", "activations"):
            assert guess.category_peaks[category] == pytest.approx(traced.category_peaks[category], rel=0.02)


def test_master_copy_and_fp32_moments_by_hand():
    """bf16-master AdamW at 60M: 2-byte weights and gradients; states = 4 (master) + 4 + 4 (moments) per
    parameter, each tensor in 512-byte blocks, plus one fp32 step count per tensor."""
    scenario = _scenario("60m", {"batch_size": 1, "seq_len": 16, "precision": "bf16-master"},
                         [{"method": "adamw", "impl": "for-loop"}])
    traced = training.train_steps(scenario, scenario.runs[0], fake=True, device="cpu", steps=2)["tracker"]
    trainer_tensors = _parameter_sizes(ZOO["60m"])
    blocks = lambda n: -(-n // CUDA_BLOCK) * CUDA_BLOCK
    assert sum(trainer_tensors) == parameter_count(ZOO["60m"])
    assert traced.category_peaks["weights"] == sum(blocks(n * 2) for n in trainer_tensors)
    assert traced.category_peaks["gradients"] == sum(blocks(n * 2) for n in trainer_tensors)
    assert traced.category_peaks["optimizer_states"] == sum(3 * blocks(n * 4) + blocks(4) for n in trainer_tensors)


def _parameter_sizes(shape) -> list[int]:
    h, v = shape.hidden_size, shape.vocab_size
    per_layer = [h, h, *(rows * cols for rows, cols in matrix_shapes(shape).values())]
    return [v * h, h, v * h] + per_layer * shape.num_hidden_layers


def test_autocast_cache_holds_every_weight_cast_until_the_forward_ends():
    """With checkpointing nothing of a layer is saved but its input; autocast's cache still holds each trainable
    weight's bf16 cast until the autocast context exits: the bytes freed at that exit are those casts exactly."""
    scenario = _scenario("tiny", {"batch_size": 2, "seq_len": 16, "precision": "bf16-mixed",
                                  "activation_checkpointing": True}, [{"method": "sgd"}])
    tracker = MemoryTracker()
    trainer = training.build_trainer(scenario, scenario.runs[0], "cpu", tracker, None)
    batch = torch.randint(0, 512, (2, 16))
    with tracker, tracker.phase("forward"):
        with trainer.forward_context():
            loss = trainer.model(input_ids=batch, labels=batch, use_cache=False).loss
            inside = tracker.totals["activations"]
        after = tracker.totals["activations"]
    del loss
    shape = ZOO["tiny"]
    casts = shape.num_hidden_layers * sum(rows * cols * 2 for rows, cols in matrix_shapes(shape).values())
    assert inside - after == casts


def test_grad_scaler_skips_the_step_on_overflow_and_steps_under_fake_tensors():
    weight = torch.nn.Parameter(torch.ones(4))
    optimizer = torch.optim.SGD([weight], lr=1.0)
    scaler = TraceableGradScaler("cpu", init_scale=8.0)
    scaler.scale(weight.sum() * float("inf")).backward()
    scaler.step(optimizer)
    scaler.update()
    assert torch.equal(weight.detach(), torch.ones(4)) and scaler.get_scale() == 4.0  # skipped, scale backed off
    optimizer.zero_grad()
    scaler.scale(weight.sum()).backward()
    scaler.step(optimizer)
    assert torch.equal(weight.detach(), torch.zeros(4))  # unscaled gradient 1, lr 1


@pytest.mark.parametrize(("train", "run", "message"), [
    ({"dtype": "bf16", "precision": "bf16-mixed"}, {"method": "sgd"}, "'fp32' with precision 'bf16-mixed'"),
    ({"precision": "fp16-mixed"}, {"method": "lomo"}, "other than fp16-mixed with lomo"),
    ({"precision": "fp16-mixed"}, {"method": "adamw", "layerwise": True}, "other than fp16-mixed with layer-wise"),
    ({"precision": "bf16-master"}, {"method": "adamw", "layerwise": True}, "other than bf16-master with layer-wise"),
    ({}, {"method": "lomo", "precision": "bf16-master"}, "runs[0] (lomo) precision: got 'bf16-master'"),
    ({"precision": "fp8"}, {"method": "sgd"}, "train.precision: got 'fp8'"),
])
def test_contradictions_and_impossible_combinations_are_refused(train, run, message):
    with pytest.raises(UserError) as caught:
        _scenario("tiny", train, [run])
    assert message in str(caught.value)


def test_precision_sets_the_weights_dtype_and_a_run_may_override_it():
    scenario = _scenario("tiny", {"precision": "bf16-mixed"},
                         [{"method": "sgd"}, {"method": "sgd", "precision": "bf16-master", "label": "master"}])
    assert scenario.train.dtype == "fp32"
    assert precision_of(scenario.train, scenario.runs[1].options).name == "bf16-master"
    plain = _scenario("tiny", {"dtype": "fp16"}, [{"method": "sgd"}])
    assert precision_of(plain.train, plain.runs[0].options).name == "fp16"  # no precision: pure in dtype


def test_lomo_in_fp16_with_dynamic_loss_scaling_as_the_paper_runs_it():
    """fp16 weights, the loss scaled from 2^16, a gradient-norm pass (the overflow check) before the updating
    pass: the trace takes the no-overflow branch and equals the real step's bytes; the real run learns."""
    scenario = _scenario("tiny", {"batch_size": 2, "seq_len": 32, "precision": "fp16", "steps": 3},
                         [{"method": "lomo", "dynamic_loss_scale": True, "lr": 0.01}])
    run = scenario.runs[0]
    real = training.train_steps(scenario, run, fake=False, device="cpu", steps=3, round_to=1)
    fake = training.train_steps(scenario, run, fake=True, device="cpu", steps=3, round_to=1)
    assert real["trainer_info"]["backward_passes"] == 2 and real["trainer_info"]["loss_scale"] == "dynamic"
    lomo = real["trainer"].optimizer
    assert lomo.clip_grad_norm == 1.0 and lomo.loss_scale.scale == 2.0**16 and lomo.skipped_steps == 0
    assert real["losses"][-1] < real["losses"][0]
    real_bytes, fake_bytes = real["tracker"].breakdown(), fake["tracker"].breakdown()
    assert all(abs(fake_bytes[c] - real_bytes[c]) <= 4096 for c in real_bytes), (real_bytes, fake_bytes)
    assert next(real["model"].parameters()).dtype == torch.float16


@pytest.mark.parametrize("adapter_dtype", ["fp32", "model"])
def test_lora_adapters_default_to_fp32_as_peft_keeps_them(adapter_dtype):
    """peft's autocast_adapter_dtype keeps a bf16 model's adapters in fp32 (its input cast to fp32 for them);
    'model' keeps the papers' BF16 adapters. Real CPU step == trace per category; estimate within 2%."""
    run = {"method": "lora", "rank": 8, "impl": "for-loop", **({"adapter_dtype": "model"}
                                                                if adapter_dtype == "model" else {})}
    scenario = _scenario("tiny", {"batch_size": 4, "seq_len": 64, "dtype": "bf16"}, [run])
    spec = scenario.runs[0]
    real = training.train_steps(scenario, spec, fake=False, device="cpu", steps=2, round_to=1)
    fake = training.train_steps(scenario, spec, fake=True, device="cpu", steps=2, round_to=1)
    dtypes = {p.dtype for name, p in real["model"].named_parameters() if "lora_" in name}
    assert dtypes == {torch.float32 if adapter_dtype == "fp32" else torch.bfloat16}
    real_bytes, fake_bytes = real["tracker"].breakdown(), fake["tracker"].breakdown()
    assert all(abs(fake_bytes[c] - real_bytes[c]) <= 4096 for c in real_bytes), (real_bytes, fake_bytes)
    traced = training.train_steps(scenario, spec, fake=True, device="cpu", steps=2)["tracker"]
    guess = estimate_run(scenario, spec)
    assert guess.peak_bytes == pytest.approx(traced.peak, rel=0.02)
    for category in ("weights", "gradients", "optimizer_states", "activations"):
        assert guess.category_peaks[category] == pytest.approx(traced.category_peaks[category], rel=0.02), category
