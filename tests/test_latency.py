"""Latency-aware planning and deploy transforms (no timing assertions: the numbers are synthetic
or only checked for consistency)."""

import copy
import json

import pytest
import torch
from torch import nn

from nets import randomize_bn, tiny_resnet, tiny_vgg
from rankdown import CompressConfig, ParamFraction, compress
from rankdown.deployment.deploy import fold_batchnorm
from rankdown.errors import RankdownError
from rankdown.measurement.bench import count_macs
from rankdown.planning.latency import (
    Candidate,
    Choice,
    DeviceKey,
    LatencyTable,
    LayerOptions,
    latency_ranks,
    layer_options,
    plan_by_latency,
    plan_by_macs,
    predicted_ms,
)
from rankdown.planning.rank import FixedRank
from rankdown.surgery import get_module


def options():
    return {
        "a": LayerOptions(
            "a",
            1.0,
            [
                Candidate(None, None, 1.0, 0.0, 100),
                Candidate("tucker2", (4, 4), 0.5, 0.2, 30),
                Candidate("cp", 8, 1.4, 0.1, 10),
                Candidate("separable", 8, 0.3, 0.6, 40),
            ],
        ),
        "b": LayerOptions(
            "b",
            1.0,
            [
                Candidate(None, None, 1.0, 0.0, 100),
                Candidate("cp", 4, 2.0, 0.1, 5),
                Candidate("tucker2", (2, 2), 0.99, 0.1, 20),
            ],
        ),
    }


def test_planner_never_picks_what_its_table_says_is_slower():
    opts = options()
    plan = plan_by_latency(opts, max_error=0.3)
    assert plan["a"] == Choice("tucker2", (4, 4))  # fastest within the error budget
    assert plan["b"] is None  # cp is slower than dense; tucker2 is within the noise margin
    for name, choice in plan.items():
        if choice is not None:
            c = next(c for c in opts[name].candidates if c.method == choice.method and c.rank == choice.rank)
            assert c.ms < opts[name].dense_ms
    assert predicted_ms(opts, plan) == pytest.approx(1.5)
    # The MAC-only planner picks the fewest MACs, even when slower than dense.
    assert plan_by_macs(opts, 0.3) == {"a": Choice("cp", 8), "b": Choice("cp", 4)}
    assert predicted_ms(opts, plan_by_macs(opts, 0.3)) > predicted_ms(opts, plan)
    with pytest.raises(RankdownError):
        plan_by_latency(opts, 0.0)


def test_sum_budget_plan_fits_and_matches_brute_force():
    """plan_by_latency_sum: errors sum within the budget, only forms faster than dense (beyond the
    margin), and on this small case the least total time any combination achieves."""
    import itertools

    from rankdown.planning.latency import plan_by_latency_sum

    opts = options()
    opts["c"] = LayerOptions(
        "c",
        2.0,
        [Candidate(None, None, 2.0, 0.0, 100), Candidate("svd", 8, 0.5, 0.35, 20), Candidate("svd", 16, 1.0, 0.05, 40)],
    )
    pools = {n: [c for c in o.candidates if c.method is None or c.ms < o.dense_ms * 0.97] for n, o in opts.items()}
    for budget in (0.05, 0.1, 0.2, 0.3, 0.45, 0.6, 1.0):
        plan = plan_by_latency_sum(opts, budget)
        chosen = {
            n: next(c for c in opts[n].candidates if (c.method, c.rank) == ((p.method, p.rank) if p else (None, None)))
            for n, p in plan.items()
        }
        assert sum(c.error for c in chosen.values()) <= budget + 1e-12
        assert all(c.method is None or c.ms < opts[n].dense_ms * 0.97 for n, c in chosen.items())
        best = min(
            sum(c.ms for c in combo)
            for combo in itertools.product(*pools.values())
            if sum(c.error for c in combo) <= budget + 1e-12
        )
        assert sum(c.ms for c in chosen.values()) == pytest.approx(best)
    with pytest.raises(RankdownError, match="budget"):
        plan_by_latency_sum(opts, 0.0)


def test_latency_table_is_keyed_by_device_dtype_batch_and_shape(tmp_path):
    k1 = DeviceKey.current(batch=1, threads=1)
    assert (
        len(
            {
                k1.slug(),
                DeviceKey.current(batch=2, threads=1).slug(),
                DeviceKey.current(dtype=torch.float64, batch=1, threads=1).slug(),
                DeviceKey.current(batch=1, threads=1, channels_last=True).slug(),
            }
        )
        == 4
    )
    table = LatencyTable(k1, tmp_path, runs=2, guard=False)
    conv = nn.Conv2d(4, 4, 3, padding=1)
    t1 = table.time(conv, (4, 8, 8))
    table.time(conv, (4, 8, 8))
    table.time(conv, (4, 16, 16))  # another shape is another entry
    assert table.measured == 2 and t1 > 0
    table.save()
    again = LatencyTable(k1, tmp_path, runs=2, guard=False)
    assert again.time(conv, (4, 8, 8)) == t1 and again.measured == 0
    other = LatencyTable(DeviceKey.current(batch=4, threads=1), tmp_path, runs=2, guard=False)
    other.time(conv, (4, 8, 8))
    assert other.measured == 1
    (table.path).write_text("{broken")
    assert LatencyTable(k1, tmp_path).entries == {}


def test_latency_ranks_end_to_end(tmp_path):
    model = tiny_vgg().eval()
    calib = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    cfg = CompressConfig("tucker2", layers=("features.3", "features.7", "classifier.1"))
    key = DeviceKey.current(batch=1, threads=1)
    policy, _ = latency_ranks(
        model,
        cfg,
        calib,
        key,
        max_error=0.5,
        methods=["tucker2", "separable", "svd"],
        cache_dir=tmp_path,
        runs=2,
        guard=False,
    )
    res = compress(model, CompressConfig("tucker2", policy, layers=cfg.layers), calib[:1])
    for r in res.layers:
        choice = policy.ranks[r.name]
        assert (r.method, r.rank) == ((choice.method, choice.rank) if choice else (None, None))
    # The saved plan records each layer's own method, and reloads.
    plan = json.loads(res.plan.to_json())
    assert {v["method"] for v in plan["layers"].values()} <= {"tucker2", "separable", "svd"}


def test_model_criterion_scores_each_candidate_by_the_models_output(tmp_path):
    """With criterion="model", a candidate's error is the model's relative output error with only
    that layer replaced, and the model comes back untouched."""
    from rankdown.methods import METHODS
    from rankdown.surgery import replace_module

    model = tiny_vgg().eval()
    before = copy.deepcopy(model.state_dict())
    calib = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    targets = ["features.3", "classifier.1"]
    table = LatencyTable(DeviceKey.current(batch=1, threads=1), tmp_path, runs=2, guard=False)
    opts = layer_options(model, targets, calib, table, ["tucker2", "svd"], criterion="model")
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    checked = 0
    for fqn, o in opts.items():
        for c in o.candidates[1:]:
            handler = METHODS[(c.method, type(get_module(model, fqn)))]
            probe = copy.deepcopy(model)
            replace_module(probe, fqn, handler.factorize(get_module(model, fqn), c.rank).module)
            with torch.no_grad():
                want = float(
                    torch.linalg.vector_norm(probe(calib) - model(calib)) / torch.linalg.vector_norm(model(calib))
                )
            assert c.error == pytest.approx(want, rel=1e-5, abs=1e-7)
            checked += 1
    assert checked >= 4
    with pytest.raises(RankdownError, match="criterion"):
        layer_options(model, targets, calib, table, ["svd"], criterion="output")


def test_fold_batchnorm_is_exact_in_float64():
    for factory in (tiny_vgg, tiny_resnet):
        model = randomize_bn(factory()).double().eval()
        res = compress(
            model, CompressConfig("tucker2", ParamFraction(0.5)), torch.zeros(1, 3, 16, 16, dtype=torch.float64)
        )
        x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
        for m in (model, res.model):
            folded = copy.deepcopy(m)
            n = fold_batchnorm(folded)
            assert n >= 1
            with torch.no_grad():
                assert torch.allclose(folded(x), m(x), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="eval mode"):
        fold_batchnorm(tiny_vgg().train())


def test_fold_batchnorm_reaches_resnet_blocks_by_tracing():
    """bn1/bn2 inside a block's custom forward are folded too (dense and factorized), while a conv
    whose output also feeds something else, and a model fx cannot trace, keep their batch norms."""
    model = randomize_bn(tiny_resnet()).double().eval()
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    res = compress(model, CompressConfig("tucker2", ParamFraction(0.5)), torch.zeros(1, 3, 16, 16, dtype=torch.float64))
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    for m in (model, res.model):
        folded = copy.deepcopy(m)
        assert fold_batchnorm(folded) == n_bn
        assert not any(isinstance(mm, nn.BatchNorm2d) for mm in folded.modules())
        with torch.no_grad():
            assert torch.allclose(folded(x), m(x), rtol=1e-12, atol=1e-12)

    class Tap(nn.Module):  # conv output used twice: folding would change the second use
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

        def forward(self, x):
            y = self.conv(x)
            return self.bn(y) + y

    class Branchy(Tap):  # data-dependent control flow: not traceable
        def forward(self, x):
            y = self.bn(self.conv(x))
            return y if float(y.sum()) > 0 else -y

    for cls in (Tap, Branchy):
        m = randomize_bn(cls()).eval()
        assert fold_batchnorm(m) == 0 and isinstance(m.bn, nn.BatchNorm2d)


def test_plan_for_mac_budget_keeps_most_macs_within_budget():
    from rankdown.planning.latency import plan_for_mac_budget

    opts = options()
    plan = plan_for_mac_budget(opts, 70)

    def chosen(n):
        return next(
            c
            for c in opts[n].candidates
            if (c.method, c.rank) == ((plan[n].method, plan[n].rank) if plan[n] else (None, None))
        )

    kept = sum(chosen(n).macs for n in opts)
    assert kept <= 70
    # Brute force: the most MACs that fit, and among those the least time, is what it found here.
    import itertools

    best = max(
        (
            (a.macs + b.macs, -(a.ms + b.ms))
            for a, b in itertools.product(opts["a"].candidates, opts["b"].candidates)
            if a.macs + b.macs <= 70
        )
    )
    assert (kept, -predicted_ms(opts, plan)) == pytest.approx(best)
    with pytest.raises(RankdownError, match="unreachable"):
        plan_for_mac_budget(opts, 1)


def test_plan_for_mac_budget_leaves_no_upgrade_that_still_fits():
    from rankdown.planning.latency import plan_for_mac_budget

    g = torch.Generator().manual_seed(3)
    opts = {}
    for i in range(6):
        dense_ms, dense_macs = 1.0 + float(torch.rand(1, generator=g)), 100.0
        cands = [Candidate(None, None, dense_ms, 0.0, dense_macs)]
        for r in range(1, 9):
            macs = float(torch.randint(5, 95, (1,), generator=g))
            cands.append(Candidate("tucker2", (r, r), dense_ms * macs / 100 * 1.5, 0.1, macs))
        opts[f"l{i}"] = LayerOptions(f"l{i}", dense_ms, cands)
    budget = 300.0
    plan = plan_for_mac_budget(opts, budget)
    chosen = {
        n: next(
            c
            for c in o.candidates
            if (c.method, c.rank) == ((plan[n].method, plan[n].rank) if plan[n] else (None, None))
        )
        for n, o in opts.items()
    }
    kept = sum(c.macs for c in chosen.values())
    assert kept <= budget
    for n, o in opts.items():  # the fill step spent the slack: no single bigger candidate still fits
        assert all(c.macs <= chosen[n].macs or kept - chosen[n].macs + c.macs > budget for c in o.candidates)


def test_merge_pointwise_is_exact_in_float64_and_cheaper():
    from rankdown.deployment.deploy import merge_pointwise

    torch.manual_seed(0)
    conv = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.Conv2d(16, 12, 1), nn.ReLU(), nn.Conv2d(12, 6, 1))
    lin = nn.Sequential(nn.Linear(20, 30, bias=False), nn.Linear(30, 40), nn.Linear(40, 5))
    cases = ((conv.double().eval(), torch.randn(2, 8, 6, 6)), (lin.double().eval(), torch.randn(3, 20)))
    for model, example in cases:
        example = example.double()
        res = compress(
            model, CompressConfig("tucker2", FixedRank(3), layers=("0",) if model is conv else ("1",)), example[:1]
        )
        before, macs_before = res.model(example), sum(count_macs(res.model, example[:1]).values())
        n = merge_pointwise(res.model)
        assert n >= 1
        assert torch.allclose(res.model(example), before, rtol=1e-12, atol=1e-12)
        assert sum(count_macs(res.model, example[:1]).values()) < macs_before


def test_plan_for_mac_budget_bounds_the_error_and_says_it():
    """Time alone chooses a's separable form (error 0.6); with an error bound it may not."""
    from rankdown.planning.latency import plan_error, plan_for_mac_budget

    opts = options()
    free = plan_for_mac_budget(opts, 70)
    bounded = plan_for_mac_budget(opts, 70, max_error=0.3)
    assert plan_error(opts, free)["max"] == pytest.approx(0.6)
    assert plan_error(opts, bounded)["max"] <= 0.3
    macs = sum(
        next(c.macs for c in opts[n].candidates if ch and (c.method, c.rank) == (ch.method, ch.rank)) if ch else 100
        for n, ch in bounded.items()
    )
    assert macs <= 70
    with pytest.raises(RankdownError, match="max error must be > 0"):
        plan_for_mac_budget(opts, 70, max_error=0)


class ParamsTable(LatencyTable):
    """A table whose 'time' is a module's weight count per input position: deterministic, and
    what a weight-bound layer's time is proportional to."""

    def time(self, module, in_shape):
        self.shapes.append(tuple(in_shape))
        return float(sum(p.numel() for p in module.parameters()))


def test_slower_than_dense_names_the_factorized_layers_that_do_not_pay(tmp_path):
    from rankdown.methods import get_method
    from rankdown.planning.latency import slower_than_dense
    from rankdown.surgery import replace_module

    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8)).eval()
    x = torch.randn(3, 5, 64)  # tokens: each layer sees (1, 5, 64) per example
    compressed = copy.deepcopy(model)
    svd = get_method("svd", nn.Linear)
    for name, rank in (("0", 8), ("2", 48)):  # 2 * 64 * 8 weights, fewer than 64 * 64; 2 * 64 * 48, more
        replace_module(compressed, name, svd.factorize(model.get_submodule(name), rank).module)
    table = ParamsTable(DeviceKey.current("cpu", torch.float32, 1, 1), tmp_path)
    table.shapes = []
    slow = slower_than_dense(model, compressed, ["0", "2"], x, table)
    assert list(slow) == ["2"] and slow["2"]["ms"] > slow["2"]["dense_ms"]
    assert set(table.shapes) == {(5, 64)}  # timed at the shape the model gives the layer
