"""The estimate's terms for transformers' eager attention (`attn_implementation = "eager"`): scores as tensors.

An ESTIMATE (closed form), checked against the traced step in tests/test_modern_estimate.py. Eager attention
computes the (batch, heads, seq, seq) scores as ordinary tensors: q @ k^T, scaled, plus an additive causal mask,
a softmax upcast to fp32 and cast back, and probabilities @ v. Autograd keeps q, k and v repeated to every query
head (grouped-query attention copies them; matmul copies a non-contiguous v too), the fp32 softmax output and
its cast to the model dtype (one tensor in fp32), and o_proj's input (a copy of the transposed product). At long
sequences these s x s tensors dominate, so the step has two more moments: the last layer's softmax in forward
(every earlier layer saved) and its softmax backward (two fp32 score-sized tensors). With activation
checkpointing the mask stays (a checkpointed input) and the softmax moments come in the recomputed layers.
Without autograd, the softmax is the busiest moment of a layer.
"""
from __future__ import annotations

from galore_bench.methods.terms import Moment, ParamShape, blocks
from galore_bench.models import HFModel

QUERY_SIDE = ("q_proj", "k_proj", "v_proj", "qkv_proj", "input_layernorm", "q_norm", "k_norm")
"""The last layer's parameters whose gradients come after its softmax backward."""


def widths(shape: HFModel) -> tuple[int, int, int, int]:
    """(q width, k/v width, width of k and v as matmul saves them, query heads)."""
    q, kv, heads = shape.num_attention_heads * shape.head_dim, shape.num_key_value_heads * shape.head_dim, \
        shape.num_attention_heads
    return q, kv, q if heads != shape.num_key_value_heads else kv, heads


def scores_bytes(shape: HFModel, batch: int, seq: int, width: int) -> int:
    """One (batch, heads, seq, seq) tensor of `width` bytes per value."""
    return blocks(batch * shape.num_attention_heads * seq * seq * width)


def fused_qkv_bytes(shape: HFModel, tokens: int, e: int) -> int:
    """Phi-3: what holding v, a slice of the fused qkv output, keeps beyond v's own bytes (0 for other families)."""
    if shape.model_type != "phi3":
        return 0
    q, kv, _, _ = widths(shape)
    return blocks(tokens * (q + 2 * kv) * e) - blocks(tokens * kv * e)


def saved_bytes(shape: HFModel, batch: int, seq: int, e: int) -> int:
    """What one layer's eager attention saves: q, k and v as matmul saves them, the probabilities (fp32 and the
    model dtype's cast; one tensor in fp32) and o_proj's input. matmul folds (batch, heads) into one dimension:
    v, a transposed view, folds without a copy only at batch 1, so there (one group) it saves v itself, and
    Phi-3's v holds the fused qkv output."""
    t, (q, _, saved_kv, heads) = batch * seq, widths(shape)
    cast = scores_bytes(shape, batch, seq, e) if e < 4 else 0
    fused = fused_qkv_bytes(shape, t, e) if batch == 1 and heads == shape.num_key_value_heads else 0
    return 2 * blocks(t * q * e) + 2 * blocks(t * saved_kv * e) + scores_bytes(shape, batch, seq, 4) + cast + fused


def softmax_transients(shape: HFModel, batch: int, seq: int, e: int) -> int:
    """At the softmax, beside what the layer saves: the additive (batch, 1, seq, seq) mask, the masked scores
    and their fp32 copy (a 2-byte model), rotated k and v as the layer holds them (Phi-3: v, a slice, holds the
    fused qkv output)."""
    t, (_, kv, _, _) = batch * seq, widths(shape)
    upcast = scores_bytes(shape, batch, seq, 4) if e < 4 else 0
    return (blocks(batch * seq * seq * e) + scores_bytes(shape, batch, seq, e) + upcast + 2 * blocks(t * kv * e)
            + fused_qkv_bytes(shape, t, e))


def inference_softmax_bytes(shape: HFModel, batch: int, seq: int, e: int) -> int:
    """Autograd off, at a layer's softmax: rotated q, k and v repeated (grouped-query attention), the fp32
    probabilities and the softmax's transients."""
    t, (q, _, _, heads) = batch * seq, widths(shape)
    repeated = 2 * blocks(t * q * e) if heads != shape.num_key_value_heads else 0
    return (blocks(t * q * e) + repeated + scores_bytes(shape, batch, seq, 4)
            + softmax_transients(shape, batch, seq, e))


def training_moments(shape: HFModel, params: list[ParamShape], batch: int, seq: int, e: int, act: dict[str, int],
                     carried: int, head_grad: int, pending: int, layerwise: bool,
                     method_query_side: int) -> dict[str, Moment]:
    """The last layer's softmax in forward and in backward, non-checkpointed.

    Forward: every earlier layer saved, the last one's input norm, attention input, q/k norms (Qwen3), q, k, v
    and the softmax's transients beside the residual stream. Backward: the LM head and the last layer's MLP and
    o_proj are done (their gradients held, non-layer-wise), its probabilities' cast and v are freed; the gradient
    reaches the softmax as an fp32 copy beside the softmax's fp32 gradient, with v's and the residual stream's.
    `method_query_side`: what the method's modules save for the last layer's q, k and v projections.
    """
    t, (q, _, saved_kv, _) = batch * seq, widths(shape)
    h, last = shape.hidden_size, shape.num_hidden_layers - 1
    earlier = act["saved_layers"] - act["layer"]
    query_side = act["norm"] + blocks(t * h * e) + act["qk_norms"] + blocks(t * q * e) + blocks(t * saved_kv * e)
    forward = (earlier + query_side + blocks(t * saved_kv * e) + scores_bytes(shape, batch, seq, 4)
               + softmax_transients(shape, batch, seq, e) + act["hidden"])
    done = sum(blocks(p.numel * p.width(e)) for p in params if p.trainable and p.name.startswith(f"{last}.")
               and not any(part in p.name for part in QUERY_SIDE))
    done += sum(blocks(p.numel * p.width(e)) for p in params if p.trainable and p.name == "norm")
    held = 0 if layerwise else done + (head_grad if not pending else 0)
    backward = earlier + query_side + scores_bytes(shape, batch, seq, 4) + method_query_side
    grads_in_flight = 2 * scores_bytes(shape, batch, seq, 4) + blocks(t * saved_kv * e) + 2 * act["hidden"]
    return {"attention_forward": Moment(carried, forward + act["method_per_layer"], 0),
            "attention_backward": Moment(max(carried, held), backward, grads_in_flight + pending)}


def mask_bytes(batch: int, seq: int, e: int) -> int:
    """The additive (batch, 1, seq, seq) causal mask; checkpointing keeps it (every layer's input) to the end."""
    return blocks(batch * seq * seq * e)


def checkpointed_moments(shape: HFModel, batch: int, seq: int, e: int, act: dict[str, int], method_query_side: int,
                         first: Moment, last: Moment | None) -> dict[str, Moment]:
    """Activation checkpointing: the forward runs each layer like inference (nothing saved, the softmax's
    tensors live) beside every checkpoint and the mask; backward recomputes a layer and reaches its softmax
    with the query side saved and the fp32 gradients in flight. `first` / `last`: the recompute moments of the
    last layer (every checkpoint held) and of layer 0 (every later gradient held), whose activations and
    transients are replaced here."""
    t, (q, _, saved_kv, _) = batch * seq, widths(shape)
    h = shape.hidden_size
    query_side = act["norm"] + blocks(t * h * e) + act["qk_norms"] + blocks(t * q * e) + blocks(t * saved_kv * e)
    softmax = query_side + scores_bytes(shape, batch, seq, 4) + method_query_side
    in_flight = 2 * scores_bytes(shape, batch, seq, 4) + blocks(t * saved_kv * e) + 2 * act["hidden"]
    mask = mask_bytes(batch, seq, e)
    forward = act["saved_layers"] + blocks(t * h * e) + inference_softmax_bytes(shape, batch, seq, e)
    moments = {"attention_forward": Moment(0, forward, 0),
               "recompute_softmax": Moment(first.gradients, first.activations + mask, softmax + in_flight
                                           + first.other - act["layer"] - 2 * act["hidden"])}
    if last is not None:
        moments["last_recompute_softmax"] = Moment(last.gradients, last.activations + mask, softmax + in_flight
                                                   + last.other - act["layer"] - 2 * act["hidden"])
    return moments
