"""Multi-rank runs: DDP or FSDP2 over a process group, one record holding every rank's memory.

Env contract (torchrun's): RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT. The runner sets them
itself for its own rank processes; torchrun, submitit or SLURM set them for
`galore-bench ranks --scenario NAME` (torchrun: `-m galore_bench.cli ranks`). Rank 0 gathers each rank's
numbers and writes the record. `simulate` never starts ranks: it traces one device and applies the sharding
arithmetic (galore_bench.measure.sharding) for every world size asked for.
"""
from __future__ import annotations

import contextlib
import datetime
import hashlib
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel

from galore_bench import store
from galore_bench.errors import UserError
from galore_bench.measure import sharding, training
from galore_bench.measure.rank_tracker import RankTracker, local_shard
from galore_bench.record import RunRecord
from galore_bench.run import assemble
from galore_bench.run.request import RunRequest
from galore_bench.run.worker import InheritedFile, child_io, send_or_leave
from galore_bench.spec.distributed import DistributedSpec
from galore_bench.spec.scenario import RunSpec, Scenario
from galore_bench.units import CUDA_BLOCK, format_bytes

RECORD_MARKER = "galore-bench record: "  # a failing rank names the record it wrote on stderr
ENV_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
Emit = Callable[..., None]


def simulate_record(scenario: Scenario, run: RunSpec) -> RunRecord:
    """One trace, every world size asked for; the record stands at the smallest that fits the budget."""
    spec = scenario.distributed
    if spec is None:
        raise UserError(f"{scenario.path}: no [distributed] table")
    device = training.record_device("simulate", training.pick_device())
    record, started = assemble.new_record(scenario, run, "simulate", device), time.perf_counter()
    try:
        plans = sharding.plans_for(spec.strategy, spec.world_sizes, spec.cpu_offload, spec.fsdp_unit)
        tracker, trainer = sharding.trace(scenario, run, plans)
        assemble.fill_simulated(record, spec, scenario.budget_bytes, tracker.results(), tracker.peak,
                                sharding.HOW, trainer)
    except Exception as exc:  # noqa: BLE001 - a failing run is a result of the sweep
        assemble.failed(record, exc, "cpu")
    return assemble.close_record(record, scenario, started)


def wrap(model: torch.nn.Module, spec: DistributedSpec, device: torch.device, world_size: int) -> torch.nn.Module:
    """DDP (gradient buckets as .grad views: no second copy) or FSDP2 units; one rank keeps the plain model."""
    if world_size == 1:
        return model
    if spec.strategy == "ddp":
        ids = [device.index] if device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids, gradient_as_bucket_view=True)

    mesh = init_device_mesh(device.type, (world_size,))
    options: dict[str, Any] = {"mesh": mesh}
    if spec.cpu_offload:
        options["offload_policy"] = CPUOffloadPolicy(pin_memory=device.type == "cuda")
    for unit in sharding.fsdp2_units(model, spec.fsdp_unit):
        fully_shard(unit, **options)
    fully_shard(model, **options)
    return model


def _rank_batches(scenario: Scenario, run: RunSpec, device: torch.device, rank: int) -> Iterator[torch.Tensor]:
    """Each rank its own data (a different seed), as a distributed sampler would give it (built before the tracker)."""
    data = training.training_batches(scenario, run.model.vocab_size, seed_offset=7919 * rank)
    return (batch.to(device) for batch in data.forever())


def _fingerprint(model: torch.nn.Module) -> tuple[str, int]:
    """sha256 of this rank's parameter bytes (replicas must match) and how many bytes it holds."""
    digest, total = hashlib.sha256(), 0
    for param in model.parameters():
        local = local_shard(param.detach()).contiguous().cpu()
        digest.update(local.view(torch.uint8).numpy().tobytes() if local.numel() else b"")
        total += local.numel() * local.element_size()
    return digest.hexdigest(), total


def rank_steps(scenario: Scenario, run: RunSpec, spec: DistributedSpec, device: torch.device, rank: int,
               world_size: int, steps: int, emit: Emit) -> dict[str, Any]:
    """Real steps on this rank with the tracker on; its peak, breakdown, losses, times and weight fingerprint."""
    tracker = RankTracker(round_to=CUDA_BLOCK if device.type == "cuda" else 1,
                          device_type="cuda" if device.type == "cuda" else None,
                          label_grads_before_step=spec.strategy == "ddp")
    # DDP rebuilds its gradient buckets during the second forward: its steady state starts one step later
    steady = 2 if spec.strategy == "ddp" and world_size > 1 and steps > 2 else 1
    done = training.train_steps(scenario, run, fake=False, device=device, steps=steps, tracker=tracker,
                              wrap=lambda model: wrap(model, spec, device, world_size),
                              batches=_rank_batches(scenario, run, device, rank), steady_from=steady,
                              progress=lambda step, total: emit(step=step, of=total))
    model = done["model"]
    sha, held = _fingerprint(model)
    result: dict[str, Any] = {
        "rank": rank, "status": "ok", "peak_bytes": tracker.peak, "breakdown": tracker.breakdown(),
        "steady_state_from_step": steady + 1, "losses": done["losses"], "step_seconds": done["step_times"],
        "weights_sha256": sha, "local_parameter_bytes": held,
        "trainable_parameters": sum(local_shard(p).numel() for p in model.parameters() if p.requires_grad),
        "implementation": done["trainer_info"]}
    if done["cuda"]:
        result["cuda"] = done["cuda"]
        result["tracker_peak_bytes"], result["peak_bytes"] = tracker.peak, done["cuda"]["allocated_bytes"]
        result["breakdown"]["other"] += result["peak_bytes"] - tracker.peak
    return result


def rank_device(local_rank: int) -> torch.device:
    """This rank's GPU (LOCAL_RANK, modulo what is visible: SLURM may show each task one GPU), else the CPU."""
    if torch.cuda.is_available():
        index = local_rank % torch.cuda.device_count()
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    return torch.device("cpu")


@contextlib.contextmanager
def process_group(spec: DistributedSpec, device: torch.device) -> Iterator[str]:
    """init_process_group from the env contract; the backend in use is yielded for the record."""
    missing = [key for key in ENV_KEYS if key not in os.environ]
    if missing:
        raise UserError(f"missing {', '.join(missing)}: start ranks with torchrun (or the runner, or submitit)")
    backend = spec.resolved_backend(device.type == "cuda")
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=spec.timeout_s),
                            device_id=device if device.type == "cuda" else None)
    try:
        yield backend
    finally:
        dist.destroy_process_group()


def _peer_failed(exc: BaseException) -> bool:
    """A collective that broke because another rank went away (gloo raises plain RuntimeErrors for it)."""
    text = str(exc)
    return isinstance(exc, dist.DistError) or any(s in text for s in ("gloo/transport", "NCCL", "Connection closed"))


def run_ranked(scenario: Scenario, run: RunSpec, backend: str, device: torch.device, steps: int | None,
               out: Path, emit: Emit = lambda **message: None) -> Path | None:
    """This process's share of one run inside an initialised group; rank 0 writes the record and returns it."""
    spec = scenario.distributed
    if spec is None:
        raise UserError(f"{scenario.path}: no [distributed] table")
    rank, world = dist.get_rank(), dist.get_world_size()
    started, n_steps = time.perf_counter(), max(2, steps or scenario.train.steps)
    try:
        result = rank_steps(scenario, run, spec, device, rank, world, n_steps, emit)
    except torch.OutOfMemoryError as exc:
        at = f" at {format_bytes(torch.cuda.max_memory_allocated(device))}" if device.type == "cuda" else ""
        result = {"rank": rank, "status": "oom", "error": f"OOM{at}: {str(exc).splitlines()[0]}"}
    except Exception as exc:
        if _peer_failed(exc):
            raise  # a collective broke because another rank died or failed: that rank reports the run
        result = {"rank": rank, "status": "error", "error": f"{type(exc).__name__}: {exc}",
                  "traceback": traceback.format_exc()}
    if result["status"] != "ok":
        # The other ranks wait inside collectives this rank will never join: it reports the run from here and
        # leaves; the launcher (the runner, torchrun) then stops the rest. The marker tells the runner the path.
        record = assemble.new_record(scenario, run, "measure", training.device_name(device.type))
        assemble.fill_ranks(record, scenario, spec, [result], backend, device, world=world)
        path = store.write(assemble.close_record(record, scenario, started), out)
        print(f"{RECORD_MARKER}{path}", file=sys.stderr, flush=True)
        os._exit(3)
    gathered: list[Any] | None = [None] * world if rank == 0 else None
    dist.gather_object(result, gathered, dst=0)
    if gathered is None:
        return None
    record = assemble.new_record(scenario, run, "measure", training.device_name(device.type))
    assemble.fill_ranks(record, scenario, spec, gathered, backend, device)
    return store.write(assemble.close_record(record, scenario, started), out)


# -- entry points ---------------------------------------------------------------------------------
def simulate_main(request: RunRequest, conn: Any, stderr: InheritedFile | str) -> None:
    """Runner child for a simulated distributed run: no ranks, one trace, one record."""
    child_io(stderr, request.threads)
    record = simulate_record(*request.load())
    path = store.write(record, request.out)
    send_or_leave(conn, {"record": str(path), "status": record["status"]})
    conn.close()


def rank_main(request: RunRequest, rank: int, world_size: int, port: int, conn: Any,
              stderr: InheritedFile | str) -> None:
    """Runner child for one rank: sets the env contract torchrun would set, then runs its share."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    child_io(stderr, max(1, (request.threads or torch.get_num_threads()) // world_size))
    scenario, run = request.load()
    device = rank_device(rank)
    if scenario.distributed is None:
        raise UserError(f"{scenario.path}: no [distributed] table")
    fault = request.fault if rank == world_size - 1 else None

    def emit(**message: Any) -> None:
        if conn is not None:
            send_or_leave(conn, message)
        if message.get("step", 0) >= 1:  # test hooks (worker.FAULT_ENV): the last rank dies or runs out mid-run
            if fault == f"kill:{run.label}":
                os.kill(os.getpid(), signal.SIGKILL)
            if fault == f"oom:{run.label}":
                raise torch.OutOfMemoryError("fault injected by the test hook")

    with process_group(scenario.distributed, device) as backend:
        path = run_ranked(scenario, run, backend, device, request.steps, request.out, emit)
    if conn is not None:
        send_or_leave(conn, {"record": str(path) if path else None})
        conn.close()
