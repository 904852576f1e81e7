"""The estimate's loss path: what the LM head and the cross-entropy hold at the step's two loss moments.

An ESTIMATE (closed form), checked against the traced step in tests/test_chunked_loss.py and
tests/test_model_dtype_loss.py. Three paths:
  full     transformers' loss: every token's logits in the model dtype, their fp32 upcast and the fp32
           log-softmax in forward; backward holds that log-softmax and its two fp32 gradients (nll's and
           log-softmax's). T x V x (e + 8) bytes at its largest.
  chunked  chunked_loss.py: per-token bookkeeping (shifted targets and their in-range copy as int64, a
           validity mask, fp32 log-sum-exp and per-token losses) and one chunk's model-dtype logits beside
           their fp32 copy; backward holds the hidden-state and weight gradients for the whole loop, plus
           one chunk's recomputed logits and their gradient.
  model-dtype  model_dtype_loss.py (the LOMO paper's code): the logits, their shifted copy (S = T - sequences
           positions) and its log-softmax, all in the model dtype; backward holds that log-softmax, nll's gradient
           and log-softmax's gradient, S x V x e bytes each. T x V x 3e bytes at its largest.
"""
from __future__ import annotations

from dataclasses import dataclass

from galore_bench.methods.terms import blocks
from galore_bench.models import Model


@dataclass(frozen=True, slots=True)
class LossPath:
    """Bytes beyond the saved activations at the loss's forward peak and during its backward."""

    forward: int
    """Activations the loss's forward adds at its largest (model-dtype logits, fp32 copies, bookkeeping)."""
    backward_activations: int
    """What the loss keeps for its backward (full: the fp32 log-softmax; chunked: per-token bookkeeping)."""
    backward_other: int
    """Transients of the loss's backward (full: two fp32 logits-sized gradients; chunked: the hidden-state and
    LM-head weight gradients and one chunk's logits and gradient)."""


def chunk_logits_bytes(chunk: int, vocab: int, e: int) -> int:
    """One chunk's logits as the model-dtype product and its fp32 copy, both live at the upcast (fp32: one)."""
    return blocks(chunk * vocab * e) + (blocks(chunk * vocab * 4) if e < 4 else 0)


def loss_path(shape: Model, tokens: int, e: int, loss: str = "full", chunk_tokens: int = 1024,
              head_trainable: bool = True, sequences: int = 1) -> LossPath:
    """The loss path's bytes for `tokens` tokens in `sequences` sequences per micro-batch in a dtype of `e` bytes
    per value (`head_trainable`: whether the chunked backward builds the LM head's weight gradient)."""
    v, h = shape.vocab_size, shape.hidden_size
    if loss == "model-dtype":
        shifted = blocks((tokens - sequences) * v * e)
        return LossPath(forward=blocks(tokens * v * e) + 2 * shifted, backward_activations=shifted,
                        backward_other=2 * shifted)
    if loss == "full":
        logits, fp32 = blocks(tokens * v * e), blocks(tokens * v * 4)
        return LossPath(forward=(logits if e < 4 else 0) + 2 * fp32, backward_activations=fp32,
                        backward_other=2 * fp32)
    chunk = min(chunk_tokens, tokens)
    kept = blocks(tokens * 8) + blocks(tokens) + blocks(tokens * 4)  # in-range targets, mask, log-sum-exp
    transient = blocks(tokens * 8) + blocks(tokens * 4)  # the shifted targets, the per-token losses
    per_chunk = chunk_logits_bytes(chunk, v, e)
    # fp32: the chunk's gradient is its logits, and a chunk-long fp32 vector (the -1s, the row scales) sits beside it
    backward_chunk = per_chunk + (blocks(chunk * 4) if e == 4 else 0)
    return LossPath(forward=kept + transient + per_chunk, backward_activations=kept,
                    backward_other=blocks(tokens * h * e) + (blocks(v * h * e) if head_trainable else 0)
                    + backward_chunk)
