"""LOMO and layer-wise stepping: same numbers as the plain torch optimizers, one gradient alive, O(1) hooks."""

from __future__ import annotations

import contextlib
import copy
import sys
import types
from collections.abc import Callable, Iterator

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from transformers import LlamaConfig, LlamaForCausalLM

from galore_bench.optim import layerwise
from galore_bench.optim.layerwise import LayerwiseOptimizer
from galore_bench.optim.lomo import LOMO, DynamicLossScaler

LR = 0.05
VOCAB = 128


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=VOCAB,
    )
    return LlamaForCausalLM(cfg)


def batches(n: int = 3) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(0, VOCAB, (2, 8), generator=gen) for _ in range(n)]


def lm_loss(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, labels=ids, use_cache=False).loss


def assert_same_params(a: torch.nn.Module, b: torch.nn.Module, atol: float = 1e-6) -> None:
    pairs = list(zip(a.named_parameters(), b.named_parameters()))
    assert len(pairs) == len(list(a.parameters())) > 0
    for (name, pa), (_, pb) in pairs:
        torch.testing.assert_close(pa, pb, atol=atol, rtol=0, msg=f"{name} differs")


def torch_sgd_run(
    model: torch.nn.Module, clip_norm: float | None = None, clip_value: float | None = None
) -> list[float]:
    """Reference: plain backward, optional torch clipping, torch.optim.SGD; returns the grad norms."""
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    norms = []
    for ids in batches():
        opt.zero_grad(set_to_none=True)
        lm_loss(model, ids).backward()
        if clip_norm is not None:
            norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), clip_norm)))
        if clip_value is not None:
            norms.append(max(float(p.grad.abs().max()) for p in model.parameters()))
            torch.nn.utils.clip_grad_value_(model.parameters(), clip_value)
        opt.step()
    return norms


def lomo_run(model: torch.nn.Module, **kwargs: float) -> LOMO:
    lomo = LOMO(model, lr=LR, **kwargs)
    for ids in batches():
        lomo.step(lm_loss(model, ids))
    return lomo


def install_live_grad_probe(model: torch.nn.Module) -> list[int]:
    """Independent check (registered before the optimizer's hooks): live .grad count at every hook."""
    params = list(model.parameters())
    seen: list[int] = []
    for p in params:
        p.register_post_accumulate_grad_hook(lambda _p: seen.append(sum(q.grad is not None for q in params)))
    return seen


def test_lomo_matches_sgd() -> None:
    ref, ours = tiny_llama(), tiny_llama()
    torch_sgd_run(ref)
    lomo_run(ours)
    assert_same_params(ref, ours)
    assert not torch.equal(ours.model.embed_tokens.weight, tiny_llama().model.embed_tokens.weight)


@pytest.mark.parametrize("max_norm", [0.5, 1e3], ids=["clipping", "not-clipping"])
def test_lomo_clip_grad_norm_matches_torch_clip(max_norm: float) -> None:
    ref, ours = tiny_llama(), tiny_llama()
    norms = torch_sgd_run(ref, clip_norm=max_norm)
    assert all((n > max_norm) == (max_norm < 1) for n in norms), "each case must (not) clip on every step"
    lomo = LOMO(ours, lr=LR, clip_grad_norm=max_norm)
    ours_norms = [float(lomo.step(lm_loss(ours, ids))) for ids in batches()]
    assert ours_norms == pytest.approx(norms, rel=1e-5)
    assert_same_params(ref, ours)


def test_lomo_clip_grad_value_matches_torch_clip() -> None:
    ref, ours = tiny_llama(), tiny_llama()
    value = 0.01
    maxima = torch_sgd_run(ref, clip_value=value)
    assert min(maxima) > value, "clipping must be active for this test to mean anything"
    lomo_run(ours, clip_grad_value=value)
    assert_same_params(ref, ours)


@pytest.mark.parametrize("clip_norm", [None, 1.0])
def test_lomo_frees_every_grad_and_keeps_one_alive(clip_norm: float | None) -> None:
    model = tiny_llama()
    seen = install_live_grad_probe(model)
    lomo = lomo_run(model, clip_grad_norm=clip_norm) if clip_norm else lomo_run(model)
    assert all(p.grad is None for p in model.parameters())
    assert lomo.peak_live_grads == 1
    passes = 2 if clip_norm else 1
    assert len(seen) == 3 * passes * len(list(model.parameters()))
    assert max(seen) == 1


def test_lomo_static_loss_scale_is_undone() -> None:
    ref, ours = tiny_llama(), tiny_llama()
    torch_sgd_run(ref)
    lomo_run(ours, loss_scale=1024.0)
    assert_same_params(ref, ours)


def test_lomo_dynamic_scaler_skips_overflowing_step() -> None:
    model = torch.nn.Linear(4, 4).half()
    before = copy.deepcopy(model.state_dict())
    scaler = DynamicLossScaler(init_scale=2.0**20)
    lomo = LOMO(model, lr=LR, clip_grad_norm=1.0, loss_scale=scaler)
    loss = model(torch.full((2, 4), 100.0, dtype=torch.half)).float().pow(2).sum()
    lomo.step(loss)
    assert lomo.skipped_steps == 1 and scaler.scale == 2.0**19
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} changed on an overflowing step"
    assert all(p.grad is None for p in model.parameters())


def test_lomo_rejects_bad_settings_in_one_message() -> None:
    with pytest.raises(ValueError, match=r"lomo.clip_grad_norm must be > 0, got 0.*lomo.clip_grad_value"):
        LOMO(torch.nn.Linear(2, 2), lr=0.1, clip_grad_norm=0, clip_grad_value=-1)


def test_layerwise_adamw_matches_adamw() -> None:
    ref, ours = tiny_llama(), tiny_llama()

    def groups(m: torch.nn.Module) -> list[dict]:
        decay = [p for n, p in m.named_parameters() if p.ndim == 2]
        no_decay = [p for n, p in m.named_parameters() if p.ndim < 2]
        return [{"params": decay, "weight_decay": 0.1, "rank": 8}, {"params": no_decay, "weight_decay": 0.0}]

    opt = torch.optim.AdamW(groups(ref), lr=1e-2)
    for ids in batches():
        opt.zero_grad(set_to_none=True)
        lm_loss(ref, ids).backward()
        opt.step()

    seen_groups: list[dict] = []

    def make(g: list[dict]) -> torch.optim.Optimizer:
        seen_groups.extend(g)
        return torch.optim.AdamW(g, lr=1e-2)

    lw = LayerwiseOptimizer(groups(ours), make)
    probe = install_live_grad_probe(ours)
    n_params = len(list(ours.parameters()))
    for ids in batches():
        lm_loss(ours, ids).backward()
        assert all(p.grad is None for p in ours.parameters())
        lw.step()
        lw.zero_grad()
    assert_same_params(ref, ours)
    assert len(lw.optimizers) == n_params and len({id(o) for o in lw.optimizers.values()}) == n_params
    assert all(
        len(o.param_groups) == 1 and len(o.param_groups[0]["params"]) == 1 for o in lw.optimizers.values()
    )
    assert sum(g.get("rank") == 8 for g in seen_groups) == sum(p.ndim == 2 for p in ours.parameters())
    assert len(lw.state) == n_params and all(st["exp_avg"].shape == p.shape for p, st in lw.state.items())
    assert max(probe) <= 1 and lw.hook_calls == 3 * n_params
    assert not LayerwiseOptimizer.supports_grad_accumulation() and layerwise.MAX_GRAD_ACCUMULATION == 1
    lw.remove_hooks()
    lm_loss(ours, batches(1)[0]).backward()
    assert all(p.grad is not None for p in ours.parameters())


def test_lomo_step_runs_under_fake_tensor_mode() -> None:
    with FakeTensorMode():
        model = tiny_llama()
        lomo = LOMO(model, lr=LR, clip_grad_norm=1.0)
        ids = torch.randint(0, VOCAB, (2, 8))
        norm = lomo.step(lm_loss(model, ids))
        plain = LOMO(model, lr=LR)
        lomo.remove_hooks()
        plain.step(lm_loss(model, ids))
    assert isinstance(norm, FakeTensor) and isinstance(model.lm_head.weight, FakeTensor)
    n = len(list(model.parameters()))
    assert lomo.hook_calls == 2 * n and plain.hook_calls == n and plain.peak_live_grads == 1


def _count_param_scans(model: torch.nn.Module, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts calls to the module-walking methods a quadratic hook would use."""
    calls = [0]
    for name in ("parameters", "named_parameters", "modules", "named_modules"):
        original = getattr(model, name)

        def counted(*a: object, _orig=original, **k: object) -> Iterator:
            calls[0] += 1
            return _orig(*a, **k)

        monkeypatch.setattr(model, name, counted)
    return calls


def test_hooks_do_constant_work_per_parameter(monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny_llama()
    n = len(list(model.parameters()))
    lomo = LOMO(model, lr=LR, clip_grad_norm=1.0)
    calls = _count_param_scans(model, monkeypatch)
    ids = batches(1)[0]
    loss = lm_loss(model, ids)
    forward_calls = calls[0]
    lomo.step(loss)
    assert lomo.hook_calls == 2 * n  # one hook call per parameter per backward pass, not n^2
    assert calls[0] == forward_calls, "a LOMO hook walked the model's parameters"


def _events_in_our_hooks(n_layers: int, layerwise_opt: bool) -> int:
    """Python trace events (calls + lines, loops re-fire them) executed in our optimizer modules in one step."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(2, 2) for _ in range(n_layers)])
    run: Callable[[torch.Tensor], object]
    if layerwise_opt:
        LayerwiseOptimizer(model.parameters(), lambda g: torch.optim.SGD(g, lr=LR))
        run = torch.Tensor.backward
    else:
        run = LOMO(model, lr=LR, clip_grad_norm=1.0).step
    loss = model(torch.ones(1, 2)).sum()
    ours = (layerwise.__file__, sys.modules[LOMO.__module__].__file__)
    count = [0]

    def tracer(frame: types.FrameType, event: str, arg: object) -> Callable | None:
        if frame.f_code.co_filename in ours:
            count[0] += 1
            return tracer
        return None

    previous = sys.gettrace()
    sys.settrace(tracer)
    try:
        run(loss)
    finally:
        sys.settrace(previous)
    return count[0]


@pytest.mark.parametrize("layerwise_opt", [False, True], ids=["lomo", "layerwise"])
def test_hook_work_grows_linearly_with_parameter_count(layerwise_opt: bool) -> None:
    """Deterministic: doubling the parameters must double (not quadruple) the Python work in our hooks."""
    small, large = _events_in_our_hooks(40, layerwise_opt), _events_in_our_hooks(80, layerwise_opt)
    assert small > 80, "the tracer saw no hook; the guard would be vacuous"
    assert large <= 2.1 * small, f"hook work grew {large / small:.2f}x for 2x parameters (quadratic?)"


def test_scan_guard_catches_the_quadratic_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    """Shows the guard above can fail: the reference package rescans all parameters in each hook."""
    lomo_optim = pytest.importorskip("lomo_optim")
    model = tiny_llama()
    n = len(list(model.parameters()))
    ref = lomo_optim.Lomo(model, lr=LR)
    calls = _count_param_scans(model, monkeypatch)
    loss = lm_loss(model, batches(1)[0])
    before = calls[0]
    ref.fused_backward(loss, LR)
    assert calls[0] - before >= n


def test_hooks_enter_the_tracker_phase(monkeypatch: pytest.MonkeyPatch) -> None:
    entered = [0]

    @contextlib.contextmanager
    def optimizer_phase() -> Iterator[None]:
        entered[0] += 1
        yield

    monkeypatch.setattr(layerwise, "_phase_factory", optimizer_phase)
    model = tiny_llama()
    n = len(list(model.parameters()))
    LOMO(model, lr=LR).step(lm_loss(model, batches(1)[0]))
    assert entered[0] == n
    other = tiny_llama()
    LayerwiseOptimizer(other.parameters(), lambda g: torch.optim.SGD(g, lr=LR))
    lm_loss(other, batches(1)[0]).backward()
    assert entered[0] == 2 * n


def test_phase_context_is_the_trackers_once_registered_else_a_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    from galore_bench.measure import tracker

    assert layerwise._phase_factory is tracker.optimizer_phase  # registered when the tracker is imported
    monkeypatch.setattr(layerwise, "_phase_factory", None)
    assert isinstance(layerwise.optimizer_phase_context(), contextlib.nullcontext)
