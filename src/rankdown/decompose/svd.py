"""Truncated SVD and spectrum helpers."""

from __future__ import annotations

import torch


def _work_dtype(t: torch.Tensor) -> torch.dtype:
    # float64 for accuracy; complex and integer weights are not layer weights we handle.
    if not t.is_floating_point():
        raise TypeError(f"expected a floating-point tensor, got {t.dtype}")
    return torch.float64


def truncated_svd(matrix: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-``rank`` factors ``A @ B ≈ matrix`` (Eckart–Young), singular values split evenly.

    The even split sqrt(S) on both sides keeps the two layers' weights on the same scale, which
    matters for fine-tuning afterwards and for low-precision inference.
    """
    if matrix.ndim != 2:
        raise ValueError(f"truncated_svd expects a matrix, got shape {tuple(matrix.shape)}")
    full = min(matrix.shape)
    if not 1 <= rank <= full:
        raise ValueError(f"rank must be in [1, {full}] for a {tuple(matrix.shape)} matrix, got {rank}")
    m = matrix.detach().to(_work_dtype(matrix))
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    root = s[:rank].sqrt()
    a = u[:, :rank] * root
    b = root[:, None] * vh[:rank]
    return a.to(matrix.dtype), b.to(matrix.dtype)


def singular_values(matrix: torch.Tensor) -> torch.Tensor:
    return torch.linalg.svdvals(matrix.detach().to(_work_dtype(matrix)))


def energy_rank(singular: torch.Tensor, energy: float) -> int:
    """Smallest rank whose squared singular values keep at least ``energy`` of the total."""
    if not 0.0 < energy <= 1.0:
        raise ValueError(f"energy must be in (0, 1], got {energy}")
    power = singular.double() ** 2
    total = float(power.sum())
    if total == 0.0:
        return 1
    kept = torch.cumsum(power, 0) / total
    # A small tolerance so that energy=1.0 does not demand rounding noise in the tail.
    return int(torch.searchsorted(kept, torch.tensor(energy - 1e-12, dtype=kept.dtype)).item()) + 1
