"""Data reconstruction block by block: a stack of repeated blocks is refitted from the blocks'
held inputs, and gives what the layer-by-layer path (the network re-run up to each layer) gives."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import rankdown.fitting.calibrate as cal
from rankdown import CompressConfig, FixedRank, compress


class Block(nn.Module):
    """A residual MLP block called with a keyword argument besides the hidden state."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, h: torch.Tensor, scale: torch.Tensor | None = None) -> tuple[torch.Tensor, None]:
        out = h + self.down(torch.tanh(self.up(h)))
        return (out * scale if scale is not None else out), None


class Stacked(nn.Module):
    def __init__(self, d: int = 12, n: int = 3, chained: bool = True) -> None:
        super().__init__()
        self.embed = nn.Linear(6, d)
        self.blocks = nn.ModuleList(Block(d) for _ in range(n))
        self.head = nn.Linear(d, 8)
        self.chained = chained

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        scale = torch.full((1,), 0.9, dtype=h.dtype)
        if self.chained:
            for b in self.blocks:
                h = b(h, scale=scale)[0]
        else:  # parallel branches: block i's output is not block i+1's input
            h = sum(b(h, scale=scale)[0] for b in self.blocks)
        return self.head(h)


def _both_paths(model: nn.Module, x: torch.Tensor, mode: str, monkeypatch) -> tuple[nn.Module, nn.Module, dict]:
    res = compress(model, CompressConfig("svd", FixedRank(3)), x[:1])
    names = list(res.plan.layers)
    config = cal.CalibrationConfig(mode=mode, batch_size=16)
    blockwise = copy.deepcopy(res.model)
    used: list[list[str]] = []
    real = cal._blockwise

    def spy(dense, compressed, blocks, *a):
        used.append(blocks)
        return real(dense, compressed, blocks, *a)

    monkeypatch.setattr(cal, "_blockwise", spy)
    fitted = cal.reconstruct(model, blockwise, names, x, config)
    monkeypatch.setattr(cal, "_stacks", lambda *a: [])
    layerwise = copy.deepcopy(res.model)
    cal.reconstruct(model, layerwise, names, x, config)
    assert used, "the block path did not run"
    fitted["_blocks"] = used[0]  # type: ignore[assignment]
    return blockwise, layerwise, fitted


@pytest.mark.parametrize("mode", ["data", "joint"])
def test_blockwise_refit_equals_the_layer_by_layer_refit(mode, monkeypatch):
    torch.manual_seed(0)
    model = Stacked().double().eval()
    x = torch.randn(64, 6, dtype=torch.float64)
    blockwise, layerwise, fitted = _both_paths(model, x, mode, monkeypatch)
    assert fitted.pop("_blocks") == [f"blocks.{i}" for i in range(3)]
    assert set(fitted) == {"embed", "head"} | {f"blocks.{i}.{n}" for i in range(3) for n in ("up", "down")}
    a, b = blockwise.state_dict(), layerwise.state_dict()
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-9, atol=1e-12), k
    assert all(f.output_error_after <= f.output_error_before + 1e-12 for f in fitted.values())


def test_blocks_that_do_not_chain_are_refitted_layer_by_layer(monkeypatch):
    torch.manual_seed(0)
    model = Stacked(chained=False).double().eval()
    x = torch.randn(64, 6, dtype=torch.float64)
    assert cal._chain_bytes(model, [f"blocks.{i}" for i in range(3)], x[:1]) is None
    res = compress(model, CompressConfig("svd", FixedRank(3)), x[:1])
    fitted = cal.reconstruct(model, res.model, list(res.plan.layers), x, cal.CalibrationConfig(mode="joint"))
    assert len(fitted) == 8


@pytest.mark.slow
def test_hf_llama_blockwise_equals_layer_by_layer(tmp_path, monkeypatch):
    """Keyword arguments (rotary embeddings, masks) and a KV cache in the real forward: the blocks
    are re-run without the cache and give the same refit as whole-network passes."""
    pytest.importorskip("transformers")
    import hfnets
    from rankdown.data.text import text_data
    from rankdown.models.hf import load_model, load_tokenizer
    from rankdown.workload import tied_layers

    folder = hfnets.llama_folder(tmp_path / "llama")
    (tmp_path / "c.txt").write_text(hfnets.TEXT)
    spec = f"hf:{folder}"
    model = load_model(spec).double()
    x = text_data(tmp_path / "c.txt", load_tokenizer(spec), seq_len=32).inputs(10**6)
    res = compress(
        model, CompressConfig("svd", FixedRank(4), skip=tied_layers(model)), {k: v[:1] for k, v in x.items()}
    )
    names = list(res.plan.layers)
    config = cal.CalibrationConfig(mode="joint", batch_size=16)
    blockwise = copy.deepcopy(res.model)
    cal.reconstruct(model, blockwise, names, x, config)
    monkeypatch.setattr(cal, "_stacks", lambda *a: [])
    layerwise = copy.deepcopy(res.model)
    cal.reconstruct(model, layerwise, names, x, config)
    a, b = blockwise.state_dict(), layerwise.state_dict()
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-9


def test_a_plain_sequential_cnn_with_inplace_relus_is_refitted_block_by_block(monkeypatch):
    """The layers are the blocks (VGG's ``features``); in-place ReLUs must not corrupt the held
    inputs, and Zhang's response fit through the ReLU gives the same result on both paths."""
    torch.manual_seed(0)
    model = (
        nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(8, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Flatten(),
            nn.Linear(16 * 4 * 4, 10),
        )
        .double()
        .eval()
    )
    with torch.no_grad():
        model[3].running_mean.uniform_(-0.2, 0.2)
    x = torch.randn(48, 3, 8, 8, dtype=torch.float64)
    blockwise, layerwise, fitted = _both_paths(model, x, "joint", monkeypatch)
    fitted.pop("_blocks")
    assert {"0", "2", "6", "9"} <= set(fitted)
    assert any("relu response" in f.how for f in fitted.values())
    a, b = blockwise.state_dict(), layerwise.state_dict()
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-7, atol=1e-9), k


class ResBlock(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1, self.bn = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv2(torch.relu(self.bn(self.conv1(x)))) + x)


class StemStagesHead(nn.Module):
    """A network whose own forward chains its children (no container says so); with ``skip`` its
    head also reads the stem's output, so its children do not chain, but its stage still does."""

    def __init__(self, skip: bool) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU())
        self.stage = nn.Sequential(ResBlock(6), ResBlock(6))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 5))
        self.skip = skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.stem(x)
        y = self.stage(s)
        return self.head(y + s if self.skip else y)


@pytest.mark.parametrize("skip", [False, True])
def test_a_network_that_chains_its_own_children_is_refitted_stage_by_stage(skip, monkeypatch):
    torch.manual_seed(0)
    model = StemStagesHead(skip).double().eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
    x = torch.randn(48, 3, 8, 8, dtype=torch.float64)
    blockwise, layerwise, fitted = _both_paths(model, x, "joint", monkeypatch)
    assert fitted.pop("_blocks") == (["stage.0", "stage.1"] if skip else ["stem", "stage", "head"])
    a, b = blockwise.state_dict(), layerwise.state_dict()
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-7, atol=1e-9), k


@pytest.mark.parametrize("examples", [128, 40, 4])
def test_a_small_calibration_set_still_holds_a_batch_out(examples, monkeypatch):
    """128 examples in batches of 64 left nothing held out, so the ridge was never chosen and an
    exact fit could interpolate the examples: batches shrink until there are 4."""
    seen: list[int] = []
    real = cal._Pairs.__init__

    def spy(self, layer, source, n_batches, *a, **k):
        seen.append(n_batches)
        real(self, layer, source, n_batches, *a, **k)

    monkeypatch.setattr(cal._Pairs, "__init__", spy)
    model = Stacked().eval()
    x = torch.randn(examples, 6, generator=torch.Generator().manual_seed(0))
    res = compress(model, CompressConfig("svd", FixedRank(3)), x[:1])
    cal.reconstruct(model, res.model, list(res.plan.layers), x, cal.CalibrationConfig(batch_size=64))
    assert seen and all(n == 4 for n in seen)
