"""Q-APOLLO-Mini: APOLLO-Mini's step on INT8 weights (optim/q_apollo.py, methods/q_apollo_mini.py)."""
from __future__ import annotations

import pytest
import torch

from galore_bench.measure.training import train_steps
from galore_bench.optim.apollo import Apollo
from galore_bench.optim.q_apollo import QApollo
from galore_bench.optim.qgalore import Int8Linear
from galore_bench.spec.scenario import load_scenario

from conftest import TINY_HEADER

SETTINGS = {"rank": 1, "update_proj_gap": 200, "scale": 128.0, "scale_type": "tensor", "scaled_gradient": "full",
            "seed": 3}


@pytest.mark.parametrize("scale_type", ["tensor", "channel"])
def test_one_step_is_apollos_step_on_the_dequantized_weight_then_stochastically_rounded(scale_type):
    """Independent check: our fp32 Apollo stepping the dequantized weight with the same gradient and seed; the
    INT8 result differs from it by less than one code step of each group (stochastic rounding moves a value to
    one of its two neighbouring codes)."""
    torch.manual_seed(0)
    layer = Int8Linear(torch.randn(64, 32), group_size=256)
    reference = torch.nn.Parameter(layer.dequantized(torch.float32).clone())
    grad = torch.randn(64, 32)
    settings = {**SETTINGS, "scale_type": scale_type}
    hyper = {"lr": 1e-2, "betas": (0.9, 0.999), "eps": 1e-6, "weight_decay": 0.1}
    QApollo([layer], settings, rounding_seed=5, **hyper).step_weight(layer, grad)
    reference.grad = grad
    Apollo([{"params": [reference], **settings}], **hyper).step()
    steps = layer.weight_scales.repeat_interleave(256).reshape(64, 32)  # each value's group scale (one code)
    moved = (layer.dequantized(torch.float32) - reference.detach()).abs()
    assert (moved < steps * 1.0001).all()
    assert layer.weight.dtype == torch.int8 and layer.weight_scales.dtype == torch.float32


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_simulate_equals_cpu_measure_and_int8_weights_count_one_byte(write_scenario, dtype):
    header = TINY_HEADER.replace('dtype = "fp32"', f'dtype = "{dtype}"')
    scenario = load_scenario(str(write_scenario(header + '[[runs]]\nmethod = "q_apollo_mini"\nlr = 1e-2\n'
                                                'update_proj_gap = 2\n')))
    run = scenario.runs[0]
    real = train_steps(scenario, run, fake=False, device="cpu", steps=3, round_to=1)
    fake = train_steps(scenario, run, fake=True, device="cpu", steps=3, round_to=1)
    assert fake["tracker"].peak == real["tracker"].peak
    assert fake["tracker"].category_peaks == real["tracker"].category_peaks
    assert fake["tracker"].breakdown() == real["tracker"].breakdown()
    assert real["losses"][-1] < real["losses"][0]
    model = real["model"]
    int8 = [m for m in model.modules() if isinstance(m, Int8Linear)]
    assert len(int8) == 7 * scenario.model.num_hidden_layers
    e = 4 if dtype == "fp32" else 2
    by_hand = sum(m.weight.numel() * (1 + 4 / 256) for m in int8)  # int8 codes + an fp32 scale per 256
    by_hand += sum(p.numel() * e for p in model.parameters() if p.requires_grad)
    assert real["tracker"].breakdown()["weights"] == by_hand
