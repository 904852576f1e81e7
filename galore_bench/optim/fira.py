"""Fira (Chen et al. 2024, arXiv 2410.01623): GaLore's low-rank Adam plus the scaled full-rank residual.

GaLore throws away the part of each gradient outside its rank-r subspace. Fira keeps it: the residual
G - P P^T G (P: the GaLore basis, times GaLore's scale) is added to the update, scaled per column (or
row) by how much Adam changed the norm of the low-rank gradient there, ||Adam(R)|| / ||R||, so the
residual moves at Adam's pace without Adam state of its own. A norm-growth limiter keeps the
residual's norm from growing more than 1% a step (a spike in the full gradient would otherwise pass
straight into the weights): the only extra state is one scalar per matrix, the last residual norm.

Our own implementation on our GaLore projector (projector.py). The ops per tensor follow the `fira`
package 1.0 in its order, so weights agree with it bit for bit; two changes that do not alter a value:
the limiter's max(ratio, 1.01) is a torch.where (Python's max on a tensor syncs the host and does not
run on fake tensors), and the residual and update are scaled in place (fewer full-size temporaries).
Parameter groups as in optim/galore.py: a group with 'rank' etc. is projected, any other gets AdamW.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch

from galore_bench.optim.galore import _check_hyper, _projector, _run_closure

__all__ = ["LIMITER_GROWTH", "FiraAdamW"]

LIMITER_GROWTH = 1.01  # the residual's norm may grow by at most 1% per step (the paper's gamma)
NORM_EPS = 1e-8  # keeps the scaling factor and the limiter finite on an all-zero column / residual


def residual_scale(adam_low: torch.Tensor, grad_low: torch.Tensor) -> torch.Tensor:
    """phi = ||Adam(R)|| / ||R|| per column of a wide low-rank gradient (r x n), per row of a tall one
    (m x r), shaped to broadcast over the full matrix."""
    dim = 0 if adam_low.shape[0] < adam_low.shape[1] else 1
    scale = torch.norm(adam_low, dim=dim) / (torch.norm(grad_low, dim=dim) + NORM_EPS)
    return scale.unsqueeze(1) if dim == 1 else scale


def limit_growth(residual: torch.Tensor, state: dict[str, Any]) -> None:
    """Scale `residual` (in place) so its norm exceeds the last step's by at most LIMITER_GROWTH."""
    norm = torch.norm(residual)
    if "residual_norm" not in state:
        state["residual_norm"] = norm
        return
    ratio = norm / (state["residual_norm"] + NORM_EPS)
    limiter = torch.where(ratio < LIMITER_GROWTH, 1.0, ratio / LIMITER_GROWTH)
    residual.div_(limiter)
    state["residual_norm"] = norm / limiter


class FiraAdamW(torch.optim.Optimizer):
    """GaLoreAdamW (transformers-style AdamW, eps outside the sqrt) plus Fira's scaled residual.

    Per projected parameter the state holds 'step', 'projector' (its basis), 'exp_avg' and 'exp_avg_sq'
    (rank-r) and 'residual_norm' (a 0-dim tensor, the limiter's memory); other parameters: plain AdamW.
    Also steps fake parameters (FakeTensorMode): no .item(), no branching on values.
    """

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-6, weight_decay: float = 0.0, correct_bias: bool = True):
        _check_hyper(lr, betas, eps, weight_decay)
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay,
                                  "correct_bias": correct_bias})

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = _run_closure(closure)
        for group in self.param_groups:
            for p in group["params"]:
                full = p.grad
                if full is None:
                    continue
                if full.is_sparse:
                    raise RuntimeError("FiraAdamW does not support sparse gradients")
                self._update(p, full, group, self.state[p])
        return loss

    def _update(self, p: torch.Tensor, full: torch.Tensor, group: dict[str, Any], state: dict[str, Any]) -> None:
        beta1, beta2 = group["betas"]
        step = state.setdefault("step", 0)
        projector = _projector(state, group)
        grad = full if projector is None else projector.project(full, step)
        if "exp_avg" not in state:
            state["exp_avg"] = torch.zeros_like(grad)
            state["exp_avg_sq"] = torch.zeros_like(grad)
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        step += 1
        state["step"] = step
        exp_avg.mul_(beta1).add_(grad, alpha=1.0 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
        denom = exp_avg_sq.sqrt().add_(group["eps"])
        step_size = group["lr"]
        if group["correct_bias"]:
            step_size = step_size * math.sqrt(1.0 - beta2 ** step) / (1.0 - beta1 ** step)
        update = exp_avg / denom
        del denom
        if projector is not None:
            residual = full - projector.project_back(grad)  # what GaLore's subspace leaves out
            residual.mul_(residual_scale(update, grad))
            del grad
            limit_growth(residual, state)
            update = projector.project_back(update).add_(residual)
            del residual
        p.add_(update, alpha=-step_size)
        if group["weight_decay"] > 0.0:  # decoupled, after the update (fira / galore-torch order)
            p.add_(p, alpha=-group["lr"] * group["weight_decay"])
