"""Counting is exact; latency returns well-formed results (no timing assertions: those live in benchmarks)."""

import pytest
import torch
from torch import nn

from nets import TinyResNet
from rankdown.measurement.bench import (
    LoadGuard,
    best_latency,
    compiled_latency,
    count_macs,
    measure_latency,
    model_cost,
)


def test_mac_formulas():
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2, padding=1),  # out 8x8x8
        nn.Conv2d(8, 8, 3, padding=1, groups=4),  # grouped: in/groups
        nn.Flatten(),
        nn.Linear(8 * 8 * 8, 5),
    )
    macs = count_macs(model, torch.zeros(1, 3, 16, 16))
    assert macs == {"0": 8 * 8 * 8 * 3 * 9, "1": 8 * 8 * 8 * 2 * 9, "3": 512 * 5}
    # Per example, whatever the batch.
    assert count_macs(model, torch.zeros(4, 3, 16, 16)) == macs
    # Linear on a sequence counts every position.
    assert count_macs(nn.Linear(6, 4), torch.zeros(2, 7, 6)) == {"": 7 * 6 * 4}


def test_model_cost_counts_params():
    m = TinyResNet()
    assert model_cost(m, torch.zeros(1, 3, 16, 16)).params == sum(p.numel() for p in m.parameters())


def test_latency_result_shape():
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    x = torch.randn(1, 3, 8, 8)
    lat = measure_latency(m, x, runs=5, warmup=1, guard=False)
    assert lat.runs == 5 and lat.median_ms > 0 and lat.p25_ms <= lat.median_ms <= lat.p75_ms
    assert lat.foreign_share_max is None
    lat = measure_latency(m, x, runs=3, warmup=1, guard=True, window_s=0.01, max_rejects=2)
    assert lat.runs == 3 and (lat.foreign_share_max is not None) == LoadGuard().available
    best = best_latency(m, x, runs=3, warmup=1, guard=False)
    assert best.median_ms > 0
    # The model is handed back in its original layout.
    assert m[0].weight.is_contiguous()


@pytest.mark.slow
def test_compiled_latency_times_a_compiled_copy_and_leaves_the_model_alone():
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()).eval()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    x = torch.randn(1, 3, 8, 8)
    lat = compiled_latency(m, x, runs=2, warmup=1, guard=False, freezing=(True,))
    assert lat.runs == 2 and lat.median_ms > 0
    assert m[0].weight.is_contiguous() and all(torch.equal(v, m.state_dict()[k]) for k, v in before.items())
