"""Mixed-precision plumbing the optimizers need: an fp32 master copy of low-precision weights, and a loss scaler
that a fake-tensor trace can step through.

Master weights (the DeepSpeed fp16 optimizer's and the LOMO paper's convention): the model keeps BF16/FP16 weights
and gradients; the optimizer holds an fp32 copy of every trainable weight and keeps its own states in fp32.
Each update upcasts *one* gradient at a time, steps that parameter's fp32 copy with the wrapped optimizer and
writes the copy back into the low-precision weight. Upcasting one gradient at a time is a choice: apex's O2
upcasts every gradient first and so holds a full fp32 gradient set (4 bytes per parameter more) during the
update; this way the update's transients are one parameter's.
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch._subclasses.fake_tensor import is_fake

__all__ = ["MasterWeights", "TraceableGradScaler"]


class MasterWeights:
    """Swap a built optimizer's parameters for fp32 copies; `step()` moves gradients over one at a time.

    The wrapped optimizer must skip parameters whose `.grad` is None (every torch.optim optimizer, bitsandbytes'
    and ours do): each of its steps then updates exactly the one copy that has a gradient, so its per-parameter
    state (Adam's step count) advances once per update.
    """

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer
        self.pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
        with torch.no_grad():
            for group in optimizer.param_groups:
                copies = []
                for weight in group["params"]:
                    copy = weight.detach().to(torch.float32, copy=True)
                    self.pairs.append((weight, copy))
                    copies.append(copy)
                group["params"] = copies

    def step(self, step_optimizer: Any = None) -> None:
        """fp32 gradient -> inner step on the fp32 copy -> copy written back; the low-precision gradient is freed."""
        run = step_optimizer if step_optimizer is not None else self.optimizer.step
        for weight, copy in self.pairs:
            if weight.grad is None:
                continue
            copy.grad = weight.grad.to(torch.float32)
            weight.grad = None
            run()
            copy.grad = None
            with torch.no_grad():
                weight.copy_(copy)

    def copies(self) -> Iterator[torch.Tensor]:
        """The fp32 master weights (the 'optimizer_states' category: only the optimizer keeps them)."""
        return (copy for _, copy in self.pairs)


class TraceableGradScaler(torch.amp.GradScaler):
    """torch.amp.GradScaler whose skip-on-overflow check also runs under fake tensors.

    The real scaler reads its found_inf flags with `.item()` to decide whether to step; a fake tensor has no
    value to read, so a trace takes the branch a healthy step takes (no overflow: the optimizer steps). Real
    tensors go through torch's own check unchanged.
    """

    def _maybe_opt_step(self, optimizer: torch.optim.Optimizer, optimizer_state: dict[str, Any],
                        *args: Any, **kwargs: Any) -> float | None:
        flags = list(optimizer_state["found_inf_per_device"].values())
        if flags and all(is_fake(flag) for flag in flags):
            return optimizer.step(*args, **kwargs)
        return super()._maybe_opt_step(optimizer, optimizer_state, *args, **kwargs)
