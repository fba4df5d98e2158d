"""Jaderberg et al. 2014 scheme 1: M separable basis filters shared by every input channel.

Every 2-D slice W[n, c] ≈ Σ_m a[n, c, m] · v_m h_mᵀ. Read as a tensor, that is a rank-M CP of the
3-way (N·C, kh, kw) kernel, with each basis filter s_m = v_m h_mᵀ rank 1 by construction.

The fit follows the paper and then finishes it exactly:
1. Jaderberg's alternating minimisation of ‖X − A S‖² + λ Σ_m ‖s_m‖_* (X: the N·C filters as
   rows): A by least squares, S by proximal-gradient steps whose prox is singular-value
   soft-thresholding of each d×d basis filter, with λ raised step by step so the filters are
   pushed towards rank 1 from the unconstrained optimum (the top right singular vectors of X).
2. Snap each s_m to its best rank-1 approximation, then alternate exactly over (A, v, h) — the
   rank-1-constrained problem — with damped least-squares steps until the fit stops improving.
At M = kh·kw the basis {e_i e_jᵀ} is exact, and is used.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class BasisFilters:
    coeffs: torch.Tensor  # (N, C, M)
    vertical: torch.Tensor  # (M, kh)
    horizontal: torch.Tensor  # (M, kw)
    rel_error: float
    iterations: int

    def to_tensor(self) -> torch.Tensor:
        return torch.einsum("ncm,mi,mj->ncij", self.coeffs, self.vertical, self.horizontal)


def _rank1(s: torch.Tensor, kh: int, kw: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-1 factors of each row of ``s`` seen as a kh×kw matrix."""
    u, sv, vh = torch.linalg.svd(s.reshape(-1, kh, kw))
    root = sv[:, 0].sqrt()
    return u[:, :, 0] * root[:, None], vh[:, 0, :] * root[:, None]


def _canonical(x: torch.Tensor, n: int, c: int, kh: int, kw: int, m: int, dtype) -> BasisFilters:
    eye_h, eye_w = torch.eye(kh, dtype=x.dtype), torch.eye(kw, dtype=x.dtype)
    v = eye_h.repeat_interleave(kw, 0)[:m]
    h = eye_w.repeat(kh, 1)[:m]
    coeffs = x.reshape(n, c, kh * kw)[:, :, :m]
    return BasisFilters(coeffs.to(dtype), v.to(dtype), h.to(dtype), 0.0, 0)


def basis_filters(
    weight: torch.Tensor,
    m: int,
    *,
    nuclear_steps: int = 30,
    nuclear_weight: float = 0.5,
    n_iter: int = 300,
    tol: float = 1e-7,
) -> BasisFilters:
    """Scheme-1 factors of a conv kernel (N, C, kh, kw) with ``m`` rank-1 basis filters."""
    if weight.ndim != 4:
        raise ValueError(f"basis_filters expects a conv kernel (N, C, kh, kw), got shape {tuple(weight.shape)}")
    n, c, kh, kw = weight.shape
    if not 1 <= m <= kh * kw:
        raise ValueError(f"the number of basis filters must be in [1, {kh * kw}] for a {kh}×{kw} kernel, got {m}")
    x = weight.detach().double().reshape(n * c, kh * kw)
    if m == kh * kw:
        return _canonical(x, n, c, kh, kw, m, weight.dtype)
    norm2 = float((x**2).sum())
    if norm2 == 0.0:
        z = torch.zeros
        return BasisFilters(
            z(n, c, m, dtype=weight.dtype), z(m, kh, dtype=weight.dtype), z(m, kw, dtype=weight.dtype), 0.0, 0
        )
    eye = torch.eye(m, dtype=x.dtype)

    def solve_a(s: torch.Tensor) -> torch.Tensor:
        # lstsq, not the normal equations: thresholding may zero a whole basis filter.
        return torch.linalg.lstsq(s.T, x.T, driver="gelsd").solution.T

    # Phase 1: Jaderberg's nuclear-norm-penalised alternation, from the unconstrained optimum.
    # Right singular vectors from the small kh·kw Gram (never the N·C-sized U); eigh gives all kh·kw
    # of them, so there are m rows even when N·C < m.
    evals, evecs = torch.linalg.eigh(x.T @ x)
    sv0, vh0 = evals.flip(0).clamp_min(0).sqrt(), evecs.flip(1).T
    scale = torch.cat([sv0, sv0.new_full((max(0, m - sv0.numel()),), float(sv0[-1]) * 1e-3 + 1e-12)])[:m]
    s = vh0[:m] * scale[:, None]
    # The threshold ramps up to a fraction of the typical second singular value of a basis filter:
    # enough to make the tail vanish by the end, gradual enough for A to follow.
    second = torch.linalg.svdvals(s.reshape(m, kh, kw))[:, 1] if min(kh, kw) > 1 else torch.zeros(m)
    tau_max = nuclear_weight * float(second.median())
    for step in range(nuclear_steps):
        a = solve_a(s)
        gram = a.T @ a
        lip = float(torch.linalg.matrix_norm(gram, 2)) or 1.0
        s = s - (gram @ s - a.T @ x) / lip
        u, sv, vh = torch.linalg.svd(s.reshape(m, kh, kw), full_matrices=False)
        sv = (sv - tau_max * (step + 1) / nuclear_steps).clamp_min(0)
        s = ((u * sv[:, None, :]) @ vh).reshape(m, kh * kw)

    # Phase 2: snap to rank 1, then exact damped alternation over (A, v, h). It also runs from the
    # plain rank-1 snap of the unconstrained optimum, and the better fit is kept: the penalty can
    # steer into a poor basin (e.g. zero a filter that a planted basis needs).
    t = x.reshape(n * c, kh, kw)
    gen = torch.Generator().manual_seed(0)

    def sweep(a, v, h, lam):
        vv, hh = v @ v.T, h @ h.T
        g = vv * hh
        mu = lam * float(g.diagonal().mean())
        sm = (v[:, :, None] * h[:, None, :]).reshape(m, -1)
        a = torch.linalg.solve(g + mu * eye, (x @ sm.T + mu * a).T).T
        w = torch.einsum("pm,pij->mij", a, t)  # Aᵀ·T, shared by the v and h updates
        ga = a.T @ a
        g = ga * hh
        mu = lam * float(g.diagonal().mean())
        v = torch.linalg.solve(g + mu * eye, torch.einsum("mij,mj->mi", w, h) + mu * v)
        g = ga * (v @ v.T)
        mu = lam * float(g.diagonal().mean())
        mh = torch.einsum("mij,mi->mj", w, v)
        h = torch.linalg.solve(g + mu * eye, mh + mu * h)
        inner = float((mh * h).sum())
        model2 = float((g * (h @ h.T)).sum())
        return a, v, h, math.sqrt(max(norm2 - 2 * inner + model2, 0.0) / norm2)

    def alternate(start: torch.Tensor):
        v, h = _rank1(start, kh, kw)
        dead = (v.norm(dim=1) * h.norm(dim=1)) < 1e-12 * float(v.norm() * h.norm() + 1e-300)
        if dead.any():  # a filter thresholded away restarts from a random rank-1 filter
            v[dead] = torch.randn(int(dead.sum()), kh, generator=gen, dtype=x.dtype)
            h[dead] = torch.randn(int(dead.sum()), kw, generator=gen, dtype=x.dtype)
        a = solve_a((v[:, :, None] * h[:, None, :]).reshape(m, -1))
        err = float(torch.linalg.vector_norm(x - a @ (v[:, :, None] * h[:, None, :]).reshape(m, -1)))
        err /= math.sqrt(norm2)
        lam, iters = 1e-4, 0
        for _ in range(n_iter):
            iters += 1
            a2, v2, h2, new_err = sweep(a, v, h, lam)
            if not math.isfinite(new_err) or new_err > err * (1 + 1e-12):
                lam *= 10.0
                if lam > 1e6:
                    break
                continue
            change, err = err - new_err, new_err
            a, v, h = a2, v2, h2
            lam = max(lam / 3.0, 1e-10)
            if change < tol * max(err, 1e-12):
                break
        return a, v, h, err, iters

    fits = [alternate(s), alternate(vh0[:m] * scale[:, None])] if nuclear_steps else [alternate(s)]
    a, v, h, err, _ = min(fits, key=lambda f: f[3])
    iters = sum(f[4] for f in fits)
    # Balance the scale: unit basis filters, coefficients carry the magnitude.
    nv, nh = v.norm(dim=1).clamp_min(1e-300), h.norm(dim=1).clamp_min(1e-300)
    v, h, a = v / nv[:, None], h / nh[:, None], a * (nv * nh)[None, :]
    dt = weight.dtype
    return BasisFilters(a.reshape(n, c, m).to(dt), v.to(dt), h.to(dt), err, iters)
