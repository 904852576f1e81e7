"""The memory tracker for one rank of a DDP or FSDP2 run: DTensors count by the shard this rank holds."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from galore_bench.measure.tracker import PHASE_CATEGORY, MemoryTracker


def local_shard(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor's own shard (its wrapper reports the global size, which this rank does not hold)."""
    return getattr(tensor, "_local_tensor", tensor)


class RankTracker(MemoryTracker):
    """The tracker, counting DTensors (FSDP2 parameters, gradients, states) by their local shard.

    DDP accumulates into its gradient buckets without firing post-accumulate-grad hooks, so with
    `label_grads_before_step` every `.grad` is labelled as the optimizer phase begins.
    """

    def __init__(
        self, round_to: int = 1, device_type: str | None = None, label_grads_before_step: bool = False
    ) -> None:
        super().__init__(round_to=round_to, device_type=device_type)
        self.label_grads_before_step = label_grads_before_step
        self._params: list[torch.nn.Parameter] = []

    def watch_model(self, model: torch.nn.Module) -> None:
        super().watch_model(model)
        self._params = [p for p in model.parameters() if p.requires_grad]

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        if name == "optimizer" and self.label_grads_before_step:
            self.label([p.grad for p in self._params if p.grad is not None], "gradients")
        with super().phase(name):
            yield

    def label(self, tensors: Any, category: str) -> None:
        super().label([local_shard(t) for t in tensors], category)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        out = func(*args, **(kwargs or {}))
        category = PHASE_CATEGORY.get(self._phase, "other")
        for value in torch.utils._pytree.tree_flatten(out)[0]:
            if isinstance(value, torch.Tensor):
                self._add(local_shard(value).untyped_storage(), category)
        return out
