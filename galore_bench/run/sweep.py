"""A sweep over a scenario's runs, each in its own worker process, with a progress bar."""
from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import torch
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from galore_bench import store
from galore_bench.errors import UserError
from galore_bench.measure import resolve_mode, training
from galore_bench.methods import PLUGIN_ENV
from galore_bench.run import ranks, study
from galore_bench.run.assemble import died_record
from galore_bench.run.request import RunRequest
from galore_bench.run.worker import FAULT_ENV, InheritedFile, child_main
from galore_bench.spec.scenario import RunSpec, Scenario, selected_runs

OnStep = Callable[[int, int], None]
_CONTEXT: Any = None


def _context() -> Any:
    """A fork server that imports the heavy modules once; every run is still a fresh child process."""
    global _CONTEXT
    if _CONTEXT is None:
        _CONTEXT = multiprocessing.get_context("forkserver")
        _CONTEXT.set_forkserver_preload(["galore_bench.run.worker"])
    return _CONTEXT


def _spawn(target: Callable[..., None], process_args: list[tuple[Any, ...]], on_step: OnStep,
           name: str) -> tuple[Path | None, str]:
    """One child per args tuple, each called as target(*args, conn, stderr), the first holding the pipe
    (progress and the record's path). If one fails, the others get a moment, then are stopped; if this
    process is interrupted, all are stopped. Returns (the record path, what the failed ones wrote on stderr)."""
    context = _context()
    receiver, sender = context.Pipe(duplex=False)
    # no name on disk: nothing to remove, even when this process is killed by SIGKILL
    errs: list[BinaryIO] = [tempfile.TemporaryFile() for _ in process_args]  # noqa: SIM115 - closed below
    procs: list[Any] = []
    record: Path | None = None

    def relay(message: dict[str, Any]) -> None:
        nonlocal record
        if "step" in message:
            on_step(message["step"], message["of"])
        if message.get("record"):
            record = Path(message["record"])

    try:
        procs = [context.Process(target=target, daemon=True,
                                 args=(*args, sender if i == 0 else None, InheritedFile(errs[i].fileno())))
                 for i, args in enumerate(process_args)]
        for proc in procs:
            proc.start()
        sender.close()
        _wait(procs, receiver, relay)
        failed = [(i, p.exitcode) for i, p in enumerate(procs) if p.exitcode != 0]
        if record is None:  # a rank that failed on its own wrote the run's record and named it on stderr
            record = _named_record([errs[i] for i, _ in failed])
        who = [name] if len(procs) == 1 else [f"{name} {i}" for i in range(len(procs))]
        stderr = "\n".join(f"{who[i]} exited with code {code}{_signal_name(code)}\n{_tail(errs[i], 2000)}"
                           for i, code in failed)
        if record is None and not failed:
            stderr = _tail(errs[0], 4000)
        return record, stderr
    finally:
        for proc in procs:  # none is left when this process stops early (Ctrl-C, SIGTERM)
            if proc.is_alive():
                proc.kill()
                proc.join()
        receiver.close()
        for err in errs:
            err.close()


def _signal_name(code: int | None) -> str:
    """What killed a child, and whether that was an interruption (Ctrl-C, `timeout`, `scancel`)."""
    if code is None or code >= 0:
        return ""
    name = signal.Signals(-code).name if -code in signal.valid_signals() else f"signal {-code}"
    return f" (killed by {name}{': interrupted' if -code in (signal.SIGINT, signal.SIGTERM) else ''})"


def _tail(err: BinaryIO, chars: int) -> str:
    size = os.fstat(err.fileno()).st_size
    start = max(0, size - 4 * chars)  # the child moves the shared offset: read by position
    return os.pread(err.fileno(), size - start, start).decode(errors="replace")[-chars:]


def _wait(procs: list[Any], receiver: Any, relay: Callable[[dict[str, Any]], None]) -> None:
    """Relay messages until every child exited, one failed, or a minute after the first finished."""
    closed, first_done = False, 0.0
    while True:
        if closed:
            time.sleep(0.2)
        else:
            closed = _drain(receiver, relay, 0.2)
        codes = [p.exitcode for p in procs]
        if any(code not in (None, 0) for code in codes) or all(code is not None for code in codes):
            break
        if any(code == 0 for code in codes):  # a rank finished: the others have a minute to follow
            first_done = first_done or time.monotonic()
            if time.monotonic() - first_done > 60:
                break
    if not closed:
        _drain(receiver, relay, 0.0)  # what a child sent just before it exited
    deadline = time.monotonic() + 5  # the others of a failed group: give them a moment, then stop them
    for proc in procs:
        proc.join(max(0.0, deadline - time.monotonic()))
        if proc.is_alive():
            proc.kill()
            proc.join()


def _drain(receiver: Any, relay: Callable[[dict[str, Any]], None], timeout: float) -> bool:
    """Relay every message waiting; True once the pipe is closed (every sender gone)."""
    while receiver.poll(timeout):
        try:
            relay(receiver.recv())
        except EOFError:
            return True
    return False


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _named_record(stderr_files: list[BinaryIO]) -> Path | None:
    for err in stderr_files:
        for line in _tail(err, 1 << 20).splitlines():
            if line.startswith(ranks.RECORD_MARKER):
                return Path(line[len(ranks.RECORD_MARKER):].strip())
    return None


def _dispatch(scenario: Scenario, request: RunRequest, on_step: OnStep) -> tuple[Path | None, str]:
    """A single-device run in one worker; a distributed one as ranks, or as one simulating worker."""
    spec = scenario.distributed
    if spec is None:
        return _spawn(child_main, [(request,)], on_step, "worker")
    if request.mode == "simulate":  # resolved by the sweep, once, before any process started
        return _spawn(ranks.simulate_main, [(request,)], on_step, "worker")
    if len(spec.world_sizes) > 1:
        return None, f"measure mode needs one world size, got {list(spec.world_sizes)} (a list is a simulate search)"
    port, world = _free_port(), spec.world_size
    return _spawn(ranks.rank_main, [(request, rank, world, port) for rank in range(world)], on_step, "rank")


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM (`timeout`, `scancel`, `kill`) stops a sweep as Ctrl-C does: its children stopped, finished
    records kept, the run in progress left without a record (resume with --skip-existing)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_scenario(scenario: Scenario, *, out: Path, mode: str | None = None, steps: int | None = None,
                 skip_existing: bool = False, console: Console | None = None,
                 memory_snapshot: bool = False, only: str | None = None) -> list[Path]:
    """Run every run of the scenario (or those `only` names); a run that crashes still leaves an error record.
    A scenario with a [study] runs each run's lr grid, then its other seeds, then the step-time cost."""
    chosen = selected_runs(scenario, only)
    device = training.pick_device()
    # a mode the scenario cannot run is refused here, before any process starts
    modes = {index: resolve_mode(scenario, run, mode, device) for index, run in chosen}
    if scenario.study is not None and set(modes.values()) != {"measure"}:
        raise UserError(f"{scenario.name}: a [study] trains for real: mode measure, got {sorted(set(modes.values()))}")
    console = console or Console(stderr=True)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with _sigterm_as_interrupt(), Progress(*columns, console=console, transient=False) as progress:
        sweep = progress.add_task(escape(scenario.name), total=_count(scenario, chosen))  # user text, not markup

        def one(scenario: Scenario, index: int, run: RunSpec, run_mode: str) -> Path:
            done = store.finished(out, scenario.name, run.label, run_mode) if skip_existing else None
            if done is None:
                task = progress.add_task(f"  {escape(run.label)}", total=None)

                def on_step(step: int, total: int, task: Any = task) -> None:
                    progress.update(task, completed=step, total=total)

                request = RunRequest(scenario.path, index, out, run_mode, steps, torch.get_num_threads(),
                                     os.environ.get(FAULT_ENV), memory_snapshot, os.environ.get(PLUGIN_ENV),
                                     validated=scenario)
                done, stderr = _dispatch(scenario, request, on_step)
                if done is None:  # the worker died (killed, segfault): record that, keep going
                    error = stderr.strip() or "worker died without a message"
                    done = store.write(died_record(scenario, run, run_mode, error), out)
                progress.update(task, visible=False)
            progress.advance(sweep)
            return done

        if scenario.study is None:
            return [one(scenario, index, run, modes[index]) for index, run in chosen]
        return _run_study(scenario, [run for _, run in chosen], one, out, device, lambda: progress.advance(sweep),
                          cost=only is None)


def _count(scenario: Scenario, chosen: list[tuple[int, RunSpec]]) -> int:
    if scenario.study is None:
        return len(chosen)
    per_run = [len(study.grid_of(run)) + len(scenario.study.seeds) - 1 for _, run in chosen]
    return sum(per_run) + (len(chosen) if scenario.study.cost_rounds and len(chosen) == len(scenario.runs) else 0)


def _run_study(scenario: Scenario, runs: list[RunSpec], one: Callable[[Scenario, int, RunSpec, str], Path],
               out: Path, device: str, advance: Callable[[], None], cost: bool = True) -> list[Path]:
    """Grid at the tuning seed, the choice from the records written, the other seeds, then the interleaved cost
    of every run at its chosen rate (`cost`: only when every run was selected, so AdamW is the reference; sweeps
    of parts of the runs in parallel are followed by one with --skip-existing, which measures it)."""
    paths: list[Path] = []
    choices: list[tuple[RunSpec, float]] = []
    for run in runs:
        grid = [one(s, 0, r, "measure") for s, r in study.grid_trainings(scenario, run)]
        chosen = study.choose([store.load(path) for path in grid])
        paths += grid + [one(s, 0, r, "measure") for s, r in study.seed_trainings(scenario, run, chosen)]
        if chosen["chosen_lr"] is not None:
            choices.append((run, chosen["chosen_lr"]))
    if cost and scenario.study is not None and scenario.study.cost_rounds and choices:
        paths += study.write_all(study.cost_records(scenario, choices, device), out)
        for _ in choices:
            advance()
    return paths


__all__ = ["run_scenario"]
