"""AdaLomo (Lv et al. 2023, arXiv 2310.10195): LOMO's fused in-backward update with an adaptive step.

Plain LOMO is SGD; AdaLomo gives each weight Adafactor's factored second moment (one fp32 row and one
fp32 column vector per matrix, a full fp32 vector for a 1-D weight), so it adapts per element while
keeping O(m + n) state per matrix. Its grouped update normalisation then, per weight tensor (a "group"),
caps the update's RMS at `clip_threshold` and scales the learning rate by the weight's own RMS (at least
eps[1]), so every tensor moves by a similar relative amount without a first moment.

Our own implementation on our LOMO hooks (optim/lomo.py: one gradient alive, O(1) work per hook). The
conventions follow lomo-optim 0.1.1's AdaLomo (CUDA-only, so tests check a hand-worked step instead):
the step counter t starts at 1 for the first update, beta2_t = 1 - t^decay_rate (decay_rate -0.8; the
first step takes the squared gradient as is), eps[0] is added to the squared gradient before averaging,
and the row factor is normalised by its mean. Differences that change no value: the learning-rate scale
is a tensor clamp rather than Python's max (no host sync, runs on fake tensors), and the update is
scaled by the learning rate in place before it is subtracted. States are allocated for the trainable
weights only (the reference allocates for frozen ones too).
"""
from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch

from galore_bench.optim.lomo import LOMO, DynamicLossScaler

__all__ = ["AdaLomo", "factored_scale"]


def factored_scale(row: torch.Tensor, col: torch.Tensor) -> torch.Tensor:
    """1 / sqrt(V_hat) for V_hat = row col^T / mean(row): the factored estimate of E[g^2] (m x n)."""
    row_factor = (row / row.mean(dim=-1, keepdim=True)).rsqrt_().unsqueeze(-1)
    return torch.mul(row_factor, col.unsqueeze(-2).rsqrt())


class AdaLomo(LOMO):
    """Fused-backward AdaLomo: `step(loss)` runs backward; each weight updates as its gradient lands.

    State per trainable weight: 'row' and 'col' (fp32, a matrix's factored second moment) or 'sq' (fp32, a
    vector's). Gradient clipping and loss scaling work as in LOMO.
    """

    def __init__(self, model: torch.nn.Module, lr: float, eps: tuple[float, float] = (1e-30, 1e-3),
                 clip_threshold: float = 1.0, decay_rate: float = -0.8, clip_grad_norm: float | None = None,
                 clip_grad_value: float | None = None, loss_scale: float | DynamicLossScaler | None = None,
                 weight_decay: float = 0.0) -> None:
        if eps[0] < 0 or eps[1] < 0 or clip_threshold <= 0 or decay_rate > 0:
            raise ValueError(f"adalomo needs eps >= 0, clip_threshold > 0 and decay_rate <= 0, got {eps}, "
                             f"{clip_threshold}, {decay_rate}")
        super().__init__(model, lr, clip_grad_norm=clip_grad_norm, clip_grad_value=clip_grad_value,
                         loss_scale=loss_scale, weight_decay=weight_decay)
        self.eps = eps
        self.clip_threshold = clip_threshold
        self.decay_rate = decay_rate
        self.step_num = 0
        self.state: dict[torch.Tensor, dict[str, torch.Tensor]] = {}
        for p in self.params:
            fp32 = torch.float32
            self.state[p] = ({"row": p.new_zeros(p.shape[0], dtype=fp32), "col": p.new_zeros(p.shape[1], dtype=fp32)}
                             if p.dim() == 2 else {"sq": p.new_zeros(p.shape, dtype=fp32)})

    def state_tensors(self) -> Iterator[torch.Tensor]:
        for state in self.state.values():
            yield from state.values()

    def step(self, loss: torch.Tensor, lr: float | None = None, retain_graph: bool = False) -> torch.Tensor | None:
        """Backward and update; the step counter moves first (the first update is t = 1)."""
        self.step_num += 1
        return super().step(loss, lr=lr, retain_graph=retain_graph)

    def _update(self, p: torch.Tensor, grad: torch.Tensor) -> None:
        grad = self._conditioned(p, grad)
        state = self.state[p]
        beta2t = 1.0 - math.pow(self.step_num, self.decay_rate)
        squared = grad.square().add_(self.eps[0])
        if "row" in state:
            state["row"].mul_(beta2t).add_(squared.mean(dim=-1), alpha=1.0 - beta2t)
            state["col"].mul_(beta2t).add_(squared.mean(dim=-2), alpha=1.0 - beta2t)
            del squared
            update = factored_scale(state["row"], state["col"]).mul_(grad)
        else:
            state["sq"].mul_(beta2t).add_(squared, alpha=1.0 - beta2t)
            del squared
            update = state["sq"].rsqrt().mul_(grad)
        del grad
        update.div_((rms(update) / self.clip_threshold).clamp_(min=1.0))  # the update's RMS at most the threshold
        target = p.to(torch.float32)  # the weight itself when it is fp32
        lr = self.lr * rms(target).clamp_(min=self.eps[1])  # relative step: scaled by the weight's RMS
        if self.weight_decay:
            target.mul_(1.0 - lr * self.weight_decay)
        target.sub_(update.mul_(lr))
        if target is not p:
            p.copy_(target)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "step_num": self.step_num}


def rms(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.norm(2) / math.sqrt(tensor.numel())
