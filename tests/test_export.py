"""Export for deployment: every registered method's layer runs in onnxruntime with PyTorch's
outputs; whole models export with a dynamic batch, after batch-norm folding, in each format; the
file is checked before it is written and never replaces a file rankdown did not write."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

import nets
from rankdown import CompressConfig, ParamFraction, compress
from rankdown.deployment.export import ORT_LEVELS, OrtModule, export_model, is_rankdown_export, onnxruntime_modules
from rankdown.errors import RankdownError
from rankdown.methods import METHODS
from test_contract import layer_for
from test_reliability import assert_refused, in_process


@pytest.mark.parametrize(
    "key", sorted(METHODS, key=lambda k: (k[0], k[1].__name__)), ids=lambda k: f"{k[0]}-{k[1].__name__}"
)
def test_every_method_layer_runs_in_onnxruntime(key, tmp_path):
    name, ltype = key
    method = METHODS[key]
    layer, x = layer_for(ltype)
    layer, x = layer.float(), x.float()
    cands = list(method.candidates(layer))
    fact = method.factorize(layer, cands[len(cands) // 2])
    assert fact.module is not None, name
    model = nn.Sequential(fact.module).eval()
    info = export_model(model, x[:1], tmp_path / "m.onnx", check=[x, x[:1]], fold=False)
    assert info["parity"]["rel_error"] < 1e-5 and info["opset"] == 18
    # the dynamic batch works in the runtime too
    y = OrtModule(tmp_path / "m.onnx")(torch.cat([x, x, x]))
    assert y.shape[0] == 3 * x.shape[0]


def test_resnet_blocks_export_after_batchnorm_folding(tmp_path):
    model = nets.randomize_bn(nets.tiny_resnet()).eval()
    x = torch.randn(3, 3, 16, 16)
    result = compress(model, CompressConfig("tucker2", ParamFraction(0.5)), x[:1])
    info = export_model(result.model, x[:1], tmp_path / "r.onnx", check=[x])
    assert info["folds"]["batchnorm"] > 0  # the blocks' custom forward: folded through the traced graph
    assert info["parity"]["rel_error"] < 1e-4 and info["dynamic_batch"]
    with torch.no_grad():
        want = result.model(x)
    assert torch.allclose(OrtModule(tmp_path / "r.onnx")(x), want, atol=1e-4, rtol=1e-3)


def test_every_onnxruntime_optimization_level_computes_the_same_model():
    model = nets.randomize_bn(nets.tiny_resnet()).eval()
    x = torch.randn(3, 3, 16, 16)
    compressed = compress(model, CompressConfig("tucker2", ParamFraction(0.5)), x[:1]).model
    sessions = onnxruntime_modules(compressed, x[:1], threads=1, optimizations=ORT_LEVELS, check=[x])
    assert list(sessions) == list(ORT_LEVELS)
    with torch.no_grad():
        want = compressed(x)
    for level, session in sessions.items():
        assert torch.allclose(session(x), want, atol=1e-4, rtol=1e-3), level
    with pytest.raises(RankdownError, match="optimization must be one of"):
        onnxruntime_modules(compressed, x[:1], optimizations=("fast",))


@pytest.mark.parametrize("fmt", ["torchscript", "exported-program"])
def test_other_formats_round_trip(fmt, tmp_path):
    model = nets.tiny_vgg().eval()
    x = torch.randn(4, 3, 16, 16)
    result = compress(model, CompressConfig("channel-svd", ParamFraction(0.5)), x[:1])
    path = tmp_path / ("m.ts" if fmt == "torchscript" else "m.pt2")
    info = export_model(result.model, x[:1], path, fmt, check=[x])
    assert info["parity"]["max_abs_error"] < 1e-4 and is_rankdown_export(path)


def test_a_parity_failure_writes_nothing(tmp_path):
    model = nn.Sequential(nn.Linear(8, 4)).eval()
    with pytest.raises(RankdownError, match="does not match PyTorch"):
        export_model(model, torch.randn(2, 8), tmp_path / "m.onnx", tolerance=-1.0)
    assert list(tmp_path.iterdir()) == []


def test_cli_export_writes_beside_the_plan_and_refuses_foreign_files(tmp_path, capsys):
    args = ["compress", "--model", "nets:tiny_vgg", "--input-shape", "3,16,16", "--method", "tucker2"]
    code, _, err = in_process([*args, "--params", "0.5", "--out", "out", "--no-latency", "-q"], capsys, tmp_path)
    assert code == 0, err
    code, out, err = in_process(["export", "out", "--model", "nets:tiny_vgg", "--json", "e.json"], capsys, tmp_path)
    assert code == 0, err
    assert "parity with PyTorch" in out and (tmp_path / "out" / "model.onnx").is_file()
    assert json.loads((tmp_path / "e.json").read_text())["parity"]["rel_error"] < 1e-4
    # The folder is still rankdown's own: compress --force may replace it.
    code, _, err = in_process(
        [*args, "--params", "0.4", "--out", "out", "--force", "--no-latency", "-q"], capsys, tmp_path
    )
    assert code == 0, err
    (tmp_path / "mine.onnx").write_text("the user's own file")
    assert_refused(
        ["export", "out", "--model", "nets:tiny_vgg", "--out", "mine.onnx"], "not written by rankdown", capsys, tmp_path
    )
    assert_refused(["export", str(tmp_path), "--model", "nets:tiny_vgg"], "plan.json", capsys, tmp_path)


def test_bench_times_onnxruntime_beside_pytorch(tmp_path, capsys):
    args = ["compress", "--model", "nets:tiny_vgg", "--input-shape", "3,16,16", "--method", "tucker2"]
    code, _, err = in_process([*args, "--params", "0.5", "--out", "out", "--no-latency", "-q"], capsys, tmp_path)
    assert code == 0, err
    args = ["bench", "out", "--model", "nets:tiny_vgg", "--onnxruntime", "--batch-sizes", "1", "--runs", "2"]
    code, out, err = in_process([*args, "--no-guard", "--json", "b.json"], capsys, tmp_path)
    assert code == 0, err
    row = json.loads((tmp_path / "b.json").read_text())["end_to_end"][0]
    assert row["dense (onnxruntime)"]["median_ms"] > 0 and row["speedup_onnxruntime"] > 0
    assert "onnxruntime" in out
