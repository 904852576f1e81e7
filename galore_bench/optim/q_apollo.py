"""Q-APOLLO (arXiv 2412.05270, Sec. 5: APOLLO-Mini with INT8 weights, the "Q-APOLLO-Mini" 7B recipe): APOLLO's
scaled-gradient step applied to Int8Linear weights inside backward.

The weight format and its re-quantization are Q-GaLore's (optim/qgalore.py, optim/quantize.py): int8 codes with
one fp32 scale per group, re-quantized with stochastic rounding after each update, so that updates smaller than a
code step survive on average. The update itself is optim/apollo.py's, unchanged: the gradient projected by a
seeded random matrix, Adam moments of that projection, the per-tensor (or per-channel) scale, the norm-growth
limiter; it is applied to the dequantized fp32 weight, which is then stored as new codes and scales.
"""
from __future__ import annotations

from typing import Any

import torch

from galore_bench.optim.apollo import Apollo
from galore_bench.optim.qgalore import Int8Linear, SeededRounding

__all__ = ["QApollo"]


class QApollo(SeededRounding, Apollo):
    """APOLLO over INT8 weights: one group of Int8Linear codes with 'rank', 'update_proj_gap', 'scale',
    'scale_type', 'seed' (and 'scaled_gradient'); `step_weight` is called from each weight's backward.

    Each weight's projection seed is the group's seed plus its index, as APOLLO's groups get theirs.
    """

    def __init__(self, modules: list[Int8Linear], settings: dict[str, Any], rounding_seed: int = 0,
                 **hyper: Any) -> None:
        super().__init__([{"params": [m.weight for m in modules], **settings}], **hyper)
        self._seeds = {id(m.weight): settings.get("seed", 0) + i for i, m in enumerate(modules)}
        self._rounding_seed = rounding_seed
        for module in modules:
            module.optimizer = self

    @torch.no_grad()
    def step_weight(self, module: Int8Linear, grad: torch.Tensor) -> None:
        group = {**self.param_groups[0], "seed": self._seeds[id(module.weight)]}
        state = self.state[module.weight]
        state.setdefault("step", 0)
        low_rank = self._project(state, group, grad)
        if "exp_avg" not in state:
            state["exp_avg"] = torch.zeros_like(low_rank)
            state["exp_avg_sq"] = torch.zeros_like(low_rank)
        state["step"] += 1
        normalized = self._adam_direction(state, group, low_rank)
        weight = module.dequantized(torch.float32)
        self._apply_scaled(weight, grad, state, group, low_rank, normalized, self._step_size(group, state["step"]))
        del low_rank, normalized
        if group["weight_decay"] > 0.0:  # decoupled, after the update (as Apollo.step)
            weight.mul_(1.0 - group["lr"] * group["weight_decay"])
        module.requantize(weight, self._generator(weight))

    def state_tensors(self) -> list[torch.Tensor]:
        """Each weight's projection, low-rank moments and previous scaled-gradient norm."""
        return [v for state in self.state.values() for v in state.values() if isinstance(v, torch.Tensor)]
