"""The estimate engine: closed-form byte counts of one training step, instant, for sweeps and cross-checks.

An ESTIMATE, not a measurement: every figure is a formula of the model shape, dtype, method, batch and
sequence length, written from what each piece of code allocates. The method's own bytes (states, update
temporaries, its model changes, its extra moments) are its `MethodDef.estimate` terms, in methods/<m>.py;
a method without them is refused, never given another method's bytes. Tests check the estimate against the
simulate engine (the traced real step) within 2% per method; disagreements are what the formulas miss.
Each tensor is rounded up to the CUDA allocator's 512-byte blocks, as simulate does.

The step's memory is modelled at the moments where it peaks, and the largest one is the peak:
  forward_end   weights + states (+ gradients when accumulating) + saved activations + the loss's
                forward (full: model-dtype logits, their fp32 copy, log-softmax output; chunked: one chunk's);
  loss_backward the same with what the loss saved and its backward's transients (measure/loss_path.py);
  head_update   layer-wise / LOMO only: the LM head's gradient and its update temporaries inside backward,
                with every layer's activations still saved;
  recompute     activation checkpointing only: one layer's activations recomputed during backward, first
                (every checkpoint saved) and last (layer 0: every later gradient held, non-layer-wise);
  optimizer     weights + states + all gradients + the optimizer's temporaries (non-layer-wise);
  tied_sum      tied embeddings: the head's gradient, the embedding's and their sum, at backward's end;
  and any moment the method adds (GaLore: svd_refresh, the SVDs of a projector refresh).
A forward-only method (autograd off: the inference reference) has three, weights + live activations each: the
loss's tensors (loss_forward), and the last layer's MLP and attention transients (mlp_forward, attention_forward).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from galore_bench.errors import UserError
from galore_bench.measure import eager_attention
from galore_bench.measure.activation_terms import (
    activation_bytes,
    attention_widths,
    autocast_unmodelled,
    family_layer_bytes,
)
from galore_bench.measure.loss_path import loss_path
from galore_bench.measure.precision_estimate import (
    autocast_activation_bytes,
    master_copy_bytes,
    master_update,
)
from galore_bench.methods import REGISTRY
from galore_bench.methods.precision import PRECISIONS, run_settings
from galore_bench.methods.terms import EstimateTerms, Moment, ParamShape, StepBytes, blocks
from galore_bench.models import DTYPES, HFModel, Model, ModelShape, matrix_shapes
from galore_bench.units import CATEGORIES


class EstimateUnavailable(UserError):
    """The method has no closed-form terms: estimate (and fit) refuse it; simulate and measure still work."""


def terms_of(method: str) -> EstimateTerms:
    """The method's estimate terms, or a refusal that says what to use instead."""
    found = REGISTRY.get(method)
    if found is None:
        raise EstimateUnavailable(f"estimate: unknown method '{method}'")
    if found.estimate is None:
        why = f" ({found.no_estimate_reason})" if found.no_estimate_reason else ""
        raise EstimateUnavailable(f"estimate: method '{method}' has no closed-form estimate terms{why}; "
                                  "run it in simulate or measure mode")
    return found.estimate


ESTIMATED_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "phi3")
"""Decoders the closed form describes: RMSNorm, a gated SiLU MLP, rotary attention through sdpa or eager
(measure/eager_attention.py) attention (GQA, head_dim, biases, Qwen3's q/k norms and Phi-3's fused projections
included). Gemma-2 and MoE have no closed form here yet. (transformers' grouped_mm experts sort the tokens x top_k
(token, expert) pairs into one tensor, so an MoE step's shapes, and simulate's trace, do not depend on routing.)"""
UNMODELLED = {"gemma2": "four norms per layer, a GELU MLP, a scaled embedding, softcapped attention scores and "
                        "logits, and sliding-window masks are not modelled"}


def check_estimable(shape: Model) -> None:
    """Refuse a model the closed form does not describe, saying what to use instead."""
    if isinstance(shape, ModelShape):
        return
    family = shape.model_type
    if family not in ESTIMATED_FAMILIES or shape.attn_implementation not in ("sdpa", "eager") or hasattr(
            shape.settings, "num_experts"):
        why = ("its MoE layers (router logits, tokens x top-k rows through grouped_mm, 3-D expert weights) are not "
               "modelled" if "moe" in family or family == "mixtral" else
               UNMODELLED.get(family, f"its {family} layers with {shape.attn_implementation} attention are not "
                                      "modelled"))
        raise EstimateUnavailable(f"estimate: no closed form for {shape.preset or family} ({why}; the estimate "
                                  f"covers {', '.join(ESTIMATED_FAMILIES)} with sdpa or eager attention); run it in "
                                  "simulate or measure mode")


def update_temporaries(terms: EstimateTerms, params: list[ParamShape], options: dict[str, Any], e: int,
                       layerwise: bool, target: str) -> int:
    """The largest transient of a whole update: a batched implementation's, else the largest parameter's."""
    trainable = [p for p in params if p.trainable]
    if terms.whole_update_temporaries is not None:
        whole = terms.whole_update_temporaries(trainable, options, e, layerwise, target)
        if whole is not None:
            return whole
    return max((terms.update_temporaries(p, options, p.width(e)) for p in trainable), default=0)


@dataclass
class Estimate:
    """The estimate's peak, its composition, each category's own maximum, and every moment considered."""

    peak_bytes: int
    breakdown: dict[str, int]
    category_peaks: dict[str, int]
    moment: str
    moments: dict[str, dict[str, int]] = field(default_factory=dict)
    terms: dict[str, int] = field(default_factory=dict)
    phase: str = ""
    """Which phase of the run this is, for a method whose memory changes along the run (BAdam's block)."""


def estimate(shape: Model, method: str, options: dict[str, Any], *, batch_size: int, seq_len: int,
             dtype: str, activation_checkpointing: bool = False, grad_accum: int = 1, target: str = "gpu",
             loss: str = "full", loss_chunk_tokens: int = 1024, precision: str = "") -> Estimate:
    """Closed-form peak memory of one steady-state training step (step 2+: optimizer states exist).

    `target`: the device the run is for ("gpu": what simulate predicts; "cpu": a real CPU run), which decides
    what 'auto' implementations resolve to. `loss`: "full", "chunked" (`loss_chunk_tokens` tokens at a time) or
    "model-dtype" (the LOMO paper's: no fp32 copy of the logits).
    `precision`: methods/precision.py's recipe ("" = pure `dtype`).
    Raises EstimateUnavailable for a method without estimate terms.
    """
    terms = terms_of(method)
    check_estimable(shape)
    eager = isinstance(shape, HFModel) and shape.attn_implementation == "eager"
    recipe = PRECISIONS[precision or dtype]  # methods/precision.py; dtype is the weights' dtype
    e = DTYPES[recipe.weights].itemsize  # bytes per value of weights and gradients
    c = DTYPES[recipe.compute].itemsize if recipe.compute else e  # ... of what the forward computes in
    params = terms.layout(shape, options)
    weights = sum(blocks(p.numel * (p.value_bytes or p.width(e))) for p in params)
    # under autocast an adapter computes in c bytes like the model, whatever its own dtype
    extra = terms.saved_per_layer(shape, batch_size * seq_len, c, {**options, "adapter_dtype": "model"}
                                  if recipe.compute else options)
    unmodelled = autocast_unmodelled(shape, activation_checkpointing) if recipe.compute else None
    if unmodelled:
        raise EstimateUnavailable(f"estimate: the autocast closed form ({precision}) does not model {unmodelled} "
                                  f"for {getattr(shape, 'preset', None) or 'this config'}; run it in simulate or "
                                  "measure mode")
    t = batch_size * seq_len
    act = (autocast_activation_bytes(shape, params, batch_size, seq_len, c, activation_checkpointing,
                                     extra + family_layer_bytes(shape, t, c), attention_widths(shape))
           if recipe.compute else activation_bytes(shape, batch_size, seq_len, e, activation_checkpointing, extra))
    if terms.saved_activations is not None:
        act = terms.saved_activations(act, shape, t, e, activation_checkpointing, options)
    loss_bytes = loss_path(shape, batch_size * seq_len, c, loss, loss_chunk_tokens,
                           head_trainable=all(p.trainable for p in params if p.name == "lm_head"), sequences=batch_size)
    if terms.forward_only:  # autograd off: nothing saved, no gradient, no state; only forward transients
        return _forward_only(weights, {"loss_forward": act["hidden"] + loss_bytes.forward,
                                       **_layer_forward_bytes(shape, batch_size, seq_len, e)}, act)
    layerwise = terms.updates_in_backward(options)
    grads = sum(blocks(p.numel * p.width(e)) for p in params if p.trainable)
    head_grad = blocks(shape.vocab_size * shape.hidden_size * e)
    trainable = [p for p in params if p.trainable]
    es = DTYPES[recipe.state_dtype].itemsize  # the optimizer's own bytes per value (fp32 beside master weights)
    states = sum(terms.state_bytes(p, options, p.width(es)) for p in trainable) + terms.shared_state_bytes(options)
    temps, own = update_temporaries(terms, params, options, e, layerwise, target), 0
    if recipe.master:  # fp32 copies in the optimizer; each update steps one parameter with its fp32 gradient
        states += master_copy_bytes(trainable)
        own, temps = master_update(trainable, options, lambda p, opts, width: update_temporaries(
            terms, [p], opts, width, layerwise, target), e)
    carried = grads if grad_accum > 1 and not layerwise else 0  # later micro-batches find the gradients there
    saved = act["saved_layers"] + act["head"] + terms.saved_outside_layers(shape, batch_size * seq_len, e, options,
                                                                            activation_checkpointing)

    def moment(held: Moment) -> dict[str, int]:
        return dict(zip(CATEGORIES, (weights, held.gradients, states, held.activations, held.other), strict=True))

    moments = {
        "forward_end": moment(Moment(carried, saved + loss_bytes.forward + act.get("until_loss", 0), 0)),
        "loss_backward": moment(Moment(carried, saved + loss_bytes.backward_activations, loss_bytes.backward_other)),
    }
    tied = not any(p.name == "lm_head" for p in params)
    embedding = next((p for p in params if p.name == "embed_tokens"), None)
    if layerwise and tied and embedding is not None:  # the head's gradient accumulates into the embedding's,
        # updated only when backward ends
        moments["head_update"] = moment(Moment(head_grad, saved - act.get("head_released", 0), act["hidden"]))
        moments["tied_update"] = moment(Moment(head_grad, 0, terms.update_temporaries(embedding, options, e)))
    elif layerwise:
        head = next(p for p in params if p.name == "lm_head")
        moments["head_update"] = moment(Moment(head_grad, saved - act.get("head_released", 0),
                                               terms.update_temporaries(head, options, e) + act["hidden"]))
    else:
        moments["optimizer"] = moment(Moment(grads - own, 0, temps))
    if terms.extra_moments is not None:
        step = StepBytes(shape, params, options, e, grads, head_grad, saved, layerwise)
        moments.update({name: moment(held) for name, held in terms.extra_moments(step).items()})
    # tied embeddings: the head's gradient waits in autograd's input buffer from the loss to backward's last node
    pending = head_grad if tied and embedding is not None and embedding.trainable else 0
    if pending:  # there the embedding's gradient meets it and their sum is a third table-sized tensor, before it
        # reaches .grad; every later gradient is held by then (non-layer-wise), no activation is
        moments["tied_sum"] = moment(Moment(0 if layerwise else max(carried, grads - head_grad), 0, 3 * pending))
    query_side = 0  # eager: what the method saves for the last layer's q, k, v (its later saves are freed first)
    if eager and isinstance(shape, HFModel):
        later = [name for name in matrix_shapes(shape, options.get("target_modules") or None)
                 if name not in eager_attention.QUERY_SIDE]
        query_side = act["method_per_layer"] - (terms.saved_per_layer(
            shape, batch_size * seq_len, c, {**options, "target_modules": later}) if later else 0)
        if not activation_checkpointing:
            moments.update({name: moment(held) for name, held in eager_attention.training_moments(
                shape, params, batch_size, seq_len, e, act, carried, head_grad, pending, layerwise,
                query_side).items()})
    if activation_checkpointing:
        head = next((p for p in params if p.name == "lm_head"), None) or next(
            p for p in params if p.name == "embed_tokens")  # a tied head is the embedding
        # a frozen head (LoRA, BAdam) has no gradient; a tied one's is pending (in `recomputed`)
        so_far = head_grad if not layerwise and head.trainable and not pending else 0
        recomputed = act["layer"] + 2 * act["hidden"] + pending
        moments["recompute"] = moment(first := Moment(max(carried, so_far), saved, recomputed))
        last = None
        if not layerwise:  # the last recompute (layer 0): every later gradient is held, later checkpoints are gone
            not_yet = sum(blocks(p.numel * p.width(e)) for p in params
                          if p.trainable and (p.name.startswith("0.") or p.name == "embed_tokens"))
            moments["last_recompute"] = moment(last := Moment(max(carried, grads - not_yet), act["hidden"],
                                                              recomputed))
        if eager and isinstance(shape, HFModel):  # at the last layer's recompute, the head's saves are freed
            moments.update({name: moment(held) for name, held in eager_attention.checkpointed_moments(
                shape, batch_size, seq_len, e, act, query_side, first._replace(activations=act["saved_layers"]),
                last).items()})
    peak_moment = max(moments, key=lambda name: sum(moments[name].values()))
    category_peaks = {c: max(m[c] for m in moments.values()) for c in CATEGORIES}
    category_peaks["gradients"] = head_grad if layerwise else grads
    terms_used = {"weights": weights, "gradients_all": grads, "optimizer_states": states,
                  "optimizer_temporaries": temps, **{f"activations_{k}": v for k, v in act.items()}}
    return Estimate(sum(moments[peak_moment].values()), moments[peak_moment], category_peaks, peak_moment, moments,
                    terms_used)


def _layer_forward_bytes(shape: Model, batch: int, seq: int, e: int) -> dict[str, int]:
    """Live activations at the last layer's two busiest moments, autograd off.

    Both hold the embedding output (the model keeps it), the layer's input (layer 0's input is that output),
    the rotary cos/sin (batch 1) and the int64 position ids. The MLP moment adds the residual sum, its normed
    copy, SiLU(gate), up and their product; the attention moment adds the input's normed copy, q, k, v, rotated
    q and the three tensors of k's rotation (k*cos, rotate_half(k), its product with sin). k and v are as wide as
    the k/v heads (the zoo's: as q; grouped-query attention: narrower). LLaMA's MLP (i ~ 2.7h) makes the MLP moment
    the larger one.
    """
    t, h, i = batch * seq, shape.hidden_size, shape.intermediate_size
    q, kv, heads = attention_widths(shape)
    held = (2 if shape.num_hidden_layers > 1 else 1) * blocks(t * h * e)
    rotary = 2 * blocks(seq * (q // heads) * e) + blocks(seq * 8)
    moments = {"mlp_forward": held + rotary + 2 * blocks(t * h * e) + 3 * blocks(t * i * e),
               "attention_forward": held + rotary + blocks(t * h * e) + 2 * blocks(t * q * e) + 5 * blocks(t * kv * e)}
    if isinstance(shape, HFModel) and shape.attn_implementation == "eager":
        moments["attention_forward"] = (held + rotary + blocks(t * h * e)
                                        + eager_attention.inference_softmax_bytes(shape, batch, seq, e))
    return moments


def _forward_only(weights: int, activations: dict[str, int], act: dict[str, int]) -> Estimate:
    """Inference: the peak is the largest of the loss (the last hidden state, the logits, their fp32 copy and
    log-softmax: the largest in bf16/fp16 with the zoo's 32000-token vocabulary) and a layer's busiest moments
    (the largest when the vocabulary is small against the layer's width, and for 30B/65B in fp32)."""
    moments = {name: dict(zip(CATEGORIES, (weights, 0, 0, live, 0), strict=True))
               for name, live in activations.items()}
    moment = max(moments, key=lambda name: moments[name]["activations"])
    peak = moments[moment]
    terms = {"weights": weights, **{f"activations_{k}": v for k, v in act.items()}}
    return Estimate(sum(peak.values()), peak, dict(peak), moment, moments, terms)


def peak_phase(scenario: Any, run: Any, target: str = "gpu") -> tuple[str, dict[str, Any], Estimate] | None:
    """For a method whose memory changes along the run (terms.phases): the phase with the largest estimate, its
    options and that estimate; None for every other method."""
    phases = terms_of(run.method).phases
    if phases is None:
        return None
    train = run_settings(scenario.train, run.options)
    found = [(label, options, _estimate_with(scenario, run, options, target))
             for label, options in phases(run.model, run.options, train.steps, train.seed).items()]
    label, options, result = max(found, key=lambda item: item[2].peak_bytes)
    result.phase = label
    return label, options, result


def estimate_run(scenario: Any, run: Any, target: str = "gpu") -> Estimate:
    """The estimate for one run of a scenario (its model, method, options and training settings); for a method
    whose memory changes along the run, its largest phase."""
    peak = peak_phase(scenario, run, target)
    return peak[2] if peak is not None else _estimate_with(scenario, run, run.options, target)


def _estimate_with(scenario: Any, run: Any, options: dict[str, Any], target: str) -> Estimate:
    train = run_settings(scenario.train, run.options)
    return estimate(run.model, run.method, options, batch_size=train.batch_size, seq_len=train.seq_len,
                    dtype=train.dtype, activation_checkpointing=train.activation_checkpointing,
                    grad_accum=train.grad_accum, target=target, loss=train.loss,
                    loss_chunk_tokens=train.loss_chunk_tokens, precision=train.precision)
