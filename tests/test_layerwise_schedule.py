"""The warm-up / cosine schedule reaches updates made inside backward: layer-wise optimizers (one per parameter)
and the INT8-weight steppers of Q-GaLore and Q-APOLLO-Mini, so those methods can join a quality scenario."""
from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

import pytest
import tomllib
import torch

from galore_bench.measure import training
from galore_bench.measure.tracker import MemoryTracker
from galore_bench.methods import REGISTRY
from galore_bench.optim.group_schedule import GroupSchedule
from galore_bench.optim.relora import warmup_cosine_lr
from galore_bench.spec.scenario import parse_scenario

STEPS, WARMUP, LR = 4, 2, 1e-2
TRAIN = {"batch_size": 2, "seq_len": 16, "dtype": "fp32", "steps": STEPS, "warmup_steps": WARMUP}


def _trainer(run: dict[str, Any], schedule: str = "cosine", seed: int = 0):
    scenario = parse_scenario({"model": {"size": "tiny"}, "train": {**TRAIN, "lr_schedule": schedule, "seed": seed},
                               "runs": [run]}, Path("schedule-test.toml"))
    return training.build_trainer(scenario, scenario.runs[0], "cpu", MemoryTracker(), None)


def _train(trainer, steps: int = STEPS) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    for step in range(steps):
        batch = torch.randint(0, 512, (2, 16), generator=gen)
        trainer.backward(trainer.model(input_ids=batch, labels=batch, use_cache=False).loss)
        trainer.update(step)
    return {name: value.detach().clone() for name, value in trainer.model.state_dict().items()}


@pytest.mark.parametrize("run", [{"method": "adamw"}, {"method": "galore", "rank": 16, "update_proj_gap": 2},
                                 {"method": "galore8bit", "rank": 16, "update_proj_gap": 2}],
                         ids=["adamw", "galore", "galore8bit"])
def test_a_layerwise_run_follows_the_plain_runs_schedule(run):
    """Layer-wise updates each weight after its own gradient is complete, so with the same schedule it ends where
    the plain optimizer (torch's LambdaLR) ends; with the layer-wise groups left unscheduled it would not."""
    plain = _train(_trainer({**run, "lr": LR}))
    layerwise_trainer = _trainer({**run, "lr": LR, "layerwise": True})
    assert isinstance(layerwise_trainer.scheduler, GroupSchedule)
    layerwise = _train(layerwise_trainer)
    for name, value in plain.items():
        torch.testing.assert_close(layerwise[name], value, rtol=1e-5, atol=1e-6, msg=name)
    unscheduled = _train(_trainer({**run, "lr": LR, "layerwise": True}, schedule="constant"))
    assert any(not torch.allclose(unscheduled[name], value) for name, value in plain.items())


@pytest.mark.parametrize("method", ["qgalore", "q_apollo_mini"])
def test_a_schedule_moves_the_int8_weights_rate_too(method):
    """Half the rate by schedule == half the rate from the start, INT8 codes and scales included; the stepper of the
    INT8 weights is no layer-wise optimizer, so a schedule over those alone would leave its rate at the full one."""
    run = {"method": method, "update_proj_gap": 2, **({"rank": 16} if method == "qgalore" else {})}
    halved = _trainer({**run, "lr": LR}, schedule="constant")
    halved.scheduler = GroupSchedule(halved.lr_groups(), lambda step: 0.5)
    by_schedule = _train(halved, steps=3)
    from_start = _train(_trainer({**run, "lr": LR / 2}, schedule="constant"), steps=3)
    int8 = [name for name, value in from_start.items() if value.dtype == torch.int8]
    assert int8, "no INT8 weight in the model"
    for name, value in from_start.items():
        torch.testing.assert_close(by_schedule[name], value, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("method", ["qgalore", "q_apollo_mini"])
def test_the_engines_schedule_every_optimizer_of_an_int8_run(method):
    """Read independently of `lr_groups`: every per-parameter optimizer and the INT8 stepper end at lr x factor."""
    trainer = _trainer({"method": method, "lr": LR, **({"rank": 16} if method == "qgalore" else {})})
    _train(trainer, steps=3)
    expected = LR * warmup_cosine_lr(3, STEPS, WARMUP)
    inner = [group["lr"] for opt in trainer.optimizer.optimizers.values() for group in opt.param_groups]
    assert len(inner) == sum(p.requires_grad for p in trainer.model.parameters())
    for lr in [*inner, trainer.quantized.param_groups[0]["lr"]]:
        assert lr == pytest.approx(expected, rel=1e-12)


def test_every_smoke_run_accepts_and_gets_a_cosine_schedule():
    """Every method that trains, layer-wise or not, is scheduled under cosine: a torch LambdaLR, or a GroupSchedule
    over all the rates it updates with (LOMO and AdaLomo: their one group)."""
    raw = tomllib.loads(resources.files("galore_bench.scenarios").joinpath("smoke_cpu.toml").read_text())
    raw["train"] = {**raw["train"], "lr_schedule": "cosine", "warmup_steps": 1}
    scenario = parse_scenario(raw, Path("smoke_cpu_cosine.toml"))
    assert {run.method for run in scenario.runs} == set(REGISTRY)
    for run in scenario.runs:
        trainer = training.build_trainer(scenario, run, "cpu", MemoryTracker(), None)
        method = REGISTRY[run.method]
        if not method.trains:
            assert trainer.scheduler is None
        else:
            assert trainer.scheduler is not None, run.label
            assert all(group["lr"] == 0.0 for group in trainer.lr_groups()), run.label


def test_group_schedule_refuses_groups_without_a_rate():
    with pytest.raises(ValueError, match="'lr'"):
        GroupSchedule([{"params": []}], lambda step: 1.0)
    with pytest.raises(ValueError, match="'lr'"):
        GroupSchedule([], lambda step: 1.0)
