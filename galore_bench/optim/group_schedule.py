"""An LR schedule for optimizers that are no single torch Optimizer: layer-wise stepping (one optimizer per
parameter, stepped inside backward) and the INT8-weight steppers of Q-GaLore and Q-APOLLO-Mini.

torch's LambdaLR needs one `torch.optim.Optimizer`; a layer-wise run has hundreds, plus (for INT8 weights) a
stepper that is called from a custom backward. The GaLore repository's layer-wise loop keeps one LambdaLR per
parameter and steps each inside its hook; moving every group's rate once after the step, as this does, gives each
parameter the same rate at each step (the hooks of step k all run before step k ends), so a layer-wise run follows
the same warm-up and decay as the plain run it is compared with.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["GroupSchedule"]


class GroupSchedule:
    """LambdaLR's contract over parameter-group dicts: step k runs at each group's first lr x factor(k)."""

    def __init__(self, groups: list[dict[str, Any]], factor: Callable[[int], float]) -> None:
        if not groups or any("lr" not in group for group in groups):
            raise ValueError("GroupSchedule needs parameter groups that each have an 'lr'")
        self.groups, self.factor, self.count = groups, factor, 0
        for group in groups:
            group.setdefault("initial_lr", group["lr"])  # as LambdaLR records it, so a second schedule cannot drift
        self._apply()

    def _apply(self) -> None:
        scale = self.factor(self.count)
        for group in self.groups:
            group["lr"] = group["initial_lr"] * scale

    def step(self) -> None:
        self.count += 1
        self._apply()

    def get_last_lr(self) -> list[float]:
        return [group["lr"] for group in self.groups]
