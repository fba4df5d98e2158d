"""Selecting and swapping layers in ResNet/VGG-style networks with residuals and batch norm."""

import copy

import pytest
import torch
from torch import nn

from nets import Mixed, TinyResNet, TinyVGG, randomize_bn, tiny_resnet, tiny_vgg
from rankdown import CompressConfig, ParamFraction, compress
from rankdown.errors import LayerNotFoundError, UnsupportedLayerError
from rankdown.layers import LowRankLinear, Tucker2Conv2d
from rankdown.methods import resolve_method
from rankdown.surgery import get_module, replace_module


def rel(a, b):
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


@pytest.mark.parametrize("factory, shape", [(tiny_resnet, (3, 16, 16)), (tiny_vgg, (3, 16, 16))])
@pytest.mark.parametrize("method", ["tucker2", "channel-svd"])
def test_full_rank_swap_of_every_layer_preserves_outputs(factory, shape, method):
    model = randomize_bn(factory()).double().eval()
    x = torch.randn(4, *shape, dtype=torch.float64)
    compressed = copy.deepcopy(model)
    names = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    for name in names:
        dense = get_module(compressed, name)
        handler = resolve_method(method, dense)
        replace_module(compressed, name, handler.factorize(dense, handler.candidates(dense)[-1]).module)
    assert not any(
        type(m) is nn.Conv2d
        and m.kernel_size == (3, 3)
        and m.in_channels == m.out_channels
        and isinstance(get_module(compressed, n.rpartition(".")[0] or n), nn.Conv2d)
        for n, m in compressed.named_modules()
    )
    with torch.no_grad():
        assert rel(compressed(x), model(x)) < 1e-5


def test_compress_resnet_swaps_every_supported_layer_and_keeps_the_original():
    model = tiny_resnet().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(1, 3, 16, 16)
    res = compress(model, CompressConfig("tucker2", ParamFraction(0.5)), x)
    names = [r.name for r in res.layers]
    convs = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert sorted(names) == sorted(convs)
    assert isinstance(res.model.layer2[0].conv1, Tucker2Conv2d)
    assert isinstance(res.model.layer2[0].downsample[0], Tucker2Conv2d)  # 1x1 stride-2 residual projection
    assert isinstance(res.model.fc, LowRankLinear)  # Linear falls back to truncated SVD
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # original untouched
    assert isinstance(model.layer2[0].conv1, nn.Conv2d)
    for r in res.layers:
        if r.method:
            assert r.after.params <= 0.5 * r.before.params + 1e-9
    assert res.model(torch.randn(2, 3, 16, 16)).shape == (2, 10)


def test_select_by_name_and_regex_and_skip():
    model = tiny_vgg()
    x = torch.randn(1, 3, 16, 16)
    res = compress(model, CompressConfig("tucker2", ParamFraction(0.5), layers=("features.3", "re:classifier\\..*")), x)
    assert [r.name for r in res.layers if r.method] == ["features.3", "classifier.1", "classifier.3"]
    res = compress(model, CompressConfig("tucker2", ParamFraction(0.5), skip=("re:features\\.[0-3]",)), x)
    assert {r.name: r.note for r in res.layers if not r.method} == {
        "features.0": "skipped by request",
        "features.3": "skipped by request",
    }


def test_wrong_layer_names_raise_and_name_them():
    model = tiny_vgg()
    x = torch.randn(1, 3, 16, 16)
    with pytest.raises(LayerNotFoundError, match="features.33") as info:
        compress(model, CompressConfig(layers=("features.33",)), x)
    assert "did you mean" in str(info.value)
    with pytest.raises(LayerNotFoundError, match="re:head.*"):
        compress(model, CompressConfig(layers=("re:head.*",)), x)
    with pytest.raises(LayerNotFoundError, match="nope"):
        get_module(model, "features.nope")
    with pytest.raises(LayerNotFoundError, match="root"):
        replace_module(model, "", nn.Identity())


def test_unsupported_layers_skipped_by_default_and_refused_when_named():
    model = Mixed().eval()
    x = torch.randn(1, 4, 6, 6)
    res = compress(model, CompressConfig("tucker2", ParamFraction(0.5)), x)
    notes = {r.name: r.note for r in res.layers}
    assert [r.name for r in res.layers if r.method] == ["conv", "head"]
    assert "grouped convolution (groups=2)" in notes["grouped"]
    assert "grouped convolution (groups=8)" in notes["depthwise"]
    assert "no method handles ConvTranspose2d" in notes["up"]
    # MultiheadAttention's out_proj computes as a plain Linear, but attention reads its weight
    # directly and never calls it: it stays dense, and the model still runs.
    assert "not called by the example input" in notes["attn.out_proj"]
    assert res.model(torch.randn(2, 4, 6, 6)).shape == (2, 8)
    for name, reason in (
        ("grouped", "grouped"),
        ("up", "no method handles ConvTranspose2d"),
        ("attn", "no method handles MultiheadAttention"),
    ):
        with pytest.raises(UnsupportedLayerError, match=reason) as info:
            compress(model, CompressConfig("tucker2", ParamFraction(0.5), layers=(name,)), x)
        assert repr(name) in str(info.value)


def test_shared_module_is_refused():
    shared = nn.Linear(8, 8)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    res = compress(model, CompressConfig("svd", ParamFraction(0.5)), torch.randn(1, 8))
    assert not any(r.method for r in res.layers)
    assert "also used as" in res.layers[0].note


def test_unused_layer_is_kept_dense():
    model = TinyResNet()
    model.unused = nn.Linear(4, 4)
    res = compress(model, CompressConfig("tucker2", ParamFraction(0.5)), torch.randn(1, 3, 16, 16))
    row = next(r for r in res.layers if r.name == "unused")
    assert row.method is None and "not called" in row.note


def test_compressed_model_exports():
    """Stock modules only, so torch.export captures the factorized model like any other."""
    res = compress(TinyVGG().eval(), CompressConfig("tucker2", ParamFraction(0.5)), torch.randn(1, 3, 16, 16))
    x = torch.randn(2, 3, 16, 16)
    exported = torch.export.export(res.model, (x,))
    assert torch.allclose(exported.module()(x), res.model(x), atol=1e-6)


def test_bundled_model_full_rank_swap_and_compress(has_bundled_weights):
    if not has_bundled_weights:
        pytest.skip("bundled weights not built yet")
    from rankdown import build_model

    model = build_model("fashion-vgg").double()
    x = torch.randn(3, 1, 28, 28, dtype=torch.float64)
    full = copy.deepcopy(model)
    for name in ("features.3", "features.7", "features.10", "classifier.2"):
        dense = get_module(full, name)
        handler = resolve_method("tucker2", dense)
        replace_module(full, name, handler.factorize(dense, handler.candidates(dense)[-1]).module)
    with torch.no_grad():
        assert rel(full(x), model(x)) < 1e-5
    res = compress(model, CompressConfig("tucker2", ParamFraction(0.5)), x[:1])
    assert isinstance(res.model.features[3], Tucker2Conv2d) and isinstance(res.model.classifier[2], LowRankLinear)
