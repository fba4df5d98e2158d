"""Decompositions against numpy / closed-form references, in float64."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rankdown.decompose import energy_rank, singular_values, truncated_svd, tucker2


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


def planted(shape, rank, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape[0], rank, generator=g, dtype=torch.float64) @ torch.randn(
        rank, shape[1], generator=g, dtype=torch.float64
    )


@settings(max_examples=30, deadline=None)
@given(m=st.integers(1, 40), n=st.integers(1, 40), seed=st.integers(0, 10**6))
def test_svd_full_rank_exact(m, n, seed):
    w = torch.randn(m, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    a, b = truncated_svd(w, min(m, n))
    assert a.dtype == torch.float64 and a.shape == (m, min(m, n)) and b.shape == (min(m, n), n)
    assert rel(a @ b, w) < 1e-10


@pytest.mark.parametrize("rank", [1, 3, 7])
def test_svd_error_is_eckart_young_optimum(rank):
    w = torch.randn(20, 30, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    a, b = truncated_svd(w, rank)
    s = np.linalg.svd(w.numpy(), compute_uv=False)
    assert float(torch.linalg.norm(w - a @ b)) == pytest.approx(np.sqrt((s[rank:] ** 2).sum()), rel=1e-10)
    # Singular values split evenly between the two factors.
    assert torch.allclose(a.norm(dim=0), b.norm(dim=1), rtol=1e-10)


def test_svd_recovers_planted_low_rank():
    w = planted((50, 40), 5)
    a, b = truncated_svd(w, 5)
    assert rel(a @ b, w) < 1e-10


def test_svd_keeps_dtype_and_rejects_bad_ranks():
    w = torch.randn(6, 4)
    a, b = truncated_svd(w, 2)
    assert a.dtype == b.dtype == torch.float32
    for bad in (0, -1, 5):
        with pytest.raises(ValueError, match="rank must be in"):
            truncated_svd(w, bad)
    with pytest.raises(ValueError, match="expects a matrix"):
        truncated_svd(torch.randn(2, 3, 4), 1)


def test_energy_rank():
    s = torch.tensor([3.0, 2.0, 1.0, 0.0])  # energies 9, 4, 1 of 14
    assert energy_rank(s, 9 / 14) == 1
    assert energy_rank(s, 9 / 14 + 1e-6) == 2
    assert energy_rank(s, 0.99) == 3
    assert energy_rank(s, 1.0) == 3  # a zero singular value is never needed
    with pytest.raises(ValueError):
        energy_rank(s, 0.0)
    assert torch.allclose(
        singular_values(torch.diag(torch.tensor([2.0, 5.0]))), torch.tensor([5.0, 2.0], dtype=torch.float64)
    )


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 12),
    c=st.integers(1, 12),
    k=st.sampled_from([(1, 1), (3, 3), (1, 3), (5, 2)]),
    seed=st.integers(0, 10**6),
)
def test_tucker2_full_rank_exact(n, c, k, seed):
    w = torch.randn(n, c, *k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    f = tucker2(w, (n, c))
    assert f.iterations == 0
    assert rel(f.to_tensor(), w) < 1e-10
    assert torch.allclose(f.u_out.T @ f.u_out, torch.eye(n, dtype=torch.float64), atol=1e-10)


def test_tucker2_recovers_planted_multilinear_rank():
    g = torch.Generator().manual_seed(3)
    core = torch.randn(4, 3, 3, 3, generator=g, dtype=torch.float64)
    u_out = torch.linalg.qr(torch.randn(16, 4, generator=g, dtype=torch.float64))[0]
    u_in = torch.linalg.qr(torch.randn(12, 3, generator=g, dtype=torch.float64))[0]
    w = torch.einsum("abij,na,cb->ncij", core, u_out, u_in)
    f = tucker2(w, (4, 3))
    assert rel(f.to_tensor(), w) < 1e-10
    assert f.rel_error < 1e-6


def test_hooi_never_worse_than_hosvd_and_error_is_reported():
    w = torch.randn(24, 20, 3, 3, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    hosvd = tucker2(w, (8, 6), n_iter=0)
    hooi = tucker2(w, (8, 6), n_iter=50)
    assert hooi.iterations >= 1
    assert rel(hooi.to_tensor(), w) <= rel(hosvd.to_tensor(), w) + 1e-12
    assert hooi.rel_error == pytest.approx(rel(hooi.to_tensor(), w), rel=1e-6)


def test_tucker2_rejects_bad_input():
    with pytest.raises(ValueError, match="ranks must be in"):
        tucker2(torch.randn(4, 3, 3, 3), (5, 1))
    with pytest.raises(ValueError, match="ranks must be in"):
        tucker2(torch.randn(4, 3, 3, 3), (1, 0))
    with pytest.raises(ValueError, match="4-way"):
        tucker2(torch.randn(4, 3), (1, 1))


def test_automatic_randomized_svd_matches_the_exact_truncation_error(monkeypatch):
    """A speed trick may never change the result: on slowly decaying spectra (where two power
    iterations are not enough) the automatic path's truncation error equals the exact one."""
    import rankdown.decompose.svd as svd
    from rankdown.decompose import truncated_svd
    from rankdown.decompose.svd import AUTO_TOL, converged_randomized_svd

    monkeypatch.setattr(svd, "RANDOMIZED_MIN_DIM", 512)  # off by default (slower where measured)

    g = torch.Generator().manual_seed(0)
    m, n, k = 520, 640, 40
    u = torch.linalg.qr(torch.randn(m, m, generator=g, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(n, m, generator=g, dtype=torch.float64)).Q
    for decay in (0.05, 0.3, 1.0):
        s = torch.arange(1, m + 1, dtype=torch.float64) ** -decay
        a = (u * s) @ v.T
        exact = float((s[k:] ** 2).sum().sqrt())
        fa, fb = truncated_svd(a.float(), k)  # automatic: randomized (520 >= 512, 40 <= 130)
        auto = float((a - (fa.double() @ fb.double())).norm())
        assert auto <= exact * (1 + 10 * AUTO_TOL) + 1e-4 * float(a.norm()), (decay, auto, exact)
        two = converged_randomized_svd(a, k, max_iter=2)
        assert two is None  # two iterations never count as converged: at least one check is made
