"""AdaLomo against a step worked by hand (lomo-optim's AdaLomo is CUDA-only, so it cannot be the oracle)."""
from __future__ import annotations

import math

import pytest
import torch

from galore_bench.optim.adalomo import AdaLomo


class Pair(torch.nn.Module):
    """A 2 x 3 matrix and a 3-vector whose gradients are set by the loss: d/dW (W*C).sum() = C."""

    def __init__(self) -> None:
        super().__init__()
        self.matrix = torch.nn.Parameter(torch.tensor([[0.5, -1.0, 2.0], [1.5, 0.25, -0.75]], dtype=torch.float64))
        self.vector = torch.nn.Parameter(torch.tensor([0.3, -0.2, 0.1], dtype=torch.float64))

    def loss(self, c: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        return (self.matrix * c).sum() + (self.vector * d).sum()


GRADS = [([[1.0, -2.0, 0.5], [0.1, 3.0, -1.0]], [0.4, -0.05, 2.0]),
         ([[-0.5, 1.0, 2.5], [2.0, -0.2, 0.3]], [-1.0, 0.5, 0.25])]
LR, WD, EPS0, EPS1 = 0.1, 0.05, 1e-30, 1e-3


def by_hand(weights: list[list[float]] | list[float], grads: list, second: list, t: int, clip: float) -> list:
    """One AdaLomo step on a matrix (second = [row, col]) or a vector (second = [v]), in plain Python floats."""
    beta = 1.0 - t ** -0.8
    matrix = isinstance(weights[0], list)
    flat_w = [w for row in weights for w in row] if matrix else list(weights)
    flat_g = [g for row in grads for g in row] if matrix else list(grads)
    if matrix:
        rows, cols = len(weights), len(weights[0])
        sq = [[grads[i][j] ** 2 + EPS0 for j in range(cols)] for i in range(rows)]
        row = [beta * second[0][i] + (1 - beta) * sum(sq[i]) / cols for i in range(rows)]
        col = [beta * second[1][j] + (1 - beta) * sum(sq[i][j] for i in range(rows)) / rows for j in range(cols)]
        mean_row = sum(row) / rows
        update = [grads[i][j] / math.sqrt(row[i] * col[j] / mean_row) for i in range(rows) for j in range(cols)]
        second[:] = [row, col]
    else:
        v = [beta * second[0][k] + (1 - beta) * (flat_g[k] ** 2 + EPS0) for k in range(len(flat_g))]
        update = [flat_g[k] / math.sqrt(v[k]) for k in range(len(flat_g))]
        second[:] = [v]
    update_rms = math.sqrt(sum(u * u for u in update) / len(update))
    update = [u / max(1.0, update_rms / clip) for u in update]
    lr = LR * max(EPS1, math.sqrt(sum(w * w for w in flat_w) / len(flat_w)))
    new = [w * (1 - lr * WD) - lr * u for w, u in zip(flat_w, update)]
    return [new[i * len(weights[0]):(i + 1) * len(weights[0])] for i in range(len(weights))] if matrix else new


@pytest.mark.parametrize("clip", [0.5, 10.0], ids=["update-clipped", "unclipped"])
def test_two_steps_match_the_hand_worked_update(clip):
    """fp64 weights, fp32 second moments (as lomo-optim keeps them): agreement to fp32 precision, 1e-6."""
    model = Pair()
    opt = AdaLomo(model, lr=LR, clip_threshold=clip, weight_decay=WD)
    matrix, vector = model.matrix.tolist(), model.vector.tolist()
    second_m, second_v = [[0.0, 0.0], [0.0, 0.0, 0.0]], [[0.0, 0.0, 0.0]]
    for t, (c, d) in enumerate(GRADS, start=1):
        opt.step(model.loss(torch.tensor(c, dtype=torch.float64), torch.tensor(d, dtype=torch.float64)))
        matrix, vector = by_hand(matrix, c, second_m, t, clip), by_hand(vector, d, second_v, t, clip)
        assert model.matrix.flatten().tolist() == pytest.approx([w for row in matrix for w in row], rel=1e-6)
        assert model.vector.tolist() == pytest.approx(vector, rel=1e-6)
        assert opt.state[model.matrix]["row"].tolist() == pytest.approx(second_m[0], rel=1e-6)
        assert opt.state[model.vector]["sq"].tolist() == pytest.approx(second_v[0], rel=1e-6)
    assert model.matrix.grad is None and model.vector.grad is None  # every gradient freed inside backward


def test_state_is_factored_for_matrices_and_full_for_vectors():
    model = torch.nn.Linear(48, 16)
    opt = AdaLomo(model, lr=1e-3)
    sizes = {name: sorted(t.numel() for t in opt.state[p].values()) for name, p in model.named_parameters()}
    assert sizes == {"weight": [16, 48], "bias": [16]}
    assert all(t.dtype == torch.float32 for t in opt.state_tensors())


def test_bf16_weights_update_through_fp32_and_match_an_fp32_run():
    torch.manual_seed(0)
    full, half = torch.nn.Linear(32, 8), torch.nn.Linear(32, 8)
    half.load_state_dict(full.state_dict())
    half.to(torch.bfloat16)
    start = full.weight.detach().clone()
    x = torch.randn(4, 32)
    for model, opt in ((full, AdaLomo(full, lr=1.0)), (half, AdaLomo(half, lr=1.0))):
        opt.step(model(x.to(model.weight.dtype)).square().mean())
    assert half.weight.dtype == torch.bfloat16
    moved = (full.weight - start).abs().mean()
    assert moved > 1e-2 and (half.weight.float() - full.weight).abs().max() < 0.1 * moved


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="decay_rate <= 0"):
        AdaLomo(torch.nn.Linear(2, 2), lr=1e-3, decay_rate=0.5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(4096, 1024), (1024, 4096), (640,)])
def test_update_temporaries_estimate_equals_one_traced_update(shape, dtype):
    """The estimate's per-weight transient against a fake-tensor trace of one steady-state fused update."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from galore_bench.measure.tracker import MemoryTracker
    from galore_bench.methods.adalomo import update_temporaries
    from galore_bench.methods.terms import ParamShape

    with FakeTensorMode():
        model = torch.nn.Module()
        model.w = torch.nn.Parameter(torch.zeros(shape, dtype=dtype))
        tracker = MemoryTracker(round_to=512)
        with tracker:
            tracker.watch_model(model)
            opt = AdaLomo(model, lr=1e-3)
            tracker.label(list(opt.state_tensors()), "optimizer_states")
            for step in range(2):
                if step == 1:
                    tracker.reset_peak()
                with tracker.phase("forward"):
                    loss = model.w.sum()
                with tracker.phase("backward"):
                    opt.step(loss)
                del loss
    seed = 512  # backward's 0-dim grad_output, not the optimizer's
    assert tracker.category_peaks["other"] == update_temporaries(ParamShape("w", shape), {}, dtype.itemsize) + seed


def test_the_trainer_applies_the_cosine_schedule_itself():
    """No torch optimizer for a LambdaLR: the engines' schedule moves AdaLomo's one group as LambdaLR would."""
    from galore_bench.measure.training import lr_schedule
    from galore_bench.methods import REGISTRY
    from galore_bench.methods.base import TrainSettings
    from galore_bench.optim.relora import warmup_cosine_lr

    method = REGISTRY["adalomo"]
    train = TrainSettings(steps=10, warmup_steps=2, lr_schedule="cosine", grad_accum=1)
    opts = {name: option.default for name, option in method.all_options().items()} | {"lr": 0.5}
    assert method.limits(opts, train) == []
    trainer = method.build(torch.nn.Linear(4, 4), opts, train)
    trainer.scheduler = lr_schedule(trainer, train)  # as measure/training.build_trainer attaches it
    seen = [trainer.optimizer.lr]
    for step in range(9):
        trainer.update(step)
        seen.append(trainer.optimizer.lr)
    assert seen == [0.5 * warmup_cosine_lr(s, 10, 2) for s in range(10)] and seen[0] == 0.0 and seen[2] == 0.5
