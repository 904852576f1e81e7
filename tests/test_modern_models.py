"""Any transformers decoder: presets and config.json input, parameter counts, derived projections, the MoE refusal,
and simulate against a real CPU measure per category on a shrunken model of every family, for every method."""
from __future__ import annotations

import json

import pytest

from galore_bench.errors import UserError
from galore_bench.measure.training import train_steps
from galore_bench.methods import REGISTRY
from galore_bench.models import build_model, matrix_shapes, parameter_count, preset_names
from galore_bench.models.counts import closed_form_parameters
from galore_bench.models.hf import make_model, read_preset
from galore_bench.spec.scenario import load_scenario

PRESETS = ("gemma-2-2b", "llama3.1-8b", "llama3.2-1b", "llama3.2-3b", "mistral-7b-v0.3", "phi-3-mini", "qwen2.5-7b",
           "qwen3-30b-a3b", "qwen3-8b")
MOE = ("qwen3-30b-a3b",)
PUBLISHED = {"llama3.1-8b": 8_030_261_248, "llama3.2-3b": 3_212_749_824}


def preset(name: str):
    return make_model(*read_preset(name), preset=name)


def test_every_preset_is_shipped_with_its_source():
    assert tuple(preset_names()) == PRESETS
    for name in PRESETS:
        model = preset(name)
        assert model.source.startswith(f"preset {name}: https://huggingface.co/") and model.preset == name


@pytest.mark.parametrize("name", PRESETS)
def test_parameter_count_of_the_built_model_equals_the_closed_form_and_the_published_count(name):
    model = preset(name)
    built = build_model(model, "bf16", device="meta")
    counted = sum(p.numel() for p in built.parameters())
    assert counted == parameter_count(model)
    if name in MOE:
        assert closed_form_parameters(model) is None
    else:
        assert counted == closed_form_parameters(model)
    if name in PUBLISHED:
        assert counted == PUBLISHED[name]


def test_gqa_tied_embeddings_and_fused_projections_are_read_off_the_architecture():
    small = preset("llama3.2-1b")
    assert small.tie_word_embeddings and small.num_key_value_heads == 8 and small.head_dim == 64
    assert matrix_shapes(small)["k_proj"] == (8 * 64, 2048)  # GQA: k and v are a quarter of q
    phi = matrix_shapes(preset("phi-3-mini"))
    assert phi == {"o_proj": (3072, 3072), "qkv_proj": (3 * 3072, 3072), "gate_up_proj": (2 * 8192, 3072),
                   "down_proj": (3072, 8192)}
    assert set(matrix_shapes(preset("qwen3-30b-a3b"))) == {"q_proj", "k_proj", "v_proj", "o_proj"}  # experts: 3-D


def shrunk(name: str) -> str:
    """The preset at a few layers and small widths: same family, same architecture."""
    reference = preset(name).settings
    lines = ["num_hidden_layers = 2", "hidden_size = 64", "intermediate_size = 96", "num_attention_heads = 4",
             "num_key_value_heads = 2", "vocab_size = 256"]
    if getattr(reference, "head_dim", None) is not None:
        lines.append("head_dim = 24")  # not hidden / heads (16)
    if hasattr(reference, "num_experts"):
        lines += ["num_experts = 4", "num_experts_per_tok = 2", "moe_intermediate_size = 32"]
    return f'[model]\npreset = "{name}"\n' + "\n".join(lines) + "\n"


TRAIN = '[train]\nbatch_size = 2\nseq_len = 16\ndtype = "fp32"\n'
# MoE experts run torch's grouped_mm (transformers' default), whose fake-tensor kernel takes bf16 only
MOE_TRAIN = TRAIN.replace("fp32", "bf16")
METHOD_RUNS = {  # every registered method; impl = "for-loop" compares a CPU run with like
    "adamw": 'impl = "for-loop"', "sgd": "", "adam8bit": "", "adafactor": "", "galore": "rank = 8",
    "galore8bit": "rank = 8\nlayerwise = true", "lomo": "", "lora": 'rank = 8\nimpl = "for-loop"',
    "relora": 'rank = 8\nimpl = "for-loop"', "lowrank": 'rank = 8\nimpl = "for-loop"', "inference": "",
    "fira": "rank = 8", "qgalore": "rank = 8\nproj_group_size = 128", "apollo": "rank = 4", "apollo_mini": "",
    "q_apollo_mini": "group_size = 64",
    "muon": 'impl = "for-loop"',
    "adalomo": "", "badam": 'impl = "for-loop"\nswitch_every = 3', "torchao_adamw8bit": "",
    "torchao_adamw4bit": "", "peft": 'peft = { type = "IA3" }\nimpl = "for-loop"',
    "qlora": 'rank = 8\nimpl = "for-loop"',
}
PROJECTING = ("galore", "galore8bit", "lora", "relora", "lowrank", "fira", "qgalore", "apollo", "apollo_mini", "muon",
              "peft", "qlora", "q_apollo_mini")
FIRST = ("adamw", "sgd", "adam8bit", "adafactor", "galore", "galore8bit", "lomo", "lora", "relora", "lowrank",
         "inference")
# The methods merged after the model layer run on the families that differ in what they act on: tied
# embeddings with GQA, fused qkv / gate_up, q/k norms, the MoE refusal. torchao compiles each shape (~50 s a
# family here): 8-bit on one family, 4-bit (the same code path, other bits) slow only. Every other
# (method, family) pair is the slow cross product.
BIASED = ("qwen2.5-7b",)  # q, k, v with biases
FAST_FAMILIES = ("llama3.2-1b", "phi-3-mini", "qwen3-8b", "qwen3-30b-a3b")
FAMILIES_OF = {"torchao_adamw8bit": ("llama3.2-1b",), "torchao_adamw4bit": ()}


def family_cases() -> list:
    cases = []
    for method in METHOD_RUNS:
        fast = PRESETS if method in FIRST else FAMILIES_OF.get(method, FAST_FAMILIES)
        cases += [pytest.param(name, method, marks=() if name in fast else pytest.mark.slow) for name in PRESETS]
    return cases


def test_every_registered_method_is_in_the_family_matrix():
    assert set(METHOD_RUNS) == set(REGISTRY)


@pytest.mark.parametrize(("name", "method"), family_cases())
def test_simulate_matches_measure_on_a_shrunken_model_of_every_family(write_scenario, name, method):
    train = MOE_TRAIN if name in MOE else TRAIN
    body = shrunk(name) + train + f'[[runs]]\nmethod = "{method}"\n{METHOD_RUNS[method]}\n'
    if name in MOE and method in PROJECTING:
        with pytest.raises(UserError, match=f"{method}: 'model.layers.0.mlp.experts.gate_up_proj' .* is a 3-D MoE "
                                            "expert parameter.*will not skip it silently"):
            load_scenario(str(write_scenario(body)))
        return
    if name in BIASED and method in ("qgalore", "q_apollo_mini"):  # Int8Linear has no bias: refused on load
        with pytest.raises(UserError, match=rf"runs\[0\] \({method}\) model: .*model.layers.0.self_attn.q_proj "
                                            "has a bias"):
            load_scenario(str(write_scenario(body)))
        return
    scenario = load_scenario(str(write_scenario(body)))
    run = scenario.runs[0]
    real = train_steps(scenario, run, fake=False, device="cpu", steps=2, round_to=1)["tracker"].breakdown()
    fake = train_steps(scenario, run, fake=True, device="cpu", steps=2, round_to=1)["tracker"].breakdown()
    for category in real:
        assert abs(fake[category] - real[category]) <= 4096, (category, real, fake)
    assert real["weights"] > 0


def test_moe_projection_method_runs_with_target_modules_that_leave_the_experts_out(write_scenario):
    body = (shrunk("qwen3-30b-a3b") + MOE_TRAIN
            + '[[runs]]\nmethod = "galore"\nrank = 8\ntarget_modules = ["q_proj", "o_proj"]\n')
    scenario = load_scenario(str(write_scenario(body)))
    result = train_steps(scenario, scenario.runs[0], fake=True, device="cpu", steps=2, round_to=1)
    assert result["trainer_info"]["projected_tensors"] == 2 * 2  # two layers, q and o


def test_target_modules_choose_the_projections_and_unknown_ones_are_refused(write_scenario):
    body = shrunk("phi-3-mini") + TRAIN + '[[runs]]\nmethod = "lora"\nrank = 4\ntarget_modules = ["qkv_proj"]\n'
    scenario = load_scenario(str(write_scenario(body)))
    model = train_steps(scenario, scenario.runs[0], fake=True, device="cpu", steps=1)["model"]
    adapted = sorted(n for n, _ in model.named_parameters() if "lora_A" in n)
    assert len(adapted) == 2 and all("qkv_proj" in n for n in adapted)
    bad = body.replace('["qkv_proj"]', '["q_proj"]')
    with pytest.raises(UserError, match=r"target_modules: got \['q_proj'\], allowed suffixes of this model's "
                                        "projections: down_proj, gate_up_proj, o_proj, qkv_proj"):
        load_scenario(str(write_scenario(bad)))


def test_a_config_file_relative_to_the_scenario_builds_and_bad_ones_are_clear(write_scenario, tmp_path):
    settings, _ = read_preset("mistral-7b-v0.3")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "config.json").write_text(json.dumps({**settings, "num_hidden_layers": 1}))
    scenario = load_scenario(str(write_scenario('[model]\nconfig = "mine/config.json"\n[[runs]]\nmethod = "sgd"\n')))
    assert scenario.model_name == "mine" and scenario.model.num_hidden_layers == 1
    assert scenario.model.source == f"config file {tmp_path / 'mine' / 'config.json'}"
    cases = {'config = "missing.json"': "model.config: got '.*missing.json', allowed a path to an existing",
             'config = "bad.json"': "model.config: got '.*bad.json', allowed a JSON file",
             'config = "moe.json"': "model.config model_type: got 'not-a-model'",
             'preset = "llama4"': "model.preset: got 'llama4', allowed one of gemma-2-2b, llama3.1-8b",
             'preset = "qwen3-8b"\nhidden_sizes = 4': "model.hidden_sizes: got 'hidden_sizes', allowed a field",
             'preset = "qwen3-8b"\nnum_hidden_layers = "two"': "model.num_hidden_layers: got 'two', allowed a int",
             'preset = "gemma-2-2b"\nattn_implementation = "sdpa"': "allowed eager or flash_attention_2: "
                                                                     "Gemma2ForCausalLM has no sdpa path"}
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "moe.json").write_text('{"model_type": "not-a-model"}')
    for line, message in cases.items():
        with pytest.raises(UserError, match=message):
            load_scenario(str(write_scenario(f'[model]\n{line}\n[[runs]]\nmethod = "sgd"\n')))


def test_gemma2_defaults_to_eager_attention_and_says_why():
    gemma = preset("gemma-2-2b")
    assert gemma.attn_implementation == "eager" and "no sdpa path" in gemma.attn_note
    assert preset("qwen3-8b").attn_implementation == "sdpa"
    built = build_model(preset("llama3.2-1b"), "bf16", device="meta")
    assert built.config._attn_implementation == "sdpa" and built.config.use_cache is False


def test_flash_attention_is_refused_off_a_gpu(write_scenario):
    body = shrunk("llama3.2-1b").replace("[model]\n", '[model]\nattn_implementation = "flash_attention_2"\n')
    scenario = load_scenario(str(write_scenario(body + TRAIN + '[[runs]]\nmethod = "sgd"\n')))
    with pytest.raises(UserError, match="flash_attention_2 runs on a CUDA GPU only"):
        train_steps(scenario, scenario.runs[0], fake=True, device="cpu", steps=1)


@pytest.mark.slow
def test_run_model_profiles_a_config_json_with_a_shipped_scenario(tmp_path, monkeypatch):
    """`galore-bench run --scenario 7b_4090 --model config.json`: the newcomer's one command (README); one process
    per run (a minute on a busy 2-core machine)."""
    from galore_bench.cli.run import run
    from galore_bench.store import load_all

    settings, _ = read_preset("mistral-7b-v0.3")
    (tmp_path / "my-model").mkdir()
    (tmp_path / "my-model" / "config.json").write_text(json.dumps(settings))
    monkeypatch.chdir(tmp_path)
    assert run("7b_4090", mode="estimate", model="my-model/config.json", out=tmp_path / "results") == 0
    records = [record for _, record in load_all([tmp_path / "results"])]
    assert len(records) == 5 and {r["scenario"] for r in records} == {"7b_4090-my-model"}
    assert all(r["model"]["parameters"] == 7_248_023_552 and r["model"]["shape"]["source"].startswith("config file")
               for r in records)
    with pytest.raises(UserError, match=r"--model: galore_fig4 sets a model per run \(runs\[0\].model\)"):
        load_scenario("galore_fig4", "qwen3-8b")


def test_a_scenario_loaded_with_a_model_has_it_in_every_run_and_its_own_name(tmp_path, monkeypatch):
    """The fast twin: the scenario `run --model` runs."""
    monkeypatch.chdir(tmp_path)
    scenario = load_scenario("7b_4090", "qwen3-8b")
    assert scenario.name == "7b_4090-qwen3-8b" and scenario.model.preset == "qwen3-8b"
    assert {run.model for run in scenario.runs} == {scenario.model} and len(scenario.runs) == 5
    with pytest.raises(UserError, match="model.config: got '.*nowhere.json', allowed a path to an existing"):
        load_scenario("7b_4090", "nowhere.json")


PROJECTED_COUNT = {"apollo": "projected_tensors", "apollo_mini": "projected_tensors", "fira": "projected_tensors",
                   "muon": "muon_tensors", "qgalore": "int8_weights", "q_apollo_mini": "int8_weights"}


@pytest.mark.parametrize("method", list(PROJECTED_COUNT))
def test_successor_methods_act_on_fused_projections_and_follow_target_modules(write_scenario, method):
    """Phi-3's fused qkv_proj and gate_up_proj are projections too (a leaf-name list would skip them): two layers
    of o, qkv, gate_up, down; target_modules narrows both the run and the estimate's layout."""
    body = shrunk("phi-3-mini") + TRAIN + f'[[runs]]\nmethod = "{method}"\n{METHOD_RUNS[method]}\n'
    for targets, expected in (("", {"o_proj", "qkv_proj", "gate_up_proj", "down_proj"}),
                              ('target_modules = ["qkv_proj"]\n', {"qkv_proj"})):
        scenario = load_scenario(str(write_scenario(body + targets)))
        run = scenario.runs[0]
        info = train_steps(scenario, run, fake=True, device="cpu", steps=1)["trainer_info"]
        assert info[PROJECTED_COUNT[method]] == 2 * len(expected)
        layout = REGISTRY[method].estimate.layout(run.model, run.options)
        assert {p.name.split(".")[1] for p in layout if p.projected} == expected
