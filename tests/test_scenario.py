"""Scenario validation: every problem reported at once as `file: field: got X, allowed Y`, exit 1."""
from __future__ import annotations

import pytest

from galore_bench.cli import main
from galore_bench.errors import UserError
from galore_bench.spec.scenario import SHIPPED_SCENARIOS, load_scenario, shipped_scenarios

GOOD_RUN = '\n[[runs]]\nmethod = "adamw"\n'
BROKEN = [  # (body, field, got, allowed-fragment)
    ('[model]\nsize = "tiny"\ncolour = "red"\n' + GOOD_RUN, "model.colour", "'colour'", "one of size"),
    ('[model]\nsize = "3b"\n' + GOOD_RUN, "model.size", "'3b'", "one of tiny, 60m"),
    ('[model]\nsize = "tiny"\n[[runs]]\nmethod = "adafactorx"\n', "runs[0].method", "'adafactorx'", "one of adamw"),
    ('[model]\nsize = "tiny"\n[train]\nbatch_size = -8\n' + GOOD_RUN, "train.batch_size", "-8", "an int >= 1"),
    ('[model]\nsize = "tiny"\n[train]\nseq_len = "256"\n' + GOOD_RUN, "train.seq_len", "'256'", "an int"),
    ('[model]\nsize = "tiny"\n[train]\ndtype = "fp8"\n' + GOOD_RUN, "train.dtype", "'fp8'", "one of fp32, bf16, fp16"),
    ('[model]\nsize = "tiny"\n[device]\nbudget = "24 gigs"\n' + GOOD_RUN, "device.budget", "'24 gigs'", "GiB"),
    ('[model]\nsize = "tiny"\n[device]\nmode = "guess"\n' + GOOD_RUN, "device.mode", "'guess'", "one of auto"),
    ('[model]\nsize = "tiny"\n[[runs]]\nmethod = "adamw"\nlr = "fast"\n', "runs[0].lr", "'fast'", "a number"),
    ('[model]\nsize = "tiny"\n[[runs]]\nmethod = "adamw"\nbetaa = 0.9\n', "runs[0].betaa", "'betaa'", "beta1"),
    ('[model]\nsize = "tiny"\n[[runs]]\nmethod = "adamw"\nlayerwise = "yes"\n', "runs[0].layerwise", "'yes'", "a bool"),
    ('[model]\nsize = "tiny"\n', "runs", "None", "a non-empty array"),
    ('[model]\nsize = "tiny"\n[[runs]]\nmethod = "adamw"\n[[runs]]\nmethod = "adamw"\n',
     "runs", "'adamw'", "distinct run labels"),
    ('[model]\nhidden_size = 64\n' + GOOD_RUN, "model", "['hidden_size']", "model.size or all of"),
    ('[model]\nsize = "tiny"\n[train]\ngrad_accum = 2\n[[runs]]\nmethod = "adamw"\nlayerwise = true\n',
     "runs[0] (adamw) train.grad_accum", "'2'", "1 with layer-wise updates"),
    ('[modle]\nsize = "tiny"\n' + GOOD_RUN, "modle", "'modle'", "one of description"),
]


@pytest.mark.parametrize("body,field,got,allowed", BROKEN, ids=[b[1] for b in BROKEN])
def test_broken_scenario_message(write_scenario, body, field, got, allowed):
    path = write_scenario(body)
    with pytest.raises(UserError) as info:
        load_scenario(str(path))
    lines = [line for line in str(info.value).splitlines() if line.startswith(f"{path}: {field}: ")]
    assert lines, str(info.value)
    assert f"got {got}, allowed " in lines[0] and allowed in lines[0], lines[0]


def test_false_bool_is_valid(write_scenario):
    path = write_scenario('[model]\nsize = "tiny"\n[train]\nactivation_checkpointing = false\n' + GOOD_RUN)
    assert load_scenario(str(path)).train.activation_checkpointing is False


def test_rank_larger_than_matrix(write_scenario):
    path = write_scenario('[model]\nsize = "tiny"\n[[runs]]\nmethod = "galore"\nrank = 65\n'
                          '[[runs]]\nmethod = "lora"\nrank = 0\n')
    with pytest.raises(UserError) as info:
        load_scenario(str(path))
    assert f"{path}: runs[0].rank: got 65, allowed an int from 1 to 64 (the smallest matrix side" in str(info.value)
    assert f"{path}: runs[1].rank: got 0, allowed an int >= 1" in str(info.value)
    assert str(info.value).startswith("2 problem(s)")  # lora's bad rank is not checked against the model again


def test_default_rank_too_large_for_the_model_says_it_was_not_set(write_scenario):
    path = write_scenario('[model]\nsize = "tiny"\n[[runs]]\nmethod = "galore"\n')
    with pytest.raises(UserError) as info:
        load_scenario(str(path))
    assert (f"{path}: runs[0].rank: got 'not set (default 128)', allowed an int from 1 to 64 (the smallest "
            "matrix side of this model): set rank") in str(info.value)


def test_all_problems_in_one_message(write_scenario):
    path = write_scenario('[model]\nsize = "3b"\n[train]\nbatch_size = 0\ndtype = "fp8"\n[[runs]]\nmethod = "nope"\n')
    with pytest.raises(UserError) as info:
        load_scenario(str(path))
    assert str(info.value).startswith("4 problem(s)")


def test_cli_exit_code_and_no_traceback(write_scenario, capsys):
    path = write_scenario('[model]\nsize = "tiny"\n[train]\nbatch_size = -1\n' + GOOD_RUN)
    assert main(["run", "--scenario", str(path)]) == 1
    err = capsys.readouterr().err
    assert "train.batch_size: got -1" in err and "Traceback" not in err


def test_unknown_scenario_name():
    with pytest.raises(UserError, match="unknown scenario; allowed: .*smoke_cpu"):
        load_scenario("no_such_scenario")


def test_shipped_scenarios_load_and_list(capsys):
    shipped = shipped_scenarios()
    assert {"smoke_cpu", "7b_4090", "lomo_7b", "galore_table2"} <= set(shipped)
    for name in shipped:
        scenario = load_scenario(name)
        assert scenario.runs, name
        header = (SHIPPED_SCENARIOS / f"{name}.toml").read_text()
        assert header.startswith("#"), f"{name} lacks its header comment"
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in shipped)
    assert len([line for line in out.splitlines() if line.strip()]) >= len(shipped)


def test_evaluation_settings_that_would_be_ignored_are_refused(write_scenario):
    from conftest import TINY_HEADER

    body = TINY_HEADER + '[eval]\nevery = 2\n[[runs]]\nmethod = "sgd"\n'
    with pytest.raises(UserError, match=r"eval.every: got 2, allowed 0 unless eval.batches > 0"):
        load_scenario(str(write_scenario(body)))
    body = TINY_HEADER + ('[eval]\nbatches = 2\n[distributed]\nstrategy = "ddp"\nworld_size = 2\n'
                          '[[runs]]\nmethod = "sgd"\n')
    with pytest.raises(UserError, match=r"eval.batches: got 2, allowed 0 with \[distributed\]"):
        load_scenario(str(write_scenario(body, "dist")))


def test_a_scenario_file_that_is_not_utf8_text_is_a_clear_error(tmp_path):
    path = tmp_path / "binary.toml"
    path.write_bytes(b"\xff\xfe[model]")
    with pytest.raises(UserError, match="binary.toml: not a readable UTF-8 text file"):
        load_scenario(str(path))


def test_a_zero_budget_is_refused(write_scenario):
    path = write_scenario('[model]\nsize = "tiny"\n[device]\nbudget = "0 GiB"\n[[runs]]\nmethod = "sgd"\n')
    with pytest.raises(UserError, match=r"device.budget: got '0 GiB', allowed a size > 0"):
        load_scenario(str(path))


def test_a_rank_on_a_method_without_one_is_an_unknown_key(write_scenario):
    path = write_scenario('[model]\nsize = "tiny"\n[[runs]]\nmethod = "adamw"\nrank = 8\n')
    with pytest.raises(UserError, match=r"runs\[0\].rank: got 'rank', allowed one of method, model, lr"):
        load_scenario(str(path))
