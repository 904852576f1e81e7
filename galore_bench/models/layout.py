"""What the methods act on, read off the architecture: the 2-D projections of every decoder layer.

GaLore, LoRA and their kin act on the projection matrices of attention and MLP. Rather than list names per family,
the decoder layers of the built model are walked: every nn.Linear inside them is a projection (q/k/v/o, gate/up/down,
Phi-3's fused qkv_proj and gate_up_proj). MoE experts stored as one 3-D parameter per layer are no nn.Linear: a
method that acts on projections refuses them by name rather than leave them out unsaid.
"""
from __future__ import annotations

import re

import torch
from torch import nn

from galore_bench.errors import UserError

LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def _in_layer(name: str) -> re.Match[str] | None:
    return LAYER.search(name)


def _matches(name: str, suffixes: tuple[str, ...]) -> bool:
    return any(name == s or name.endswith("." + s) for s in suffixes)


def projections(model: nn.Module, target_modules: list[str] | tuple[str, ...] | None = None) -> list[str]:
    """Qualified names of the decoder layers' nn.Linear modules (all, or those whose name ends in a target)."""
    found = [name for name, module in model.named_modules() if isinstance(module, nn.Linear) and _in_layer(name)]
    return [n for n in found if _matches(n, tuple(target_modules))] if target_modules else found


def expert_parameters(model: nn.Module) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of the decoder layers' parameters with more than two dimensions (MoE experts)."""
    return [(n, tuple(p.shape)) for n, p in model.named_parameters() if p.ndim > 2 and _in_layer(n)]


def refuse_experts(model: nn.Module, method: str, target_modules: list[str] | tuple[str, ...] | None) -> None:
    """A projection method on a model with 3-D experts, without a target list that leaves them out: refused."""
    experts = expert_parameters(model)
    if experts and not target_modules:
        name, shape = experts[0]
        raise UserError(
            f"{method}: '{name}' (shape {'x'.join(map(str, shape))}) is a 3-D MoE expert parameter; {method} acts on "
            "2-D projections and has no per-expert mode here, and will not skip it silently. Set target_modules "
            "(e.g. [\"q_proj\", \"k_proj\", \"v_proj\", \"o_proj\"]) to project only those and train the experts "
            "with plain AdamW, or choose a method without projections (adamw, adam8bit, adafactor, lomo, sgd)")


def layer_projection_shapes(model: nn.Module, target_modules: list[str] | tuple[str, ...] | None = None
                            ) -> dict[str, tuple[int, int]]:
    """(out, in) of each projection of the first decoder layer, by its module name (q_proj, qkv_proj, ...)."""
    shapes = {}
    for name in projections(model, target_modules):
        match = _in_layer(name)
        if match is not None and match.group(1) == "0":
            weight = model.get_submodule(name).weight
            assert isinstance(weight, torch.Tensor)
            shapes[name.rsplit(".", 1)[-1]] = (int(weight.shape[0]), int(weight.shape[1]))
    return shapes


def short_name(name: str) -> str:
    """'model.layers.3.self_attn.q_proj.weight' -> '3.q_proj'; a bias keeps '.bias'; 'lm_head.weight' -> 'lm_head'."""
    name = name.removesuffix(".weight")
    match = _in_layer(name)
    if match is None:
        return name.rsplit(".", 1)[-1] if not name.endswith(".bias") else name
    rest = name[match.end():]
    parts = rest.split(".")
    keep = parts[-2:] if parts[-1] == "bias" else parts[-1:]
    return f"{match.group(1)}." + ".".join(keep)


def unknown_targets(model: nn.Module, target_modules: list[str]) -> list[str]:
    """The target suffixes that name no projection of the model."""
    names = projections(model)
    return [s for s in target_modules if not any(_matches(n, (s,)) for n in names)]


def meta_parameter_count(model: nn.Module) -> int:
    """Every parameter once (a tied head shares the embedding's tensor: named_parameters lists it once)."""
    return sum(p.numel() for p in model.parameters())


def is_meta(model: nn.Module) -> bool:
    return all(p.device == torch.device("meta") for p in model.parameters())
