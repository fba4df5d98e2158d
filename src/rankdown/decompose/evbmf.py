"""Empirical variational Bayesian matrix factorization (Nakajima et al., JMLR 2013): the global
analytic solution, used to pick ranks without a user threshold (Kim et al. 2016).

Written from the paper's closed form (steps in shared/design/papers.md §9). The noise variance is
found by a bounded 1-D search: a log-spaced scan then golden-section refinement, which avoids a
SciPy dependency for one scalar minimisation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class EVBMFResult:
    rank: int
    sigma2: float  # estimated noise variance
    threshold: float  # singular values above it are kept
    shrunk: torch.Tensor  # posterior singular values of the kept components


def _tau(x: torch.Tensor, alpha: float) -> torch.Tensor:
    d = x - (1 + alpha)
    return 0.5 * (d + torch.sqrt((d * d - 4 * alpha).clamp_min(0)))


def evbmf(y: torch.Tensor, sigma2: float | None = None, max_rank: int | None = None) -> EVBMFResult:
    """EVBMF of matrix ``y``: the estimated rank, noise variance and shrunk singular values."""
    if y.ndim != 2:
        raise ValueError(f"evbmf expects a matrix, got shape {tuple(y.shape)}")
    y = y.detach().to(torch.float64)
    if y.shape[0] > y.shape[1]:
        y = y.T
    L, M = y.shape
    H = L if max_rank is None else min(max_rank, L)
    s = torch.linalg.svdvals(y)
    total = float((y * y).sum())
    g = s[:H]
    residual = max(total - float((g * g).sum()), 0.0) if H < L else 0.0
    alpha = L / M
    tau_bar = 2.5129 * math.sqrt(alpha)
    x_bar = (1 + tau_bar) * (1 + alpha / tau_bar)
    if sigma2 is None:
        g2 = g * g

        def phi(s2: float) -> float:
            x = g2 / (M * s2)
            small = x <= x_bar
            val = float((x[small] - torch.log(x[small])).sum())
            xl = x[~small]
            if xl.numel():
                t = _tau(xl, alpha)
                val += float((xl - t + torch.log((t + 1) / xl) + alpha * torch.log(t / alpha + 1)).sum())
            return val + residual / (M * s2) + (L - H) * math.log(s2)

        upper = (total) / (L * M)
        e_bar = min(math.ceil(L / (1 + alpha)) - 1, H) - 1
        lower = float(g2[e_bar + 1] / (M * x_bar)) if e_bar + 1 < H else 0.0
        if e_bar + 1 < H:
            lower = max(lower, float(g2[e_bar + 1 :].mean() / M))
        lower = max(lower, upper * 1e-12, 1e-300)
        if lower >= upper:
            sigma2 = upper
        else:
            grid = torch.logspace(math.log10(lower), math.log10(upper), 64, dtype=torch.float64).tolist()
            vals = [phi(v) for v in grid]
            i = min(range(len(vals)), key=vals.__getitem__)
            a, b = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
            ratio = (math.sqrt(5) - 1) / 2
            for _ in range(60):  # golden section on [a, b]
                c, d = b - ratio * (b - a), a + ratio * (b - a)
                if phi(c) < phi(d):
                    b = d
                else:
                    a = c
            sigma2 = (a + b) / 2
    threshold = math.sqrt(M * sigma2 * (1 + tau_bar) * (1 + alpha / tau_bar))
    kept = g[g > threshold]
    k2 = kept * kept
    inner = 1 - (L + M) * sigma2 / k2
    shrunk = kept / 2 * (inner + torch.sqrt((inner * inner - 4 * L * M * sigma2**2 / (k2 * k2)).clamp_min(0)))
    return EVBMFResult(int(kept.numel()), float(sigma2), threshold, shrunk)
