"""Tucker-2 of a conv kernel: modes 0 (output channels) and 1 (input channels) compressed,
the spatial modes kept. HOSVD initialisation, then HOOI (higher-order orthogonal iteration).

Written here rather than calling TensorLy's ``partial_tucker``: the measured baseline in
shared/anchors/cpu_RESULTS.md shows it 4x slower than a closed-form HOSVD on the same layers,
and our HOOI reuses each mode's Gram matrix so an iteration is two small eigenproblems.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Tucker2Factors:
    core: torch.Tensor  # (r_out, r_in, kh, kw)
    u_out: torch.Tensor  # (N, r_out), orthonormal columns
    u_in: torch.Tensor  # (C, r_in), orthonormal columns
    iterations: int
    rel_error: float

    def to_tensor(self) -> torch.Tensor:
        return torch.einsum("abij,na,cb->ncij", self.core, self.u_out, self.u_in)


def _leading_eigvecs(gram: torch.Tensor, r: int) -> torch.Tensor:
    # eigh of the (small) Gram matrix: the left singular vectors of the unfolding, cheaper than its SVD.
    _, vecs = torch.linalg.eigh(gram)
    return vecs[:, -r:].flip(1)


def tucker2(weight: torch.Tensor, ranks: tuple[int, int], *, n_iter: int = 20, tol: float = 1e-6) -> Tucker2Factors:
    """Tucker-2 of a (N, C, kh, kw) kernel with ranks (r_out, r_in).

    HOOI stops when the relative error improves by less than ``tol``; at full rank the HOSVD is
    already exact and no iteration runs.
    """
    if weight.ndim != 4:
        raise ValueError(f"tucker2 expects a 4-way conv kernel, got shape {tuple(weight.shape)}")
    n, c, _, _ = weight.shape
    r_out, r_in = ranks
    if not (1 <= r_out <= n and 1 <= r_in <= c):
        raise ValueError(f"Tucker-2 ranks must be in [1, {n}] x [1, {c}] for kernel {tuple(weight.shape)}, got {ranks}")
    w = weight.detach().to(torch.float64)
    norm = float(torch.linalg.vector_norm(w)) or 1.0

    def unfold0(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(t.shape[0], -1)

    def unfold1(t: torch.Tensor) -> torch.Tensor:
        return t.transpose(0, 1).reshape(t.shape[1], -1)

    # HOSVD initialisation.
    u_out = _leading_eigvecs(unfold0(w) @ unfold0(w).T, r_out)
    u_in = _leading_eigvecs(unfold1(w) @ unfold1(w).T, r_in)
    core = torch.einsum("ncij,na,cb->abij", w, u_out, u_in)
    # ||W - G x U||^2 = ||W||^2 - ||G||^2 for orthonormal factors.
    err = max(norm**2 - float(torch.linalg.vector_norm(core)) ** 2, 0.0) ** 0.5 / norm
    iterations = 0
    if r_out < n or r_in < c:
        for _ in range(n_iter):
            iterations += 1
            y = torch.einsum("ncij,cb->nbij", w, u_in)
            u_out = _leading_eigvecs(unfold0(y) @ unfold0(y).T, r_out)
            z = torch.einsum("ncij,na->acij", w, u_out)
            u_in = _leading_eigvecs(unfold1(z) @ unfold1(z).T, r_in)
            core = torch.einsum("acij,cb->abij", z, u_in)
            new_err = max(norm**2 - float(torch.linalg.vector_norm(core)) ** 2, 0.0) ** 0.5 / norm
            done = err - new_err < tol * max(err, 1e-300)
            err = new_err
            if done:
                break
    dt = weight.dtype
    return Tucker2Factors(core.to(dt), u_out.to(dt), u_in.to(dt), iterations, err)
