"""A quality study in a scenario: several seeds, a learning-rate grid per run, an interleaved step-time cost.

```toml
[study]
seeds = [0, 1, 2]      # the first seed also tunes: every lr of a run's grid is trained on it
cost_rounds = 12       # step-time cost: rounds of the interleaved measurement (0: none)
cost_steps = 2         # steps per method per round

[[runs]]
method = "galore"
lr_grid = [3e-3, 1e-2, 3e-2]   # instead of lr: chosen by the held-out 'tune' split's loss at the first seed
```

A run with a grid is trained once per grid value at the first seed; the value with the lowest loss on the
tune split is then trained at the other seeds. The final figures are measured on a separate test split, so
the choice never sees them (data_bytes.py; for the 32k-token text, the validation split does both).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from galore_bench.errors import Problems

MAX_GRID, MAX_SEEDS, MAX_ROUNDS = 32, 64, 10_000


@dataclass(frozen=True, slots=True)
class StudySpec:
    seeds: tuple[int, ...]
    cost_rounds: int = 0
    cost_steps: int = 2

    @property
    def tune_seed(self) -> int:
        return self.seeds[0]


def _int_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)


def parse_study(problems: Problems, table: dict[str, Any], default_seed: int) -> StudySpec:
    """The [study] table (its fields all optional): seeds default to the scenario's train.seed."""
    problems.unknown_keys("study.", table, ["seeds", "cost_rounds", "cost_steps"])
    seeds = table.get("seeds", [default_seed])
    if not _int_list(seeds) or not 1 <= len(seeds) <= MAX_SEEDS or len(set(seeds)) != len(seeds) \
            or any(not 0 <= s < 2**63 for s in seeds):
        problems.add("study.seeds", seeds, f"a list of 1 to {MAX_SEEDS} distinct ints >= 0")
        seeds = [default_seed]
    numbers = {}
    for key, default, low in (("cost_rounds", 0, 0), ("cost_steps", 2, 1)):
        value = table.get(key, default)
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= MAX_ROUNDS:
            problems.add(f"study.{key}", value, f"an int from {low} to {MAX_ROUNDS:,}")
            value = default
        numbers[key] = value
    return StudySpec(tuple(seeds), numbers["cost_rounds"], numbers["cost_steps"])


def parse_lr_grid(problems: Problems, where: str, run: dict[str, Any]) -> tuple[float, ...]:
    """A run's `lr_grid`: 1 to 32 distinct finite learning rates > 0, given instead of `lr`."""
    if "lr_grid" not in run:
        return ()
    grid = run["lr_grid"]
    numbers = isinstance(grid, list) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in grid)
    if not numbers or not 1 <= len(grid) <= MAX_GRID or any(not math.isfinite(v) or v <= 0 for v in grid) \
            or len(set(grid)) != len(grid):
        problems.add(f"{where}.lr_grid", grid, f"a list of 1 to {MAX_GRID} distinct finite numbers > 0")
        return ()
    if "lr" in run:
        problems.add(f"{where}.lr", run["lr"], "not set together with lr_grid (the grid chooses the rate)")
    return tuple(float(v) for v in grid)


def grid_label(label: str, lr: float, seed: int) -> str:
    """The record label of one training of a study: the run's label, its learning rate and seed."""
    return f"{label}@lr={lr:g}@seed={seed}"
