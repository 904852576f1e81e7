"""A model of PyTorch's CUDA caching allocator, replayed on a traced step: the memory a GPU *reserves*.

`simulate` counts allocated bytes (the tensors). A GPU runs out on reserved bytes: the segments the
caching allocator took from cudaMalloc, which its rounding and fragmentation make larger. This replays the
tracker's allocations and frees, in order, through the allocator's default rules
(c10/cuda/CUDACachingAllocator.cpp with no PYTORCH_CUDA_ALLOC_CONF, one stream):

- a request is rounded up to 512 bytes; requests of at most 1 MiB use the small pool, the rest the large;
- it takes the best-fitting free cached block of its pool (smallest size, then lowest address);
- with none, a new segment: 2 MiB (small pool), 20 MiB (requests under 10 MiB), else the request
  rounded up to 2 MiB;
- a block is split when what is left is >= 512 bytes (small pool) or > 1 MiB (large pool);
- a freed block merges with free neighbours of its segment;
- under a cap (`set_per_process_memory_fraction`), a segment that would pass it first releases every
  wholly free cached segment and retries (an "alloc retry"); failing that, the request is out of memory.

A MODEL, labelled so in records. It sees what the tracker sees: library workspaces (cuBLAS, cuSOLVER)
are not in it. `benchmarks/gpu_probes.py` replays one sequence on a real GPU and on this model.
"""
from __future__ import annotations

import bisect
import itertools
import random
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

MIN_BLOCK = 512  # kMinBlockSize
SMALL_SIZE = 1 << 20  # kSmallSize: requests up to this use the small pool
SMALL_SEGMENT = 2 << 20  # kSmallBuffer
LARGE_SEGMENT = 20 << 20  # kLargeBuffer: the segment of a request between 1 and 10 MiB
MIN_LARGE_ALLOC = 10 << 20  # kMinLargeAlloc
ROUND_LARGE = 2 << 20  # kRoundLarge
DESCRIPTION = ("model of PyTorch's CUDA caching allocator (default settings, one stream) replayed on the traced "
               "allocations; library workspaces (cuBLAS, cuSOLVER) not included")


def round_size(nbytes: int) -> int:
    return max(MIN_BLOCK, -(-nbytes // MIN_BLOCK) * MIN_BLOCK)


def segment_size(size: int) -> int:
    if size <= SMALL_SIZE:
        return SMALL_SEGMENT
    if size < MIN_LARGE_ALLOC:
        return LARGE_SEGMENT
    return -(-size // ROUND_LARGE) * ROUND_LARGE


@dataclass(slots=True, eq=False)
class Block:
    ptr: int
    size: int
    small: bool
    free: bool = True
    prev: Block | None = None
    next: Block | None = None

    def whole_segment(self) -> bool:
        return self.prev is None and self.next is None


class OutOfMemory(Exception):
    """A request that the capped device cannot hold, even after releasing the cached segments."""


class CachingAllocator:
    """Allocated and reserved bytes of a request sequence; `capacity` in bytes models a capped process."""

    def __init__(self, capacity: int | None = None) -> None:
        self.capacity = capacity
        self.free_blocks: dict[bool, list[tuple[int, int]]] = {True: [], False: []}  # (size, ptr), sorted
        self.by_ptr: dict[int, Block] = {}
        self.live: dict[int, Block] = {}
        self.allocated = self.reserved = self.segments = 0
        self.peak_allocated = self.peak_reserved = self.alloc_retries = 0
        self._next_address = itertools.count(1 << 40, 1 << 40)  # segments never touch: no merge across them

    # -- free lists -------------------------------------------------------------------------------
    def _insert(self, block: Block) -> None:
        block.free = True
        self.by_ptr[block.ptr] = block
        bisect.insort(self.free_blocks[block.small], (block.size, block.ptr))

    def _remove(self, block: Block) -> None:
        pool = self.free_blocks[block.small]
        del pool[bisect.bisect_left(pool, (block.size, block.ptr))]
        del self.by_ptr[block.ptr]

    def _best_fit(self, size: int, small: bool) -> Block | None:
        pool = self.free_blocks[small]
        index = bisect.bisect_left(pool, (size, -1))
        if index == len(pool):
            return None
        block = self.by_ptr[pool[index][1]]
        self._remove(block)
        return block

    # -- segments ---------------------------------------------------------------------------------
    def _new_segment(self, size: int, small: bool) -> Block:
        wanted = segment_size(size)
        if self.capacity is not None and self.reserved + wanted > self.capacity:
            self.alloc_retries += 1
            for block in [b for b in self.by_ptr.values() if b.whole_segment()]:  # release_cached_blocks
                self._remove(block)
                self.reserved -= block.size
                self.segments -= 1
            if self.reserved + wanted > self.capacity:
                raise OutOfMemory(f"{size} bytes requested with {self.allocated} allocated, {self.reserved} "
                                  f"reserved of a {self.capacity}-byte cap")
        self.reserved += wanted
        self.segments += 1
        self.peak_reserved = max(self.peak_reserved, self.reserved)
        return Block(next(self._next_address), wanted, small)

    # -- requests ---------------------------------------------------------------------------------
    def malloc(self, key: int, nbytes: int) -> None:
        if key in self.live:
            raise ValueError(f"allocation {key} is live already: a sequence frees a key before reusing it")
        size = round_size(nbytes)
        small = size <= SMALL_SIZE
        block = self._best_fit(size, small) or self._new_segment(size, small)
        rest = block.size - size
        if rest >= MIN_BLOCK if small else rest > SMALL_SIZE:  # split: the rest stays cached
            tail = Block(block.ptr + size, rest, small, prev=block, next=block.next)
            if block.next is not None:
                block.next.prev = tail
            block.next, block.size = tail, size
            self._insert(tail)
        block.free = False
        self.live[key] = block
        self.allocated += block.size
        self.peak_allocated = max(self.peak_allocated, self.allocated)

    def free(self, key: int) -> None:
        block = self.live.pop(key)
        self.allocated -= block.size
        for neighbour in (block.prev, block.next):
            if neighbour is not None and neighbour.free:
                self._remove(neighbour)
                if neighbour is block.prev:
                    block.ptr, block.prev = neighbour.ptr, neighbour.prev
                    if neighbour.prev is not None:
                        neighbour.prev.next = block
                else:
                    block.next = neighbour.next
                    if neighbour.next is not None:
                        neighbour.next.prev = block
                block.size += neighbour.size
        self._insert(block)


def seeded_sequence(n: int = 600, seed: int = 0) -> list[tuple[int, int]]:
    """Allocations (key, bytes) and frees (key, 0) mixing the three regimes (small, 1-12 MiB, 10-80 MiB):
    the sequence the model is checked on against the real allocator (gpu_probes, a GPU-only test)."""
    rng, live, events = random.Random(seed), list[int](), list[tuple[int, int]]()
    for key in range(n):
        if live and rng.random() < 0.45:
            events.append((live.pop(rng.randrange(len(live))), 0))
        low, high = rng.choice([(1, 900 << 10), (1 << 20, 12 << 20), (10 << 20, 80 << 20)])
        events.append((key, rng.randint(low, high)))
        live.append(key)
    return events


def replay(events: Iterable[tuple[int, int]], capacity: int | None = None,
           steady_from: int | None = None) -> dict[str, Any]:
    """Run (key, bytes) allocations and (key, 0) frees through the model; what the allocator would report.

    Keys are the tracker's storage ids; an id may come back after its storage was freed. Zero-byte
    storages take no block (as on CUDA). `steady_from` (an event index) starts the peaks anew there, as
    `torch.cuda.reset_peak_memory_stats` does where a measured run's steady state begins (step 2).
    """
    allocator = CachingAllocator(capacity)
    oom = None
    for index, (key, nbytes) in enumerate(events):
        if index == steady_from:
            allocator.peak_allocated, allocator.peak_reserved = allocator.allocated, allocator.reserved
        try:
            if nbytes > 0:
                allocator.malloc(key, nbytes)
            elif key in allocator.live:  # a zero-byte storage's own events name no block
                allocator.free(key)
        except OutOfMemory as exc:
            oom = str(exc)
            break
    return {"peak_reserved_bytes": allocator.peak_reserved, "peak_allocated_bytes": allocator.peak_allocated,
            "segments": allocator.segments, "alloc_retries": allocator.alloc_retries,
            "capacity_bytes": capacity, "out_of_memory": oom, "model": DESCRIPTION,
            "steady_from_event": steady_from}
