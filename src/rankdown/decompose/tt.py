"""Tensor-train matrices (Novikov et al. 2015): a weight W (M × N), M = ∏ m_k and N = ∏ n_k, as
cores G_k of shape (r_{k-1}, m_k, n_k, r_k) with r_0 = r_d = 1, computed by TT-SVD.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def factorize_dim(n: int, d: int) -> tuple[int, ...]:
    """Split ``n`` into ``d`` factors as balanced as the prime factorisation allows (descending)."""
    if n < 1 or d < 1:
        raise ValueError(f"cannot split {n} into {d} factors")
    primes, k, m = [], 2, n
    while k * k <= m:
        while m % k == 0:
            primes.append(k)
            m //= k
        k += 1
    if m > 1:
        primes.append(m)
    parts = [1] * d
    for p in sorted(primes, reverse=True):  # largest prime to the smallest part
        parts[parts.index(min(parts))] *= p
    return tuple(sorted(parts, reverse=True))


@dataclass(frozen=True)
class TTMatrix:
    cores: tuple[torch.Tensor, ...]  # (r_{k-1}, m_k, n_k, r_k)
    out_modes: tuple[int, ...]
    in_modes: tuple[int, ...]

    @property
    def ranks(self) -> tuple[int, ...]:
        return (1, *(c.shape[3] for c in self.cores))

    def to_matrix(self) -> torch.Tensor:
        full = self.cores[0]  # (1, m1, n1, r1)
        for core in self.cores[1:]:
            full = torch.einsum("amnr,rpqs->ampnqs", full, core)
            a, m, p, n, q, s = full.shape
            full = full.reshape(a, m * p, n * q, s)
        return full[0, :, :, 0]


def tt_full_ranks(out_modes: tuple[int, ...], in_modes: tuple[int, ...]) -> tuple[int, ...]:
    """The TT ranks at which TT-SVD is exact: min of the two sides' sizes at each cut."""
    sizes = [m * n for m, n in zip(out_modes, in_modes, strict=True)]
    d = len(sizes)
    return tuple(min(math.prod(sizes[:k]), math.prod(sizes[k:])) for k in range(1, d))


def tt_matrix(weight: torch.Tensor, out_modes: tuple[int, ...], in_modes: tuple[int, ...], max_rank: int) -> TTMatrix:
    """TT-SVD of ``weight`` (M × N) with every inner TT rank at most ``max_rank`` (quasi-optimal:
    error <= sqrt(d-1) × best)."""
    m_total, n_total = weight.shape
    if math.prod(out_modes) != m_total or math.prod(in_modes) != n_total or len(out_modes) != len(in_modes):
        raise ValueError(f"modes {out_modes} x {in_modes} do not factor a {tuple(weight.shape)} matrix")
    if max_rank < 1:
        raise ValueError(f"TT rank must be >= 1, got {max_rank}")
    d = len(out_modes)
    w = weight.detach().to(torch.float64).reshape(*out_modes, *in_modes)
    # Interleave (m1, n1, m2, n2, ...) so each core owns one output and one input mode.
    perm = [i for k in range(d) for i in (k, d + k)]
    rest = w.permute(perm).reshape(1, -1)
    cores, r_prev = [], 1
    for k in range(d - 1):
        mat = rest.reshape(r_prev * out_modes[k] * in_modes[k], -1)
        u, s, vh = torch.linalg.svd(mat, full_matrices=False)
        r = min(max_rank, s.numel())
        cores.append(u[:, :r].reshape(r_prev, out_modes[k], in_modes[k], r))
        rest = s[:r, None] * vh[:r]
        r_prev = r
    cores.append(rest.reshape(r_prev, out_modes[-1], in_modes[-1], 1))
    dt = weight.dtype
    return TTMatrix(tuple(c.to(dt) for c in cores), tuple(out_modes), tuple(in_modes))
