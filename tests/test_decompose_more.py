"""CP, EVBMF, tensor-train and randomized SVD: planted structure recovered, known optima, bounds."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from rankdown.decompose import cp, evbmf, factorize_dim, randomized_svd, truncated_svd, tt_full_ranks, tt_matrix
from rankdown.layers import TTLinear
from rankdown.methods import get_method


def rel(a, b):
    a, b = a.detach(), b.detach()
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


def planted_cp(shape, rank, seed=0):
    g = torch.Generator().manual_seed(seed)
    fs = [torch.randn(d, rank, generator=g, dtype=torch.float64) for d in shape]
    return torch.einsum("tr,sr,ir,jr->tsij", *fs)


@pytest.mark.parametrize("shape, rank", [((16, 12, 3, 3), 5), ((8, 8, 1, 1), 3), ((20, 6, 5, 3), 7)])
def test_cp_recovers_planted_rank(shape, rank):
    x = planted_cp(shape, rank)
    f = cp(x, rank)
    assert f.converged and not f.degenerate
    assert rel(f.to_tensor(), x) < 1e-6
    assert torch.all(f.weights[:-1] >= f.weights[1:])  # sorted, unit-norm factors
    assert all(torch.allclose(u.norm(dim=0), torch.ones(rank, dtype=torch.float64)) for u in f.factors)


def test_cp_reports_its_fit_and_is_deterministic():
    x = torch.randn(10, 8, 3, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    f1, f2 = cp(x, 6), cp(x, 6)
    assert f1.rel_error == pytest.approx(rel(f1.to_tensor(), x), abs=1e-6)
    assert torch.equal(f1.weights, f2.weights)
    assert cp(x, 12).rel_error < f1.rel_error


def test_cp_detects_degenerate_fit():
    """A rank-4 tensor of border rank 2: the best rank-2 CP does not exist, and ALS drives two
    components to grow and cancel. That must be flagged, never passed on as a good fit."""
    g = torch.Generator().manual_seed(1)

    def unit(n):
        v = torch.randn(n, generator=g, dtype=torch.float64)
        return v / v.norm()

    a, b = [unit(6) for _ in range(4)], [unit(6) for _ in range(4)]
    x = sum(torch.einsum("i,j,k,l->ijkl", *[b[k] if k == m else a[k] for k in range(4)]) for m in range(4))
    f = cp(x, 2, n_iter=2000)
    assert f.degenerate and f.min_congruence < -0.8


def test_cp_method_keeps_degenerate_layer_dense(monkeypatch):
    import rankdown.methods as methods
    from rankdown.decompose.cp import CPFactors

    def fake(w, r, **kw):
        z = torch.zeros(w.shape[0], r)
        return CPFactors(torch.ones(r), (z, z, z, z), 5, 0.1, False, True, -0.99)

    monkeypatch.setattr(methods.decompose, "cp", fake)
    fact = get_method("cp", nn.Conv2d).factorize(nn.Conv2d(4, 4, 3), 2)
    assert fact.module is None and "degenerated" in fact.failure


def test_evbmf_recovers_planted_rank_in_noise():
    g = torch.Generator().manual_seed(0)
    for rank, (m, n) in ((5, (60, 80)), (12, (100, 150)), (3, (200, 40))):
        signal = torch.randn(m, rank, generator=g, dtype=torch.float64) @ torch.randn(
            rank, n, generator=g, dtype=torch.float64
        )
        noise = 0.1 * torch.randn(m, n, generator=g, dtype=torch.float64)
        res = evbmf(signal + noise)
        assert res.rank == rank
        assert res.sigma2 == pytest.approx(0.01, rel=0.2)
        assert torch.all(res.shrunk < torch.linalg.svdvals(signal + noise)[:rank])  # shrinkage


def test_evbmf_pure_noise_gives_rank_zero():
    res = evbmf(torch.randn(50, 70, generator=torch.Generator().manual_seed(2), dtype=torch.float64))
    assert res.rank == 0


def test_factorize_dim():
    assert factorize_dim(3136, 3) == (16, 14, 14)
    assert math.prod(factorize_dim(256, 4)) == 256 and factorize_dim(256, 4) == (4, 4, 4, 4)
    assert factorize_dim(7, 3) == (7, 1, 1)
    with pytest.raises(ValueError):
        factorize_dim(0, 2)


@settings(max_examples=20, deadline=None)
@given(out_modes=st.lists(st.integers(1, 4), min_size=2, max_size=4), seed=st.integers(0, 10**6), data=st.data())
def test_tt_exact_at_full_rank(out_modes, seed, data):
    in_modes = data.draw(st.lists(st.integers(1, 4), min_size=len(out_modes), max_size=len(out_modes)))
    m, n = math.prod(out_modes), math.prod(in_modes)
    w = torch.randn(m, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    tt = tt_matrix(w, tuple(out_modes), tuple(in_modes), max(tt_full_ranks(tuple(out_modes), tuple(in_modes))))
    assert rel(tt.to_matrix(), w) < 1e-10


def test_tt_linear_matches_dense_and_full_rank():
    torch.manual_seed(0)
    lin = nn.Linear(24, 12).double()
    x = torch.randn(2, 5, 24, dtype=torch.float64)
    h = get_method("tt", nn.Linear)
    full = h.factorize(lin, h.max_rank(lin))
    assert isinstance(full.module, TTLinear) and full.rel_error < 1e-10
    assert rel(full.module(x), lin(x)) < 1e-10
    low = h.factorize(lin, 2).module
    assert rel(low(x), F.linear(x, low.reconstruct_weight(), lin.bias)) < 1e-10
    assert low.ranks[0] == 1 and max(low.ranks) <= 2


def test_randomized_svd_bound_and_accuracy():
    g = torch.Generator().manual_seed(0)
    m, n, k, p = 300, 200, 10, 10
    u = torch.linalg.qr(torch.randn(m, n, generator=g, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64)).Q
    s = torch.logspace(0, -3, n, dtype=torch.float64)  # a decaying spectrum
    a = (u * s) @ v.T
    tail = float(s[k:].pow(2).sum().sqrt())
    # Halko et al. Thm 10.5 (no power iteration): E||A - QQ^T A||_F <= sqrt(1 + k/(p-1)) * tail.
    errs = []
    for seed in range(20):
        gs = torch.Generator().manual_seed(seed)
        q = torch.linalg.qr(a @ torch.randn(n, k + p, generator=gs, dtype=torch.float64)).Q
        errs.append(float(torch.linalg.norm(a - q @ (q.T @ a))))
    assert sum(errs) / len(errs) <= math.sqrt(1 + k / (p - 1)) * tail
    # The rank-k result with two power iterations is within 1% of the optimum.
    ur, sr, vhr = randomized_svd(a, k, oversample=p, n_iter=2, generator=torch.Generator().manual_seed(0))
    assert float(torch.linalg.norm(a - (ur * sr) @ vhr)) <= 1.01 * tail
    assert torch.allclose(sr, s[:k], rtol=1e-2)


def test_truncated_svd_auto_is_exact_unless_the_switch_is_set(monkeypatch):
    import rankdown.decompose.svd as svd

    calls = []
    real = svd.randomized_svd
    monkeypatch.setattr(svd, "randomized_svd", lambda *a, **k: calls.append(1) or real(*a, **k))
    w = torch.randn(600, 700, generator=torch.Generator().manual_seed(0))
    truncated_svd(w, 32)
    assert not calls  # off by default: slower than the exact SVD wherever it was measured
    monkeypatch.setattr(svd, "RANDOMIZED_MIN_DIM", 512)
    truncated_svd(w, 32)
    assert calls
    calls.clear()
    truncated_svd(w, 400)
    truncated_svd(torch.randn(100, 100), 5)
    assert not calls


def test_separable_closed_form_beats_any_factorization_of_that_rank():
    from rankdown.decompose import separable

    g = torch.Generator().manual_seed(0)
    w = torch.randn(12, 8, 3, 3, generator=g, dtype=torch.float64)
    v, h = separable(w, 5)
    best = rel(torch.einsum("kci,nkj->ncij", v[..., 0], h[:, :, 0, :]), w)
    for seed in range(20):  # random factorizations, and a few least-squares refinements of them
        gs = torch.Generator().manual_seed(seed)
        vr = torch.randn(5, 8, 3, generator=gs, dtype=torch.float64)
        hr = torch.randn(12, 5, 3, generator=gs, dtype=torch.float64)
        # Refine the horizontal half by least squares: still never better than the closed form.
        m = w.permute(1, 2, 0, 3).reshape(24, 36)
        b = torch.linalg.lstsq(vr.reshape(5, 24).T, m).solution
        hr = b.reshape(5, 12, 3).permute(1, 0, 2)
        assert rel(torch.einsum("kci,nkj->ncij", vr, hr), w) >= best - 1e-12
