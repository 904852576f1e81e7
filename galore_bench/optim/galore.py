"""GaLore (Zhao et al. 2024): Adam on a low-rank projection of each weight's gradient.

Our own implementation. ``GaLoreAdamW`` follows galore-torch 1.0's update op for op, so the two agree
bit for bit; ``GaLoreAdamW8bit`` keeps the low-rank Adam moments as bitsandbytes blockwise 8-bit states
and, unlike galore-torch 1.0 with bitsandbytes >= 0.45, also updates parameters whose low-rank state is
small enough for bitsandbytes to keep in 32 bits.

Parameter groups follow galore-torch: a group holding 'rank', 'update_proj_gap', 'scale' and
'proj_type' is projected, any other group gets plain AdamW. A projected group may also hold 'svd'
("full", the default and galore-torch's, or "randomized"), 'svd_oversample' and 'svd_power_iters'.
Per-parameter state: 'step' (int),
'projector' (a GaLoreProjector, projected params only) and the moment tensors ('exp_avg'/'exp_avg_sq',
or bitsandbytes' 'state1'/'state2'/'absmax1'/'absmax2'), so a memory tracker that scans
``optimizer.state[p].values()`` for tensors, plus ``state['projector'].ortho_matrix``, sees every byte.

Both optimizers also step fake parameters under ``torch._subclasses.fake_tensor.FakeTensorMode``
(memory simulation of large models): no ``.item()``, no numpy, no branching on tensor values.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch._subclasses.fake_tensor import is_fake

from galore_bench.optim.projector import SVD_OVERSAMPLE, SVD_POWER_ITERS, GaLoreProjector

__all__ = ["BNB_BLOCKSIZE", "MIN_8BIT_SIZE", "GaLoreAdamW", "GaLoreAdamW8bit", "GaLoreProjector"]

MIN_8BIT_SIZE = 4096  # bitsandbytes' default: smaller tensors keep 32-bit optimizer state
BNB_BLOCKSIZE = 256  # bitsandbytes' blockwise optimizer kernels quantize in blocks of 256 values
# bnb's signed/unsigned dynamic quantization maps per device: constants, so one copy serves every
# optimizer (layer-wise builds one optimizer per parameter; a copy each would be 2 KiB x parameters)
_QMAPS: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}


def _check_hyper(lr: float, betas: tuple[float, float], eps: float, weight_decay: float) -> None:
    if lr < 0.0 or eps < 0.0 or weight_decay < 0.0:
        raise ValueError(f"lr, eps and weight_decay must be >= 0, got {lr}, {eps}, {weight_decay}")
    if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
        raise ValueError(f"betas must lie in [0, 1), got {betas}")


def _projector(state: dict[str, Any], group: dict[str, Any]) -> GaLoreProjector | None:
    """The parameter's projector (made on first use) when its group is a GaLore group, else None."""
    if "rank" not in group:
        return None
    if "projector" not in state:
        state["projector"] = GaLoreProjector(
            group["rank"], update_proj_gap=group["update_proj_gap"], scale=group["scale"],
            proj_type=group["proj_type"], svd=group.get("svd", "full"),
            svd_oversample=group.get("svd_oversample", SVD_OVERSAMPLE),
            svd_power_iters=group.get("svd_power_iters", SVD_POWER_ITERS))
    return state["projector"]


def _run_closure(closure: Callable[[], Any] | None) -> Any:
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


class GaLoreAdamW(torch.optim.Optimizer):
    """AdamW (transformers-style, eps inside the sqrt-denominator) with GaLore projection per group.

    Same constructor, defaults and update order as galore_torch.GaLoreAdamW, so results match it.
    """

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-6, weight_decay: float = 0.0, correct_bias: bool = True):
        _check_hyper(lr, betas, eps, weight_decay)
        defaults = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay,
                    "correct_bias": correct_bias}
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One AdamW step; projected params run Adam on the low-rank gradient and apply scale * P N.

        The ops per tensor are galore-torch's, in its order (so the result is bit-identical); settings are
        read once per group rather than once per parameter.
        """
        loss = _run_closure(closure)
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr, eps, weight_decay = group["lr"], group["eps"], group["weight_decay"]
            correct_bias = group["correct_bias"]
            projected = "rank" in group
            for p in group["params"]:
                grad = p.grad
                if grad is None:
                    continue
                if grad.is_sparse:
                    raise RuntimeError("GaLoreAdamW does not support sparse gradients")
                state = self.state[p]
                if not state:
                    state["step"] = 0
                step = state["step"]
                projector = _projector(state, group) if projected else None
                if projector is not None:
                    grad = projector.project(grad, step)
                if "exp_avg" not in state:
                    state["exp_avg"] = torch.zeros_like(grad)
                    state["exp_avg_sq"] = torch.zeros_like(grad)
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                step += 1
                state["step"] = step

                exp_avg.mul_(beta1).add_(grad, alpha=1.0 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
                denom = exp_avg_sq.sqrt().add_(eps)
                step_size = lr
                if correct_bias:
                    step_size = step_size * math.sqrt(1.0 - beta2 ** step) / (1.0 - beta1 ** step)
                update = exp_avg / denom
                if projector is not None:
                    update = projector.project_back(update)
                p.add_(update, alpha=-step_size)
                if weight_decay > 0.0:  # decoupled, applied after the update (galore-torch order)
                    p.add_(p, alpha=-lr * weight_decay)
        return loss


class GaLoreAdamW8bit(torch.optim.Optimizer):
    """GaLore with bitsandbytes 8-bit blockwise Adam states in the low-rank subspace.

    Defaults follow galore_torch.GaLoreAdamW8bit (eps 1e-8, weight_decay 1e-2). Like bitsandbytes, a
    state with fewer than `min_8bit_size` elements stays fp32 ('state1'/'state2' float32, no absmax).
    Projected params: bnb's Adam kernel writes -lr * m_hat / (sqrt(v_hat) + eps) into a zeroed
    low-rank buffer, which is projected back (times scale) and added to the weight; weight decay is then
    applied as p -= lr * wd * p (galore-torch order). Other params get bnb's own AdamW8bit update.

    bitsandbytes is called through its public functional API with keyword arguments and max_unorm = 0.
    galore-torch 1.0 passes bnb's constructor arguments positionally, so percentile_clipping=100 lands in
    max_unorm; with the weight zeroed to serve as the buffer, the update-norm clip scales every 32-bit
    state update to 0 and small projected weights never move. This class avoids that.

    Fake tensors: bitsandbytes 0.50 registers fake kernels for its optimizer ops, so the very same calls
    run under FakeTensorMode (CPU fake tensors) and allocate the same state tensors. The one fake-only
    branch is the quantization map: its values cannot be computed on fake tensors, so a fake placeholder
    of the same shape (256 fp32) is passed instead; the fake kernel never reads values.
    """

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, min_8bit_size: int = MIN_8BIT_SIZE):
        _check_hyper(lr, betas, eps, weight_decay)
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})
        self.min_8bit_size = min_8bit_size
        # import bitsandbytes now, while no gradient exists: its import may log a warning carrying an exception,
        # whose traceback keeps the importing frames alive; imported inside the first update, a log capture
        # (pytest's) would hold that update's gradient for the rest of the process
        import bitsandbytes.functional  # noqa: F401

    @staticmethod
    def _qmaps_for(like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """bnb's signed/unsigned dynamic maps on `like`'s device (built lazily: needs real tensors)."""
        if is_fake(like):
            return like.new_empty((256,), dtype=torch.float32), like.new_empty((256,), dtype=torch.float32)
        if like.device not in _QMAPS:
            import bitsandbytes.functional as bnbf

            _QMAPS[like.device] = (bnbf.create_dynamic_map(signed=True).to(like.device),
                                   bnbf.create_dynamic_map(signed=False).to(like.device))
        return _QMAPS[like.device]

    def _init_state(self, state: dict[str, Any], like: torch.Tensor) -> None:
        """Moments shaped like the (low-rank) gradient: uint8 + per-block absmax, or fp32 when small."""
        if like.numel() < self.min_8bit_size:
            state["state1"] = torch.zeros_like(like, dtype=torch.float32)
            state["state2"] = torch.zeros_like(like, dtype=torch.float32)
            return
        blocks = (like.numel() + BNB_BLOCKSIZE - 1) // BNB_BLOCKSIZE
        state["state1"] = torch.zeros_like(like, dtype=torch.uint8)
        state["state2"] = torch.zeros_like(like, dtype=torch.uint8)
        state["absmax1"] = like.new_zeros((blocks,), dtype=torch.float32)
        state["absmax2"] = like.new_zeros((blocks,), dtype=torch.float32)

    def _bnb_adam(self, group: dict[str, Any], state: dict[str, Any], grad: torch.Tensor,
                  target: torch.Tensor, weight_decay: float) -> None:
        """In-place bnb Adam update of `target` (8-bit blockwise or 32-bit kernel, by state dtype)."""
        import bitsandbytes.functional as bnbf

        beta1, beta2 = group["betas"]
        common = {"optimizer_name": "adam", "g": grad, "p": target, "state1": state["state1"],
                  "state2": state["state2"], "beta1": beta1, "beta2": beta2, "beta3": 0.0, "alpha": 0.0,
                  "eps": group["eps"], "step": state["step"], "lr": group["lr"],
                  "weight_decay": weight_decay, "gnorm_scale": 1.0, "skip_zeros": False}
        if state["state1"].dtype == torch.uint8:
            qmap1, qmap2 = self._qmaps_for(target)
            bnbf.optimizer_update_8bit_blockwise(**common, qmap1=qmap1, qmap2=qmap2,
                                                 absmax1=state["absmax1"], absmax2=state["absmax2"])
        else:
            bnbf.optimizer_update_32bit(**common, unorm_vec=None, max_unorm=0.0)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One step; every parameter with a gradient moves, whatever the size of its state."""
        loss = _run_closure(closure)
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("GaLoreAdamW8bit does not support sparse gradients")
                state = self.state[p]
                step = state.setdefault("step", 0)
                projector = _projector(state, group)
                if projector is None:
                    grad, target, wd_in_kernel = p.grad.contiguous(), p, group["weight_decay"]
                else:
                    grad = projector.project(p.grad, step).contiguous()
                    target, wd_in_kernel = torch.zeros_like(grad, dtype=p.dtype), 0.0
                if "state1" not in state:
                    self._init_state(state, grad)
                state["step"] = step + 1
                self._bnb_adam(group, state, grad, target, wd_in_kernel)
                if projector is not None:
                    p.add_(projector.project_back(target).to(p.dtype))
                    if group["weight_decay"] > 0.0:
                        p.add_(p, alpha=-group["lr"] * group["weight_decay"])
        return loss
