"""The built wheel works on its own: installed into a fresh virtual environment and run from outside the checkout,
it lists every shipped scenario and prints LOMO Table 1's paper column (the data travel inside the package).

About 30-60 s (build, venv, three commands that import torch); runs in CI, deselect with -m 'not slow and not wheel'.
"""
from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.wheel
CHECKOUT = Path(__file__).resolve().parents[1]
SHIPPED = sorted(p.stem for p in (CHECKOUT / "galore_bench" / "scenarios").glob("*.toml"))
PAPER_TABLES = sorted(p.name for p in (CHECKOUT / "galore_bench" / "report" / "reference").glob("*.csv"))
PRESETS = sorted(p.name for p in (CHECKOUT / "galore_bench" / "models" / "presets").glob("*.json"))


def run(args: list[str | Path], cwd: Path, env: dict[str, str] | None = None) -> str:
    """A command's stdout; its stderr in the failure message when it exits non-zero."""
    done = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300,
                          check=False)
    assert done.returncode == 0, f"{args}: exit {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def build_wheel(tmp: Path) -> Path:
    """Build from a clean copy of the sources: an in-tree build/ folder could hold files deleted since."""
    source = tmp / "source"
    shutil.copytree(CHECKOUT / "galore_bench", source / "galore_bench",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(CHECKOUT / name, source / name)
    run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index",
         "-w", tmp / "dist", source], cwd=tmp)
    (wheel,) = (tmp / "dist").glob("galore_bench-*.whl")
    return wheel


def fresh_venv(tmp: Path, wheel: Path) -> Path:
    """A venv that sees the test environment's packages (torch, ...) but holds galore-bench only from the wheel."""
    venv = tmp / "venv"
    run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", venv], cwd=tmp)
    python = venv / "bin" / "python"
    purelib = Path(run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=tmp).strip())
    # run from a venv (nox), --system-site-packages reaches only the base interpreter's: add this one's too
    ours = [*site.getsitepackages(), sysconfig.get_paths()["purelib"]]
    (purelib / "_test_environment.pth").write_text("\n".join(dict.fromkeys(ours)) + "\n")
    # pip from the test environment; --ignore-installed: the editable install outside the venv stays untouched
    run([python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--ignore-installed", wheel], cwd=tmp)
    return venv


def test_wheel_installs_and_runs_outside_the_checkout(tmp_path: Path):
    pytest.importorskip("setuptools", "68", reason="building offline (--no-build-isolation) needs setuptools here")
    wheel = build_wheel(tmp_path)
    names = zipfile.ZipFile(wheel).namelist()
    assert sorted(n.split("/")[-1][:-5] for n in names if n.startswith("galore_bench/scenarios/")) == SHIPPED
    assert sorted(n.split("/")[-1] for n in names if n.startswith("galore_bench/report/reference/")) == PAPER_TABLES
    assert sorted(n.split("/")[-1] for n in names if n.startswith("galore_bench/models/presets/")) == PRESETS
    assert len(SHIPPED) == 13 and len(PAPER_TABLES) == 8 and len(PRESETS) == 9

    venv = fresh_venv(tmp_path, wheel)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "GALORE_BENCH_REFERENCE")}
    env.update(PYTHONNOUSERSITE="1", COLUMNS="400", PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}")
    imported = run([venv / "bin" / "python", "-c", "import galore_bench; print(galore_bench.__file__)"], outside, env)
    assert Path(imported.strip()).resolve().is_relative_to(venv.resolve()), imported  # not the checkout's copy
    cli = venv / "bin" / "galore-bench"
    assert cli.read_text().startswith(f"#!{venv}")  # the script runs the venv's interpreter

    listed = [line.split()[0] for line in run([cli, "list"], outside, env).splitlines() if line.strip()]
    assert listed == SHIPPED  # every shipped scenario, one line each, nothing else

    run([cli, "run", "--scenario", "lomo_7b", "--mode", "estimate", "--out", "results"], outside, env)
    run([cli, "report", "results", "--out", "report"], outside, env)
    text = (outside / "report" / "lomo_7b.md").read_text()
    assert "- paper references (galore_bench/report/reference): " in text and str(tmp_path) not in text
    table = text.split("## Against LOMO Table 1", 1)[1].split("\n## ", 1)[0]
    rows = [[cell.strip() for cell in line.strip("|").split("|")]
            for line in table.splitlines() if line.startswith("|")]
    header = rows[0]
    paper = {(row[0], row[header.index("quantity")]): row[header.index("paper GiB")] for row in rows[2:]}
    assert paper["adamw", "optimizer_states"] == "75.31"  # LOMO Table 1, AdamW with checkpointing
    assert paper["lomo", "peak"] == "14.58"  # LOMO's printed total with checkpointing
