"""The contract every registered method keeps, generated from the registry: a new method is one
maths function, one module and one registry entry, and these tests cover it without a line more."""

from __future__ import annotations

import itertools
import json

import pytest
import torch
from torch import nn

from rankdown.methods import METHODS
from rankdown.planning.rank import candidate_cost

# Methods whose largest candidate rank reproduces every weight exactly (the others are fits of a
# structure that a random weight does not have: CP, monochromatic colours, scheme 1's basis).
EXACT_AT_FULL_RANK = {"svd", "channel-svd", "tucker2", "separable", "tt", "bicluster", "bicluster-cp"}


def layer_for(ltype: type[nn.Module]) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    if ltype is nn.Conv2d:
        return nn.Conv2d(4, 6, 3, padding=1).double().eval(), torch.randn(2, 4, 7, 7, dtype=torch.float64)
    return nn.Linear(16, 12).double().eval(), torch.randn(3, 16, dtype=torch.float64)


def dense_holding(layer: nn.Module, weight: torch.Tensor) -> nn.Module:
    import copy

    ref = copy.deepcopy(layer)
    with torch.no_grad():
        ref.weight.copy_(weight)
    return ref


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


@pytest.mark.parametrize(
    "key", sorted(METHODS, key=lambda k: (k[0], k[1].__name__)), ids=lambda k: f"{k[0]}-{k[1].__name__}"
)
def test_method_contract(key):
    name, ltype = key
    method = METHODS[key]
    layer, x = layer_for(ltype)
    method.check("layer", layer)
    cands = list(method.candidates(layer))
    assert cands, name
    example = x[:1]
    costs = [candidate_cost(method, layer, r, example) for r in cands]
    assert all(a.macs <= b.macs for a, b in itertools.pairwise(costs)), f"{name}: MACs not monotone in rank"
    assert all(a.params <= b.params for a, b in itertools.pairwise(costs)), f"{name}: params not monotone"
    typed = int if method.rank_arity == 1 else method.rank_type
    assert typed is not None and all(isinstance(r, typed) for r in cands), f"{name}: untyped candidate ranks"
    for multiple in (1, 4, 8):
        for r in cands:
            rounded = method.round_rank(layer, r, multiple)
            assert isinstance(rounded, typed), f"{name}: rounding loses the rank's type"
            method.validate_rank(layer, rounded)
    for r in {cands[0], cands[len(cands) // 2], cands[-1]}:
        method.validate_rank(layer, r)
        back = method.rank_from_json(json.loads(json.dumps(method.rank_to_json(r))))
        assert back == r and isinstance(back, typed), name
        fact = method.factorize(layer, r)
        if fact.module is None:  # a fit may fail (a degenerate CP): it must say why
            assert fact.failure
            continue
        built = method.build(layer, r)
        assert {k: v.shape for k, v in built.state_dict().items()} == {
            k: v.shape for k, v in fact.module.state_dict().items()
        }, f"{name}: build and factorize give different structures at rank {r}"
        y = fact.module(x)
        assert rel(y, dense_holding(layer, fact.module.reconstruct_weight())(x)) < 1e-9, name
        if r == cands[-1] and name in EXACT_AT_FULL_RANK:
            assert fact.rel_error < 1e-5 and rel(y, layer(x)) < 1e-5, f"{name}: not exact at full rank"


@pytest.mark.parametrize(
    "key", sorted(METHODS, key=lambda k: (k[0], k[1].__name__)), ids=lambda k: f"{k[0]}-{k[1].__name__}"
)
def test_factorized_module_protocol(key):
    """What fitting, metrics and reconstruction ask of every method's module (the FactorizedLayer
    protocol), checked on the module itself: the split for least squares computes the module, the
    closed form's two factors are the whole product, undoing a metric inverts it exactly (at any
    rank, since it is linear in the fit), and balancing keeps the function."""
    import copy

    from rankdown.errors import RankdownError
    from rankdown.fitting.metrics import LayerMetric, transformed, undo
    from rankdown.layers import FactorizedLayer

    name, ltype = key
    method = METHODS[key]
    layer, x = layer_for(ltype)
    cands = list(method.candidates(layer))
    r = cands[len(cands) // 2]
    fact = method.factorize(layer, r)
    if fact.module is None:
        pytest.skip(f"{name}: this fit failed ({fact.failure})")
    module = fact.module
    assert isinstance(module, FactorizedLayer), name
    y = module(x)
    split = module.last_factor()
    if split is not None:
        head, last = split
        assert rel(last(head(x)), y) < 1e-12, name
    if module.closed_form(layer):
        assert rel(module.output_factor()(module.input_factor()(x)), y) < 1e-12, name
    balanced = copy.deepcopy(module)
    balanced.balance()
    assert rel(balanced(x), y) < 1e-10, name
    if not module.weighted_metrics:
        with pytest.raises(RankdownError, match="weighted metrics are not implemented"):
            undo(module, LayerMetric(d_out=torch.ones(layer.weight.shape[0], dtype=torch.float64)))
        return
    g = torch.Generator().manual_seed(1)
    c, n = layer.weight.shape[1], layer.weight.shape[0]
    full = torch.tril(torch.randn(c, c, generator=g, dtype=torch.float64)) + 3 * torch.eye(c, dtype=torch.float64)
    diag = torch.diag(torch.rand(c, generator=g, dtype=torch.float64) + 0.5)
    d_out = torch.rand(n, generator=g, dtype=torch.float64) + 0.5
    for t_in in (full, diag):
        metric = LayerMetric(t_in=t_in, d_out=d_out)
        fit = method.factorize(transformed(layer, metric), r).module
        if fit is None:
            continue
        wt = fit.reconstruct_weight().detach()
        try:
            undo(fit, metric)
        except RankdownError as exc:  # groups survive only a diagonal input metric
            assert t_in is full and "diagonal" in str(exc), (name, exc)
            continue
        expect = torch.einsum("nc...,cd->nd...", wt / d_out.view(-1, *([1] * (wt.ndim - 1))), torch.linalg.inv(t_in))
        assert rel(fit.reconstruct_weight(), expect) < 1e-9, (name, t_in is full)
