"""The estimate engine: closed-form byte counts of one training step, instant, for sweeps and cross-checks.

An ESTIMATE, not a measurement: every figure is a formula of the model shape, dtype, method, batch and
sequence length, written from what each piece of code allocates (listed term by term below). Tests check
it against the simulate engine (the traced real step) within 2% per method; disagreements are what the
formulas miss. Each tensor is rounded up to the CUDA allocator's 512-byte blocks, as simulate does.

The step's memory is modelled at the moments where it peaks, and the largest one is the peak:
  forward_end   weights + states (+ gradients when accumulating) + saved activations + the loss's
                logits-sized tensors (model-dtype logits, their fp32 copy, log-softmax output);
  loss_backward the same with the log-softmax output saved and two fp32 logits-sized gradients;
  head_update   layer-wise / LOMO only: the LM head's gradient and its update temporaries inside backward,
                with every layer's activations still saved;
  recompute     activation checkpointing only: one layer's activations recomputed during backward, first
                (every checkpoint saved) and last (layer 0: every later gradient held, non-layer-wise);
  optimizer     weights + states + all gradients + the optimizer's temporaries (non-layer-wise).
The inference reference (autograd off) has three, weights + live activations each: the loss's tensors
(loss_forward), and the last layer's MLP and attention transients (mlp_forward, attention_forward).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from galore_bench.measure.tracker import CATEGORIES, CUDA_BLOCK, allocator_bytes
from galore_bench.models import ModelShape, matrix_shapes

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
MIN_8BIT_SIZE = 4096  # bitsandbytes keeps smaller states in fp32
BNB_BLOCK = 256  # bitsandbytes blockwise quantization: one fp32 absmax per 256 elements
LOWRANK_METHODS = ("lora", "relora", "lowrank")
FUSED_IN_BACKWARD = ("lomo",)


def blocks(nbytes: float) -> int:
    """Bytes the caching allocator hands out for one tensor of `nbytes`."""
    return allocator_bytes(int(nbytes), CUDA_BLOCK)


@dataclass(frozen=True, slots=True)
class Tensor2D:
    """One parameter as the estimate sees it: its shape, whether it trains, whether GaLore projects it."""

    name: str
    shape: tuple[int, ...]
    trainable: bool = True
    projected: bool = False

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


def parameters(shape: ModelShape, method: str, rank: int | None) -> list[Tensor2D]:
    """The parameters after the method's model changes: LoRA adapters (base frozen), low-rank factors."""
    r = rank or 0
    h, v = shape.hidden_size, shape.vocab_size
    tensors = [Tensor2D("embed_tokens", (v, h)), Tensor2D("lm_head", (v, h)), Tensor2D("norm", (h,))]
    for layer in range(shape.num_hidden_layers):
        tensors += [Tensor2D(f"{layer}.input_layernorm", (h,)), Tensor2D(f"{layer}.post_attention_layernorm", (h,))]
        for name, (rows, cols) in matrix_shapes(shape).items():
            full = f"{layer}.{name}"
            if method in ("lora", "relora"):
                tensors += [Tensor2D(full, (rows, cols), trainable=False), Tensor2D(full + ".lora_A", (r, cols)),
                            Tensor2D(full + ".lora_B", (rows, r))]
            elif method == "lowrank":
                tensors += [Tensor2D(full + ".A", (r, cols)), Tensor2D(full + ".B", (rows, r))]
            else:
                tensors.append(Tensor2D(full, (rows, cols), projected=method.startswith("galore")))
    return tensors


def _adam8bit_state(numel: int) -> int:
    """Two uint8 moments + two fp32 absmax per block, or two fp32 moments below bitsandbytes' threshold."""
    if numel < MIN_8BIT_SIZE:
        return 2 * blocks(numel * 4)
    return 2 * blocks(numel) + 2 * blocks(-(-numel // BNB_BLOCK) * 4)


def _adafactor_state(p: Tensor2D, opts: dict[str, Any]) -> int:
    """fp32 row and column second-moment vectors of a matrix (a full fp32 one for a vector), an fp32 first moment
    when beta1 > 0, and the fp32 RMS scalar transformers' Adafactor keeps per parameter."""
    second = blocks(p.shape[0] * 4) + blocks(p.shape[1] * 4) if len(p.shape) == 2 else blocks(p.numel * 4)
    return second + (blocks(p.numel * 4) if opts.get("beta1") else 0) + blocks(4)


def projected_sizes(p: Tensor2D, rank: int | None, proj_type: str = "std") -> tuple[int, int]:
    """(projector, one moment) elements of a GaLore matrix: std projects the shorter side, like the optimizer."""
    rows, cols = p.shape
    r = min(rank or 0, rows, cols)
    tall = rows >= cols
    side = proj_type if proj_type in ("left", "right") else (
        ("right" if tall else "left") if proj_type == "std" else ("left" if tall else "right"))
    return (r * cols, rows * r) if side == "right" else (rows * r, r * cols)


def optimizer_state_bytes(params: list[Tensor2D], method: str, opts: dict[str, Any], e: int) -> int:
    """What the optimizer keeps between steps (GaLore: Table 1's m*r projector + 2*n*r moments, m <= n)."""
    total = 0
    for p in (p for p in params if p.trainable):
        if method == "lomo" or (method == "sgd" and not opts.get("momentum")):
            continue
        if method == "sgd":
            total += blocks(p.numel * e)  # the momentum buffer
        elif p.projected:
            projector, moments = projected_sizes(p, opts.get("rank"), opts.get("proj_type", "std"))
            total += blocks(projector * e)  # the projector, in the gradient's dtype
            total += _adam8bit_state(moments) if method == "galore8bit" else 2 * blocks(moments * e)
        elif method in ("adam8bit", "galore8bit"):
            total += _adam8bit_state(p.numel)
        elif method == "adafactor":
            total += _adafactor_state(p, opts)
        else:
            total += 2 * blocks(p.numel * e)
            if method in ("adamw", *LOWRANK_METHODS):
                total += blocks(4)  # torch AdamW's fp32 `step` tensor per parameter
    if method in ("adam8bit",):
        total += 2 * blocks(256 * 4)  # the signed and unsigned quantization maps, shared
    return total


def update_temporaries(p: Tensor2D, method: str, opts: dict[str, Any], e: int) -> int:
    """The largest transient one parameter's update allocates (for-loop implementations)."""
    if method in ("sgd", "adam8bit") or (method == "galore8bit" and not p.projected):
        return 0  # SGD and bitsandbytes' kernels update in place
    if method == "lomo":
        return 2 * blocks(p.numel * 4) if e < 4 else 0  # fp32 copies of the gradient and the weight
    if method == "adafactor":  # grad**2 and (grad**2 + eps), later the update and its negation, all fp32; below
        return (4 if e < 4 else 2) * blocks(p.numel * 4)  # fp32 training, also fp32 copies of grad and weight
    if not p.projected:
        return 2 * blocks(p.numel * e)  # sqrt(v), then (sqrt(v) + eps) or m / denom
    moments = projected_sizes(p, opts.get("rank"), opts.get("proj_type", "std"))[1]
    low = (2 if method == "galore8bit" else 3) * blocks(moments * e)  # projected grad, denom/buffer, update
    return low + 2 * blocks(p.numel * e)  # projected back, then scaled: two full-size matrices


def svd_refresh_bytes(p: Tensor2D, opts: dict[str, Any], e: int) -> int:
    """A projector refresh: the gradient in fp32, the SVD's U, S and Vh, the new basis and the projected gradient."""
    rows, cols = p.shape
    k = min(rows, cols)
    projector, moment = projected_sizes(p, opts.get("rank"), opts.get("proj_type", "std"))
    return ((blocks(rows * cols * 4) if e < 4 else 0) + blocks(rows * k * 4) + blocks(k * 4) + blocks(k * cols * 4)
            + blocks(projector * e) + blocks(moment * e))


def adamw_impl(opts: dict[str, Any], target: str, layerwise: bool) -> str:
    """torch AdamW's implementation as the run resolves it: 'auto' is foreach on a GPU, the for-loop on a CPU."""
    impl = opts.get("impl", "auto")
    if layerwise:
        return "for-loop"
    return ("foreach" if target == "gpu" else "for-loop") if impl == "auto" else impl


def optimizer_temporaries(params: list[Tensor2D], method: str, opts: dict[str, Any], e: int, layerwise: bool,
                          target: str = "gpu") -> int:
    """The largest transient of a whole update (foreach AdamW: a full copy of every second moment)."""
    trainable = [p for p in params if p.trainable]
    if method in ("adamw", *LOWRANK_METHODS):
        impl = adamw_impl(opts, target, layerwise)
        if impl == "foreach":
            return sum(blocks(p.numel * e) for p in trainable)  # sqrt(v) for all parameters at once
        if impl == "fused":
            return 0  # one kernel per tensor group, nothing materialised
    return max((update_temporaries(p, method, opts, e) for p in trainable), default=0)


def activation_bytes(shape: ModelShape, batch: int, seq: int, e: int, method: str, rank: int | None,
                     checkpointing: bool) -> dict[str, int]:
    """What autograd saves, per decoder layer and for the final norm and LM head.

    Per layer, T = batch x seq tokens: each RMSNorm saves its fp32 input, 1/rms and its output (4+4/h+e
    bytes per element); the attention and MLP blocks each save their input once more as the 2-D matrix the
    projections multiply; SDPA saves q, k, v, its output and the log-sum-exp; the MLP saves gate, SiLU(gate),
    up and the down projection's input. LoRA / low-rank save each rank-r intermediate.
    """
    h, i, heads, t = shape.hidden_size, shape.intermediate_size, shape.num_attention_heads, batch * seq
    norm = blocks(t * h * 4) + blocks(t * 4) + blocks(t * h * e)
    layer = (2 * norm + 2 * blocks(t * h * e) + blocks(t * i * e)  # norms, the projections' 2-D inputs
             + 4 * blocks(t * h * e) + blocks(batch * heads * seq * 4)  # q, k, v, output, log-sum-exp
             + 3 * blocks(t * i * e))  # gate, SiLU(gate), up
    if method in LOWRANK_METHODS:
        layer += len(matrix_shapes(shape)) * blocks(t * (rank or 0) * e)
    head = norm + blocks(t * h * e)  # final norm, LM head input
    saved_layers = shape.num_hidden_layers * (blocks(t * h * e) if checkpointing else layer)
    return {"layer": layer, "saved_layers": saved_layers, "head": head,
            "logits": blocks(t * shape.vocab_size * e), "logits_fp32": blocks(t * shape.vocab_size * 4),
            "hidden": blocks(t * h * e)}


@dataclass
class Estimate:
    """The estimate's peak, its composition, each category's own maximum, and every moment considered."""

    peak_bytes: int
    breakdown: dict[str, int]
    category_peaks: dict[str, int]
    moment: str
    moments: dict[str, dict[str, int]] = field(default_factory=dict)
    terms: dict[str, int] = field(default_factory=dict)


def _moment(weights: int, gradients: int, states: int, activations: int, other: int) -> dict[str, int]:
    return dict(zip(CATEGORIES, (weights, gradients, states, activations, other), strict=True))


def estimate(shape: ModelShape, method: str, options: dict[str, Any], *, batch_size: int, seq_len: int,
             dtype: str, activation_checkpointing: bool = False, grad_accum: int = 1, target: str = "gpu") -> Estimate:
    """Closed-form peak memory of one steady-state training step (step 2+: optimizer states exist).

    `target`: the device the run is for ("gpu": what simulate predicts; "cpu": a real CPU run), which decides
    what 'auto' implementations resolve to.
    """
    e = DTYPE_BYTES[dtype]
    rank = options.get("rank")
    layerwise = bool(options.get("layerwise")) or method in FUSED_IN_BACKWARD
    params = parameters(shape, method, rank)
    weights = sum(blocks(p.numel * e) for p in params)
    grads = sum(blocks(p.numel * e) for p in params if p.trainable)
    head_grad = blocks(shape.vocab_size * shape.hidden_size * e)
    states = optimizer_state_bytes(params, method, options, e)
    temps = optimizer_temporaries(params, method, options, e, layerwise, target)
    act = activation_bytes(shape, batch_size, seq_len, e, method, rank, activation_checkpointing)
    carried = grads if grad_accum > 1 and not layerwise else 0  # later micro-batches find the gradients there
    saved = act["saved_layers"] + act["head"]
    logits_forward = (act["logits"] if e < 4 else 0) + 2 * act["logits_fp32"]
    if method == "inference":  # autograd off: nothing saved, no gradient, no state; only forward transients
        return _forward_only(weights, {"loss_forward": act["hidden"] + logits_forward,
                                       **_layer_forward_bytes(shape, batch_size, seq_len, e)}, act)
    moments = {
        "forward_end": _moment(weights, carried, states, saved + logits_forward, 0),
        "loss_backward": _moment(weights, carried, states, saved + act["logits_fp32"], 2 * act["logits_fp32"]),
    }
    if layerwise:
        head = next(p for p in params if p.name == "lm_head")
        moments["head_update"] = _moment(weights, head_grad, states, saved,
                                         update_temporaries(head, method, options, e) + act["hidden"])
    else:
        moments["optimizer"] = _moment(weights, grads, states, 0, temps)
    if method.startswith("galore"):  # every update_proj_gap steps: the SVDs that refresh the projectors
        projected = [p for p in params if p.projected]
        if layerwise:  # inside backward, at the first projected weight reached: the last layer's down_proj
            first = next(p for p in projected if p.name == f"{shape.num_hidden_layers - 1}.down_proj")
            moments["svd_refresh"] = _moment(weights, blocks(first.numel * e), states, saved,
                                             svd_refresh_bytes(first, options, e))
        else:  # the largest matrix's SVD, while the previous (LM head) update is still referenced; the 8-bit
            largest = max(projected, key=lambda p: p.numel)  # kernel updates the head in place: nothing is left
            left = head_grad if method == "galore" else 0
            moments["svd_refresh"] = _moment(weights, grads, states, 0, svd_refresh_bytes(largest, options, e) + left)
    if activation_checkpointing:
        so_far = head_grad if not layerwise else 0
        moments["recompute"] = _moment(weights, max(carried, so_far), states, saved,
                                       act["layer"] + 2 * act["hidden"])
        if not layerwise:  # the last recompute (layer 0): every later gradient is held, later checkpoints are gone
            not_yet = sum(blocks(p.numel * e) for p in params
                          if p.trainable and (p.name.startswith("0.") or p.name == "embed_tokens"))
            moments["last_recompute"] = _moment(weights, max(carried, grads - not_yet), states, act["hidden"],
                                                act["layer"] + 2 * act["hidden"])
    moment = max(moments, key=lambda name: sum(moments[name].values()))
    category_peaks = {c: max(m[c] for m in moments.values()) for c in CATEGORIES}
    category_peaks["gradients"] = head_grad if layerwise else grads
    terms = {"weights": weights, "gradients_all": grads, "optimizer_states": states, "optimizer_temporaries": temps,
             **{f"activations_{k}": v for k, v in act.items()}}
    return Estimate(sum(moments[moment].values()), moments[moment], category_peaks, moment, moments, terms)


def _layer_forward_bytes(shape: ModelShape, batch: int, seq: int, e: int) -> dict[str, int]:
    """Live activations at the last layer's two busiest moments, autograd off.

    Both hold the embedding output (the model keeps it), the layer's input (layer 0's input is that output),
    the rotary cos/sin (batch 1) and the int64 position ids. The MLP moment adds the residual sum, its normed
    copy, SiLU(gate), up and their product; the attention moment adds the input's normed copy, q, k, v, rotated
    q and the three tensors of k's rotation (k*cos, rotate_half(k), its product with sin). k and v are full
    width: the model builder sets num_key_value_heads = num_attention_heads (no grouped-query attention).
    LLaMA's MLP (i ~ 2.7h) makes the MLP moment the larger one.
    """
    t, h, i = batch * seq, shape.hidden_size, shape.intermediate_size
    held = (2 if shape.num_hidden_layers > 1 else 1) * blocks(t * h * e)
    rotary = 2 * blocks(seq * (h // shape.num_attention_heads) * e) + blocks(seq * 8)
    return {"mlp_forward": held + rotary + 2 * blocks(t * h * e) + 3 * blocks(t * i * e),
            "attention_forward": held + rotary + 8 * blocks(t * h * e)}


def _forward_only(weights: int, activations: dict[str, int], act: dict[str, int]) -> Estimate:
    """Inference: the peak is the largest of the loss (the last hidden state, the logits, their fp32 copy and
    log-softmax: the largest in bf16/fp16 with the zoo's 32000-token vocabulary) and a layer's busiest moments
    (the largest when the vocabulary is small against the layer's width, and for 30B/65B in fp32)."""
    moments = {name: _moment(weights, 0, 0, live, 0) for name, live in activations.items()}
    moment = max(moments, key=lambda name: moments[name]["activations"])
    peak = moments[moment]
    terms = {"weights": weights, **{f"activations_{k}": v for k, v in act.items()}}
    return Estimate(sum(peak.values()), peak, dict(peak), moment, moments, terms)


def estimate_run(scenario: Any, run: Any, target: str = "gpu") -> Estimate:
    """The estimate for one run of a scenario (its model, method, options and training settings)."""
    train = scenario.train
    return estimate(run.model, run.method, run.options, batch_size=train.batch_size, seq_len=train.seq_len,
                    dtype=train.dtype, activation_checkpointing=train.activation_checkpointing,
                    grad_accum=train.grad_accum, target=target)
