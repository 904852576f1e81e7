"""Q-GaLore (Zhang et al. 2024, arXiv 2407.08296): GaLore on INT8 weights with INT4 projectors and lazy refresh.

Our own implementation of the paper's four pieces:
- `Int8Linear`: the weight lives as int8 codes + one fp32 scale per group (quantize.py); the forward multiplies
  by the dequantized weight and keeps only the input for backward, like nn.Linear. Its weight gradient never
  lands in `.grad` (an int8 tensor cannot hold one): backward hands it to the optimizer at once, which updates
  the weight inside backward (layer-wise, as the paper trains) and drops the gradient.
- `QGaLoreProjector`: GaLore's SVD basis kept as packed INT4 codes + scales, dequantized at each use.
- lazy refresh: every `update_proj_gap` steps a new basis is compared with the previous one (the mean |cosine|
  of corresponding basis vectors; a singular vector's sign is arbitrary); after `refresh_patience` successive
  comparisons at or above `cos_threshold` the projector is frozen and no more SVDs are taken for that weight.
- `QGaLoreAdamW8bit`: bitsandbytes 8-bit Adam in the subspace (GaLoreAdamW8bit's kernel calls); the update is
  projected back, added to the dequantized fp32 weight and re-quantized with stochastic rounding.
"""
from __future__ import annotations

from typing import Any, Protocol

import torch
from torch._subclasses.fake_tensor import is_fake

from galore_bench.optim import layerwise
from galore_bench.optim.galore import GaLoreAdamW8bit
from galore_bench.optim.quantize import INT4_MAX, INT8_MAX, dequantize, pack_int4, quantize, unpack_int4

__all__ = ["Int8Linear", "QGaLoreAdamW8bit", "QGaLoreProjector", "WeightStepper", "basis_similarity"]


class _Int8Matmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, module: Int8Linear) -> torch.Tensor:
        ctx.module = module
        ctx.save_for_backward(x)
        return torch.nn.functional.linear(x, module.dequantized(x.dtype))

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor, None]:
        (x,) = ctx.saved_tensors
        module: Int8Linear = ctx.module
        grad_x = grad_out @ module.dequantized(grad_out.dtype)
        grad_w = grad_out.reshape(-1, module.out_features).t() @ x.reshape(-1, module.in_features)
        del x
        module.receive_gradient(grad_w)
        return grad_x, None


class WeightStepper(Protocol):
    """An optimizer that updates an Int8Linear's weight from its gradient inside backward (Q-GaLore, Q-APOLLO)."""

    def step_weight(self, module: Int8Linear, grad: torch.Tensor) -> None: ...


class Int8Linear(torch.nn.Module):
    """A bias-free linear layer whose weight is int8 codes + fp32 group scales (both frozen Parameters, so a
    model's parameter list, and a memory tracker, see them at their true size)."""

    def __init__(self, weight: torch.Tensor, group_size: int) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        codes, scales = quantize(weight.detach(), group_size, INT8_MAX)
        self.weight = torch.nn.Parameter(codes, requires_grad=False)
        self.weight_scales = torch.nn.Parameter(scales, requires_grad=False)
        self.group_size = group_size
        self.optimizer: WeightStepper | None = None

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        return dequantize(self.weight, self.weight_scales, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _Int8Matmul.apply(x, self)

    def receive_gradient(self, grad: torch.Tensor) -> None:
        """Label the gradient for the tracker and step this weight (no optimizer: the gradient is dropped)."""
        layerwise.label_gradient(grad)
        if self.optimizer is not None:
            with layerwise.optimizer_phase_context():
                self.optimizer.step_weight(self, grad)

    def requantize(self, full: torch.Tensor, noise: torch.Generator | None) -> None:
        """Store an fp32 weight (overwritten: it is scaled in place) as new codes and scales, stochastically
        rounded."""
        codes, scales = quantize(full, self.group_size, INT8_MAX, noise, stochastic=True, in_place=True)
        self.weight.copy_(codes)
        self.weight_scales.copy_(scales)


def basis_similarity(old: torch.Tensor, new: torch.Tensor, side: str) -> float | None:
    """Mean |cosine| of corresponding basis vectors (columns of a left basis, rows of a right one); None on
    fake tensors, whose values do not exist."""
    if is_fake(new):
        return None
    dim = 0 if side == "left" else 1
    return float(torch.nn.functional.cosine_similarity(old.float(), new.float(), dim=dim).abs().mean())


class QGaLoreProjector:
    """One weight's GaLore basis in packed INT4, refreshed every `update_proj_gap` steps until it settles."""

    def __init__(self, rank: int, update_proj_gap: int, scale: float, group_size: int, cos_threshold: float,
                 refresh_patience: int) -> None:
        self.rank, self.update_proj_gap, self.scale, self.group_size = rank, update_proj_gap, scale, group_size
        self.cos_threshold, self.refresh_patience = cos_threshold, refresh_patience
        self.side = ""
        self.codes: torch.Tensor | None = None  # uint8, two INT4 codes per byte
        self.scales: torch.Tensor | None = None
        self.shape: tuple[int, ...] = ()
        self.agreements = 0  # successive refreshes whose basis agreed with the previous one
        self.frozen = False
        self.refreshes = 0

    def basis(self, dtype: torch.dtype) -> torch.Tensor:
        if self.codes is None or self.scales is None:
            raise RuntimeError("the projector has no basis yet")
        return dequantize(unpack_int4(self.codes, self.shape), self.scales, dtype)

    def refresh(self, grad: torch.Tensor) -> None:
        """A new basis from the SVD of `grad` (std side: project away the larger dimension)."""
        self.side = "right" if grad.shape[0] >= grad.shape[1] else "left"
        u, _, vh = torch.linalg.svd(grad.float(), full_matrices=False)
        new = (vh[: self.rank] if self.side == "right" else u[:, : self.rank]).contiguous()
        del u, vh
        if self.codes is not None:
            similarity = basis_similarity(self.basis(torch.float32), new, self.side)
            if similarity is not None:
                self.agreements = self.agreements + 1 if similarity >= self.cos_threshold else 0
                self.frozen = self.agreements >= self.refresh_patience
        codes, self.scales = quantize(new, self.group_size, INT4_MAX)
        self.codes, self.shape = pack_int4(codes), tuple(new.shape)
        self.refreshes += 1

    def project(self, grad: torch.Tensor, step: int) -> torch.Tensor:
        if self.codes is None or (step % self.update_proj_gap == 0 and not self.frozen):
            self.refresh(grad)
        basis = self.basis(grad.dtype)
        return grad @ basis.t() if self.side == "right" else basis.t() @ grad

    def project_back(self, low_rank: torch.Tensor) -> torch.Tensor:
        basis = self.basis(low_rank.dtype)
        full = low_rank @ basis if self.side == "right" else basis @ low_rank
        return full.mul_(self.scale)


class SeededRounding:
    """The INT8 weights' stochastic rounding draws from its own seeded stream, made on the weight's device at first
    use, so a run's rounding noise depends on its seed only (Q-GaLore and Q-APOLLO-Mini share it)."""

    _rounding_seed: int = 0
    _noise: torch.Generator | None = None

    def _generator(self, like: torch.Tensor) -> torch.Generator | None:
        """The stream for `like`'s device (fake tensors: none, their values are never read)."""
        if is_fake(like):
            return None
        if self._noise is None:
            self._noise = torch.Generator(device=like.device).manual_seed(self._rounding_seed)
        return self._noise


class QGaLoreAdamW8bit(SeededRounding, GaLoreAdamW8bit):
    """8-bit Adam in each INT8 weight's INT4-projected subspace; the weight is re-quantized after each update.

    Its param groups hold the Int8Linear codes with 'rank', 'update_proj_gap', 'scale', 'group_size',
    'proj_group_size', 'cos_threshold' and 'refresh_patience'; `step_weight` is called from backward.
    """

    def __init__(self, modules: list[Int8Linear], settings: dict[str, Any], seed: int = 0, **hyper: Any) -> None:
        super().__init__([{"params": [m.weight for m in modules], **settings}], **hyper)
        self._rounding_seed = seed
        for module in modules:
            module.optimizer = self

    @torch.no_grad()
    def step_weight(self, module: Int8Linear, grad: torch.Tensor) -> None:
        group = self.param_groups[0]
        state = self.state[module.weight]
        step = state.setdefault("step", 0)
        if "projector" not in state:
            state["projector"] = QGaLoreProjector(group["rank"], group["update_proj_gap"], group["scale"],
                                                  group["proj_group_size"], group["cos_threshold"],
                                                  group["refresh_patience"])
        projector: QGaLoreProjector = state["projector"]
        low = projector.project(grad, step).contiguous()
        del grad
        if "state1" not in state:
            self._init_state(state, low)
        state["step"] = step + 1
        update = torch.zeros_like(low)
        self._bnb_adam(group, state, low, update, 0.0)  # writes -lr * m_hat / (sqrt(v_hat) + eps)
        del low
        full = projector.project_back(update)
        del update
        weight = module.dequantized(torch.float32).add_(full)
        del full
        if group["weight_decay"] > 0.0:
            weight.mul_(1.0 - group["lr"] * group["weight_decay"])
        module.requantize(weight, self._generator(weight))

    def state_tensors(self) -> list[torch.Tensor]:
        """Moments, absmax and each projector's INT4 codes and scales."""
        found = []
        for state in self.state.values():
            found += [v for v in state.values() if isinstance(v, torch.Tensor)]
            projector = state.get("projector")
            if projector is not None and projector.codes is not None:
                found += [projector.codes, projector.scales]
        return found
