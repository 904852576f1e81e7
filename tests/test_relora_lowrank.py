"""Tests of the LoRA/ReLoRA and Low-Rank baselines (GaLore Table 2) on a tiny LLaMA."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.optim.lr_scheduler import LambdaLR
from transformers import LlamaConfig, LlamaForCausalLM

from galore_bench.optim.lowrank import DEFAULT_TARGETS, LowRankLinear, apply_low_rank
from galore_bench.optim.relora import (
    ReLoRA,
    jagged_cosine_lr,
    lora_config,
    magnitude_keep_mask,
    wrap_lora,
)

CFG = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "vocab_size": 128,
}


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**CFG))


def batch(seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, CFG["vocab_size"], (4, 16), generator=g)


def loss_of(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, labels=ids, use_cache=False).loss


def train(
    model: nn.Module, opt: torch.optim.Optimizer, ids: torch.Tensor, steps: int, hook=None, sched=None
) -> list[float]:
    losses = []
    for step in range(steps):
        if hook is not None:
            hook(step)
        loss = loss_of(model, ids)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if sched is not None:
            sched.step()
        losses.append(loss.item())
    return losses


def lora_setup(rank: int = 4, lr: float = 1e-2):
    model = wrap_lora(tiny_llama(), lora_config(rank))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    return model, opt


# ---------------------------------------------------------------- ReLoRA


def test_relora_merge_preserves_logits() -> None:
    model, opt = lora_setup()
    relora = ReLoRA(model, opt, reset_every=1000, prune_ratio=1.0)
    ids = batch()
    train(model, opt, ids, 3)
    layer = relora.layers[0]
    B = layer.lora_B["default"].weight
    A = layer.lora_A["default"].weight
    assert B.abs().max() > 1e-4, "B should have moved away from zero after training"
    w_before, a_before = layer.get_base_layer().weight.clone(), A.clone()
    model.eval()
    with torch.no_grad():
        before = model(input_ids=ids, use_cache=False).logits
        assert relora.maybe_restart(1000)
        after = model(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(after, before, atol=1e-5, rtol=0)
    assert torch.all(B == 0)
    assert not torch.equal(A, a_before)  # re-initialised
    assert not torch.equal(layer.get_base_layer().weight, w_before)  # delta went into W


@pytest.mark.parametrize("prune_ratio", [1.0, 0.9])
def test_relora_optimizer_state_reset_and_frozen_base(prune_ratio: float) -> None:
    model, opt = lora_setup()
    relora = ReLoRA(model, opt, reset_every=3, prune_ratio=prune_ratio)
    ids = batch()
    train(model, opt, ids, 3)
    emb = model.get_input_embeddings().weight
    emb_state = opt.state[emb]["exp_avg"].clone()
    assert relora.maybe_restart(3)
    keys = ("exp_avg", "exp_avg_sq")
    for p in relora.adapter_parameters():
        for k in keys:
            zero_frac = (opt.state[p][k] == 0).float().mean().item()
            if prune_ratio == 1.0:
                assert zero_frac == 1.0
            else:
                assert 0.89 <= zero_frac <= 0.95, zero_frac
        # one shared mask: no entry keeps a first moment while its second moment is zeroed
        # (m / (sqrt(0) + eps) would blow up the next Adam step)
        st = opt.state[p]
        assert not ((st["exp_avg"] != 0) & (st["exp_avg_sq"] == 0)).any()
    # non-adapter state is untouched
    torch.testing.assert_close(opt.state[emb]["exp_avg"], emb_state)
    # frozen base weights: no grad, no optimizer state, even after another step
    train(model, opt, ids, 1)
    loss_of(model, ids).backward()
    for layer in relora.layers:
        w = layer.get_base_layer().weight
        assert not w.requires_grad and w.grad is None
        assert w not in opt.state
    assert emb.requires_grad and emb.grad is not None  # embeddings train in full (pre-training setup)


def test_magnitude_keep_mask_keeps_largest() -> None:
    t = torch.arange(1.0, 11.0) * torch.tensor([1, -1] * 5)
    assert magnitude_keep_mask(t, 0.7).tolist() == [False] * 7 + [True] * 3
    assert not magnitude_keep_mask(t, 1.0).any() and magnitude_keep_mask(t, 0.0).all()


def test_relora_training_loss_falls_with_restarts() -> None:
    model, opt = lora_setup(rank=4, lr=1e-2)
    relora = ReLoRA(model, opt, reset_every=4, prune_ratio=0.999)
    total = 12
    sched = LambdaLR(opt, lambda s: jagged_cosine_lr(s, total, warmup=1, restart_every=4, restart_warmup=1))
    restarts = []
    losses = train(
        model, opt, batch(), total, hook=lambda s: restarts.append(relora.maybe_restart(s)), sched=sched
    )
    assert [i for i, r in enumerate(restarts) if r] == [4, 8]
    assert relora.num_restarts == 2
    assert losses[-1] < losses[0] - 1.0, losses
    # the restart (before step 4's forward) keeps what was learnt: no jump back up
    assert losses[4] < losses[3] and losses[8] < losses[7], losses
    assert losses[-1] < losses[4]


# ---------------------------------------------------------------- schedule


def test_jagged_cosine_lr_points() -> None:
    f = lambda s: jagged_cosine_lr(
        s, total_steps=100, warmup=10, restart_every=25, restart_warmup=5, min_ratio=0.1
    )
    assert f(0) == 0.0
    assert f(5) == pytest.approx(0.5)
    assert f(10) == pytest.approx(1.0)  # peak right after warm-up
    # progress (30-10)/90 = 2/9: 0.1 + 0.9 * 0.5 * (1 + cos(40 deg)) = 0.894720
    assert f(30) == pytest.approx(0.894720, abs=1e-5)
    assert f(25) == 0.0  # restart: drop to 0
    assert f(27) == pytest.approx(0.4 * 0.894720, abs=1e-5)  # linear re-warm to cosine(30)
    assert f(55) == pytest.approx(0.55)  # half-way cosine (not a restart window: 55 % 25 = 5)
    assert f(50) == 0.0 and f(75) == 0.0
    # progress 89/90: 0.1 + 0.45 * (1 + cos(178 deg)) = 0.100274; beyond total_steps: min_ratio
    assert f(99) == pytest.approx(0.100274, abs=1e-5) and f(110) == pytest.approx(0.1)
    in_rewarm = lambda s: s >= 25 and s % 25 < 5
    vals = [f(s) for s in range(10, 120) if not in_rewarm(s)]
    assert min(vals) >= 0.1 - 1e-12 and max(vals) <= 1.0
    # as a LambdaLR multiplier
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=2.0)
    sched = LambdaLR(opt, f)
    for _ in range(27):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(2.0 * 0.4 * 0.894720, abs=1e-5)


# ---------------------------------------------------------------- Low-Rank


def test_low_rank_param_count_and_structure() -> None:
    rank = 8
    model = apply_low_rank(tiny_llama(), rank)
    # per layer: attn 4 * 8*(64+64) = 4096; mlp 3 * 8*(64+128) = 4608  -> 8704, x2 layers = 17408
    # non-target: embed 128*64 + lm_head 128*64 + norms (2*2 + 1)*64 = 16704
    assert sum(p.numel() for p in model.parameters()) == 17408 + 16704
    assert all(p.requires_grad for p in model.parameters())
    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, LowRankLinear)}
    assert names == set(DEFAULT_TARGETS)
    assert not any(
        isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in DEFAULT_TARGETS for n, m in model.named_modules()
    )
    lin = model.model.layers[0].mlp.down_proj
    x = torch.randn(3, 128)
    torch.testing.assert_close(lin(x), x @ lin.A.T @ lin.B.T)
    # the product matches the dense init scale (initializer_range 0.02)
    assert 0.015 < (lin.B @ lin.A).std().item() < 0.025


def test_low_rank_svd_init_full_rank_is_exact() -> None:
    torch.manual_seed(0)
    dense = nn.Sequential()
    dense.add_module("q_proj", nn.Linear(16, 12, bias=True))
    x = torch.randn(5, 16)
    ref = dense(x)
    apply_low_rank(dense, rank=12, init="svd")
    assert isinstance(dense.q_proj, LowRankLinear)
    torch.testing.assert_close(dense(x), ref, atol=1e-5, rtol=1e-5)


def test_low_rank_loss_falls() -> None:
    model = apply_low_rank(tiny_llama(), rank=8)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = train(model, opt, batch(), 10)
    assert losses[-1] < losses[0] - 0.5, losses
    assert all(math.isfinite(v) for v in losses)


@pytest.mark.parametrize("init", ["random", "svd"])
@pytest.mark.parametrize("apply_inside_mode", [True, False])
def test_low_rank_under_fake_tensor_mode(init: str, apply_inside_mode: bool) -> None:
    mode = FakeTensorMode()
    with mode:
        model = LlamaForCausalLM(LlamaConfig(**CFG))
        if apply_inside_mode:
            apply_low_rank(model, rank=8, init=init)
    if not apply_inside_mode:  # factors must still come out fake (allocated from the fake weights)
        apply_low_rank(model, rank=8, init=init)
    with mode:
        ids = torch.randint(0, CFG["vocab_size"], (2, 16))
        loss_of(model, ids).backward()
    q = model.model.layers[1].self_attn.q_proj
    assert isinstance(q, LowRankLinear)
    assert isinstance(q.A, FakeTensor) and isinstance(q.A.grad, FakeTensor)
    assert q.A.grad.shape == (8, 64) and q.B.grad.shape == (64, 8)
