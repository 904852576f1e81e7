"""The closed-form estimate against the traced real step (simulate), and against hand-counted bytes."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from galore_bench.measure import training
from galore_bench.measure.estimate import estimate, estimate_run
from galore_bench.measure.tracker import MemoryTracker
from galore_bench.methods import REGISTRY
from galore_bench.methods.galore import svd_refresh_bytes
from galore_bench.methods.terms import ParamShape
from galore_bench.models import ZOO, matrix_shapes, parameter_count
from galore_bench.optim.projector import GaLoreProjector
from galore_bench.spec.scenario import parse_scenario
from galore_bench.units import CUDA_BLOCK


def _every_method() -> list[dict]:
    """Each registered method with estimate terms at its defaults (rank 16 where it has one), and layer-wise
    where it can be: derived from the registry, so a new method is held to simulate without editing this file."""
    runs = []
    for method in REGISTRY.values():
        if method.estimate is None:
            continue
        run = {"method": method.name, **({"rank": 16} if method.uses_rank else {})}
        runs += [run, {**run, "layerwise": True}] if "layerwise" in method.options else [run]
    return runs


VARIANTS = [  # options that change the bytes: implementations, momentum, the projected side
    {"method": "adamw", "impl": "for-loop", "label": "adamw-for-loop"},
    {"method": "adamw", "impl": "fused", "label": "adamw-fused"},
    {"method": "sgd", "momentum": 0.9, "label": "sgd-momentum"},
    {"method": "adafactor", "beta1": 0.9, "label": "adafactor-first-moment"},
    {"method": "galore", "rank": 16, "proj_type": "reverse_std", "label": "galore-reverse"},
    {"method": "galore", "rank": 16, "proj_type": "left", "label": "galore-left"},
    {"method": "lora", "rank": 16, "impl": "for-loop", "label": "lora-for-loop"},
    {"method": "lora", "rank": 16, "use_dora": True, "adapter_dtype": "model", "label": "dora-model-dtype"},
    {"method": "apollo", "rank": 16, "scaled_gradient": "projected", "label": "apollo-projected"},
    {"method": "apollo_mini", "scale_type": "channel", "label": "apollo_mini-channel"},
    {"method": "muon", "impl": "for-loop", "label": "muon-for-loop"},
    {"method": "badam", "start_block": 1, "label": "badam-block1"},  # a frozen layer below the active one
    {"method": "badam", "include_embedding": True, "label": "badam-embedding"},  # every layer's input needs grad
    {"method": "badam", "include_lm_head": True, "switch_mode": "descending", "label": "badam-head"},  # norm, head
]
EVERY_METHOD = _every_method() + VARIANTS
SETTINGS = {  # model, train: small enough for the suite, different enough to move the peak around
    "tiny-fp32": ("tiny", {"batch_size": 4, "seq_len": 64, "dtype": "fp32"}),
    "tiny-bf16-checkpointing": ("tiny", {"batch_size": 8, "seq_len": 128, "dtype": "bf16",
                                         "activation_checkpointing": True}),
    "60m-bf16": ("60m", {"batch_size": 2, "seq_len": 128, "dtype": "bf16"}),
}
TOLERANCE = 0.02  # measured: 0.5% on tiny, 0.7% on 60M


def _scenario(size: str, train: dict, runs: list[dict]):
    return parse_scenario({"model": {"size": size}, "train": train, "runs": runs}, Path("estimate-test.toml"))


def test_every_registered_method_has_estimate_terms_or_says_why_not():
    """A method without terms is refused by estimate; it must say why, never be silently left out."""
    assert len(REGISTRY) >= 14
    for method in REGISTRY.values():
        assert (method.estimate is not None) != bool(method.no_estimate_reason), method.name
    assert len(_every_method()) == 32  # 22 shipped with terms, 10 of them also layer-wise


def estimate_vs_simulate_failures(scenario, tolerance: float = TOLERANCE) -> list[str]:
    """Each run's estimate against its traced step (peak and each category's own maximum), beyond `tolerance`.
    Shared by the zoo, precision and modern-model estimate tests."""
    failures = []
    for run in scenario.runs:
        planned, steps = training.simulation_plan(scenario, run)  # GaLore: a third step refreshes the projectors
        traced = training.train_steps(scenario, planned, fake=True, device="cpu", steps=steps)["tracker"]
        guess = estimate_run(scenario, run)
        checks = {"peak": (guess.peak_bytes, traced.peak)}
        for category in ("weights", "gradients", "optimizer_states", "activations"):
            checks[category] = (guess.category_peaks[category], traced.category_peaks[category])
        failures += [f"{run.label} {what}: estimate {ours} vs simulate {truth}"
                     for what, (ours, truth) in checks.items() if abs(ours - truth) > tolerance * max(truth, 1)]
    return failures


@pytest.mark.parametrize("setting", SETTINGS)
def test_estimate_within_two_percent_of_simulate_for_every_method(setting):
    size, train = SETTINGS[setting]
    scenario = _scenario(size, train, EVERY_METHOD)
    failures = estimate_vs_simulate_failures(scenario)
    assert not failures, "\n".join(failures)


def test_badam_states_and_gradients_at_7b_by_hand():
    """One decoder layer trains: its bf16 gradients; its fp32 masters and AdamW's two fp32 moments (12 bytes per
    weight) and one fp32 `step` per tensor; at 7B every shape is a multiple of 128 values, so no rounding."""
    shape = ZOO["7b"]
    layer = sum(m * n for m, n in matrix_shapes(shape).values()) + 2 * shape.hidden_size  # 7 matrices, 2 norms
    result = estimate(shape, "badam", {}, batch_size=1, seq_len=256, dtype="bf16")
    assert result.terms["gradients_all"] == layer * 2
    assert result.terms["optimizer_states"] == layer * 12 + 9 * CUDA_BLOCK
    later = estimate(shape, "badam", {"start_block": 31}, batch_size=1, seq_len=256, dtype="bf16")
    assert later.terms["optimizer_states"] == result.terms["optimizer_states"]
    assert later.category_peaks["activations"] < result.category_peaks["activations"]  # nothing saved below it


@pytest.mark.slow
@pytest.mark.parametrize("model", [{"size": "7b"}, {"preset": "llama3.1-8b"}])
def test_badam_estimate_within_two_percent_of_simulate_at_full_size(model):
    """Measured: 0.00% on the peak, -0.01% (first block) and -0.04% (last) on activations, at both sizes."""
    runs = [{"method": "badam"}, {"method": "badam", "switch_mode": "descending", "label": "badam-last-block"}]
    scenario = parse_scenario({"model": model, "train": {"batch_size": 1, "seq_len": 256, "dtype": "bf16"},
                               "runs": runs}, Path("estimate-test.toml"))
    failures = estimate_vs_simulate_failures(scenario)
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize(("dims", "moment"), [
    ({"hidden_size": 64, "intermediate_size": 4096, "vocab_size": 128}, "mlp_forward"),  # a wide MLP
    ({"hidden_size": 256, "intermediate_size": 256, "vocab_size": 64}, "attention_forward"),  # a narrow one
    ({"hidden_size": 256, "intermediate_size": 688, "vocab_size": 32000}, "loss_forward"),  # LLaMA's proportions
])
def test_inference_estimate_finds_the_busiest_forward_moment_of_any_shape(dims, moment):
    """Autograd off, the peak is the loss or a layer's transients, depending on the vocabulary and MLP widths."""
    model = {"num_hidden_layers": 2, "num_attention_heads": 4, **dims}
    scenario = parse_scenario({"model": model, "train": {"batch_size": 2, "seq_len": 512, "dtype": "bf16"},
                               "runs": [{"method": "inference"}]}, Path("estimate-test.toml"))
    traced = training.train_steps(scenario, scenario.runs[0], fake=True, device="cpu", steps=2)["tracker"]
    guess = estimate_run(scenario, scenario.runs[0])
    assert guess.moment == moment
    assert guess.peak_bytes == pytest.approx(traced.peak, rel=0.005)
    assert guess.breakdown["activations"] == pytest.approx(traced.peak_breakdown["activations"], rel=0.005)


def test_estimate_weights_of_7b_are_exact():
    result = estimate(ZOO["7b"], "adamw", {}, batch_size=1, seq_len=256, dtype="bf16")
    assert result.breakdown["weights"] == 6_738_415_616 * 2
    assert result.terms["gradients_all"] == 6_738_415_616 * 2
    assert result.terms["optimizer_states"] == 2 * 6_738_415_616 * 2 + 291 * 512  # m, v; one fp32 `step` each


def test_galore_states_follow_table_1_by_hand():
    """m*r projector + 2*n*r moments (m <= n) per projected matrix, plain AdamW moments for the rest."""
    shape, rank = ZOO["7b"], 1024
    projected = sum(rank * min(m, n) + 2 * rank * max(m, n) for m, n in matrix_shapes(shape).values())
    regular = 2 * shape.vocab_size * shape.hidden_size + (2 * shape.num_hidden_layers + 1) * shape.hidden_size
    by_hand = 2 * (shape.num_hidden_layers * projected + 2 * regular)  # BF16: 2 bytes per element
    result = estimate(shape, "galore", {"rank": rank}, batch_size=1, seq_len=256, dtype="bf16")
    assert result.terms["optimizer_states"] == by_hand


def test_adafactor_states_are_factored_row_and_column_vectors_by_hand():
    """fp32 row + column vectors per matrix, a full fp32 vector per norm, one fp32 RMS scalar (a 512 B block) each;
    beta1 > 0 adds a full fp32 first moment. 7B's shapes are all multiples of 128, so no rounding."""
    shape = ZOO["7b"]
    h, layers = shape.hidden_size, shape.num_hidden_layers
    matrices = layers * sum(rows + cols for rows, cols in matrix_shapes(shape).values()) + 2 * (shape.vocab_size + h)
    vectors = (2 * layers + 1) * h
    tensors = layers * (len(matrix_shapes(shape)) + 2) + 3
    by_hand = (matrices + vectors) * 4 + tensors * 512
    plain = estimate(shape, "adafactor", {}, batch_size=1, seq_len=256, dtype="bf16")
    assert plain.terms["optimizer_states"] == by_hand < 0.002 * 6_738_415_616
    with_m = estimate(shape, "adafactor", {"beta1": 0.9}, batch_size=1, seq_len=256, dtype="bf16")
    assert with_m.terms["optimizer_states"] == by_hand + 6_738_415_616 * 4


def test_eight_bit_states_are_two_bytes_per_element_plus_block_scales():
    result = estimate(ZOO["7b"], "adam8bit", {}, batch_size=1, seq_len=256, dtype="bf16")
    # by hand, per tensor: 2 uint8 moments (n B each) + 2 fp32 absmax per 256 elements (n/64 B each); every
    # 7B tensor is a multiple of 512 B there, so the allocator's rounding adds nothing
    embedding = 2 * 131_072_000 + 2 * 2_048_000  # 32000 x 4096, embed_tokens and lm_head alike
    layer = 4 * (2 * 16_777_216 + 2 * 262_144) + 3 * (2 * 45_088_768 + 2 * 704_512)  # q k v o; gate up down
    norms = 65 * (2 * 4096 + 2 * 512)  # 4096 elements: 8-bit (bitsandbytes' threshold is numel < 4096)
    maps = 2 * 1024  # the signed and unsigned 256-entry fp32 quantization maps, shared
    assert result.terms["optimizer_states"] == 2 * embedding + 32 * layer + norms + maps == 13_687_467_008


def test_fused_and_layerwise_methods_hold_one_gradient_and_never_peak_in_a_separate_step():
    for method, options in (("lomo", {}), ("galore8bit", {"rank": 1024, "layerwise": True})):
        result = estimate(ZOO["7b"], method, options, batch_size=1, seq_len=256, dtype="bf16")
        assert result.category_peaks["gradients"] == ZOO["7b"].vocab_size * ZOO["7b"].hidden_size * 2
        assert "optimizer" not in result.moments
    lora = estimate(ZOO["7b"], "lora", {"rank": 64}, batch_size=1, seq_len=256, dtype="bf16")
    frozen = ZOO["7b"].num_hidden_layers * sum(m * n for m, n in matrix_shapes(ZOO["7b"]).values())
    assert lora.terms["gradients_all"] == (parameter_count(ZOO["7b"]) - frozen
                                           + ZOO["7b"].num_hidden_layers * sum(64 * (m + n) for m, n in
                                                                               matrix_shapes(ZOO["7b"]).values())) * 2


def test_estimate_mode_through_the_worker(write_scenario):
    from galore_bench.run.worker import execute
    from galore_bench.spec.scenario import load_scenario
    from tests.conftest import TINY_HEADER

    scenario = load_scenario(str(write_scenario(TINY_HEADER + '[[runs]]\nmethod = "galore"\nrank = 8\n')))
    record = execute(scenario, scenario.runs[0], "estimate", None)
    assert record["status"] == "ok" and record["mode"] == "estimate"
    assert record["device"].startswith("estimated-")
    assert record["memory"]["source"].startswith("estimate")
    assert record["memory"]["peak_bytes"] == sum(record["memory"]["breakdown"].values())
    assert record["memory"]["estimate"]["target"] == "gpu"
    # the run's own options reached the estimate: within 2% of the traced step of the same run (rank 8)
    planned, steps = training.simulation_plan(scenario, scenario.runs[0])
    traced = training.train_steps(scenario, planned, fake=True, device="cpu", steps=steps)["tracker"]
    assert record["memory"]["peak_bytes"] == pytest.approx(traced.peak, rel=0.02)


def test_simulated_galore_peak_includes_a_projector_refresh(write_scenario):
    """Every update_proj_gap steps GaLore runs an SVD per matrix: the simulated peak covers that step too."""
    from galore_bench.run.worker import execute
    from galore_bench.spec.scenario import load_scenario
    from tests.conftest import TINY_HEADER

    body = TINY_HEADER.replace('dtype = "fp32"', 'dtype = "bf16"').replace("batch_size = 2", "batch_size = 1")
    body = body.replace("seq_len = 32", "seq_len = 8") + '[[runs]]\nmethod = "galore"\nrank = 8\n'
    scenario = load_scenario(str(write_scenario(body)))
    memory = execute(scenario, scenario.runs[0], "simulate", None)["memory"]
    assert memory["includes_svd_refresh"] is True
    # 8 tokens: activations are small and the refresh's SVD workspace is the peak, as the estimate says
    assert memory["peak_without_svd_refresh_bytes"] < memory["peak_bytes"]
    guess = estimate_run(scenario, scenario.runs[0])
    assert guess.moment == "svd_refresh"
    assert guess.peak_bytes == pytest.approx(memory["peak_bytes"], rel=0.02)
    shape = ZOO["7b"]  # at 7B the refresh step is the peak, and the estimate models it
    result = estimate(shape, "galore", {"rank": 1024}, batch_size=1, seq_len=256, dtype="bf16")
    assert result.moment == "svd_refresh"  # above the plain optimizer step


@pytest.mark.parametrize(("shape", "options", "dtype"), [
    ((512, 1376), {"rank": 8}, torch.bfloat16),  # 60M's MLP shape: left side, two power iterations
    ((1376, 512), {"rank": 8, "proj_type": "reverse_std"}, torch.bfloat16),  # long side kept: a QR peaks
    ((300, 2000), {"rank": 32, "svd_power_iters": 0}, torch.float32),  # no power iteration, no fp32 copy
    ((2000, 300), {"rank": 1, "svd_oversample": 0, "proj_type": "right"}, torch.float32),
])
def test_randomized_refresh_bytes_match_one_traced_refresh(shape, options, dtype):
    """The closed form against a projector refresh traced under the tracker (512 B blocks): equal to the byte
    (measured so over 1152 shapes, ranks and options; these four cover each moment that can be the peak)."""
    opts, e = {"svd": "randomized", **options}, dtype.itemsize
    matrix = ParamShape("w", shape, projected=True)
    with FakeTensorMode(), MemoryTracker(round_to=CUDA_BLOCK) as tracker:
        gradient = torch.empty(shape, dtype=dtype)  # made inside: the tracker then knows its views
        before = tracker.current
        GaLoreProjector(**opts).project(gradient, 0)
    assert svd_refresh_bytes(matrix, opts, e) == tracker.peak - before
    assert svd_refresh_bytes(matrix, opts, e) < svd_refresh_bytes(matrix, {**opts, "svd": "full"}, e)


# one 256 x 688 MLP, a 64-token vocabulary: the refresh is most of the peak, the sketch ~7% of it
ONE_WIDE_LAYER = {"num_hidden_layers": 1, "num_attention_heads": 4, "hidden_size": 256,
                  "intermediate_size": 688, "vocab_size": 64}
RANDOMIZED_PEAKS = {  # runs whose step peaks in a randomized refresh (sketch width rank + 8 < min(m, n))
    "wide-sketch-galore": (ONE_WIDE_LAYER, {"method": "galore", "rank": 200}),
    "wide-sketch-galore8bit": (ONE_WIDE_LAYER, {"method": "galore8bit", "rank": 200}),
    "60m-galore8bit": ({"size": "60m"}, {"method": "galore8bit", "rank": 8, "layerwise": False}),
}


@pytest.mark.parametrize("case", RANDOMIZED_PEAKS)
def test_randomized_refresh_estimate_within_two_percent_of_simulate(case):
    """Measured: +0.10% and +0.12% (wide sketch, layer-wise), -0.02% (60M); the full SVD's bytes would be
    9% low on the wide sketch, where the range finder's sketch and QR factors outweigh the SVD's U and Vh."""
    model, run = RANDOMIZED_PEAKS[case]
    run = {"layerwise": True, **run, "svd": "randomized"}
    scenario = parse_scenario({"model": model, "train": {"batch_size": 1, "seq_len": 8, "dtype": "bf16"},
                               "runs": [run]}, Path("estimate-test.toml"))
    planned, steps = training.simulation_plan(scenario, scenario.runs[0])
    traced = training.train_steps(scenario, planned, fake=True, device="cpu", steps=steps)["tracker"]
    guess = estimate_run(scenario, scenario.runs[0])
    assert guess.moment == "svd_refresh"
    assert guess.peak_bytes == pytest.approx(traced.peak, rel=TOLERANCE)
    if case.startswith("wide"):
        full = estimate(scenario.model, run["method"], {**scenario.runs[0].options, "svd": "full"},
                        batch_size=1, seq_len=8, dtype="bf16")
        assert full.peak_bytes < (1 - 3 * TOLERANCE) * traced.peak


def test_randomized_refresh_falls_back_to_full_svd_bytes_when_the_sketch_is_as_wide_as_the_matrix():
    """range_finder takes the exact SVD when rank + oversample >= min(m, n): the estimate counts the full
    SVD's bytes then."""
    matrix = ParamShape("w", (64, 172), projected=True)
    for rank, oversample in ((56, 8), (60, 8), (64, 0), (8, 100)):
        randomized = {"rank": rank, "svd": "randomized", "svd_oversample": oversample}
        assert svd_refresh_bytes(matrix, randomized, 2) == svd_refresh_bytes(matrix, {"rank": rank}, 2)
    narrower = {"rank": 55, "svd": "randomized", "svd_oversample": 8}
    assert svd_refresh_bytes(matrix, narrower, 2) != svd_refresh_bytes(matrix, {"rank": 55}, 2)
    for layerwise in (False, True):  # the whole estimate of tiny (64 x 172 matrices) at rank 60
        options = {"rank": 60, "layerwise": layerwise}
        full = estimate(ZOO["tiny"], "galore", options, batch_size=1, seq_len=8, dtype="bf16")
        fallback = estimate(ZOO["tiny"], "galore", {**options, "svd": "randomized"}, batch_size=1, seq_len=8,
                            dtype="bf16")
        assert fallback.moments == full.moments
