"""A randomized range finder for GaLore's projector refresh (Halko, Martinsson, Tropp 2011, Alg. 4.4, 5.1).

The full SVD of an m x n gradient costs O(m n min(m, n)); GaLore keeps only r of its singular vectors.
Sketching the gradient with r + oversample random directions, sharpening the sketch with a few power
iterations and taking the SVD of the small projected matrix costs O(m n (r + oversample) (2 + 2 power_iters)).
"""

from __future__ import annotations

import torch

__all__ = ["top_left_singular_vectors"]


def _orthonormal_columns(matrix: torch.Tensor) -> torch.Tensor:
    """An orthonormal basis of `matrix`'s column space (reduced QR), so power iterations do not collapse."""
    return torch.linalg.qr(matrix).Q


def top_left_singular_vectors(
    matrix: torch.Tensor,
    rank: int,
    oversample: int,
    power_iters: int,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """An m x rank orthonormal basis close to the top-`rank` left singular vectors of `matrix` (m x n).

    Falls back to the exact SVD when the sketch would be as wide as the matrix (nothing to save).
    `generator` draws the sketch, so a refresh does not move the training's global random stream.
    """
    rows, cols = matrix.shape
    width = rank + oversample
    if width >= min(rows, cols):
        return torch.linalg.svd(matrix, full_matrices=False)[0][:, :rank]
    sketch = torch.randn(cols, width, generator=generator, dtype=matrix.dtype, device=matrix.device)
    basis = _orthonormal_columns(matrix @ sketch)
    for _ in range(power_iters):  # each pass multiplies the spectrum's decay: sigma_i -> sigma_i^3, ^5, ...
        basis = _orthonormal_columns(matrix @ _orthonormal_columns(matrix.T @ basis))
    small_left = torch.linalg.svd(basis.T @ matrix, full_matrices=False)[0]  # width x width
    return basis @ small_left[:, :rank]
