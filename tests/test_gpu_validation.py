"""Issue 9's GPU validation script, exercised where CI runs: its --plumbing mode on the CPU (the whole
pipeline: single-run scenario files, runner processes in both modes, summary from the records), and its
refusal to run the real mode without CUDA, so CPU numbers can never pass for GPU ones."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pandas as pd
import pytest
import torch

from galore_bench.store import load as load_record

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_validation.py"


def _script():
    spec = importlib.util.spec_from_file_location("gpu_validation", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def plumbing(tmp_path_factory):
    """One plumbing sweep (~15 s on a 2-core CPU), shared by the checks below."""
    if torch.cuda.is_available():
        pytest.skip("the plumbing check is for machines without CUDA; on a GPU, run the real mode")
    out = tmp_path_factory.mktemp("gpu_validation")
    gv = _script()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CUDA_VISIBLE_DEVICES", "")  # restored afterwards: main sets it for its workers
        assert gv.main(["--out", str(out), "--plumbing", "--parts", ",".join(gv.PARTS)]) == 0
    return gv, out


def test_plumbing_summary_has_one_row_per_run_and_mode_equal_to_the_records(plumbing):
    gv, out = plumbing
    frame = pd.read_csv(out / "summary.csv")
    keys = list(zip(frame["part"], frame["size"], frame["method"], frame["mode"]))
    assert len(keys) == len(set(keys)) == 16  # 8 runs (2 per part, tiny model) x measure, simulate
    assert set(frame["part"]) == set(gv.PARTS) and set(frame["size"]) == {"tiny"}
    assert set(frame["mode"]) == {"measure", "simulate"} and (frame["status"] == "ok").all()
    listed = json.loads((out / "records.json").read_text())
    assert sorted(listed["records"]) == sorted(frame["record"])
    with tarfile.open(out / "records.tar.gz") as tar:
        assert {f"records/{r}" for r in listed["records"]} <= set(tar.getnames())
    for row in frame.to_dict("records"):
        record = load_record(out / "records" / row["record"])
        scenario = {"sizes": "gv_tiny"}.get(row["part"], row["part"].removesuffix("_layerwise"))
        assert (record["scenario"], record["run"], record["mode"]) == (scenario, row["method"], row["mode"])
        assert row["peak_bytes"] == record["memory"]["peak_bytes"] > 0
        assert row["device"] == record["device"] and row["date"] == record["created"]
        assert row["device"] == ("cpu" if row["mode"] == "measure" else "simulated-cpu")
        assert pd.isna(row["allocated_bytes"]) and pd.isna(row["reserved_bytes"])  # no CUDA allocator here
        if row["mode"] == "measure":
            assert row["tgs"] == pytest.approx(record["throughput"]["tgs"], rel=1e-12)
            assert pd.isna(row["mfu"]) and record["throughput"]["mfu"] is None  # no peak FLOP/s for a CPU
            twin = frame[(frame["part"] == row["part"]) & (frame["method"] == row["method"])
                         & (frame["mode"] == "simulate")].iloc[0]
            assert row["simulated_peak_bytes"] == twin["peak_bytes"]
            error = 100 * (twin["peak_bytes"] - row["peak_bytes"]) / row["peak_bytes"]
            assert row["error_pct"] == pytest.approx(error) and row["over_3pct"] == (abs(error) > 3)
        else:
            assert pd.isna(row["tgs"]) and pd.isna(row["error_pct"])


def test_plumbing_outputs_say_they_are_a_cpu_check(plumbing):
    gv, out = plumbing
    label = "PLUMBING CHECK ON CPU — NOT A GPU MEASUREMENT"
    assert gv.PLUMBING_LABEL == label
    assert (pd.read_csv(out / "summary.csv")["label"] == label).all()
    assert json.loads((out / "records.json").read_text())["label"] == label
    summary = (out / "summary.md").read_text()
    assert summary.startswith(f"# Issue 9: simulate vs measure — {label}")
    assert "GPU measurement on" not in summary


def test_plumbing_reuses_finished_records_and_honours_the_time_budget(plumbing, tmp_path, monkeypatch):
    gv, out = plumbing
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    before = sorted(p.name for p in (out / "records").rglob("*.json"))
    again = tmp_path / "again"
    summarise = ["--out", str(again), "--records", str(out / "records"), "--plumbing", "--summary-only"]
    assert gv.main(summarise) == 0
    assert sorted(p.name for p in (out / "records").rglob("*.json")) == before  # nothing re-run
    assert (pd.read_csv(again / "summary.csv")["status"] == "ok").all()
    late = tmp_path / "late"
    assert gv.main(["--out", str(late), "--plumbing", "--budget-seconds", "0"]) == 0
    assert (pd.read_csv(late / "summary.csv")["status"] == "not run").all()


def test_real_mode_without_cuda_refuses_with_a_clear_message(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the real mode would run")
    done = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path / "out")],
                          check=False, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "no CUDA device" in done.stderr and "--plumbing" in done.stderr
    assert not (tmp_path / "out").exists()  # nothing written that could be mistaken for a result


PROBES = SCRIPT.with_name("gpu_probes.py")


def test_probes_without_cuda_refuse_and_write_nothing(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the probes would run")
    done = subprocess.run([sys.executable, str(PROBES), "--out", str(tmp_path / "out")],
                          check=False, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "no CUDA device" in done.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="reads the CUDA allocator")
def test_probes_on_a_gpu_see_the_tensors_the_tracker_sees(tmp_path):
    """The allocator sees at least what the tracker sees; a bf16 4096^2 matmul's output is 32 MiB exactly."""
    done = subprocess.run([sys.executable, str(PROBES), "--out", str(tmp_path)], check=False, timeout=300)
    assert done.returncode == 0
    rows = {row["probe"]: row for row in json.loads((tmp_path / "probes.json").read_text())["probes"]}
    matmul = rows["cublas matmul 4096^2 bf16"]["second"]
    assert matmul["tracker_peak"] == 4096 * 4096 * 2
    for row in rows.values():
        for call in ("first", "second"):
            if call in row:
                assert row[call]["unseen_peak"] >= 0, row


def test_every_registered_method_is_validated():
    """Issue 9 asks for every method: a newly registered one must join the GPU sweep too."""
    from galore_bench.methods import REGISTRY

    gv = _script()
    assert set(gv.METHODS) == set(REGISTRY) and len(gv.METHODS) == len(REGISTRY)
    ranked = {name for name, method in REGISTRY.items() if method.uses_rank}
    assert set(gv.RANKED) | set(gv.KEEPS_ITS_RANK) == ranked and not set(gv.RANKED) & set(gv.KEEPS_ITS_RANK)
