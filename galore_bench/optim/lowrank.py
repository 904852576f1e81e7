"""The "Low-Rank" baseline of GaLore Table 2: every target weight is factorised as W = B A and both
factors are trained from scratch (no frozen full-rank W, unlike LoRA/ReLoRA).

Initialisation (choose with ``init``):
- ``"random"`` (default, for pre-training from scratch): *balanced* Gaussian factors, each with std
  ``sqrt(init_std / sqrt(rank))`` so that ``Var((BA)_ij) = init_std**2`` matches the dense init of the
  model (``config.initializer_range``, 0.02 for LLaMA) and both factors get gradient at step 0
  (a zero B, as in LoRA, would make every projection output zero at the start).
- ``"svd"``: truncated SVD of the existing weight, ``B = U_r sqrt(S_r)``, ``A = sqrt(S_r) V_r^T``,
  the best rank-r approximation of a (pre-trained) model.
Both only use tensor ops (no ``.item()``), so they run unchanged on FakeTensorMode tensors.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

DEFAULT_TARGETS: tuple[str, ...] = (
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
)

InitKind = Literal["random", "svd"]


class LowRankLinear(nn.Module):
    """y = x A^T B^T (+ bias): a rank-r linear map whose factors A (r x in) and B (out x r) both train."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        bias: bool = False,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
        init_std: float | None = None,
        like: torch.Tensor | None = None,
    ) -> None:
        """``like``: allocate from this tensor (device, dtype, and fake-ness even outside the fake mode)."""
        super().__init__()
        if rank <= 0:
            raise ValueError(f"rank must be positive, got {rank}")
        self.in_features, self.out_features, self.rank = in_features, out_features, rank

        def alloc(*shape: int) -> torch.Tensor:
            if like is not None:
                return like.new_empty(shape)
            return torch.empty(*shape, device=device, dtype=dtype)

        self.A = nn.Parameter(alloc(rank, in_features))
        self.B = nn.Parameter(alloc(out_features, rank))
        self.bias = nn.Parameter(alloc(out_features)) if bias else None
        self.reset_parameters(init_std)

    @torch.no_grad()
    def reset_parameters(self, init_std: float | None = None) -> None:
        """Balanced random factors so that B A has std ``init_std`` (default: nn.Linear's ~1/sqrt(3 in))."""
        if init_std is None:
            init_std = 1.0 / math.sqrt(3.0 * self.in_features)
        factor_std = math.sqrt(init_std / math.sqrt(self.rank))
        nn.init.normal_(self.A, mean=0.0, std=factor_std)
        nn.init.normal_(self.B, mean=0.0, std=factor_std)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    @torch.no_grad()
    def init_from_svd(self, weight: torch.Tensor) -> None:
        """Best rank-r approximation of ``weight`` (out x in); square-root of S split over both factors."""
        r = self.rank
        if r > min(weight.shape):
            raise ValueError(f"svd init needs rank <= min{tuple(weight.shape)}, got {r}")
        U, S, Vh = torch.linalg.svd(weight.float(), full_matrices=False)
        root = S[:r].sqrt()
        self.B.copy_((U[:, :r] * root.unsqueeze(0)).to(self.B.dtype))
        self.A.copy_((root.unsqueeze(1) * Vh[:r, :]).to(self.A.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Two thin matmuls (never materialise the out x in product)."""
        return F.linear(F.linear(x, self.A), self.B, self.bias)

    def extra_repr(self) -> str:
        bias = self.bias is not None
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, bias={bias}"
        )


def _is_target(name: str, targets: Iterable[str]) -> bool:
    """peft-style matching: the module path is a target or ends in '.<target>' (a leaf name or a longer suffix)."""
    return any(name == t or name.endswith("." + t) for t in targets)


def apply_low_rank(
    model: nn.Module,
    rank: int,
    target_modules: Iterable[str] = DEFAULT_TARGETS,
    init: InitKind = "random",
    init_std: float | None = None,
) -> nn.Module:
    """Replace every target nn.Linear of ``model`` by a LowRankLinear, in place; returns ``model``.

    ``init_std`` defaults to ``model.config.initializer_range`` when present (HF models).
    Factors are allocated with ``weight.new_empty`` so they inherit device, dtype and fake-ness.
    The original dense weights are dropped (nothing full-rank stays in memory).
    """
    if init not in ("random", "svd"):
        raise ValueError(f"unknown init {init!r}")
    targets = tuple(target_modules)
    if init_std is None:
        init_std = getattr(getattr(model, "config", None), "initializer_range", None)
    found = [
        (name, mod)
        for name, mod in model.named_modules()
        if isinstance(mod, nn.Linear) and _is_target(name, targets)
    ]
    if not found:
        raise ValueError(f"no nn.Linear named one of {targets} in the model")
    for name, lin in found:
        new = _low_rank_like(lin, rank, init, init_std)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, new)
    return model


def _low_rank_like(lin: nn.Linear, rank: int, init: InitKind, init_std: float | None) -> LowRankLinear:
    """Build the factorised replacement of one Linear on the same device/dtype (or fake mode) as it."""
    new = LowRankLinear(
        lin.in_features, lin.out_features, rank, bias=lin.bias is not None, init_std=init_std, like=lin.weight
    )
    with torch.no_grad():
        if init == "svd":
            new.init_from_svd(lin.weight.detach())
        if lin.bias is not None and new.bias is not None:  # keep the original bias
            new.bias.copy_(lin.bias)
    return new
