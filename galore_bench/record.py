"""The result record: one run's JSON, typed (schema version 3), its upgrades from versions 1 and 2, its accessors.

Version 2 is a full schema (version 3 adds `memory.readings`: allocated, reserved, device_total): every key
below is present in every record (null where a run did not get that far), so readers index it directly. Older
files are upgraded one version at a time as they are read (the asv pattern); galore_bench.store is the only
module that reads and writes the files.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Literal, TypedDict

from galore_bench import readings as readings_of_engines
from galore_bench.errors import SAFE_NAME, is_safe_name, one_of
from galore_bench.record_types import type_problems
from galore_bench.units import CATEGORIES

SCHEMA_VERSION = 3
STATUSES = ("ok", "oom", "error")
RECORD_MODES = ("estimate", "simulate", "measure")
Status = Literal["ok", "oom", "error"]


class ModelSection(TypedDict):
    name: str
    parameters: int | None
    trainable_parameters: int | None
    shape: dict[str, Any]


class BudgetSection(TypedDict):
    bytes: int | None
    text: str | None
    fits: bool | None


class _EstimateRequired(TypedDict):
    peak_bytes: int
    breakdown: dict[str, int]
    category_peaks: dict[str, int]
    peak_moment: str
    moments: dict[str, Any]
    terms: dict[str, Any]
    target: str


class EstimateSection(_EstimateRequired, total=False):
    """The closed-form estimate of the same run, kept beside a trace or measurement (held close by tests)."""

    phase: str  # the run's largest phase, for a method whose memory changes along it (BAdam: which block)


class _MemoryRequired(TypedDict):
    peak_bytes: int | None
    breakdown: dict[str, int] | None
    category_peaks: dict[str, int] | None
    source: str | None
    steady_state_from_step: int | None
    estimate: EstimateSection | None
    allocator_model: dict[str, Any] | None  # simulate: the caching-allocator model replayed over the trace
    cuda: dict[str, Any] | None  # measure on a GPU: torch.cuda.memory_stats readings
    # allocated / reserved / device_total, each {"bytes", "kind": measured|model|estimate, "source"}
    # (galore_bench.readings); None for a distributed record (its per-rank peaks are in distributed.ranks)
    readings: dict[str, dict[str, Any]] | None


class MemorySection(_MemoryRequired, total=False):
    """The breakdown is the composition at the peak; category_peaks are each category's own maximum."""

    tracker_peak_bytes: int
    process_rss_bytes: int
    includes_svd_refresh: bool  # a trace plan's extra step (GaLore's); a plugin's plan names its own keys
    peak_without_svd_refresh_bytes: int
    estimate_unavailable: str  # why there is no estimate to check against (a method without estimate terms)
    traced_phase: str  # simulate traced this phase of the run (the estimate's largest; BAdam: which block)
    snapshot: str | None
    snapshot_note: str


class _ThroughputRequired(TypedDict):
    tokens_per_second: float | None
    tgs: float | None
    mfu: float | None


class ThroughputSection(_ThroughputRequired, total=False):
    """Real steps only (measure); the median leaves out warm-up and periodic steps (timed apart)."""

    step_seconds_median: float | None
    step_seconds: list[float]
    flops: dict[str, Any]
    tracker_overhead: dict[str, Any]  # measure: tracked / untracked step time, the steps each came from
    interleaved: InterleavedSection


class _QualityRequired(TypedDict):
    final_loss: float | None
    perplexity: float | None
    losses: list[float]
    data: str | None


class QualitySection(_QualityRequired, total=False):
    """Validation on held-out batches, when the scenario asks for it; what the text was."""

    eval: dict[str, Any]
    evals: list[dict[str, Any]]
    data_provenance: dict[str, Any] | None
    non_finite: list[str]  # fields of a diverged run that were NaN or infinite, written as null
    tune_eval: dict[str, Any] | None  # data with a tune split apart from the final one: the loss a grid chose on
    tuning: dict[str, Any]  # one training of a study (spec/study.py): run, lr grid, seed, role, the choice


class InterleavedSection(TypedDict):
    """The step-time cost: this method's steps timed in turn with every other method's on the same model and
    batches (measure/step_cost.py), so machine noise falls on all alike; ratios are to the reference run's."""

    reference: str
    ratio: float | None
    ratio_cpu: float | None
    step_seconds_median: float | None
    refresh: dict[str, Any] | None  # GaLore: the projector refresh's own cost, amortised over update_proj_gap
    rounds: int
    steps_per_round: int
    order: list[str]
    timed_steps: int
    amortised_step_seconds: float | None


class EnvSection(TypedDict):
    python: str | None
    platform: str | None
    packages: dict[str, str | None]
    git_commit: str | None
    git_dirty: bool | None  # None: not run from a checkout, or a version 1 record (it could not say)


class _DistributedRequired(TypedDict):
    world_size: int
    strategy: str
    cpu_offload: bool
    fsdp_unit: str | None
    backend: str | None
    simulated: bool
    how: str
    ranks: list[dict[str, Any]]
    max_rank_peak_bytes: int | None
    max_rank: int | None


class DistributedSection(_DistributedRequired, total=False):
    """A simulated world-size search also keeps every candidate and the smallest that fits (gpus_needed)."""

    candidates: list[dict[str, Any]]
    transient_bytes: dict[str, int]  # per unit or phase: what FSDP2 gathers and frees around it
    gpus_needed: int | None
    single_device_peak_bytes: int


class RunRecord(TypedDict):
    schema_version: int
    scenario: str
    run: str
    method: dict[str, Any]  # name, the run's options, and (once built) the implementation that ran
    mode: str
    device: str
    status: Status
    error: str | None
    traceback: str | None
    cross_check_errors: dict[str, str]  # figures computed beside the measurement that failed, and why
    model: ModelSection
    train: dict[str, Any]  # the scenario's TrainSettings
    budget: BudgetSection
    memory: MemorySection
    throughput: ThroughputSection
    quality: QualitySection
    distributed: DistributedSection | None
    env: EnvSection
    created: str
    wall_seconds: float | None
    host_peak_rss_bytes: int | None


# what the accessors and readers take: a RunRecord, or a record as plain JSON data (report and check code)
Record = Mapping[str, Any]

SECTIONS = ("method", "model", "train", "budget", "memory", "throughput", "quality", "env")
# (key, what its value must be) of the fields every reader relies on; load reports the first one wrong
_TOP: dict[str, tuple[Callable[[Any], bool], str]] = {
    "scenario": (is_safe_name, SAFE_NAME),  # it names a report's files (store.write checks run and device too)
    "run": (lambda v: isinstance(v, str), "a string"),
    "mode": (lambda v: one_of(v, RECORD_MODES), "one of " + ", ".join(RECORD_MODES)),
    "device": (lambda v: isinstance(v, str), "a string"),
    "status": (lambda v: one_of(v, STATUSES), "one of " + ", ".join(STATUSES)),
    "created": (lambda v: isinstance(v, str), "a timestamp string"),
    **{key: (lambda v: isinstance(v, dict), "an object") for key in SECTIONS},
    "distributed": (lambda v: v is None or isinstance(v, dict), "an object or null"),
}


_SECTION_TYPES: dict[str, Any] = {  # TypedDict classes, for their __required_keys__
    "model": ModelSection, "budget": BudgetSection, "memory": MemorySection, "throughput": ThroughputSection,
    "quality": QualitySection, "env": EnvSection, "distributed": DistributedSection}


def problems_in(record: dict[str, Any]) -> list[str]:
    """'field: got X, allowed Y' for each damaged field a reader would trip over (empty: a sound record)."""
    damaged = lambda key: " (a damaged record?)" if key in SECTIONS else ""
    found = [f"{key}: got {record.get(key)!r}, allowed {allowed}{damaged(key)}"
             for key, (ok, allowed) in _TOP.items() if not ok(record.get(key))]
    missing = sorted(RunRecord.__required_keys__ - record.keys())
    for name, section in _SECTION_TYPES.items():
        if isinstance(value := record.get(name), dict):
            missing += [f"{name}.{key}" for key in sorted(section.__required_keys__ - value.keys())]
    found += type_problems(record)  # the types inside the sections
    return found + [f"{key}: missing (a damaged record?)" for key in missing]


# -- accessors --------------------------------------------------------------------------------------
def peak_of(record: Record) -> int | None:
    """The run's peak bytes (allocated): None when it died before measuring."""
    return record["memory"]["peak_bytes"]


def breakdown_of(record: Record) -> dict[str, int]:
    """Bytes per category at the peak; {} when the run died before measuring."""
    return record["memory"]["breakdown"] or {}


def category_peaks_of(record: Record) -> dict[str, int]:
    """Each category's own maximum over the run ({} where the engine does not report them)."""
    return record["memory"]["category_peaks"] or {}


def reserved_of(record: Record) -> tuple[int | None, str | None]:
    """What the GPU reserves for this run, and where that comes from: the CUDA allocator's reading when
    measured, the caching-allocator model's when simulated ("... OOM at the budget" when it ran out)."""
    memory = record["memory"]
    if (cuda := memory["cuda"]) and cuda.get("reserved_bytes"):
        return cuda["reserved_bytes"], "measured"
    if model := memory["allocator_model"]:
        oom = model.get("out_of_memory")
        return model["peak_reserved_bytes"], "allocator model: OOM at the budget" if oom else "allocator model"
    return None, None


def reading_of(record: Record, name: str) -> dict[str, Any] | None:
    """One of the three readings (allocated, reserved, device_total): bytes, kind and source; None if absent."""
    found = (record["memory"].get("readings") or {}).get(name)
    return found if found and found.get("bytes") is not None else None


def memory_value(record: Record, field: str) -> int | None:
    """One memory figure by the name budgets and compare use: peak, a reading (allocated, reserved,
    device_total), a category, 'max <category>'."""
    if field == "peak":
        return peak_of(record)
    if field == "reserved":
        return reserved_of(record)[0]
    if field in readings_of_engines.READINGS:
        return (reading_of(record, field) or {}).get("bytes")
    if field.startswith("max "):
        return category_peaks_of(record).get(field[4:])
    return breakdown_of(record).get(field)


def memory_values(record: Record) -> dict[str, int | None]:
    """Peak, each category at the peak, each category's own maximum (if recorded), and each reading (if known)."""
    names = ["peak", *CATEGORIES, *(f"max {cat}" for cat in CATEGORIES if cat in category_peaks_of(record))]
    values = {name: memory_value(record, name) for name in names}
    for name in readings_of_engines.READINGS:
        if (value := memory_value(record, name)) is not None:
            values[name] = value
    return values
