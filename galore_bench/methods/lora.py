"""LoRA (peft), ReLoRA (LoRA with periodic merge-and-restart) and the low-rank W = BA baseline.

The three of GaLore's Table 2 comparison that change the model itself before training.
"""
from __future__ import annotations

import dataclasses
from functools import partial
from typing import Any

import torch

from galore_bench.methods.adapters import (
    ADAPTER_DTYPE_OPTION,
    TRAIN_NON_ADAPTER_OPTION,
    adamw_of_trainable,
    adapted_projections,
    wrap_adapters,
)
from galore_bench.methods.base import MethodDef, Option, Trainer, TrainSettings
from galore_bench.methods.common import (
    IMPL_OPTION,
    TARGETS_OPTION,
    adamw_state,
    adamw_update_temporaries,
    adamw_whole_update,
)
from galore_bench.methods.terms import EstimateTerms, ParamShape, blocks, model_parameters, nothing
from galore_bench.models import HFModel, Model, matrix_shapes
from galore_bench.optim.lowrank import apply_low_rank
from galore_bench.optim.relora import ReLoRA, jagged_cosine_lr, lora_config

_adamw = adamw_of_trainable


def _targets(model: torch.nn.Module, opts: dict[str, Any], method: str) -> list[str]:
    """The projections to adapt or factorise, by qualified name; 3-D MoE experts refused unless left out."""
    return adapted_projections(model, opts, method)


def prepare_lora(model: torch.nn.Module, opts: dict[str, Any], train: TrainSettings,
                 method: str = "lora") -> torch.nn.Module:
    """Wrap every projection (q,k,v,o,gate,up,down in LLaMA) with adapters; as in pre-training, embeddings, norms
    and head stay trainable unless the run's train_non_adapter is false (peft's fine-tuning: adapters only)."""
    config = lora_config(opts["rank"], alpha=opts["alpha"], dropout=opts["dropout"],
                         target_modules=_targets(model, opts, method), use_dora=opts.get("use_dora", False),
                         init=peft_init(opts.get("init", "default")))
    return wrap_adapters(model, config, train_non_adapter=trains_non_adapter(opts),
                         fp32_adapters=opts["adapter_dtype"] == "fp32")


def trains_non_adapter(opts: dict[str, Any]) -> bool:
    """Whether embeddings, norms and head train beside the adapters (ReLoRA has no option: they always do)."""
    return bool(opts.get("train_non_adapter", True))


def build_lora(model: torch.nn.Module, opts: dict[str, Any], train: TrainSettings) -> Trainer:
    kind = "peft LoRA" + (" (DoRA)" if opts.get("use_dora") else "")
    return Trainer(model, _adamw(model, opts), info={"optimizer": "torch.optim.AdamW", "adapters": kind})


INITS = ("default", "gaussian", "pissa", "pissa_niter_<n>", "olora", "orthogonal")
"""peft's init_lora_weights that need nothing but the weights ('default' is peft's True: B zero); eva and corda
need data, loftq a quantized base, mica freezes B (and the rest trains here)."""


def peft_init(init: str) -> bool | str:
    return True if init == "default" else init


def init_problems(opts: dict[str, Any], model: Any) -> list[tuple[str, str, str]]:
    init = opts.get("init", "default")
    niter = init.removeprefix("pissa_niter_") if isinstance(init, str) else ""
    if (init in INITS and "<" not in init) or (niter != init and niter.isdigit()):
        return []
    return [("init", str(init), "one of " + ", ".join(INITS) + " (peft's init_lora_weights)")]


class ReLoRATrainer(Trainer):
    """LoRA training plus ReLoRA's merge, re-initialisation and optimizer-state pruning every `reset_every` steps."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, restarts: ReLoRA,
                 scheduler: Any, info: dict[str, Any]) -> None:
        super().__init__(model, optimizer, scheduler, info)
        self.restarts = restarts

    def update(self, step: int) -> None:
        super().update(step)
        self.restarts.maybe_restart(step + 1)


def build_relora(model: torch.nn.Module, opts: dict[str, Any], train: TrainSettings) -> Trainer:
    optimizer = _adamw(model, opts)
    every, rewarm = opts["reset_every"], opts["restart_warmup"]
    warmup = min(train.warmup_steps, every - 1)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: jagged_cosine_lr(s, max(train.steps, 1), warmup, every, min(rewarm, every - 1)))
    restarts = ReLoRA(model, optimizer, reset_every=every, prune_ratio=opts["prune_ratio"])
    return ReLoRATrainer(model, optimizer, restarts, schedule,
                         {"optimizer": "torch.optim.AdamW", "adapters": "peft LoRA", "reset_every": every})


def prepare_low_rank(model: torch.nn.Module, opts: dict[str, Any], train: TrainSettings) -> torch.nn.Module:
    return apply_low_rank(model, opts["rank"], target_modules=_targets(model, opts, "lowrank"))


def build_low_rank(model: torch.nn.Module, opts: dict[str, Any], train: TrainSettings) -> Trainer:
    return Trainer(model, _adamw(model, opts), info={"optimizer": "torch.optim.AdamW", "factorised": "W = B A"})


# -- estimate terms: AdamW over the adapters or factors, and each rank-r intermediate saved for backward --------
def adapters(shape: Model, opts: dict[str, Any]) -> list[ParamShape]:
    """Each projection frozen, with trainable A (r x cols) and B (rows x r) beside it (fp32 unless 'model');
    DoRA adds its trainable magnitude, one value per output row."""
    r, own = opts.get("rank") or 0, 4 if opts.get("adapter_dtype") == "fp32" else 0
    dora = bool(opts.get("use_dora"))
    params = model_parameters(shape, lambda name, rows, cols: [
        ParamShape(name, (rows, cols), trainable=False), ParamShape(name + ".lora_A", (r, cols), itemsize=own),
        ParamShape(name + ".lora_B", (rows, r), itemsize=own),
        *([ParamShape(name + ".lora_magnitude", (rows,), itemsize=own)] if dora else [])],
        opts.get("target_modules") or None)
    if trains_non_adapter(opts):
        return params
    # peft's fine-tuning: embeddings, norms and head frozen with the base (no gradient, no state)
    return [p if p.name.endswith(ADAPTER_SUFFIXES) else dataclasses.replace(p, trainable=False) for p in params]


ADAPTER_SUFFIXES = (".lora_A", ".lora_B", ".lora_magnitude")


def dora_saved(shape: Model, tokens: int, e: int, opts: dict[str, Any]) -> int:
    """What DoRA's output, (m / |W + s B A| - 1) * W x + m / |W + s B A| * s B A x, saves for backward per adapted
    projection: the base output W x (model dtype) and the adapter output B A x (adapter dtype), each for the
    magnitude's gradient, and three vectors of one value per row (the detached weight norm the division keeps,
    m / norm and m / norm - 1 beside the products). The norm itself is computed without autograd (peft detaches
    it, as the paper's section 4.3 says), so the full rows x cols matrices it needs are forward transients only."""
    if not opts.get("use_dora"):
        return 0
    own = 4 if opts.get("adapter_dtype") == "fp32" else e
    shapes = matrix_shapes(shape, opts.get("target_modules") or None).values()
    return sum(blocks(tokens * rows * e) + blocks(tokens * rows * own) + 3 * blocks(rows * own) for rows, _ in shapes)


def factors(shape: Model, opts: dict[str, Any]) -> list[ParamShape]:
    """Each projection replaced by trainable A (r x cols) and B (rows x r)."""
    r = opts.get("rank") or 0
    return model_parameters(shape, lambda name, rows, cols: [ParamShape(name + ".A", (r, cols)),
                                                            ParamShape(name + ".B", (rows, r))],
                            opts.get("target_modules") or None)


def rank_intermediates(shape: Model, tokens: int, e: int, opts: dict[str, Any]) -> int:
    """A x, saved per projection of a layer for B's gradient."""
    return len(matrix_shapes(shape, opts.get("target_modules") or None)) * blocks(tokens * (opts.get("rank") or 0) * e)


def adapter_activations(shape: Model, tokens: int, e: int, opts: dict[str, Any]) -> int:
    """The rank-r intermediates; with fp32 adapters on a 2-byte model, peft also casts each adapter's input to fp32
    (saved for A's gradient: one copy per projection), while the frozen base matmuls save nothing, so the norms'
    outputs and down_proj's input (and eager attention's o_proj input) are no longer kept."""
    if opts.get("adapter_dtype") != "fp32" or e >= 4:
        return rank_intermediates(shape, tokens, e, opts) + dora_saved(shape, tokens, e, opts)
    h, i = shape.hidden_size, shape.intermediate_size
    # one fp32 copy of each adapted projection's input (LLaMA: six of width h, down_proj's of width i; Phi-3's
    # fused qkv_proj and gate_up_proj: one each)
    casts = sum(blocks(tokens * cols * 4) for _, cols in matrix_shapes(shape, opts.get("target_modules") or None
                                                                           ).values())
    unsaved = 2 * blocks(tokens * h * e) + blocks(tokens * i * e)
    if isinstance(shape, HFModel) and shape.attn_implementation == "eager":  # and eager attention's copy for o_proj
        unsaved += blocks(tokens * shape.num_attention_heads * shape.head_dim * e)
    return rank_intermediates(shape, tokens, 4, opts) + casts - unsaved + dora_saved(shape, tokens, e, opts)


def frozen_norm_activations(shape: Model, tokens: int, e: int, opts: dict[str, Any]) -> int:
    """LoRA's saved tensors, less each RMSNorm's normalized output: with its weight frozen, the weight's
    product no longer keeps it for the weight's gradient (two norms a layer; Qwen3's per-head q and k norms too)."""
    unsaved = 2 * blocks(tokens * shape.hidden_size * e)
    if isinstance(shape, HFModel) and shape.model_type == "qwen3":
        unsaved += blocks(tokens * shape.num_attention_heads * shape.head_dim * e)
        unsaved += blocks(tokens * shape.num_key_value_heads * shape.head_dim * e)
    return adapter_activations(shape, tokens, e, opts) - unsaved


def frozen_ends(shape: Model, tokens: int, e: int, opts: dict[str, Any], checkpointing: bool) -> int:
    """Outside the layers: the final norm's normalized output is not kept; without checkpointing, neither is
    anything of layer 0's first norm (its input, from the frozen embedding, needs no gradient), whose fp32 input
    and 1/rms a layer otherwise saves. (The frozen head's input, alive through the loss's forward, is freed
    before its backward; the estimate keeps it there: at most one hidden state over.)"""
    h = shape.hidden_size
    first_norm = 0 if checkpointing else blocks(tokens * h * 4) + blocks(tokens * 4)
    return -(blocks(tokens * h * e) + first_norm)


def lora_saved(shape: Model, tokens: int, e: int, opts: dict[str, Any]) -> int:
    """Per layer: the adapters' saved tensors, less the norms' when they are frozen (train_non_adapter false)."""
    if trains_non_adapter(opts):
        return adapter_activations(shape, tokens, e, opts)
    return frozen_norm_activations(shape, tokens, e, opts)


def lora_saved_outside(shape: Model, tokens: int, e: int, opts: dict[str, Any], checkpointing: bool) -> int:
    return 0 if trains_non_adapter(opts) else frozen_ends(shape, tokens, e, opts, checkpointing)


def _terms(layout, saved_per_layer=rank_intermediates, saved_outside_layers=nothing) -> EstimateTerms:
    return EstimateTerms(state_bytes=adamw_state, update_temporaries=adamw_update_temporaries,
                         whole_update_temporaries=adamw_whole_update, layout=layout,
                         saved_per_layer=saved_per_layer, saved_outside_layers=saved_outside_layers)


LORA_OPTIONS = {
    "rank": Option(int, 128, "adapter rank r", minimum=1),
    "alpha": Option(float, 32.0, "LoRA alpha (update scale alpha / r); 32 as in the ReLoRA code base", minimum=0.0),
    "dropout": Option(float, 0.0, "adapter dropout", minimum=0.0),
    "impl": IMPL_OPTION,
    "target_modules": TARGETS_OPTION,
    "adapter_dtype": ADAPTER_DTYPE_OPTION,
}

LORA = MethodDef(name="lora", summary="LoRA adapters (peft) on attention and MLP, base weights frozen",
                 build=build_lora, prepare=prepare_lora, uses_rank=True, check=init_problems,
                 options={**LORA_OPTIONS,
                          "use_dora": Option(bool, False, "DoRA (arXiv 2402.09353): a trainable magnitude per output "
                                             "row times the normalised W + s B A"),
                          "init": Option(str, "default", "peft's init_lora_weights: " + ", ".join(INITS)),
                          "train_non_adapter": TRAIN_NON_ADAPTER_OPTION},
                 paper="arXiv 2106.09685; baseline in arXiv 2403.03507",
                 estimate=_terms(adapters, lora_saved, lora_saved_outside))

RELORA = MethodDef(
    name="relora", summary="ReLoRA: LoRA merged into W and restarted periodically, jagged cosine schedule",
    build=build_relora, prepare=partial(prepare_lora, method="relora"), uses_rank=True,
    paper="arXiv 2307.05695; baseline in arXiv 2403.03507",
    options={**LORA_OPTIONS,
             "reset_every": Option(int, 200, "steps between merge-and-restart", minimum=2),
             "restart_warmup": Option(int, 10, "linear re-warm-up steps after each restart", minimum=0),
             "prune_ratio": Option(float, 0.999, "fraction of adapter optimizer state zeroed at a restart",
                                   minimum=0.0)},
    estimate=_terms(adapters, adapter_activations),
    incompatible=lambda strategy, opts: (
        "ReLoRA merges B@A into the frozen base weight at each restart, which FSDP2 holds as shards: "
        "the merge would need a gather of both; use strategy ddp" if strategy == "fsdp2" else None))

LOW_RANK = MethodDef(name="lowrank",
                     summary="low-rank baseline: every projected weight factorised W = B A, all trained",
                     build=build_low_rank, prepare=prepare_low_rank, uses_rank=True,
                     options={"rank": Option(int, 128, "factor rank r", minimum=1), "impl": IMPL_OPTION,
                              "target_modules": TARGETS_OPTION},
                     paper="arXiv 2403.03507, Table 2", estimate=_terms(factors))
