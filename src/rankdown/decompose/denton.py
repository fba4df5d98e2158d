"""Denton et al. 2014: monochromatic and biclustered approximations of a conv kernel.

Both cluster with *balanced* k-means (every cluster the same size), as the paper does, so that the
result runs as a regular grouped convolution.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def balanced_kmeans(points: torch.Tensor, k: int, *, n_iter: int = 30, seed: int = 0, n_init: int = 8) -> torch.Tensor:
    """Labels in [0, k) with exactly len(points) / k points per cluster: the best (least
    within-cluster sum of squares) of ``n_init`` seeded restarts, as k-means needs, since one start
    can end in a poor local optimum.

    Lloyd's iterations whose assignment step is a greedy balanced matching: all (point, centre)
    pairs by increasing distance, a pair taken while its point is free and its centre not full.
    Written here: scikit-learn's KMeans does not balance, and a full min-cost matching is more
    than a few hundred filters need.
    """
    n = points.shape[0]
    if k < 1 or n % k:
        raise ValueError(f"cannot split {n} items into {k} equal clusters")
    x = points.detach().double().reshape(n, -1)
    best, best_cost = None, float("inf")
    for start in range(max(1, n_init) if k > 1 else 1):
        labels = _balanced_lloyd(x, k, n_iter, torch.Generator().manual_seed(seed + 1000 * start))
        centres = torch.stack([x[labels == c].mean(0) for c in range(k)])
        cost = float(((x - centres[labels]) ** 2).sum())
        if cost < best_cost - 1e-12 * max(cost, 1.0):
            best, best_cost = labels, cost
    assert best is not None
    return best


def _balanced_lloyd(x: torch.Tensor, k: int, n_iter: int, g: torch.Generator) -> torch.Tensor:
    n = x.shape[0]
    size = n // k
    centres = x[torch.randperm(n, generator=g)[:k]].clone()
    labels = torch.full((n,), -1, dtype=torch.long)
    for _ in range(n_iter):
        dist = torch.cdist(x, centres) ** 2
        order = torch.argsort(dist.flatten(), stable=True)
        new = torch.full((n,), -1, dtype=torch.long)
        fill = torch.zeros(k, dtype=torch.long)
        free = n
        for flat in order.tolist():
            i, c = divmod(flat, k)
            if new[i] < 0 and fill[c] < size:
                new[i] = c
                fill[c] += 1
                free -= 1
                if free == 0:
                    break
        if torch.equal(new, labels):
            break
        labels = new
        centres = torch.stack([x[labels == c].mean(0) for c in range(k)])
    return labels


def cluster_order(labels: torch.Tensor) -> torch.Tensor:
    """The permutation that makes each cluster contiguous (cluster 0 first, stable inside)."""
    return torch.argsort(labels, stable=True)


@dataclass(frozen=True)
class Monochromatic:
    colours: torch.Tensor  # (C', C): one colour vector per cluster
    spatial: torch.Tensor  # (F, X, Y): each filter's spatial kernel, in cluster order
    order: torch.Tensor  # (F,): original filter index at each clustered position
    rel_error: float

    def to_tensor(self) -> torch.Tensor:
        f = self.spatial.shape[0]
        k = self.colours.shape[0]
        cluster = torch.arange(f) // (f // k)
        w = torch.einsum("fc,fxy->fcxy", self.colours[cluster], self.spatial)
        out = torch.empty_like(w)
        out[self.order] = w
        return out


def monochromatic(weight: torch.Tensor, n_colours: int, *, seed: int = 0) -> Monochromatic:
    """Each filter's colour part reduced to rank 1, its colour vector snapped to one of
    ``n_colours`` shared colours (balanced clusters), spatial kernels refitted by least squares."""
    f, c, kx, ky = weight.shape
    w = weight.detach().double()
    u = torch.linalg.svd(w.reshape(f, c, kx * ky), full_matrices=False).U
    colour = u[:, :, 0]  # (F, C) unit colour vectors; the sign is arbitrary, so cluster ±c together
    colour = colour * torch.sign(colour[:, :1] + (colour[:, :1] == 0).double())
    labels = balanced_kmeans(colour, n_colours, seed=seed)
    order = cluster_order(labels)
    centres = torch.stack([colour[labels == k].mean(0) for k in range(n_colours)])
    centres = centres / centres.norm(dim=1, keepdim=True).clamp_min(1e-300)
    mine = centres[labels]  # (F, C)
    spatial = torch.einsum("fc,fcp->fp", mine, w.reshape(f, c, -1)).reshape(f, kx, ky)  # LS: unit colours
    approx = torch.einsum("fc,fxy->fcxy", mine, spatial)
    err = float(torch.linalg.vector_norm(approx - w) / torch.linalg.vector_norm(w).clamp_min(1e-300))
    dt = weight.dtype
    return Monochromatic(centres.to(dt), spatial[order].to(dt), order, err)


@dataclass(frozen=True)
class Biclustered:
    in_order: torch.Tensor  # (C,): input channels, grouped (G groups of C/G)
    out_order: torch.Tensor  # (F,): output filters, grouped (H groups of F/H)
    first: torch.Tensor  # (G, H, K, C/G, X, Y): the k×k factor of each (g, h) block
    second: torch.Tensor  # (H, F/H, G, K): the 1×1 factor of each block
    rel_error: float

    def to_tensor(self) -> torch.Tensor:
        g, h, _, cg, kx, ky = self.first.shape
        fh = self.second.shape[1]
        block = torch.einsum("hfgk,ghkcxy->hfgcxy", self.second, self.first).reshape(h * fh, g * cg, kx, ky)
        out = torch.empty_like(block)
        out[self.out_order[:, None], self.in_order[None, :]] = block
        return out


def biclustered(weight: torch.Tensor, groups_in: int, groups_out: int, rank: int, *, seed: int = 0) -> Biclustered:
    """Cluster input channels into ``groups_in`` and filters into ``groups_out`` (balanced k-means
    on the kernel's unfoldings), then a rank-``rank`` SVD of each of the G·H sub-kernels."""
    f, c, kx, ky = weight.shape
    w = weight.detach().double()
    fh, cg = f // groups_out, c // groups_in
    if rank > min(fh, cg * kx * ky):
        raise ValueError(f"rank {rank} exceeds the sub-kernel size ({fh} × {cg * kx * ky})")
    out_order = cluster_order(balanced_kmeans(w.reshape(f, -1), groups_out, seed=seed))
    in_order = cluster_order(balanced_kmeans(w.transpose(0, 1).reshape(c, -1), groups_in, seed=seed))
    wp = w[out_order][:, in_order].reshape(groups_out, fh, groups_in, cg, kx, ky)
    first = torch.zeros(groups_in, groups_out, rank, cg, kx, ky, dtype=torch.float64)
    second = torch.zeros(groups_out, fh, groups_in, rank, dtype=torch.float64)
    from rankdown.decompose.svd import truncated_svd

    for hi in range(groups_out):
        for gi in range(groups_in):
            a, b = truncated_svd(wp[hi, :, gi].reshape(fh, -1), rank)  # (fh, K), (K, cg·X·Y)
            second[hi, :, gi] = a
            first[gi, hi] = b.reshape(rank, cg, kx, ky)
    result = Biclustered(in_order, out_order, first, second, 0.0)
    err = float(torch.linalg.vector_norm(result.to_tensor() - w) / torch.linalg.vector_norm(w).clamp_min(1e-300))
    dt = weight.dtype
    return Biclustered(in_order, out_order, first.to(dt), second.to(dt), err)


@dataclass(frozen=True)
class BiclusteredCP:
    """Biclustering with an outer-product (CP) approximation of each block: block (g, h) ≈
    Σ_k γ_ghk ⊗ α_ghk ⊗ β_ghk (filters ⊗ input channels ⊗ spatial kernel)."""

    in_order: torch.Tensor  # (C,)
    out_order: torch.Tensor  # (F,)
    alpha: torch.Tensor  # (G, H, K, C/G): input-channel weights
    beta: torch.Tensor  # (G, H, K, X, Y): spatial kernels
    gamma: torch.Tensor  # (G, H, K, F/H): filter weights
    rel_error: float

    def to_tensor(self) -> torch.Tensor:
        g, h, _, cg = self.alpha.shape
        fh, (kx, ky) = self.gamma.shape[-1], self.beta.shape[-2:]
        block = torch.einsum("ghkf,ghkc,ghkxy->hfgcxy", self.gamma, self.alpha, self.beta)
        block = block.reshape(h * fh, g * cg, kx, ky)
        out = torch.empty_like(block)
        out[self.out_order[:, None], self.in_order[None, :]] = block
        return out


def _cp3(t: torch.Tensor, rank: int, n_iter: int, refine: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rank-``rank`` CP of a 3-way tensor (f, c, p): Denton's greedy rank-1 terms (alternating least
    squares for each, then deflation), refined by joint ALS sweeps. Exact by construction when the
    rank reaches c·p (one term per (channel, tap) pair). Returns factors (f×K, c×K, p×K)."""
    f, c, p = t.shape
    if not bool(t.any()):  # an all-zero block (a pruned or dead block): zero terms, exactly
        return tuple(torch.zeros(d, rank, dtype=t.dtype) for d in (f, c, p))  # type: ignore[return-value]
    if rank >= c * p:  # the trivial exact CP: unit vectors over (c, p), the filters' weights in γ
        eye = torch.eye(c * p, dtype=t.dtype)
        gam = torch.zeros(f, rank, dtype=t.dtype)
        gam[:, : c * p] = t.reshape(f, c * p)
        alp = torch.zeros(c, rank, dtype=t.dtype)
        bet = torch.zeros(p, rank, dtype=t.dtype)
        alp[:, : c * p] = eye.reshape(c, p, c * p).sum(1)
        bet[:, : c * p] = eye.reshape(c, p, c * p).sum(0)
        return gam, alp, bet
    resid = t.clone()
    gs, as_, bs = [], [], []
    for _ in range(rank):
        u, s, vh = torch.linalg.svd(resid.reshape(f, c * p), full_matrices=False)  # start: leading SVD term
        gv = u[:, 0] * s[0]
        cp_ = vh[0].reshape(c, p)
        uc, _, vc = torch.linalg.svd(cp_, full_matrices=False)
        av, bv = uc[:, 0], vc[0] * float(torch.linalg.matrix_norm(cp_, 2))
        flat = resid.reshape(f * c, p)
        for _ in range(n_iter):  # two GEMVs per sweep: T·β is shared by the γ and α updates
            tb = (flat @ bv).reshape(f, c)
            gv = tb @ av / ((av @ av) * (bv @ bv)).clamp_min(1e-300)
            av = tb.T @ gv / ((gv @ gv) * (bv @ bv)).clamp_min(1e-300)
            bv = torch.outer(gv, av).reshape(-1) @ flat / ((gv @ gv) * (av @ av)).clamp_min(1e-300)
        resid = resid - torch.einsum("f,c,p->fcp", gv, av, bv)
        gs.append(gv)
        as_.append(av)
        bs.append(bv)
    gam, alp, bet = torch.stack(gs, 1), torch.stack(as_, 1), torch.stack(bs, 1)
    best = (float(torch.linalg.vector_norm(resid)), gam, alp, bet)
    eye = torch.eye(rank, dtype=t.dtype)
    norm = float(torch.linalg.vector_norm(t)) or 1.0
    last = best[0]
    for sweep in range(refine):  # joint ALS from the greedy start (lightly damped)
        if sweep % 10 == 9:  # stop once ten sweeps gain less than 1e-10 of the norm
            err = float(torch.linalg.vector_norm(t - torch.einsum("fk,ck,pk->fcp", gam, alp, bet)))
            if last - err < 1e-10 * norm:
                break
            last = err
        for mode in range(3):
            fac = [gam, alp, bet]
            others = [fac[i] for i in range(3) if i != mode]
            v = (others[0].T @ others[0]) * (others[1].T @ others[1])
            spec = ["fcp,ck,pk->fk", "fcp,fk,pk->ck", "fcp,fk,ck->pk"][mode]
            m = torch.einsum(spec, t, *others)
            mu = 1e-6 * float(v.diagonal().mean()) or 1.0  # all terms zero: the step leaves them so
            fac[mode] = torch.linalg.solve(v + mu * eye, (m + mu * fac[mode]).T).T  # proximal: no bias
            gam, alp, bet = fac
    err = float(torch.linalg.vector_norm(t - torch.einsum("fk,ck,pk->fcp", gam, alp, bet)))
    if err < best[0]:
        best = (err, gam, alp, bet)
    gam, alp, bet = best[1:]
    # equal norms across the three factors of each term: the product is unchanged, and gradient
    # fine-tuning is not slowed by one factor orders of magnitude larger than another
    norms = torch.stack([gam.norm(dim=0), alp.norm(dim=0), bet.norm(dim=0)])
    target = norms.clamp_min(1e-300).log().mean(0).exp()
    gam, alp, bet = (fac * (target / n.clamp_min(1e-300)) for fac, n in zip((gam, alp, bet), norms, strict=True))
    return gam, alp, bet


def biclustered_cp(
    weight: torch.Tensor,
    groups_in: int,
    groups_out: int,
    rank: int,
    *,
    n_iter: int = 32,
    refine: int = 100,
    seed: int = 0,
) -> BiclusteredCP:
    """Balanced biclustering as :func:`biclustered`, then a rank-``rank`` outer-product
    decomposition of each block (Denton 2014's ``rankoneconv``: greedy rank-1 terms by alternating
    sweeps — 64 in their code, 32 here, which fits as well once the joint ALS has run), refined by
    joint ALS."""
    f, c, kx, ky = weight.shape
    w = weight.detach().double()
    fh, cg = f // groups_out, c // groups_in
    out_order = cluster_order(balanced_kmeans(w.reshape(f, -1), groups_out, seed=seed))
    in_order = cluster_order(balanced_kmeans(w.transpose(0, 1).reshape(c, -1), groups_in, seed=seed))
    wp = w[out_order][:, in_order].reshape(groups_out, fh, groups_in, cg, kx * ky)
    alpha = torch.zeros(groups_in, groups_out, rank, cg, dtype=torch.float64)
    beta = torch.zeros(groups_in, groups_out, rank, kx * ky, dtype=torch.float64)
    gamma = torch.zeros(groups_in, groups_out, rank, fh, dtype=torch.float64)
    for hi in range(groups_out):
        for gi in range(groups_in):
            gm, al, be = _cp3(wp[hi, :, gi], rank, n_iter, refine)
            gamma[gi, hi], alpha[gi, hi], beta[gi, hi] = gm.T, al.T, be.T
    beta = beta.reshape(groups_in, groups_out, rank, kx, ky)
    result = BiclusteredCP(in_order, out_order, alpha, beta, gamma, 0.0)
    err = float(torch.linalg.vector_norm(result.to_tensor() - w) / torch.linalg.vector_norm(w).clamp_min(1e-300))
    dt = weight.dtype
    return BiclusteredCP(in_order, out_order, alpha.to(dt), beta.to(dt), gamma.to(dt), err)
