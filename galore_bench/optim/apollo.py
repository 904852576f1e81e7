"""APOLLO and APOLLO-Mini (Zhu et al., arXiv 2412.05270): AdamW's element-wise learning rates coarsened to one
per channel (APOLLO) or one per tensor (APOLLO-Mini), estimated from Adam moments kept in a random projection.

Our own implementation, written from the paper's Algorithm 1. For an m x n weight with gradient G:
  R = project(G) with a seeded Gaussian projection (entries N(0, 1/r)), drawn afresh every `update_proj_gap`
      steps; the projection keeps the longer side: R = G P^T (m x r) when m >= n, else P^T G (r x n);
  Adam moments of R (the only state besides P and one norm), R~ = m / (sqrt(v) + eps);
  s = ||R~|| / ||R|| per channel (rows of G when m >= n, columns otherwise) or per tensor (scale_type="tensor");
  G~ = G * s (the full-rank gradient, rescaled), then the norm-growth limiter: ||G~|| may grow by at most
      NORM_GROWTH_LIMIT per step; W -= lr_t * sqrt(scale) * G~ (lr_t with Adam's bias correction).
`scaled_gradient="projected"` instead rescales R and maps it back through P (times `scale`), as
pytorch-optimizer's APOLLO does; it is kept so that a test can compare us with that package op for op.

Groups without 'rank' get plain Adam (transformers-style eps, as GaLore). Per-parameter state: 'step' (int),
'projection' (the r x n or m x r matrix, in the gradient's dtype), 'exp_avg'/'exp_avg_sq', 'scaled_norm'
(fp32, the previous ||G~||, for the limiter). Steps fake tensors too: no .item(), no branch on values.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch._subclasses.fake_tensor import is_fake

__all__ = ["NORM_GROWTH_LIMIT", "SCALED_GRADIENTS", "SCALE_TYPES", "Apollo", "random_projection"]

NORM_GROWTH_LIMIT = 1.01  # gamma: the paper's (and Fira's) cap on ||G~_t|| / ||G~_{t-1}||
SCALE_TYPES = ("channel", "tensor")
SCALED_GRADIENTS = ("full", "projected")
_SEED_STRIDE = 1_000_003  # a refresh's seed: the parameter's seed + stride x refresh count (a prime: no overlap)


def random_projection(grad: torch.Tensor, rank: int, seed: int) -> torch.Tensor:
    """Gaussian N(0, 1/rank) projection for `grad`: rank x n when rows >= cols (right side), else m x rank."""
    rows, cols = grad.shape
    shape = (rank, cols) if rows >= cols else (rows, rank)
    generator = None if is_fake(grad) else torch.Generator(device=grad.device).manual_seed(seed)
    return torch.randn(shape, generator=generator, dtype=grad.dtype, device=grad.device).div_(math.sqrt(rank))


def _channel_ratio(normalized: torch.Tensor, low_rank: torch.Tensor, right: bool) -> torch.Tensor:
    """||R~|| / ||R|| along each kept channel, shaped to broadcast over G: (m, 1) right, (n,) left."""
    dim = 1 if right else 0
    ratio = torch.norm(normalized, dim=dim) / (torch.norm(low_rank, dim=dim) + 1e-8)
    return ratio.unsqueeze(1) if right else ratio


class Apollo(torch.optim.Optimizer):
    """AdamW with APOLLO's structured gradient scaling on groups that hold 'rank'.

    A projected group holds 'rank', 'update_proj_gap', 'scale', 'scale_type' ("channel" or "tensor") and
    optionally 'seed' (default 0) and 'scaled_gradient' ("full", the paper's, or "projected").
    """

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-6, weight_decay: float = 0.0, correct_bias: bool = True):
        if lr < 0.0 or eps < 0.0 or weight_decay < 0.0:
            raise ValueError(f"lr, eps and weight_decay must be >= 0, got {lr}, {eps}, {weight_decay}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"betas must lie in [0, 1), got {betas}")
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay,
                                  "correct_bias": correct_bias})
        for group in self.param_groups:
            if "rank" in group:
                _check_group(group)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("Apollo does not support sparse gradients")
                state = self.state[p]
                state.setdefault("step", 0)
                projected = "rank" in group and p.ndim == 2
                low_rank = self._project(state, group, p.grad) if projected else p.grad
                if "exp_avg" not in state:
                    state["exp_avg"] = torch.zeros_like(low_rank)
                    state["exp_avg_sq"] = torch.zeros_like(low_rank)
                state["step"] += 1
                normalized = self._adam_direction(state, group, low_rank)
                step_size = self._step_size(group, state["step"])
                if projected:
                    self._apply_scaled(p, p.grad, state, group, low_rank, normalized, step_size)
                else:
                    p.add_(normalized, alpha=-step_size)
                if group["weight_decay"] > 0.0:  # decoupled, after the update (the GaLore / AdamW-style order)
                    p.add_(p, alpha=-group["lr"] * group["weight_decay"])
        return loss

    @staticmethod
    def _project(state: dict[str, Any], group: dict[str, Any], grad: torch.Tensor) -> torch.Tensor:
        """R: the gradient in the random subspace, the projection drawn afresh at steps 0, T, 2T, ..."""
        step, gap = state["step"], group["update_proj_gap"]
        if "projection" not in state or step % gap == 0:
            state["projection"] = random_projection(grad, group["rank"],
                                                    group.get("seed", 0) + _SEED_STRIDE * (step // gap))
        projection = state["projection"]
        return grad @ projection.T if grad.shape[0] >= grad.shape[1] else projection.T @ grad

    @staticmethod
    def _adam_direction(state: dict[str, Any], group: dict[str, Any], grad: torch.Tensor) -> torch.Tensor:
        """m / (sqrt(v) + eps) after updating both moments in place (one new tensor: the denominator)."""
        beta1, beta2 = group["betas"]
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        exp_avg.lerp_(grad, 1.0 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
        denominator = exp_avg_sq.sqrt().add_(group["eps"])
        return torch.div(exp_avg, denominator, out=denominator)

    @staticmethod
    def _step_size(group: dict[str, Any], step: int) -> float:
        if not group["correct_bias"]:
            return group["lr"]
        beta1, beta2 = group["betas"]
        return group["lr"] * math.sqrt(1.0 - beta2 ** step) / (1.0 - beta1 ** step)

    @staticmethod
    def _apply_scaled(p: torch.Tensor, grad: torch.Tensor, state: dict[str, Any], group: dict[str, Any],
                      low_rank: torch.Tensor, normalized: torch.Tensor, step_size: float) -> None:
        """Scale the gradient by s (channel or tensor), limit its norm's growth, and step the weight."""
        right = p.shape[0] >= p.shape[1]
        if group["scale_type"] == "channel":
            ratio = _channel_ratio(normalized, low_rank, right)
        else:
            ratio = torch.norm(normalized) / (torch.norm(low_rank) + 1e-8)
        full = group.get("scaled_gradient", "full") == "full"
        scaled = grad * ratio if full else torch.mul(low_rank, ratio, out=normalized)
        norm = torch.norm(scaled)
        if "scaled_norm" in state:  # fp32, so that a capped limiter is exactly 1 in any training dtype
            limiter = (norm.float() / (state["scaled_norm"] + 1e-8)).clamp_(min=NORM_GROWTH_LIMIT) / NORM_GROWTH_LIMIT
            scaled.div_(limiter)
            norm = norm.float().div_(limiter)
        state["scaled_norm"] = norm.float()
        scaled.mul_(math.sqrt(group["scale"]))
        if not full:
            projection = state["projection"]
            scaled = (scaled @ projection if right else projection @ scaled).mul_(group["scale"])
        p.add_(scaled, alpha=-step_size)


def _check_group(group: dict[str, Any]) -> None:
    if group["rank"] < 1 or group["update_proj_gap"] < 1:
        raise ValueError(f"rank and update_proj_gap must be >= 1, got {group['rank']} and {group['update_proj_gap']}")
    if group.get("scale_type") not in SCALE_TYPES:
        raise ValueError(f"scale_type must be one of {SCALE_TYPES}, got {group.get('scale_type')!r}")
    if group.get("scaled_gradient", "full") not in SCALED_GRADIENTS:
        raise ValueError(f"scaled_gradient must be one of {SCALED_GRADIENTS}, got {group['scaled_gradient']!r}")
    if group["scale"] < 0.0:
        raise ValueError(f"scale must be >= 0, got {group['scale']}")
