"""Factorized layers: equal to a dense layer holding the reconstructed weight, and exact at full rank."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from rankdown.errors import UnsupportedLayerError
from rankdown.layers import ChannelSVDConv2d, Tucker2Conv2d
from rankdown.methods import METHODS, get_method


def rel(a, b):
    a, b = a.detach(), b.detach()
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b).clamp_min(1e-300))


conv_params = st.fixed_dictionaries(
    {
        "cin": st.integers(1, 6),
        "cout": st.integers(1, 6),
        "k": st.tuples(st.integers(1, 4), st.integers(1, 4)),
        "stride": st.tuples(st.integers(1, 3), st.integers(1, 3)),
        "padding": st.tuples(st.integers(0, 2), st.integers(0, 2)),
        "dilation": st.tuples(st.integers(1, 2), st.integers(1, 2)),
        "bias": st.booleans(),
        "padding_mode": st.sampled_from(["zeros", "reflect", "replicate", "circular"]),
        "seed": st.integers(0, 10**6),
    }
)


def make_conv(p) -> tuple[nn.Conv2d, torch.Tensor]:
    torch.manual_seed(p["seed"])
    conv = nn.Conv2d(
        p["cin"],
        p["cout"],
        p["k"],
        stride=p["stride"],
        padding=p["padding"],
        dilation=p["dilation"],
        bias=p["bias"],
        padding_mode=p["padding_mode"],
    ).double()
    x = torch.randn(2, p["cin"], 9, 10, dtype=torch.float64)
    return conv, x


def dense_with(conv: nn.Conv2d, weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    ref = nn.Conv2d(
        conv.in_channels,
        conv.out_channels,
        conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        bias=conv.bias is not None,
        padding_mode=conv.padding_mode,
    ).double()
    with torch.no_grad():
        ref.weight.copy_(weight)
        if conv.bias is not None:
            ref.bias.copy_(conv.bias)
    return ref(x)


@settings(max_examples=60, deadline=None)
@given(p=conv_params, method=st.sampled_from(["channel-svd", "tucker2", "cp", "separable"]), frac=st.floats(0.1, 1.0))
def test_conv_methods_match_dense_with_reconstructed_weight(p, method, frac):
    conv, x = make_conv(p)
    handler = get_method(method, nn.Conv2d)
    full = handler.candidates(conv)[-1]
    cands = handler.candidates(conv)
    rank = cands[max(0, round(frac * (len(cands) - 1)))]
    fact = handler.factorize(conv, rank)
    if fact.module is None:  # a CP fit flagged degenerate: reported, never used
        assert method == "cp" and "degenerated" in fact.failure
        return
    layer = fact.module
    assert all(type(m) in (nn.Conv2d, nn.Linear) for m in layer)  # stock modules only
    w_hat = layer.reconstruct_weight()
    assert rel(layer(x), dense_with(conv, w_hat, x)) < 1e-9
    assert fact.rel_error == pytest.approx(rel(w_hat, conv.weight), abs=1e-9)
    if method == "cp":  # CP has no "full rank" in this sense: exactness is tested on planted tensors
        return
    # Exact at full rank.
    exact = handler.factorize(conv, full)
    assert exact.rel_error < 1e-5
    assert rel(exact.module(x), conv(x)) < 1e-5


@settings(max_examples=30, deadline=None)
@given(fin=st.integers(1, 20), fout=st.integers(1, 20), bias=st.booleans(), seed=st.integers(0, 10**6))
def test_linear_svd_full_rank_exact_and_matches_reconstruction(fin, fout, bias, seed):
    torch.manual_seed(seed)
    lin = nn.Linear(fin, fout, bias=bias).double()
    x = torch.randn(3, 5, fin, dtype=torch.float64)
    handler = get_method("svd", nn.Linear)
    full = handler.factorize(lin, min(fin, fout))
    assert rel(full.module(x), lin(x)) < 1e-5 and full.rel_error < 1e-5
    half = handler.factorize(lin, max(1, min(fin, fout) // 2)).module
    assert rel(half(x), F.linear(x, half.reconstruct_weight(), lin.bias)) < 1e-10


def test_planted_low_rank_conv_recovered_exactly():
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 24, 3, padding=1).double()
    with torch.no_grad():  # channel rank 4
        conv.weight.copy_(
            (torch.randn(24, 4, dtype=torch.float64) @ torch.randn(4, 16 * 9, dtype=torch.float64)).reshape(
                24, 16, 3, 3
            )
        )
    x = torch.randn(2, 16, 8, 8, dtype=torch.float64)
    fact = get_method("channel-svd", nn.Conv2d).factorize(conv, 4)
    assert fact.rel_error < 1e-10 and rel(fact.module(x), conv(x)) < 1e-10


def test_build_gives_same_structure_as_factorize():
    conv = nn.Conv2d(8, 12, 3, stride=2, padding=1, dilation=1, bias=True, padding_mode="reflect")
    for method, rank in (("channel-svd", 5), ("tucker2", (6, 4))):
        h = get_method(method, nn.Conv2d)
        built, fact = h.build(conv, rank), h.factorize(conv, rank).module
        assert {k: v.shape for k, v in built.state_dict().items()} == {k: v.shape for k, v in fact.state_dict().items()}
        assert str(built) == str(fact)
    assert isinstance(get_method("tucker2", nn.Conv2d).build(conv, (6, 4)), Tucker2Conv2d)
    assert isinstance(get_method("channel-svd", nn.Conv2d).build(conv, 5), ChannelSVDConv2d)


@pytest.mark.parametrize(
    "layer, reason",
    [
        (nn.Conv2d(4, 4, 3, groups=2), "grouped convolution"),
        (nn.Conv2d(4, 4, 3, groups=4), "grouped convolution"),
        (nn.ConvTranspose2d(4, 4, 3), "handles plain Conv2d only"),
        (nn.Conv3d(4, 4, 3), "handles plain Conv2d only"),
        (nn.Conv1d(4, 4, 3), "handles plain Conv2d only"),
    ],
)
def test_conv_methods_refuse_layers_they_cannot_represent(layer, reason):
    for method in ("channel-svd", "tucker2", "cp", "separable"):
        with pytest.raises(UnsupportedLayerError, match=reason) as info:
            get_method(method, nn.Conv2d).check("blocks.3.conv", layer)
        assert "blocks.3.conv" in str(info.value)


def test_linear_subclass_and_parametrized_refused():
    import nets

    with pytest.raises(UnsupportedLayerError, match="subclass computes something else"):
        get_method("svd", nn.Linear).check("fc", nets.ScaledLinear(4, 4))
    lin = nn.utils.parametrizations.weight_norm(nn.Linear(4, 4))
    with pytest.raises(UnsupportedLayerError, match="parametrized"):
        get_method("svd", nn.Linear).check("fc", lin)


def test_registry_has_the_issue_methods():
    assert {(n, t.__name__) for n, t in METHODS} >= {
        ("svd", "Linear"),
        ("channel-svd", "Conv2d"),
        ("tucker2", "Conv2d"),
    }
