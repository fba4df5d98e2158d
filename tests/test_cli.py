"""The command line end to end, on a small slice of data."""

import json
import subprocess
import sys

import pytest
from click.testing import CliRunner
from safetensors.torch import save_file

from nets import tiny_vgg  # noqa: F401  (model spec nets:tiny_vgg below)
from rankdown.app.cli import main

FAST = ["--latency-runs", "2", "--batch-sizes", "1,4", "--no-guard", "-q"]


def run(args, **kw):
    res = CliRunner().invoke(main, args, catch_exceptions=False, standalone_mode=False, **kw)
    return res


def cli(args, tmp_path):
    """The real entry point (``rankdown.app.cli.run``, with its exit statuses and one-line errors),
    run in this process: the CLI tests pay no interpreter start-up. ``test_entry_point_in_a_process``
    checks the same entry point through a real process once."""
    import contextlib
    import io
    import os
    from types import SimpleNamespace

    import torch

    from rankdown.app.cli import run as entry

    out, err = io.StringIO(), io.StringIO()
    old_argv, old_cwd, old_quiet, threads = (
        sys.argv,
        os.getcwd(),
        os.environ.get("RANKDOWN_QUIET"),
        torch.get_num_threads(),
    )
    sys.argv = ["rankdown", *map(str, args)]
    os.environ["RANKDOWN_QUIET"] = "1"
    os.chdir(tmp_path)
    code = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            entry()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        sys.argv = old_argv
        os.chdir(old_cwd)
        if old_quiet is None:
            os.environ.pop("RANKDOWN_QUIET", None)
        else:
            os.environ["RANKDOWN_QUIET"] = old_quiet
        torch.set_num_threads(threads)
    return SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())


def cli_process(args, tmp_path):
    """Through a real process, as a user runs it."""
    return subprocess.run(
        [sys.executable, "-m", "rankdown", *args], cwd=tmp_path, capture_output=True, text=True, env=_env()
    )


def _env():
    import os
    from pathlib import Path

    env = dict(os.environ, RANKDOWN_QUIET="1")
    env["PYTHONPATH"] = str(Path(__file__).parent) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def test_compress_user_model_then_eval(tmp_path):
    out = tmp_path / "out"
    p = cli(
        [
            "compress",
            "--model",
            "nets:tiny_vgg",
            "--input-shape",
            "3,16,16",
            "--method",
            "channel-svd",
            "--params",
            "0.5",
            "--out",
            str(out),
            *FAST,
        ],
        tmp_path,
    )
    assert p.returncode == 0, p.stderr
    assert "model total" in p.stdout and "latency batch 1" in p.stdout
    report = json.loads((out / "report.json").read_text())
    assert report["totals"]["params_reduction"] > 1.5
    assert {r["name"] for r in report["layers"] if r["method"]} >= {"features.3", "classifier.1"}
    assert report["latency"]["batch_4"]["speedup"] > 0 and report["accuracy"] is None
    assert report["environment"]["torch"]
    # A saved folder never chooses code to run: the factory is named by the user.
    p = cli(["eval", str(out), *FAST], tmp_path)
    assert p.returncode == 2 and "pass --model nets:tiny_vgg" in p.stderr
    p = cli(["eval", str(out), "--model", "nets:tiny_vgg", "--json", str(tmp_path / "again.json"), *FAST], tmp_path)
    assert p.returncode == 0, p.stderr
    again = json.loads((tmp_path / "again.json").read_text())
    assert again["totals"] == report["totals"]


def test_compress_bundled_model_on_data_slice(tmp_path, fake_fashion, has_bundled_weights):
    if not has_bundled_weights:
        pytest.skip("bundled weights not built yet")
    out = tmp_path / "out"
    p = cli(
        [
            "compress",
            "--model",
            "fashion-vgg",
            "--method",
            "tucker2",
            "--params",
            "0.5",
            "--out",
            str(out),
            "--data-dir",
            str(fake_fashion),
            "--eval-limit",
            "32",
            *FAST,
        ],
        tmp_path,
    )
    assert p.returncode == 0, p.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["accuracy"]["n"] == 32 and 0 <= report["accuracy"]["after"] <= 1
    skipped = {r["name"]: r["note"] for r in report["layers"] if not r["method"]}
    assert set(skipped) == {"features.0", "classifier.5"}
    p = cli(["eval", str(out), "--data-dir", str(fake_fashion), "--eval-limit", "16", *FAST], tmp_path)
    assert p.returncode == 0, p.stderr and "n=16" in p.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["--rank", "0"], "Invalid value for '--rank'"),
        (["--rank", "100000"], "exceeds the largest rank"),
        (["--params", "1.5"], "params fraction must be a fraction in (0, 1]"),
        (["--params", "0.5", "--rank", "3"], "give one rank policy"),
        (["--layers", "features.99"], "no layer named 'features.99'"),
        (["--layers", "features.2"], "no method handles ReLU"),
        (["--method", "pca"], "unknown method 'pca'"),
    ],
)
def test_bad_arguments_fail_clearly_and_write_nothing(tmp_path, args, message):
    out = tmp_path / "out"
    p = cli(
        [
            "compress",
            "--model",
            "nets:tiny_vgg",
            "--input-shape",
            "3,16,16",
            "--out",
            str(out),
            "--no-latency",
            "-q",
            *args,
        ],
        tmp_path,
    )
    assert p.returncode == 2, p.stdout + p.stderr
    assert message in p.stderr
    assert "Traceback" not in p.stderr
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_bad_files_fail_clearly(tmp_path):
    (tmp_path / "bad.safetensors").write_bytes(b"junk")
    for args, message in (
        (["--weights", str(tmp_path / "missing.pt")], "does not exist"),
        (["--weights", str(tmp_path / "bad.safetensors")], "could not be read"),
        (["--model", "nets:nope"], "has no attribute 'nope'"),
        (["--model", "fashion-vgg", "--data-dir", str(tmp_path / "nodata")], "apt-get install dataset-fashion-mnist"),
    ):
        base = ["compress", "--model", "nets:tiny_vgg", "--input-shape", "3,16,16"]
        if args[0] == "--model":
            base = ["compress", "--input-shape", "1,28,28"]
        p = cli([*base, "--out", str(tmp_path / "o"), "--no-latency", "-q", *args], tmp_path)
        assert p.returncode == 2 and message in p.stderr, (args, p.stderr)
        assert not (tmp_path / "o").exists()


def test_non_empty_output_needs_force(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    base = ["compress", "--model", "nets:tiny_vgg", "--input-shape", "3,16,16", "--out", str(out), "--no-latency", "-q"]
    p = cli(base, tmp_path)
    assert p.returncode == 2 and "not empty" in p.stderr and "--force" in p.stderr
    assert [f.name for f in out.iterdir()] == ["keep.txt"]
    p = cli([*base, "--force"], tmp_path)  # not rankdown's folder: --force does not delete it
    assert p.returncode == 2 and "not a rankdown output (it holds keep.txt)" in p.stderr
    assert [f.name for f in out.iterdir()] == ["keep.txt"]
    (out / "keep.txt").unlink()
    assert cli(base, tmp_path).returncode == 0
    p = cli([*base, "--force"], tmp_path)  # rankdown's own output: replaced
    assert p.returncode == 0, p.stderr
    assert sorted(f.name for f in out.iterdir()) == ["model.safetensors", "plan.json", "report.json"]
    assert sorted(f.name for f in tmp_path.iterdir()) == ["out"]


def test_user_weights_and_eval_of_broken_folder(tmp_path):
    import torch

    from rankdown.zoo import build_model

    m = build_model("nets:tiny_vgg")
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(tmp_path / "w.safetensors"))
    out = tmp_path / "out"
    p = cli(
        [
            "compress",
            "--model",
            "nets:tiny_vgg",
            "--weights",
            str(tmp_path / "w.safetensors"),
            "--input-shape",
            "3,16,16",
            "--energy",
            "0.9",
            "--out",
            str(out),
            "--no-latency",
            "-q",
        ],
        tmp_path,
    )
    assert p.returncode == 0, p.stderr
    assert json.loads((out / "plan.json").read_text())["meta"]["source_weights"].endswith("w.safetensors")
    (out / "model.safetensors").write_bytes(b"corrupt")
    p = cli(["eval", str(out), "--model", "nets:tiny_vgg", "--no-latency", "-q"], tmp_path)
    assert p.returncode == 2 and "could not be read" in p.stderr
    p = cli(["eval", str(tmp_path), "--no-latency", "-q"], tmp_path)
    assert p.returncode == 2 and "no plan.json" in p.stderr
    assert torch.is_tensor(next(iter(m.state_dict().values())))


def test_methods_and_help():
    assert "tucker2" in run(["methods"]).output


def test_entry_point_in_a_process(tmp_path):
    """The one CLI test through a real process: help, a user error (one line, status 2, nothing
    written) and a bug-free run's status, as a shell sees them."""
    p = cli_process(["--help"], tmp_path)
    assert p.returncode == 0 and "compress" in p.stdout
    args = ["compress", "--model", "nets:tiny_vgg", "--input-shape", "3,16,16", "--rank", "-3", "--out", "o"]
    p = cli_process(args, tmp_path)
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1 and "--rank" in p.stderr
    assert not (tmp_path / "o").exists()
    p = cli_process(["methods"], tmp_path)
    assert p.returncode == 0 and "tucker2" in p.stdout


def test_analyze_and_global_budget(tmp_path):
    out = tmp_path / "an"
    p = cli(
        [
            "analyze",
            "nets:tiny_vgg",
            "--input-shape",
            "3,16,16",
            "--calib-data",
            "noise",
            "--calibration",
            "8",
            "--cache-dir",
            str(tmp_path / "cache"),
            "--out",
            str(out),
        ],
        tmp_path,
    )
    assert p.returncode == 0, p.stderr
    assert sorted(f.name for f in out.iterdir()) == ["analysis.json", "energy.png", "sensitivity.png", "spectra.png"]
    assert "EVBMF" in p.stdout
    result = json.loads((out / "analysis.json").read_text())
    assert {r["name"] for r in result["layers"]} >= {"features.3", "classifier.1"}
    comp = tmp_path / "comp"
    p = cli(
        [
            "compress",
            "--model",
            "nets:tiny_vgg",
            "--input-shape",
            "3,16,16",
            "--calib-data",
            "noise",
            "--speedup",
            "2",
            "--calibration",
            "8",
            "--sensitivity",
            "layer",
            "--cache-dir",
            str(tmp_path / "cache"),
            "--out",
            str(comp),
            "--no-latency",
            "-q",
        ],
        tmp_path,
    )
    assert p.returncode == 0, p.stderr
    report = json.loads((comp / "report.json").read_text())
    assert 2.0 <= report["totals"]["macs_reduction"] < 2.3
    assert json.loads((comp / "plan.json").read_text())["meta"]["allocation"]["budget"] == {"speedup": 2.0}
    p = cli(
        [
            "compress",
            "--model",
            "nets:tiny_vgg",
            "--input-shape",
            "3,16,16",
            "--calib-data",
            "noise",
            "--speedup",
            "200",
            "--calibration",
            "8",
            "--cache-dir",
            str(tmp_path / "cache"),
            "--out",
            str(tmp_path / "x"),
            "--no-latency",
            "-q",
        ],
        tmp_path,
    )
    assert p.returncode == 2 and "target unreachable" in p.stderr
    # No silent fallback: a data-aware option without data names the flag that provides it.
    p = cli(
        ["compress", *("--model", "nets:tiny_vgg", "--input-shape", "3,16,16", "--speedup", "2", "--out", "y")],
        tmp_path,
    )
    assert p.returncode == 2 and "needs calibration data: give --calib-data" in p.stderr
    assert not (tmp_path / "y").exists()


def test_finetune_train_and_resume_on_data_slice(tmp_path, fake_fashion, has_bundled_weights):
    if not has_bundled_weights:
        pytest.skip("bundled weights not built yet")
    data = ["--data-dir", str(fake_fashion), "--eval-limit", "16"]
    out = tmp_path / "out"
    p = cli(
        [
            "compress",
            "--method",
            "tucker2",
            "--params",
            "0.5",
            "--out",
            str(out),
            "--finetune-epochs",
            "1",
            "--train-limit",
            "32",
            "--batch-size",
            "16",
            "--distill",
            "0.5",
            "--no-latency",
            "-q",
            *data,
        ],
        tmp_path,
    )
    assert p.returncode == 0, p.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["finetune"]["history"][0]["epoch"] == 1 and report["finetune"]["config"]["distill"] == 0.5
    # each stage's seconds, in the order they ran
    assert list(report["seconds"]) == ["checks and data", "factorization", "fine-tuning", "measurement"]
    p = cli(
        [
            "finetune",
            str(out),
            "--epochs",
            "2",
            "--train-limit",
            "32",
            "--batch-size",
            "16",
            "--freeze-dense",
            "--no-latency",
            "-q",
            *data,
        ],
        tmp_path,
    )
    assert p.returncode == 0, p.stderr
    assert "accuracy before fine-tuning" in p.stdout
    assert json.loads((out / "checkpoints/last/meta.json").read_text())["epoch"] == 2
    p = cli(
        [
            "finetune",
            str(out),
            "--epochs",
            "2",
            "--train-limit",
            "32",
            "--batch-size",
            "16",
            "--freeze-dense",
            "--resume",
            "--no-latency",
            "-q",
            *data,
        ],
        tmp_path,
    )
    assert p.returncode == 0, p.stderr
    assert [h["epoch"] for h in json.loads((out / "report.json").read_text())["finetune"]["history"]] == [1, 2]
    p = cli(
        [
            "finetune",
            str(out),
            "--epochs",
            "3",
            "--train-limit",
            "32",
            "--batch-size",
            "16",
            "--freeze-dense",
            "--resume",
            "--no-latency",
            "-q",
            *data,
        ],
        tmp_path,
    )
    assert p.returncode == 2 and "epochs (2 -> 3)" in p.stderr
    # Dense training with Force Regularization writes safetensors, and will not overwrite without --force.
    w = tmp_path / "fr.safetensors"
    args = [
        "train",
        "--force-reg",
        "1e-3",
        "--train-limit",
        "32",
        "--batch-size",
        "16",
        "--data-dir",
        str(fake_fashion),
        "--out",
        str(w),
        "-q",
    ]
    p = cli(args, tmp_path)
    assert p.returncode == 0, p.stderr
    assert w.is_file()
    p = cli(args, tmp_path)
    assert p.returncode == 2 and "--force" in p.stderr
    p = cli(["train", "--model", "nets:tiny_vgg", "--out", str(tmp_path / "x.safetensors"), "-q"], tmp_path)
    assert p.returncode == 2 and "no bundled dataset" in p.stderr


def test_bench_and_latency_aware_compress(tmp_path):
    out = tmp_path / "out"
    p = cli(
        [
            "compress",
            "--model",
            "nets:tiny_vgg",
            "--input-shape",
            "3,16,16",
            "--calib-data",
            "noise",
            "--latency-aware",
            "--sensitivity",
            "model",
            "--error-scope",
            "sum",
            "--max-error",
            "0.6",
            "--methods",
            "tucker2,separable,svd",
            "--calibration",
            "8",
            "--cache-dir",
            str(tmp_path / "c"),
            "--out",
            str(out),
            "--no-latency",
            "--no-guard",
            "-q",
        ],
        tmp_path,
    )
    assert p.returncode == 0, p.stderr
    assert (
        "latency-aware, model error summed"
        in json.loads((out / "plan.json").read_text())["meta"]["policy"]["layer_ranks"]
    )
    p = cli(
        [
            "bench",
            str(out),
            "--model",
            "nets:tiny_vgg",
            "--per-layer",
            "--fold-bn",
            "--runs",
            "2",
            "--batch-sizes",
            "1,2",
            "--no-guard",
            "--json",
            str(tmp_path / "b.json"),
            "-q",
        ],
        tmp_path,
    )
    assert p.returncode == 0, p.stderr
    res = json.loads((tmp_path / "b.json").read_text())
    assert [r["batch"] for r in res["end_to_end"]] == [1, 2] and "ratio" in res["end_to_end"][0]
    p = cli(
        ["bench", "nets:tiny_vgg", "--input-shape", "3,16,16", "--runs", "2", "--batch-sizes", "1", "--no-guard", "-q"],
        tmp_path,
    )
    assert p.returncode == 0 and "model ms" in p.stdout, p.stderr
    p = cli(["bench", "nets:tiny_vgg", "--input-shape", "3,16,16", "--device", "cuda", "-q"], tmp_path)
    if not __import__("torch").cuda.is_available():
        assert p.returncode == 2 and "no CUDA device" in p.stderr
    p = cli(
        [
            "compress",
            "--model",
            "nets:tiny_vgg",
            "--input-shape",
            "3,16,16",
            "--calib-data",
            "noise",
            "--latency-aware",
            "--rank",
            "4",
            "--out",
            str(tmp_path / "x"),
            "-q",
        ],
        tmp_path,
    )
    assert p.returncode == 2 and "chooses ranks itself" in p.stderr
    p = cli(
        [
            "compress",
            "--model",
            "nets:tiny_vgg",
            "--input-shape",
            "3,16,16",
            "--error-scope",
            "sum",
            "--out",
            str(tmp_path / "y"),
            "-q",
        ],
        tmp_path,
    )
    assert p.returncode == 2 and "--error-scope: only used with --latency-aware" in p.stderr
    assert not (tmp_path / "y").exists()


def test_round_to_without_a_global_budget_is_refused(tmp_path, capsys):
    from test_reliability import in_process

    args = ["compress", "--model", "nets:tiny_vgg", "--input-shape", "3,16,16", "--params", "0.5", "--round-to", "8"]
    code, _, err = in_process([*args, "--out", "y", "-q"], capsys, tmp_path)
    assert code == 2 and "--round-to: only used with a global budget" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "y").exists()


def test_a_flag_no_step_uses_is_refused_not_ignored(tmp_path, capsys):
    """--calibration only counts examples; it no longer switches reconstruction on by itself, so
    alone (like the reconstruction options without --reconstruct) it would do nothing: refused."""
    from test_reliability import in_process

    base = ["compress", "--model", "nets:tiny_vgg", "--input-shape", "3,16,16", "--params", "0.5", "--out", "y", "-q"]
    for extra, said in (
        (["--calibration", "8"], "--calibration: no step uses calibration examples"),
        (["--linear-response"], "--linear-response: only used with --reconstruct data or joint"),
        (["--calibration-epochs", "3"], "--calibration-epochs: only used with --reconstruct data or joint"),
    ):
        code, _, err = in_process([*base, *extra], capsys, tmp_path)
        assert code == 2 and said in err and len(err.strip().splitlines()) == 1, (extra, err)
        assert not (tmp_path / "y").exists()


def test_compress_progressive_on_bundled_model(tmp_path, fake_fashion, has_bundled_weights):
    if not has_bundled_weights:
        pytest.skip("bundled weights not built yet")
    out = tmp_path / "out"
    args = ["compress", "--model", "fashion-vgg", "--method", "channel-svd", "--macs", "0.5", "--layers", "features.3"]
    args += ["--layers", "features.7", "--progressive-steps", "2", "--batch-size", "16", "--out", str(out)]
    p = cli([*args, "--data-dir", str(fake_fashion), "--eval-limit", "32", *FAST], tmp_path)
    assert p.returncode == 0, p.stderr
    plan = json.loads((out / "plan.json").read_text())
    assert plan["meta"]["progressive"]["steps_per_layer"] == 2 and set(plan["layers"]) == {"features.3", "features.7"}
    p = cli([*args, "--force", "--reconstruct", "joint", "--data-dir", str(fake_fashion), *FAST], tmp_path)
    assert p.returncode == 2 and "--progressive-steps" in p.stderr


def test_a_saved_folder_is_measured_after_its_dense_weights_file_has_gone(tmp_path, capsys):
    from rankdown.zoo import build_model
    from test_reliability import in_process

    m = build_model("nets:tiny_vgg")
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(tmp_path / "w.safetensors"))
    args = ["compress", "--model", "nets:tiny_vgg", "--weights", "w.safetensors", "--input-shape", "3,16,16"]
    code, _, err = in_process([*args, "--energy", "0.9", "--out", "out", "--no-latency", "-q"], capsys, tmp_path)
    assert code == 0, err
    (tmp_path / "w.safetensors").unlink()
    code, _, err = in_process(["eval", "out", "--model", "nets:tiny_vgg", "--no-latency", "-q"], capsys, tmp_path)
    assert code == 0, err
    totals = json.loads((tmp_path / "out" / "report.json").read_text())["totals"]
    assert totals["params_before"] == sum(p.numel() for p in m.parameters())  # from the architecture
    assert totals["params_reduction"] > 1
