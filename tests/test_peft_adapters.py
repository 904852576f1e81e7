"""peft's adapters: LoRA's DoRA and init options, and `method = "peft"` with any peft config: validated when the
scenario loads, simulate equal to a real CPU measure per category on a shrunken model, the adapters' dtype."""
from __future__ import annotations

import pytest
import torch
from test_modern_models import TRAIN, shrunk
from torch._subclasses.fake_tensor import DataDependentOutputException

from galore_bench.errors import UserError
from galore_bench.measure.training import train_steps
from galore_bench.spec.scenario import load_scenario

ADAPTERS = {  # run options after `method`; impl = "for-loop" compares a CPU run with like
    "lora": 'method = "lora"\nrank = 8',
    "dora": 'method = "lora"\nrank = 8\nuse_dora = true',
    "pissa": 'method = "lora"\nrank = 8\ninit = "pissa"',
    "ia3": 'method = "peft"\npeft = { type = "IA3" }',
    "vera": 'method = "peft"\npeft = { type = "VERA", r = 4 }',
    "oft": 'method = "peft"\npeft = { type = "OFT", r = 0, oft_block_size = 8 }',
    "hra": 'method = "peft"\npeft = { type = "HRA", r = 4 }',
    "fourierft": 'method = "peft"\npeft = { type = "FOURIERFT", n_frequency = 100 }',
    # LyCORIS: module dropout drawn as torch.rand(1) > p in Python (fake_shims.one_value_draws_have_values)
    "loha": 'method = "peft"\npeft = { type = "LOHA", r = 4 }',
    "lokr": 'method = "peft"\npeft = { type = "LOKR", r = 4 }',
}
UNTRACEABLE = {  # measured: peft indexes by a tensor's value, which a fake tensor does not have
    "boft": ('method = "peft"\npeft = { type = "BOFT", boft_block_size = 4 }',
             "BOFT builds its butterfly permutation matrices at init with perm_mat[i, idx] = 1, idx a tensor value"),
}


def _scenario(write_scenario, run: str, family: str = "llama3.2-1b", dtype: str = "fp32"):
    body = shrunk(family) + TRAIN.replace("fp32", dtype) + f'[[runs]]\n{run}\nimpl = "for-loop"\n'
    return load_scenario(str(write_scenario(body)))


def _simulate_equals_measure(scenario) -> None:
    run = scenario.runs[0]
    real = train_steps(scenario, run, fake=False, device="cpu", steps=2, round_to=1)["tracker"].breakdown()
    fake = train_steps(scenario, run, fake=True, device="cpu", steps=2, round_to=1)["tracker"].breakdown()
    assert fake == real  # measured: equal to the byte for every type listed
    assert real["weights"] > 0 and real["optimizer_states"] > 0


@pytest.mark.parametrize("name", ADAPTERS)
def test_simulate_equals_a_real_cpu_measure_per_category(write_scenario, name):
    _simulate_equals_measure(_scenario(write_scenario, ADAPTERS[name]))


@pytest.mark.parametrize("name", UNTRACEABLE)
def test_adapters_that_index_by_a_tensor_value_cannot_be_traced(write_scenario, name):
    """Documented rather than hidden: the fake trace stops at peft's data-dependent step (strict: if peft changes,
    this fails and the type joins ADAPTERS)."""
    run, reason = UNTRACEABLE[name]
    scenario = _scenario(write_scenario, run)
    with pytest.raises(DataDependentOutputException):
        train_steps(scenario, scenario.runs[0], fake=True, device="cpu", steps=2, round_to=1)
    assert reason


def _adapter_params(model: torch.nn.Module, marker: str) -> dict[str, torch.dtype]:
    return {n: p.dtype for n, p in model.named_parameters() if marker in n}


@pytest.mark.parametrize(("run", "marker"), [(ADAPTERS["dora"], "lora_magnitude"), (ADAPTERS["ia3"], "ia3_l"),
                                             (ADAPTERS["vera"], "vera_lambda")])
def test_adapter_dtype_applies_to_every_peft_adapter(write_scenario, run, marker):
    """bf16 model: peft's default gives fp32 adapters; adapter_dtype = "model" keeps them bf16; the frozen base
    weights stay bf16 and do not train, the embeddings do (train_non_adapter, as the lora method)."""
    for dtype_option, expected in (("", torch.float32), ('adapter_dtype = "model"', torch.bfloat16)):
        scenario = _scenario(write_scenario, f"{run}\n{dtype_option}", dtype="bf16")
        model = train_steps(scenario, scenario.runs[0], fake=True, device="cpu", steps=1)["model"]
        dtypes = _adapter_params(model, marker)
        assert dtypes and set(dtypes.values()) == {expected}, dtypes
        params = dict(model.named_parameters())
        base = [p for n, p in params.items() if n.endswith("q_proj.base_layer.weight")]
        assert base and all(p.dtype == torch.bfloat16 and not p.requires_grad for p in base)
        assert params["base_model.model.model.embed_tokens.weight"].requires_grad


def test_train_non_adapter_false_is_peft_fine_tuning(write_scenario):
    scenario = _scenario(write_scenario, ADAPTERS["ia3"] + "\ntrain_non_adapter = false")
    model = train_steps(scenario, scenario.runs[0], fake=True, device="cpu", steps=1)["model"]
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trained and all("ia3_l" in n for n in trained)
    assert len(trained) == 7 * 2  # every projection of two layers (the default targets), nothing else


def test_dora_adds_one_magnitude_per_output_row_and_pissa_moves_the_base_weight(write_scenario):
    scenario = _scenario(write_scenario, ADAPTERS["dora"])
    model = train_steps(scenario, scenario.runs[0], fake=True, device="cpu", steps=1)["model"]
    magnitudes = {n: tuple(p.shape) for n, p in model.named_parameters() if "lora_magnitude" in n}
    assert magnitudes["base_model.model.model.layers.0.mlp.gate_proj.lora_magnitude_vector.default.weight"] == (96,)
    assert len(magnitudes) == 2 * 7
    plain, pissa = (_scenario(write_scenario, ADAPTERS[name]) for name in ("lora", "pissa"))
    weights = [train_steps(s, s.runs[0], fake=False, device="cpu", steps=1)["model"] for s in (plain, pissa)]
    name = "base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight"
    before, after = (dict(m.named_parameters())[name] for m in weights)
    assert not torch.equal(before, after)  # PiSSA: W minus its top-r part, which A and B start as


@pytest.mark.parametrize(("run", "message"), [
    ('method = "peft"', r"runs\[0\] \(peft\) peft.type: got 'not set', allowed a PeftType name: one of .*IA3"),
    ('method = "peft"\npeft = { type = "NOPE" }', (r"peft.type: got 'NOPE', allowed a PeftType name: one of "
                                                  r".*VERA.* \(refused: PROMPT_TUNING")),
    ('method = "peft"\npeft = { type = "LOHA", rank = 4 }', (r"peft.rank: got 'rank', allowed a field of peft's "
                                                            r"LoHaConfig: rank_pattern, alpha_pattern, r, alpha")),
    ('method = "peft"\npeft = { type = "IA3", target_modules = ["q_proj"] }',
     r"peft.target_modules: got \"\['q_proj'\]\", allowed set on the run: runs\[i\].target_modules"),
    ('method = "peft"\npeft = { type = "LORA", r = 4, use_dora = true, use_rslora = "yes", lora_bias = true }',
     r"\(peft\) peft: got .*, allowed a config peft's LoraConfig accepts; peft says: .*DoRA"),
    ('method = "peft"\npeft = { type = "BOFT", boft_block_size = 5 }',
     r"\(peft\) peft: got .*, allowed a BOFTConfig peft can apply to this model; peft says: ValueError: .*"),
    ('method = "peft"\npeft = "IA3"', r"runs\[0\].peft: got 'IA3', allowed a dict"),
    ('method = "peft"\ntarget_modules = ["query"]\npeft = { type = "IA3" }', r"target_modules: got \['query'\]"),
    ('method = "lora"\ninit = "eva"', r"\(lora\) init: got 'eva', allowed one of default, gaussian, pissa"),
    ('method = "lora"\ninit = "pissa_niter_x"', r"\(lora\) init: got 'pissa_niter_x'"),
    ('method = "lora"\nuse_dora = 1', r"runs\[0\].use_dora: got 1, allowed a bool"),
])
def test_bad_peft_configs_are_one_clear_line_at_load(write_scenario, run, message):
    with pytest.raises(UserError, match=message):
        _scenario(write_scenario, run)


def test_good_inits_load(write_scenario):
    for init in ("default", "gaussian", "olora", "orthogonal", "pissa_niter_4"):
        scenario = _scenario(write_scenario, f'method = "lora"\nrank = 4\ninit = "{init}"')
        assert scenario.runs[0].options["init"] == init


@pytest.mark.parametrize("family", ["llama3.2-1b", "phi-3-mini"])
def test_ia3_scales_the_input_of_the_mlp_output_projection_read_off_the_architecture(write_scenario, family):
    """peft knows IA3's feed-forward modules for a list of model types only (not Phi-3): derived here as the MLP's
    linear layer back to the hidden size, whose input (96 wide) IA3 scales; every other projection's output."""
    scenario = _scenario(write_scenario, ADAPTERS["ia3"], family=family)
    model = train_steps(scenario, scenario.runs[0], fake=True, device="cpu", steps=1)["model"]
    shapes = {n.split(".layers.0.")[1].split(".ia3_l")[0]: tuple(p.shape) for n, p in model.named_parameters()
              if ".layers.0." in n and "ia3_l" in n}
    assert shapes["mlp.down_proj"] == (1, 96)
    assert all(shape[1] == 1 for name, shape in shapes.items() if name != "mlp.down_proj"), shapes


DORA_FP32_GAP = ("measured: -8.8% of the peak. With checkpointing, a bf16 model and fp32 adapters the step peaks in "
                 "layer 0's backward, where DoRA's fp32 gradients of m / norm * B A x and (m / norm - 1) * W x (one "
                 "token x row tensor each, beside the promoted product) outgrow the recompute moment's layer bytes; "
                 "the estimate has no DoRA backward moment. Peak-only: every category is within 0.5%.")


@pytest.mark.parametrize("setting", ["tiny-fp32", "60m-bf16", pytest.param(
    "tiny-bf16-checkpointing", marks=pytest.mark.xfail(strict=True, reason=DORA_FP32_GAP))])
def test_dora_estimate_with_fp32_adapters_within_two_percent_of_simulate(setting):
    """DoRA's terms (lora.dora_saved: the magnitude, and W x, B A x and three row vectors saved per projection)
    at peft's default fp32 adapters; test_estimate holds the model-dtype DoRA in every setting."""
    from test_estimate import SETTINGS, _scenario, estimate_vs_simulate_failures

    size, train = SETTINGS[setting]
    scenario = _scenario(size, train, [{"method": "lora", "rank": 16, "use_dora": True}])
    failures = estimate_vs_simulate_failures(scenario)
    assert not failures, "\n".join(failures)
