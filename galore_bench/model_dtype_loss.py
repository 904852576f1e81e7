"""The causal-LM loss as the LOMO paper's code computed it: cross-entropy on the model-dtype logits, no fp32 copy.

Why: LOMO Table 1 (arXiv 2306.09782) was measured with the authors' trainer (OpenLMLab/LOMO, lomo/src/
lomo_trainer.py and utils.get_loss, June 2023) on the transformers of its time. That trainer calls the model
without labels and computes the loss itself: it drops the last position of the logits by a contiguous copy and
runs torch's cross-entropy on that copy in the model's dtype (fp16). transformers up to 4.30 returned the LM
head's output as is; 4.31 (July 2023) added `logits = logits.float()` to LLaMA, and today's loss function
upcasts too, so today's full path holds an fp32 copy of the logits and an fp32 log-softmax where the paper's
held a model-dtype copy and a model-dtype log-softmax.

Bytes, T tokens in B sequences, V vocabulary, e bytes per model-dtype value, S = (T - B) shifted positions:
forward holds the logits (T x V x e), their shifted copy and its log-softmax (S x V x e each) at once; the
log-softmax is saved for backward. Against transformers' path (T x V x (e + 8)) that is about 2 x T x V bytes
less at e = 2 and the same at e = 4.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def model_dtype_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of (B, S, V) `logits` against (B, S) `labels`, in the logits' dtype.

    Position i predicts label i + 1: the logits lose their last position (a contiguous copy, as the paper's
    code makes) and the labels their first; -100 labels are ignored (torch's default ignore_index).
    """
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"labels: shape {tuple(labels.shape)} does not match logits {tuple(logits.shape)} "
                         "without their last dimension")
    shifted = logits[:, :-1, :].contiguous()
    targets = labels[:, 1:].reshape(-1)
    return F.cross_entropy(shifted.view(-1, shifted.shape[-1]), targets)
