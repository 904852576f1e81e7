"""Group-wise absmax quantization for Q-GaLore: INT8 weights (stochastic rounding) and packed INT4 projectors.

A tensor is cut, in memory order, into groups of `group_size` values; each group keeps one fp32 scale
(its largest magnitude / the largest code) and integer codes. INT8 codes lie in [-127, 127], one int8 each;
INT4 codes lie in [-7, 7], stored with an offset of 8 as two 4-bit halves of one uint8 (high half first), so
a projector costs half a byte per value plus its scales. Stochastic rounding (floor(x + u), u ~ U[0, 1))
makes the rounded code equal to x in expectation: small updates survive re-quantization on average
instead of being rounded away (Q-GaLore, arXiv 2407.08296, Sec. 3.3).
"""
from __future__ import annotations

import torch

__all__ = ["INT4_MAX", "INT8_MAX", "dequantize", "pack_int4", "quantize", "unpack_int4"]

INT8_MAX = 127
INT4_MAX = 7


def _groups(values: torch.Tensor, group_size: int) -> torch.Tensor:
    if values.numel() % group_size:
        raise ValueError(f"{values.numel()} values are not whole groups of {group_size}")
    return values.reshape(-1, group_size)


def quantize(values: torch.Tensor, group_size: int, max_code: int,
             noise: torch.Generator | None = None, stochastic: bool = False,
             in_place: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 codes shaped like `values`, fp32 scale per group). Nearest rounding, or stochastic rounding with
    uniform noise from `noise` (None: the global generator). `values` is only read, unless `in_place` (fp32
    values the caller no longer needs: the scaled codes are then computed in their memory, one copy fewer)."""
    grouped = _groups(values, group_size)
    scales = grouped.abs().amax(dim=1, keepdim=True).float().div_(max_code).clamp_(min=torch.finfo(torch.float32).tiny)
    in_place = in_place and values.dtype == torch.float32
    scaled = grouped.div_(scales) if in_place else torch.div(grouped, scales)  # codes-to-be, |x| <= max_code
    if stochastic:
        scaled.add_(torch.rand(scaled.shape, generator=noise, device=scaled.device)).floor_()
    else:
        scaled.round_()
    codes = scaled.clamp_(-max_code, max_code).to(torch.int8)
    return codes.reshape(values.shape), scales.reshape(-1)


def dequantize(codes: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """codes x their group's scale, in `dtype` (the group size is codes.numel() // scales.numel())."""
    grouped = codes.reshape(scales.numel(), -1).to(dtype)
    return grouped.mul_(scales.to(dtype).unsqueeze(1)).reshape(codes.shape)


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """int8 codes in [-7, 7] -> uint8, two per byte (an even count of values)."""
    shifted = (codes.reshape(-1, 2) + 8).to(torch.uint8)
    return shifted[:, 0].mul(16).add_(shifted[:, 1])


def unpack_int4(packed: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Inverse of pack_int4."""
    high, low = packed.div(16, rounding_mode="floor"), packed.remainder(16)
    return torch.stack([high, low], dim=1).to(torch.int8).sub_(8).reshape(shape)
