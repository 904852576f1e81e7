"""The `[distributed]` table of a scenario: strategy, world size(s), offload; and which methods compose with which.

A wrong combination (each method's `incompatible` hook says which) is reported with every other input
mistake, before any process starts.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from galore_bench.errors import Problems
from galore_bench.methods import REGISTRY

STRATEGIES = ("ddp", "fsdp2")
BACKENDS = ("auto", "gloo", "nccl")
FSDP_UNITS = ("layer", "linear")
KEYS = ("strategy", "world_size", "cpu_offload", "fsdp_unit", "backend", "timeout_s")


@dataclass(frozen=True, slots=True)
class DistributedSpec:
    """How a scenario's runs are spread over ranks (one process per device)."""

    strategy: str
    world_sizes: tuple[int, ...]
    """One size: run (or simulate) exactly that many ranks. Several (simulate only): the smallest that
    fits device.budget is reported, with every candidate's per-rank peak beside it."""
    cpu_offload: bool = False
    fsdp_unit: str = "layer"
    """FSDP2 wrapping: each decoder layer (torchtitan) or each Linear (like ZeRO-3's per-submodule fetch)."""
    backend: str = "auto"
    """auto: nccl on CUDA, gloo on CPU."""
    timeout_s: int = 300
    """Collective timeout: a rank that died makes the others fail after this, not hang."""

    @property
    def world_size(self) -> int:
        """The single world size of a real run (the largest candidate when several are listed)."""
        return max(self.world_sizes)

    def resolved_backend(self, on_cuda: bool) -> str:
        if self.backend != "auto":
            return self.backend
        return "nccl" if on_cuda else "gloo"


def run_problem(strategy: str, method: str, options: dict[str, Any]) -> str | None:
    """Why this method (with these options) cannot run under `strategy`, or None (the method's own hook says)."""
    found = REGISTRY.get(method)
    return found.strategy_problem(strategy, options) if found is not None else None


def _world_sizes(problems: Problems, value: Any, mode: str) -> tuple[int, ...]:
    allowed = "an int >= 1, or (simulate mode) a non-empty list of distinct ints >= 1"
    values = value if isinstance(value, list) else [value]
    if not values or any(not isinstance(v, int) or isinstance(v, bool) or v < 1 for v in values) \
            or len(set(values)) != len(values):
        problems.add("distributed.world_size", value, allowed)
        return (1,)
    if isinstance(value, list) and len(values) > 1 and mode == "measure":
        problems.add("distributed.world_size", value, "a single int in measure mode (a list is a simulate-mode search)")
    return tuple(sorted(values))


def parse_distributed(problems: Problems, table: dict[str, Any], runs: list[Any], mode: str) -> DistributedSpec | None:
    """Validate the table and every run against the chosen strategy; None when the scenario is single-device."""
    if not table:
        return None
    problems.unknown_keys("distributed.", table, list(KEYS))
    strategy = table.get("strategy")
    if strategy not in STRATEGIES:
        problems.add("distributed.strategy", strategy, "one of " + ", ".join(STRATEGIES))
        strategy = None
    sizes = _world_sizes(problems, table.get("world_size", 1), mode)
    offload = table.get("cpu_offload", False)
    if not isinstance(offload, bool):
        problems.add("distributed.cpu_offload", offload, "a bool (true/false)")
        offload = False
    elif offload and strategy == "ddp":
        problems.add("distributed.cpu_offload", offload, "false with strategy ddp (CPU offload is an FSDP2 policy)")
    unit = table.get("fsdp_unit", "layer")
    if unit not in FSDP_UNITS:
        problems.add("distributed.fsdp_unit", unit, "one of " + ", ".join(FSDP_UNITS))
        unit = "layer"
    elif "fsdp_unit" in table and strategy == "ddp":
        problems.add("distributed.fsdp_unit", unit, "nothing with strategy ddp (FSDP2 wrapping only)")
    backend = table.get("backend", "auto")
    if backend not in BACKENDS:
        problems.add("distributed.backend", backend, "one of " + ", ".join(BACKENDS))
    timeout = table.get("timeout_s", 300)
    if not isinstance(timeout, int) or isinstance(timeout, bool) or timeout < 10:
        problems.add("distributed.timeout_s", timeout, "an int >= 10 (seconds)")
        timeout = 300
    if strategy is not None:
        for i, run in enumerate(runs):
            reason = run_problem(strategy, run.method, run.options)
            if reason:
                problems.add(f"runs[{i}] ({run.label}) distributed.strategy", strategy,
                             "another strategy: " + reason)
    return DistributedSpec(strategy or "ddp", sizes, offload, unit, backend if backend in BACKENDS else "auto", timeout)
