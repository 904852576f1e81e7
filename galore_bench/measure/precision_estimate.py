"""The estimate's terms for mixed precision and fp32 master weights (methods/precision.py), as closed forms.

An ESTIMATE like the rest of measure/estimate.py, written from what the traced step allocates and checked
against it (tests/test_precision.py).

Autocast (bf16-mixed, fp16-mixed; fp32 weights, c = bytes of the compute dtype), per decoder layer, T tokens:
  - the residual stream stays fp32 (fp32 embedding + each block's c-byte output = fp32), and each RMSNorm saves
    its fp32 input (the residual itself: no copy), 1/rms and the fp32 normalised input (the weight's gradient
    needs it); the norm's fp32 output lives only until the projections have cast it;
  - each projection casts its own input to c bytes (q, k, v, gate and up: five casts, saved by the matmuls;
    Phi-3's fused qkv and gate_up: two; o and down get c-byte inputs already) and its weight and bias (the cast
    is saved for the input's gradient, and autocast's cache holds it until the forward's autocast exits);
  - rotary embedding multiplies by fp32 cos/sin, so rotated q and k are fp32; SDPA casts them back to c bytes
    and saves those, v (c bytes), its output and the fp32 log-sum-exp; k and v as wide as the k/v heads (GQA),
    q and the output as the q heads x head_dim;
  - the MLP saves gate, SiLU(gate), up and their product, all c bytes.
With checkpointing a layer saves only its fp32 input, but the cache still holds every weight cast until the
forward ends, and the recompute in backward makes one layer's casts again.
The LM head casts its weight and its input; the logits are c bytes, then the loss's fp32 copy and log-softmax.

Master weights (bf16-master): the optimizer keeps an fp32 copy of each trainable weight and fp32 states; the
update upcasts one gradient at a time (optim/master.py) and steps that parameter alone, so its transients are
that parameter's fp32 gradient plus the optimizer's own per-parameter temporaries at 4 bytes per value.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from galore_bench.methods.terms import ParamShape, blocks
from galore_bench.models import Model

FP32 = 4


INPUT_READERS = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "qkv_proj", "gate_up_proj")
"""Projections that read a norm's fp32 output: each casts it to c bytes itself (Phi-3's fused ones: two casts)."""


def autocast_activation_bytes(shape: Model, params: list[ParamShape], batch: int, seq: int, c: int,
                              checkpointing: bool, method_per_layer: int, widths: tuple[int, int, int]
                              ) -> dict[str, int]:
    """activation_bytes' keys for a forward under autocast (fp32 weights, c-byte compute), plus `until_loss`:
    what only the forward holds (autocast's weight-cast cache under checkpointing, the final norm's fp32 output
    that the model's output keeps until the loss is computed). `widths`: (q width, k/v width, q heads), grouped-
    query attention and head_dim included; `method_per_layer` carries the method's and the family's own tensors
    (activation_terms.family_layer_bytes: Qwen3's q/k norms, Phi-3's fused slices)."""
    h, i, t = shape.hidden_size, shape.intermediate_size, batch * seq
    q, kv, heads = widths
    norm = blocks(t * h * FP32) + blocks(t * 4) + blocks(t * h * FP32)  # fp32 input (the residual), 1/rms, normed
    # every matrix of a layer (adapters and factors too) and the projections' biases: linear casts both
    layer0 = [p for p in params if p.name.startswith("0.") and (len(p.shape) == 2 or p.name.endswith(".bias"))]
    casts = sum(blocks(p.numel * c) for p in layer0)
    cached = sum(blocks(p.numel * c) for p in layer0 if p.trainable)  # autocast caches casts of trainable leaves
    readers = {p.name.split(".")[1] for p in layer0} & set(INPUT_READERS)
    # LoRA's frozen base matmuls save no cast input; each adapter saves its own cast of the same input instead,
    # except o_proj's adapter: peft upcasts the c-byte attention output to fp32, autocast casts it back (saved)
    adapter_inputs = sum(blocks(t * q * c) for p in layer0 if p.name.endswith("o_proj.lora_A"))
    layer = (2 * norm + len(readers) * blocks(t * h * c)  # the norms; each reader's cast input
             + 2 * blocks(t * q * c) + 2 * blocks(t * kv * c) + blocks(batch * heads * seq * 4)  # q, k, v, out, lse
             + 4 * blocks(t * i * c)  # gate, SiLU(gate), up, their product (down's input)
             + casts + adapter_inputs + method_per_layer)
    head = norm + blocks(t * h * c) + blocks(shape.vocab_size * h * c)  # final norm, the head's cast input, weight
    saved_layers = shape.num_hidden_layers * (blocks(t * h * FP32) if checkpointing else layer)
    return {"layer": layer, "saved_layers": saved_layers, "head": head,
            "head_released": blocks(t * h * c) + blocks(shape.vocab_size * h * c),  # before the head's update
            "logits": blocks(t * shape.vocab_size * c), "logits_fp32": blocks(t * shape.vocab_size * 4),
            "hidden": blocks(t * h * FP32),
            "until_loss": blocks(t * h * FP32) + (shape.num_hidden_layers * cached if checkpointing else 0)}


UpdateTemporaries = Callable[[ParamShape, dict[str, Any], int], int]


def master_update(trainable: list[ParamShape], options: dict[str, Any], per_parameter: UpdateTemporaries,
                  e: int) -> tuple[int, int]:
    """(low-precision gradient already freed, transients) at the fullest moment of a master-weight update.

    Per parameter, two moments: its fp32 gradient is made while its low-precision one (e bytes per value) still
    exists; then that one is freed and the optimizer's own step allocates its temporaries at 4 bytes per value.
    The parameters after it still hold their gradients (exact for the first parameter, an upper bound after it).
    """
    def fullest(p: ParamShape) -> tuple[int, int]:
        own, fp32, step = blocks(p.numel * p.width(e)), blocks(p.numel * FP32), per_parameter(p, options, FP32)
        return (own, fp32 + step) if step > own else (0, fp32)

    return max((fullest(p) for p in trainable), key=lambda pair: pair[1] - pair[0], default=(0, 0))


def master_copy_bytes(trainable: list[ParamShape]) -> int:
    """The fp32 master weights (counted under optimizer_states)."""
    return sum(blocks(p.numel * FP32) for p in trainable)
