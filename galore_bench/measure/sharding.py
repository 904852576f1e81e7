"""Simulated N-rank memory: sharding arithmetic applied, tensor by tensor, to one traced single-device step.

Why not fake tensors under a fake process group running the real fully_shard? That needs one trace per
world size, a dispatch-mode tracker sees DTensor-level ops (not the shard temporaries beneath them), and
on a CPU-only host offloaded memory cannot be told apart from device memory. Instead the step is traced
once on one fake device (the real method code, as `simulate` always does) and, at every allocation,
each candidate world size's per-rank bytes are recomputed (checked against real 2-rank gloo runs in
tests/test_distributed.py):

* FSDP2: every weight, gradient, optimizer state and optimizer-phase temporary keeps its dim-0 shard,
  padded to ceil(rows / N) rows as FSDP2 pads it; while a forward or backward runs, each rank also holds
  the all-gathered units FSDP2 needs (see `fsdp2_transients`), counted as `other`;
* FSDP2 + CPU offload: the shards live in host memory (reported apart); only the transients stay;
* DDP: everything replicated; gradients live in DDP's buckets (views) for the whole step.
Ranks are symmetric (FSDP2 pads every shard to the same size), so one set of numbers stands for each.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._pytree import tree_flatten

from galore_bench.measure import training
from galore_bench.measure.tracker import PHASE_CATEGORY, MemoryTracker
from galore_bench.units import CATEGORIES, CUDA_BLOCK, allocator_bytes

SHARDED = ("weights", "gradients", "optimizer_states")
PREFETCH_UNITS = 2  # FSDP2 holds the unit it computes and the next, prefetched one
HOW = ("sharding arithmetic over a single-device fake-tensor trace of the real step (galore_bench.measure.sharding): "
       "FSDP2 dim-0 shards padded like FSDP2, + all-gathered units while forward/backward run; ranks symmetric")


@dataclass(frozen=True, slots=True)
class Plan:
    """One candidate layout: `single` (no wrapper), `ddp` or `fsdp2`, on `world_size` ranks."""

    strategy: str
    world_size: int
    cpu_offload: bool = False
    fsdp_unit: str = "layer"

    @property
    def shards(self) -> bool:
        return self.strategy == "fsdp2"


def plans_for(strategy: str, world_sizes: Iterable[int], cpu_offload: bool, fsdp_unit: str = "layer") -> list[Plan]:
    """World size 1 is a plain single-device run: a wrapper over one rank saves nothing."""
    return [Plan("single", 1) if n == 1 else Plan(strategy, n, cpu_offload, fsdp_unit) for n in world_sizes]


def shard_bytes(tensor: torch.Tensor, full_bytes: int, world_size: int, round_to: int) -> int:
    """One rank's bytes of `tensor` sharded on dim 0 over `world_size` (0-dim tensors are replicated)."""
    if tensor.dim() == 0 or world_size == 1:
        return full_bytes
    rows = tensor.shape[0]
    if rows == 0:
        return 0
    raw = tensor.numel() * tensor.element_size()
    local = math.ceil(rows / world_size) * (raw // rows)
    if raw != full_bytes:  # a view of a bigger (or rounded) storage: scale the storage instead
        local = math.ceil(full_bytes * math.ceil(rows / world_size) / rows)
    return allocator_bytes(local, round_to)


def fsdp2_units(model: torch.nn.Module, unit: str = "layer") -> list[torch.nn.Module]:
    """The modules `distributed.wrap` shards as FSDP2 units (the root module gets the rest).

    layer: each decoder layer, the embedding and the head (torchtitan's layout);
    linear: each Linear and the embedding: finer all-gathers, like DeepSpeed ZeRO-3's per-submodule fetch.
    """
    ends = [m for name, m in model.named_modules() if name.split(".")[-1] in ("embed_tokens", "lm_head")]
    if unit == "linear":
        leaves = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m not in ends
                  and any(True for _ in m.parameters(recurse=False))]
        return leaves + ends
    layers = [m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")]
    return layers + ends


def fsdp2_transients(model: torch.nn.Module, world_size: int, round_to: int = 1,
                     unit: str = "layer") -> dict[str, int]:
    """Per-rank bytes FSDP2 allocates around the largest unit (U params, Ug their trainable gradients).

    forward: 2U (computed + prefetched unit, all-gathered) + U/N (the all-gather input copy);
    backward: the same + Ug (unsharded gradients) + Ug (the reduce-scatter input they are copied into)
    + Ug/N (reduce-scatter output); see torch/distributed/fsdp/_fully_shard/_fsdp_collectives.py.
    """
    def size(params: list[torch.nn.Parameter]) -> int:
        return sum(allocator_bytes(p.numel() * p.element_size(), round_to) for p in params)

    units = [list(u.parameters()) for u in fsdp2_units(model, unit)] or [list(model.parameters())]
    big = max(units, key=size)
    u, ug = size(big), size([p for p in big if p.requires_grad])
    gather = PREFETCH_UNITS * u + math.ceil(u / world_size)
    return {"forward": gather, "backward": gather + 2 * ug + math.ceil(ug / world_size),
            "unit_bytes": u, "unit_grad_bytes": ug}


class _RankBytes:
    """Running per-rank totals for one plan, and their peak."""

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.removed = dict.fromkeys(CATEGORIES, 0)  # bytes this rank does not hold on its device
        self.host = dict.fromkeys(CATEGORIES, 0)  # offloaded shards
        self.transients = {"forward": 0, "backward": 0}
        self.bucket_bytes = 0  # DDP gradient buckets
        self.peak, self.breakdown, self.peak_host = 0, dict.fromkeys(CATEGORIES, 0), 0


class ShardingTracker(MemoryTracker):
    """A MemoryTracker that also keeps, for each plan, what one rank would hold at the same moment."""

    def __init__(self, plans: list[Plan], round_to: int = 1) -> None:
        super().__init__(round_to=round_to)
        self.ranks = [_RankBytes(plan) for plan in plans]
        self._kept: dict[int, tuple[str, int, list[tuple[int, int]]]] = {}  # key -> (category, full, per plan)
        self._stack: list[str] = []
        self._ready = False

    def configure(self, model: torch.nn.Module) -> None:
        """Unit sizes and DDP buckets come from the built model; per-rank peaks count from here on."""
        trainable = [p for p in model.parameters() if p.requires_grad]
        bucket = sum(p.numel() * p.element_size() for p in trainable)
        for rank in self.ranks:
            if rank.plan.shards:
                t = fsdp2_transients(model, rank.plan.world_size, self.round_to, rank.plan.fsdp_unit)
                rank.transients = {"forward": t["forward"], "backward": t["backward"]}
            if rank.plan.strategy == "ddp":
                rank.bucket_bytes = bucket
        self._ready = True
        self._observe()

    # -- per-tensor sharding ----------------------------------------------------------------------
    def _keep(self, key: int, tensor: torch.Tensor, category: str) -> None:
        """Record how much of this storage each plan's rank keeps on its device (and on the host)."""
        self._drop(key)
        entry = self._live.get(key)
        if entry is None or category not in SHARDED + ("other",):
            return
        full, per_plan = entry[1], []
        for rank in self.ranks:
            if not rank.plan.shards:
                per_plan.append((full, 0))
                continue
            local = shard_bytes(tensor, full, rank.plan.world_size, self.round_to)
            per_plan.append((0, local) if rank.plan.cpu_offload else (local, 0))  # offload: shards on the host
        self._kept[key] = (category, full, per_plan)
        for rank, (device, host) in zip(self.ranks, per_plan):
            rank.removed[category] += full - device
            if host:
                rank.host[category] += host

    def _drop(self, key: int) -> None:
        old = self._kept.pop(key, None)
        if old is None:
            return
        category, full, per_plan = old
        for rank, (device, host) in zip(self.ranks, per_plan):
            rank.removed[category] -= full - device
            if host:
                rank.host[category] -= host

    def label(self, tensors: Iterable[torch.Tensor], category: str) -> None:
        tensors = list(tensors)
        super().label(tensors, category)
        for tensor in tensors:
            key = id(tensor.untyped_storage())
            if category in SHARDED:
                self._keep(key, tensor, category)
            else:
                self._drop(key)
        self._observe()

    def _free(self, key: int) -> None:
        self._drop(key)
        super()._free(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        out = func(*args, **(kwargs or {}))
        category, added = PHASE_CATEGORY.get(self._phase, "other"), False
        for value in tree_flatten(out)[0]:
            if isinstance(value, torch.Tensor):
                storage = value.untyped_storage()
                if id(storage) in self._live:
                    continue
                self._add(storage, category)
                added = True
                if self._phase == "optimizer":  # an update runs on each rank's own shards
                    self._keep(id(storage), value, "other")
        if added:
            self._observe()
        return out

    # -- phases and peaks -------------------------------------------------------------------------
    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Nested phases: LOMO's update runs inside backward, where FSDP2 still holds its gathered units."""
        with super().phase(name):
            self._stack.append(name)
            try:
                self._observe()
                yield
            finally:
                self._stack.pop()

    def _transient(self, rank: _RankBytes) -> int:
        if "backward" in self._stack:
            return rank.transients["backward"]
        return rank.transients["forward"] if "forward" in self._stack else 0

    def rank_breakdown(self, rank: _RankBytes) -> dict[str, int]:
        """What one rank of this plan holds right now, by category."""
        now = {c: self.totals[c] - rank.removed[c] for c in CATEGORIES}
        if rank.plan.strategy == "ddp":
            now["gradients"] = rank.bucket_bytes
        now["other"] += self._transient(rank)
        return now

    def _observe(self) -> None:
        if not self._ready:
            return
        for rank in self.ranks:
            now = self.rank_breakdown(rank)
            total = sum(now.values())
            if total > rank.peak:
                rank.peak, rank.breakdown, rank.peak_host = total, now, sum(rank.host.values())

    def reset_peak(self) -> None:
        super().reset_peak()
        for rank in self.ranks:
            rank.peak = 0
        self._observe()

    def results(self) -> list[dict[str, Any]]:
        """Per plan: the per-rank peak, its breakdown, host bytes then, and the FSDP2 transients assumed."""
        return [{"strategy": r.plan.strategy, "world_size": r.plan.world_size, "cpu_offload": r.plan.cpu_offload,
                 "fsdp_unit": r.plan.fsdp_unit if r.plan.shards else None, "peak_bytes": r.peak,
                 "breakdown": dict(r.breakdown), "host_bytes": r.peak_host, "transient_bytes": dict(r.transients)}
                for r in self.ranks]


def trace(scenario: Any, run: Any, plans: list[Plan]) -> tuple[ShardingTracker, Any]:
    """Two fake-tensor steps of the real method code on one device, every plan's rank followed throughout."""
    tracker = ShardingTracker(plans, round_to=CUDA_BLOCK)
    done = training.train_steps(scenario, run, fake=True, device="cpu", steps=training.SIMULATE_STEPS, tracker=tracker,
                              on_built=lambda trainer: tracker.configure(trainer.model))
    return tracker, done["trainer"]
