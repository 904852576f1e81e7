"""BAdam (Luo et al. 2024, arXiv 2404.02827): block coordinate descent with Adam on one block at a time.

The decoder layers are the blocks. Only the active block trains: every other weight is frozen (no gradient,
no state), and autograd stops below the active layer. The active block gets fp32 master copies and an AdamW
over them (the model itself may be BF16); every `switch_every` steps the next block becomes active, in
ascending, descending or random order (a random order visits every block once before reshuffling), and the
previous block's master copies and Adam states are dropped. Embeddings, the final norm and the LM head are
never trained unless include_embedding / include_lm_head make them blocks (the package's options, off by default).

Our own implementation; it matches the `badam` package 1.4's BlockOptimizer (single device), the oracle
of tests/test_badam.py, in what changes values: master copies made by clone-then-float, gradients cast to
fp32 and the low-precision ones dropped before the AdamW step, weights copied back from the masters, and
the package's schedule: the switch comes after step s when (s + 1) % switch_every == 0, so the first block
trains switch_every - 1 steps and every later one switch_every. Memory differences, stated: we drop the
old block's masters and states *before* making the new block's (the package builds the new masters first,
so for a moment both blocks' exist), we empty the CUDA cache at a switch only (the package does so every
step), and the random order comes from a seeded Python generator (the package draws torch.randperm from
the global RNG, which does not run on fake tensors).
"""
from __future__ import annotations

import random
import re
from collections.abc import Callable, Iterator
from typing import Any

import torch

__all__ = ["SWITCH_MODES", "BlockAdam", "BlockOrder", "blocks_trained", "decoder_blocks"]

SWITCH_MODES = ("ascending", "descending", "random")
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def decoder_blocks(model: torch.nn.Module, include_embedding: bool = False,
                   include_lm_head: bool = False) -> list[list[torch.nn.Parameter]]:
    """The parameters of each decoder layer ('...layers.<i>.'), in layer order. As in the package, the
    embedding may be a block of its own (first), and everything else (final norm, LM head, and the embedding
    when it is not a block) the last block; otherwise those belong to no block and stay frozen."""
    layers: dict[int, list[torch.nn.Parameter]] = {}
    embedding: list[torch.nn.Parameter] = []
    rest: list[torch.nn.Parameter] = []
    for name, param in model.named_parameters():
        match = _LAYER.search(name)
        if match:
            layers.setdefault(int(match.group(1)), []).append(param)
        elif include_embedding and "embed" in name:
            embedding.append(param)
        else:
            rest.append(param)
    blocks = ([embedding] if embedding else []) + [layers[i] for i in sorted(layers)]
    return blocks + ([rest] if include_lm_head and rest else [])


class BlockOrder:
    """Which block follows which: ascending, descending (wrapping around) or random (a seeded shuffle of every block,
    visited once each before the next shuffle). Apart from the optimizer so the estimate can replay a run's order."""

    def __init__(self, n_blocks: int, mode: str, seed: int = 0) -> None:
        self.n_blocks, self.mode = n_blocks, mode
        self._rng = random.Random(seed)
        self._order: list[int] = []

    def first(self, start_block: int | None = None) -> int:
        if start_block is not None:
            return start_block
        if self.mode == "descending":
            return self.n_blocks - 1
        return self._next_random() if self.mode == "random" else 0

    def next(self, current: int) -> int:
        if self.mode == "random":
            return self._next_random()
        return (current + (1 if self.mode == "ascending" else -1)) % self.n_blocks

    def _next_random(self) -> int:
        if not self._order:
            self._order = list(range(self.n_blocks))
            self._rng.shuffle(self._order)
        return self._order.pop()


def switches_after(step: int, switch_every: int) -> bool:
    """Whether (0-based) step `step` ends in a block switch: the package's (global_step + 1) % K == 0, counted after
    the step, so the first block trains K - 1 steps and every later one K."""
    return (step + 2) % switch_every == 0


def blocks_trained(n_blocks: int, mode: str, start_block: int | None, seed: int, switch_every: int,
                   steps: int) -> list[int]:
    """The block active at each of a run's `steps` steps (the switch after the last step trains nothing)."""
    order = BlockOrder(n_blocks, mode, seed)
    active, trained = order.first(start_block), []
    for step in range(steps):
        trained.append(active)
        if switches_after(step, switch_every):
            active = order.next(active)
    return trained


class BlockAdam(torch.optim.Optimizer):
    """Steps an inner optimizer (AdamW) over fp32 masters of the active block; switches blocks by schedule.

    `param_groups` holds one group (every block's weights and the lr), so a torch LR scheduler can drive it;
    the lr is passed to the inner optimizer at each step. Gradient accumulation works (the active weights'
    gradients sum in `.grad` until `step`).
    """

    def __init__(self, model: torch.nn.Module, make_optimizer: Callable[[list[torch.Tensor]], torch.optim.Optimizer],
                 lr: float, switch_every: int = 50, switch_mode: str = "ascending", start_block: int | None = None,
                 seed: int = 0, include_embedding: bool = False, include_lm_head: bool = False) -> None:
        self.blocks = decoder_blocks(model, include_embedding, include_lm_head)
        if not self.blocks:
            raise ValueError("BAdam found no decoder layers ('...layers.<i>.' parameters) to use as blocks")
        if switch_every < 1 or switch_mode not in SWITCH_MODES:
            raise ValueError(f"switch_every must be >= 1 and switch_mode one of {SWITCH_MODES}, got "
                             f"{switch_every} and {switch_mode!r}")
        if start_block is not None and not 0 <= start_block < len(self.blocks):
            raise ValueError(f"start_block must lie in [0, {len(self.blocks) - 1}], got {start_block}")
        super().__init__([p for block in self.blocks for p in block], {"lr": lr})
        self.model_params = list(model.parameters())
        self.make_optimizer = make_optimizer
        self.switch_every = switch_every
        self.switch_mode = switch_mode
        self.global_step = 0
        self.order = BlockOrder(len(self.blocks), switch_mode, seed)
        self.active_block = self.order.first(start_block)
        self.visited = [self.active_block]
        self.masters: list[torch.Tensor] = []
        self.inner: torch.optim.Optimizer | None = None
        self._activate()

    def _activate(self) -> None:
        """Freeze everything but the active block; give that block fp32 masters and a fresh inner optimizer."""
        active = {id(p) for p in self.blocks[self.active_block]}
        for p in self.model_params:
            p.requires_grad_(id(p) in active)
            if id(p) not in active:
                p.grad = None
        self.masters = [p.detach().clone().float().requires_grad_(True) for p in self.blocks[self.active_block]]
        self.inner = self.make_optimizer(self.masters)

    def switch(self) -> None:
        """The next block becomes active; the old block's masters and states go first."""
        self.inner, self.masters = None, []
        self.active_block = self.order.next(self.active_block)
        self.visited.append(self.active_block)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        self._activate()

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        if closure is not None:
            raise ValueError("BlockAdam.step takes no closure")
        assert self.inner is not None
        weights = self.blocks[self.active_block]
        for weight, master in zip(weights, self.masters):
            if weight.grad is None:
                raise RuntimeError("BAdam: an active weight got no gradient (is it used in the forward?)")
            master.grad = weight.grad.float()  # the gradient itself when it is fp32
            weight.grad = None
        for group in self.inner.param_groups:
            group["lr"] = self.param_groups[0]["lr"]
        self.inner.step()
        for weight, master in zip(weights, self.masters):
            weight.copy_(master.to(weight.dtype))
            master.grad = None
        if switches_after(self.global_step, self.switch_every):
            self.switch()
        self.global_step += 1
        return None

    def state_tensors(self) -> Iterator[torch.Tensor]:
        """What is kept between steps: the active block's masters and its inner optimizer's state."""
        yield from self.masters
        if self.inner is not None:
            for state in self.inner.state.values():
                yield from (v for v in state.values() if isinstance(v, torch.Tensor))
