"""A user's own model and data, never seen by rankdown, through the CLI and the Python API: image
folders, tensor files with keyword inputs, DataLoaders; quality for every model; bad data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from torch import nn

import nets
from test_reliability import assert_refused, in_process

FAST = ["--latency-runs", "2", "--batch-sizes", "1,4", "--no-guard", "-q"]


def write_images(root: Path, classes: int | None, per_class: int = 12, size: int = 20, seed: int = 0) -> Path:
    """PNG files: one sub-folder per class (class-dependent colour), or a flat folder."""
    rng = np.random.default_rng(seed)
    folders = [root / f"class_{c}" for c in range(classes)] if classes else [root]
    for c, folder in enumerate(folders):
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            img = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            img[..., c % 3] = np.clip(img[..., c % 3].astype(int) + 60 * c, 0, 255).astype(np.uint8)
            Image.fromarray(img).save(folder / f"img_{i:03d}.png")
    return root


@pytest.fixture
def images(tmp_path) -> Path:
    return write_images(tmp_path / "images", classes=3)


def test_cli_user_model_on_an_image_folder_end_to_end(images, tmp_path, capsys):
    """Global budget on the user's images, reconstruction, fine-tuning; quality in the report."""
    args = ["compress", "--model", "nets:tiny_vgg", "--calib-data", str(images), "--image-size", "16"]
    args += ["--speedup", "2", "--sensitivity", "layer", "--calibration", "24", "--reconstruct", "joint"]
    args += ["--finetune-epochs", "1"]
    args += ["--batch-size", "8", "--cache-dir", str(tmp_path / "cache"), "--out", "out", *FAST]
    code, out, err = in_process(args, capsys, tmp_path)
    assert code == 0, err
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    q = report["quality"]
    assert q["examples"] == 36 and q["labelled"]
    assert {"top1", "top1_agreement", "kl_to_dense", "output_rel_error"} <= set(q["metrics"])
    assert "calibration data" in q["note"]  # no --eval-data: evaluated on the calibration images, and said so
    assert report["accuracy"]["n"] == 36 and report["output_rel_error_on"].startswith(str(images))
    meta = json.loads((tmp_path / "out" / "plan.json").read_text())["meta"]
    assert meta["calibration_data"].startswith(str(images)) and "noise" not in meta["calibration_data"]
    assert report["finetune"]["history"][0]["epoch"] == 1
    # The raw-pixel layer stays dense by default, for a user model too.
    first = next(r for r in report["layers"] if r["name"] == "features.0")
    assert first["method"] is None
    assert "top-1 agreement with dense" in out
    # Re-measured on separate evaluation data.
    evald = write_images(tmp_path / "eval_images", classes=3, per_class=4, seed=1)
    args = ["eval", "out", "--model", "nets:tiny_vgg", "--eval-data", str(evald), "--image-size", "16"]
    code, out, err = in_process([*args, "--json", "again.json", *FAST], capsys, tmp_path)
    assert code == 0, err
    again = json.loads((tmp_path / "again.json").read_text())
    assert again["quality"]["examples"] == 12 and "note" not in again["quality"]


def test_unlabelled_folder_gives_agreement_and_distils(tmp_path, capsys):
    flat = write_images(tmp_path / "flat", classes=None, per_class=20)
    args = ["compress", "--model", "nets:tiny_vgg", "--calib-data", str(flat), "--image-size", "16"]
    args += ["--params", "0.5", "--finetune-epochs", "1", "--batch-size", "8", "--out", "out", "--no-latency", "-q"]
    code, _, err = in_process(args, capsys, tmp_path)
    assert code == 0, err
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["accuracy"] is None and not report["quality"]["labelled"]
    assert "top1_agreement" in report["quality"]["metrics"] and "top1" not in report["quality"]["metrics"]
    assert report["finetune"]["config"]["distill"] == 0.0  # asked for none ...
    assert report["finetune"]["history"]  # ... and trained by distillation alone: no labels


def _token_file(path: Path, n: int = 40, labelled: bool = True) -> Path:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 50, (n, 12), generator=g)
    mask = torch.ones(n, 12, dtype=torch.int64)
    mask[::3, 8:] = 0  # padding
    tensors = {"inputs.input_ids": ids, "inputs.attention_mask": mask}
    if labelled:
        tensors["labels"] = torch.randint(0, 4, (n,), generator=g)
    save_file(tensors, str(path))
    return path


def test_cli_keyword_input_model_on_a_tensor_file(tmp_path, capsys):
    data = _token_file(tmp_path / "tokens.safetensors")
    args = ["compress", "--model", "nets:token_classifier", "--calib-data", str(data), "--method", "svd"]
    args += ["--speedup", "1.5", "--sensitivity", "model", "--cache-dir", str(tmp_path / "c"), "--out", "out", *FAST]
    code, _, err = in_process(args, capsys, tmp_path)
    assert code == 0, err
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["quality"]["examples"] == 40 and "top1" in report["quality"]["metrics"]
    assert {r["name"] for r in report["layers"] if r["method"]} <= {"fc1", "fc2"}
    assert report["latency"]["batch_4"]["speedup"] > 0


def test_cli_dataloader_factory_and_own_metric(tmp_path, capsys):
    args = ["compress", "--model", "nets:tiny_vgg", "--calib-data", "nets:tiny_vgg_loader"]
    args += ["--eval", "nets:top1_metric", "--params", "0.5", "--out", "out", "--no-latency", "-q"]
    code, _, err = in_process(args, capsys, tmp_path)
    assert code == 0, err
    q = json.loads((tmp_path / "out" / "report.json").read_text())["quality"]
    assert set(q["metrics"]["mean_max_logit"]) == {"dense", "compressed"} and q["examples"] == 48


def test_python_api_with_a_dataloader():
    import rankdown

    model = nets.tiny_resnet().eval()
    nets.randomize_bn(model)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 3, 16, 16, generator=g), torch.randint(0, 10, (64,), generator=g)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)
    workload = rankdown.user_workload(model, calib=rankdown.Data(loader, "my images"))
    assert workload.skip == ("stem.0",)  # the conv on raw pixels
    config = rankdown.CompressConfig("tucker2")
    opts = rankdown.MeasureOptions(measure_latency=False)
    result, report = rankdown.run_job(
        workload,
        config,
        allocation=rankdown.AllocationOptions(rankdown.Budget(speedup=2.0), criterion="layer", calibration=32),
        finetune_config=rankdown.TrainConfig(epochs=1, batch_size=16, max_steps_per_epoch=2),
        opts=opts,
    )
    assert 1.9 < report.totals.macs_reduction < 2.4
    assert report.quality is not None and report.quality["examples"] == 64 and "top1" in report.quality["metrics"]
    assert json.loads(json.dumps(report.to_dict()))["totals"]["macs_reduction"] == report.totals.macs_reduction
    assert result.plan.meta["calibration_data"] == "my images"


def test_a_plan_that_wrecks_the_model_is_said_before_committing(tmp_path, capsys):
    args = ["compress", "--model", "nets:mlp_classifier", "--calib-data", "nets:tiny_vgg_loader", "--rank", "1"]
    code, _out, err = in_process([*args, "--layers", "1", "--out", "out", "--no-latency", "-q"], capsys, tmp_path)
    assert code == 0, err
    assert "warning: this plan changes the model's output a lot" in err and "--finetune-epochs" in err
    assert "warning" in json.loads((tmp_path / "out" / "report.json").read_text())
    # A mild plan on the same model: no warning.
    args = ["compress", "--model", "nets:mlp_classifier", "--calib-data", "nets:tiny_vgg_loader", "--params", "0.9"]
    code, _out, err = in_process([*args, "--out", "mild", "--no-latency", "-q"], capsys, tmp_path)
    assert code == 0 and "warning" not in err, err


@pytest.mark.parametrize(
    "make, flag_value, culprit",
    [
        (lambda d: None, "missing_folder", "--calib-data missing_folder: no such folder or file"),
        (
            lambda d: (d / "bad").mkdir() or (d / "bad" / "x.png").write_bytes(b"garbage"),
            "bad",
            "x.png is not a readable image",
        ),
        (lambda d: (d / "empty").mkdir(), "empty", "no images"),
        (lambda d: write_images(d / "small", 2, 3, size=4), "small", "does not run on an input"),
        (
            lambda d: write_images(d / "mixed", 2, 2, size=16) and write_images(d / "mixed", 2, 1, size=20, seed=3),
            "mixed",
            "different sizes",
        ),
        (lambda d: save_file({"x": torch.zeros(3)}, str(d / "t.safetensors")), "t.safetensors", "holds no 'inputs'"),
        (
            lambda d: save_file(
                {"inputs": torch.zeros(4, 3, 16, 16), "labels": torch.zeros(3, dtype=torch.int64)},
                str(d / "l.safetensors"),
            ),
            "l.safetensors",
            "labels must be integers, one per example (4)",
        ),
        (lambda d: np.save(d / "n.npy", np.full((2, 3, 16, 16), np.nan, dtype=np.float32)), "n.npy", "NaN"),
        (lambda d: None, "nets:raises", "the function raised ValueError"),
    ],
)
def test_bad_data_is_one_line_before_the_work(tmp_path, capsys, make, flag_value, culprit):
    make(tmp_path)
    args = ["compress", "--model", "nets:tiny_vgg", "--calib-data", flag_value, "--speedup", "2"]
    assert_refused([*args, "--out", "out", "--no-latency", "-q"], culprit, capsys, tmp_path)


def test_data_aware_options_without_data_name_the_flag(tmp_path, capsys):
    base = ["compress", "--model", "nets:tiny_vgg", "--input-shape", "3,16,16", "--out", "o", "--no-latency", "-q"]
    for extra, culprit in (
        (["--speedup", "2"], "needs calibration data: give --calib-data"),
        (["--metric", "covariance"], "--metric covariance needs calibration data"),
        (["--reconstruct", "joint"], "reconstruction (--reconstruct) needs calibration data"),
        (["--latency-aware"], "--latency-aware needs calibration data"),
        (["--finetune-epochs", "1"], "fine-tuning needs train data: give --train-data"),
    ):
        assert_refused([*base, *extra], culprit, capsys, tmp_path)


def test_subclasses_that_compute_as_the_plain_layer_are_factorized(tmp_path):
    from rankdown.planning.compress import CompressConfig, compress
    from rankdown.planning.plan import load_compressed, save_compressed
    from rankdown.planning.rank import ParamFraction

    model = nets.ported_net().eval()
    res = compress(model, CompressConfig("tucker2", ParamFraction(0.5)), torch.zeros(1, 3, 8, 8))
    rows = {r.name: r for r in res.layers}
    assert rows["2"].method == "tucker2" and "computes as a plain Conv2d (probed)" in rows["2"].note
    assert rows["6"].method is None and "computes something else" in rows["6"].note
    res.plan.model = "nets:ported_net"
    out = save_compressed(tmp_path / "o", res.model, res.plan)
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(load_compressed(out, nets.ported_net())(x), res.model(x))


def test_a_whole_job_from_a_recipe_file(images, tmp_path, capsys):
    (tmp_path / "job.toml").write_text(
        f"""
[model]
model = "nets:tiny_vgg"

[data]
calib_data = "{images}"
image_size = 16

[plan]
method = "tucker2"
speedup = 2
sensitivity = "layer"
cache_dir = "cache"

[finetune]
finetune_epochs = 1
batch_size = 8

[measure]
no_latency = true

[output]
out = "runs/job"
quiet = true
"""
    )
    code, _, err = in_process(["run", "job.toml"], capsys, tmp_path)
    assert code == 0, err
    report = json.loads((tmp_path / "runs/job/report.json").read_text())
    assert report["totals"]["macs_reduction"] >= 1.9 and report["finetune"]["history"]
    (tmp_path / "bad.toml").write_text("[plan]\nspeed_up = 2\n")
    assert_refused(["run", "bad.toml"], "[plan] has no option 'speed_up'", capsys, tmp_path)
    (tmp_path / "misplaced.toml").write_text("[reconstruct]\ncalibration = 8\n")
    assert_refused(
        ["run", "misplaced.toml"], "[reconstruct] has no option 'calibration' (it belongs in [data])", capsys, tmp_path
    )
    (tmp_path / "bad2.toml").write_text("[tuning]\nlr = 1\n")
    assert_refused(["run", "bad2.toml"], "unknown section [tuning]", capsys, tmp_path)


def test_calibration_draws_across_a_class_sorted_folder(images):
    """An image folder lists its classes one after the other: calibration examples are drawn
    across the whole set (seeded), not the first class's."""
    from rankdown.data.sources import Data, ImageFolder, ImageOptions

    folder = ImageFolder(images, ImageOptions(size=16))
    data = Data(folder, "images")
    x = data.inputs(9)
    firsts = torch.stack([folder[i][0] for i in range(len(folder))])
    drawn = {int(torch.where((firsts == xi).all(dim=(1, 2, 3)))[0][0]) // 12 for xi in x}
    assert len(drawn) == 3  # all three classes
    assert torch.equal(x, data.inputs(9))  # and the same draw every time


def test_covariance_statistics_skip_padding_positions():
    """Calibration statistics come from real tokens only: a padded position is not data."""
    from rankdown.fitting.metrics import collect

    torch.manual_seed(0)
    model = nets.TokenTagger().eval()
    ids = torch.randint(0, 50, (6, 10))
    mask = torch.ones(6, 10, dtype=torch.int64)
    mask[:, 4:] = 0  # 60% padding
    metric = collect(model, ["proj"], {"input_ids": ids, "attention_mask": mask}, "covariance", batch_size=4)
    real = model.embed(ids)[mask.bool()].double()
    assert torch.allclose(metric["proj"].patch_gram, real.T @ real)


class _Stacked(nn.Module):
    """The tagger as a stack of blocks (a transformer's shape): reconstructed block by block."""

    def __init__(self, tagger: nets.TokenTagger) -> None:
        super().__init__()
        self.embed = tagger.embed
        self.blocks = nn.ModuleList([nn.Sequential(tagger.proj, nn.ReLU()), nn.Sequential(tagger.out)])

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = self.embed(input_ids)
        for block in self.blocks:
            h = block(h)
        return h


def test_padding_shapes_no_fit_and_no_error(monkeypatch, tmp_path):
    """What sits at padding positions changes nothing rankdown computes from calibration data: the
    refit (layer by layer and block by block), the sensitivity curves (layer and model criteria)
    and the Mahalanobis statistics all see real tokens only."""
    from rankdown import CalibrationConfig, CompressConfig, FixedRank, compress, reconstruct
    from rankdown.fitting import calibrate
    from rankdown.fitting.metrics import collect
    from rankdown.methods import get_method
    from rankdown.planning.allocate import sensitivity

    torch.manual_seed(0)
    dense = nets.TokenTagger().eval()
    ids = torch.randint(1, 50, (16, 10))
    mask = torch.ones(16, 10, dtype=torch.int64)
    mask[:, 3:] = 0  # 70% padding
    other = ids.clone()
    other[~mask.bool()] = torch.randint(1, 50, (int((~mask.bool()).sum()),))  # other junk at the pads
    batches = [{"input_ids": t, "attention_mask": mask} for t in (ids, other)]
    blockwise_runs = []
    real_blockwise = calibrate._blockwise
    monkeypatch.setattr(calibrate, "_blockwise", lambda *a: blockwise_runs.append(1) or real_blockwise(*a))

    def refit(model: nn.Module, calib) -> dict:
        out = compress(model, CompressConfig(method="svd", rank=FixedRank(4)), calib).model
        names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        reconstruct(model, out, names, calib, CalibrationConfig(mode="joint", epochs=0, batch_size=4))
        return {k: v.clone() for k, v in out.state_dict().items()}

    for model in (dense, _Stacked(dense).eval()):
        a, b = (refit(model, c) for c in batches)
        assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a), type(model).__name__
    assert blockwise_runs, "the stacked model was not reconstructed block by block"
    svd = get_method("svd", nn.Linear)
    for criterion in ("layer", "model"):
        curves = [sensitivity(dense, {"proj": svd}, c, criterion=criterion, cache_dir=tmp_path) for c in batches]
        errs = [[o.error for o in c["proj"].options] for c in curves]
        assert errs[0] == pytest.approx(errs[1], abs=1e-6), criterion
    fisher = [collect(dense, ["proj"], c, "mahalanobis", batch_size=4)["proj"] for c in batches]
    assert torch.allclose(fisher[0].t_in, fisher[1].t_in) and torch.allclose(fisher[0].d_out, fisher[1].d_out)


class _Counted(torch.utils.data.Dataset):
    """Examples read one at a time, counted: a stream that holds nothing reads them again on each pass."""

    def __init__(self, x: torch.Tensor) -> None:
        self.x, self.reads = x, 0

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> torch.Tensor:
        self.reads += 1
        return self.x[i]


class _Widest(nn.Module):
    """The model, noting the largest batch any forward pass gives it."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model, self.widest = model, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.widest = max(self.widest, x.shape[0])
        return self.model(x)


def test_a_stream_rebatches_and_holds_only_what_fits(monkeypatch):
    from rankdown import probe

    x = torch.arange(10.0).reshape(10, 1)
    reads = []
    s = probe.Batches(lambda: reads.append(1) or [x[:3], x[3:5], x[5:]])
    assert [b.flatten().tolist() for b in s.rebatch(4)] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert s.examples == 10 and s.first(3).flatten().tolist() == [0, 1, 2]
    assert len(reads) == 1  # small: held after the first pass
    # token batches padded to their own lengths are never joined
    t = probe.Batches(lambda: [{"ids": torch.zeros(3, 5)}, {"ids": torch.zeros(2, 7)}, {"ids": torch.zeros(4, 7)}])
    assert [tuple(b["ids"].shape) for b in t.rebatch(4)] == [(3, 5), (4, 7), (2, 7)]
    monkeypatch.setattr(probe, "HOLD_BYTES", 16)
    big = probe.Batches(lambda: reads.append(1) or [x[:3], x[3:]])
    list(big), list(big)
    assert len(reads) == 3  # too big to hold: read again on every pass


def test_a_source_that_changes_between_passes_is_refused(monkeypatch):
    """A stream too large to hold is read again on each pass, and every pass must give the same
    examples: a source that draws new ones each time is refused by name, not fitted on."""
    from rankdown import probe
    from rankdown.data.sources import Data
    from rankdown.errors import RankdownError

    class Fresh:  # an iterable of batches that draws new examples on every pass
        def __iter__(self):
            return iter([torch.randn(4, 3) for _ in range(2)])

    assert len(list(Data(Fresh(), "mine").stream(8))) == 2  # held after one pass: read once, fine
    monkeypatch.setattr(probe, "HOLD_BYTES", 0)
    s = Data(Fresh(), "mine").stream(8)
    assert s.examples == 8
    with pytest.raises(RankdownError, match="mine gave other examples on a second pass"):
        list(s)


@pytest.mark.slow
def test_every_data_aware_step_streams_its_examples(monkeypatch, tmp_path):
    """No data-aware step needs the calibration set as one tensor: from a stream that holds nothing
    (each pass reads the dataset again), every step runs the model on batches of at most 64 of the
    160 examples, and computes what it computes from the same examples as one tensor."""
    from rankdown import CalibrationConfig, CompressConfig, FixedRank, compress, probe, reconstruct
    from rankdown.data.sources import Data
    from rankdown.fitting import calibrate
    from rankdown.fitting.metrics import collect
    from rankdown.methods import get_method
    from rankdown.planning import sweep
    from rankdown.planning.allocate import sensitivity

    monkeypatch.setattr(probe, "HOLD_BYTES", 0)  # streams hold nothing
    monkeypatch.setattr(sweep, "HOLD_BYTES", 0)  # the layer sweep records one target's inputs, batch by batch
    torch.manual_seed(0)
    dense = _Widest(nets.randomize_bn(nets.tiny_vgg()).eval())
    counted = _Counted(torch.randn(200, 3, 16, 16))
    data = Data(counted, "images", batch_size=16)
    streamed, whole = data.stream(160), data.inputs(160)
    assert isinstance(whole, torch.Tensor) and whole.shape[0] == 160
    reads = counted.reads

    def steps(calib) -> dict:
        out: dict = {}
        for metric in ("covariance", "mahalanobis"):
            stats = collect(dense, ["model.features.3", "model.classifier.1"], calib, metric)
            out[metric] = stats["model.features.3"].t_in
        for method, hold_mb in (("channel-svd", calibrate.HOLD_MB), ("tucker2", 0)):  # block by block; layer by layer
            monkeypatch.setattr(calibrate, "HOLD_MB", hold_mb)
            res = compress(dense, CompressConfig(method=method, rank=FixedRank(8)), calib)
            reconstruct(dense, res.model, list(res.plan.layers), calib, CalibrationConfig(mode="joint", epochs=1))
            out[method] = res.model.state_dict()
        svd = get_method("channel-svd", nn.Conv2d)
        for criterion in ("layer", "model"):
            curves = sensitivity(dense, {"model.features.7": svd}, calib, criterion=criterion, cache_dir=tmp_path)
            out[criterion] = [o.error for o in curves["model.features.7"].options]
        return out

    got = steps(streamed)
    assert dense.widest <= 64
    assert streamed._held is None and counted.reads - reads >= 10 * 160  # read again, pass after pass
    want = steps(whole)
    for key, value in want.items():
        if isinstance(value, dict):
            assert all(torch.allclose(got[key][k], v, atol=1e-5) for k, v in value.items()), key
        elif isinstance(value, list):
            assert got[key] == pytest.approx(value, abs=1e-6), key
        else:
            assert torch.allclose(got[key], value), key
