"""Denton et al. 2014: monochromatic and biclustered approximations of a conv kernel.

Both cluster with *balanced* k-means (every cluster the same size), as the paper does, so that the
result runs as a regular grouped convolution.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def balanced_kmeans(points: torch.Tensor, k: int, *, n_iter: int = 30, seed: int = 0) -> torch.Tensor:
    """Labels in [0, k) with exactly len(points) / k points per cluster.

    Lloyd's iterations whose assignment step is a greedy balanced matching: all (point, centre)
    pairs by increasing distance, a pair taken while its point is free and its centre not full.
    Written here: scikit-learn's KMeans does not balance, and a full min-cost matching is more
    than a few hundred filters need.
    """
    n = points.shape[0]
    if k < 1 or n % k:
        raise ValueError(f"cannot split {n} items into {k} equal clusters")
    size = n // k
    x = points.detach().double().reshape(n, -1)
    g = torch.Generator().manual_seed(seed)
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
