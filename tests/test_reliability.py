"""Reliability: bad input ends in one line and exit 2 before any work, with nothing created or
changed on disk; saved folders and caches are data (validated, never running code); output folders
change in one step and survive kills; fits do not depend on the weights' scale."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file
from torch import nn

import nets
from rankdown.app.cli import run
from rankdown.errors import OutputExistsError, RankdownError
from rankdown.planning.compress import CompressConfig, compress
from rankdown.planning.plan import load_compressed, save_compressed
from rankdown.planning.rank import ParamFraction
from rankdown.storage import check_output_dir, is_rankdown_folder, recover

HERE = Path(__file__).parent
TINY = ["--model", "nets:tiny_vgg", "--input-shape", "3,16,16"]


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every path under ``root`` with its bytes (None for folders): what 'nothing changed' means."""
    return {str(p.relative_to(root)): (None if p.is_dir() else p.read_bytes()) for p in sorted(root.rglob("*"))}


def in_process(args: list[str], capsys, cwd: Path) -> tuple[int, str, str]:
    """Run the real entry point (``rankdown.app.cli.run``) in this process; (exit status, stdout, stderr)."""
    old_argv, old_cwd = sys.argv, os.getcwd()
    sys.argv = ["rankdown", *args]
    os.chdir(cwd)
    try:
        run()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    finally:
        sys.argv = old_argv
        os.chdir(old_cwd)
        torch.set_num_threads(2)
    out, err = capsys.readouterr()
    return code, out, err


def assert_refused(args, culprit: str, capsys, tmp_path: Path) -> None:
    before = snapshot(tmp_path)
    code, _, err = in_process(args, capsys, tmp_path)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, (args, err)
    assert len(lines) == 1, (args, err)
    assert culprit in lines[0], (args, lines[0])
    assert "Traceback" not in err
    assert snapshot(tmp_path) == before, args


@pytest.fixture
def a_file(tmp_path) -> Path:
    f = tmp_path / "a_file"
    f.write_text("not a folder")
    return f


# --------------------------------------------------------------------------- flags


@pytest.mark.parametrize(
    "extra, culprit",
    [
        (["--speedup", "inf"], "--speedup"),
        (["--speedup", "0.5"], "speedup must be > 1"),
        (["--seed", str(2**70)], "--seed"),
        (["--weight-decay", "-1"], "--weight-decay"),
        (["--weight-decay", "nan"], "--weight-decay"),
        (["--weight-decay", "inf"], "--weight-decay"),
        (["--lr", "inf"], "--lr"),
        (["--params", "nan"], "--params"),
        (["--distill", "nan"], "--distill"),
        (["--threads", "100000"], "--threads"),
        (["--layers", ""], "--layers"),
        (["--layers", "re:["], "not a valid regular expression"),
        (["--latency-aware", "--methods", "bogus"], "unknown method 'bogus'"),
        (["--input-shape", "3,7"], "does not run on an input of shape (1, 3, 7)"),
        (["--layers", "features.99"], "no layer named 'features.99'"),
    ],
)
def test_bad_flags_are_one_line_exit_2_and_touch_nothing(extra, culprit, capsys, tmp_path):
    args = ["compress", *TINY, "--out", str(tmp_path / "out"), "--no-latency", "-q", *extra]
    assert_refused(args, culprit, capsys, tmp_path)


def test_impossible_outputs_are_refused_before_the_work(capsys, tmp_path, a_file):
    base = ["compress", *TINY, "--no-latency", "-q"]
    assert_refused([*base, "--out", str(a_file / "sub")], "is a file", capsys, tmp_path)
    assert_refused([*base, "--out", "o", "--json", str(a_file / "r.json")], "--json", capsys, tmp_path)
    assert_refused([*base, "--out", "o", "--json", str(a_file)], "was not written by rankdown", capsys, tmp_path)
    assert_refused([*base, "--out", "."], "current folder", capsys, tmp_path)
    assert_refused([*base, "--out", "..", "--force"], "current folder", capsys, tmp_path)
    assert_refused(
        ["bench", "nets:tiny_vgg", "--input-shape", "3,16,16", "--cuda-graphs", "-q"],
        "--cuda-graphs needs --device cuda",
        capsys,
        tmp_path,
    )


def test_force_never_deletes_what_rankdown_did_not_write(capsys, tmp_path):
    project = tmp_path / "project"
    (project / "src").mkdir(parents=True)
    (project / "src" / "main.py").write_text("print('mine')")
    (project / "plan.json").write_text("{}")  # a plan-named file does not make it rankdown's
    args = ["compress", *TINY, "--out", str(project), "--force", "--no-latency", "-q"]
    assert_refused(args, "not a rankdown output (it holds src)", capsys, tmp_path)


# --------------------------------------------------------------------------- models and weights


def test_broken_factories_are_one_line(capsys, tmp_path):
    (tmp_path / "broken_syntax.py").write_text("def f(:\n")
    sys.path.insert(0, str(tmp_path))
    try:
        for spec, culprit in (
            ("nets:raises", "the factory raised ValueError: weights server unreachable"),
            ("nets:needs_args", "the factory raised TypeError"),
            ("nets:exits", "the factory called sys.exit(0)"),
            ("broken_syntax:f", "importing 'broken_syntax' failed (SyntaxError"),
            ("nets:make_not_a_module", "not an nn.Module"),
            ("nets:", "expected package.module:factory"),
        ):
            args = ["compress", "--model", spec, "--input-shape", "3,16,16", "--out", "o", "--no-latency", "-q"]
            before = snapshot(tmp_path)
            code, _, err = in_process(args, capsys, tmp_path)
            assert code == 2 and culprit in err and len(err.strip().splitlines()) == 1, (spec, err)
            assert snapshot(tmp_path) == before
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("broken_syntax", None)


def test_bad_weight_files_are_one_line(capsys, tmp_path):
    state = nets.tiny_vgg().state_dict()
    nan = {k: v.clone() for k, v in state.items()}
    nan["features.3.weight"][0, 0, 0, 0] = float("nan")
    save_file(nan, str(tmp_path / "nan.safetensors"))
    save_file(nets.tiny_resnet().state_dict(), str(tmp_path / "other.safetensors"))
    torch.save({"model": nn.Linear(2, 2)}, tmp_path / "pickled.pt")
    ints = {k: (v.to(torch.int64) if k == "features.0.weight" else v) for k, v in state.items()}
    save_file(ints, str(tmp_path / "ints.safetensors"))
    for name, culprit in (
        ("nan.safetensors", "features.3.weight holds NaN or Inf"),
        ("other.safetensors", "does not fit the model:"),
        ("pickled.pt", "never unpickles code"),
        ("ints.safetensors", "features.0.weight: torch.int64 in the file"),
    ):
        args = ["compress", *TINY, "--weights", str(tmp_path / name), "--out", "o", "--no-latency", "-q"]
        assert_refused(args, culprit, capsys, tmp_path)


def test_wrapper_prefixes_in_published_weights_are_mapped(tmp_path):
    from rankdown.zoo import build_model

    state = {f"module.{k}": v for k, v in nets.tiny_vgg().state_dict().items()}
    save_file(state, str(tmp_path / "ddp.safetensors"))
    model = build_model("nets:tiny_vgg", tmp_path / "ddp.safetensors")
    assert torch.equal(model.features[0].weight, nets.tiny_vgg().features[0].weight)


@pytest.mark.parametrize("factory", ["tiny_vgg_float64", "tiny_vgg_bfloat16", "tiny_vgg_float16"])
def test_user_models_in_other_dtypes_compress(factory, capsys, tmp_path):
    args = ["compress", "--model", f"nets:{factory}", "--input-shape", "3,16,16"]
    args += ["--method", "channel-svd", "--params", "0.5", "--out", "o", "--no-latency", "-q"]
    code, _, err = in_process(args, capsys, tmp_path)
    assert code == 0, err
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert report["totals"]["params_reduction"] > 1.5 and report["output_rel_error"] < 1


def test_non_finite_weights_are_refused_by_the_api():
    model = nets.tiny_vgg()
    with torch.no_grad():
        model.features[3].weight[0, 0, 0, 0] = float("inf")
    with pytest.raises(RankdownError, match="layer 'features.3': its weight holds NaN or Inf"):
        compress(model, CompressConfig("channel-svd", ParamFraction(0.5)), torch.zeros(1, 3, 16, 16))


# --------------------------------------------------------------------------- saved folders


@pytest.fixture
def saved(tmp_path) -> Path:
    model = nets.tiny_vgg().eval()
    res = compress(model, CompressConfig("tucker2", ParamFraction(0.5)), torch.zeros(1, 3, 16, 16))
    res.plan.model = "nets:tiny_vgg"
    return save_compressed(tmp_path / "saved", res.model, res.plan)


def _tamper_plan(folder: Path, change) -> None:
    d = json.loads((folder / "plan.json").read_text())
    change(d)
    (folder / "plan.json").write_text(json.dumps(d))


def _first_svd(d: dict) -> dict:
    return next(e for e in d["layers"].values() if e["method"] == "svd")


@pytest.mark.parametrize(
    "change, culprit",
    [
        (lambda d: _first_svd(d).update(rank="8"), "rank must be a positive integer, got '8'"),
        (lambda d: _first_svd(d).update(rank=-3), "rank must be a positive integer, got -3"),
        (lambda d: _first_svd(d).update(rank=8.5), "rank must be a positive integer, got 8.5"),
        (lambda d: _first_svd(d).update(rank=[1, 2]), "rank must be a positive integer"),
        (lambda d: _first_svd(d).update(rank=10**12), "exceeds the largest rank"),
        (lambda d: d["layers"]["features.3"].update(rank=[4]), "list of 2 positive integers"),
        (lambda d: d["layers"]["features.3"].update(rank=[4, 99]), "ranks must be (r_out, r_in)"),
        (lambda d: d.update(input_shape=[0, -1]), "input_shape must be a list of positive sizes"),
        (lambda d: d.update(input_shape="abc"), "input_shape"),
        (lambda d: d.update(meta=[]), "'meta' must be an object"),
        (lambda d: d.update(layers=[]), "'layers' must be an object"),
    ],
)
def test_tampered_plans_are_one_line(saved, change, culprit, capsys, tmp_path):
    _tamper_plan(saved, change)
    args = ["eval", str(saved), "--model", "nets:tiny_vgg", "--no-latency", "-q"]
    assert_refused(args, culprit, capsys, tmp_path)


def test_deeply_nested_plan_is_refused(saved, capsys, tmp_path):
    text = (saved / "plan.json").read_text()
    (saved / "plan.json").write_text(text[:-2] + ', "x": ' + "[" * 100_000 + "]" * 100_000 + "}")
    assert_refused(["eval", str(saved), "--model", "nets:tiny_vgg", "-q"], "nested too deeply", capsys, tmp_path)


@pytest.mark.parametrize("spec", ["os:abort", "builtins:input", "nets:raises"])
def test_a_saved_folder_never_chooses_code(saved, spec, capsys, tmp_path, monkeypatch):
    monkeypatch.setattr("sys.stdin", None)  # builtins:input would block on a terminal
    _tamper_plan(saved, lambda d: d.update(model=spec))
    assert_refused(["eval", str(saved), "--no-latency", "-q"], "a saved folder never chooses code", capsys, tmp_path)


def test_saved_weights_with_bad_values_are_one_line(saved, capsys, tmp_path):
    state = load_file(str(saved / "model.safetensors"))
    key = next(k for k in state if k.endswith("weight"))
    bad = dict(state)
    bad[key] = state[key].clone()
    bad[key].view(-1)[0] = float("nan")
    save_file(bad, str(saved / "model.safetensors"))
    args = ["eval", str(saved), "--model", "nets:tiny_vgg", "--no-latency", "-q"]
    assert_refused(args, f"{key} holds NaN or Inf", capsys, tmp_path)
    bad[key] = state[key].to(torch.int32)
    save_file(bad, str(saved / "model.safetensors"))
    assert_refused(args, "not floating point", capsys, tmp_path)


# --------------------------------------------------------------------------- checkpoints and caches


def _synthetic(n: int = 64):
    from rankdown.zoo.fashion import Split

    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 1, 8, 8, generator=g)
    return Split(x, (x.reshape(n, -1).sum(1) > 0).long())


def _small_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 64, 2))


@pytest.mark.parametrize(
    "tamper, culprit",
    [
        (lambda d: d.update(epoch=100), "epoch 100 is not an epoch of this 2-epoch run"),
        (lambda d: d.update(epoch="1"), "epoch '1' is not an epoch"),
        (lambda d: d.pop("history"), "history"),
        (lambda d: d.update(history=[]), "history"),
    ],
)
def test_tampered_checkpoint_meta_is_refused(tmp_path, tamper, culprit):
    from rankdown.training.train import TrainConfig, finetune

    cfg = TrainConfig(epochs=2, batch_size=16, max_steps_per_epoch=2, augment=False)
    ckpt = tmp_path / "ckpt"
    finetune(_small_net(), _synthetic(), cfg, checkpoint_dir=ckpt)
    meta = json.loads((ckpt / "last" / "meta.json").read_text())
    tamper(meta)
    (ckpt / "last" / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(RankdownError, match=culprit):
        finetune(_small_net(), _synthetic(), cfg, checkpoint_dir=ckpt, resume=True)


def test_checkpoint_without_optimizer_is_refused(tmp_path):
    from rankdown.training.train import TrainConfig, finetune

    cfg = TrainConfig(epochs=2, batch_size=16, max_steps_per_epoch=2, augment=False)
    ckpt = tmp_path / "ckpt"
    finetune(_small_net(), _synthetic(), cfg, checkpoint_dir=ckpt)
    state = torch.load(ckpt / "last" / "state.pt", weights_only=True)
    del state["optimizer"]
    torch.save(state, ckpt / "last" / "state.pt")
    with pytest.raises(RankdownError, match="state.pt lacks the optimizer"):
        finetune(_small_net(), _synthetic(), cfg, checkpoint_dir=ckpt, resume=True)


@pytest.mark.parametrize(
    "tamper",
    [
        lambda c: c["options"][0].update(error=float("nan")),
        lambda c: c["options"][0].update(error=-1.0),
        lambda c: c["options"][0].update(params=0.5),
        lambda c: c["options"][0].update(rank=10**9),
        lambda c: c.update(options=[]),
        lambda c: c["options"].reverse(),
    ],
)
def test_tampered_sensitivity_cache_is_recomputed(tmp_path, tamper):
    from rankdown.methods import get_method
    from rankdown.planning.allocate import sensitivity

    model = nets.tiny_vgg().eval()
    targets = {"features.3": get_method("channel-svd", nn.Conv2d), "classifier.1": get_method("svd", nn.Linear)}
    calib = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    computed: list[str] = []
    first = sensitivity(model, targets, calib, points=3, cache_dir=tmp_path, on_compute=computed.append)
    (cache,) = tmp_path.iterdir()
    d = json.loads(cache.read_text())
    tamper(d["curves"]["features.3"])
    cache.write_text(json.dumps(d))
    again = sensitivity(model, targets, calib, points=3, cache_dir=tmp_path, on_compute=computed.append)
    assert len(computed) == 2  # recomputed, not trusted
    assert [o.error for o in again["features.3"].options] == [o.error for o in first["features.3"].options]
    cache.write_text(json.dumps({"key": d["key"], "curves": []}))
    sensitivity(model, targets, calib, points=3, cache_dir=tmp_path, on_compute=computed.append)
    assert len(computed) == 3


def test_latency_table_drops_bad_entries_and_never_caches_contended_timings(tmp_path, monkeypatch):
    import rankdown.planning.latency as lat
    from rankdown.measurement.bench import Latency

    key = lat.DeviceKey.current("cpu", batch=1, threads=1)
    table = lat.LatencyTable(key, tmp_path, runs=2, guard=False)
    layer = nn.Conv2d(4, 4, 3)
    sig = table.signature(layer, (4, 8, 8))
    table.path.write_text(
        json.dumps(
            {"key": key.__dict__, "entries": {sig: float("nan"), "a": -1.0, "b": 0, "c": 1e12, "d": "1", "ok": 0.25}}
        )
    )
    assert lat.LatencyTable(key, tmp_path).entries == {"ok": 0.25}

    def contended(*a, **k):
        return Latency(1.0, 1.0, 1.0, 2, 1, 1, False, 0.9, 30, True)

    monkeypatch.setattr(lat, "measure_latency", contended)
    table = lat.LatencyTable(key, tmp_path, runs=2)
    assert table.time(layer, (4, 8, 8)) == 1.0 and table.measured == 1
    assert table.time(layer, (4, 8, 8)) == 1.0 and table.measured == 1  # reused within the run
    table.save()
    assert sig not in json.loads(table.path.read_text())["entries"]


# --------------------------------------------------------------------------- folders: replace, recover


def test_output_rules(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(OutputExistsError, match="current folder"):
        check_output_dir(".", force=True)
    with pytest.raises(OutputExistsError, match="current folder"):
        check_output_dir(tmp_path.parent, force=True)
    (tmp_path / "f").write_text("x")
    with pytest.raises(OutputExistsError, match="not a folder"):
        check_output_dir(tmp_path / "f", force=True)
    assert not is_rankdown_folder(tmp_path)


def test_a_kill_between_the_renames_is_recovered(tmp_path, saved):
    """The old folder renamed aside, the new one not yet in place: the next run puts it back."""
    original = snapshot(saved)
    script = f"""
import os, sys
sys.path.insert(0, {str(HERE)!r})
import torch, nets
from rankdown.planning.compress import CompressConfig, compress
from rankdown.planning.plan import save_compressed
from rankdown.planning.rank import ParamFraction
real = os.replace
def dying(src, dst):
    real(src, dst)
    if ".old-" in str(dst):
        os._exit(9)  # killed right after the old folder went aside
os.replace = dying
res = compress(nets.tiny_vgg(), CompressConfig("channel-svd", ParamFraction(0.3)), torch.zeros(1, 3, 16, 16))
save_compressed({str(saved)!r}, res.model, res.plan, force=True)
"""
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert p.returncode == 9, p.stderr
    assert not saved.exists()  # the kill left the output missing...
    assert any(".saved.old-" in q.name for q in tmp_path.iterdir())
    recover(saved)  # ...and the next run restores it, and removes the temporaries
    assert snapshot(saved) == original
    assert sorted(q.name for q in tmp_path.iterdir()) == ["saved"]


def test_stale_temporaries_of_dead_processes_are_cleaned(tmp_path, saved):
    dead = tmp_path / ".saved.tmp-999999999-abc"
    dead.mkdir()
    (dead / "plan.json").write_text("{}")
    alive = tmp_path / f".saved.tmp-{os.getpid()}-abc"
    alive.mkdir()
    foreign = tmp_path / ".saved.tmp-999999998-xyz"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("not ours")
    recover(saved)
    assert not dead.exists() and alive.exists() and foreign.exists()


# --------------------------------------------------------------------------- numerics


@pytest.mark.parametrize("scale", [1e-30, 1e-20, 1e20, 1e30])
def test_tucker2_and_cp_do_not_depend_on_the_weights_scale(scale):
    from rankdown import decompose

    w = torch.randn(16, 8, 3, 3, generator=torch.Generator().manual_seed(0))
    base_t, base_c = decompose.tucker2(w, (6, 4)), decompose.cp(w, 6)
    t, c = decompose.tucker2(w * scale, (6, 4)), decompose.cp(w * scale, 6)
    ws = (w * scale).double()
    assert float((t.to_tensor().double() - ws).norm() / ws.norm()) == pytest.approx(base_t.rel_error, rel=1e-3)
    assert float((c.to_tensor().double() - ws).norm() / ws.norm()) == pytest.approx(base_c.rel_error, rel=1e-3)


def test_all_zero_weights_factorize_for_every_method():
    from rankdown.methods import METHODS

    for (name, ltype), method in METHODS.items():
        layer = nn.Conv2d(8, 8, 3, padding=1) if ltype is nn.Conv2d else nn.Linear(16, 12)
        with torch.no_grad():
            layer.weight.zero_()
        fact = method.factorize(layer, next(iter(method.candidates(layer))))
        x = torch.randn(1, 8, 5, 5) if ltype is nn.Conv2d else torch.randn(2, 16)
        assert fact.module is not None and bool(torch.isfinite(fact.module(x)).all()), name


def test_monochromatic_recovers_planted_colours_every_time():
    from rankdown import decompose

    for i in range(40):
        g = torch.Generator().manual_seed(i)
        k, per = 2 + i % 6, 2 + (i // 6) % 5
        colours = torch.nn.functional.normalize(torch.randn(k, 3, generator=g, dtype=torch.float64), dim=1)
        which = torch.randperm(k * per, generator=g) % k
        w = torch.einsum("fc,fxy->fcxy", colours[which], torch.randn(k * per, 3, 3, generator=g, dtype=torch.float64))
        assert decompose.monochromatic(w, k).rel_error < 1e-8, i


# --------------------------------------------------------------------------- kills at random moments


def _state(folder: Path) -> str:
    """'old' (byte for byte), 'new' (complete: plan, weights and report that load), or what is wrong."""
    if not folder.exists():
        return "missing"
    names = sorted(p.name for p in folder.iterdir() if p.name != "checkpoints")
    if names != ["model.safetensors", "plan.json", "report.json"]:
        return f"incomplete {names}"
    json.loads((folder / "report.json").read_text())
    return "complete"


@pytest.mark.slow
def test_compress_killed_at_random_moments_leaves_old_or_new(tmp_path):
    out = tmp_path / "out"
    args = [sys.executable, "-c", "from rankdown.app.cli import run; run()", "compress", *TINY]
    args += ["--method", "channel-svd", "--params", "0.5", "--out", str(out), "--no-latency", "-q", "--force"]
    env = dict(os.environ, RANKDOWN_QUIET="1", PYTHONPATH=str(HERE))
    assert subprocess.run(args, env=env, capture_output=True).returncode == 0
    old = snapshot(out)
    t0 = time.perf_counter()
    assert subprocess.run(args, env=env, capture_output=True).returncode == 0
    duration = time.perf_counter() - t0
    gen = torch.Generator().manual_seed(0)
    for i in range(6):
        p = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(float(torch.rand(1, generator=gen)) * duration * 1.1)
        p.send_signal(signal.SIGKILL)
        p.wait()
        recover(out)  # what the next run does first
        state = "old" if out.exists() and snapshot(out) == old else _state(out)
        assert state in ("old", "complete"), (i, state)
        assert sorted(q.name for q in tmp_path.iterdir()) == ["out"], i
        old = snapshot(out)
    assert subprocess.run(args, env=env, capture_output=True).returncode == 0


@pytest.mark.slow
def test_finetune_is_all_new_or_all_old(tmp_path, fake_fashion, has_bundled_weights, monkeypatch):
    if not has_bundled_weights:
        pytest.skip("bundled weights not built yet")
    import rankdown.app.pipeline as pipe
    from rankdown.app.pipeline import MeasureOptions, run_finetune
    from rankdown.training.train import TrainConfig

    out = tmp_path / "out"
    model = pipe.build_model("fashion-vgg")
    config = CompressConfig("tucker2", ParamFraction(0.5), skip=("features.0",))
    res = compress(model, config, torch.zeros(1, 1, 28, 28))
    res.plan.model = "fashion-vgg"
    save_compressed(out, res.model, res.plan, {"rankdown": "x"})
    before = snapshot(out)
    opts = MeasureOptions(data_dir=str(fake_fashion), eval_limit=16, measure_latency=False)
    cfg = TrainConfig(epochs=1, batch_size=16, max_steps_per_epoch=2)

    def boom(*a, **k):
        raise RuntimeError("killed while measuring")

    monkeypatch.setattr(pipe, "remeasure", boom)
    with pytest.raises(RuntimeError, match="killed while measuring"):
        run_finetune(out, cfg, train_limit=32, opts=opts)
    after = snapshot(out)
    assert {k: v for k, v in after.items() if not k.startswith("checkpoints")} == before  # all old
    monkeypatch.undo()
    report = run_finetune(out, cfg, train_limit=32, opts=opts)
    assert report.finetune and report.finetune["history"] and _state(out) == "complete"
    assert (out / "checkpoints" / "last" / "meta.json").is_file()  # carried over into the new folder
    assert load_compressed(out, pipe.build_model("fashion-vgg", pretrained=False)) is not None
    assert sorted(q.name for q in tmp_path.iterdir()) == ["out"]
    shutil.rmtree(out)


# --------------------------------------------------------------------------- fuzzing a plan's fields

JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=12,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    field=st.sampled_from(["rank", "weight_shape", "layer_type", "method", "input_shape", "meta", "model"]), value=JSON
)
def test_any_json_in_a_plan_field_is_a_plan_or_a_plan_error(saved, field, value):
    """Whatever a tampered plan holds, loading it gives the model or a PlanError: never another
    exception, never an allocation it did not check."""
    from rankdown.errors import PlanError
    from rankdown.planning.plan import Plan, apply_plan

    d = json.loads((saved / "plan.json").read_text())
    if field in ("input_shape", "meta", "model"):
        d[field] = value
    else:
        d["layers"]["features.3"][field] = value
    try:
        plan = Plan.from_dict(d)
        apply_plan(nets.tiny_vgg(), plan)
    except PlanError:
        pass


@pytest.mark.slow
def test_finetune_killed_at_random_moments_leaves_old_or_new(tmp_path, fake_fashion, has_bundled_weights):
    if not has_bundled_weights:
        pytest.skip("bundled weights not built yet")
    from rankdown.zoo import build_model

    out = tmp_path / "out"
    config = CompressConfig("tucker2", ParamFraction(0.5), skip=("features.0",))
    res = compress(build_model("fashion-vgg"), config, torch.zeros(1, 1, 28, 28))
    res.plan.model = "fashion-vgg"
    save_compressed(out, res.model, res.plan, {"rankdown": "x"})
    args = [sys.executable, "-c", "from rankdown.app.cli import run; run()", "finetune", str(out)]
    args += ["--data-dir", str(fake_fashion), "--eval-limit", "16", "--train-limit", "32", "--epochs", "1"]
    args += ["--batch-size", "16", "--no-latency", "-q"]
    env = dict(os.environ, RANKDOWN_QUIET="1")

    def ours(folder: Path) -> dict:
        return {k: v for k, v in snapshot(folder).items() if not k.startswith("checkpoints")}

    old = ours(out)
    t0 = time.perf_counter()
    assert subprocess.run(args, env=env, capture_output=True).returncode == 0
    duration = time.perf_counter() - t0
    gen = torch.Generator().manual_seed(1)
    for i in range(4):
        old = ours(out)
        p = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(float(torch.rand(1, generator=gen)) * duration * 1.1)
        p.send_signal(signal.SIGKILL)
        p.wait()
        recover(out)
        recover(out / "checkpoints" / "last")
        state = "old" if out.exists() and ours(out) == old else _state(out)
        assert state in ("old", "complete"), (i, state)
        assert sorted(q.name for q in tmp_path.iterdir()) == ["out"], i
