"""Jaderberg 2014: both schemes, data reconstruction, the character dataset and CharNet."""

import copy
import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from rankdown.decompose import basis_filters, separable, truncated_svd, whitened_truncated_svd
from rankdown.fitting.calibrate import CalibrationConfig, reconstruct
from rankdown.layers import BasisConv2d
from rankdown.methods import get_method


def rel(a, b):
    a, b = a.detach(), b.detach()
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


geometry = st.tuples(
    st.integers(1, 6),  # in channels
    st.integers(1, 7),  # out channels
    st.sampled_from([(1, 1), (3, 3), (3, 1), (2, 5), (5, 5)]),
    st.sampled_from([1, 2, (2, 1)]),  # stride
    st.sampled_from([0, 1, (2, 1)]),  # padding
    st.sampled_from([1, 2]),  # dilation
    st.sampled_from(["zeros", "reflect", "circular"]),
)


@settings(max_examples=40, deadline=None)
@given(geometry, st.booleans())
def test_scheme1_exact_at_full_rank_for_any_geometry(geo, bias):
    cin, cout, k, stride, padding, dilation, mode = geo
    if mode != "zeros" and padding == 0:
        mode = "zeros"
    conv = nn.Conv2d(cin, cout, k, stride, padding, dilation, bias=bias, padding_mode=mode).double()
    method = get_method("basis", nn.Conv2d)
    f = method.factorize(conv, method.max_rank(conv))
    x = torch.randn(2, cin, 13, 12, dtype=torch.float64)
    assert f.rel_error < 1e-5
    assert rel(f.module(x), conv(x)) < 1e-5


@settings(max_examples=25, deadline=None)
@given(geometry, st.integers(1, 4))
def test_scheme1_layer_equals_dense_conv_with_its_weight(geo, m):
    cin, cout, k, stride, padding, dilation, mode = geo
    if mode != "zeros" and padding == 0:
        mode = "zeros"
    conv = nn.Conv2d(cin, cout, k, stride, padding, dilation, padding_mode=mode).double()
    m = min(m, k[0] * k[1])
    layer = get_method("basis", nn.Conv2d).factorize(conv, m).module
    assert isinstance(layer, BasisConv2d) and layer.rank == m
    ref = copy.deepcopy(conv)
    with torch.no_grad():
        ref.weight.copy_(layer.reconstruct_weight())
    x = torch.randn(2, cin, 11, 10, dtype=torch.float64)
    assert rel(layer(x), ref(x)) < 1e-10


def test_scheme1_recovers_a_planted_separable_basis():
    g = torch.Generator().manual_seed(1)
    v, h = torch.randn(4, 5, generator=g, dtype=torch.float64), torch.randn(4, 5, generator=g, dtype=torch.float64)
    a = torch.randn(12, 8, 4, generator=g, dtype=torch.float64)
    w = torch.einsum("ncm,mi,mj->ncij", a, v, h)
    f = basis_filters(w, 4)
    assert f.rel_error < 1e-6 and rel(f.to_tensor(), w) < 1e-6
    # every basis filter is rank 1 by construction and has unit norm
    assert torch.allclose(f.vertical.norm(dim=1), torch.ones(4, dtype=torch.float64))


def test_scheme1_fit_improves_with_more_basis_filters():
    w = torch.randn(16, 6, 3, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    errors = [basis_filters(w, m).rel_error for m in (1, 3, 5, 7, 9)]
    assert all(a >= b - 1e-9 for a, b in itertools.pairwise(errors)) and errors[-1] < 1e-12


def test_scheme2_closed_form_beats_random_factorizations():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(8, 6, 3, 3, generator=g, dtype=torch.float64)
    n, c, kh, kw = w.shape
    k = 4
    v, h = separable(w, k)
    best = rel(torch.einsum("kci,nkj->ncij", v[..., 0], h[:, :, 0, :]), w)
    for _ in range(200):
        rv = torch.randn(k, c, kh, generator=g, dtype=torch.float64)
        # the optimal horizontal filters for these vertical ones (least squares): still worse
        basis = rv.reshape(k, c * kh)
        target = w.permute(1, 2, 0, 3).reshape(c * kh, n * kw)
        coef = torch.linalg.lstsq(basis.T, target).solution
        approx = (basis.T @ coef).reshape(c, kh, n, kw).permute(2, 0, 1, 3)
        assert rel(approx, w) >= best - 1e-12


def test_whitened_svd_minimises_the_weighted_error_and_is_exact_at_full_rank():
    g = torch.Generator().manual_seed(4)
    w = torch.randn(10, 8, generator=g, dtype=torch.float64)
    mix = torch.randn(8, 8, generator=g, dtype=torch.float64) * torch.logspace(0, -2, 8, dtype=torch.float64)
    x = torch.randn(500, 8, generator=g, dtype=torch.float64) @ mix.T  # strongly correlated inputs
    gram = x.T @ x
    a, b = whitened_truncated_svd(w, gram, 3)
    a0, b0 = truncated_svd(w, 3)
    out = lambda m: float(torch.linalg.vector_norm(x @ m.T))  # noqa: E731
    assert out(w - a @ b) < out(w - a0 @ b0)  # the error it claims to reduce
    assert float(torch.linalg.vector_norm(w - a @ b)) > float(torch.linalg.vector_norm(w - a0 @ b0))
    af, bf = whitened_truncated_svd(w, gram, 8)
    assert rel(af @ bf, w) < 1e-8


class TwoConvs(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(4, 12, 3, padding=1)
        self.conv2 = nn.Conv2d(12, 16, 3, padding=1)

    def forward(self, x):
        return self.conv2(torch.relu(self.conv1(x)))


def _correlated_images(n, seed=0):
    x = torch.randn(n, 4, 14, 14, generator=torch.Generator().manual_seed(seed))
    return F.avg_pool2d(x, 5, 1, 2)  # spatially smooth, so patches are strongly correlated


@pytest.mark.parametrize("method, rank", [("channel-svd", 3), ("separable", 3), ("basis", 2), ("tucker2", 4)])
@pytest.mark.parametrize("mode", ["data", "joint"])
def test_data_reconstruction_lowers_output_error(method, rank, mode):
    from rankdown.planning.compress import CompressConfig, compress
    from rankdown.planning.rank import FixedRank

    torch.manual_seed(0)
    dense = TwoConvs().eval()
    x = _correlated_images(128)
    res = compress(dense, CompressConfig(method, FixedRank(rank)), x[:1])
    before = rel(res.model(x), dense(x))
    fitted = reconstruct(dense, res.model, list(res.plan.layers), x, CalibrationConfig(mode=mode, epochs=6))
    after = rel(res.model(x), dense(x))
    assert after < before
    for r in fitted.values():
        assert r.output_error_after <= r.output_error_before
    held_out = _correlated_images(64, seed=1)  # it generalises: not only the calibration examples
    filt = compress(dense, CompressConfig(method, FixedRank(rank)), x[:1]).model
    assert rel(res.model(held_out), dense(held_out)) < rel(filt(held_out), dense(held_out))


def test_closed_form_data_fit_is_the_least_squares_optimum_for_svd_layers():
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Linear(10, 12)).double().eval()
    mix = torch.randn(10, 10, dtype=torch.float64) * torch.logspace(0, -2, 10, dtype=torch.float64)
    x = torch.randn(400, 10, dtype=torch.float64) @ mix.T
    from rankdown.planning.compress import CompressConfig, compress
    from rankdown.planning.rank import FixedRank

    res = compress(dense, CompressConfig("svd", FixedRank(3)), x[:1])
    # one batch: no held-out split, so the fit is the exact optimum on these examples
    out = reconstruct(dense, res.model, ["0"], x, CalibrationConfig(mode="data", batch_size=400))
    assert out["0"].how == "closed form"
    err = rel(res.model(x), dense(x))
    # a gradient refit from the closed form cannot find a better point
    cm = copy.deepcopy(res.model)
    reconstruct(dense, cm, ["0"], x, CalibrationConfig(mode="data", closed_form=False, epochs=20, batch_size=400))
    assert rel(cm(x), dense(x)) >= err - 1e-6


def test_calibration_rejects_bad_mode():
    from rankdown.errors import RankdownError

    with pytest.raises(RankdownError, match="calibration mode"):
        CalibrationConfig(mode="sideways")


# -- the character dataset ---------------------------------------------------------------------


def test_char_fonts_split_by_family_and_disjoint():
    from rankdown.zoo import chars

    train, test = chars.font_split("train"), chars.font_split("test")
    assert train and test
    assert not {f.family for f in train} & {f.family for f in test}
    assert not {f.path for f in train} & {f.path for f in test}


def test_char_rendering_is_deterministic_and_labelled():
    from rankdown.zoo import chars

    fonts = chars.font_split("train")
    a, la = chars.render("train", 40, seed=5, fonts=fonts)
    b, lb = chars.render("train", 40, seed=5, fonts=fonts)
    c, _ = chars.render("train", 40, seed=6, fonts=fonts)
    assert a.shape == (40, 24, 24) and a.dtype == np.uint8
    assert np.array_equal(a, b) and np.array_equal(la, lb) and not np.array_equal(a, c)
    assert la.min() >= 0 and la.max() < 36 and len(chars.CLASSES) == 36
    assert a.std() > 10  # not blank
    # a prefix of a larger set is the same images: image i depends on (seed, split, i) only
    big, _ = chars.render("train", 600, seed=5, fonts=fonts)
    assert np.array_equal(big[:40], a)


def test_charnet_shapes_and_bundled_weights():
    from rankdown.measurement.bench import count_macs
    from rankdown.zoo import BUNDLED, build_model, bundled_weights_path

    model = build_model("charnet", pretrained=bundled_weights_path("charnet").is_file())
    y = model(torch.rand(3, 1, 24, 24))
    assert y.shape == (3, 36)
    macs = count_macs(model, torch.zeros(1, 1, 24, 24))
    assert (macs["conv2"] + macs["conv3"]) / sum(macs.values()) > 0.9
    assert BUNDLED["charnet"].default_skip == ("conv1", "conv4")


def test_cli_charnet_scheme1_with_joint_calibration(tmp_path, monkeypatch):
    import json

    from click.testing import CliRunner

    from rankdown.app.cli import main
    from rankdown.zoo import bundled_weights_path

    if not bundled_weights_path("charnet").is_file():
        pytest.skip("charnet weights not bundled")
    monkeypatch.setenv("RANKDOWN_CACHE_DIR", str(tmp_path / "cache"))  # renders only the few images asked for
    out = tmp_path / "cn"
    args = ["compress", "--model", "charnet", "--method", "basis", "--rank", "8", "--calibration", "32"]
    args += ["--reconstruct", "joint"]
    args += ["--calibration-epochs", "1", "--eval-limit", "100", "--no-latency", "-q", "--out", str(out)]
    res = CliRunner().invoke(main, args, catch_exceptions=False, standalone_mode=False)
    assert res.exit_code == 0, res.output
    report = json.loads((out / "report.json").read_text())
    rows = {r["name"]: r for r in report["layers"]}
    assert rows["conv2"]["method"] == "basis" and rows["conv2"]["rank"] == 8
    assert rows["conv1"]["method"] is None  # the paper's choice: conv1 and conv4 stay dense
    fit = rows["conv2"]["info"]["calibration"]
    assert "least squares" in fit["how"] and fit["output_error_after"] <= fit["output_error_before"]
    assert json.loads((out / "plan.json").read_text())["meta"]["calibration"]["mode"] == "joint"
    assert report["accuracy"]["n"] == 100


def test_damaged_char_cache_is_rendered_again(tmp_path, monkeypatch):
    from rankdown.zoo import chars

    monkeypatch.setenv("RANKDOWN_CACHE_DIR", str(tmp_path))
    first = chars.load_chars("test", limit=20)
    (cache,) = list((tmp_path / "chars").iterdir())
    cache.write_bytes(b"not a zip file")
    again = chars.load_chars("test", limit=20)
    assert torch.equal(first.images, again.images)
