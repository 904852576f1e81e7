"""Our APOLLO / APOLLO-Mini against pytorch-optimizer's APOLLO (the 2024 paper's, not its 2020 quasi-Newton
ApolloDQN), a hand-worked step of the paper's Algorithm 1, and the limiter and seeded projection on their own."""
from __future__ import annotations

import math

import pytest
import torch
from pytorch_optimizer.optimizer.apollo import APOLLO as OracleAPOLLO
from pytorch_optimizer.optimizer.utils.galore import GaLoreProjector as OracleProjector
from torch import nn

from galore_bench.optim.apollo import NORM_GROWTH_LIMIT, Apollo, random_projection


def _model() -> nn.Sequential:
    """A tall (48 x 24) and a wide (16 x 48) weight, each with a bias: both projection sides, and plain Adam."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(24, 48), nn.Tanh(), nn.Linear(48, 16))


def _loss(model: nn.Module, step: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(100 + step)
    x = torch.randn(32, 24, generator=generator)
    return model(x).square().mean()


def _groups(model: nn.Sequential, **projected) -> list[dict]:
    weights = [model[0].weight, model[2].weight]
    return ([{"params": [w], "seed": i, **projected} for i, w in enumerate(weights)]
            + [{"params": [model[0].bias, model[2].bias]}])


@pytest.mark.parametrize("scale_type", ["channel", "tensor"])
@pytest.mark.parametrize("gap", [1, 100])
def test_projected_variant_equals_pytorch_optimizer_bit_for_bit(monkeypatch, scale_type, gap):
    """scaled_gradient="projected" is pytorch-optimizer's reading of APOLLO: same moments, ratios, limiter and
    update, so after 6 steps (refreshes included) the weights are bit-identical. The oracle draws its Gaussian
    projection from the global RNG; we hand it ours, so that the update rule is what is compared. Its refreshes
    come at its 1-based steps 1, T, 2T, ours (like GaLore's) at 0-based 0, T, 2T: the two schedules agree for
    T = 1 (every step) and T > steps (step 0 only), the cases compared here."""
    ours_model, oracle_model = _model(), _model()
    settings = {"rank": 4, "update_proj_gap": gap, "scale": 4.0, "scale_type": scale_type}
    ours = Apollo(_groups(ours_model, **settings, scaled_gradient="projected"), lr=1e-2, eps=1e-6)
    oracle_groups = _groups(oracle_model, **settings, projection_type="random")
    oracle = OracleAPOLLO(oracle_groups, lr=1e-2, eps=1e-6, foreach=False)
    ours_weights = {id(o): w for w, o in zip((ours_model[0].weight, ours_model[2].weight),
                                             (oracle_model[0].weight, oracle_model[2].weight))}
    current: dict[str, torch.Tensor] = {}

    def ours_projection(self, weights, projection_type, from_random_matrix=False):
        return current["projection"]

    monkeypatch.setattr(OracleProjector, "get_orthogonal_matrix", ours_projection)
    for step in range(6):
        for model in (ours_model, oracle_model):
            model.zero_grad()
            _loss(model, step).backward()
        ours.step()
        _step_oracle_per_group(oracle, ours, ours_weights, current)
    for mine, theirs in zip(ours_model.parameters(), oracle_model.parameters()):
        assert torch.equal(mine, theirs)
    assert not torch.equal(ours_model[0].weight, _model()[0].weight)  # they moved


def _step_oracle_per_group(oracle, ours, ours_weights, current) -> None:
    """The oracle steps group by group, each projected group seeing the projection ours holds for that weight."""
    groups = oracle.param_groups
    for index, group in enumerate(groups):
        weight = group["params"][0]
        if id(weight) in ours_weights:
            current["projection"] = ours.state[ours_weights[id(weight)]]["projection"]
        oracle.param_groups = [group]
        try:
            oracle.step()
        finally:
            oracle.param_groups = groups


def _by_hand(weight: torch.Tensor, grads: list[torch.Tensor], projection: torch.Tensor, scale_type: str,
             lr: float, scale: float, limit: bool = True, betas=(0.9, 0.999), eps=1e-6):
    """Algorithm 1 of the paper in float64, written out: the full-rank gradient scaled by ||R~|| / ||R||
    (per row of a tall weight, per column of a wide one, or per tensor), the norm-growth limiter, the update.
    Returns the weight and each step's ||G * s|| before the limiter."""
    w, p = weight.double().clone(), projection.double()
    tall = w.shape[0] >= w.shape[1]
    m = v = previous = None
    norms = []
    for t, g in enumerate(grads, start=1):
        g = g.double()
        r = g @ p.T if tall else p.T @ g
        m = (1 - betas[0]) * r if m is None else betas[0] * m + (1 - betas[0]) * r
        v = (1 - betas[1]) * r * r if v is None else betas[1] * v + (1 - betas[1]) * r * r
        normalized = m / (v.sqrt() + eps)
        if scale_type == "tensor":
            s = normalized.norm() / (r.norm() + 1e-8)
        elif tall:
            s = (normalized.norm(dim=1) / (r.norm(dim=1) + 1e-8)).unsqueeze(1)
        else:
            s = normalized.norm(dim=0) / (r.norm(dim=0) + 1e-8)
        scaled = g * s
        norms.append(float(scaled.norm()))
        if limit and previous is not None and scaled.norm() > NORM_GROWTH_LIMIT * previous:
            scaled = scaled * (NORM_GROWTH_LIMIT * previous / scaled.norm())
        previous = scaled.norm()
        step_size = lr * math.sqrt(1 - betas[1] ** t) / (1 - betas[0] ** t)
        w = w - step_size * math.sqrt(scale) * scaled
    return w, norms


@pytest.mark.parametrize("shape", [(12, 8), (8, 12)], ids=["tall", "wide"])
@pytest.mark.parametrize("scale_type", ["channel", "tensor"])
def test_full_variant_equals_algorithm_1_by_hand(shape, scale_type):
    """The paper's update (the default): three steps, the gradient tripling at the second so that the limiter
    caps it, against the float64 hand computation; fp32 rounding only (rel 1e-5)."""
    torch.manual_seed(1)
    weight = nn.Parameter(torch.randn(shape))
    start = weight.detach().clone()
    g = torch.randn(shape)
    grads = [g, 3 * g, 3 * g + torch.randn(shape)]
    optimizer = Apollo([{"params": [weight], "rank": 3, "update_proj_gap": 100, "scale": 4.0,
                         "scale_type": scale_type, "seed": 7}], lr=0.1)
    for grad in grads:
        weight.grad = grad.clone()
        optimizer.step()
    projection = optimizer.state[weight]["projection"]
    expected, norms = _by_hand(start, grads, projection, scale_type, lr=0.1, scale=4.0)
    assert torch.allclose(weight.double(), expected, rtol=1e-5, atol=1e-7)
    assert norms[1] > NORM_GROWTH_LIMIT * norms[0]  # the second step is one the limiter caps, and that matters:
    unlimited, _ = _by_hand(start, grads, projection, scale_type, lr=0.1, scale=4.0, limit=False)
    assert not torch.allclose(weight.double(), unlimited, rtol=1e-3)


def test_random_projection_is_seeded_gaussian_on_the_shorter_side():
    tall, wide = torch.empty(300, 200), torch.empty(200, 300)
    assert random_projection(tall, 8, 0).shape == (8, 200) and random_projection(wide, 8, 0).shape == (200, 8)
    assert torch.equal(random_projection(tall, 8, 5), random_projection(tall, 8, 5))
    assert not torch.equal(random_projection(tall, 8, 5), random_projection(tall, 8, 6))
    sample = random_projection(torch.empty(4000, 4000), 16, 0)
    assert sample.mean().abs() < 0.01 and sample.std().item() == pytest.approx(1 / 4, rel=0.01)  # N(0, 1/r)


def test_projection_is_redrawn_every_update_proj_gap_steps_and_each_matrix_has_its_own():
    model = _model()
    optimizer = Apollo(_groups(model, rank=4, update_proj_gap=3, scale=1.0, scale_type="channel"))
    seen = []
    for step in range(7):
        model.zero_grad()
        _loss(model, step).backward()
        optimizer.step()
        seen.append(optimizer.state[model[0].weight]["projection"].clone())
    changed = [step for step in range(1, 7) if not torch.equal(seen[step], seen[step - 1])]
    assert changed == [3, 6]
    assert optimizer.state[model[0].weight]["projection"].shape == (4, 24)  # tall 48 x 24: rank x cols
    assert optimizer.state[model[2].weight]["projection"].shape == (16, 4)  # wide 16 x 48: rows x rank
    assert set(optimizer.state[model[0].bias]) == {"step", "exp_avg", "exp_avg_sq"}  # plain Adam


def test_bad_settings_are_refused():
    weight = nn.Parameter(torch.zeros(4, 4))
    for bad in ({"rank": 0}, {"scale_type": "row"}, {"scaled_gradient": "half"}, {"scale": -1.0}):
        group = {"params": [weight], "rank": 2, "update_proj_gap": 1, "scale": 1.0, "scale_type": "tensor", **bad}
        with pytest.raises(ValueError):
            Apollo([group])
