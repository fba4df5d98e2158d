"""Denton 2014: monochromatic and biclustered convolutions, balanced clustering."""

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from rankdown.decompose import balanced_kmeans, monochromatic
from rankdown.errors import RankError
from rankdown.layers import BiclusterConv2d, BiclusterCPConv2d, MonochromaticConv2d
from rankdown.methods import get_method


def rel(a, b):
    a, b = a.detach(), b.detach()
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


def dense_with(conv, weight):
    ref = copy.deepcopy(conv)
    with torch.no_grad():
        ref.weight.copy_(weight)
    return ref


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 40), st.integers(1, 6), st.integers(0, 3))
def test_balanced_kmeans_really_balances(per_cluster, k, seed):
    points = torch.randn(per_cluster * k, 3, generator=torch.Generator().manual_seed(seed))
    points[: per_cluster * k // 2] += 5  # lopsided data: plain k-means would not balance it
    labels = balanced_kmeans(points, k, seed=seed)
    assert torch.bincount(labels, minlength=k).tolist() == [per_cluster] * k


def test_balanced_kmeans_finds_separated_equal_clusters():
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    points = torch.cat([c + 0.1 * torch.randn(8, 2, generator=g) for c in centres])
    labels = balanced_kmeans(points, 3)
    for i in range(3):
        assert len(set(labels[8 * i : 8 * (i + 1)].tolist())) == 1


def test_balanced_kmeans_rejects_uneven_split():
    with pytest.raises(ValueError, match="equal clusters"):
        balanced_kmeans(torch.randn(10, 2), 3)


geometry = st.tuples(
    st.sampled_from([1, 2, 4]),  # G
    st.sampled_from([1, 2, 3]),  # H
    st.sampled_from([(1, 1), (3, 3), (3, 1)]),
    st.sampled_from([1, 2]),  # stride
    st.sampled_from([0, 1]),  # padding
    st.sampled_from([1, 2]),  # dilation
)


@settings(max_examples=25, deadline=None)
@given(geometry)
def test_bicluster_exact_at_full_block_rank_and_equal_to_dense(geo):
    g, h, k, stride, padding, dilation = geo
    conv = nn.Conv2d(4 * g, 2 * h, k, stride, padding, dilation).double()
    method = get_method("bicluster", nn.Conv2d)
    full = min(2, 4 * k[0] * k[1])
    f = method.factorize(conv, (g, h, full))
    x = torch.randn(2, 4 * g, 9, 8, dtype=torch.float64)
    assert f.rel_error < 1e-10 and rel(f.module(x), conv(x)) < 1e-10
    low = method.factorize(conv, (g, h, 1)).module
    assert isinstance(low, BiclusterConv2d) and low.rank == (g, h, 1)
    # the permutations and groupings compute exactly the dense conv of the reconstructed weight
    assert rel(low(x), dense_with(conv, low.reconstruct_weight())(x)) < 1e-10


@settings(max_examples=20, deadline=None)
@given(geometry)
def test_bicluster_cp_exact_at_full_block_rank_and_equal_to_dense(geo):
    g, h, k, stride, padding, dilation = geo
    conv = nn.Conv2d(2 * g, 3 * h, k, stride, padding, dilation).double()
    method = get_method("bicluster-cp", nn.Conv2d)
    full = 2 * k[0] * k[1]
    assert method.max_rank(conv) == full or (g, h) != method._groups(conv)
    f = method.factorize(conv, (g, h, full))
    x = torch.randn(2, 2 * g, 9, 8, dtype=torch.float64)
    assert f.rel_error < 1e-10 and rel(f.module(x), conv(x)) < 1e-10
    low = method.factorize(conv, (g, h, 1)).module
    assert isinstance(low, BiclusterCPConv2d) and low.rank == (g, h, 1)
    assert rel(low(x), dense_with(conv, low.reconstruct_weight())(x)) < 1e-10


def test_bicluster_cp_recovers_a_planted_cp_and_improves_with_rank():
    from rankdown.decompose import biclustered_cp

    g = torch.Generator().manual_seed(0)
    gam, alp, bet = (torch.randn(n, 2, generator=g, dtype=torch.float64) for n in (6, 4, 9))
    w = torch.einsum("fk,ck,pk->fcp", gam, alp, bet).reshape(6, 4, 3, 3)  # a planted rank-2 CP
    assert biclustered_cp(w, 1, 1, 2).rel_error < 1e-6
    errs = [biclustered_cp(torch.randn(8, 8, 3, 3, generator=g), 2, 2, k).rel_error for k in (1, 3, 6)]
    assert errs[0] > errs[1] > errs[2]


def test_bicluster_rank_errors_name_the_limit():
    conv = nn.Conv2d(4, 4, 3)
    with pytest.raises(RankError, match="must be in"):
        get_method("bicluster", nn.Conv2d).factorize(conv, (2, 2, 3))


def test_monochromatic_recovers_planted_colours_and_matches_dense():
    g = torch.Generator().manual_seed(0)
    colours = torch.nn.functional.normalize(torch.randn(4, 3, generator=g, dtype=torch.float64), dim=1)
    which = torch.randperm(16, generator=g) % 4  # 4 filters per colour, shuffled
    spatial = torch.randn(16, 5, 5, generator=g, dtype=torch.float64)
    w = torch.einsum("fc,fxy->fcxy", colours[which], spatial)
    m = monochromatic(w, 4)
    assert m.rel_error < 1e-10 and rel(m.to_tensor(), w) < 1e-10
    conv = nn.Conv2d(3, 16, 5, stride=2, padding=2).double()
    with torch.no_grad():
        conv.weight.copy_(w)
    f = get_method("mono", nn.Conv2d).factorize(conv, 4)
    assert isinstance(f.module, MonochromaticConv2d)
    x = torch.randn(2, 3, 15, 15, dtype=torch.float64)
    assert rel(f.module(x), conv(x)) < 1e-10


def test_monochromatic_layer_equals_dense_with_its_weight_and_more_colours_help():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 12, 3, padding=1).double()
    method = get_method("mono", nn.Conv2d)
    errs = []
    for k in (1, 3, 12):
        f = method.factorize(conv, k)
        x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
        assert rel(f.module(x), dense_with(conv, f.module.reconstruct_weight())(x)) < 1e-10
        errs.append(f.rel_error)
    assert errs[0] >= errs[1] >= errs[2]
    with pytest.raises(RankError, match="divide"):
        method.rank_from_int(conv, 5)


# -- weighted metrics --------------------------------------------------------------------------

from rankdown.fitting.metrics import LayerMetric, collect, factorize_weighted  # noqa: E402


def _out_err(conv, approx_weight, x):
    ref = dense_with(conv, approx_weight)
    return float(torch.linalg.vector_norm(ref(x) - conv(x)).detach())


@pytest.mark.parametrize("method, rank", [("channel-svd", 3), ("tucker2", 3), ("separable", 3), ("basis", 3)])
def test_covariance_metric_reduces_output_error_on_channel_correlated_inputs(method, rank):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    conv = nn.Conv2d(8, 10, 3, padding=1).double()
    mix = torch.randn(8, 8, generator=g, dtype=torch.float64) * torch.logspace(0, -2, 8, dtype=torch.float64)
    x = torch.einsum("dc,bchw->bdhw", mix, torch.randn(64, 8, 10, 10, generator=g, dtype=torch.float64))
    handler = get_method(method, nn.Conv2d)
    stats = collect(nn.Sequential(conv), ["0"], x, "covariance")["0"]
    plain = handler.factorize(conv, handler.rank_from_int(conv, rank))
    weighted = factorize_weighted(handler, "0", conv, handler.rank_from_int(conv, rank), stats)
    assert _out_err(conv, weighted.module.reconstruct_weight().detach(), x) < _out_err(
        conv, plain.module.reconstruct_weight().detach(), x
    )
    assert weighted.rel_error >= plain.rel_error - 1e-9  # it trades weight error for output error


@pytest.mark.parametrize(
    "method, rank", [("svd", 3), ("tucker2", 3), ("cp", 4), ("separable", 2), ("bicluster", 2), ("bicluster-cp", 3)]
)
def test_mahalanobis_metric_reduces_the_weighted_error(method, rank):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    layer = nn.Linear(12, 10).double() if method == "svd" else nn.Conv2d(6, 8, 3).double()
    n, c = layer.weight.shape[:2]
    a_out = torch.rand(n, generator=g, dtype=torch.float64) ** 2 + 0.1
    a_in = torch.rand(c, generator=g, dtype=torch.float64) ** 2 + 0.1
    metric = LayerMetric(t_in=torch.diag(a_in), d_out=a_out)
    handler = get_method(method, type(layer))
    r = handler.rank_from_int(layer, rank)

    def werr(w):
        e = (w - layer.weight.detach()) * a_out.view(-1, *([1] * (w.ndim - 1)))
        return float(torch.linalg.vector_norm(e * a_in.view(1, -1, *([1] * (w.ndim - 2)))))

    plain = handler.factorize(layer, r).module.reconstruct_weight().detach()
    weighted = factorize_weighted(handler, "x", layer, r, metric).module.reconstruct_weight().detach()
    assert werr(weighted) < werr(plain)


def test_weighted_metrics_are_exact_at_full_rank():
    conv = nn.Conv2d(4, 6, 3, padding=1).double()
    x = torch.randn(16, 4, 8, 8, dtype=torch.float64)
    for metric in ("covariance", "mahalanobis"):
        model = nn.Sequential(conv, nn.Flatten(), nn.Linear(6 * 64, 5).double())
        stats = collect(model, ["0"], x, metric)["0"]
        for method in ("channel-svd", "tucker2", "separable"):
            h = get_method(method, nn.Conv2d)
            f = factorize_weighted(h, "0", conv, h.rank_from_int(conv, h.max_rank(conv)), stats)
            assert f.rel_error < 1e-6, (metric, method)


@pytest.mark.parametrize("metric", ["covariance", "mahalanobis"])
def test_cli_compress_with_a_weighted_metric(tmp_path, metric):
    import json

    from click.testing import CliRunner

    from rankdown.app.cli import main

    out = tmp_path / "m"
    args = ["compress", "--model", "nets:tiny_vgg", "--input-shape", "3,16,16", "--method", "tucker2", "--rank", "4"]
    args += [
        "--calib-data",
        "noise",
        "--metric",
        metric,
        "--calibration",
        "16",
        "--reconstruct",
        "filter",
        "--no-latency",
        "-q",
        "--out",
        str(out),
    ]
    res = CliRunner().invoke(main, args, catch_exceptions=False, standalone_mode=False)
    assert res.exit_code == 0, res.output
    plan = json.loads((out / "plan.json").read_text())
    assert plan["meta"]["metric"] == metric and "calibration" not in plan["meta"]
    rows = [r for r in json.loads((out / "report.json").read_text())["layers"] if r["method"]]
    assert rows and all("metric" in r["info"] for r in rows)


def test_mahalanobis_metric_for_bicluster_and_covariance_refused():
    g = torch.Generator().manual_seed(2)
    conv = nn.Conv2d(8, 6, 3).double()
    a_out = torch.rand(6, generator=g, dtype=torch.float64) ** 2 + 0.1
    a_in = torch.rand(8, generator=g, dtype=torch.float64) ** 2 + 0.1
    h = get_method("bicluster", nn.Conv2d)
    diag = LayerMetric(t_in=torch.diag(a_in), d_out=a_out)
    full = factorize_weighted(h, "c", conv, (2, 2, 3), diag)
    assert full.rel_error < 1e-10  # full block rank stays exact through the scaling and its undo

    def werr(w):
        e = (w - conv.weight.detach()) * a_out.view(-1, 1, 1, 1) * a_in.view(1, -1, 1, 1)
        return float(torch.linalg.vector_norm(e))

    plain = h.factorize(conv, (2, 2, 1)).module.reconstruct_weight().detach()
    weighted = factorize_weighted(h, "c", conv, (2, 2, 1), diag).module.reconstruct_weight().detach()
    assert werr(weighted) < werr(plain)
    from rankdown.errors import RankdownError

    with pytest.raises(RankdownError, match="diagonal"):
        factorize_weighted(h, "c", conv, (2, 2, 1), LayerMetric(t_in=torch.linalg.cholesky(torch.eye(8) + 0.5)))


@pytest.mark.parametrize("method", ["channel-svd", "tucker2", "separable"])
def test_balancing_keeps_the_function_and_equalises_factor_norms(method):
    from rankdown.layers import balance_factors

    conv = nn.Conv2d(6, 8, 3, padding=1).double()
    h = get_method(method, nn.Conv2d)
    layer = h.factorize(conv, h.rank_from_int(conv, 3)).module
    with torch.no_grad():  # unbalance it as a weighted fit would
        layer[0].weight.mul_(1e3)
        layer[1].weight.div_(1e3)
    x = torch.randn(2, 6, 7, 7, dtype=torch.float64)
    before = layer(x)
    assert balance_factors(layer) == len(layer) - 1
    assert rel(layer(x), before) < 1e-12
    w0, w1 = layer[-2].weight, layer[-1].weight  # the last pair balanced is exactly balanced
    n0, n1 = w0.reshape(w0.shape[0], -1).norm(dim=1), w1.transpose(0, 1).reshape(w1.shape[1], -1).norm(dim=1)
    assert torch.allclose(n0, n1)
    assert float(layer[0].weight.detach().norm()) < 1e2  # the 1e3 blow-up is gone


def test_bicluster_cp_balance_keeps_the_function():
    conv = nn.Conv2d(4, 6, 3, padding=1).double()
    layer = get_method("bicluster-cp", nn.Conv2d).factorize(conv, (2, 2, 3)).module
    with torch.no_grad():
        layer[1].weight.mul_(1e4)
        layer[4].weight.div_(1e4)
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    before = layer(x)
    from rankdown.layers import balance_factors

    balance_factors(layer)
    assert rel(layer(x), before) < 1e-12 and float(layer[1].weight.detach().abs().max()) < 1e2


def _randomize_bn(model):
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g, dtype=m.running_mean.dtype))
            m.running_var.copy_(torch.rand(m.num_features, generator=g, dtype=m.running_var.dtype) + 0.5)
            m.weight.data.copy_(torch.randn(m.num_features, generator=g, dtype=m.weight.dtype))
            m.bias.data.copy_(torch.randn(m.num_features, generator=g, dtype=m.bias.dtype))
    return model


def test_fold_permutations_is_exact_and_removes_the_gathers():
    from rankdown.deployment.deploy import fold_permutations
    from rankdown.layers import Permute

    torch.manual_seed(0)
    dense = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),  # monochromatic: ends with a gather into the BN/ReLU/conv after
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),  # bicluster: gathers at both ends
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),  # bicluster-cp right after: two gathers meet
        nn.MaxPool2d(2),
        nn.Conv2d(8, 4, 1),
    ).double()
    model = _randomize_bn(dense).eval()
    with torch.no_grad():
        model[0] = get_method("mono", nn.Conv2d).factorize(model[0], 2).module
        model[3] = get_method("bicluster", nn.Conv2d).factorize(model[3], (2, 2, 3)).module
        model[6] = get_method("bicluster-cp", nn.Conv2d).factorize(model[6], (2, 2, 4)).module
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    before = model(x)
    gathers = sum(isinstance(m, Permute) for m in model.modules())
    n = fold_permutations(model)
    assert n >= 3 and sum(isinstance(m, Permute) for m in model.modules()) == gathers - n
    assert torch.allclose(model(x), before, rtol=1e-12, atol=1e-12)
