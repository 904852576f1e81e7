"""The three memory readings a GPU user reads, under the same names in every engine, record and report.

- `allocated`: the caching allocator's block peak (`torch.cuda.max_memory_allocated`): every tensor's block,
  rounded and, where a cached block was not split, larger than the tensor;
- `reserved`: the segments the allocator took from cudaMalloc (`torch.cuda.max_memory_reserved`);
- `device_total`: what nvidia-smi, NVML and wandb's GPU panel show: reserved plus the CUDA context and
  the library workspaces the allocator does not see.

Each reading says how it was obtained (`kind`: measured, model, estimate) and from what (`source`), so a
reader never takes a modelled or estimated figure for a measured one. The tracker's own total (the storages'
sum, which the breakdown adds up to) stays `memory.peak_bytes`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

READINGS = ("allocated", "reserved", "device_total")
KINDS = ("measured", "model", "estimate")


@dataclass(frozen=True)
class DeviceOverhead:
    """Device memory a training process holds outside the tensors the tracker sees, with a source per figure.

    PUBLISHED FIGURES, NOT OUR MEASUREMENTS: to be replaced by `benchmarks/gpu_probes.py`'s reading (NVML used
    minus reserved after a step) when a GPU is available.
    """

    key: str
    context_bytes: int
    context_source: str
    workspace_bytes: int  # cuBLAS workspace: allocated through the caching allocator, so a reserved segment
    workspace_source: str


# cuBLAS's default workspace (CUBLAS_WORKSPACE_CONFIG ":4096:2:16:8") is 8519680 B, taken from the caching
# allocator (pytorch/pytorch#83461, torch >= 1.13) as one block of a 20 MiB large-pool segment; on Hopper the
# recommended cuBLAS(Lt) workspace is 32 MiB (pytorch/pytorch#120925), one 32 MiB segment.
_WORKSPACE_SOURCE = ("cuBLAS default workspace 8519680 B (CUBLAS_WORKSPACE_CONFIG :4096:2:16:8), allocated through "
                     "the caching allocator since pytorch/pytorch#83461 (shown as one 8519680 B block in a 20 MiB "
                     "segment: discuss.pytorch.org/t/178671); counted as that 20 MiB segment")
OVERHEADS = {
    "pre-hopper, lazy loading": DeviceOverhead(
        "pre-hopper, lazy loading", 287_047_680,
        "CUDA context with lazy module loading (CUDA >= 11.7; torch >= 1.13 sets CUDA_MODULE_LOADING=LAZY): "
        "287,047,680 B measured in pytorch/pytorch#86509 (ptrblck, pytorch/pytorch#107667: '~300MB'); kernels "
        "loaded during the steps add to it (not counted: this is a lower bound)",
        20 << 20, _WORKSPACE_SOURCE),
    "pre-hopper, eager loading": DeviceOverhead(
        "pre-hopper, eager loading", 666_632_192,
        "CUDA context with every module loaded at start (CUDA < 11.7 or CUDA_MODULE_LOADING=EAGER): "
        "666,632,192 B measured in pytorch/pytorch#86509",
        20 << 20, _WORKSPACE_SOURCE),
    "hopper, lazy loading": DeviceOverhead(
        "hopper, lazy loading", 287_047_680,
        "as pre-hopper with lazy loading (pytorch/pytorch#86509; no Hopper-specific published figure found)",
        32 << 20, "cuBLASLt workspace recommended for Hopper, 32 MiB (pytorch/pytorch#120925), one 32 MiB segment"),
}
# What simulate assumes: the papers' GPUs (A100, RTX 4090) are pre-Hopper and every torch since 1.13 loads lazily.
ASSUMED = "pre-hopper, lazy loading"


def reading(value: int | None, kind: str, source: str) -> dict[str, Any]:
    return {"bytes": value, "kind": kind, "source": source}


def device_total_estimate(reserved: int, key: str = ASSUMED) -> dict[str, Any]:
    """Reserved plus the table's context and workspace (an estimate, labelled with its sources)."""
    entry = OVERHEADS[key]
    return {**reading(reserved + entry.context_bytes + entry.workspace_bytes, "estimate",
                      f"reserved + CUDA context + cuBLAS workspace, published figures for '{entry.key}' "
                      "(to be replaced by a GPU measurement)"),
            "context_bytes": entry.context_bytes, "context_source": entry.context_source,
            "workspace_bytes": entry.workspace_bytes, "workspace_source": entry.workspace_source}


def simulated(allocator_model: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
    """simulate: allocated and reserved from the caching-allocator model's replay, device_total estimated."""
    if not allocator_model:
        why = "no allocator model for this record"
        return {name: reading(None, "model", why) for name in READINGS}
    source = "caching-allocator model replayed on the traced step (steady state)"
    oom = allocator_model.get("out_of_memory")
    reserved = allocator_model["peak_reserved_bytes"]
    total = (device_total_estimate(reserved) if not oom else
             reading(None, "estimate", "the allocator model ran out of memory at the budget"))
    return {"allocated": reading(allocator_model["peak_allocated_bytes"], "model", source),
            "reserved": reading(reserved, "model", source + (": OOM at the budget" if oom else "")),
            "device_total": total}


def measured_cuda(cuda: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """measure on a GPU: the allocator's own peaks; the device total from NVML (every process on the device,
    read after the steps: the allocator keeps its segments, so this is the reserved peak plus context and
    workspaces unless an alloc retry released segments)."""
    nvml = cuda.get("nvml_used_bytes_after")
    return {"allocated": reading(cuda.get("allocated_bytes"), "measured", "torch.cuda.memory_stats "
                                 "allocated_bytes.all.peak"),
            "reserved": reading(cuda.get("reserved_bytes"), "measured", "torch.cuda.memory_stats "
                                "reserved_bytes.all.peak"),
            "device_total": reading(nvml, "measured", "NVML nvmlDeviceGetMemoryInfo.used after the steps (all "
                                    "processes on the device)" if nvml is not None else "NVML not readable here")}


def measured_cpu(tracker_peak: int) -> dict[str, dict[str, Any]]:
    """measure on a CPU: no caching allocator and no device; the tracker's exact bytes stand for allocated."""
    return {"allocated": reading(tracker_peak, "measured", "tracker: exact storage bytes (a CPU has no caching "
                                 "allocator)"),
            "reserved": reading(None, "measured", "a CPU run has no caching allocator"),
            "device_total": reading(None, "measured", "a CPU run has no device memory")}


def estimated(peak: int) -> dict[str, dict[str, Any]]:
    """estimate: the closed form's peak stands for allocated; it models no allocator and no device."""
    return {"allocated": reading(peak, "estimate", "closed-form estimate (bytes of the tensors, 512-B rounded)"),
            "reserved": reading(None, "estimate", "the closed form does not model the caching allocator"),
            "device_total": reading(None, "estimate", "the closed form does not model the caching allocator")}


def sharded_simulation(rank_peak: int) -> dict[str, dict[str, Any]]:
    """A distributed simulation: the largest rank's traced bytes (each storage 512-B rounded, shards by the sharding
    arithmetic) stand for allocated; no allocator model replays a sharded rank, so reserved and the device total
    are not read."""
    why = "not modelled for a sharded rank (no caching-allocator replay); a single-device simulate has it"
    return {"allocated": reading(rank_peak, "model", "tracker + sharding arithmetic: the largest rank's traced "
                                 "bytes, 512-B rounded"),
            "reserved": reading(None, "model", why), "device_total": reading(None, "model", why)}


def unavailable(why: str) -> dict[str, dict[str, Any]]:
    return {name: reading(None, "measured", why) for name in READINGS}
