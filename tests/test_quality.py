"""The quality study (quality_cpu): byte-level data and its splits, the [study] spec, the lr choice, the seeds'
statistics in the report, LOMO's schedule, and the scenario itself in a reduced form (one seed, a few steps):
every method's loss must fall, and the interleaved step-time cost must come back for every method."""
from __future__ import annotations

import dataclasses
import importlib.metadata as md
import math
import statistics
from pathlib import Path

import numpy as np
import pytest
import torch

from galore_bench import data, data_bytes, store
from galore_bench.errors import UserError
from galore_bench.measure.training import lr_schedule
from galore_bench.methods import REGISTRY, TrainSettings
from galore_bench.models import ModelShape, build_model
from galore_bench.optim.relora import warmup_cosine_lr
from galore_bench.report.quality import cost_table, quality_table, study_points
from galore_bench.run import assemble, study
from galore_bench.run.sweep import _run_study
from galore_bench.run.worker import execute
from galore_bench.spec.scenario import load_scenario

try:
    md.distribution(data.WIKI_DIST)
    HAVE_CORPUS = True
except md.PackageNotFoundError:
    HAVE_CORPUS = False
needs_corpus = pytest.mark.skipif(not HAVE_CORPUS, reason=f"{data.WIKI_DIST} not installed")


@needs_corpus
def test_byte_splits_partition_the_documents_and_keep_data_py_train_split():
    docs = data.load_documents()
    splits = {title: data_bytes.split_of(title) for title, _ in docs}
    assert all((s == "train") == (data.split_of(t) == "train") for t, s in splits.items())
    tune, test = sum(s == "tune" for s in splits.values()), sum(s == "test" for s in splits.values())
    held = sum(data.split_of(t) == "validation" for t, _ in docs)
    assert tune + test == held and 0.4 < tune / held < 0.6  # an independent hash halves the validation part
    stream = data_bytes.load_stream("test")
    texts = [text for title, text in docs if splits[title] == "test"]
    assert data_bytes.decode(stream) == texts  # every byte of every test document, in order, nothing else
    assert len(stream) == sum(len(t.encode("utf-8")) + 2 for t in texts)
    assert stream.max() == data_bytes.EOS and np.array_equal(stream, data_bytes.load_stream("test"))


def test_encode_is_utf8_bytes_between_bos_and_eos():
    ids = data_bytes.encode(["é a", ""])
    assert ids.tolist() == [256, 0xC3, 0xA9, 0x20, 0x61, 257, 256, 257]
    assert data_bytes.decode(ids) == ["é a", ""]


def _scenario(write_scenario, extra: str = "", runs: str = '[[runs]]\nmethod = "adamw"\nlr_grid = [1e-3, 3e-3]'):
    return write_scenario(f"""
[model]
hidden_size = 32
intermediate_size = 64
num_hidden_layers = 1
num_attention_heads = 2
vocab_size = 258
[train]
batch_size = 2
seq_len = 16
dtype = "fp32"
steps = 2
[device]
mode = "measure"
[eval]
data = "wiki-bytes"
batches = 1
{extra}
{runs}
""")


def test_study_spec_and_its_mistakes(write_scenario):
    scenario = load_scenario(str(_scenario(write_scenario, "[study]\nseeds = [4, 5]\ncost_rounds = 3")))
    assert scenario.study is not None and scenario.study.seeds == (4, 5) and scenario.study.tune_seed == 4
    assert scenario.runs[0].lr_grid == (1e-3, 3e-3)
    bad = '[[runs]]\nmethod = "adamw"\nlr = 1e-3\nlr_grid = [1e-3, -1.0]\n[[runs]]\nmethod = "sgd"\nlr_grid = 3'
    with pytest.raises(UserError) as err:
        load_scenario(str(_scenario(write_scenario, "[study]\nseeds = [1, 1]\ncost_steps = 0", bad)))
    text = str(err.value)
    assert "study.seeds" in text and "study.cost_steps" in text and "runs[0].lr_grid" in text
    assert "runs[1].lr_grid" in text
    with pytest.raises(UserError, match="model.vocab_size"):
        load_scenario(str(write_scenario(_scenario(write_scenario).read_text().replace("258", "300"))))


def _record(scenario, run, nll: float | None, ppl: float, peak: int = 1000) -> dict:
    record = assemble.new_record(scenario, run, "measure", "cpu")
    record["status"] = "ok" if nll is not None else "error"
    record["quality"].update({"perplexity": ppl, "eval": {"nll": math.log(ppl)},
                              "tune_eval": {"nll": nll} if nll is not None else None})
    record["memory"]["peak_bytes"] = peak
    return record


def test_the_grid_chooses_by_the_tune_split_and_the_seeds_follow(write_scenario, tmp_path: Path):
    """The sweep's order, with each training replaced by a record whose tune loss we set: the lr with the lowest
    tune loss is trained at the other seeds, even when another lr has the better test perplexity."""
    scenario = load_scenario(str(_scenario(write_scenario, "[study]\nseeds = [0, 7, 9]")))
    tune_nll = {1e-3: 2.0, 3e-3: 1.5}
    test_ppl = {1e-3: 3.0, 3e-3: 9.0}  # the test split must play no part in the choice
    calls = []

    def one(run_scenario, index, run, mode):
        calls.append(run.label)
        lr = run.options["lr"]
        return store.write(_record(run_scenario, run, tune_nll[lr], test_ppl[lr] + run_scenario.train.seed), tmp_path)

    paths = _run_study(scenario, list(scenario.runs), one, tmp_path, "cpu", lambda: None)
    assert calls == ["adamw@lr=0.001@seed=0", "adamw@lr=0.003@seed=0", "adamw@lr=0.003@seed=7",
                     "adamw@lr=0.003@seed=9"]
    records = [store.load(p) for p in paths]
    assert [r["train"]["seed"] for r in records] == [0, 0, 7, 9]
    assert records[3]["quality"]["tuning"]["chosen_lr"] == 3e-3 and records[3]["quality"]["tuning"]["role"] == "seed"
    table = quality_table(records, [r["run"] for r in records])
    row = table.iloc[0]
    assert row["chosen lr"] == 3e-3 and row["seeds"] == "0 7 9" and row["lr grid"] == "0.001 0.003"
    assert row["test ppl mean"] == pytest.approx(statistics.fmean([9.0, 16.0, 18.0]))
    assert row["spread"] == pytest.approx(statistics.stdev([9.0, 16.0, 18.0]))
    assert row["bits/byte"] == pytest.approx(statistics.fmean(math.log([9.0, 16.0, 18.0][i]) for i in range(3))
                                             / math.log(2))
    points, labels = study_points(records) or ([], [])
    assert labels == ["adamw (lr 0.003)"] and points[0]["quality"]["perplexity"] == row["test ppl mean"]


def test_the_report_says_whether_a_difference_is_beyond_the_seed_spread(write_scenario):
    runs = "".join(f'[[runs]]\nmethod = "{name}"\n' for name in ("adamw", "sgd", "lomo", "adafactor"))
    scenario = load_scenario(str(_scenario(write_scenario, "[study]\nseeds = [0, 1]", runs)))
    ppl = {"adamw": [10.0, 12.0], "sgd": [12.5, 14.0], "lomo": [11.0, 13.0], "adafactor": [9.0, 11.0]}
    records = []
    for run in scenario.runs:
        for seed, value in zip((0, 1), ppl[run.method]):
            one_scenario, spec = study.one_training(scenario, run, 1e-3, seed, "grid" if seed == 0 else "seed",
                                                    {"chosen_lr": 1e-3})
            records.append(_record(one_scenario, spec, 1.0, value))
    table = quality_table(records, [r["run"] for r in records]).set_index("run")
    assert table.loc["sgd", "beyond spread"] == "yes" and table.loc["lomo", "beyond spread"] == "no"
    assert table.loc["adafactor", "beyond spread"] == "no"  # lower on average, but its worst seed overlaps
    assert table.loc["sgd", "vs AdamW %"] == pytest.approx((13.25 / 11.0 - 1) * 100)
    records[-1]["quality"]["tuning"]["chosen_lr"] = 5.0  # a seed record from another sweep's choice
    with pytest.raises(UserError, match="adafactor"):
        quality_table(records, [r["run"] for r in records])


def test_lomo_follows_the_same_schedule_as_a_lambdalr():
    train = TrainSettings(steps=12, warmup_steps=3, lr_schedule="cosine", dtype="fp32")
    trainer = REGISTRY["lomo"].build(torch.nn.Linear(2, 2), {**{k: o.default for k, o in
                                                                REGISTRY["lomo"].all_options().items()},
                                                             "lr": 0.5}, train)
    trainer.scheduler = lr_schedule(trainer, train)  # as measure/training.build_trainer attaches it
    sgd = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.5)
    reference = torch.optim.lr_scheduler.LambdaLR(sgd, lambda s: warmup_cosine_lr(s, 12, 3))
    for step in range(12):
        assert trainer.optimizer.lr == pytest.approx(sgd.param_groups[0]["lr"]), step
        trainer.update(step)
        sgd.step()
        reference.step()
    assert not REGISTRY["lomo"].limits({}, train)  # a scheduled LOMO run is allowed


@needs_corpus
def test_quality_cpu_reduced_every_method_learns_and_has_a_step_cost():
    """quality_cpu at one seed, its grid's middle rate, 10 steps of 4 x 64 bytes, one held-out batch: the loss falls
    for every method, the final figure is on the test split, and the interleaved cost covers every run."""
    scenario = load_scenario("quality_cpu")
    train = dataclasses.replace(scenario.train, steps=10, warmup_steps=1, batch_size=4)
    scenario = dataclasses.replace(scenario, train=train, eval_batches=1)
    chosen = []
    for run in scenario.runs:
        grid = study.grid_of(run)
        one_scenario, spec = study.one_training(scenario, run, grid[len(grid) // 2], 0, "grid")
        record = execute(one_scenario, spec, "measure", None)
        assert record["status"] == "ok", (run.label, record["error"])
        losses = record["quality"]["losses"]
        assert len(losses) == 10 and all(math.isfinite(x) for x in losses)
        assert statistics.fmean(losses[-3:]) < losses[0] - 0.05, (run.label, losses)
        assert record["quality"]["eval"]["data"] == "wiki-offline bytes, test split"
        assert record["quality"]["tune_eval"]["data"] == "wiki-offline bytes, tune split"
        assert record["quality"]["data_provenance"]["tokenizer"]["vocab_size"] == 258
        chosen.append((run, spec.options["lr"]))
    costs = study.cost_records(dataclasses.replace(scenario, study=dataclasses.replace(
        scenario.study, cost_rounds=2, cost_steps=1)), chosen, "cpu")
    table = cost_table(costs, [r["run"] for r in costs]).set_index("run")
    assert all(r["status"] == "ok" for r in costs) and table.loc["adamw@cost", "x AdamW"] == 1.0
    assert (table["x AdamW"] > 0).all() and table.loc["galore@cost", "update_proj_gap"] == 50
    assert table.loc["galore@cost", "x AdamW amortised"] >= table.loc["galore@cost", "x AdamW"]


def test_body_dominates_the_quality_model():
    shape = load_scenario("quality_cpu").model
    model = build_model(ModelShape(**{k: v for k, v in dataclasses.asdict(shape).items() if k != "source"}), "fp32")
    total = sum(p.numel() for p in model.parameters())
    embeddings = model.model.embed_tokens.weight.numel() + model.lm_head.weight.numel()
    assert embeddings == 2 * 258 * 192 and embeddings / total < 0.06 and total - embeddings > 1.7e6
