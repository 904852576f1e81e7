"""Training precision: which dtype the weights, gradients and optimizer states live in, and what computes.

`train.precision` (or a run's own `precision`) names one recipe:

  fp32, bf16, fp16   pure: weights, gradients, states and compute in that dtype (bf16: the papers' GaLore runs);
  bf16-mixed         the HF Trainer's `bf16=True`: fp32 weights, gradients and states, the forward under
                     `torch.autocast(bf16)` (its weight-cast cache and each op's casts are traced as activations);
  fp16-mixed         the same with fp16 and `torch.amp.GradScaler` (loss scaled, gradients unscaled and checked
                     for inf/NaN before the step, the step skipped on overflow);
  bf16-master        BF16 weights and gradients, an fp32 master copy and fp32 states in the optimizer (DeepSpeed's
                     fp16 optimizer, the LOMO paper's AdamW and SGD rows). The master copy is counted under
                     optimizer_states: only the optimizer keeps it.

`train.dtype` is the weights' dtype. Without `precision` it keeps its old meaning (pure training in it); with a
precision, dtype may be left out (it follows) or must equal the precision's weight dtype.
"""
from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from galore_bench.methods.base import MethodDef, Trainer, TrainSettings
from galore_bench.models import DTYPES
from galore_bench.optim.master import MasterWeights, TraceableGradScaler


@dataclass(frozen=True, slots=True)
class Precision:
    name: str
    weights: str
    """dtype of the model's parameters and gradients."""
    compute: str | None = None
    """autocast dtype of the forward (None: ops run in the weights' dtype)."""
    master: bool = False
    """fp32 master copy and fp32 optimizer states."""
    scaler: bool = False
    """torch.amp.GradScaler loss scaling (fp16 compute)."""

    @property
    def state_dtype(self) -> str:
        return "fp32" if self.master else self.weights


PRECISIONS = {p.name: p for p in (
    Precision("fp32", "fp32"), Precision("bf16", "bf16"), Precision("fp16", "fp16"),
    Precision("bf16-mixed", "fp32", compute="bf16"),
    Precision("fp16-mixed", "fp32", compute="fp16", scaler=True),
    Precision("bf16-master", "bf16", master=True),
)}
NO_MASTER = {"lomo": "LOMO keeps no optimizer and no master copy (the paper runs it in pure fp16 with loss_scale)",
             "relora": "ReLoRA merges and re-initialises the adapters in place, which a master copy would not follow",
             "inference": "a forward-only run has no optimizer to keep a master copy"}


def precision_of(train: TrainSettings, options: dict[str, Any] | None = None) -> Precision:
    """The run's precision: its own `precision` option, else the scenario's, else pure training in train.dtype."""
    name = (options or {}).get("precision") or train.precision or train.dtype
    return PRECISIONS[name]


def run_settings(train: TrainSettings, options: dict[str, Any] | None = None) -> TrainSettings:
    """The scenario's training settings as this run trains: its precision, dtype = the weights' dtype, its loss."""
    chosen = precision_of(train, options)
    loss = (options or {}).get("loss") or train.loss
    return dataclasses.replace(train, precision=chosen.name, dtype=chosen.weights, loss=loss)


def train_problems(table: dict[str, Any], train: TrainSettings) -> list[tuple[str, Any, str]]:
    """(field, got, allowed) when train.dtype, given explicitly, contradicts train.precision."""
    if not train.precision or "dtype" not in table or train.precision not in PRECISIONS:
        return []
    weights = PRECISIONS[train.precision].weights
    if train.dtype == weights:
        return []
    allowed = (f"'{weights}' with precision '{train.precision}' (the weights' dtype; "
               "leave dtype out and it follows the precision)")
    return [("train.dtype", train.dtype, allowed)]


def method_problems(method: MethodDef, opts: dict[str, Any], train: TrainSettings) -> list[tuple[str, str, str]]:
    """(field, got, allowed) for a precision this method, with these options, cannot train in (or a loss path
    that precision does not have)."""
    chosen = precision_of(train, opts)
    where = "precision" if opts.get("precision") else "train.precision"
    layerwise = bool(opts.get("layerwise")) or not method.supports_grad_accum
    how = "layer-wise updates" if opts.get("layerwise") else method.name
    problems = []
    if chosen.scaler and layerwise:
        problems.append((where, chosen.name, (f"a precision other than fp16-mixed with {how}: a GradScaler must "
                         "unscale and check every gradient for inf/NaN before any weight changes, and these update "
                         "inside backward (LOMO: use precision fp16 with loss_scale)")))
    if chosen.master and (method.name in NO_MASTER or opts.get("layerwise")):
        why = NO_MASTER.get(method.name, "layer-wise updates step inside backward, where no master copy is kept")
        problems.append((where, chosen.name, f"a precision other than bf16-master with {how}: {why}"))
    loss = opts.get("loss") or train.loss
    if loss == "model-dtype" and chosen.compute:
        why = (f"'full' or 'chunked' with {chosen.name}: the model-dtype loss is the paper's path for a model that "
               "computes in its weights' dtype (autocast would upcast its log-softmax to fp32 anyway)")
        problems.append(("loss" if opts.get("loss") else "train.loss", loss, why))
    return problems


class Amp:
    """A trainer's precision at run time: the forward's autocast, the loss scale, the master-weight update."""

    def __init__(self, precision: Precision, trainer: Trainer, device_type: str) -> None:
        self.precision, self.device_type = precision, device_type
        self.scaler = TraceableGradScaler(device_type) if precision.scaler else None
        has_optimizer = isinstance(trainer.optimizer, torch.optim.Optimizer)
        self.master = MasterWeights(trainer.optimizer) if precision.master and has_optimizer else None

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.precision.compute is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=DTYPES[self.precision.compute])

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        return self.scaler.scale(loss) if self.scaler is not None else loss

    def step(self, optimizer: Any) -> None:
        if self.master is not None:
            self.master.step()
        elif self.scaler is not None:
            self.scaler.step(optimizer)
            self.scaler.update()
        else:
            optimizer.step()

    def state_tensors(self) -> Iterator[torch.Tensor]:
        return self.master.copies() if self.master is not None else iter(())


def apply(trainer: Trainer, train: TrainSettings, options: dict[str, Any]) -> Trainer:
    """Give the built trainer its run's precision (pure precisions need nothing: the model is built in it)."""
    chosen = precision_of(train, options)
    if chosen.compute is None and not chosen.master and not chosen.scaler:
        return trainer
    first = next(trainer.model.parameters(), None)
    device_type = first.device.type if first is not None else "cpu"
    trainer.amp = Amp(chosen, trainer, device_type)
    trainer.info["precision"] = chosen.name
    return trainer
