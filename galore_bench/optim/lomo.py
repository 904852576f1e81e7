"""LOMO (Lv et al. 2023): SGD fused into backward, so at most one gradient tensor is alive at a time.

Our own implementation: each trainable parameter gets a post-accumulate-grad hook that updates that one
parameter and frees its gradient (O(1) work per hook; the reference package rescans every parameter in
every hook, which is quadratic in the parameter count).
"""

from __future__ import annotations

from typing import Any

import torch
from torch._subclasses.fake_tensor import is_fake

from galore_bench.optim.layerwise import MAX_GRAD_ACCUMULATION, optimizer_phase_context

__all__ = ["LOMO", "DynamicLossScaler"]

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _all_finite(tensor: torch.Tensor) -> bool:
    """The overflow check (one host sync). A fake tensor has no values: a trace takes the healthy branch, with
    the check's own tensors allocated as a real step allocates them."""
    finite = torch.isfinite(tensor).all()
    return True if is_fake(finite) else bool(finite)


class DynamicLossScaler:
    """fp16 loss scale that halves on overflow and doubles after `growth_interval` clean steps."""

    def __init__(
        self,
        init_scale: float = 2.0**16,
        growth_factor: float = 2.0,
        backoff_factor: float = 0.5,
        growth_interval: int = 1000,
        min_scale: float = 1.0,
    ) -> None:
        if init_scale <= 0 or growth_factor <= 1 or not 0 < backoff_factor < 1 or growth_interval < 1:
            raise ValueError(
                "DynamicLossScaler needs init_scale > 0, growth_factor > 1, "
                "0 < backoff_factor < 1 and growth_interval >= 1"
            )
        self.scale = float(init_scale)
        self.growth_factor = growth_factor
        self.backoff_factor = backoff_factor
        self.growth_interval = growth_interval
        self.min_scale = min_scale
        self.clean_steps = 0

    def update(self, overflow: bool) -> None:
        """Back off on overflow; grow after a window of clean steps."""
        if overflow:
            self.scale = max(self.scale * self.backoff_factor, self.min_scale)
            self.clean_steps = 0
            return
        self.clean_steps += 1
        if self.clean_steps >= self.growth_interval:
            self.scale *= self.growth_factor
            self.clean_steps = 0


class LOMO:
    """Fused-backward SGD: `step(loss)` runs backward and every parameter is updated as its gradient lands.

    With `clip_grad_norm` a step costs two backward passes (norm first, then update), as in the paper.
    Not a torch.optim.Optimizer: there is no separate step after backward, and gradient accumulation is
    impossible (weights change inside every backward). Frozen parameters are skipped.
    """

    max_grad_accumulation: int = MAX_GRAD_ACCUMULATION

    def __init__(
        self,
        model: torch.nn.Module,
        lr: float,
        clip_grad_norm: float | None = None,
        clip_grad_value: float | None = None,
        loss_scale: float | DynamicLossScaler | None = None,
        weight_decay: float = 0.0,
    ) -> None:
        errors = []
        if lr < 0:
            errors.append(f"lomo.lr must be >= 0, got {lr}")
        if clip_grad_norm is not None and clip_grad_norm <= 0:
            errors.append(f"lomo.clip_grad_norm must be > 0, got {clip_grad_norm}")
        if clip_grad_value is not None and clip_grad_value <= 0:
            errors.append(f"lomo.clip_grad_value must be > 0, got {clip_grad_value}")
        if isinstance(loss_scale, (int, float)) and loss_scale <= 0:
            errors.append(f"lomo.loss_scale must be > 0, got {loss_scale}")
        if errors:
            raise ValueError("; ".join(errors))
        self.param_groups = [{"lr": lr}]  # one group, so an LR schedule moves it as it moves any optimizer's
        self.clip_grad_norm = clip_grad_norm
        self.clip_grad_value = clip_grad_value
        self.loss_scale = loss_scale
        self.weight_decay = weight_decay
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("LOMO found no trainable parameter in the model")
        self._handles = [p.register_post_accumulate_grad_hook(self._hook) for p in self.params]
        # Per-backward state, read by the hook.
        self._gather_norm = False
        self._norm_sq: torch.Tensor | None = None
        self._clip_coef: torch.Tensor | None = None
        self._unscale: float | None = None
        self._overflow = False
        # Cheap counters for tests and the memory story.
        self._live_grads = 0
        self.peak_live_grads = 0
        self.hook_calls = 0
        self.skipped_steps = 0

    @classmethod
    def supports_grad_accumulation(cls) -> bool:
        """False: the weights change inside every backward, so micro-batch gradients cannot be summed."""
        return cls.max_grad_accumulation > 1

    @property
    def _dynamic(self) -> DynamicLossScaler | None:
        return self.loss_scale if isinstance(self.loss_scale, DynamicLossScaler) else None

    def _current_scale(self) -> float | None:
        if isinstance(self.loss_scale, DynamicLossScaler):
            return self.loss_scale.scale
        return None if self.loss_scale is None else float(self.loss_scale)

    def _hook(self, p: torch.Tensor) -> None:
        """Consume p.grad: add its squared norm (norm pass) or update p with it (update pass); free it."""
        self.hook_calls += 1
        grad = p.grad
        if grad is None:
            return
        p.grad = None
        # `grad` is the one live gradient until this hook returns; the counter tracks exactly that window.
        self._live_grads += 1
        self.peak_live_grads = max(self.peak_live_grads, self._live_grads)
        try:
            with torch.no_grad(), optimizer_phase_context():
                self._consume(p, grad)
        finally:
            self._live_grads -= 1

    def _consume(self, p: torch.Tensor, grad: torch.Tensor) -> None:
        """Norm pass: add ||grad||^2 to a running 0-dim tensor. Update pass: overflow check, then update."""
        if self._gather_norm:
            sq = torch.linalg.vector_norm(grad, 2, dtype=torch.float32).square()
            self._norm_sq = sq if self._norm_sq is None else self._norm_sq.add_(sq.to(self._norm_sq.device))
            return
        # Single-pass fp16: overflow can only be seen per gradient (one sync each); the
        # parameters updated before the first overflow keep their update (inherent to LOMO).
        if (
            self._dynamic is not None
            and self._clip_coef is None
            and (self._overflow or not _all_finite(grad))
        ):
            self._overflow = True
            return
        self._update(p, grad)

    def _conditioned(self, p: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        """clip(unscale(grad)), in place; an fp32 copy first for a low-precision parameter."""
        if p.dtype in _LOW_PRECISION:
            grad = grad.to(torch.float32)
        if self._unscale is not None:
            grad.div_(self._unscale)
        if self.clip_grad_value is not None:
            grad.clamp_(-self.clip_grad_value, self.clip_grad_value)
        if self._clip_coef is not None:
            grad.mul_(self._clip_coef.to(grad.device))
        return grad

    def _update(self, p: torch.Tensor, grad: torch.Tensor) -> None:
        """p -= lr * clip(unscale(grad)); low-precision params are updated through an fp32 copy."""
        low = p.dtype in _LOW_PRECISION
        grad = self._conditioned(p, grad)
        target = p.to(torch.float32) if low else p
        if self.weight_decay:
            target.mul_(1.0 - self.lr * self.weight_decay)
        target.add_(grad, alpha=-self.lr)
        if low:
            p.copy_(target)

    def grad_norm(self, loss: torch.Tensor) -> torch.Tensor:
        """First pass of a clipped step: backward (graph retained) that only sums squared grad norms.

        Returns the unscaled global L2 norm as a 0-dim tensor (no host sync).
        """
        scale = self._current_scale()
        self._gather_norm, self._norm_sq = True, None
        try:
            (loss * scale if scale is not None else loss).backward(retain_graph=True)
        finally:
            self._gather_norm = False
        if self._norm_sq is None:
            raise RuntimeError("LOMO.grad_norm: no trainable parameter received a gradient")
        total = self._norm_sq.sqrt()
        return total / scale if scale is not None else total

    @property
    def lr(self) -> float:
        return float(self.param_groups[0]["lr"])

    @lr.setter
    def lr(self, value: float) -> None:
        self.param_groups[0]["lr"] = value

    def step(
        self, loss: torch.Tensor, lr: float | None = None, retain_graph: bool = False
    ) -> torch.Tensor | None:
        """Backward + update in one go. Returns the global grad norm (a tensor) when clipping by norm.

        `lr` overrides self.lr (for schedules); `retain_graph` applies to the last backward only.
        """
        if lr is not None:
            self.lr = lr
        total_norm = None
        self._clip_coef = None
        if self.clip_grad_norm is not None:
            total_norm = self.grad_norm(loss)
            if self._dynamic is not None and not _all_finite(total_norm):
                self._dynamic.update(overflow=True)  # one sync per step; the update pass is skipped
                self.skipped_steps += 1
                return total_norm
            # Same formula as torch.nn.utils.clip_grad_norm_.
            self._clip_coef = torch.clamp(self.clip_grad_norm / (total_norm + 1e-6), max=1.0)
        scale = self._current_scale()
        self._unscale = scale
        self._overflow = False
        try:
            (loss * scale if scale is not None else loss).backward(retain_graph=retain_graph)
        finally:
            self._clip_coef, self._unscale = None, None
        if self._dynamic is not None:
            self._dynamic.update(overflow=self._overflow)
            self.skipped_steps += int(self._overflow)
        return total_norm

    backward_and_step = step

    def zero_grad(self, set_to_none: bool = True) -> None:
        """No-op: the hooks free every gradient inside backward."""

    def remove_hooks(self) -> None:
        """Detach from the model (backward then leaves gradients in .grad as usual)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def state_dict(self) -> dict[str, Any]:
        """SGD has no state; only the lr and the loss scale need saving."""
        return {"lr": self.lr, "loss_scale": self._current_scale()}
