"""The caching-allocator model against sequences worked out by hand from the allocator's rules, and on a
real traced step. Its check against the real CUDA allocator is benchmarks/gpu_probes.py (GPU only)."""
from __future__ import annotations

import pytest
import torch

from galore_bench.measure.allocator import CachingAllocator, OutOfMemory, replay, seeded_sequence
from galore_bench.measure.training import train_steps
from galore_bench.spec.scenario import load_scenario

from conftest import TINY_HEADER

KiB, MiB = 1 << 10, 1 << 20


def _run(*requests: tuple[str, int, int], capacity: int | None = None) -> CachingAllocator:
    """('a', key, bytes) allocates, ('f', key, 0) frees."""
    allocator = CachingAllocator(capacity)
    for op, key, nbytes in requests:
        allocator.malloc(key, nbytes) if op == "a" else allocator.free(key)
    return allocator


def test_small_requests_share_two_mib_segments():
    # 700 KiB: small pool; the 2 MiB segment is split (1348 KiB left), the second fits there (648 KiB
    # left), the third does not: a second segment
    allocator = _run(("a", 1, 700 * KiB), ("a", 2, 700 * KiB), ("a", 3, 700 * KiB))
    assert (allocator.allocated, allocator.reserved, allocator.segments) == (2100 * KiB, 4 * MiB, 2)
    tiny = _run(("a", 1, 100))
    assert (tiny.allocated, tiny.reserved) == (512, 2 * MiB)  # 512-byte minimum block


def test_mid_size_requests_split_a_twenty_mib_segment():
    allocator = _run(("a", 1, 5 * MiB), ("a", 2, 12 * MiB))  # 12 MiB fits the 15 MiB left; 3 MiB stay cached
    assert (allocator.allocated, allocator.reserved) == (17 * MiB, 20 * MiB)
    allocator.malloc(3, 4 * MiB)  # 3 MiB free is too small: a new 20 MiB segment
    assert (allocator.allocated, allocator.reserved, allocator.segments) == (21 * MiB, 40 * MiB, 2)


def test_large_block_is_not_split_for_a_remainder_of_one_mib_or_less():
    allocator = _run(("a", 1, 30 * MiB), ("f", 1, 0), ("a", 2, 29 * MiB + 512 * KiB))
    assert allocator.reserved == 30 * MiB and allocator.allocated == 30 * MiB  # the whole block is allocated
    odd = _run(("a", 1, 11 * MiB + 1))  # rounded to a 12 MiB segment; 1 MiB - 512 left: no split
    assert (odd.allocated, odd.reserved) == (12 * MiB, 12 * MiB)


def test_fragmentation_reserves_more_than_is_allocated():
    allocator = _run(("a", 1, 10 * MiB), ("a", 2, 10 * MiB), ("f", 1, 0), ("a", 3, 12 * MiB))
    assert (allocator.allocated, allocator.reserved, allocator.peak_reserved) == (22 * MiB, 32 * MiB, 32 * MiB)


def test_freed_neighbours_merge_back_into_the_whole_segment():
    allocator = _run(("a", 1, 5 * MiB), ("a", 2, 5 * MiB), ("f", 1, 0), ("f", 2, 0), ("a", 3, 19 * MiB))
    assert (allocator.reserved, allocator.segments, allocator.allocated) == (20 * MiB, 1, 20 * MiB)  # 1 MiB unsplit


def test_a_cap_releases_cached_segments_then_runs_out():
    allocator = _run(("a", 1, 12 * MiB), ("f", 1, 0), ("a", 2, 20 * MiB), capacity=30 * MiB)
    assert (allocator.reserved, allocator.alloc_retries, allocator.peak_reserved) == (20 * MiB, 1, 20 * MiB)
    with pytest.raises(OutOfMemory):
        allocator.malloc(3, 12 * MiB)  # 20 + 12 > 30 and nothing cached to release


def _assert_consistent(allocator: CachingAllocator) -> None:
    """Each segment is a chain of adjacent blocks, free neighbours are merged, and the counters add up."""
    blocks = [*allocator.by_ptr.values(), *allocator.live.values()]
    heads, seen, reserved = [b for b in blocks if b.prev is None], 0, 0
    for block in heads:
        previous = None
        while block is not None:
            assert block.prev is previous and (previous is None or previous.ptr + previous.size == block.ptr)
            assert not (previous is not None and previous.free and block.free), "free neighbours left unmerged"
            seen, reserved, previous, block = seen + 1, reserved + block.size, block, block.next
    assert seen == len(blocks) and reserved == allocator.reserved and len(heads) == allocator.segments
    assert allocator.allocated == sum(b.size for b in allocator.live.values())
    for small in (True, False):
        free = allocator.free_blocks[small]
        assert free == sorted((b.size, b.ptr) for b in allocator.by_ptr.values() if b.small == small and b.free)


@pytest.mark.parametrize("capacity", [None, 200 * MiB])
def test_random_sequences_keep_the_block_structure_consistent(capacity):
    import random

    for seed in range(20):
        rng, allocator, live = random.Random(seed), CachingAllocator(capacity), []
        for key in range(400):
            if live and rng.random() < 0.45:
                allocator.free(live.pop(rng.randrange(len(live))))
            else:
                low, high = rng.choice([(1, 900 * KiB), (1 * MiB - 1000, 1 * MiB + 1000), (1 * MiB, 12 * MiB),
                                        (10 * MiB, 80 * MiB)])
                try:
                    allocator.malloc(key, rng.randint(low, high))
                    live.append(key)
                except OutOfMemory:
                    assert capacity is not None and allocator.reserved <= capacity
            _assert_consistent(allocator)
        assert allocator.peak_reserved >= allocator.peak_allocated > 0


def test_a_live_key_cannot_be_allocated_twice():
    with pytest.raises(ValueError, match="live already"):
        _run(("a", 1, 100), ("a", 1, 100))


def test_replay_skips_empty_storages_and_reused_ids():
    events = [(7, 0), (1, 3 * MiB), (7, 0), (1, 0), (1, 2 * MiB)]  # id 1 comes back after its free
    result = replay(events)
    assert result["peak_allocated_bytes"] == 3 * MiB and result["peak_reserved_bytes"] == 20 * MiB
    assert result["out_of_memory"] is None
    assert replay([(1, 30 * MiB)], capacity=24 * MiB)["out_of_memory"].startswith("31457280 bytes requested")


def test_replayed_traced_step_reserves_at_least_what_it_allocates(write_scenario):
    """On a real traced step: the model allocates at least the tracker's 512-rounded peak (blocks left
    unsplit count as allocated, as in torch.cuda.memory_stats) and reserves at least that."""
    scenario = load_scenario(str(write_scenario(TINY_HEADER + '[[runs]]\nmethod = "adamw"\n')))
    tracker = train_steps(scenario, scenario.runs[0], fake=True, device="cpu", steps=2)["tracker"]
    assert tracker.events and sum(1 for _, n in tracker.events if n == 0) > 0
    result = replay(tracker.events)
    assert tracker.peak <= result["peak_allocated_bytes"] <= result["peak_reserved_bytes"]
    # every storage of the tiny model is small (<= 1 MiB): 2 MiB segments, packed
    assert result["peak_reserved_bytes"] % (2 * MiB) == 0
    assert result["peak_reserved_bytes"] < tracker.peak + 4 * MiB


def test_seeded_sequence_is_reproducible_and_mixes_the_three_regimes():
    events = seeded_sequence(600, seed=0)
    assert events == seeded_sequence(600, seed=0) != seeded_sequence(600, seed=1)
    sizes = [n for _, n in events if n]
    assert len(sizes) == 600 and sum(n == 0 for _, n in events) > 100
    assert min(sizes) <= 1 * MiB and any(1 * MiB < n < 10 * MiB for n in sizes) and max(sizes) >= 10 * MiB


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the real CUDA caching allocator")
def test_model_matches_the_real_allocator_on_a_seeded_sequence():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_probes.py"
    spec = importlib.util.spec_from_file_location("gpu_probes", path)
    probes = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probes)
    check = probes.allocator_check()
    assert check["agree"], check


def test_simulate_records_carry_the_allocator_model_at_the_budget(write_scenario):
    from galore_bench.run.worker import execute

    scenario = load_scenario(str(write_scenario(TINY_HEADER + '[[runs]]\nmethod = "galore"\nrank = 8\n')))
    record = execute(scenario, scenario.runs[0], "simulate", None)
    model = record["memory"]["allocator_model"]
    assert model["capacity_bytes"] == 1 << 30 and model["out_of_memory"] is None  # TINY_HEADER: 1 GiB
    assert record["memory"]["peak_bytes"] <= model["peak_allocated_bytes"] <= model["peak_reserved_bytes"]
    assert "model" in model["model"] and record["cross_check_errors"] == {}
