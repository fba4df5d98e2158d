"""Zhang 2015's nonlinear response reconstruction (the fit through a following BatchNorm → ReLU)
and Denton 2014's progressive fine-tuning."""

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from rankdown.fitting.calibrate import CalibrationConfig, following_activation, reconstruct, relu_z_step


@settings(max_examples=60, deadline=None)
@given(st.floats(-3, 3), st.floats(-3, 3), st.sampled_from([0.01, 0.1, 1.0, 10.0]))
def test_z_step_is_the_per_element_minimiser(y, u, lam):
    z = float(relu_z_step(torch.tensor([y], dtype=torch.float64), torch.tensor([u], dtype=torch.float64), lam)[0])
    cost = lambda v: (max(y, 0) - max(v, 0)) ** 2 + lam * (v - u) ** 2  # noqa: E731
    grid = torch.linspace(-4, 4, 80001, dtype=torch.float64).tolist()
    assert cost(z) <= min(cost(v) for v in grid) + 1e-6


def _net(negative_gamma=False):
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(4, 12, 3, padding=1), nn.BatchNorm2d(12), nn.ReLU(inplace=True), nn.Conv2d(12, 16, 3, padding=1)
    )
    with torch.no_grad():
        net[1].running_mean.uniform_(-0.5, 0.5)
        net[1].running_var.uniform_(0.5, 2.0)
        net[1].weight.uniform_(0.5, 1.5)
        if negative_gamma:
            net[1].weight[::3] *= -1
        net[1].bias.uniform_(-0.5, 0.5)
    return net.eval()


@pytest.mark.parametrize("negative_gamma", [False, True])
def test_following_activation_is_the_real_bn_relu_in_closed_form(negative_gamma):
    net = _net(negative_gamma)
    act = following_activation(net, "0")
    assert act is not None and following_activation(net, "3") is None  # nothing follows the last conv
    y = torch.randn(5, 12, 6, 6)
    shape = (1, -1, 1, 1)
    formula = act.scale.view(shape) * torch.relu(act.sign.view(shape) * (y - act.threshold.view(shape)))
    assert torch.allclose(act(y), net[2](net[1](y.clone())), atol=1e-5)
    assert torch.allclose(formula, act(y), atol=1e-5)


def _images(n, seed=0):
    x = torch.randn(n, 4, 14, 14, generator=torch.Generator().manual_seed(seed))
    return F.avg_pool2d(x, 5, 1, 2)


@torch.no_grad()
def _response_error(dense, model, x):
    a, b = dense[2](dense[1](dense[0](x))), model[2](model[1](model[0](x)))
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(a))


@pytest.mark.parametrize("method, rank", [("channel-svd", 3), ("tucker2", 3)])
def test_response_fit_lowers_the_error_after_the_relu(method, rank):
    from rankdown.planning.compress import CompressConfig, compress
    from rankdown.planning.rank import FixedRank

    dense = _net(negative_gamma=True)
    x = _images(256)
    res = compress(dense, CompressConfig(method, FixedRank(rank), layers=["0"]), x[:1])
    linear, nonlinear = copy.deepcopy(res.model), copy.deepcopy(res.model)
    reconstruct(dense, linear, ["0"], x, CalibrationConfig(mode="data", nonlinear=False, epochs=0))
    out = reconstruct(dense, nonlinear, ["0"], x, CalibrationConfig(mode="data", epochs=0))
    assert "relu response" in out["0"].how and out["0"].response == "after BatchNorm2d → ReLU"
    held = _images(128, seed=1)
    assert _response_error(dense, nonlinear, held) < _response_error(dense, linear, held)


def test_nonlinear_off_or_no_relu_leaves_the_linear_fit():
    from rankdown.planning.compress import CompressConfig, compress
    from rankdown.planning.rank import FixedRank

    dense = _net()
    x = _images(64)
    res = compress(dense, CompressConfig("channel-svd", FixedRank(3), layers=["3"]), x[:1])
    out = reconstruct(dense, res.model, ["3"], x, CalibrationConfig(mode="data"))
    assert out["3"].how == "closed form" and out["3"].response == "linear"


def test_progressive_freezes_each_layer_and_everything_before_it():
    from nets import TinyResNet
    from rankdown.planning.compress import CompressConfig, compress
    from rankdown.planning.rank import FixedRank
    from rankdown.training.progressive import called_up_to, progressive_compress
    from rankdown.training.train import TrainConfig
    from rankdown.zoo.fashion import Split

    torch.manual_seed(0)
    dense = TinyResNet(width=8).eval()
    x = torch.randn(96, 3, 12, 12)
    data = Split(x, dense(x).argmax(1))
    # a custom forward: "before" comes from the call order, not from the registration order
    before = called_up_to(dense, "layer1.0.conv2", x[:1])
    assert before[:3] == ["stem.0", "stem.1", "layer1.0.conv1"] and before[-1] == "layer1.0.conv2"
    assert "layer1.0.bn2" not in before and "fc" not in before
    layers = ("layer1.0.conv1", "layer2.0.conv1")
    cfg = CompressConfig("channel-svd", FixedRank(3), layers=layers)
    tc = TrainConfig(epochs=1, batch_size=32, lr=1e-2, augment=False, max_steps_per_epoch=3)
    result, hist = progressive_compress(dense, cfg, x[:1], data, tc)
    assert [h["layer"] for h in hist] == list(layers)
    # the first layer was factorized from the dense weights and then frozen: it is exactly what a
    # one-shot compress gives, and so are the stem and its batch-norm statistics
    oneshot = compress(dense, cfg, x[:1]).model
    for name in ("layer1.0.conv1", "stem"):
        got, want = result.model.get_submodule(name).state_dict(), oneshot.get_submodule(name).state_dict()
        assert all(torch.equal(got[k], want[k]) for k in want)
    # layers after it were trained
    assert not torch.equal(result.model.fc.weight, dense.fc.weight)
    assert all(p.requires_grad for p in result.model.parameters())
