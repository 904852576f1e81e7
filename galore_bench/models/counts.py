"""The parameter count of a dense decoder written from its config alone: the check on the built model's count.

Per layer: q (heads x head_dim rows), k and v (kv_heads x head_dim rows), o, a gated MLP (gate, up, down), the
norms (two; Gemma-2 four), Qwen3's q/k norms (head_dim each); biases where the family puts them; the embedding,
the final norm, and an LM head unless tied. MoE families have no closed form here (None).
"""
from __future__ import annotations

from galore_bench.models.hf import HFModel

NORMS_PER_LAYER = {"llama": 2, "mistral": 2, "qwen2": 2, "qwen3": 2, "phi3": 2, "gemma2": 4}


def _attention_biases(shape: HFModel) -> tuple[bool, bool]:
    """(q/k/v have a bias, o has a bias) in this family."""
    if shape.model_type == "qwen2":  # Qwen2 always biases q, k, v and never o
        return True, False
    both = bool(getattr(shape.settings, "attention_bias", False))
    return both, both


def closed_form_parameters(shape: HFModel) -> int | None:
    """Parameters of a dense decoder from its config, or None for a family this formula does not describe."""
    if shape.model_type not in NORMS_PER_LAYER:
        return None
    h, i, d, v = shape.hidden_size, shape.intermediate_size, shape.head_dim, shape.vocab_size
    q, kv = shape.num_attention_heads * d, shape.num_key_value_heads * d
    qkv_bias, o_bias = _attention_biases(shape)
    mlp_bias = bool(getattr(shape.settings, "mlp_bias", False))
    attention = h * (q + 2 * kv) + q * h + (q + 2 * kv) * qkv_bias + h * o_bias
    mlp = 3 * h * i + (2 * i + h) * mlp_bias
    norms = NORMS_PER_LAYER[shape.model_type] * h + (2 * d if shape.model_type == "qwen3" else 0)
    embeddings = v * h * (1 if shape.tie_word_embeddings else 2)
    return embeddings + h + shape.num_hidden_layers * (attention + mlp + norms)
