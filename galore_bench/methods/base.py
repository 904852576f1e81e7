"""What every method adapter provides: its options, its limits, its estimate terms, and a trainer for one update."""
from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from galore_bench.errors import type_name
from galore_bench.methods.terms import EstimateTerms


@dataclass(frozen=True, slots=True)
class Option:
    """One method option as a scenario may set it."""

    kind: type
    default: Any
    help: str
    minimum: float | None = None
    choices: tuple[Any, ...] | None = None

    def problem(self, value: Any) -> str | None:
        """The 'allowed ...' text when `value` is not acceptable, else None."""
        if self.kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value) if abs(value) < 2**1023 else math.inf  # a 400-digit int: no float holds it
        if not isinstance(value, self.kind) or (self.kind is int and isinstance(value, bool)):
            return type_name(self.kind)
        if isinstance(value, float) and not math.isfinite(value):  # TOML has nan and inf: no optimizer takes them
            return "a finite number" + (f" >= {self.minimum:g}" if self.minimum is not None else "")
        if self.choices is not None and value not in self.choices:
            return "one of " + ", ".join(map(str, self.choices))
        if self.minimum is not None and isinstance(value, (int, float)) and value < self.minimum:
            return f"{type_name(self.kind)} >= {self.minimum:g}"
        return None


@dataclass(frozen=True, slots=True)
class TrainSettings:
    """Training settings shared by every run of a scenario."""

    batch_size: int = 8
    seq_len: int = 256
    dtype: str = "bf16"
    steps: int = 3
    activation_checkpointing: bool = False
    grad_accum: int = 1
    seed: int = 0
    warmup_steps: int = 0
    lr_schedule: str = "constant"  # or "cosine": warm-up, then cosine decay to 10% (the papers' schedule)
    loss: str = "full"  # or "chunked" (chunked_loss.py), "model-dtype" (model_dtype_loss.py: the LOMO paper's)
    loss_chunk_tokens: int = 1024  # tokens per chunk of the chunked loss (chunked_loss.DEFAULT_CHUNK_TOKENS)
    precision: str = ""  # methods/precision.py: "" = pure training in `dtype`; bf16-mixed, fp16-mixed, bf16-master


LOSS_NAMES = ("full", "chunked", "model-dtype")
"""The loss paths: transformers' own (fp32 upcast), chunked_loss.py's, model_dtype_loss.py's (no upcast)."""
PRECISION_NAMES = ("", "fp32", "bf16", "fp16", "bf16-mixed", "fp16-mixed", "bf16-master")
"""methods/precision.py's recipes ("" = the scenario's); named here so every method's options can offer them."""


class Trainer:
    """Backward plus one optimizer update, the unit every method is measured on."""

    grad_enabled = True
    """Whether the engines run the forward with autograd on (off only for the inference reference)."""
    amp: Any = None
    """methods.precision.Amp when the run autocasts, scales its loss or keeps fp32 master weights."""

    def __init__(self, model: torch.nn.Module, optimizer: Any, scheduler: Any = None,
                 info: dict[str, Any] | None = None) -> None:
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.info = info or {}

    def forward_context(self) -> contextlib.AbstractContextManager[Any]:
        """What the forward runs under: autocast for mixed precision, else nothing."""
        return self.amp.autocast() if self.amp is not None else contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of one micro-batch (fused-update methods also update here)."""
        (self.amp.scale(loss) if self.amp is not None else loss).backward()

    def update(self, step: int) -> None:
        """The optimizer step after all micro-batches (a no-op for layer-wise stepping)."""
        if self.amp is not None:
            self.amp.step(self.optimizer)
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.scheduler is not None:
            self.scheduler.step()

    def lr_groups(self) -> list[dict[str, Any]]:
        """Every parameter group whose 'lr' an LR schedule moves (a layer-wise optimizer's inner groups too)."""
        return list(getattr(self.optimizer, "param_groups", []))

    def state_tensors(self) -> Iterator[torch.Tensor]:
        """Every tensor the optimizer keeps between steps (the 'optimizer_states' category)."""
        yield from _tensors_in(getattr(self.optimizer, "state", {}))
        if self.amp is not None:
            yield from self.amp.state_tensors()


def _tensors_in(state: Any) -> Iterator[torch.Tensor]:
    values = state.values() if isinstance(state, Mapping) else state
    for value in values:
        if isinstance(value, torch.Tensor):
            yield value
        elif isinstance(value, (Mapping, list, tuple)):
            yield from _tensors_in(value)


@dataclass(frozen=True, slots=True)
class TracePlan:
    """An extra step a short simulate trace needs to see a periodic cost (GaLore: a projector refresh)."""

    extra_step: str
    """What the extra step does; the record says `includes_<extra_step>`."""
    options: Callable[[dict[str, Any]], dict[str, Any]]
    """The run's options rewritten so the extra step happens within the trace."""


FUSED_WITH_DDP = ("updates each weight inside backward, before DDP all-reduces that gradient's bucket: every rank "
                  "would apply its own local gradient and the replicas drift apart; use strategy fsdp2, whose "
                  "post-accumulate-grad hooks fire after the reduce-scatter")


@dataclass(frozen=True, slots=True)
class MethodDef:
    """A registered method: everything the package knows about it, so a method is one file."""

    name: str
    summary: str
    build: Callable[[torch.nn.Module, dict[str, Any], TrainSettings], Trainer]
    options: dict[str, Option] = field(default_factory=dict)
    supports_grad_accum: bool = True
    uses_rank: bool = False
    paper: str = ""
    prepare: Callable[[torch.nn.Module, dict[str, Any], TrainSettings], torch.nn.Module] | None = None
    """Changes the model before training (LoRA adapters, low-rank factors); runs in the engine's tensor mode."""
    trains: bool = True
    """False for the forward-only inference reference: no gradients, no update, forward-only model FLOPs."""
    estimate: EstimateTerms | None = None
    """Closed-form bytes for `estimate`; None: `estimate` refuses the method (simulate and measure still work)."""
    no_estimate_reason: str = ""
    """Why a method has no estimate terms on purpose (a test holds every method to one or the other)."""
    trace_plan: TracePlan | None = None
    """A periodic cost simulate must trace (one step more than usual)."""
    periodic_steps: Callable[[dict[str, Any], int], dict[str, set[int]]] | None = None
    """(options, steps) -> {name: steps with that periodic extra cost}, timed apart from the throughput median."""
    incompatible: Callable[[str, dict[str, Any]], str | None] | None = None
    """(strategy, options) -> why the method cannot run under that distributed strategy, or None."""
    check: Callable[[dict[str, Any], Any], list[tuple[str, str, str]]] | None = None
    """(options, the run's model or None) -> (field, got, allowed) for what the options' own types cannot say
    (peft's validation of an adapter config), found when the scenario loads rather than in the run's process."""
    model_problem: Callable[[torch.nn.Module, dict[str, Any]], str | None] | None = None
    """(the model on the meta device, options) -> what the method needs of the model that this one lacks, phrased
    as what is allowed (the scenario check reports it when the file loads, naming the run and model), or None."""

    def all_options(self) -> dict[str, Option]:
        common = {
            "lr": Option(float, 1e-3, "peak learning rate", minimum=0.0),
            "weight_decay": Option(float, 0.0, "decoupled weight decay", minimum=0.0),
            "label": Option(str, "", "run name in reports (default: derived from method and options)"),
            "precision": Option(str, "", "this run's precision (default: train.precision)", choices=PRECISION_NAMES),
            "loss": Option(str, "", "this run's loss path (default: train.loss)", choices=("", *LOSS_NAMES)),
        }
        return {**common, **self.options}

    def limits(self, opts: dict[str, Any], train: TrainSettings, model: Any = None) -> list[tuple[str, str, str]]:
        """(field, got, allowed) for each combination this method cannot run (`model`: the run's, when known)."""
        problems = [] if self.check is None else list(self.check(opts, model))
        if not self.trains and train.grad_accum > 1:
            problems.append(("train.grad_accum", str(train.grad_accum), f"1 with {self.name} (no gradients)"))
        layerwise = bool(opts.get("layerwise", False))
        if train.grad_accum > 1 and (layerwise or not self.supports_grad_accum):
            why = "layer-wise updates" if layerwise else self.name
            problems.append(("train.grad_accum", str(train.grad_accum),
                             f"1 with {why} (the update happens inside backward, before the next micro-batch)"))
        return problems

    def strategy_problem(self, strategy: str, opts: dict[str, Any]) -> str | None:
        """Why this method, with these options, cannot run under a distributed strategy (None: it can)."""
        reason = self.incompatible(strategy, opts) if self.incompatible is not None else None
        if reason is None and strategy == "ddp" and opts.get("layerwise"):
            reason = "layer-wise stepping " + FUSED_WITH_DDP
        return reason
