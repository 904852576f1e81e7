"""Stage 3: the three engines (estimate, simulate, measure) and their instruments; they return typed results.

`resolve_mode` lives here because "auto" is a question about the engines: which one the device at hand can
run in reasonable time. The sweep asks it before starting any process, each run's process again on its own
device, and the cluster submitter to size a job; a scenario file alone cannot answer it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import psutil

from galore_bench.errors import UserError
from galore_bench.measure.estimate import estimate_run
from galore_bench.models import DTYPES, parameter_count
from galore_bench.units import format_bytes

if TYPE_CHECKING:
    from galore_bench.spec.scenario import RunSpec, Scenario

CPU_MEASURE_MAX_PARAMS = 200_000_000  # beyond this, real CPU steps take minutes: auto simulates instead


def resolve_mode(scenario: Scenario, run: RunSpec, requested: str | None, device: str) -> str:
    """The engine for one run: the requested mode (else the scenario's), with 'auto' resolved for `device`.

    auto: real steps when the device can hold and run them in reasonable time, else a fake-tensor trace; a
    list of world sizes is always a simulate-mode search. Estimate cannot take a [distributed] table.
    """
    mode = requested or scenario.mode
    if mode == "measure" and device != "cuda" and (need := host_bytes_needed(scenario, run)) > _available():
        raise UserError(
            f"{scenario.path}: run {run.label}: mode measure on this {device} needs about "
            f"{format_bytes(need)} ({need:,} bytes, estimated), more than the {format_bytes(_available())} "
            "of host memory available: "
            "use --mode simulate (a fake-tensor trace, no memory taken) or estimate")
    spec = scenario.distributed
    if spec is not None and mode == "estimate":
        raise UserError(
            f"{scenario.path}: mode: got 'estimate', allowed simulate or measure with [distributed] "
            "(the closed form does not model sharding; simulate applies it to the traced step)"
        )
    if mode != "auto":
        return mode
    if spec is not None and len(spec.world_sizes) > 1:
        return "simulate"
    if device == "cuda":
        return "measure"
    if parameter_count(run.model) > CPU_MEASURE_MAX_PARAMS:
        return "simulate"
    return "measure" if host_bytes_needed(scenario, run) <= _available() else "simulate"


def host_bytes_needed(scenario: Scenario, run: RunSpec) -> int:
    """What real steps of the run hold in host memory: the closed-form estimate for a CPU run, or, for a
    method without estimate terms, weights and gradients in the run's dtype plus two fp32 optimizer states."""
    try:
        return estimate_run(scenario, run, target="cpu").peak_bytes
    except UserError:  # EstimateUnavailable: a plugin method
        return parameter_count(run.model) * (2 * DTYPES[scenario.train.dtype].itemsize + 8)


def _available() -> int:
    return int(psutil.virtual_memory().available)
