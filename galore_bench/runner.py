"""A sweep over a scenario's runs, each in its own worker process, with a progress bar and a results table."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from galore_bench.record import empty_record, load_record, record_path, write_record
from galore_bench.scenario import Scenario
from galore_bench.units import format_bytes

CATEGORY_COLUMNS = ("weights", "gradients", "optimizer_states", "activations", "other")


def existing_record(out: Path, scenario: Scenario, label: str) -> Path | None:
    """A finished ok record for this run, so an interrupted sweep can resume (--skip-existing)."""
    folder_records = sorted(out.glob(f"*/{scenario.name}/{label}.*.json"))
    for path in reversed(folder_records):
        if json.loads(path.read_text()).get("status") == "ok":
            return path
    return None


def _run_worker(request: dict[str, Any], on_step) -> tuple[Path | None, str]:
    """Start the worker, relay its step messages, return (record path, stderr tail)."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as handle:
        json.dump(request, handle)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    try:
        proc = subprocess.Popen([sys.executable, "-m", "galore_bench.worker", handle.name], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=env)
        record = None
        assert proc.stdout is not None and proc.stderr is not None
        for line in proc.stdout:
            try:
                message = json.loads(line)
            except json.JSONDecodeError:
                continue
            if "step" in message:
                on_step(message["step"], message["of"])
            if "record" in message:
                record = Path(message["record"])
        stderr = proc.stderr.read()
        proc.wait()
        if record is None:
            stderr = f"worker exited with code {proc.returncode}\n{stderr}"
        return record, stderr[-4000:]
    finally:
        os.unlink(handle.name)


def run_scenario(scenario: Scenario, *, out: Path, mode: str | None = None, steps: int | None = None,
                 skip_existing: bool = False, console: Console | None = None) -> list[Path]:
    """Run every run of the scenario; a run that crashes still leaves an error record."""
    console = console or Console(stderr=True)
    paths: list[Path] = []
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=False) as progress:
        sweep = progress.add_task(f"{scenario.name}", total=len(scenario.runs))
        for index, run in enumerate(scenario.runs):
            done = existing_record(out, scenario, run.label) if skip_existing else None
            if done is not None:
                paths.append(done)
                progress.advance(sweep)
                continue
            task = progress.add_task(f"  {run.label}", total=None)

            def on_step(step: int, total: int, task=task) -> None:
                progress.update(task, completed=step, total=total)

            request = {"scenario": scenario.path, "run_index": index, "mode": mode, "steps": steps, "out": str(out)}
            path, stderr = _run_worker(request, on_step)
            if path is None:  # the worker died (killed, segfault): record that, keep going
                record = empty_record(scenario.to_dict(), {"label": run.label, "method": run.method,
                                                           "options": run.options}, mode or scenario.mode, "unknown")
                record["error"] = stderr.strip() or "worker died without a message"
                path = write_record(record, out)
            paths.append(path)
            progress.update(task, visible=False)
            progress.advance(sweep)
    return paths


def results_table(paths: list[Path], title: str = "results") -> Table:
    """Peak and breakdown per run, and whether it fits the budget."""
    table = Table(title=title)
    for name in ("run", "mode", "status", "peak", *CATEGORY_COLUMNS, "fits budget", "loss", "tokens/s"):
        table.add_column(name, justify="left" if name in ("run", "mode", "status") else "right")
    for path in paths:
        record = load_record(path)
        memory, breakdown = record["memory"], record["memory"].get("breakdown") or {}
        fits = record["budget"]["fits"]
        loss = record["quality"]["final_loss"]
        rate = record["throughput"].get("tokens_per_second")
        status = record["status"] if record["status"] == "ok" else f"{record['status']}: {(record['error'] or '')[:60]}"
        table.add_row(record["run"], record["mode"], status, format_bytes(memory.get("peak_bytes")),
                      *(format_bytes(breakdown.get(c)) for c in CATEGORY_COLUMNS),
                      "-" if fits is None else ("yes" if fits else "NO") + f" ({record['budget']['text']})",
                      "-" if loss is None else f"{loss:.3f}", "-" if rate is None else f"{rate:,.0f}")
    return table


__all__ = ["run_scenario", "results_table", "record_path"]
