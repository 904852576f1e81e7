"""A sweep over a scenario's runs, each in its own worker process, with a progress bar."""
from __future__ import annotations

import json
import multiprocessing
import os
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from galore_bench.errors import UserError
from galore_bench.measure import training
from galore_bench.run import ranks
from galore_bench.run.worker import FAULT_ENV, child_main, died_record
from galore_bench.spec.scenario import Scenario, selected_runs


def existing_record(out: Path, scenario: Scenario, label: str) -> Path | None:
    """A finished ok record for this run, so an interrupted sweep can resume (--skip-existing)."""
    folder_records = sorted(out.glob(f"*/{scenario.name}/{label}.*.json"))
    for path in reversed(folder_records):
        if json.loads(path.read_text()).get("status") == "ok":
            return path
    return None


_CONTEXT: Any = None


def _context() -> Any:
    """A fork server that imports the heavy modules once; every run is still a fresh child process."""
    global _CONTEXT
    if _CONTEXT is None:
        _CONTEXT = multiprocessing.get_context("forkserver")
        _CONTEXT.set_forkserver_preload(["galore_bench.run.worker"])
    return _CONTEXT


def _run_worker(request: dict[str, Any], on_step, target=None) -> tuple[Path | None, str]:
    """Run one request in its own process, relay its step messages, return (record path, stderr tail)."""
    context = _context()
    receiver, sender = context.Pipe(duplex=False)
    with tempfile.NamedTemporaryFile("w+", suffix=".stderr", delete=False) as err:
        stderr_path = err.name
    try:
        proc = context.Process(target=target or child_main, args=(request, sender, stderr_path), daemon=True)
        proc.start()
        sender.close()
        record = None
        while True:
            try:
                message = receiver.recv()
            except EOFError:
                break
            if "step" in message:
                on_step(message["step"], message["of"])
            if "record" in message:
                record = Path(message["record"])
        proc.join()
        stderr = Path(stderr_path).read_text(errors="replace")
        if record is None:
            stderr = f"worker exited with code {proc.exitcode}\n{stderr}"
        return record, stderr[-4000:]
    finally:
        receiver.close()
        os.unlink(stderr_path)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run_ranks(request: dict[str, Any], world_size: int, on_step) -> tuple[Path | None, str]:
    """One process per rank (torchrun's env contract); if a rank dies, the others are stopped, not left hanging."""
    context = _context()
    receiver, sender = context.Pipe(duplex=False)
    errs = []
    for _ in range(world_size):
        with tempfile.NamedTemporaryFile("w+", suffix=".stderr", delete=False) as err:
            errs.append(err.name)
    port, record, procs = _free_port(), None, []
    try:
        for rank in range(world_size):
            procs.append(context.Process(target=ranks.rank_main, daemon=True,
                                         args=(request, rank, world_size, port, sender if rank == 0 else None, errs[rank])))
            procs[-1].start()
        sender.close()
        closed, first_done = False, 0.0
        while True:
            while not closed and receiver.poll(0.2):
                try:
                    message = receiver.recv()
                except EOFError:
                    closed = True
                    break
                if "step" in message:
                    on_step(message["step"], message["of"])
                if message.get("record"):
                    record = Path(message["record"])
            if closed:
                time.sleep(0.2)
            codes = [p.exitcode for p in procs]
            if any(code not in (None, 0) for code in codes) or all(code is not None for code in codes):
                break
            if any(code == 0 for code in codes):  # a rank finished: the others have a minute to follow
                first_done = first_done or time.monotonic()
                if time.monotonic() - first_done > 60:
                    break
        deadline = time.monotonic() + 5  # the others of a failed group: give them a moment, then stop them
        for proc in procs:
            proc.join(max(0.0, deadline - time.monotonic()))
            if proc.is_alive():
                proc.kill()
                proc.join()
        failed = [(r, p.exitcode) for r, p in enumerate(procs) if p.exitcode != 0]
        if record is None:  # a rank that failed on its own wrote the run's record and named it on stderr
            record = _named_record([Path(errs[r]) for r, _ in failed])
        stderr = "\n".join(f"rank {r} exited with code {code}\n{Path(errs[r]).read_text(errors='replace')[-2000:]}"
                           for r, code in failed)
        if record is None and not failed:
            stderr = Path(errs[0]).read_text(errors="replace")[-4000:]
        return record, stderr
    finally:
        receiver.close()
        for path in errs:
            os.unlink(path)


def check_mode(scenario: Scenario, mode: str | None) -> None:
    """Modes a distributed scenario cannot run, refused before any process starts."""
    if scenario.distributed is not None and (mode or scenario.mode) == "estimate":
        raise UserError(f"{scenario.path}: mode: got 'estimate', allowed simulate or measure with [distributed] "
                        "(the closed form does not model sharding; simulate applies it to the traced step)")


def _named_record(stderr_files: list[Path]) -> Path | None:
    for path in stderr_files:
        for line in path.read_text(errors="replace").splitlines():
            if line.startswith(ranks.RECORD_MARKER):
                return Path(line[len(ranks.RECORD_MARKER):].strip())
    return None


def _dispatch(scenario: Scenario, index: int, request: dict[str, Any], on_step) -> tuple[Path | None, str]:
    """A single-device run in one worker; a distributed one as ranks, or as one simulating worker."""
    spec = scenario.distributed
    if spec is None:
        return _run_worker(request, on_step)

    mode = ranks.resolve_mode(request["mode"] or scenario.mode, scenario.runs[index], spec, training.pick_device())
    if mode == "simulate":
        return _run_worker(request, on_step, target=ranks.simulate_main)
    if len(spec.world_sizes) > 1:
        return None, f"measure mode needs one world size, got {list(spec.world_sizes)} (a list is a simulate search)"
    return _run_ranks(request, spec.world_size, on_step)


def run_scenario(scenario: Scenario, *, out: Path, mode: str | None = None, steps: int | None = None,
                 skip_existing: bool = False, console: Console | None = None,
                 memory_snapshot: bool = False, only: str | None = None) -> list[Path]:
    """Run every run of the scenario (or those `only` names); a run that crashes still leaves an error record."""
    check_mode(scenario, mode)
    chosen = selected_runs(scenario, only)
    console = console or Console(stderr=True)
    paths: list[Path] = []
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=False) as progress:
        sweep = progress.add_task(f"{scenario.name}", total=len(chosen))
        for index, run in chosen:
            done = existing_record(out, scenario, run.label) if skip_existing else None
            if done is not None:
                paths.append(done)
                progress.advance(sweep)
                continue
            task = progress.add_task(f"  {run.label}", total=None)

            def on_step(step: int, total: int, task=task) -> None:
                progress.update(task, completed=step, total=total)

            request = {"scenario": scenario.path, "run_index": index, "mode": mode, "steps": steps, "out": str(out),
                       "fault": os.environ.get(FAULT_ENV), "threads": torch.get_num_threads(),
                       "memory_snapshot": memory_snapshot}
            path, stderr = _dispatch(scenario, index, request, on_step)
            if path is None:  # the worker died (killed, segfault): record that, keep going
                path = died_record(scenario, run, mode or scenario.mode,
                                   stderr.strip() or "worker died without a message", out)
            paths.append(path)
            progress.update(task, visible=False)
            progress.advance(sweep)
    return paths


__all__ = ["run_scenario"]
