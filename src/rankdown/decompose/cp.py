"""CP (CANDECOMP/PARAFAC) of a 4-way conv kernel (Lebedev et al. 2015), by damped ALS.

Plain ALS on CP is known to swamp and degenerate (two components growing without bound while
cancelling). Here:
- initialisation from the leading singular vectors of each unfolding (HOSVD), padded with seeded
  random columns where the rank exceeds a mode's size (the spatial modes);
- every factor update is a proximal (Levenberg–Marquardt-style) step
  A ← (MTTKRP + λ·A_old)(V + λI)⁻¹, with λ raised tenfold and the sweep undone when the error
  grows, and lowered after a successful sweep;
- stopping on the relative change of the fit; the fit and a degeneracy test are returned, so a
  caller never uses a degenerate fit unknowingly.

Written here rather than calling TensorLy's ``parafac``: the MTTKRP goes through one GEMM with the
first factor and small contractions for the rest (a dimension tree), instead of a Khatri–Rao
product the size of the whole kernel times R for each spatial mode. benchmarks/decompose_speed.py
measures both.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class CPFactors:
    weights: torch.Tensor  # (R,)
    factors: tuple[torch.Tensor, ...]  # mode n: (I_n, R), unit-norm columns
    iterations: int
    rel_error: float
    converged: bool
    degenerate: bool
    min_congruence: float  # most negative product of per-mode column cosines over pairs

    def to_tensor(self) -> torch.Tensor:
        a, b, c, d = self.factors
        return torch.einsum("r,tr,sr,ir,jr->tsij", self.weights, a, b, c, d)

    @property
    def rank(self) -> int:
        return int(self.weights.numel())


def _init(x: torch.Tensor, rank: int, generator: torch.Generator) -> list[torch.Tensor]:
    factors = []
    for mode in range(x.ndim):
        unfold = x.movedim(mode, 0).reshape(x.shape[mode], -1)
        u = torch.linalg.svd(unfold, full_matrices=False).U[:, :rank]
        if u.shape[1] < rank:
            extra = torch.randn(x.shape[mode], rank - u.shape[1], dtype=x.dtype, generator=generator)
            u = torch.cat([u, extra / math.sqrt(x.shape[mode])], 1)
        factors.append(u)
    # Put the scale into the first factor so the initial fit is least squares in it.
    return factors


def _congruence(factors: list[torch.Tensor]) -> float:
    rank = factors[0].shape[1]
    if rank < 2:
        return 1.0
    prod = torch.ones(rank, rank, dtype=torch.float64)
    for f in factors:
        f = f.double()
        n = f / f.norm(dim=0).clamp_min(1e-300)
        prod = prod * (n.T @ n)
    prod.fill_diagonal_(1.0)
    return float(prod.min())


def cp(
    tensor: torch.Tensor, rank: int, *, n_iter: int = 300, tol: float = 1e-6, damping: float = 1e-3, seed: int = 0
) -> CPFactors:
    """Rank-``rank`` CP of a 4-way tensor (N, C, kh, kw) by damped ALS, in the tensor's precision
    (at least float32; float64 tensors get float64 maths)."""
    if tensor.ndim != 4:
        raise ValueError(f"cp expects a 4-way tensor, got shape {tuple(tensor.shape)}")
    if rank < 1:
        raise ValueError(f"CP rank must be >= 1, got {rank}")
    work = torch.float64 if tensor.dtype == torch.float64 else torch.float32
    # Fitted at unit norm and rescaled at the end: damping and the float32 maths must not depend on
    # the weights' scale (a kernel times 1e-30 or 1e30 gets the same factors, scaled).
    scale = float(torch.linalg.vector_norm(tensor.detach().double()))
    if scale == 0.0:
        zeros = tuple(torch.zeros(d, rank, dtype=tensor.dtype) for d in tensor.shape)
        return CPFactors(torch.zeros(rank, dtype=tensor.dtype), zeros, 0, 0.0, True, False, 1.0)
    if not math.isfinite(scale):
        raise ValueError("cp: the tensor holds NaN or Inf")
    x = (tensor.detach().double() / scale).to(work)
    t, s, kh, kw = x.shape
    norm2 = float((x.double() ** 2).sum())
    g = torch.Generator().manual_seed(seed)
    a, b, c, d = _init(x, rank, g)
    x0 = x.reshape(t, -1)  # mode-0 unfolding, shared by both GEMMs of a sweep
    eye = torch.eye(rank, dtype=work)

    def sweep(a, b, c, d, lam):
        # Mode 0: MTTKRP through the Khatri-Rao product of (b, c, d): (s*kh*kw) x R, small.
        kr = (b[:, None, None, :] * c[None, :, None, :] * d[None, None, :, :]).reshape(-1, rank)
        v = (b.T @ b) * (c.T @ c) * (d.T @ d)
        mu = lam * float(v.diagonal().mean())
        a = torch.linalg.solve(v + mu * eye, (x0 @ kr + mu * a).T).T
        # Modes 1-3 from one contraction with the new a (dimension tree).
        w = (x0.T @ a).reshape(s, kh, kw, rank)
        ga = a.T @ a
        v = ga * (c.T @ c) * (d.T @ d)
        mu = lam * float(v.diagonal().mean())
        b = torch.linalg.solve(v + mu * eye, (torch.einsum("sijr,ir,jr->sr", w, c, d) + mu * b).T).T
        v = ga * (b.T @ b) * (d.T @ d)
        mu = lam * float(v.diagonal().mean())
        c = torch.linalg.solve(v + mu * eye, (torch.einsum("sijr,sr,jr->ir", w, b, d) + mu * c).T).T
        v = ga * (b.T @ b) * (c.T @ c)
        mu = lam * float(v.diagonal().mean())
        m3 = torch.einsum("sijr,sr,ir->jr", w, b, c)
        d = torch.linalg.solve(v + mu * eye, (m3 + mu * d).T).T
        inner = float((m3 * d).double().sum())
        model2 = float((v * (d.T @ d)).double().sum())
        err = math.sqrt(max(norm2 - 2 * inner + model2, 0.0) / norm2)
        return a, b, c, d, err

    lam, err, converged, sweeps = damping, math.inf, False, 0
    for _ in range(n_iter):
        sweeps += 1
        new = sweep(a, b, c, d, lam)
        new_err = new[4]
        if not math.isfinite(new_err) or new_err > err * (1 + 1e-12):
            lam *= 10.0  # reject: damp harder and retry from the same point
            if lam > 1e6:
                break
            continue
        a, b, c, d = new[:4]
        change = err - new_err
        err = new_err
        lam = max(lam / 3.0, 1e-9)
        if change < tol * max(err, 1e-12):
            converged = True
            break
    factors = [a, b, c, d]
    congr = _congruence(factors)
    norms = [f.norm(dim=0) for f in factors]
    weights = norms[0] * norms[1] * norms[2] * norms[3]
    unit = [f / n.clamp_min(torch.finfo(f.dtype).tiny) for f, n in zip(factors, norms, strict=True)]
    finite = all(bool(torch.isfinite(f).all()) for f in factors)
    # Two-factor degeneracy: nearly opposite components whose weights dwarf the tensor itself.
    degenerate = (not finite) or (congr < -0.8 and float(weights.max()) > 2 * math.sqrt(norm2))
    order = torch.argsort(weights, descending=True)
    dt = tensor.dtype
    return CPFactors(
        (weights[order].double() * scale).to(dt),
        tuple(u[:, order].to(dt) for u in unit),
        sweeps,
        err,
        converged,
        degenerate,
        congr,
    )
