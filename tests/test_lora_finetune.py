"""The lora method's `train_non_adapter = false` (peft's fine-tuning: only the adapters train): what trains,
the estimate's gradients and states by hand, and the estimate against the traced step."""
from __future__ import annotations

from pathlib import Path

import pytest
from test_estimate import SETTINGS, estimate_vs_simulate_failures

from galore_bench.measure import training
from galore_bench.measure.estimate import estimate_run
from galore_bench.models import ZOO, matrix_shapes
from galore_bench.spec.scenario import parse_scenario

FINE_TUNE = [{"method": "lora", "rank": 16, "train_non_adapter": False, "label": "lora-adapters-only"},
             {"method": "lora", "rank": 16, "use_dora": True, "adapter_dtype": "model", "train_non_adapter": False,
              "label": "dora-model-dtype-adapters-only"}]
DORA_FP32 = {"method": "lora", "rank": 16, "use_dora": True, "train_non_adapter": False, "label": "dora-adapters-only"}


def _scenario(setting: str, runs: list[dict]):
    size, train = SETTINGS[setting]
    return parse_scenario({"model": {"size": size}, "train": train, "runs": runs}, Path("lora-finetune.toml"))


def test_only_the_adapters_train_and_the_default_keeps_embeddings_norms_head_training():
    scenario = _scenario("tiny-fp32", [FINE_TUNE[0], {"method": "lora", "rank": 16}])
    only, everything = (
        {n for n, p in training.train_steps(scenario, run, fake=True, device="cpu", steps=1)["model"]
         .named_parameters() if p.requires_grad} for run in scenario.runs)
    assert only and all(".lora_A." in n or ".lora_B." in n for n in only)
    assert len(only) == 2 * 7 * 2  # A and B on every projection of the tiny model's two layers
    assert {n for n in everything - only} >= {"base_model.model.model.embed_tokens.weight",
                                              "base_model.model.lm_head.weight", "base_model.model.model.norm.weight"}


def test_gradients_and_states_are_the_adapters_alone_by_hand():
    """fp32 model: A (r x cols) and B (rows x r) per projection, 4 bytes each; AdamW keeps two moments and a
    `step` each (512-byte blocks); nothing for the frozen embeddings, norms and head."""
    scenario = _scenario("tiny-fp32", FINE_TUNE[:1])
    guess = estimate_run(scenario, scenario.runs[0])
    shape, r = ZOO["tiny"], 16

    def block(n: int) -> int:
        return -(-n // 512) * 512

    adapters = [block(4 * r * cols) for _, cols in matrix_shapes(shape).values()]
    adapters += [block(4 * rows * r) for rows, _ in matrix_shapes(shape).values()]
    adapters *= shape.num_hidden_layers
    assert guess.terms["gradients_all"] == sum(adapters)
    assert guess.terms["optimizer_states"] == 2 * sum(adapters) + 512 * len(adapters)


@pytest.mark.parametrize("setting", SETTINGS)
def test_estimate_within_two_percent_of_simulate(setting):
    runs = FINE_TUNE + ([DORA_FP32] if setting != "tiny-bf16-checkpointing" else [])  # that one: the DoRA xfail
    failures = estimate_vs_simulate_failures(_scenario(setting, runs))
    assert not failures, "\n".join(failures)


@pytest.mark.slow  # ~1 min: seven runs of Llama-3.1-8B traced on fake tensors; the settings above are its fast twin
def test_finetune_8b_24gb_estimate_within_two_percent_of_simulate():
    """The shipped scenario's every run (measured: peaks within 0.2%, DoRA with fp32 adapters +0.08%)."""
    from galore_bench.spec.scenario import load_scenario

    failures = estimate_vs_simulate_failures(load_scenario("finetune_8b_24gb"))
    assert not failures, "\n".join(failures)
