"""The suffix runner gives exactly the whole model's output with one layer swapped, and skips what
ran before that layer only where that is safe."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from rankdown.fitting.replay import Suffix
from rankdown.surgery import swapped


class Block(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1)
        self.bn = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv2(torch.relu(self.bn(self.conv1(x)))) + x)


class Net(nn.Module):
    """A stem, a stage of blocks, a head that also reads the stem's output (a long skip), and one
    ReLU module used at two places."""

    def __init__(self, c: int = 6) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.act = nn.ReLU()
        self.stage = nn.Sequential(Block(c), Block(c))
        self.head = nn.Linear(2 * c, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.act(self.stem(x))
        y = self.act(self.stage(s))
        return self.head(torch.cat([y.mean((2, 3)), s.mean((2, 3))], 1))


class Peeking(Net):
    """Reads an attribute of a module it has already called: a replayed stand-in has none."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.act(self.stem(x)) * self.stem.weight.mean()
        return self.head(torch.cat([self.stage(s).mean((2, 3)), s.mean((2, 3))], 1))


class Viewing(Net):
    """Flattens with .view, which channels_last tensors refuse."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.stage(self.act(self.stem(x)))
        f = y.view(y.shape[0], -1).reshape(y.shape[0], y.shape[1], -1).mean(2)
        return self.head(torch.cat([f, f], 1))


def _eval(model: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return model.eval()


def _whole(model: nn.Module, x: torch.Tensor, fqn: str, layer: nn.Module) -> torch.Tensor:
    with torch.no_grad(), swapped(model, fqn, layer):
        return model(x)


def _perturbed(module: nn.Module) -> nn.Module:
    import copy

    m = copy.deepcopy(module)
    with torch.no_grad():
        m.weight.add_(torch.randn_like(m.weight))
    return m


TARGETS = ["stem", "stage.0.conv1", "stage.0.conv2", "stage.1.conv1", "stage.1.conv2", "head"]


@pytest.mark.parametrize("cls", [Net, Peeking, Viewing])
def test_outputs_equal_the_whole_forward(cls):
    model = _eval(cls())
    x = torch.randn(40, 3, 8, 8)
    suffix = Suffix(model, x, TARGETS)
    for fqn in TARGETS:
        layer = _perturbed(model.get_submodule(fqn))
        want = _whole(model, x, fqn, layer)
        got = suffix.outputs(fqn, layer)
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-6), fqn
        assert not torch.allclose(want, suffix.reference, atol=1e-4)  # the swap did change the output
    # the model is left as it was given
    for fqn in TARGETS:
        assert type(model.get_submodule(fqn)) in (nn.Conv2d, nn.Linear)


def test_what_ran_before_is_replayed_not_rerun():
    model = _eval(Net())
    x = torch.randn(16, 3, 8, 8)
    suffix = Suffix(model, x, TARGETS)
    assert suffix.prefix["stage.1.conv2"] == ["stem", "stage.0", "stage.1.conv1", "stage.1.bn"]
    assert "act" not in suffix.prefix["head"]  # called twice: always rerun
    calls = {"stem": 0, "stage.0": 0}
    hooks = [
        model.get_submodule(n).register_forward_hook(lambda *_a, n=n: calls.__setitem__(n, calls[n] + 1)) for n in calls
    ]
    suffix.outputs("stage.1.conv2", _perturbed(model.stage[1].conv2))
    for h in hooks:
        h.remove()
    assert calls == {"stem": 0, "stage.0": 0}


def test_a_parent_that_reads_a_replayed_module_runs_whole():
    model = _eval(Peeking())
    suffix = Suffix(model, torch.randn(8, 3, 8, 8), TARGETS)
    suffix.outputs("stage.0.conv1", _perturbed(model.stage[0].conv1))
    assert suffix.verified["stage.0.conv1"] is False


def test_channels_last_only_where_the_forward_takes_it():
    assert Suffix(_eval(Net()), torch.randn(4, 3, 8, 8), ["head"]).channels_last
    assert not Suffix(_eval(Viewing()), torch.randn(4, 3, 8, 8), ["head"]).channels_last


def test_recordings_replaced_by_a_later_group_are_recorded_again(monkeypatch):
    import rankdown.fitting.replay as replay

    model = _eval(Net())
    x = torch.randn(16, 3, 8, 8)
    suffix = Suffix(model, x, TARGETS)
    monkeypatch.setattr(replay, "HOLD_MB", suffix._cost(set(suffix.prefix["stage.1.conv2"])) / 2**20)
    for fqn in ["stage.0.conv2", "stage.1.conv2", "stage.0.conv2"]:  # back to a layer of an earlier group
        layer = _perturbed(model.get_submodule(fqn))
        assert torch.allclose(suffix.outputs(fqn, layer), _whole(model, x, fqn, layer), rtol=1e-5, atol=1e-6)
    assert suffix.verified["stage.0.conv2"] and suffix.verified["stage.1.conv2"]
