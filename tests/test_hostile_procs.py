"""Hostile and careless use of `run` (issue 23, causes 4, 5, 7, 8): an output folder that cannot be written,
a scenario edited mid-sweep, a parent killed by SIGTERM / SIGKILL, rich markup in user text."""
from __future__ import annotations

import io
import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from galore_bench.cli import main

HEAD = '[model]\nsize = "tiny"\n[train]\nbatch_size = 2\nseq_len = 32\ndtype = "fp32"\nsteps = 2\n'
SGD = HEAD + '[[runs]]\nmethod = "sgd"\n'


def estimate(path: Path, out: Path, *extra: str) -> int:
    return main(["run", "--scenario", str(path), "--mode", "estimate", "--out", str(out), *extra])


def no_run_started(monkeypatch) -> None:
    """Make any run that starts fail the test: the refusal must come before the work."""
    from galore_bench.run import sweep

    def started(*args, **kwargs):
        raise AssertionError("a run started before --out was checked")

    monkeypatch.setattr(sweep, "run_scenario", started)


# -- 7. an output folder that cannot be written: one message before any run starts ----------------------------
def test_a_dangling_symlink_out_is_one_message_before_any_run(write_scenario, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    out.symlink_to(tmp_path / "missing")
    no_run_started(monkeypatch)
    assert estimate(write_scenario(SGD), out) == 1
    err = capsys.readouterr().err
    assert err.count("galore-bench: error: --out: ") == 1 and "symlink to a missing" in err, err
    assert "Traceback" not in err and not (tmp_path / "missing").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only folder")
def test_an_unwritable_out_is_one_message_before_any_run(write_scenario, tmp_path, capsys, monkeypatch):
    out = tmp_path / "locked"
    out.mkdir()
    out.chmod(0o500)
    no_run_started(monkeypatch)
    try:
        assert estimate(write_scenario(SGD), out) == 1
    finally:
        out.chmod(0o700)
    err = capsys.readouterr().err
    assert "galore-bench: error: --out: cannot write into" in err and "Traceback" not in err, err
    assert list(out.iterdir()) == []  # the probe is gone too


def test_an_out_under_a_file_is_one_message(write_scenario, tmp_path, capsys, monkeypatch):
    (tmp_path / "plain").write_text("x")
    no_run_started(monkeypatch)
    assert estimate(write_scenario(SGD), tmp_path / "plain" / "out") == 1
    err = capsys.readouterr().err
    assert "galore-bench: error: --out: cannot write into" in err and "Traceback" not in err, err


def test_a_small_file_size_limit_is_one_message_before_any_run(write_scenario, tmp_path, capsys, monkeypatch):
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    no_run_started(monkeypatch)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, hard))
    try:
        status = estimate(write_scenario(SGD), tmp_path / "out")
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    err = capsys.readouterr().err
    assert status == 1 and "galore-bench: error: --out: the file size limit (ulimit -f) is 4096 bytes" in err, err
    assert not list((tmp_path / "out").rglob("*.json"))


# -- 5. the scenario file edited during a sweep: the runs still to come are the ones validated ----------------
def test_editing_the_scenario_mid_sweep_changes_no_remaining_run(write_scenario, tmp_path, monkeypatch):
    from galore_bench import store
    from galore_bench.run import sweep

    path = write_scenario(HEAD + '[[runs]]\nmethod = "sgd"\n[[runs]]\nmethod = "adamw"\nlr = 0.001\n')
    dispatch, started = sweep._dispatch, []

    def edit_after_the_first(scenario, request, on_step):
        if started:  # the first run is done: someone edits the file (the second run's method and lr)
            path.write_text(HEAD + '[[runs]]\nmethod = "sgd"\n[[runs]]\nmethod = "lomo"\nlr = 0.5\n')
        started.append(request.run_index)
        return dispatch(scenario, request, on_step)

    monkeypatch.setattr(sweep, "_dispatch", edit_after_the_first)
    out = tmp_path / "out"
    assert estimate(path, out) == 0
    records = [store.load(p) for p in store.find([out])]
    assert started == [0, 1] and sorted(r["run"] for r in records) == ["adamw", "sgd"]
    adamw = next(r for r in records if r["run"] == "adamw")
    assert adamw["method"]["name"] == "adamw" and adamw["method"]["lr"] == 0.001


# -- 4. a parent killed by SIGTERM / SIGKILL takes its workers along; nothing false is recorded ---------------
def descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


@pytest.mark.parametrize("signal_name", ["SIGKILL", "SIGTERM"])
def test_a_killed_sweep_leaves_no_worker_no_false_record_no_temp_file(write_scenario, tmp_path, signal_name):
    runs = "".join(f'[[runs]]\nmethod = "sgd"\nlabel = "sgd{i}"\n' for i in range(3))
    path = write_scenario(HEAD.replace("steps = 2", "steps = 100000") + runs)
    out, scratch = tmp_path / "out", tmp_path / "tmp"
    scratch.mkdir()
    env = {**os.environ, "TMPDIR": str(scratch), "PYTHONPATH": str(Path(__file__).parents[1])}
    parent = subprocess.Popen([sys.executable, "-m", "galore_bench.cli", "run", "--scenario", str(path),
                               "--mode", "measure", "--out", str(out)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline, workers = time.monotonic() + 60, []
    while time.monotonic() < deadline and parent.poll() is None:  # a worker started and is stepping
        workers = descendants(parent.pid)
        if len(workers) >= 2 and any(p.cpu_percent(0.05) > 0 for p in workers[1:]):
            break
        time.sleep(0.2)
    assert parent.poll() is None and len(workers) >= 2, parent.stderr.read() if parent.stderr else ""
    time.sleep(1.0)
    workers = descendants(parent.pid)
    parent.send_signal(getattr(signal, signal_name))
    parent.wait(timeout=20)
    _, alive = psutil.wait_procs(workers, timeout=10)
    assert not alive, f"left running after {signal_name}: {alive}"
    time.sleep(1.0)  # an orphan that noticed late would write now
    records = [json.loads(p.read_text()) for p in out.rglob("*.json")] if out.exists() else []
    assert not [(r["run"], r["error"]) for r in records if r["status"] != "ok"]  # e.g. BrokenPipeError
    assert list(scratch.iterdir()) == []  # no stderr temp file left behind
    if signal_name == "SIGTERM":  # a clean stop, as after Ctrl-C
        assert parent.returncode == 130 and b"interrupted" in (parent.stderr.read() if parent.stderr else b"")


# -- 8. rich markup in user text is printed as text: '[/x]' crashes nothing, '[x=y]' does not vanish ---------
MARKUP = "[x=y] and [/x]"


def rendered(renderable) -> str:
    from rich.console import Console

    shown = Console(file=io.StringIO(), width=300)
    shown.print(renderable)
    return shown.file.getvalue()


@pytest.fixture
def tiny_record(write_scenario, tmp_path) -> Path:
    from galore_bench import store

    out = tmp_path / "results"
    assert estimate(write_scenario(SGD, "tiny_sgd"), out) == 0
    [file] = store.find([out])
    return file


def test_run_prints_a_description_and_an_out_folder_holding_markup(write_scenario, tmp_path, capsys):
    path = write_scenario(f'description = "{MARKUP}"\n' + SGD)
    assert estimate(path, tmp_path / "out[/x]") == 0  # a folder 'x]' inside 'out['
    shown = capsys.readouterr().out
    assert f"case: {MARKUP}" in shown and "under " + str(tmp_path / "out[/x]") in shown


def test_the_results_table_shows_a_record_error_holding_markup(tiny_record):
    from galore_bench.cli.run import results_table

    record = json.loads(tiny_record.read_text())
    record.update(status="error", error=f"boom {MARKUP}", device=MARKUP)
    tiny_record.write_text(json.dumps(record))
    shown = rendered(results_table([tiny_record], title=MARKUP))
    assert shown.count(MARKUP) == 2 and f"error: boom {MARKUP}" in shown


def test_the_progress_bar_shows_names_holding_markup(tiny_record, monkeypatch):
    import dataclasses

    from rich.console import Console

    from galore_bench.run import sweep
    from galore_bench.spec.scenario import load_scenario

    scenario = load_scenario(str(tiny_record.parents[2].parent / "tiny_sgd.toml"))
    run = dataclasses.replace(scenario.runs[0], label="[/x]")
    scenario = dataclasses.replace(scenario, name=MARKUP, runs=(run,))
    monkeypatch.setattr(sweep, "_dispatch", lambda *args: (tiny_record, ""))  # no worker: only the bar
    bar = Console(file=io.StringIO(), width=200, force_terminal=False)
    assert sweep.run_scenario(scenario, out=tiny_record.parents[2], mode="estimate", console=bar) == [tiny_record]
    assert MARKUP in bar.file.getvalue()


def test_list_shows_a_description_holding_markup(monkeypatch):
    import dataclasses

    from rich.console import Console

    from galore_bench.cli import list as list_command

    smoke = list_command.load_scenario("smoke_cpu")
    monkeypatch.setattr(list_command, "shipped_scenarios", lambda: ["smoke_cpu"])
    monkeypatch.setattr(list_command, "load_scenario", lambda name: dataclasses.replace(smoke, description=MARKUP))
    shown = Console(file=io.StringIO(), width=300)
    assert list_command.run(shown) == 0
    assert MARKUP in shown.file.getvalue()


def test_check_shows_file_names_holding_markup(tiny_record, tmp_path):
    from rich.console import Console

    from galore_bench.cli import check

    budgets = tmp_path / f"budgets{MARKUP}.toml"  # a file 'x].toml' in a folder 'budgets[x=y] and ['
    budgets.parent.mkdir()
    budgets.write_text(f'[[budget]]\nscenario = "{tiny_record.parents[2].parent / "tiny_sgd.toml"}"\n'
                       'run = "sgd"\npeak = "1 GiB"\n')
    missing = tmp_path / "none[/x]"
    missing.mkdir(parents=True)
    shown = Console(file=io.StringIO(), width=400)
    assert check.run(budgets, [missing], console=shown) == 1  # no record there: named, with the folder
    text = shown.file.getvalue()
    assert "".join(str(budgets).split()) in "".join(text.split())  # the title wraps
    assert f"under {missing}" in text


def test_fit_shows_names_holding_markup():
    import dataclasses

    from galore_bench.cli.fit import fit_table
    from galore_bench.spec.scenario import load_scenario

    scenario = dataclasses.replace(load_scenario("smoke_cpu"), name=MARKUP)
    row = {"run": "[/x]", "model": MARKUP, "estimate_bytes": 1 << 20, "fits": True, "largest_batch": 4,
           "estimate_at_largest_bytes": 2 << 20}
    shown = rendered(fit_table(scenario, [row], "1 GiB", 1 << 30, confirm=False))
    assert f"{MARKUP}: fit in 1 GiB" in shown and "[/x]" in shown and shown.count(MARKUP) == 2


def test_compare_shows_folder_names_holding_markup(tiny_record, tmp_path):
    from rich.console import Console

    from galore_bench.cli import compare

    a = tiny_record.parents[2]
    (tmp_path / "B[").mkdir()
    b = a.rename(tmp_path / "B[/x]")
    shown = Console(file=io.StringIO(), width=400)
    assert compare.run(b, b, console=shown, errors=shown) == 0
    assert shown.file.getvalue().count(str(b)) == 2  # B and A in the title
