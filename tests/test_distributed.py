"""Distributed runs: real 2-rank gloo DDP / FSDP2 on the tiny model, simulated sharding, validation, submitit."""
from __future__ import annotations

import re
import sys
import time

import pytest

from galore_bench.errors import UserError
from galore_bench.run.ranks import simulate_record
from galore_bench.run.sweep import run_scenario
from galore_bench.run.worker import FAULT_ENV
from galore_bench.spec.scenario import load_scenario
from galore_bench.store import load as load_record

from conftest import TINY_HEADER


def distributed(strategy: str, world_size: str = "2", extra: str = "") -> str:
    return TINY_HEADER + f'[distributed]\nstrategy = "{strategy}"\nworld_size = {world_size}\n{extra}'


DDP = distributed("ddp") + """
[[runs]]
method = "adamw"
lr = 3e-3
[[runs]]
method = "sgd"
lr = 0.3
"""
FSDP2 = distributed("fsdp2") + """
[[runs]]
method = "adamw"
lr = 3e-3
[[runs]]
method = "lomo"
lr = 0.3
"""


def _check_ranks(record: dict, world_size: int) -> list[dict]:
    """Every rank reported; the record's peak is the worst rank's; each breakdown sums to its peak."""
    assert record["status"] == "ok", record["error"]
    dist = record["distributed"]
    assert dist["world_size"] == world_size and dist["simulated"] is False and dist["backend"] == "gloo"
    ranks = dist["ranks"]
    assert [r["rank"] for r in ranks] == list(range(world_size))
    for rank in ranks:
        assert sum(rank["breakdown"].values()) == rank["peak_bytes"] > 0
    assert dist["max_rank_peak_bytes"] == max(r["peak_bytes"] for r in ranks) == record["memory"]["peak_bytes"]
    return ranks


def test_two_gloo_ranks_ddp_and_fsdp2(write_scenario, tmp_path):
    started = time.perf_counter()
    ddp_paths = run_scenario(load_scenario(str(write_scenario(DDP, "ddp2"))), out=tmp_path / "results")
    fsdp_paths = run_scenario(load_scenario(str(write_scenario(FSDP2, "fsdp2"))), out=tmp_path / "results")
    ddp = {load_record(p)["run"]: load_record(p) for p in ddp_paths}
    fsdp = {load_record(p)["run"]: load_record(p) for p in fsdp_paths}
    ddp_ranks, fsdp_ranks = _check_ranks(ddp["adamw"], 2), _check_ranks(fsdp["adamw"], 2)
    _check_ranks(ddp["sgd"], 2), _check_ranks(fsdp["lomo"], 2)

    # DDP: replicas end bit-identical although each rank trained on its own data (losses differ)
    assert ddp_ranks[0]["weights_sha256"] == ddp_ranks[1]["weights_sha256"]
    assert ddp_ranks[0]["final_loss"] != ddp_ranks[1]["final_loss"]
    full = 164_672 * 4  # tiny model, fp32 (hand count in test_models_records)
    assert ddp_ranks[0]["breakdown"]["weights"] == full and ddp_ranks[0]["local_parameter_bytes"] == full
    assert ddp_ranks[0]["breakdown"]["gradients"] == full  # DDP's bucket, as .grad views, for the whole step

    # FSDP2: each rank holds half the weights and half the AdamW moments
    for rank in fsdp_ranks:
        assert rank["breakdown"]["weights"] == rank["local_parameter_bytes"] == full // 2
        assert rank["breakdown"]["optimizer_states"] < 0.51 * ddp_ranks[0]["breakdown"]["optimizer_states"]
    assert fsdp_ranks[0]["weights_sha256"] != fsdp_ranks[1]["weights_sha256"]  # different shards
    # the same training either way: averaged gradients give the same losses on every rank
    assert [r["final_loss"] for r in fsdp_ranks] == pytest.approx([r["final_loss"] for r in ddp_ranks], rel=1e-5)
    # LOMO's fused update under FSDP2 (hooks after the reduce-scatter) is SGD on the averaged gradient
    assert fsdp["lomo"]["quality"]["losses"] == pytest.approx(ddp["sgd"]["quality"]["losses"], rel=1e-5)
    assert fsdp["lomo"]["distributed"]["ranks"][0]["breakdown"]["gradients"] == 0
    # the readings of the rank with the peak: on a CPU, exact tracker bytes stand for allocated, nothing is reserved
    for record in (ddp["adamw"], fsdp["adamw"]):
        worst = max(r["peak_bytes"] for r in record["distributed"]["ranks"])
        assert record["memory"]["readings"]["allocated"]["bytes"] == worst == record["memory"]["peak_bytes"]
        assert record["memory"]["readings"]["reserved"]["bytes"] is None
    assert time.perf_counter() - started < 60


def _candidate(record: dict, world_size: int) -> dict:
    return next(c for c in record["distributed"]["candidates"] if c["world_size"] == world_size)


# Hand count of the tiny model (fp32) per rank, every storage rounded up to 512 B like the CUDA allocator.
# Shards are dim-0 rows, ceil(rows / N) each: embed + head 512x64, q/k/v/o 64x64 (x8), gate/up 172x64 (x4),
# down 64x172 (x2), 5 norms of 64.
WEIGHTS = {
    1: 2 * 131072 + 8 * 16384 + 4 * 44032 + 2 * 44032 + 5 * 512,  # 659_968
    2: 2 * 65536 + 8 * 8192 + 4 * 22016 + 2 * 22016 + 5 * 512,  # 256 / 32 / 86 / 32 rows: 331_264
    4: 2 * 32768 + 8 * 4096 + 4 * 11264 + 2 * 11264 + 5 * 512,  # 43x64x4 = 11008 B -> 11264: 168_448
}
STEP_SCALARS = 21 * 512  # AdamW's 0-dim `step` per parameter: replicated, not sharded


def test_simulated_fsdp2_shards_weights_and_states_by_world_size(write_scenario):
    body = TINY_HEADER.replace("[device]", '[device]\nmode = "simulate"') + \
        '[distributed]\nstrategy = "fsdp2"\nworld_size = [1, 2, 4]\n[[runs]]\nmethod = "adamw"\n'
    scenario = load_scenario(str(write_scenario(body, "sim")))
    record = simulate_record(scenario, scenario.runs[0])
    assert record["status"] == "ok", record["error"]
    dist = record["distributed"]
    assert dist["simulated"] is True and "sharding arithmetic" in dist["how"]
    for n, weights in WEIGHTS.items():
        breakdown = _candidate(record, n)["breakdown"]
        assert breakdown["weights"] == weights
        assert breakdown["optimizer_states"] == 2 * weights + STEP_SCALARS  # exp_avg + exp_avg_sq
    assert _candidate(record, 1)["strategy"] == "single"  # one rank: no wrapper, nothing gathered
    assert _candidate(record, 1)["peak_bytes"] == dist["single_device_peak_bytes"]
    transient = _candidate(record, 2)["transient_bytes"]
    assert transient["backward"] > transient["forward"] > 0
    # the smallest world size that fits 1 GiB is 1; the record stands there
    assert dist["gpus_needed"] == 1 and record["memory"]["peak_bytes"] == _candidate(record, 1)["peak_bytes"]
    readings = record["memory"]["readings"]  # the chosen world size's largest rank; no allocator replay of a shard
    assert readings["allocated"]["bytes"] == record["memory"]["peak_bytes"] and readings["allocated"]["kind"] == "model"
    assert readings["reserved"]["bytes"] is None and "sharded rank" in readings["device_total"]["source"]


def test_ranks_and_gpus_commands_run_without_argparse_or_torchrun(write_scenario, tmp_path, capsys):
    """`ranks` simulating outside torchrun is rank 0 and writes the record; `gpus` makes its search a page."""
    from galore_bench.cli import gpus, main, ranks

    body = distributed("fsdp2", "[1, 2, 4]") + '[[runs]]\nmethod = "adamw"\n'
    assert ranks.run(str(write_scenario(body, "sim")), out=tmp_path / "results", mode="simulate") == 0
    (printed,) = capsys.readouterr().out.split()
    record = load_record(printed)
    assert [c["breakdown"]["weights"] for c in record["distributed"]["candidates"]] == list(WEIGHTS.values())
    assert gpus.run([tmp_path / "results"], out=tmp_path / "pages") == 0
    page = (tmp_path / "pages" / "sim_gpus.md").read_text()
    row = next(line for line in page.splitlines() if line.startswith("| tiny"))
    assert row.split(" | ")[3] == str(record["distributed"]["gpus_needed"]) == "1"  # GPUs needed, as searched
    assert main(["ranks", "--scenario", str(write_scenario(TINY_HEADER + '[[runs]]\nmethod = "sgd"\n'))]) == 1
    assert main(["gpus", str(tmp_path / "results"), "--out", str(tmp_path / "through-argparse")]) == 0
    assert "no [distributed] table; use `galore-bench run`" in capsys.readouterr().err


def test_simulated_fsdp2_inference_shards_weights_and_gathers_no_gradients(write_scenario):
    """Inference freezes every parameter: no trainable count, no gradient in FSDP2's backward transient (there is
    no backward), and a cosine schedule (for the scenario's training runs) is simply not applied to it."""
    body = (TINY_HEADER.replace("[device]", '[device]\nmode = "simulate"')
            .replace("[train]", '[train]\nlr_schedule = "cosine"'))
    body += '[distributed]\nstrategy = "fsdp2"\nworld_size = [1, 2, 4]\n[[runs]]\nmethod = "inference"\n'
    scenario = load_scenario(str(write_scenario(body, "inf")))
    record = simulate_record(scenario, scenario.runs[0])
    assert record["status"] == "ok", record["error"]
    assert record["model"]["trainable_parameters"] == 0
    for n, weights in WEIGHTS.items():
        candidate = _candidate(record, n)
        assert candidate["breakdown"]["weights"] == weights
        assert candidate["breakdown"]["gradients"] == candidate["breakdown"]["optimizer_states"] == 0
        assert candidate["transient_bytes"]["backward"] == candidate["transient_bytes"]["forward"]
    assert _candidate(record, 2)["transient_bytes"]["forward"] > 0


def test_simulated_offload_moves_shards_to_host_and_ddp_replicates(write_scenario):
    body = TINY_HEADER.replace("[device]", '[device]\nmode = "simulate"')
    offload = load_scenario(str(write_scenario(
        body + '[distributed]\nstrategy = "fsdp2"\nworld_size = 2\ncpu_offload = true\n[[runs]]\nmethod = "adamw"\n',
        "off")))
    breakdown = simulate_record(offload, offload.runs[0])["distributed"]["ranks"][1]
    assert breakdown["breakdown"]["weights"] == breakdown["breakdown"]["optimizer_states"] == 0
    assert breakdown["host_bytes"] >= 3 * WEIGHTS[2]  # weights + two moments, on the host
    ddp = load_scenario(str(write_scenario(
        body + '[distributed]\nstrategy = "ddp"\nworld_size = 2\n[[runs]]\nmethod = "adamw"\n', "ddpsim")))
    record = simulate_record(ddp, ddp.runs[0])
    assert record["memory"]["breakdown"]["weights"] == WEIGHTS[1]
    assert record["memory"]["breakdown"]["gradients"] == 164_672 * 4  # the whole bucket, all step long


def test_simulate_agrees_with_measured_fsdp2(write_scenario, tmp_path):
    """The sharding arithmetic against a real 2-rank FSDP2 run of the same step (within 10%)."""
    body = FSDP2.split("[[runs]]")[0] + '[[runs]]\nmethod = "adamw"\nlr = 3e-3\n'
    scenario = load_scenario(str(write_scenario(body, "cmp")))
    measured = load_record(run_scenario(scenario, out=tmp_path / "r")[0])["memory"]["peak_bytes"]
    simulated = simulate_record(scenario, scenario.runs[0])["memory"]["peak_bytes"]
    assert simulated == pytest.approx(measured, rel=0.10)


def test_lomo_65b_3090_scenario_validates_and_13b_needs_two_gpus():
    scenario = load_scenario("lomo_65b_3090")
    assert [r.model_name for r in scenario.runs] == ["7b", "13b", "30b", "65b"]
    assert scenario.distributed is not None and scenario.distributed.world_sizes == (1, 2, 4, 8, 16)
    record = simulate_record(scenario, scenario.runs[1])
    dist = record["distributed"]
    assert record["status"] == "ok" and dist["gpus_needed"] == 2  # the paper's count (Table 2)
    assert _candidate(record, 1)["peak_bytes"] > scenario.budget_bytes >= record["memory"]["peak_bytes"]
    assert len(dist["ranks"]) == 2 and record["budget"]["fits"] is True


@pytest.mark.slow
def test_lomo_65b_3090_reproduces_paper_gpu_counts():
    scenario = load_scenario("lomo_65b_3090")
    needed = {run.model_name: simulate_record(scenario, run)["distributed"]["gpus_needed"] for run in scenario.runs}
    assert needed == {"7b": 1, "13b": 2, "30b": 4, "65b": 8}


@pytest.mark.parametrize(("strategy", "run", "reason"), [
    ("ddp", 'method = "lomo"', "LOMO updates each weight inside backward"),
    ("ddp", 'method = "adamw"\nlayerwise = true', "layer-wise stepping updates each weight inside backward"),
    ("fsdp2", 'method = "galore"\nrank = 8', "GaLore takes the SVD of each whole gradient matrix"),
    ("fsdp2", 'method = "adam8bit"', "bitsandbytes"),
    ("fsdp2", 'method = "apollo"\nrank = 8', "APOLLO's scaling norms span whole rows"),
    ("fsdp2", 'method = "muon"', "Muon orthogonalises each whole matrix"),
    ("fsdp2", 'method = "lomo"\nclip_grad_norm = 1.0', "a global norm needs an all-reduce"),
    ("ddp", 'method = "inference"', "DDP needs parameters that require gradients"),
])
def test_methods_that_do_not_compose_are_rejected_with_the_reason(write_scenario, strategy, run, reason):
    path = write_scenario(distributed(strategy) + f"[[runs]]\n{run}\n", "bad")
    with pytest.raises(UserError) as err:
        load_scenario(str(path))
    message = str(err.value)
    assert f"distributed.strategy: got '{strategy}', allowed another strategy: " in message and reason in message


def test_bad_distributed_table_lists_every_problem(write_scenario):
    body = TINY_HEADER.replace("[device]", '[device]\nmode = "measure"') + """
[distributed]
strategy = "ddp"
world_size = [2, 4]
cpu_offload = true
backend = "mpi"
shards = 2
[[runs]]
method = "sgd"
"""
    with pytest.raises(UserError) as err:
        load_scenario(str(write_scenario(body, "bad")))
    message = str(err.value)
    assert message.startswith("4 problem(s)")
    assert "distributed.shards: got 'shards', allowed one of strategy" in message
    assert "distributed.world_size: got [2, 4], allowed a single int in measure mode" in message
    assert "distributed.cpu_offload: got True, allowed false with strategy ddp" in message
    assert "distributed.backend: got 'mpi', allowed one of auto, gloo, nccl" in message


def test_a_dead_rank_gives_an_error_record_not_a_hang(write_scenario, tmp_path, monkeypatch):
    scenario = load_scenario(str(write_scenario(distributed("ddp") + '[[runs]]\nmethod = "sgd"\n', "dead")))
    monkeypatch.setenv(FAULT_ENV, "kill:sgd")  # the last rank SIGKILLs itself after its first step
    started = time.perf_counter()
    record = load_record(run_scenario(scenario, out=tmp_path / "r")[0])
    assert record["status"] == "error" and "rank 1 exited with code -9" in record["error"]
    assert time.perf_counter() - started < 30


def test_an_oom_on_one_rank_is_an_oom_record_at_once_and_the_only_record(write_scenario, tmp_path, monkeypatch):
    """The failing rank reports the run itself: the others, stuck in collectives, are stopped by the runner."""
    scenario = load_scenario(str(write_scenario(distributed("ddp") + '[[runs]]\nmethod = "sgd"\n', "oom")))
    monkeypatch.setenv(FAULT_ENV, "oom:sgd")  # the last rank raises torch.OutOfMemoryError after its first step
    started = time.perf_counter()
    paths = run_scenario(scenario, out=tmp_path / "r")
    record = load_record(paths[0])
    assert record["status"] == "oom" and record["error"].startswith("rank 1: OOM: fault injected")
    assert record["distributed"]["world_size"] == 2 and record["budget"]["fits"] is False
    assert len(list((tmp_path / "r").rglob("*.json"))) == 1
    assert time.perf_counter() - started < 30


def test_cluster_without_submitit_is_a_clear_error(write_scenario, tmp_path, monkeypatch):
    from galore_bench.run.cluster import submit_scenario

    monkeypatch.setitem(sys.modules, "submitit", None)  # `import submitit` raises ImportError
    scenario = load_scenario(str(write_scenario(TINY_HEADER + '[[runs]]\nmethod = "sgd"\n', "nosub")))
    with pytest.raises(UserError, match=re.escape("pip install 'galore-bench[cluster]'")):
        submit_scenario(scenario, out=tmp_path / "results", log=lambda line: None)
    assert not (tmp_path / "results").exists()


def test_submitit_local_executor_runs_ranks_into_the_same_store(write_scenario, tmp_path):
    pytest.importorskip("submitit")  # in the test extras; kept for installs without them
    from galore_bench.run.cluster import parse_options, submit_scenario

    scenario = load_scenario(str(write_scenario(distributed("ddp") + '[[runs]]\nmethod = "sgd"\n', "sub")))
    paths = submit_scenario(scenario, out=tmp_path / "results", options=parse_options(["timeout_min=5"]),
                            threads=1, log=lambda line: None)
    record = load_record(paths[0])
    ranks = _check_ranks(record, 2)
    assert ranks[0]["weights_sha256"] == ranks[1]["weights_sha256"]
    assert paths[0].is_relative_to(tmp_path / "results")
    with pytest.raises(UserError, match="KEY=VALUE"):
        parse_options(["partition"])


def test_estimate_mode_is_refused_for_distributed_scenarios(write_scenario, tmp_path):
    scenario = load_scenario(str(write_scenario(distributed("ddp") + '[[runs]]\nmethod = "sgd"\n', "est")))
    with pytest.raises(UserError, match="got 'estimate', allowed simulate or measure with \\[distributed\\]"):
        run_scenario(scenario, out=tmp_path / "r", mode="estimate")
    assert not (tmp_path / "r").exists()
