"""Muon: our method is torch.optim.Muon on the hidden matrices and torch.optim.AdamW on the rest, step for step."""
from __future__ import annotations

import copy

import torch

from galore_bench.methods import REGISTRY
from galore_bench.methods.base import TrainSettings
from galore_bench.models import ZOO, build_model

HIDDEN = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _grads(model: torch.nn.Module, step: int) -> None:
    generator = torch.Generator().manual_seed(step)
    ids = torch.randint(0, ZOO["tiny"].vocab_size, (2, 16), generator=generator)
    model.zero_grad(set_to_none=True)
    model(input_ids=ids, labels=ids, use_cache=False).loss.backward()


def test_muon_method_equals_torch_muon_on_hidden_matrices_and_adamw_on_the_rest():
    torch.set_num_threads(1)
    method = REGISTRY["muon"]
    opts = {name: option.default for name, option in method.all_options().items()}
    opts.update(lr=0.02, adamw_lr=3e-3, weight_decay=0.01, impl="for-loop")
    ours = build_model(ZOO["tiny"], "fp32", "cpu", seed=0)
    reference = copy.deepcopy(ours)
    trainer = method.build(ours, opts, TrainSettings())
    hidden = [p for n, p in reference.named_parameters() if any(h in n for h in HIDDEN)]
    rest = [p for n, p in reference.named_parameters() if not any(h in n for h in HIDDEN)]
    assert all(p.ndim == 2 for p in hidden) and {p.ndim for p in rest} == {1, 2}  # embeddings, head, norms
    muon = torch.optim.Muon(hidden, lr=0.02, weight_decay=0.01, momentum=0.95, nesterov=True)
    adamw = torch.optim.AdamW(rest, lr=3e-3, weight_decay=0.01, foreach=False)
    for step in range(3):
        _grads(ours, step)
        trainer.update(step)
        _grads(reference, step)
        muon.step()
        adamw.step()
    for (name, mine), theirs in zip(ours.named_parameters(), reference.parameters(), strict=True):
        assert torch.equal(mine, theirs), name
    assert not torch.equal(ours.model.layers[0].self_attn.q_proj.weight,
                           build_model(ZOO["tiny"], "fp32", "cpu", seed=0).model.layers[0].self_attn.q_proj.weight)
    states = list(trainer.state_tensors())  # one momentum buffer per hidden matrix; AdamW's m, v, step for the rest
    assert len(states) == len(hidden) + 3 * len(rest)
    assert trainer.info["muon_tensors"] == len(hidden) and trainer.info["adamw_tensors"] == len(rest)


def test_an_lr_scheduler_drives_both_optimizers():
    method = REGISTRY["muon"]
    opts = {name: option.default for name, option in method.all_options().items()}
    opts.update(lr=0.02, adamw_lr=3e-3)
    trainer = method.build(build_model(ZOO["tiny"], "fp32", "cpu", seed=0), opts, TrainSettings())
    scheduler = torch.optim.lr_scheduler.LambdaLR(trainer.optimizer, lambda step: 0.5)
    muon, adamw = trainer.optimizer.optimizers
    assert muon.param_groups[0]["lr"] == 0.01 and adamw.param_groups[0]["lr"] == 1.5e-3
    scheduler.step()
