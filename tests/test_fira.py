"""Our Fira optimizer against the `fira` package 1.0 (the authors' code, run on CPU as the oracle)."""
from __future__ import annotations

import copy

import pytest
import torch
from test_galore_optim import galore_groups, tiny_llama

from galore_bench.optim.fira import FiraAdamW, limit_growth


def fira_groups(model, rank: int, gap: int, scale: float) -> list[dict]:
    """The fira package's group keys: 'alpha' where ours says 'scale'."""
    regular, projected = galore_groups(model, rank, gap, scale)
    oracle = {k: v for k, v in projected.items() if k != "scale"}
    return [regular, {**oracle, "alpha": scale}]



@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_weights_equal_the_fira_package_across_a_refresh(dtype):
    """Five steps (bases refreshed at 0 and 2, the limiter active from step 2 on): bit-identical weights."""
    import warnings

    from fira import FiraAdamW as OracleFira

    ours_model = tiny_llama(dtype)
    ref_model = copy.deepcopy(ours_model)
    hyper = {"lr": 1e-2, "weight_decay": 0.01}
    ours = FiraAdamW(galore_groups(ours_model, rank=8, gap=2, scale=0.25), **hyper)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        ref = OracleFira(fira_groups(ref_model, rank=8, gap=2, scale=0.25), **hyper)
    start = {n: p.detach().clone() for n, p in ours_model.named_parameters()}
    torch.manual_seed(1)
    before: dict[int, torch.Tensor] = {}
    projected = [p for p in ours_model.parameters() if p.dim() == 2 and p.shape[0] != 128]
    engaged = 0
    for _ in range(5):
        ids = torch.randint(0, 128, (2, 16))
        ours_model(input_ids=ids, labels=ids).loss.backward()
        for p, q in zip(ours_model.parameters(), ref_model.parameters()):
            q.grad = p.grad.clone()
        ours.step()
        ref.step()
        ours.zero_grad()
        ref.zero_grad()
        norms = {id(p): ours.state[p]["residual_norm"].float() for p in projected}
        engaged += sum(bool((norms[id(p)] / before[id(p)] - 1.01).abs() < 1e-3) for p in projected
                       if id(p) in before)
        before = norms
    for (name, p), q in zip(ours_model.named_parameters(), ref_model.parameters()):
        assert not torch.equal(p, start[name]), f"{name} never moved"
        assert torch.equal(p, q), f"{name}: {(p.float() - q.float()).abs().max().item()} from the fira package"
    assert engaged > 0  # the norm-growth limiter cut some residual, so that branch is compared too


def test_residual_moves_weights_galore_alone_leaves_still():
    """The residual is the difference to GaLore: with it, a weight moves outside the rank-r subspace."""
    from galore_bench.optim.galore import GaLoreAdamW

    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(16, 32))
    twin = torch.nn.Parameter(weight.detach().clone())
    grad = torch.randn(16, 32)
    start = weight.detach().clone()  # both start here: GaLore's step lies in the basis' span, Fira's does not
    group = {"rank": 2, "update_proj_gap": 10, "scale": 1.0, "proj_type": "std"}
    fira, galore = FiraAdamW([{"params": [weight], **group}]), GaLoreAdamW([{"params": [twin], **group}])
    for param, opt in ((weight, fira), (twin, galore)):
        param.grad = grad.clone()
        opt.step()
    basis = galore.state[twin]["projector"].ortho_matrix  # 2 x 16 left vectors, (16 x 2)
    outside = lambda delta: (delta - basis @ (basis.T @ delta)).norm().item()
    assert outside(twin.detach() - start) < 1e-5
    assert outside(weight.detach() - start) > 1e-2


@pytest.mark.parametrize("shape", [(1024, 256), (256, 1024)])
def test_update_temporaries_estimate_equals_one_traced_update(shape):
    """The estimate's per-matrix transient against a fake-tensor trace of one steady-state Fira step."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from galore_bench.measure.tracker import MemoryTracker
    from galore_bench.methods.fira import update_temporaries
    from galore_bench.methods.terms import ParamShape

    with FakeTensorMode():
        weight = torch.nn.Parameter(torch.zeros(shape, dtype=torch.bfloat16))
        opt = FiraAdamW([{"params": [weight], "rank": 16, "update_proj_gap": 100, "scale": 0.25, "proj_type": "std"}])
        tracker = MemoryTracker(round_to=512)
        with tracker:
            tracker.label([weight], "weights")
            for step in range(2):  # step 0 makes the state; step 1 is the steady state (limiter on)
                weight.grad = torch.zeros_like(weight)
                tracker.label([weight.grad], "gradients")
                if step == 1:
                    tracker.reset_peak()
                with tracker.phase("optimizer"):
                    opt.step()
                state = opt.state[weight]
                tracker.label([state["exp_avg"], state["exp_avg_sq"], state["residual_norm"],
                               state["projector"].ortho_matrix], "optimizer_states")
                weight.grad = None
    by_terms = update_temporaries(ParamShape("w", shape, projected=True), {"rank": 16}, 2)
    assert tracker.category_peaks["other"] == by_terms == 16 * 1024 * 2 + 3 * 1024 * 256 * 2 + 512


def test_limiter_caps_residual_growth_at_one_percent():
    state: dict = {}
    first = torch.ones(4, 4)
    limit_growth(first, state)
    assert torch.equal(first, torch.ones(4, 4)) and state["residual_norm"] == 4.0
    doubled = 2 * torch.ones(4, 4)  # norm 8 after 4: cut back to 4 * 1.01 (within the 1e-8 eps)
    limit_growth(doubled, state)
    assert torch.allclose(torch.norm(doubled), torch.tensor(4.04)) and torch.allclose(state["residual_norm"],
                                                                                       torch.tensor(4.04))
    smaller = torch.ones(4, 4)  # shrinking is never limited
    limit_growth(smaller, state)
    assert torch.equal(smaller, torch.ones(4, 4)) and state["residual_norm"] == 4.0
