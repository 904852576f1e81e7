"""QLoRA (arXiv 2305.14314): the projections frozen as bitsandbytes 4-bit weights, peft LoRA adapters trained on top.

As peft and bitsandbytes fine-tune: every attention / MLP projection (or the run's target_modules) becomes a
`Linear4bit` (NF4 or FP4, optionally double-quantized absmax, computing in `compute_dtype`); the embeddings, norms
and LM head stay in the model's dtype, frozen with the quantized base; only the adapters train (fp32 by default,
peft's autocast_adapter_dtype). The optimizer is a choice: torch AdamW, or bitsandbytes' 8-bit / paged ones.
bitsandbytes falls back to plain (unpaged) states on CPU, and a paged state on a GPU is ordinary device memory
while resident, so a paged optimizer is counted exactly as its plain twin (the record says so).
"""
from __future__ import annotations

from typing import Any

import torch
from torch._subclasses.fake_tensor import FakeTensor, unset_fake_temporarily

from galore_bench.errors import UserError
from galore_bench.methods.base import MethodDef, Option, Trainer, TrainSettings
from galore_bench.methods.common import adamw_state, adamw_update_temporaries, adamw_whole_update, impl_flags, trainable
from galore_bench.methods.lora import LORA_OPTIONS, frozen_ends, frozen_norm_activations
from galore_bench.methods.terms import (
    BNB_QUANTIZATION_MAPS,
    EstimateTerms,
    ParamShape,
    adam8bit_state,
    blocks,
    model_parameters,
)
from galore_bench.models import DTYPES, HFModel, Model
from galore_bench.models.layout import projections, refuse_experts
from galore_bench.optim.bnb4bit import quantize_projection, weight_tensor_bytes
from galore_bench.optim.relora import lora_config, wrap_lora

OPTIMIZERS = {
    "adamw": "torch.optim.AdamW",
    "adamw8bit": "bitsandbytes.optim.AdamW8bit",
    "paged_adamw8bit": "bitsandbytes.optim.PagedAdamW8bit",
    "paged_adamw32bit": "bitsandbytes.optim.PagedAdamW32bit",
}
PAGED_NOTE = ("paged states are counted as plain ones: bitsandbytes keeps them unpaged on CPU, and on a GPU a "
              "paged state occupies device memory while resident (it is evicted to the host only under pressure)")


def prepare(model: torch.nn.Module, opts: dict[str, Any], train: TrainSettings) -> torch.nn.Module:
    """Quantize each target projection to a bitsandbytes Linear4bit, then wrap it with peft LoRA; everything
    else (embeddings, norms, head) stays frozen in the model dtype."""
    targets = opts.get("target_modules") or None
    refuse_experts(model, "qlora", targets)
    names = projections(model, targets)
    compute = DTYPES[train.dtype if opts["compute_dtype"] == "model" else opts["compute_dtype"]]
    for qualified in names:
        parent_name, _, child = qualified.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, quantize_projection(getattr(parent, child), opts["quant_type"], opts["double_quant"],
                                                   compute))
    # as transformers marks a 4-bit model: peft then wraps each base with its 4-bit LoRA layer
    model.__dict__["is_loaded_in_4bit"] = True
    config = lora_config(opts["rank"], alpha=opts["alpha"], dropout=opts["dropout"], target_modules=names)
    return wrap_lora(model, config, train_non_lora=False, fp32_adapters=opts["adapter_dtype"] == "fp32")


def _bnb_optimizer(name: str, params: list[torch.nn.Parameter], hyper: dict[str, Any]) -> torch.optim.Optimizer:
    import bitsandbytes as bnb

    with unset_fake_temporarily():  # bitsandbytes computes its quantization maps on real tensors
        optimizer = {"adamw8bit": bnb.optim.AdamW8bit, "paged_adamw8bit": bnb.optim.PagedAdamW8bit,
                     "paged_adamw32bit": bnb.optim.PagedAdamW32bit}[name](params, **hyper)
        optimizer.fill_qmap()
    if params and isinstance(params[0], FakeTensor):  # its kernels' fake implementations need fake maps too
        optimizer.name2qmap = {k: params[0].fake_mode.from_tensor(v) for k, v in optimizer.name2qmap.items()}
    return optimizer


def build(model: torch.nn.Module, opts: dict[str, Any], train: TrainSettings) -> Trainer:
    params, name = trainable(model), opts["optimizer"]
    hyper = {"lr": opts["lr"], "weight_decay": opts["weight_decay"]}
    if name == "adamw":
        flags = impl_flags(opts["impl"], params)
        optimizer: torch.optim.Optimizer = torch.optim.AdamW(params, foreach=flags.get("foreach"),
                                                             fused=flags.get("fused"), **hyper)
    else:
        optimizer = _bnb_optimizer(name, params, hyper)
    info = {"optimizer": OPTIMIZERS[name], "adapters": "peft LoRA",
            "base_weights": f"bitsandbytes Linear4bit {opts['quant_type']}"
                            + (" double-quantized" if opts["double_quant"] else ""),
            "quantized_projections": sum(1 for p in model.parameters() if hasattr(p, "quant_state")),
            "lora_layers": sorted({f"{type(m).__module__}.{type(m).__name__}" for m in model.modules()
                                   if hasattr(m, "lora_A")})}
    if name.startswith("paged"):
        info["paged"] = PAGED_NOTE
    return Trainer(model, optimizer, info=info)


# -- estimate terms ----------------------------------------------------------------------------------------------
def layout(shape: Model, opts: dict[str, Any]) -> list[ParamShape]:
    """Each projection a frozen 4-bit weight, one entry per tensor it stores (packed codes, absmax, tables: each
    its own allocation, see optim/bnb4bit.py), beside trainable A and B; everything else frozen in the model dtype.
    A compute dtype other than the model's is refused (peft then casts the adapters to it), and so is Phi-3."""
    if opts.get("compute_dtype", "model") != "model":
        raise UserError("estimate: qlora's closed form covers compute_dtype = \"model\" (peft casts the adapters to "
                        "any other compute dtype); run it in simulate or measure mode")
    if isinstance(shape, HFModel) and shape.model_type == "phi3":
        raise UserError("estimate: qlora's closed form does not cover Phi-3's fused qkv_proj / gate_up_proj (it "
                        "overstates the saved activations by ~2% there); run it in simulate or measure mode")
    r, own = opts.get("rank") or 0, 4 if opts.get("adapter_dtype", "fp32") == "fp32" else 0
    double = opts.get("double_quant", True)

    def matrix(name: str, rows: int, cols: int) -> list[ParamShape]:
        stored = [ParamShape(f"{name}.4bit.{k}", (size,), trainable=False, value_bytes=1)
                  for k, size in enumerate(weight_tensor_bytes(rows * cols, double))]
        return [*stored, ParamShape(name + ".lora_A", (r, cols), itemsize=own),
                ParamShape(name + ".lora_B", (rows, r), itemsize=own)]

    return [p if p.name.endswith((".lora_A", ".lora_B")) or not p.trainable else
            ParamShape(p.name, p.shape, trainable=False, value_bytes=p.value_bytes, itemsize=p.itemsize)
            for p in model_parameters(shape, matrix, opts.get("target_modules") or None)]


def state_bytes(p: ParamShape, opts: dict[str, Any], e: int) -> int:
    """torch AdamW's moments and step; bitsandbytes' 8-bit blockwise moments, or its two fp32 moments."""
    name = opts.get("optimizer", "adamw")
    if name == "adamw":
        return adamw_state(p, opts, e)
    return adam8bit_state(p.numel) if name.endswith("8bit") else 2 * blocks(p.numel * 4)


def quantization_maps(opts: dict[str, Any]) -> int:
    """bitsandbytes' optimizers keep one pair of 256-entry maps (the 32-bit ones too: fill_qmap makes them)."""
    return 0 if opts.get("optimizer", "adamw") == "adamw" else BNB_QUANTIZATION_MAPS


OPTIONS = {
    **LORA_OPTIONS,
    "rank": Option(int, 16, "adapter rank r", minimum=1),
    "alpha": Option(float, 16.0, "LoRA alpha (update scale alpha / r)", minimum=0.0),
    "quant_type": Option(str, "nf4", "4-bit data type of the frozen base: nf4 (QLoRA's NormalFloat) or fp4",
                         choices=("nf4", "fp4")),
    "double_quant": Option(bool, True, "quantize the per-64-value absmax to 8 bits (QLoRA's double quantization)"),
    "compute_dtype": Option(str, "model", "dtype the base matmuls dequantize to (model: the training dtype)",
                            choices=("model", "bf16", "fp16", "fp32")),
    "optimizer": Option(str, "adamw", "adapter optimizer: " + ", ".join(f"{k} ({v})" for k, v in OPTIMIZERS.items())
                        + "; paged ones equal plain ones on CPU", choices=tuple(OPTIMIZERS)),
}

METHOD = MethodDef(
    name="qlora", summary="QLoRA: bitsandbytes 4-bit (NF4/FP4) frozen base, peft LoRA adapters trained",
    build=build, prepare=prepare, options=OPTIONS, uses_rank=True, paper="arXiv 2305.14314",
    estimate=EstimateTerms(state_bytes=state_bytes, update_temporaries=adamw_update_temporaries,
                           whole_update_temporaries=adamw_whole_update, layout=layout,
                           saved_per_layer=frozen_norm_activations, saved_outside_layers=frozen_ends,
                           shared_state_bytes=quantization_maps),
    incompatible=lambda strategy, opts: (
        "bitsandbytes' 4-bit weights are plain packed tensors, not FSDP2's DTensor shards; use strategy ddp"
        if strategy == "fsdp2" else None),
)
