"""The method registry: an explicit tuple, in the fixed order reports use."""
from __future__ import annotations

from galore_bench.methods import adafactor, adam8bit, adamw, galore, inference, lomo, lora, sgd
from galore_bench.methods.base import MethodDef, Option, Trainer, TrainSettings

METHODS: tuple[MethodDef, ...] = (
    adamw.METHOD,
    sgd.METHOD,
    adam8bit.METHOD,
    adafactor.METHOD,
    galore.METHOD,
    galore.METHOD_8BIT,
    lomo.METHOD,
    lora.LORA,
    lora.RELORA,
    lora.LOW_RANK,
    inference.METHOD,
)
REGISTRY: dict[str, MethodDef] = {m.name: m for m in METHODS}

__all__ = ["METHODS", "REGISTRY", "MethodDef", "Option", "TrainSettings", "Trainer"]
