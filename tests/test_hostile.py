"""Hostile and careless input (issue 23): names that would become paths, records lying about their scenario,
a resume that must match exactly, wrong types, non-finite numbers: one message, nothing outside --out."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from galore_bench import store
from galore_bench.cli import main
from galore_bench.errors import UserError
from galore_bench.spec.scenario import load_scenario

HEAD = '[model]\nsize = "tiny"\n[train]\nbatch_size = 2\nseq_len = 32\ndtype = "fp32"\nsteps = 2\n'


def files_under(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()}


def estimate(path: Path, out: Path, *extra: str) -> int:
    return main(["run", "--scenario", str(path), "--mode", "estimate", "--out", str(out), *extra])


# -- 1. a run label (or a scenario's name) is part of a file name, never a path -----------------------------
HOSTILE_LABELS = ["/tmp/galore-bench-escape/x", "../../escape", "a/b", ".hidden", "a\\u0000b", "x" * 300,
                  "a..b", "a\\\\b", ""]


@pytest.mark.parametrize("label", HOSTILE_LABELS, ids=range(len(HOSTILE_LABELS)))
def test_a_label_that_would_be_a_path_is_refused_at_validation(write_scenario, tmp_path, capsys, label):
    path = write_scenario(HEAD + f'[[runs]]\nmethod = "sgd"\nlabel = "{label}"\n')
    if label == "":  # an empty label means "derive one": valid
        load_scenario(str(path))
        return
    with pytest.raises(UserError) as info:
        load_scenario(str(path))
    lines = [line for line in str(info.value).splitlines() if line.startswith(f"{path}: runs[0].label: got ")]
    assert lines and "allowed a name of letters, digits" in lines[0], str(info.value)
    before = files_under(tmp_path)
    assert estimate(path, tmp_path / "out") == 1
    assert files_under(tmp_path) == before  # nothing written anywhere, --out included
    assert "Traceback" not in capsys.readouterr().err


def test_a_label_that_is_a_path_is_refused_before_a_submitit_job_too(write_scenario, tmp_path, capsys):
    path = write_scenario(HEAD + '[[runs]]\nmethod = "sgd"\nlabel = "../../../escape"\n')
    before = files_under(tmp_path)
    assert estimate(path, tmp_path / "out", "--submitit", "local") == 1
    assert files_under(tmp_path) == before and not (tmp_path.parent / "escape").exists()
    assert "runs[0].label: got '../../../escape'" in capsys.readouterr().err


def test_a_scenario_file_name_that_cannot_name_records_is_refused(write_scenario):
    path = write_scenario(HEAD + '[[runs]]\nmethod = "sgd"\n', name=".hidden")
    with pytest.raises(UserError, match=r"\.hidden\.toml: scenario name: got '\.hidden', allowed a name of"):
        load_scenario(str(path))


@pytest.fixture
def one_record(write_scenario, tmp_path) -> tuple[Path, dict]:
    """A real estimate record of a tiny run, and the results folder it is in."""
    out = tmp_path / "results"
    assert estimate(write_scenario(HEAD + '[[runs]]\nmethod = "sgd"\n', "tiny_sgd"), out) == 0
    [file] = store.find([out])
    return out, json.loads(file.read_text())


@pytest.mark.parametrize("field,value", [("run", "../../../escape"), ("scenario", "/tmp/galore-bench-escape"),
                                         ("device", "..")])
def test_store_write_refuses_a_record_whose_file_lies_outside_its_folder(one_record, tmp_path, field, value):
    out, record = one_record
    before = files_under(tmp_path)
    with pytest.raises(UserError, match="outside"):
        store.write({**record, field: value}, out)
    assert files_under(tmp_path) == before
    assert not Path("/tmp/galore-bench-escape").exists()


# -- 2. a record read from disk names its scenario; report never writes outside --out -----------------------
@pytest.mark.parametrize("scenario", ["../../escape", "/tmp/galore-bench-escape/README", "a/b", ".x", 7])
def test_a_record_whose_scenario_is_a_path_is_refused_when_read(one_record, tmp_path, capsys, scenario):
    _, record = one_record
    bad = tmp_path / "exchanged" / "bad.json"
    bad.parent.mkdir()
    bad.write_text(json.dumps({**record, "scenario": scenario}))
    with pytest.raises(UserError, match=rf"{bad}: scenario: got {scenario!r}, allowed a name of"):
        store.load(bad)
    before = files_under(tmp_path)
    assert main(["report", str(bad.parent), "--out", str(tmp_path / "reports"), "--format", "md,csv"]) == 1
    assert files_under(tmp_path) == before
    assert "Traceback" not in capsys.readouterr().err


def test_report_checks_each_output_path_lies_under_out(one_record, tmp_path, monkeypatch):
    """Defence in depth: a record that reached the renderer unchecked cannot name a file outside --out."""
    from galore_bench.report import gpus, render

    out, record = one_record
    hostile = {**record, "scenario": "../escape"}
    monkeypatch.setattr(store, "load_latest", lambda paths: ([hostile], [out / "x.json"], Counter()))
    before = files_under(tmp_path)
    with pytest.raises(UserError, match="outside"):
        render.render_report([out], tmp_path / "reports", {"md", "csv"})
    monkeypatch.setattr(gpus, "fit_rows", lambda records, papers: [{"scenario": "../escape"}])
    with pytest.raises(UserError, match="outside"):
        gpus.write_pages([hostile], [out / "x.json"], {}, tmp_path / "reports")
    assert {p for p in files_under(tmp_path) if "escape" in p.name} == set()
    assert files_under(tmp_path) - before <= {p for p in files_under(tmp_path / "reports")}


# -- 3. --skip-existing resumes exactly the runs asked for -------------------------------------------------
def test_skip_existing_matches_the_mode(one_record):
    out, record = one_record
    assert store.finished(out, record["scenario"], record["run"], "estimate") is not None
    assert store.finished(out, record["scenario"], record["run"], "simulate") is None


def test_skip_existing_matches_the_label_exactly(write_scenario, tmp_path):
    out = tmp_path / "results"
    assert estimate(write_scenario(HEAD + '[[runs]]\nmethod = "sgd"\nlabel = "sgd.v2"\n', "s"), out) == 0
    assert estimate(write_scenario(HEAD + '[[runs]]\nmethod = "sgd"\n', "s"), out, "--skip-existing") == 0
    assert sorted(json.loads(f.read_text())["run"] for f in store.find([out])) == ["sgd", "sgd.v2"]


def test_skip_existing_notes_a_damaged_record_and_runs_again(one_record, write_scenario, capsys):
    out, record = one_record
    [good] = store.find([out])
    damaged = good.with_name(f"{record['run']}.estimate.20990101T000000.json")
    damaged.write_text('{"scenario": "tiny_sgd", "run": "sgd", "memory": ')
    good.unlink()
    again = write_scenario(HEAD + '[[runs]]\nmethod = "sgd"\n', "tiny_sgd")
    assert estimate(again, out, "--skip-existing") == 0
    err = capsys.readouterr().err
    assert f"note: skipped {damaged}" in err and "Traceback" not in err
    assert len(list(damaged.parent.glob("sgd.estimate.*.json"))) == 2  # the damaged one and a new one


# -- 6. a list or table where a string goes ---------------------------------------------------------------
WRONG_SHAPES = [
    ('[model]\nsize = ["tiny"]\n[[runs]]\nmethod = "sgd"\n', "model.size", "one of tiny"),
    (HEAD.replace('"fp32"', '["fp32"]') + '[[runs]]\nmethod = "sgd"\n', "train.dtype", "one of fp32"),
    (HEAD.replace('"fp32"', '{a = 1}') + '[[runs]]\nmethod = "sgd"\n', "train.dtype", "one of fp32"),
    (HEAD + '[[runs]]\nmethod = ["sgd"]\n', "runs[0].method", "one of adamw"),
    (HEAD + '[[runs]]\nmethod = {name = "sgd"}\n', "runs[0].method", "one of adamw"),
    (HEAD + '[[runs]]\nmethod = "sgd"\nmodel = ["tiny"]\n', "runs[0].model", "one of tiny"),
    (HEAD + '[[runs]]\nmethod = "sgd"\nlabel = ["x"]\n', "runs[0].label", "a string"),
    (HEAD + '[device]\nmode = ["auto"]\n[[runs]]\nmethod = "sgd"\n', "device.mode", "one of auto"),
    (HEAD + '[device]\nbudget = ["1 GiB"]\n[[runs]]\nmethod = "sgd"\n', "device.budget", "a size"),
    (HEAD + '[eval]\ndata = {x = 1}\n[[runs]]\nmethod = "sgd"\n', "eval.data", "one of synthetic"),
    (HEAD + '[[runs]]\nmethod = "sgd"\n[distributed]\nstrategy = ["ddp"]\n', "distributed.strategy",
     "one of ddp"),
    (HEAD + '[[runs]]\nmethod = "sgd"\n[distributed]\nstrategy = "fsdp2"\nfsdp_unit = [1]\n',
     "distributed.fsdp_unit", "one of layer"),
    (HEAD + '[[runs]]\nmethod = "sgd"\n[distributed]\nstrategy = "ddp"\nbackend = {}\n',
     "distributed.backend", "one of auto"),
]


@pytest.mark.parametrize("body,field,allowed", WRONG_SHAPES,
                         ids=[f"{i}-{w[1]}" for i, w in enumerate(WRONG_SHAPES)])
def test_a_list_or_table_where_a_string_goes_is_one_message(write_scenario, body, field, allowed):
    path = write_scenario(body)
    with pytest.raises(UserError) as info:
        load_scenario(str(path))
    lines = [line for line in str(info.value).splitlines() if line.startswith(f"{path}: {field}: got ")]
    assert lines and allowed in lines[0], str(info.value)


# -- 12. non-finite numbers: refused at validation, never written as non-standard JSON ----------------------
NON_FINITE = [("adamw", "lr", "nan"), ("adamw", "lr", "inf"), ("adamw", "beta1", "-nan"),
              ("adamw", "eps", "+inf"),
              ("galore", "scale", "nan"), ("lomo", "clip_grad_norm", "inf"), ("sgd", "momentum", "1e400"),
              ("adamw", "lr", "1" + "0" * 400)]


@pytest.mark.parametrize("method,option,value", NON_FINITE,
                         ids=[f"{m}.{o}={v[:6]}" for m, o, v in NON_FINITE])
def test_a_non_finite_float_option_is_refused(write_scenario, method, option, value):
    path = write_scenario(HEAD + f'[[runs]]\nmethod = "{method}"\n{option} = {value}\n')
    with pytest.raises(UserError) as info:
        load_scenario(str(path))
    where = f"{path}: runs[0].{option}: got "
    lines = [line for line in str(info.value).splitlines() if line.startswith(where)]
    assert lines and "a finite number" in lines[0], str(info.value)


def test_records_are_strict_json(one_record, tmp_path):
    out, record = one_record
    damaged = {**record, "quality": {**record["quality"], "final_loss": float("nan")}}
    with pytest.raises(ValueError, match=r"quality.final_loss: got nan, allowed a finite number"):
        store.write(damaged, out)
    def refuse(name: str) -> None:
        raise AssertionError(f"non-standard JSON constant {name}")

    for file in store.find([out]):
        json.loads(file.read_text(), parse_constant=refuse)


def test_a_diverged_run_keeps_its_record_with_null_losses_named(write_scenario, tmp_path):
    """SGD at lr 1e30 overflows from step 2 on: the run is still a result (its memory was measured), written as
    strict JSON with each NaN / infinite loss null and named, not an error record."""
    path = write_scenario(HEAD.replace("steps = 2", "steps = 3") + '[[runs]]\nmethod = "sgd"\nlr = 1e30\n')
    assert main(["run", "--scenario", str(path), "--mode", "measure", "--out", str(tmp_path / "r")]) == 0
    (file,) = store.find([tmp_path / "r"])
    record = json.loads(file.read_text(), parse_constant=lambda name: pytest.fail(f"non-standard JSON {name}"))
    quality = record["quality"]
    assert record["status"] == "ok" and record["memory"]["peak_bytes"] > 0
    assert quality["losses"][0] > 0 and quality["losses"][1:] == [None, None] and quality["final_loss"] is None
    assert quality["non_finite"] == ["final_loss", "losses.1", "losses.2"]
