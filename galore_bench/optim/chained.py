"""Two (or more) torch optimizers over disjoint parameters, stepped as one (Muon on the hidden matrices, AdamW on
the rest): one object for the training loop, the memory tracker and an lr scheduler."""
from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch

__all__ = ["ChainedOptimizer"]


class _MergedState(Mapping[torch.Tensor, dict[str, Any]]):
    """Live read-only view param -> state over the inner optimizers (a ChainMap would not do: looking a
    parameter up in a torch optimizer's defaultdict state that does not own it adds an empty entry there)."""

    def __init__(self, optimizers: tuple[torch.optim.Optimizer, ...]) -> None:
        self._optimizers = optimizers

    def __getitem__(self, param: torch.Tensor) -> dict[str, Any]:
        for opt in self._optimizers:
            if param in opt.state:
                return opt.state[param]
        raise KeyError("parameter has no optimizer state")

    def __iter__(self) -> Iterator[torch.Tensor]:
        return (p for opt in self._optimizers for p in opt.state)

    def __len__(self) -> int:
        return sum(len(opt.state) for opt in self._optimizers)


class ChainedOptimizer(torch.optim.Optimizer):
    """Steps each inner optimizer in turn. `param_groups` lists the inner optimizers' own group dicts, so a
    scheduler that sets 'lr' on them reaches both; `state` is a live merged view of their states."""

    def __init__(self, *optimizers: torch.optim.Optimizer) -> None:
        params = [p for opt in optimizers for group in opt.param_groups for p in group["params"]]
        if len(set(map(id, params))) != len(params):
            raise ValueError("ChainedOptimizer: a parameter belongs to more than one inner optimizer")
        super().__init__(params, {})
        self.optimizers = optimizers
        self.param_groups = [group for opt in optimizers for group in opt.param_groups]
        self.state = _MergedState(optimizers)  # type: ignore[assignment]

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for opt in self.optimizers:
            opt.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)
