"""Stage 3: the three engines (estimate, simulate, measure) and their instruments; they return typed results.

`resolve_mode` lives here because "auto" is a question about the engines: which one the device at hand can
run in reasonable time. The sweep asks it before starting any process, each run's process again on its own
device, and the cluster submitter to size a job; a scenario file alone cannot answer it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from galore_bench.errors import UserError
from galore_bench.models import parameter_count

if TYPE_CHECKING:
    from galore_bench.spec.scenario import RunSpec, Scenario

CPU_MEASURE_MAX_PARAMS = 200_000_000  # beyond this, real CPU steps take minutes: auto simulates instead


def resolve_mode(scenario: Scenario, run: RunSpec, requested: str | None, device: str) -> str:
    """The engine for one run: the requested mode (else the scenario's), with 'auto' resolved for `device`.

    auto: real steps when the device can hold and run them in reasonable time, else a fake-tensor trace; a
    list of world sizes is always a simulate-mode search. Estimate cannot take a [distributed] table.
    """
    mode = requested or scenario.mode
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
    return "measure" if parameter_count(run.model) <= CPU_MEASURE_MAX_PARAMS else "simulate"
