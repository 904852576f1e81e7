"""Issue 9: what CUDA libraries allocate beside the tensors a simulation can see, one operation at a time.

    python benchmarks/gpu_probes.py --out DIR        (needs CUDA: refuses to run without it)

Each probe runs one operation of a training step (a cuBLAS matmul, a Linear's backward, causal SDPA forward
and backward, the fp32 SVD of a GaLore refresh, the loss, an 8-bit optimizer update) on fresh CUDA tensors,
twice. Around it the CUDA allocator's peak and the galore-bench tracker (the storages the dispatcher
returns, which is all that simulate counts) are read together: the difference is memory that only a real
GPU shows (library workspaces, kernels' scratch buffers). The first call also shows what a library keeps
after its first use (cuBLAS's per-handle workspace). Before them, one seeded sequence of allocations and
frees runs on the real caching allocator and through galore_bench.measure.allocator's model of it: their reserved
peaks must agree. Writes probes.json and probes.md to DIR.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from galore_bench.measure.allocator import replay, seeded_sequence
from galore_bench.measure.tracker import MemoryTracker
from galore_bench.measure.training import nvml_used_bytes
from galore_bench.units import CUDA_BLOCK, format_bytes

BF16 = torch.bfloat16


def measure(fn: Callable[[], Any]) -> dict[str, int]:
    """Allocator vs tracker around one call of `fn`; what the call leaves is freed before returning.

    Every tensor that exists before the call is given to the tracker first: an op that returns a view or an
    in-place result of one (w.t(), an optimizer's add_) must not count as memory the call allocated.
    """
    tracker = MemoryTracker(round_to=CUDA_BLOCK, device_type="cuda")
    tracker.label([o for o in gc.get_objects() if isinstance(o, torch.Tensor) and o.is_cuda], "weights")
    before = tracker.current
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    tracker.reset_peak()
    with tracker:
        result = fn()
    torch.cuda.synchronize()
    reading = {"allocator_peak": torch.cuda.max_memory_allocated() - base, "tracker_peak": tracker.peak - before,
               "allocator_kept": torch.cuda.memory_allocated() - base, "tracker_kept": tracker.current - before}
    del result
    reading["unseen_peak"] = reading["allocator_peak"] - reading["tracker_peak"]
    reading["unseen_kept"] = reading["allocator_kept"] - reading["tracker_kept"]
    return reading


def _randn(*shape: int, dtype: torch.dtype = BF16, grad: bool = False) -> torch.Tensor:
    return torch.randn(*shape, device="cuda", dtype=dtype, requires_grad=grad)


def probes() -> dict[str, Callable[[], Callable[[], Any]]]:
    """name -> a setup that makes the inputs (outside the measurement) and returns the call to measure."""
    def matmul() -> Callable[[], Any]:
        a, b = _randn(4096, 4096), _randn(4096, 4096)
        return lambda: a @ b

    def linear_backward() -> Callable[[], Any]:  # 7B's gate_proj on 2048 tokens: two GEMMs in backward
        x, w = _randn(2048, 4096, grad=True), _randn(11008, 4096, grad=True)
        grad_out = _randn(2048, 11008)

        def step() -> Any:
            torch.nn.functional.linear(x, w).backward(grad_out)
            grads = (x.grad, w.grad)
            x.grad = w.grad = None
            return grads
        return step

    def sdpa(batch: int, heads: int, head_dim: int) -> Callable[[], Callable[[], Any]]:
        def setup() -> Callable[[], Any]:
            q, k, v = (_randn(batch, heads, 256, head_dim, grad=True) for _ in range(3))
            grad_out = _randn(batch, heads, 256, head_dim)

            def step() -> Any:
                torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True).backward(grad_out)
                grads = (q.grad, k.grad, v.grad)
                q.grad = k.grad = v.grad = None
                return grads
            return step
        return setup

    def svd(rows: int, cols: int) -> Callable[[], Callable[[], Any]]:
        def setup() -> Callable[[], Any]:  # GaLore's refresh: the BF16 gradient in fp32, full_matrices=False
            grad = _randn(rows, cols)
            return lambda: torch.linalg.svd(grad.float(), full_matrices=False)
        return setup

    def loss() -> Callable[[], Any]:  # the LM head's logits for 2048 tokens, 32k vocabulary
        logits, labels = _randn(2048, 32000, grad=True), torch.randint(0, 32000, (2048,), device="cuda")

        def step() -> Any:
            torch.nn.functional.cross_entropy(logits.float(), labels).backward()
            grad = logits.grad
            logits.grad = None
            return grad
        return step

    def adamw_foreach() -> Callable[[], Any]:
        params = [torch.nn.Parameter(_randn(4096, 4096)) for _ in range(4)]
        for p in params:
            p.grad = torch.randn_like(p)
        optimizer = torch.optim.AdamW(params, foreach=True)
        optimizer.step()  # states exist: the probe is a steady step
        return optimizer.step

    def adam8bit() -> Callable[[], Any]:
        import bitsandbytes as bnb

        param = torch.nn.Parameter(_randn(4096, 4096))
        param.grad = torch.randn_like(param)
        optimizer = bnb.optim.AdamW8bit([param])
        optimizer.step()
        return optimizer.step

    return {"cublas matmul 4096^2 bf16": matmul, "linear fwd+bwd 2048x4096 -> 11008 bf16": linear_backward,
            "sdpa causal fwd+bwd 7B head (b1 h32 s256 d128)": sdpa(1, 32, 128),
            "sdpa causal fwd+bwd 60M head (b16 h8 s256 d64)": sdpa(16, 8, 64),
            "svd fp32 4096x11008 (7B MLP)": svd(4096, 11008),
            "svd fp32 4096x4096 (7B attention)": svd(4096, 4096),
            "svd fp32 512x1376 (60M MLP)": svd(512, 1376), "cross-entropy 2048x32000 (fp32 upcast)": loss,
            "adamw foreach step 4 x 4096^2 bf16": adamw_foreach, "bnb AdamW8bit step 4096^2": adam8bit}


def run_on_cuda(events: list[tuple[int, int]]) -> dict[str, int]:
    """The sequence on the real caching allocator (nothing cached first): its reserved and allocated peaks."""
    torch.cuda.empty_cache()
    start = torch.cuda.memory_reserved(), torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    live = {}
    for key, nbytes in events:
        if nbytes:
            live[key] = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
        else:
            del live[key]
    peaks = {"reserved_peak": torch.cuda.max_memory_reserved() - start[0],
             "allocated_peak": torch.cuda.max_memory_allocated() - start[1], "reserved_at_start": start[0]}
    live.clear()
    torch.cuda.empty_cache()
    return peaks


def allocator_check(n: int = 600, seed: int = 0) -> dict[str, Any]:
    """The model against the real allocator on one seeded sequence of small, mid and large requests."""
    events = seeded_sequence(n, seed)
    measured, model = run_on_cuda(events), replay(events)
    modelled = {"reserved_peak": model["peak_reserved_bytes"], "allocated_peak": model["peak_allocated_bytes"]}
    return {"requests": n, "seed": seed, "measured": measured, "model": modelled,
            "agree": modelled["reserved_peak"] == measured["reserved_peak"]}


def run_probes() -> list[dict[str, Any]]:
    rows = []
    for name, setup in probes().items():
        row: dict[str, Any] = {"probe": name}
        try:
            call = setup()
            for attempt in ("first", "second"):
                start = time.perf_counter()
                row[attempt] = measure(call)
                row[attempt]["seconds"] = time.perf_counter() - start
            del call
        except Exception as exc:  # noqa: BLE001 - one probe failing (no bnb there) must not hide the others
            row["error"] = f"{type(exc).__name__}: {exc}"[:300]
        rows.append(row)
        torch.cuda.empty_cache()
    return rows


def markdown(rows: list[dict[str, Any]], device: str, check: dict[str, Any]) -> str:
    real, model = check["measured"], check["model"]
    verdict = "agree" if check["agree"] else "DISAGREE"
    lines = [f"# What only a GPU shows: library memory beside the tensors ({device})", "",
             (f"Caching-allocator model vs the real allocator, {check['requests']} seeded requests: reserved "
              f"peak {format_bytes(model['reserved_peak'])} modelled, {format_bytes(real['reserved_peak'])} "
              f"measured ({verdict}); allocated peak {format_bytes(model['allocated_peak'])} modelled, "
              f"{format_bytes(real['allocated_peak'])} measured."), "",
             ("unseen = allocator bytes minus the bytes of the storages the dispatcher returned (what "
              "simulate counts); peak: during the call; kept: still allocated after it (a workspace cached "
              "for later calls). First and second call of the same operation. Up to 1 MiB per block over "
              "1 MiB can be the allocator's own rounding (a remainder it does not split off), not a "
              "library's memory."), "",
             ("| probe | tensors peak | unseen peak, 1st | unseen kept, 1st | unseen peak, 2nd "
              "| unseen kept, 2nd |"),
             "|---|---|---|---|---|---|"]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['probe']} | error: {row['error']} | | | | |")
            continue
        first, second = row["first"], row["second"]
        cells = [row["probe"], format_bytes(second["tracker_peak"]), format_bytes(first["unseen_peak"]),
                 format_bytes(first["unseen_kept"]), format_bytes(second["unseen_peak"]),
                 format_bytes(second["unseen_kept"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def outside_allocator() -> dict[str, Any]:
    """NVML's used bytes minus what the caching allocator reserves, after the probes ran cuBLAS, SDPA, the SVD and
    the optimizers: the CUDA context with those kernels loaded, plus workspaces the allocator does not hold. The
    measured figure to replace galore_bench.readings.OVERHEADS' published ones for this device and torch (on a
    GPU no other process uses: NVML counts every process)."""
    used = nvml_used_bytes()
    reserved = torch.cuda.memory_reserved()
    return {"nvml_used_bytes": used, "reserved_bytes": reserved,
            "outside_allocator_bytes": None if used is None else used - reserved,
            "CUDA_MODULE_LOADING": os.environ.get("CUDA_MODULE_LOADING")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="probes.json and probes.md go here")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_probes: no CUDA device. These probes read the CUDA allocator; there is nothing to measure "
              "on a CPU.", file=sys.stderr)
        return 2
    device = torch.cuda.get_device_name()
    check = allocator_check()  # first: it wants an allocator with nothing cached
    rows = run_probes()
    outside = outside_allocator()
    args.out.mkdir(parents=True, exist_ok=True)
    info = {"device": device, "torch": torch.__version__, "cuda": torch.version.cuda,
            # the allocator model follows the defaults: a setting here (expandable_segments, ...) changes the rules
            "PYTORCH_CUDA_ALLOC_CONF": os.environ.get("PYTORCH_CUDA_ALLOC_CONF"),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "allocator_check": check,
            "probes": rows, "outside_allocator": outside}
    (args.out / "probes.json").write_text(json.dumps(info, indent=1))
    beyond = outside["outside_allocator_bytes"]
    note = (f"\nDevice total (NVML) minus reserved after the probes: {format_bytes(beyond)} ({beyond:,} B): the "
            "CUDA context and workspaces outside the allocator (galore_bench/readings.py's published figure: "
            "287,047,680 B + a 20 MiB cuBLAS segment).\n" if beyond is not None else "\nNVML not readable.\n")
    (args.out / "probes.md").write_text(markdown(rows, device, check) + note)
    print((args.out / "probes.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
