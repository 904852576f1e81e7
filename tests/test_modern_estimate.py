"""The estimate on modern decoders (GQA, head_dim, tied embeddings, biases, q/k norms, eager attention) against
simulate, and its clear refusal of what it has no closed form for (Gemma-2, MoE)."""
from __future__ import annotations

from pathlib import Path

import pytest
from test_estimate import EVERY_METHOD, estimate_vs_simulate_failures

from galore_bench.measure.estimate import EstimateUnavailable, estimate
from galore_bench.models.hf import make_model, read_preset
from galore_bench.spec.scenario import parse_scenario

SHRUNK = {"num_hidden_layers": 2, "hidden_size": 256, "intermediate_size": 512, "num_attention_heads": 8,
          "num_key_value_heads": 2, "vocab_size": 2048}
HEAD_DIM = {"head_dim": 48}  # not hidden / heads (32), where the family's config has the field


def _scenario(preset: str, model: dict, train: dict, runs: list[dict]):
    return parse_scenario({"model": {"preset": preset, **model}, "train": train, "runs": runs},
                          Path("estimate-test.toml"))


def _failures(scenario) -> list[str]:
    return estimate_vs_simulate_failures(scenario)


FAMILIES = {  # preset -> what it adds to LLaMA-1's shape
    "llama3.2-1b": "GQA, tied embeddings",
    "qwen3-8b": "GQA, head_dim, q/k norms",
    "qwen2.5-7b": "GQA, q/k/v biases",
    "llama3.1-8b": "GQA, head_dim",
    "mistral-7b-v0.3": "GQA, head_dim",
    "phi-3-mini": "fused qkv_proj and gate_up_proj",
}


def _shrunk_failures(preset: str, runs: list[dict]) -> list[str]:
    head_dim = HEAD_DIM if preset not in ("qwen2.5-7b", "phi-3-mini") else {}
    return _failures(_scenario(preset, {**SHRUNK, **head_dim}, {"batch_size": 2, "seq_len": 128, "dtype": "bf16"},
                               runs))


@pytest.mark.slow
@pytest.mark.parametrize("preset", FAMILIES)
def test_estimate_within_two_percent_of_simulate_on_shrunken_modern_families(preset):
    # QLoRA's estimate refuses Phi-3's fused projections (test_qlora.test_estimate_refuses_phi3)
    failures = _shrunk_failures(preset, [r for r in EVERY_METHOD
                                         if not (preset == "phi-3-mini" and r["method"] == "qlora")])
    assert not failures, "\n".join(failures)


FAST = [{"method": "adamw"}, {"method": "galore8bit", "rank": 16, "layerwise": True}, {"method": "lora", "rank": 16},
        {"method": "lomo"}, {"method": "inference"}]


@pytest.mark.parametrize("preset", ["llama3.2-1b", "qwen3-8b", "phi-3-mini"])
def test_estimate_within_two_percent_of_simulate_on_shrunken_modern_families_fast(preset):
    """The fast twin: tied embeddings, q/k norms, GQA, head_dim, fused projections; five methods that move the
    peak around."""
    runs = [r for r in FAST if not (preset == "phi-3-mini" and r["method"] == "galore8bit")]
    failures = _shrunk_failures(preset, runs)
    assert not failures, "\n".join(failures)


def test_phi3_layerwise_galore_estimate_under_pytest():
    """Under pytest the trace once held a second LM-head gradient: bitsandbytes, first imported inside the head's
    update, logs a warning carrying an exception whose traceback kept that frame (and its gradient) alive in
    pytest's log capture. GaLoreAdamW8bit now imports it when built."""
    failures = _shrunk_failures("phi-3-mini", [r for r in FAST if r["method"] == "galore8bit"])
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize(("checkpointing", "methods"), [(False, ["adamw"]), (True, ["galore8bit", "lora"])])
def test_tied_embedding_gradients_meet_in_a_third_table_at_the_end_of_backward(checkpointing, methods):
    """A tied table large against the layers (Llama-3.2-3B's proportions at 1k tokens): the peak is backward's last
    node, where the head's gradient (held since the loss), the embedding's and their sum are live at once."""
    model = {**SHRUNK, **HEAD_DIM, "vocab_size": 16384}
    options = {"adamw": {}, "galore8bit": {"rank": 16, "layerwise": True}, "lora": {"rank": 16}}
    runs = [{"method": method, **options[method]} for method in methods]
    train = {"batch_size": 1, "seq_len": 32, "dtype": "bf16", "activation_checkpointing": checkpointing}
    scenario = _scenario("llama3.2-1b", model, train, runs)
    assert not _failures(scenario)
    table = 16384 * 256 * 2
    for run in scenario.runs:
        guess = estimate(run.model, run.method, run.options, batch_size=1, seq_len=32, dtype="bf16",
                         activation_checkpointing=checkpointing)
        assert guess.moment == "tied_sum" and guess.breakdown["other"] == 3 * table


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["llama3.1-8b", "qwen3-8b", "phi-3-mini",
                                    "llama3.2-3b"])
def test_estimate_within_two_percent_of_simulate_on_full_size_presets(preset):
    """Full-size models, a 24 GB card's settings (modern_24gb): a minute or more of tracing each on a CPU."""
    runs = [{"method": "adamw"}, {"method": "galore8bit", "rank": 1024, "layerwise": True},
            {"method": "lora", "rank": 64}, {"method": "lomo"}]
    scenario = _scenario(preset, {}, {"batch_size": 1, "seq_len": 1024, "dtype": "bf16",
                                      "activation_checkpointing": True}, runs)
    failures = _failures(scenario)
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize(("preset", "why"), [
    ("gemma-2-2b", "four norms per layer, a GELU MLP, .* softcapped attention scores and logits, and sliding-window"),
    ("qwen3-30b-a3b", "its MoE layers \\(router logits, tokens x top-k rows through grouped_mm.*not modelled"),
])
def test_estimate_refuses_what_it_has_no_closed_form_for(preset, why):
    model = make_model(*read_preset(preset), preset=preset)
    with pytest.raises(EstimateUnavailable, match=f"estimate: no closed form for {preset} \\({why}.*run it in "
                                                  "simulate or measure mode"):
        estimate(model, "adamw", {}, batch_size=1, seq_len=8, dtype="bf16")


AUTOCAST_RUNS = [{"method": "adamw"}, {"method": "sgd"}, {"method": "lora", "rank": 16}]


@pytest.mark.parametrize("precision", ["bf16-mixed", "fp16-mixed"])
@pytest.mark.parametrize("preset", ["llama3.2-1b", "qwen2.5-7b", "mistral-7b-v0.3", "qwen3-8b", "phi-3-mini"])
def test_autocast_estimate_within_two_percent_of_simulate_on_shrunken_families(preset, precision):
    """fp32 weights, autocast compute: GQA's narrow k/v, head_dim, tied embeddings, q/k/v biases (their casts
    cached beside the weights'), Qwen3's q/k norms and Phi-3's two fused input casts, without checkpointing."""
    head_dim = HEAD_DIM if preset not in ("qwen2.5-7b", "phi-3-mini") else {}
    scenario = _scenario(preset, {**SHRUNK, **head_dim}, {"batch_size": 2, "seq_len": 128, "precision": precision},
                         AUTOCAST_RUNS)
    failures = _failures(scenario)
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("preset", ["qwen2.5-7b", "mistral-7b-v0.3", "phi-3-mini"])
def test_autocast_estimate_with_checkpointing_on_shrunken_families(preset):
    head_dim = HEAD_DIM if preset == "mistral-7b-v0.3" else {}
    scenario = _scenario(preset, {**SHRUNK, **head_dim}, {"batch_size": 2, "seq_len": 128, "precision": "bf16-mixed",
                                                         "activation_checkpointing": True}, AUTOCAST_RUNS)
    failures = _failures(scenario)
    assert not failures, "\n".join(failures)


EAGER = {"attn_implementation": "eager"}
EAGER_RUNS = [{"method": "adamw"}, {"method": "lora", "rank": 16}, {"method": "inference"}]


@pytest.mark.parametrize(("preset", "dtype", "checkpointing"), [
    ("llama3.2-1b", "bf16", False), ("qwen3-8b", "fp32", False), ("phi-3-mini", "bf16", False),
    ("llama3.2-1b", "bf16", True), ("phi-3-mini", "bf16", True)])
def test_eager_attention_estimate_within_two_percent_where_the_scores_dominate(preset, dtype, checkpointing):
    """At 768 tokens the (batch, heads, seq, seq) scores outweigh the rest of a shrunken layer: the peak is a
    softmax (the last layer's backward in training, or a recomputed layer's with checkpointing; forward in
    inference), as measure/eager_attention.py models it."""
    head_dim = HEAD_DIM if preset != "phi-3-mini" else {}
    train = {"batch_size": 2, "seq_len": 768, "dtype": dtype, "activation_checkpointing": checkpointing}
    runs = EAGER_RUNS if not checkpointing else EAGER_RUNS[:2]
    scenario = _scenario(preset, {**SHRUNK, **head_dim, **EAGER}, train, runs)
    assert not _failures(scenario)
    moments = [estimate(run.model, run.method, run.options, batch_size=2, seq_len=768, dtype=dtype,
                        activation_checkpointing=checkpointing).moment for run in scenario.runs]
    expected = (["last_recompute_softmax", "recompute_softmax"] if checkpointing
                else ["attention_backward", "attention_backward", "attention_forward"])
    assert moments == expected


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["llama3.2-1b", "qwen3-8b", "mistral-7b-v0.3"])
def test_eager_attention_estimate_within_two_percent_for_every_method(preset):
    head_dim = HEAD_DIM
    scenario = _scenario(preset, {**SHRUNK, **head_dim, **EAGER}, {"batch_size": 2, "seq_len": 256, "dtype": "bf16"},
                         EVERY_METHOD)
    failures = _failures(scenario)
    assert not failures, "\n".join(failures)


@pytest.mark.slow
@pytest.mark.parametrize(("preset", "precision"), [("llama3.1-8b", "bf16-mixed"), ("mistral-7b-v0.3", "fp16-mixed")])
def test_autocast_estimate_within_two_percent_of_simulate_at_8b(preset, precision):
    """Full size, the HF Trainer's bf16=True / fp16=True on one sequence of 1024 with checkpointing."""
    scenario = _scenario(preset, {}, {"batch_size": 1, "seq_len": 1024, "precision": precision,
                                      "activation_checkpointing": True}, [{"method": "adamw"},
                                                                          {"method": "lora", "rank": 64}])
    failures = _failures(scenario)
    assert not failures, "\n".join(failures)


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["llama3.2-1b", "phi-3-mini"])
def test_eager_attention_estimate_within_two_percent_on_full_size_presets(preset):
    """Full size, eager attention, 1024 tokens, no checkpointing (a minute or more of tracing each on a CPU)."""
    runs = [{"method": "adamw"}, {"method": "galore8bit", "rank": 16, "layerwise": True},
            {"method": "lora", "rank": 16}, {"method": "lomo"}]
    scenario = _scenario(preset, EAGER, {"batch_size": 1, "seq_len": 1024, "dtype": "bf16"}, runs)
    failures = _failures(scenario)
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize(("preset", "why"), [("llama3.2-1b", "tied embeddings with activation checkpointing"),
                                             ("qwen3-8b", "Qwen3's q/k norms with activation checkpointing")])
def test_autocast_with_checkpointing_where_unmodelled_is_refused_not_guessed(preset, why):
    """Measured gaps (7% for a tied embedding's last recompute, 2.5% for Qwen3 with LoRA): refused until modelled;
    without checkpointing both are estimated (above), and bf16-master is not autocast."""
    model = make_model(*read_preset(preset), preset=preset)
    with pytest.raises(EstimateUnavailable, match=f"autocast closed form \\(bf16-mixed\\) does not model {why} "
                                                  f".* for {preset}; run it in simulate or measure mode"):
        estimate(model, "adamw", {}, batch_size=1, seq_len=8, dtype="fp32", precision="bf16-mixed",
                 activation_checkpointing=True)
    assert estimate(model, "adamw", {}, batch_size=1, seq_len=8, dtype="fp32", precision="bf16-mixed").peak_bytes


def test_master_weights_on_a_tied_preset_count_the_table_once():
    model = make_model(*read_preset("llama3.2-1b"), preset="llama3.2-1b")
    master = estimate(model, "adamw", {}, batch_size=1, seq_len=8, dtype="bf16", precision="bf16-master")
    # bf16 weights with an fp32 master copy and two fp32 moments: 12 bytes per parameter, the tied table once
    assert master.category_peaks["optimizer_states"] == pytest.approx(12 * 1_235_814_400, rel=1e-4)


def test_tied_embeddings_are_one_tensor_in_weights_gradients_and_states():
    tied = make_model(*read_preset("llama3.2-1b"), preset="llama3.2-1b")
    untied = make_model(*read_preset("llama3.2-1b"), preset="llama3.2-1b", overrides={"tie_word_embeddings": False})
    head = 128256 * 2048 * 2  # bf16
    a, b = (estimate(m, "adamw", {}, batch_size=1, seq_len=8, dtype="bf16") for m in (tied, untied))
    assert b.terms["weights"] - a.terms["weights"] == head
    assert b.terms["gradients_all"] - a.terms["gradients_all"] == head
    assert b.terms["optimizer_states"] - a.terms["optimizer_states"] == 2 * head + 512  # two moments, fp32 step


def test_successor_estimates_follow_fused_projections_and_target_modules():
    """APOLLO, Muon and Q-GaLore act on Phi-3's fused qkv_proj / gate_up_proj, or on the run's target_modules; the
    estimate's layout has to pick the same matrices as the optimizer does."""
    runs = [{"method": "apollo", "rank": 16, "target_modules": ["qkv_proj", "down_proj"]},
            {"method": "muon", "target_modules": ["gate_up_proj"]},
            {"method": "qgalore", "rank": 16, "proj_group_size": 128, "target_modules": ["qkv_proj"]}]
    failures = _shrunk_failures("phi-3-mini", runs)
    assert not failures, "\n".join(failures)
