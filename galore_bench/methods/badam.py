"""BAdam (arXiv 2404.02827): one decoder layer trains at a time, AdamW over its fp32 masters, switching
every K steps; embeddings, final norm and LM head stay frozen unless made blocks (include_embedding,
include_lm_head).

Memory depends on the block: autograd saves activations for the active layer and for every layer above it
(their input gradients lead down to it), none below, and an embedding or head block holds other weights than a
layer. So the run's peak is that of one of the blocks it trains: `phases` names the candidates (the lowest layer
it reaches, and the embedding and head blocks when trained), the estimate is the largest of them, and simulate
traces that block, held active for its short trace (measure/training.simulation_plan). The default order,
ascending from layer 0, starts in the block with the most saved.

The estimate's terms, each checked against a trace (tests/test_estimate.py):
- states: the active block's fp32 masters and AdamW's two fp32 moments (and its `step`), whatever the model's dtype;
- gradients: the active block's, in the model's dtype; at the step each becomes an fp32 copy (the low-precision
  one freed as it goes), beside AdamW's temporaries over the fp32 masters;
- activations: a frozen layer above the active one saves what its input's gradient needs: each RMSNorm its fp32
  input and 1/rms, SDPA its q, k, v, output and log-sum-exp, the MLP gate, SiLU(gate) and up; not the normalised
  output before the norm weight, nor any frozen projection's input (a frozen weight's gradient is never formed).
  The active layer saves as in full training, less its input norm's fp32 input and 1/rms (its input, from frozen
  layers below, needs no gradient). The final norm (frozen) saves its fp32 input and 1/rms, the frozen LM head
  nothing.
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from galore_bench.methods.base import MethodDef, Option, Trainer, TrainSettings
from galore_bench.methods.common import ADAM_OPTIONS, IMPL_OPTION, adamw_impl, impl_flags, trainable
from galore_bench.methods.terms import TORCH_STEP, EstimateTerms, Options, ParamShape, blocks, model_parameters
from galore_bench.models import Model
from galore_bench.optim.badam import SWITCH_MODES, BlockAdam, blocks_trained, switches_after

OPTIONS = {
    **{k: v for k, v in ADAM_OPTIONS.items() if k != "layerwise"},
    "impl": IMPL_OPTION,
    "switch_every": Option(int, 50, "K: steps per block (the first block gets K - 1, as in the badam package)",
                           minimum=1),
    "switch_mode": Option(str, "ascending", "block order (ascending: LLaMA-Factory's default; the package's "
                          "is descending)", choices=SWITCH_MODES),
    "start_block": Option(int, -1, "first block; -1: the order's own (0 ascending, the last descending)",
                          minimum=-1),
    "include_embedding": Option(bool, False, "the embedding is a block of its own (the first)"),
    "include_lm_head": Option(bool, False, "final norm and LM head (and the embedding, if not a block of its "
                              "own) are the last block"),
}


class BAdamTrainer(Trainer):
    def state_tensors(self) -> Iterator[torch.Tensor]:
        return self.optimizer.state_tensors()


def build(model: torch.nn.Module, opts: dict[str, Any], train: TrainSettings) -> Trainer:
    flags = impl_flags(opts["impl"], trainable(model))
    hyper = dict(lr=opts["lr"], weight_decay=opts["weight_decay"], betas=(opts["beta1"], opts["beta2"]),
                 eps=opts["eps"], **flags)

    def make(masters: list[torch.Tensor]) -> torch.optim.Optimizer:
        return torch.optim.AdamW(masters, **hyper)

    start = opts["start_block"] if opts["start_block"] >= 0 else None
    optimizer = BlockAdam(model, make, lr=opts["lr"], switch_every=opts["switch_every"],
                          switch_mode=opts["switch_mode"], start_block=start, seed=train.seed,
                          include_embedding=opts["include_embedding"], include_lm_head=opts["include_lm_head"])
    info = {"optimizer": "galore_bench.optim.badam.BlockAdam (torch.optim.AdamW on fp32 masters)",
            "impl": next((k for k, v in flags.items() if v), "for-loop"), "blocks": len(optimizer.blocks),
            "start_block": optimizer.active_block}
    return BAdamTrainer(model, optimizer, info=info)


def switch_steps(opts: dict[str, Any], steps: int) -> dict[str, set[int]]:
    """Steps (0-based) that end in a block switch (new masters, a fresh AdamW): the package's schedule."""
    return {"block_switch": {i for i in range(steps) if switches_after(i, opts["switch_every"])}}


def phases(shape: Model, opts: Options, steps: int, seed: int) -> dict[str, Options]:
    """The blocks a run of `steps` steps trains that can hold its peak, each held there for the whole run: the
    lowest-numbered decoder layer among them (every layer has the same weights, and the lower the active layer,
    the more layers above it save activations for its gradient), and the embedding and final-norm-and-head blocks
    when the run trains them (their weights differ from a layer's). The order is replayed as the optimizer runs it
    (optim/badam.blocks_trained), the seed included for a random order; a phase never switches (not in the run,
    nor in simulate's trace of up to three steps)."""
    names = _block_names(shape, opts)
    start = _option(opts, "start_block")
    trained = set(blocks_trained(len(names), _option(opts, "switch_mode"), min(start, len(names) - 1)
                                 if start >= 0 else None, seed, _option(opts, "switch_every"), max(steps, 1)))
    layers = [i for i in trained if names[i].isdigit()]
    held = {i for i in trained if not names[i].isdigit()} | ({min(layers)} if layers else set())
    described = {"embedding": "the embedding", "rest": "final norm and LM head"}
    return {f"block {i} ({described.get(names[i], 'layer ' + names[i])})":
            {**opts, "start_block": i, "switch_every": max(steps, 3) + 2} for i in sorted(held)}  # no switch at all


def _option(opts: Options, name: str) -> Any:
    """A block option as given, else its default (the estimate may be called with options left out)."""
    return opts.get(name, OPTIONS[name].default)


def _block_names(shape: Model, opts: Options) -> list[str]:
    """Each block as the estimate names it: 'embedding', '<layer>', or 'rest' (final norm and LM head), in the
    order optim.badam.decoder_blocks makes them."""
    layers = [str(i) for i in range(shape.num_hidden_layers)]
    first = ["embedding"] if _option(opts, "include_embedding") else []
    return first + layers + (["rest"] if _option(opts, "include_lm_head") else [])


def active_block(shape: Model, opts: Options) -> str:
    """The block one estimate counts: start_block (each of `phases` sets it), else the order's first (descending:
    the last). Called without a phase, a random order's first block is unknown here (it depends on the run's
    seed): block 0 (layer 0 or the embedding), the one with the most saved activations."""
    names = _block_names(shape, opts)
    start = _option(opts, "start_block")
    if start >= 0:
        return names[min(start, len(names) - 1)]
    return names[-1] if _option(opts, "switch_mode") == "descending" else names[0]


def _in_block(name: str, block: str, opts: Options) -> bool:
    if block == "embedding":
        return name.startswith("embed")
    if block == "rest":  # final norm, LM head, and the embedding when it is no block of its own
        return "." not in name and not (_option(opts, "include_embedding") and name.startswith("embed"))
    return name.startswith(block + ".")


def layout(shape: Model, opts: Options) -> list[ParamShape]:
    """Every parameter; only the active block's train (a tied head belongs to the embedding, as in the model)."""
    block = active_block(shape, opts)
    return [ParamShape(p.name, p.shape, trainable=_in_block(p.name, block, opts)) for p in model_parameters(shape)]


def state_bytes(p: ParamShape, opts: Options, e: int) -> int:
    """The fp32 master, AdamW's two fp32 moments and its `step`, whatever the model's dtype."""
    return 3 * blocks(p.numel * 4) + TORCH_STEP


def whole_update(trainable: list[ParamShape], opts: Options, e: int, layerwise: bool, target: str) -> int:
    """The fp32 copies of the gradients (replacing the low-precision ones, freed as they go: the moment counts
    those as gradients, so only the difference is added) and AdamW's temporaries over the fp32 masters."""
    fp32 = [blocks(p.numel * 4) for p in trainable]
    copies = sum(fp32) - sum(blocks(p.numel * p.width(e)) for p in trainable) if e < 4 else 0
    impl = adamw_impl(opts, target, layerwise)
    adamw = {"foreach": sum(fp32), "fused": 0}.get(impl, 2 * max(fp32, default=0))
    return copies + adamw


def saved_activations(act: dict[str, int], shape: Model, tokens: int, e: int, checkpointing: bool,
                      opts: Options) -> dict[str, int]:
    """What the layers save with one block active (the module docstring lists it)."""
    h, i, layers = shape.hidden_size, shape.intermediate_size, shape.num_hidden_layers
    norm_input = blocks(tokens * h * 4) + blocks(tokens * 4)  # a norm's fp32 input and 1/rms
    frozen = act["layer"] - 4 * blocks(tokens * h * e) - blocks(tokens * i * e)
    block = active_block(shape, opts)
    embedding_trains = block == "embedding" or (block == "rest" and not _option(opts, "include_embedding"))
    # the final norm and the head save as in full training when they train, else only for the input's gradient;
    # a frozen head's input is no saved tensor, yet lives until the loss is computed
    head = act["head"] if block == "rest" else norm_input
    until_loss = 0 if block == "rest" else act["hidden"]
    if block == "rest" and not embedding_trains:  # nothing below the final norm needs a gradient
        head -= norm_input
    if checkpointing:  # each layer's checkpoint keeps its input, whichever trains; the recompute is the active one's
        return {**act, "layer": act["layer"] - norm_input, "head": head, "until_loss": until_loss}
    if embedding_trains:  # every layer's input needs its gradient
        saved = layers * frozen
    elif block == "rest":
        saved = 0
    else:
        saved = act["layer"] - norm_input + (layers - 1 - int(block)) * frozen
    return {**act, "saved_layers": saved, "head": head, "until_loss": until_loss}


def incompatible(strategy: str, opts: dict[str, Any]) -> str | None:
    return (f"BAdam changes which weights train at every block switch, but {strategy} fixes the set it reduces "
            "when it wraps the model (the badam package supports DeepSpeed ZeRO-3 for this)")


METHOD = MethodDef(
    name="badam",
    summary="BAdam: block coordinate descent, AdamW on one decoder layer's fp32 masters at a time",
    build=build,
    options=OPTIONS,
    paper="arXiv 2404.02827",
    estimate=EstimateTerms(state_bytes=state_bytes, whole_update_temporaries=whole_update, layout=layout,
                           saved_activations=saved_activations, phases=phases),
    periodic_steps=switch_steps,
    incompatible=incompatible,
)
