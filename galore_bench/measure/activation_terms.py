"""What a decoder layer saves for backward, as the estimate counts it (an ESTIMATE: closed forms of the shape, checked
against simulate's trace by the tests of measure/estimate.py). Split from estimate.py, which combines these terms
with the method's into the step's moments; precision_estimate.py reuses the family extras under autocast."""
from __future__ import annotations

from galore_bench.measure import eager_attention
from galore_bench.methods.terms import blocks
from galore_bench.models import HFModel, Model


def attention_widths(shape: Model) -> tuple[int, int, int]:
    """(q width, k/v width, q heads) of a layer: grouped-query attention shrinks k and v, head_dim sets both."""
    if isinstance(shape, HFModel):
        return (shape.num_attention_heads * shape.head_dim, shape.num_key_value_heads * shape.head_dim,
                shape.num_attention_heads)
    return shape.hidden_size, shape.hidden_size, shape.num_attention_heads


def family_layer_bytes(shape: Model, t: int, e: int) -> int:
    """What a layer of Qwen3 or Phi-3 saves beyond LLaMA's, for T tokens computed in e bytes per value (the
    same under autocast, e = the compute dtype: these tensors come out of c-byte matmuls)."""
    if not isinstance(shape, HFModel):
        return 0
    q, kv, heads = attention_widths(shape)
    if shape.model_type == "qwen3":  # q and k RMS-normed per head, as a norm saves
        kv_heads = shape.num_key_value_heads
        return (blocks(t * q * 4) + blocks(t * heads * 4) + blocks(t * q * e)
                + blocks(t * kv * 4) + blocks(t * kv_heads * 4) + blocks(t * kv * e))
    if shape.model_type == "phi3":
        # v is a slice of the fused qkv output, so saving v keeps all of it; q, rotated from a slice, comes out
        # (b, heads, s, d)-contiguous, and so does sdpa's output: o_proj's input is a copy (a view in LLaMA)
        return blocks(t * (q + 2 * kv) * e) - blocks(t * kv * e) + blocks(t * q * e)
    return 0


def autocast_unmodelled(shape: Model, checkpointing: bool) -> str | None:
    """Why the autocast closed form does not describe this model and setting, or None. Measured with
    checkpointing on shrunken Llama-3.2 and Qwen3 configs against simulate: a tied embedding peaks 6% above the
    closed form at backward's last add (the head's fp32 gradient, held by autograd since the head, plus the
    lookup's, into their sum: three vocab x hidden tensors), a moment it lacks; Qwen3 with LoRA is 2.5% over."""
    if not checkpointing or not isinstance(shape, HFModel):
        return None
    if shape.tie_word_embeddings:
        return "tied embeddings with activation checkpointing (the last layer's recompute under autocast)"
    if shape.model_type == "qwen3":
        return "Qwen3's q/k norms with activation checkpointing (the recompute under autocast)"
    return None


def activation_bytes(shape: Model, batch: int, seq: int, e: int, checkpointing: bool,
                     method_per_layer: int = 0) -> dict[str, int]:
    """What autograd saves, per decoder layer and for the final norm and LM head.

    Per layer, T = batch x seq tokens: each RMSNorm saves its fp32 input, 1/rms and its output (4+4/h+e
    bytes per element); the attention and MLP blocks each save their input once more as the 2-D matrix the
    projections multiply; SDPA saves q, k, v, its output and the log-sum-exp; the MLP saves gate, SiLU(gate),
    up and the down projection's input. `method_per_layer`: what the method's modules save besides
    (LoRA / low-rank: each rank-r intermediate).
    """
    h, i, t = shape.hidden_size, shape.intermediate_size, batch * seq
    q, kv, heads = attention_widths(shape)
    norm = blocks(t * h * 4) + blocks(t * 4) + blocks(t * h * e)
    layer = (2 * norm + 2 * blocks(t * h * e) + blocks(t * i * e)  # norms, the projections' 2-D inputs
             + 3 * blocks(t * i * e))  # gate, SiLU(gate), up
    eager = isinstance(shape, HFModel) and shape.attn_implementation == "eager"
    if eager and isinstance(shape, HFModel):
        layer += eager_attention.saved_bytes(shape, batch, seq, e)
    else:
        layer += 2 * blocks(t * q * e) + 2 * blocks(t * kv * e) + blocks(batch * heads * seq * 4)  # q, k, v, out, lse
    qk_norms = family_layer_bytes(shape, t, e) if isinstance(shape, HFModel) and shape.model_type == "qwen3" else 0
    # Phi-3's fused-qkv extras are sdpa's; eager attention's matmul saves its own copy of v and o_proj's input
    layer += qk_norms if eager else family_layer_bytes(shape, t, e)
    layer += method_per_layer
    head = norm + blocks(t * h * e)  # final norm, LM head input
    saved_layers = shape.num_hidden_layers * (blocks(t * h * e) if checkpointing else layer)
    return {"layer": layer, "saved_layers": saved_layers, "head": head,
            "logits": blocks(t * shape.vocab_size * e), "logits_fp32": blocks(t * shape.vocab_size * 4),
            "hidden": blocks(t * h * e), "norm": norm, "qk_norms": qk_norms,
            "method_per_layer": method_per_layer}
