"""Rank policies: validation, budgets, and errors that name the layer."""

import pytest
import torch
from torch import nn

from nets import tiny_vgg
from rankdown import CompressConfig, Energy, FixedRank, MacFraction, ParamFraction, compress
from rankdown.errors import RankdownError, RankError
from rankdown.measurement.bench import module_cost
from rankdown.methods import get_method
from rankdown.planning.rank import candidate_cost, choose_rank


@pytest.mark.parametrize("bad", [0, -3, 1.5, True, "8"])
def test_fixed_rank_must_be_positive_int(bad):
    with pytest.raises(RankError, match="positive integer"):
        FixedRank(bad)


@pytest.mark.parametrize("cls", [ParamFraction, MacFraction, Energy])
@pytest.mark.parametrize("bad", [0, 0.0, -0.5, 1.01, 32, True])
def test_fractions_must_be_in_unit_interval(cls, bad):
    with pytest.raises(RankError, match=r"\(0, 1\]"):
        cls(bad)


def test_one_and_one_point_zero_are_different_policies():
    assert FixedRank(1) != ParamFraction(1.0)
    assert ParamFraction(1).fraction == 1.0


def test_rank_too_large_names_the_layer():
    with pytest.raises(RankError, match=r"features\.3.*exceeds the largest rank 16"):
        compress(
            tiny_vgg(), CompressConfig("channel-svd", FixedRank(500), layers=("features.3",)), torch.randn(1, 3, 16, 16)
        )


def test_unknown_method_is_refused():
    with pytest.raises(RankdownError, match="unknown method 'pca'.*channel-svd"):
        CompressConfig("pca")


@pytest.mark.parametrize("method", ["channel-svd", "tucker2"])
@pytest.mark.parametrize("fraction", [0.25, 0.5, 0.8])
def test_fraction_budgets_are_met_and_tight(method, fraction):
    conv = nn.Conv2d(32, 48, 3, padding=1)
    x = torch.empty(1, 32, 12, 12, device="meta")
    handler = get_method(method, nn.Conv2d)
    dense = module_cost(conv, torch.zeros(1, 32, 12, 12))
    for policy, attr in ((ParamFraction(fraction), "params"), (MacFraction(fraction), "macs")):
        rank = choose_rank(handler, conv, policy, x, dense)
        cost = candidate_cost(handler, conv, rank, x)
        assert getattr(cost, attr) <= fraction * getattr(dense, attr)
        cands = list(handler.candidates(conv))
        nxt = cands[cands.index(rank) + 1]
        assert getattr(candidate_cost(handler, conv, nxt, x), attr) > fraction * getattr(dense, attr)


def test_energy_policy_picks_planted_rank():
    torch.manual_seed(0)
    lin = nn.Linear(40, 30)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(30, 6) @ torch.randn(6, 40))
    res = compress(nn.Sequential(lin), CompressConfig("svd", Energy(0.999999)), torch.randn(1, 40))
    assert res.layers[0].rank == 6 and res.layers[0].rel_error < 1e-5


def test_layer_where_no_rank_pays_stays_dense():
    # 1 -> 32 channel 3x3 conv: 9-weight filters; rank 8 would cost more than the dense layer.
    model = nn.Sequential(nn.Conv2d(1, 32, 3))
    res = compress(model, CompressConfig("channel-svd", FixedRank(8)), torch.randn(1, 1, 8, 8))
    assert res.layers[0].method is None and "neither" in res.layers[0].note
    res = compress(model, CompressConfig("channel-svd", ParamFraction(0.01)), torch.randn(1, 1, 8, 8))
    assert res.layers[0].method is None and "no rank meets" in res.layers[0].note
