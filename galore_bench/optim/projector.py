"""GaLore's projector: one weight's low-rank basis, refreshed from its gradient, and the two projections.

Kept apart from the optimizers (galore.py) so the refresh (full SVD, or the randomized range finder) can be
read, timed and tested on its own.
"""
from __future__ import annotations

import math

import torch
from torch._subclasses.fake_tensor import is_fake

from galore_bench.optim.range_finder import top_left_singular_vectors

__all__ = ["PROJ_TYPES", "SVD_KINDS", "SVD_OVERSAMPLE", "SVD_POWER_ITERS", "GaLoreProjector"]

PROJ_TYPES = ("std", "reverse_std", "left", "right")
SVD_KINDS = ("full", "randomized")  # how a refresh finds its basis; full is the paper's (and galore-torch's)
SVD_OVERSAMPLE = 8  # randomized refresh: sketch width rank + 8 (reports/cpu-measure/galore_refresh.md)
SVD_POWER_ITERS = 2  # randomized refresh: power iterations that sharpen the sketch


class GaLoreProjector:
    """Holds one weight's projection basis and refreshes it from an SVD every `update_proj_gap` steps.

    'std' projects away the larger dimension: for a rows >= cols gradient G the basis Q (r x cols) holds
    right singular vectors and the low-rank gradient is G Q^T; otherwise P (rows x r) holds left singular
    vectors and it is P^T G. The SVD runs in fp32; the basis is kept in the gradient's dtype.
    `svd="randomized"` finds the basis with a randomized range finder (range_finder.py) instead of the full
    SVD: cheaper at large shapes, close to but not the paper's exact basis.
    """

    def __init__(self, rank: int, update_proj_gap: int = 200, scale: float = 0.25, proj_type: str = "std",
                 svd: str = "full", svd_oversample: int = SVD_OVERSAMPLE,
                 svd_power_iters: int = SVD_POWER_ITERS, seed: int = 0):
        if rank < 1 or update_proj_gap < 1:
            raise ValueError(f"rank and update_proj_gap must be >= 1, got {rank} and {update_proj_gap}")
        if proj_type not in PROJ_TYPES:
            raise ValueError(f"proj_type must be one of {PROJ_TYPES}, got {proj_type!r}")
        if svd not in SVD_KINDS:
            raise ValueError(f"svd must be one of {SVD_KINDS}, got {svd!r}")
        if svd_oversample < 0 or svd_power_iters < 0:
            raise ValueError(f"svd_oversample and svd_power_iters must be >= 0, got {svd_oversample} and "
                             f"{svd_power_iters}")
        self.rank = rank
        self.update_proj_gap = update_proj_gap
        self.scale = scale
        # scaling by a power of two is exact in binary floating point: add_back folds it into the add
        self.exact_scale = scale > 0.0 and math.frexp(scale)[0] == 0.5
        self.proj_type = proj_type
        self.svd = svd
        self.svd_oversample = svd_oversample
        self.svd_power_iters = svd_power_iters
        self.seed = seed
        self.side: str | None = None  # 'left' (P^T G) or 'right' (G Q^T), fixed at each refresh
        self.ortho_matrix: torch.Tensor | None = None
        self._generator: torch.Generator | None = None

    def _pick_side(self, grad: torch.Tensor) -> str:
        if self.proj_type in ("left", "right"):
            return self.proj_type
        tall = grad.shape[0] >= grad.shape[1]
        return ("right" if tall else "left") if self.proj_type == "std" else ("left" if tall else "right")

    def _sketch_generator(self, matrix: torch.Tensor) -> torch.Generator | None:
        """The projector's own random stream (fake tensors: none, their values are never read)."""
        if is_fake(matrix):
            return None
        if self._generator is None:
            self._generator = torch.Generator(device=matrix.device).manual_seed(self.seed)
        return self._generator

    def _basis(self, grad: torch.Tensor) -> torch.Tensor:
        """Top-`rank` singular vectors of `grad` (fp32), in the gradient's dtype."""
        matrix = grad if grad.dtype == torch.float32 else grad.float()
        if self.svd == "randomized":
            oriented = matrix.T if self.side == "right" else matrix  # right vectors of G: left ones of G^T
            left = top_left_singular_vectors(oriented, self.rank, self.svd_oversample, self.svd_power_iters,
                                             self._sketch_generator(matrix))
            return (left.T if self.side == "right" else left).to(grad.dtype).contiguous()
        u, _, vh = torch.linalg.svd(matrix, full_matrices=False)
        basis = vh[: self.rank, :] if self.side == "right" else u[:, : self.rank]
        # A contiguous copy, so the basis does not keep the whole U / Vh factor alive.
        return basis.contiguous() if basis.dtype == grad.dtype else basis.to(grad.dtype)

    def project(self, grad: torch.Tensor, step: int) -> torch.Tensor:
        """Low-rank gradient; the basis is recomputed at steps 0, T, 2T, ... (moments are not rotated)."""
        basis = self.ortho_matrix
        if basis is None or step % self.update_proj_gap == 0:
            if grad.dim() != 2:
                raise ValueError(f"GaLore projects 2-D weights only, got shape {tuple(grad.shape)}")
            self.side = self._pick_side(grad)
            basis = self.ortho_matrix = self._basis(grad)
        if self.side == "right":
            return torch.mm(grad, basis.t())
        return torch.mm(basis.t(), grad)

    def _lifted(self, low_rank: torch.Tensor, caller: str) -> torch.Tensor:
        """P N (or N P): the low-rank update in the full weight shape, unscaled, in the basis' dtype."""
        basis = self.ortho_matrix
        if basis is None:
            raise RuntimeError(f"{caller}() called before project()")
        if low_rank.dtype != basis.dtype:
            low_rank = low_rank.to(basis.dtype)
        return torch.mm(low_rank, basis) if self.side == "right" else torch.mm(basis, low_rank)

    def project_back(self, low_rank: torch.Tensor) -> torch.Tensor:
        """Lift a low-rank update to the full weight shape, multiplied by `scale` (alpha in the paper).

        The update is cast to the basis' dtype first (8-bit states update an fp32 low-rank buffer).
        """
        return self._lifted(low_rank, "project_back") * self.scale

    def add_back(self, weight: torch.Tensor, low_rank: torch.Tensor, alpha: float) -> None:
        """weight += alpha * project_back(low_rank), in place, with one full-size temporary instead of two.

        galore-torch rounds P N to the weight's dtype, multiplies by `scale` into a second full-size tensor and
        adds that. When `scale` is a power of two, scaling a binary float is exact (the exponent moves; the
        mantissa stays), so scale * round(P N) == round(P N) * scale and alpha * scale can go into the add's
        multiplier instead: the same float product is added, the result is galore-torch's bit for bit (only a
        product under the smallest normal float, 1e-38, could round differently). Any other scale multiplies
        P N in place, which is the same kernel on the same values as galore-torch's out-of-place multiply.
        `low_rank` is cast to the basis' dtype first (8-bit states update a buffer in the weight's dtype).
        """
        full = self._lifted(low_rank, "add_back")
        if self.exact_scale:
            weight.add_(full, alpha=alpha * self.scale)
        else:
            weight.add_(full.mul_(self.scale), alpha=alpha)
