"""BAdam (arXiv 2404.02827): one decoder layer trains at a time, AdamW over its fp32 masters, switching
every K steps; embeddings, final norm and LM head stay frozen unless made blocks (include_embedding,
include_lm_head).

What a short simulate trace sees is the starting block's steps. Memory depends on the block: autograd saves
activations for the active layer and for every layer above it (their input gradients lead down to it), none
below. The default order, ascending, starts at layer 0, the block with the most saved: the run's peak.
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from galore_bench.methods.base import MethodDef, Option, Trainer, TrainSettings
from galore_bench.methods.common import ADAM_OPTIONS, IMPL_OPTION, impl_flags, trainable
from galore_bench.optim.badam import SWITCH_MODES, BlockAdam


class BAdamTrainer(Trainer):
    def state_tensors(self) -> Iterator[torch.Tensor]:
        return self.optimizer.state_tensors()


def build(model: torch.nn.Module, opts: dict[str, Any], train: TrainSettings) -> Trainer:
    flags = impl_flags(opts["impl"], trainable(model))
    hyper = dict(lr=opts["lr"], weight_decay=opts["weight_decay"], betas=(opts["beta1"], opts["beta2"]),
                 eps=opts["eps"], **flags)

    def make(masters: list[torch.Tensor]) -> torch.optim.Optimizer:
        return torch.optim.AdamW(masters, **hyper)

    start = opts["start_block"] if opts["start_block"] >= 0 else None
    optimizer = BlockAdam(model, make, lr=opts["lr"], switch_every=opts["switch_every"],
                          switch_mode=opts["switch_mode"], start_block=start, seed=train.seed,
                          include_embedding=opts["include_embedding"], include_lm_head=opts["include_lm_head"])
    info = {"optimizer": "galore_bench.optim.badam.BlockAdam (torch.optim.AdamW on fp32 masters)",
            "impl": next((k for k, v in flags.items() if v), "for-loop"), "blocks": len(optimizer.blocks),
            "start_block": optimizer.active_block}
    return BAdamTrainer(model, optimizer, info=info)


def switch_steps(opts: dict[str, Any], steps: int) -> dict[str, set[int]]:
    """Steps (0-based) that end in a block switch (new masters, a fresh AdamW): the package's schedule."""
    return {"block_switch": {i for i in range(1, steps) if (i + 2) % opts["switch_every"] == 0}}


def incompatible(strategy: str, opts: dict[str, Any]) -> str | None:
    return (f"BAdam changes which weights train at every block switch, but {strategy} fixes the set it reduces "
            "when it wraps the model (the badam package supports DeepSpeed ZeRO-3 for this)")


METHOD = MethodDef(
    name="badam",
    summary="BAdam: block coordinate descent, AdamW on one decoder layer's fp32 masters at a time",
    build=build,
    options={
        **{k: v for k, v in ADAM_OPTIONS.items() if k != "layerwise"},
        "impl": IMPL_OPTION,
        "switch_every": Option(int, 50, "K: steps per block (the first block gets K - 1, as in the badam package)",
                               minimum=1),
        "switch_mode": Option(str, "ascending", "block order (ascending: LLaMA-Factory's default; the package's "
                              "is descending)", choices=SWITCH_MODES),
        "start_block": Option(int, -1, "first block; -1: the order's own (0 ascending, the last descending)",
                              minimum=-1),
        "include_embedding": Option(bool, False, "the embedding is a block of its own (the first)"),
        "include_lm_head": Option(bool, False, "final norm and LM head (and the embedding, if not a block of its "
                                  "own) are the last block"),
    },
    paper="arXiv 2404.02827",
    no_estimate_reason=("the activations depend on the active block: layers above it save what their input "
                        "gradients need, a frozen-layer case the estimate's activation model does not have"),
    periodic_steps=switch_steps,
    incompatible=incompatible,
)
