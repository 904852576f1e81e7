"""torchao's AdamW8bit and AdamW4bit (the HF Trainer's `adamw_torch_8bit` / `adamw_torch_4bit`) as real optimizers.

measure runs torchao's own compiled step; simulate creates the same state tensors with torchao's own code on
fake tensors and skips the arithmetic (optim/torchao_lowbit.py says why). Either way the states are counted at
their true size, by the rule each record states (`implementation.state_rule`), which `estimate` also uses.
"""
from __future__ import annotations

from collections.abc import Iterator
from functools import partial
from typing import Any

import torch

from galore_bench.methods.base import MethodDef, Trainer, TrainSettings
from galore_bench.methods.common import ADAM_OPTIONS, layerwise_or_plain, trainable
from galore_bench.methods.terms import EstimateTerms, ParamShape, blocks
from galore_bench.optim.torchao_lowbit import BLOCK_SIZES, MIN_QUANTIZED_SIZE, QMAP_ENTRIES, lowbit_adamw

SCALAR = blocks(4)
"""An fp32 scalar: torchao's per-parameter `step` counter, and its per-group learning rate (kept as a tensor)."""


def state_rule(bits: int) -> str:
    block, qmap = BLOCK_SIZES[bits], QMAP_ENTRIES[bits]
    codes = "1 byte" if bits == 8 else "1/2 byte (two 4-bit codes per uint8)"
    return (f"per parameter: an fp32 step scalar and two moments; a moment is quantized when the parameter has "
            f">= {MIN_QUANTIZED_SIZE} values and a multiple of {block}: {codes} per value + one fp32 scale per "
            f"{block} values + its own {qmap}-entry fp32 quantization map; otherwise a plain tensor in the "
            f"parameter's dtype. Plus one fp32 learning-rate scalar per parameter group.")


UNTRACED = ("not counted: torchao's update is one torch.compile'd kernel per parameter, run with the tracker "
            "suspended (a compiled graph refuses a dispatch mode; fake tensors cannot run it)")


class LowBitTrainer(Trainer):
    """torchao keeps each group's learning rate as a tensor: it is optimizer state too."""

    def state_tensors(self) -> Iterator[torch.Tensor]:
        yield from super().state_tensors()
        for group in self.optimizer.param_groups:
            if isinstance(group["lr"], torch.Tensor):
                yield group["lr"]


def build(model: torch.nn.Module, opts: dict[str, Any], train: TrainSettings, bits: int) -> Trainer:
    hyper = {"lr": opts["lr"], "weight_decay": opts["weight_decay"], "betas": (opts["beta1"], opts["beta2"]),
             "eps": opts["eps"]}
    info = {"optimizer": f"torchao.optim.AdamW{bits}bit", "state_rule": state_rule(bits),
            "update_transients": UNTRACED}
    return layerwise_or_plain(model, [{"params": trainable(model)}], lambda groups: lowbit_adamw(bits, groups, **hyper),
                              opts, info, trainer=LowBitTrainer)


def moment_bytes(numel: int, e: int, bits: int) -> int:
    """One moment as torchao allocates it (see `state_rule`)."""
    block = BLOCK_SIZES[bits]
    if numel < MIN_QUANTIZED_SIZE or numel % block:
        return blocks(numel * e)
    return blocks(numel * bits // 8) + blocks(numel // block * 4) + blocks(QMAP_ENTRIES[bits] * 4)


def state_bytes(p: ParamShape, opts: dict[str, Any], e: int, bits: int) -> int:
    """Two moments and the step scalar; layer-wise, each parameter's own optimizer has its own lr scalar."""
    return 2 * moment_bytes(p.numel, e, bits) + SCALAR + (SCALAR if opts.get("layerwise") else 0)


def _method(bits: int) -> MethodDef:
    return MethodDef(
        name=f"torchao_adamw{bits}bit",
        summary=f"torchao AdamW{bits}bit: blockwise {bits}-bit Adam states (torch.compile'd step)",
        build=partial(build, bits=bits),
        options=ADAM_OPTIONS,
        paper="arXiv 2309.01507 (4-bit states)" if bits == 4 else "arXiv 2110.02861 (8-bit states)",
        estimate=EstimateTerms(state_bytes=partial(state_bytes, bits=bits),
                               shared_state_bytes=lambda opts: 0 if opts.get("layerwise") else SCALAR),
        incompatible=lambda strategy, opts: (
            "the traced step models plain tensors, not FSDP2's DTensor shards; use strategy ddp"
            if strategy == "fsdp2" else None),
    )


METHOD_8BIT = _method(8)
METHOD_4BIT = _method(4)
