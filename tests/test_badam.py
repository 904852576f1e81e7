"""Our BAdam against the `badam` package 1.4's BlockOptimizer (the authors' code, on CPU as the oracle)."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
from test_galore_optim import tiny_llama

from galore_bench.optim.badam import BlockAdam, decoder_blocks

HYPER = {"lr": 1e-2, "weight_decay": 0.01, "betas": (0.9, 0.999), "eps": 1e-8}



def oracle(model: torch.nn.Module, every: int, mode: str, **include: bool):
    from badam import BlockOptimizer

    base = torch.optim.AdamW(model.parameters(), **HYPER, foreach=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # it warns about fp32 weights
        return BlockOptimizer(base, list(model.named_parameters()), switch_block_every=every, switch_mode=mode,
                              verbose=0, **include)


@pytest.mark.parametrize(("mode", "include"), [("ascending", False), ("descending", False), ("ascending", True)],
                         ids=["ascending", "descending", "ascending-with-embedding-and-head"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_weights_equal_the_badam_package_across_block_switches(dtype, mode, include):
    """Six steps, switch_every 2: blocks switch after steps 1, 3 and 5 (the package's schedule): bit-identical.
    With the embedding and head blocks: embedding, layer 0, layer 1, then norm and LM head."""
    ours_model = tiny_llama(dtype)
    ref_model = copy.deepcopy(ours_model)
    start = {n: p.detach().clone() for n, p in ours_model.named_parameters()}
    flags = {"include_embedding": include, "include_lm_head": include}
    ours = BlockAdam(ours_model, lambda params: torch.optim.AdamW(params, **HYPER, foreach=False), lr=HYPER["lr"],
                     switch_every=2, switch_mode=mode, **flags)
    ref = oracle(ref_model, 2, mode, **flags)
    torch.manual_seed(1)
    for _ in range(6):
        mask = [p.requires_grad for p in ours_model.parameters()]
        assert mask == [p.requires_grad for p in ref_model.parameters()]  # the same block is active
        ids = torch.randint(0, 128, (2, 16))
        ours_model(input_ids=ids, labels=ids).loss.backward()
        for p, q in zip(ours_model.parameters(), ref_model.parameters()):
            q.grad = None if p.grad is None else p.grad.clone()
        ours.step()
        ref.step()
    assert ours.visited == ([0, 1, 2, 3] if include else [0, 1, 0, 1] if mode == "ascending" else [1, 0, 1, 0])
    for (name, p), q in zip(ours_model.named_parameters(), ref_model.parameters()):
        assert torch.equal(p, q), f"{name}: {(p.float() - q.float()).abs().max().item()} from the badam package"
        assert torch.equal(p, start[name]) == ("layers" not in name and not include), name  # the rest never moves


def test_only_the_active_block_has_gradients_and_states():
    model = tiny_llama(torch.bfloat16)
    opt = BlockAdam(model, lambda params: torch.optim.AdamW(params, foreach=False), lr=1e-3, switch_every=3)
    ids = torch.randint(0, 128, (2, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    active = decoder_blocks(model)[0]
    with_grad = [p for p in model.parameters() if p.grad is not None]
    assert {id(p) for p in with_grad} == {id(p) for p in active}
    opt.step()
    states = list(opt.state_tensors())
    block = sum(p.numel() for p in active)
    assert sum(t.numel() for t in states) == 3 * block + len(active)  # masters, m, v (fp32) and a step each
    assert all(t.dtype == torch.float32 for t in states)
    old = [id(t) for t in states]
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()  # the switch comes after the 2nd step, then after every 3rd: the old masters and states are gone
    assert opt.active_block == 1 and not set(old) & {id(t) for t in opt.state_tensors()}
    assert [p.requires_grad for p in model.parameters()] == [any(p is q for q in decoder_blocks(model)[1])
                                                             for p in model.parameters()]


def test_random_order_visits_every_block_once_per_round():
    model = tiny_llama(torch.float32)
    opt = BlockAdam(model, lambda params: torch.optim.SGD(params), lr=1e-3, switch_every=1, switch_mode="random",
                    seed=3)
    for _ in range(4):
        opt.switch()
    assert sorted(opt.visited[:2]) == sorted(opt.visited[2:4]) == [0, 1]


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="switch_mode one of"):
        BlockAdam(tiny_llama(torch.float32), torch.optim.SGD, lr=1e-3, switch_mode="fixed")
    with pytest.raises(ValueError, match="start_block must lie in"):
        BlockAdam(tiny_llama(torch.float32), torch.optim.SGD, lr=1e-3, start_block=2)
