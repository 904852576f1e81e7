"""Layer-wise ("optimizer in backward") stepping: one optimizer per parameter, stepped inside backward.

Each parameter's optimizer runs from a post-accumulate-grad hook and frees the gradient at once, so a full
set of gradients never exists (the GaLore paper's per-layer weight updates).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch

__all__ = ["MAX_GRAD_ACCUMULATION", "LayerwiseOptimizer", "label_gradient", "optimizer_phase_context",
           "set_gradient_labeller", "set_phase_context"]

MAX_GRAD_ACCUMULATION: int = 1
"""Largest gradient-accumulation factor layer-wise stepping supports: the update happens inside every backward."""

_phase_factory: Callable[[], contextlib.AbstractContextManager[Any]] | None = None


def set_phase_context(factory: Callable[[], contextlib.AbstractContextManager[Any]] | None) -> None:
    """The memory tracker registers its optimizer phase here: optim/ sits below measure/, so it is told."""
    global _phase_factory
    _phase_factory = factory


def optimizer_phase_context() -> contextlib.AbstractContextManager[Any]:
    """The registered phase (the tracker's `optimizer_phase()`), else a no-op context."""
    return contextlib.nullcontext() if _phase_factory is None else _phase_factory()


_gradient_labeller: Callable[[torch.Tensor], None] | None = None


def set_gradient_labeller(labeller: Callable[[torch.Tensor], None] | None) -> None:
    """The tracker registers how to label a gradient that never reaches a `.grad` (Q-GaLore's INT8 weights)."""
    global _gradient_labeller
    _gradient_labeller = labeller


def label_gradient(grad: torch.Tensor) -> None:
    if _gradient_labeller is not None:
        _gradient_labeller(grad)


ParamsOrGroups = Iterable[torch.Tensor] | Iterable[dict[str, Any]]


def _normalize_groups(params_or_groups: ParamsOrGroups) -> list[dict[str, Any]]:
    """Accept what torch.optim accepts: tensors, or dicts with a 'params' entry plus per-group settings."""
    items = list(params_or_groups)
    if not items:
        raise ValueError("LayerwiseOptimizer got an empty parameter list")
    if not isinstance(items[0], dict):
        items = [{"params": items}]
    groups: list[dict[str, Any]] = []
    for group in items:
        if not isinstance(group, dict) or "params" not in group:
            raise ValueError("each parameter group must be a dict with a 'params' entry")
        params = group["params"]
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        groups.append({**group, "params": params})
    return groups


class _MergedState(Mapping[torch.Tensor, dict[str, Any]]):
    """Live read-only view param -> its state dict across all per-parameter optimizers."""

    def __init__(self, optimizers: dict[torch.Tensor, torch.optim.Optimizer]) -> None:
        self._optimizers = optimizers

    def __getitem__(self, param: torch.Tensor) -> dict[str, Any]:
        opt = self._optimizers.get(param)
        if opt is None or param not in opt.state:
            raise KeyError("parameter has no optimizer state (not managed or not stepped yet)")
        return opt.state[param]

    def __iter__(self) -> Iterator[torch.Tensor]:
        return (p for p, opt in self._optimizers.items() if p in opt.state)

    def __len__(self) -> int:
        return sum(1 for _ in self)


class LayerwiseOptimizer:
    """Steps one inner optimizer per parameter from its post-accumulate-grad hook, inside backward.

    `step()` and `zero_grad()` are no-ops (the work happens in backward); they exist so a training loop
    written for torch.optim runs unchanged. Gradient accumulation (> 1 micro-batch per step) is impossible:
    every backward updates the weights. Frozen parameters (requires_grad=False) are skipped.
    """

    max_grad_accumulation: int = MAX_GRAD_ACCUMULATION

    def __init__(
        self,
        params_or_groups: ParamsOrGroups,
        make_optimizer: Callable[[list[dict[str, Any]]], torch.optim.Optimizer],
    ) -> None:
        self.optimizers: dict[torch.Tensor, torch.optim.Optimizer] = {}
        self._handles: list[Any] = []
        self.hook_calls = 0
        for group in _normalize_groups(params_or_groups):
            for p in group["params"]:
                if not p.requires_grad:
                    continue
                if p in self.optimizers:
                    raise ValueError("a parameter appears in more than one parameter group")
                # Each inner optimizer sees a one-parameter copy of its group, so settings (lr, 'rank', ...) stay.
                self.optimizers[p] = make_optimizer([{**group, "params": [p]}])
                self._handles.append(p.register_post_accumulate_grad_hook(self._hook))
        if not self.optimizers:
            raise ValueError("LayerwiseOptimizer found no trainable parameter")

    @classmethod
    def supports_grad_accumulation(cls) -> bool:
        """False: the weights change inside every backward, so micro-batch gradients cannot be summed."""
        return cls.max_grad_accumulation > 1

    def _hook(self, param: torch.Tensor) -> None:
        """O(1) per parameter: step this parameter's own optimizer, then free its gradient."""
        self.hook_calls += 1
        opt = self.optimizers[param]
        with optimizer_phase_context():
            opt.step()
            opt.zero_grad(set_to_none=True)

    def step(self, closure: Callable[[], Any] | None = None) -> None:
        """No-op: every parameter was already updated inside backward. A closure is rejected."""
        if closure is not None:
            raise ValueError("LayerwiseOptimizer.step does not take a closure (updates happen in backward)")

    def zero_grad(self, set_to_none: bool = True) -> None:
        """No-op: each hook already freed its gradient."""

    @property
    def state(self) -> Mapping[torch.Tensor, dict[str, Any]]:
        """Merged view param -> state so a memory tracker can iterate every optimizer state tensor."""
        return _MergedState(self.optimizers)

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        """All inner one-parameter groups (the live dicts), e.g. to change lr for a schedule."""
        return [g for opt in self.optimizers.values() for g in opt.param_groups]

    def state_dict(self) -> dict[str, Any]:
        """Inner optimizers' state dicts, in parameter registration order."""
        return {"optimizers": [opt.state_dict() for opt in self.optimizers.values()]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Inverse of state_dict(); the parameter order must be the same as when it was saved."""
        saved = state_dict["optimizers"]
        if len(saved) != len(self.optimizers):
            raise ValueError(f"state_dict has {len(saved)} optimizers, this one has {len(self.optimizers)}")
        for opt, sd in zip(self.optimizers.values(), saved):
            opt.load_state_dict(sd)

    def remove_hooks(self) -> None:
        """Detach from the parameters (backward then leaves gradients in .grad as usual)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
