"""What the peft-based methods share: the projections adapted by default, the adapters' dtype, AdamW over what
trains, and wrapping a model with any peft config.

peft is imported where used: it imports bitsandbytes, which starts CUDA, and the runner's fork server must not.
"""
from __future__ import annotations

from typing import Any

import torch

from galore_bench.methods.base import Option
from galore_bench.methods.common import impl_flags, trainable
from galore_bench.models.layout import projections, refuse_experts

ADAPTER_DTYPE_OPTION = Option(str, "fp32", "the adapters' dtype: fp32 (peft's default, autocast_adapter_dtype: a "
                              "bf16/fp16 model gets fp32 adapters) or model (the model's, as the papers' BF16 runs)",
                              choices=("fp32", "model"))

TRAIN_NON_ADAPTER_OPTION = Option(bool, True, "train the parameters no adapter wraps (embeddings, norms, LM head) "
                                  "as the lora method does (pre-training, GaLore's comparison); false: peft's "
                                  "fine-tuning setting, only what peft makes trainable")


def adamw_of_trainable(model: torch.nn.Module, opts: dict[str, Any]) -> torch.optim.Optimizer:
    """torch AdamW over the parameters that train (the adapters, and the rest when it trains too)."""
    params = trainable(model)
    flags = impl_flags(opts["impl"], params)
    return torch.optim.AdamW(params, lr=opts["lr"], weight_decay=opts["weight_decay"], foreach=flags.get("foreach"),
                             fused=flags.get("fused"))


def adapted_projections(model: torch.nn.Module, opts: dict[str, Any], method: str) -> list[str]:
    """The projections to adapt, by qualified name (all of the decoder layers', or the run's target_modules);
    3-D MoE experts refused unless the targets leave them out."""
    targets = opts.get("target_modules") or None
    refuse_experts(model, method, targets)
    return projections(model, targets)


def wrap_adapters(model: torch.nn.Module, config: Any, *, train_non_adapter: bool,
                  fp32_adapters: bool) -> torch.nn.Module:
    """get_peft_model with any peft config, then, when `train_non_adapter`, every parameter of the original model
    trains again except the weights an adapter layer wraps (its base layer).

    The adapters' own parameters keep whatever peft decided (a variant may freeze some on purpose), and buffers
    (VeRA's shared random projections) stay buffers. `fp32_adapters`: peft's autocast_adapter_dtype.
    """
    import peft
    from peft.tuners.tuners_utils import BaseTunerLayer

    original = {id(p) for p in model.parameters()}
    wrapped = peft.get_peft_model(model, config, autocast_adapter_dtype=fp32_adapters)
    if train_non_adapter:
        wrapped_bases = {id(p) for layer in wrapped.modules() if isinstance(layer, BaseTunerLayer)
                         for p in layer.get_base_layer().parameters()}
        for p in wrapped.parameters():
            if id(p) in original and id(p) not in wrapped_bases:
                p.requires_grad_(True)
    return wrapped
