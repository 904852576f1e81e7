"""The three readings (allocated, reserved, device_total) per engine, budgets on them, and measure's TGS taken
from steps the tracker did not run."""
from __future__ import annotations

import statistics

import pytest

from galore_bench.check.budgets import assert_memory_budget
from galore_bench.measure import training
from galore_bench.measure.allocator import CachingAllocator
from galore_bench.measure.tracker import _ACTIVE
from galore_bench.readings import ASSUMED, OVERHEADS
from galore_bench.run import worker
from galore_bench.spec.scenario import load_scenario

# a vocabulary of 32000 x 128 fp32 = 16.4 MB per embedding: large-pool blocks whose segment remainders
# (< 1 MiB) stay unsplit, so the allocator's block peak is above the tracker's storage sum
WIDE = """
[model]
hidden_size = 128
intermediate_size = 344
num_hidden_layers = 2
num_attention_heads = 4
[train]
batch_size = 2
seq_len = 32
dtype = "fp32"
steps = 4
[device]
budget = "4 GiB"
[[runs]]
method = "adamw"
"""


def _capture(monkeypatch) -> dict:
    """The train_steps result the worker builds its record from (its tracker and the step indices)."""
    seen: dict = {}
    original = training.train_steps

    def capture(*args, **kwargs):
        seen.update(original(*args, **kwargs))
        return seen

    monkeypatch.setattr(training, "train_steps", capture)
    return seen


def test_simulate_allocated_is_the_allocator_models_block_peak(write_scenario, monkeypatch):
    scenario = load_scenario(str(write_scenario(WIDE)))
    seen = _capture(monkeypatch)
    record = worker.execute(scenario, scenario.runs[0], "simulate", None)
    tracker, found = seen["tracker"], record["memory"]["readings"]
    # recomputed here, block by block, from the traced allocations: the peak from the steady state's start
    allocator, peak = CachingAllocator(scenario.budget_bytes), 0
    for index, (key, nbytes) in enumerate(tracker.events):
        if index == tracker.steady_from_event:
            peak = allocator.allocated  # reset_peak_memory_stats: the peak starts at what is live
        if nbytes:
            allocator.malloc(key, nbytes)
        elif key in allocator.live:
            allocator.free(key)
        if index >= tracker.steady_from_event:
            peak = max(peak, allocator.allocated)
    assert found["allocated"] == {"bytes": peak, "kind": "model", "source": found["allocated"]["source"]}
    assert peak > record["memory"]["peak_bytes"]  # unsplit blocks: not the tracker's storage sum
    assert sum(record["memory"]["breakdown"].values()) == record["memory"]["peak_bytes"]  # the breakdown's total
    assert found["reserved"]["bytes"] == record["memory"]["allocator_model"]["peak_reserved_bytes"] >= peak
    entry = OVERHEADS[ASSUMED]
    total = found["device_total"]
    assert total["kind"] == "estimate" and "replaced by a GPU measurement" in total["source"]
    assert total["bytes"] == found["reserved"]["bytes"] + entry.context_bytes + entry.workspace_bytes
    assert "pytorch/pytorch#86509" in total["context_source"]


def test_estimate_readings_are_labelled_estimates(write_scenario):
    scenario = load_scenario(str(write_scenario(WIDE)))
    record = worker.execute(scenario, scenario.runs[0], "estimate", None)
    found = record["memory"]["readings"]
    assert {reading["kind"] for reading in found.values()} == {"estimate"}
    assert found["allocated"]["bytes"] == record["memory"]["peak_bytes"] > 0
    assert found["reserved"]["bytes"] is None and found["device_total"]["bytes"] is None


def test_budgets_hold_any_of_the_three_readings(write_scenario):
    scenario = load_scenario(str(write_scenario(WIDE)))
    record = worker.execute(scenario, scenario.runs[0], "simulate", None)
    found = record["memory"]["readings"]
    for name in ("allocated", "reserved", "device_total"):
        assert_memory_budget(record, **{name: found[name]["bytes"]})
        with pytest.raises(AssertionError, match=f"{name} .* > budget"):
            assert_memory_budget(record, **{name: found[name]["bytes"] - 1})


def test_measure_times_only_steps_the_tracker_did_not_run(write_scenario, monkeypatch):
    """Which steps ran under the tracker is seen from inside each step (the tracker's active stack), not taken
    from the record: TGS must come from the others only, the overhead ratio from both."""
    scenario = load_scenario(str(write_scenario(WIDE.replace("steps = 4", "steps = 5"))))
    under_tracker: list[bool] = []
    original = training.one_step

    def one_step(*args, **kwargs):
        under_tracker.append(bool(_ACTIVE))
        return original(*args, **kwargs)

    monkeypatch.setattr(training, "one_step", one_step)
    record = worker.execute(scenario, scenario.runs[0], "measure", None)
    speed = record["throughput"]
    times = speed["step_seconds"]
    tracked = [i for i, active in enumerate(under_tracker) if active]
    untracked = [i for i, active in enumerate(under_tracker) if not active]
    assert len(times) == len(under_tracker) == 5 and tracked == [0, 1] and untracked == [2, 3, 4]
    assert speed["timed_step_indices"] == untracked
    tokens = 2 * 32
    assert speed["tgs"] == pytest.approx(tokens / statistics.median(times[i] for i in untracked))
    overhead = speed["tracker_overhead"]
    assert overhead["tracked_steps"] == [1] and overhead["untracked_steps"] == untracked
    assert overhead["ratio"] == pytest.approx(times[1] / statistics.median(times[i] for i in untracked))
    # the memory still comes from the tracked steps: the steady step's weights, gradients and AdamW states
    parts = record["memory"]["breakdown"]  # (the states: two fp32 moments plus a 4-byte step count per tensor)
    assert parts["gradients"] == parts["weights"]
    assert 0 < parts["optimizer_states"] - 2 * parts["weights"] <= 4 * 64


def test_measured_device_total_is_nvmls_used_bytes_of_this_gpu(monkeypatch):
    """On a GPU the device total is NVML's `used` for the device torch runs on (found by UUID: NVML ignores
    CUDA_VISIBLE_DEVICES); without NVML the reading is null, never a guess. NVML and CUDA faked here."""
    import sys
    import types

    from galore_bench import readings

    asked: list[str] = []
    fake = types.SimpleNamespace(
        nvmlInit=lambda: None, nvmlShutdown=lambda: None,
        nvmlDeviceGetHandleByUUID=lambda uuid: asked.append(uuid) or "handle",
        nvmlDeviceGetMemoryInfo=lambda handle: types.SimpleNamespace(used=7_000_000_000))
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    monkeypatch.setattr(training.torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(training.torch.cuda, "get_device_properties", lambda index: types.SimpleNamespace(uuid="abc"))
    used = training.nvml_used_bytes()
    assert used == 7_000_000_000 and asked == ["GPU-abc"]
    found = readings.measured_cuda({"allocated_bytes": 5, "reserved_bytes": 6, "nvml_used_bytes_after": used})
    assert [(r["bytes"], r["kind"]) for r in found.values()] == [(5, "measured"), (6, "measured"), (used, "measured")]
    monkeypatch.setitem(sys.modules, "pynvml", None)  # not installed: import fails
    assert training.nvml_used_bytes() is None
    assert readings.measured_cuda({"allocated_bytes": 5, "reserved_bytes": 6})["device_total"]["bytes"] is None
