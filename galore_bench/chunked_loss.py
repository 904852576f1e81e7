"""A chunked cross-entropy for causal LMs: the LM head and the loss over a few tokens at a time.

Why: at a 128k-262k vocabulary the loss path is the largest temporary of a training step. transformers
computes the logits of every token (T x V in the model dtype), upcasts them to fp32, and keeps the fp32
log-softmax for backward, whose gradient is two more T x V fp32 tensors: about 7.8 GiB for an 8B model with
a 128256-token vocabulary at 8k tokens. Here the logits exist for `chunk_tokens` tokens at a time, in forward
AND backward: the forward keeps only each token's log-sum-exp (T fp32 values); backward recomputes each
chunk's logits from the saved hidden states and the head weight, turns them into the gradient in place,
and multiplies it into the hidden-state and weight gradients before the next chunk.

The trade: the loss-path temporaries fall from T x V x (e + 8) bytes (e = bytes per model-dtype value;
the full path's peak is the fp32 log-softmax and its two fp32 gradients beside the logits) to
chunk_tokens x V x (e + 4), plus T x 25 bytes of per-token bookkeeping; the weight gradient (V x H) and the
hidden-state gradient (T x H) exist for the whole loss backward instead of after it. The time: the head's
matmul runs once more (recomputed in backward: +2·T·H·V FLOPs, a third more head FLOPs), and a chunk's
weight gradient is accumulated in the weight's dtype (bf16 rounding once per chunk, not once in all).

Use it directly (`chunked_cross_entropy(hidden, head.weight, labels)`) or around a transformers model:
`with chunked_loss(model): loss = model(input_ids=ids, labels=ids).loss`; inside the block the model's
`.logits` hold the final hidden states, not logits.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from transformers import PreTrainedModel

DEFAULT_CHUNK_TOKENS = 1024
"""Tokens per chunk: at a 128256-token vocabulary one fp32 chunk of logits is 0.49 GiB."""
IGNORE_INDEX = -100  # transformers' (and torch's) label for "no loss at this position"


def _chunk_logits(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """fp32 logits of one chunk (the model-dtype product is freed as soon as its fp32 copy exists)."""
    return (hidden @ weight.t()).float()


class _LinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of `hidden @ weight.T` against `targets`, chunk by chunk in forward and backward."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,  # type: ignore[override]
                chunk_tokens: int, ignore_index: int, divisor: torch.Tensor | None) -> torch.Tensor:
        valid = targets != ignore_index
        safe = torch.where(valid, targets, 0)  # gather needs an index in range; ignored rows are masked out
        lse = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        losses = torch.empty_like(lse)
        for start in range(0, hidden.shape[0], chunk_tokens):
            stop = min(start + chunk_tokens, hidden.shape[0])
            logits = _chunk_logits(hidden[start:stop], weight)
            target_logit = logits.gather(1, safe[start:stop, None])[:, 0]
            row_max = logits.amax(1, keepdim=True)
            logits.sub_(row_max).exp_()  # in place: no second chunk-sized tensor
            lse[start:stop] = logits.sum(1).log_().add_(row_max[:, 0])
            losses[start:stop] = lse[start:stop] - target_logit
            del logits
        count = valid.sum() if divisor is None else divisor
        loss = losses.mul_(valid).sum() / count
        ctx.save_for_backward(hidden, weight, safe, valid, lse, count)
        ctx.chunk_tokens = chunk_tokens
        return loss

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        hidden, weight, safe, valid, lse, count = ctx.saved_tensors
        want_hidden, want_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_hidden = torch.empty_like(hidden) if want_hidden else None
        grad_weight = torch.zeros_like(weight) if want_weight else None
        scale = grad_loss.float() / count
        for start in range(0, hidden.shape[0], ctx.chunk_tokens):
            stop = min(start + ctx.chunk_tokens, hidden.shape[0])
            grad = _chunk_logits(hidden[start:stop], weight)
            grad.sub_(lse[start:stop, None]).exp_()  # softmax, in place
            grad.scatter_add_(1, safe[start:stop, None], torch.full_like(lse[start:stop, None], -1.0))
            grad.mul_((valid[start:stop] * scale)[:, None])  # d loss / d logits; zero on ignored rows
            grad_in_dtype = grad.to(weight.dtype)
            del grad
            if grad_hidden is not None:
                torch.mm(grad_in_dtype, weight, out=grad_hidden[start:stop])
            if grad_weight is not None:
                grad_weight.addmm_(grad_in_dtype.t(), hidden[start:stop])
            del grad_in_dtype
        return grad_hidden, grad_weight, None, None, None, None


def chunked_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                          chunk_tokens: int = DEFAULT_CHUNK_TOKENS, ignore_index: int = IGNORE_INDEX,
                          shift: bool = True, num_items_in_batch: torch.Tensor | int | None = None) -> torch.Tensor:
    """The causal-LM loss transformers computes, without ever holding every token's logits.

    `hidden`: final hidden states (..., H) (after the final norm); `weight`: the LM head's (V, H) weight,
    tied to the embeddings or not; `labels`: (...) token ids, `ignore_index` where no loss is wanted.
    `shift`: labels are the inputs (position i predicts label i+1, the last position predicts nothing), as
    `model(input_ids=ids, labels=ids)`; False when they are already aligned with `hidden`. Returns the mean
    over counted tokens, or the sum divided by `num_items_in_batch` when given (transformers' convention).
    """
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens: got {chunk_tokens}, allowed an int >= 1")
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(f"labels: shape {tuple(labels.shape)} does not match hidden states "
                         f"{tuple(hidden.shape)} without their last dimension")
    targets = labels
    if shift:
        targets = torch.full_like(labels, ignore_index)
        targets[..., :-1] = labels[..., 1:]
    divisor = None
    if num_items_in_batch is not None:
        divisor = torch.as_tensor(num_items_in_batch, dtype=torch.float32, device=hidden.device)
    return _LinearCrossEntropy.apply(hidden.reshape(-1, hidden.shape[-1]), weight, targets.reshape(-1),
                                     chunk_tokens, ignore_index, divisor)


def _causal_lm(model: torch.nn.Module) -> Any:
    """The transformers model inside `model` (PEFT and DDP wrappers included) that owns the LM head."""
    for module in model.modules():
        if isinstance(module, PreTrainedModel) and module.get_output_embeddings() is not None:
            return module
    raise ValueError(f"{type(model).__name__}: no transformers causal LM with an LM head inside")


def _passthrough(hidden: torch.Tensor) -> torch.Tensor:
    return hidden


@contextlib.contextmanager
def chunked_loss(model: torch.nn.Module, chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> Iterator[None]:
    """Inside the block, `model(..., labels=...).loss` is `chunked_cross_entropy` and no full logits exist.

    The LM head returns its input (so `.logits` holds the final hidden states) and the model's loss function
    multiplies them by the head's weight chunk by chunk. Backward may run after the block: the loss keeps
    what it needs. The head must be a plain bias-free linear layer (every LLaMA-family model's is).
    """
    causal = _causal_lm(model)
    head = causal.get_output_embeddings()
    if getattr(head, "bias", None) is not None or not isinstance(getattr(head, "weight", None), torch.Tensor):
        raise ValueError(f"{type(causal).__name__}: chunked loss needs a bias-free linear LM head")

    def loss_function(logits: torch.Tensor, labels: torch.Tensor, vocab_size: int,
                      num_items_in_batch: torch.Tensor | int | None = None, ignore_index: int = IGNORE_INDEX,
                      shift_labels: torch.Tensor | None = None, **_: Any) -> torch.Tensor:
        if shift_labels is not None:
            return chunked_cross_entropy(logits, head.weight, shift_labels, chunk_tokens=chunk_tokens,
                                         ignore_index=ignore_index, shift=False,
                                         num_items_in_batch=num_items_in_batch)
        return chunked_cross_entropy(logits, head.weight, labels, chunk_tokens=chunk_tokens,
                                     ignore_index=ignore_index, num_items_in_batch=num_items_in_batch)

    had_own = "_loss_function" in vars(causal)
    previous = vars(causal).get("_loss_function")
    head.forward = _passthrough
    causal.loss_function = loss_function
    try:
        yield
    finally:
        del head.forward
        if had_own:
            causal.loss_function = previous
        else:
            del causal._loss_function
