"""AdamW (torch.optim), the full-rank baseline of both papers; optionally stepped layer-wise."""
from __future__ import annotations

from typing import Any

import torch

from galore_bench.methods.base import MethodDef, Trainer, TrainSettings
from galore_bench.methods.common import (
    ADAM_OPTIONS,
    IMPL_OPTION,
    adamw_state,
    adamw_update_temporaries,
    adamw_whole_update,
    impl_flags,
    layerwise_or_plain,
    trainable,
)
from galore_bench.methods.terms import EstimateTerms


def build(model: torch.nn.Module, opts: dict[str, Any], train: TrainSettings) -> Trainer:
    params = trainable(model)
    flags = impl_flags(opts["impl"], params)
    if opts.get("layerwise"):
        flags = {"foreach": False}  # one tensor per optimizer: nothing to batch
    hyper = dict(lr=opts["lr"], weight_decay=opts["weight_decay"], betas=(opts["beta1"], opts["beta2"]),
                 eps=opts["eps"], **flags)

    def make(groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
        return torch.optim.AdamW(groups, **hyper)

    info = {"optimizer": "torch.optim.AdamW", "impl": next((k for k, v in flags.items() if v), "for-loop")}
    return layerwise_or_plain(model, [{"params": params}], make, opts, info)


METHOD = MethodDef(
    name="adamw",
    summary="AdamW, full rank (torch.optim)",
    build=build,
    options={**ADAM_OPTIONS,
             "impl": IMPL_OPTION},
    paper="baseline in arXiv 2403.03507 and 2306.09782",
    estimate=EstimateTerms(state_bytes=adamw_state, update_temporaries=adamw_update_temporaries,
                           whole_update_temporaries=adamw_whole_update),
)
