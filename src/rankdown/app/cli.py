"""``rankdown`` command line: thin wrappers over rankdown.app.pipeline."""

from __future__ import annotations

import json
import math
import os
import sys
from typing import TYPE_CHECKING

import click
import torch

from rankdown.errors import RankdownError

if TYPE_CHECKING:
    from rankdown.app.report import Report


class Finite(click.ParamType):
    """A finite float (NaN and ±inf refused) within optional bounds: click's FloatRange lets NaN
    through every bound, and inf through an open one."""

    name = "float"

    def __init__(self, low: float | None = None, high: float | None = None, *, low_open: bool = False) -> None:
        self.low, self.high, self.low_open = low, high, low_open

    def convert(self, value, param, ctx):
        if isinstance(value, float):
            v = value
        else:
            try:
                v = float(value)
            except (TypeError, ValueError):
                self.fail(f"{value!r} is not a number", param, ctx)
        if not math.isfinite(v):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        if self.low is not None and (v < self.low or (self.low_open and v == self.low)):
            self.fail(f"{v:g} must be {'>' if self.low_open else '>='} {self.low:g}", param, ctx)
        if self.high is not None and v > self.high:
            self.fail(f"{v:g} must be <= {self.high:g}", param, ctx)
        return v


POSITIVE = Finite(0.0, low_open=True)
NON_NEGATIVE = Finite(0.0)
SEED = click.IntRange(0, 2**63 - 1)


def _threads(_ctx, param, value: int | None) -> int | None:
    cpus = os.cpu_count() or 1
    if value is not None and not 1 <= value <= cpus:
        raise click.BadParameter(f"{value} threads: this machine has {cpus} CPUs", param=param)
    return value


def _selectors(_ctx, param, values: tuple[str, ...]) -> tuple[str, ...]:
    """Layer names or re:PATTERN, checked before any work: no empty name, no broken pattern."""
    from rankdown.surgery import check_selectors

    try:
        check_selectors(values)
    except RankdownError as exc:
        raise click.BadParameter(str(exc), param=param) from None
    return values


def _method_list(_ctx, param, value: str) -> list[str]:
    from rankdown.methods import method_names

    names = [v.strip() for v in value.split(",") if v.strip()]
    unknown = [n for n in names if n not in method_names()]
    if not names or unknown:
        raise click.BadParameter(
            f"unknown method {', '.join(map(repr, unknown)) or '(none given)'}; known: {', '.join(method_names())}",
            param=param,
        )
    return names


def _shape(_ctx, _param, value: str | None) -> tuple[int, ...] | None:
    if value is None:
        return None
    try:
        shape = tuple(int(v) for v in value.replace("x", ",").split(","))
    except ValueError:
        raise click.BadParameter(f"expected sizes like 3,224,224, got {value!r}") from None
    if not shape or any(d <= 0 for d in shape) or math.prod(shape) > 2**31:
        raise click.BadParameter(f"sizes must be positive (and hold at most 2**31 values), got {value!r}")
    return shape


def _batches(_ctx, _param, value: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(v) for v in value.split(",") if v)
    except ValueError:
        raise click.BadParameter(f"expected batch sizes like 1,64, got {value!r}") from None
    if not sizes or any(not 0 < b <= 65536 for b in sizes):
        raise click.BadParameter(f"batch sizes must be positive, got {value!r}")
    return sizes


def _json_path(_ctx, _param, value: str | None) -> str | None:
    """Checked before any work: a --json path rankdown may write (a new file, or a report of its own)."""
    if value is not None:
        from rankdown.storage import check_output_file, is_rankdown_report

        check_output_file(value, "--json", ours=is_rankdown_report)
    return value


def _measure_options(f):
    opts = [
        click.option(
            "--data-dir",
            type=click.Path(file_okay=False),
            default=None,
            help="Folder with the dataset's files (default: the Debian package's, or $RANKDOWN_DATA_DIR).",
        ),
        click.option(
            "--eval-limit",
            type=click.IntRange(min=1),
            default=None,
            help="Score accuracy on the first N test examples only (default: all).",
        ),
        click.option(
            "--batch-sizes",
            default="1,64",
            show_default=True,
            callback=_batches,
            help="Batch sizes at which latency is measured.",
        ),
        click.option(
            "--latency-runs",
            type=click.IntRange(min=1),
            default=30,
            show_default=True,
            help="Timed runs per measurement (median reported).",
        ),
        click.option(
            "--threads",
            type=int,
            default=min(2, os.cpu_count() or 1),
            show_default=True,
            callback=_threads,
            help="CPU threads for latency.",
        ),
        click.option("--no-latency", is_flag=True, help="Skip latency measurement."),
        click.option(
            "--no-guard",
            is_flag=True,
            help="Do not discard timing windows during which other processes loaded the CPU.",
        ),
        click.option(
            "--json",
            "json_out",
            type=click.Path(dir_okay=False),
            default=None,
            callback=_json_path,
            help="Also write the report to this file.",
        ),
        click.option("-q", "--quiet", is_flag=True, help="No progress bars."),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


def _saved_model_option(f):
    return click.option(
        "--model",
        "model_spec",
        default=None,
        help="The package.module:factory that builds the original model, for a folder made from your own "
        "model (a saved folder never chooses code to run; bundled models need nothing).",
    )(f)


def _floats(_ctx, param, value: str | None) -> tuple[float, ...] | None:
    if value is None:
        return None
    try:
        vals = tuple(float(v) for v in value.split(","))
    except ValueError:
        raise click.BadParameter(f"expected numbers like 0.485,0.456,0.406, got {value!r}", param=param) from None
    if not vals or not all(math.isfinite(v) for v in vals):
        raise click.BadParameter(f"expected finite numbers, got {value!r}", param=param)
    return vals


def _sizes(_ctx, param, value: str | None) -> int | tuple[int, int] | None:
    if value is None:
        return None
    try:
        vals = tuple(int(v) for v in value.replace("x", ",").split(","))
    except ValueError:
        raise click.BadParameter(f"expected a size like 224 or 224,224, got {value!r}", param=param) from None
    if len(vals) not in (1, 2) or any(not 0 < v <= 16384 for v in vals):
        raise click.BadParameter(f"expected one or two positive sizes, got {value!r}", param=param)
    return vals[0] if len(vals) == 1 else (vals[0], vals[1])


def _data_options(roles: tuple[str, ...]):
    """--calib-data / --eval-data / --train-data and how images become tensors."""
    helps = {
        "calib": "Calibration data for every data-aware step (sensitivity, metrics, reconstruction, latency "
        "error budgets): an image folder (class sub-folders = labels), a .safetensors/.npz (inputs, labels) "
        "or .npy file, package.module:function returning a DataLoader, or noise (seeded Gaussian inputs). "
        "Defaults to --train-data, else --eval-data.",
        "eval": "Data the report's quality numbers are measured on (accuracy with labels; agreement with the "
        "dense model always). Defaults to --calib-data (the report says so).",
        "train": "Data to fine-tune on (task loss with labels, distillation from the dense model without). "
        "Defaults to --calib-data.",
    }

    def deco(f):
        opts = [click.option(f"--{r}-data", f"{r}_data", default=None, help=helps[r]) for r in roles]
        opts += [
            click.option(
                "--preset",
                type=click.Choice(["imagenet", "none"]),
                default=None,
                help="Image preprocessing preset (imagenet: resize 256, crop 224, ImageNet mean/std).",
            ),
            click.option("--image-size", callback=_sizes, default=None, help="Resize images: shorter side, or H,W."),
            click.option("--crop", callback=_sizes, default=None, help="Center-crop images to this size (or H,W)."),
            click.option("--mean", callback=_floats, default=None, help="Per-channel mean subtracted from x/255."),
            click.option("--std", callback=_floats, default=None, help="Per-channel std dividing (x/255 - mean)."),
            click.option("--grayscale", is_flag=True, help="Read images as one channel (else RGB)."),
            click.option(
                "--seq-len",
                type=click.IntRange(2, 1 << 20),
                default=256,
                show_default=True,
                help="Text data (text:FILE, with --model hf:PATH): tokens per sequence.",
            ),
            click.option(
                "--sequences",
                type=click.IntRange(min=1),
                default=None,
                help="Text data: use at most this many sequences of each file (default: all).",
            ),
            click.option(
                "--eval",
                "eval_metric",
                default=None,
                help="Your own quality metric: package.module:function(model, data) -> dict of name -> number.",
            ),
        ]
        for opt in reversed(opts):
            f = opt(f)
        return f

    return deco


def _text_options(kw: dict, model_spec: str | None, specs: list[str]) -> dict | None:
    """Tokenizer and sequence options for text data: the tokenizer is the hf: model's own."""
    seq_len, sequences = kw.pop("seq_len", 256), kw.pop("sequences", None)
    from rankdown.data.text import is_text_spec

    if not any(is_text_spec(s) for s in specs):
        return None
    from rankdown.models.hf import is_hf, load_tokenizer, task_of_spec

    if model_spec is None or not is_hf(model_spec):
        return {}
    return {
        "tokenizer": load_tokenizer(model_spec),
        "seq_len": seq_len,
        "sequences": sequences,
        "task": task_of_spec(model_spec),
    }


def _open_data(kw: dict, input_shape=None, model_spec: str | None = None) -> tuple[dict, object]:
    """The data sources given on the command line, each opened (and checked) before any work;
    the same source given twice is opened once. Pops the data options from ``kw``."""
    import dataclasses as dc

    from rankdown.data.sources import PRESETS, ImageOptions, open_data

    text = _text_options(kw, model_spec, [v for k, v in kw.items() if k.endswith("_data") and v])

    preset = kw.pop("preset", None)
    base = PRESETS[preset] if preset else ImageOptions()
    changes = {
        k: v
        for k, v in {
            "size": kw.pop("image_size", None),
            "crop": kw.pop("crop", None),
            "mean": kw.pop("mean", None),
            "std": kw.pop("std", None),
        }.items()
        if v is not None
    }
    if kw.pop("grayscale", False):
        changes["grayscale"] = True
    images = dc.replace(base, **changes)
    metric_spec = kw.pop("eval_metric", None)
    metric_fn = None
    if metric_spec is not None:
        from rankdown.models.load import resolve_factory

        metric_fn = resolve_factory(metric_spec)
    opened: dict[str, object] = {}
    data = {}
    for role in ("calib", "eval", "train"):
        spec = kw.pop(f"{role}_data", None)
        if spec is None:
            continue
        if spec not in opened:
            opened[spec] = open_data(spec, f"--{role}-data", image_options=images, input_shape=input_shape, text=text)
        data[role] = opened[spec]
    return data, metric_fn


def _saved_spec(folder: str, model_spec: str | None) -> str | None:
    """The model a saved folder is rebuilt from (for its tokenizer); None when unknown here (the
    pipeline then says what is wrong)."""
    if model_spec is not None:
        return model_spec
    from rankdown.errors import RankdownError
    from rankdown.planning.plan import read_plan

    try:
        return read_plan(folder).model
    except RankdownError:
        return None


def _given(param: str) -> bool:
    """Whether the user set ``param`` (rather than click filling in its default)."""
    source = click.get_current_context().get_parameter_source(param)
    return source is not None and source.name != "DEFAULT"


def _opts(data_dir, eval_limit, batch_sizes, latency_runs, threads, no_latency, no_guard):
    from rankdown.app.pipeline import MeasureOptions

    return MeasureOptions(
        data_dir=data_dir,
        eval_limit=eval_limit,
        batch_sizes=batch_sizes,
        latency_runs=latency_runs,
        threads=threads,
        guard=not no_guard,
        measure_latency=not no_latency,
    )


def _finish(report: Report, json_out: str | None) -> None:
    from rankdown.app.report import render

    render(report)
    if json_out:
        from pathlib import Path

        from rankdown.storage import atomic_write_text

        atomic_write_text(Path(json_out), json.dumps(report.to_dict(), indent=2) + "\n")


def _train_options(f):
    opts = [
        click.option("--lr", type=POSITIVE, default=1e-3, show_default=True, help="AdamW peak learning rate."),
        click.option("--batch-size", type=click.IntRange(1, 65536), default=128, show_default=True),
        click.option("--weight-decay", type=NON_NEGATIVE, default=1e-4, show_default=True),
        click.option(
            "--distill",
            type=Finite(0.0, 1.0),
            default=0.0,
            show_default=True,
            help="Weight of distillation from the dense model (KL on logits, T=4) against the task loss.",
        ),
        click.option("--freeze-dense", is_flag=True, help="Train only the factorized layers."),
        click.option("--seed", type=SEED, default=0, show_default=True),
        click.option(
            "--train-limit", type=click.IntRange(min=1), default=None, help="Use the first N training examples only."
        ),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


def _train_config(epochs, lr, batch_size, weight_decay, distill, freeze_dense, seed, **extra):
    from rankdown.training.train import TrainConfig

    return TrainConfig(
        epochs=epochs,
        lr=lr,
        batch_size=batch_size,
        weight_decay=weight_decay,
        distill=distill,
        freeze_dense=freeze_dense,
        seed=seed,
        **extra,
    )


def _progressive_config(steps, lr, batch_size, weight_decay, seed):
    if not steps:
        return None
    return _train_config(1, lr, batch_size, weight_decay, 0.0, False, seed, max_steps_per_epoch=steps)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="rankdown")
def main() -> None:
    """Make trained PyTorch networks faster and smaller by low-rank factorization."""


@main.command()
@click.option(
    "--model",
    "model_spec",
    default="fashion-vgg",
    show_default=True,
    help="A bundled model name or package.module:factory for your own nn.Module.",
)
@click.option(
    "--weights",
    type=click.Path(dir_okay=False),
    default=None,
    help="State dict for the model (.safetensors, or a torch file read with weights_only=True).",
)
@click.option(
    "--input-shape",
    callback=_shape,
    default=None,
    help="One example's shape without the batch, e.g. 3,224,224 (bundled models know theirs).",
)
@click.option(
    "--method",
    default="tucker2",
    show_default=True,
    help="Conv method (tucker2, channel-svd); Linear layers use truncated SVD (svd).",
)
@click.option(
    "--rank", "fixed_rank", type=click.IntRange(min=1), default=None, help="The same integer rank for every layer."
)
@click.option(
    "--params",
    "params_fraction",
    type=POSITIVE,
    default=None,
    help="Keep at most this fraction (0, 1] of each layer's parameters.",
)
@click.option(
    "--macs",
    "macs_fraction",
    type=POSITIVE,
    default=None,
    help="Keep at most this fraction (0, 1] of each layer's MACs.",
)
@click.option(
    "--energy",
    type=POSITIVE,
    default=None,
    help="Smallest rank keeping this share (0, 1] of the squared singular values.",
)
@click.option(
    "--evbmf",
    "evbmf_weakening",
    type=NON_NEGATIVE,
    default=None,
    is_flag=False,
    flag_value=1.0,
    help="Ranks by EVBMF (Kim et al.); an optional value in [0, 1] weakens them toward full rank "
    "(MUSCO: 1 = plain EVBMF).",
)
@click.option(
    "--target-macs",
    type=POSITIVE,
    default=None,
    help="Global budget: keep this fraction (0, 1) of the model's MACs, spread by sensitivity.",
)
@click.option(
    "--target-params",
    type=POSITIVE,
    default=None,
    help="Global budget: keep this fraction (0, 1) of the model's parameters.",
)
@click.option(
    "--speedup",
    type=POSITIVE,
    default=None,
    help="Global budget: this theoretical speedup (MAC reduction factor, > 1).",
)
@click.option(
    "--sensitivity",
    type=click.Choice(["model", "layer", "spectrum"]),
    default="model",
    show_default=True,
    help="For global budgets and --latency-aware: error of the model's output (model) or of each "
    "layer's own output (layer, faster) at candidate ranks; or, for global budgets with --method svd / "
    "channel-svd, each layer's error in closed form from its --metric-weighted singular values (spectrum: "
    "no sweep, scales to transformers). --latency-aware defaults to layer.",
)
@click.option(
    "--budget-scope",
    type=click.Choice(["model", "layers"]),
    default="model",
    show_default=True,
    help="What --target-params/--target-macs are a fraction of: the whole model, or only the layers "
    "rankdown may factorize (the LLM convention, '20%% of the block weights removed' = --target-params "
    "0.8 --budget-scope layers).",
)
@click.option(
    "--calibration",
    type=click.IntRange(min=1),
    default=None,
    help="How many calibration examples every data-aware step draws from --calib-data (bundled models: "
    "training images): reconstruction and --metric statistics use N (default 256); sensitivity sweeps "
    "and latency-aware error budgets use at most 64 of them (default 64): each candidate costs a pass "
    "over them, and the plans they give were as accurate as with 256 (docs/benchmarks.md).",
)
@click.option(
    "--reconstruct",
    type=click.Choice(["filter", "data", "joint"]),
    default="filter",
    show_default=True,
    help="Keep the weight fit (filter), or refit each factorized layer to the dense layer's output on "
    "--calibration examples: on its input in the already-approximated network (joint, compensates "
    "upstream error) or on its dense input (data).",
)
@click.option(
    "--metric",
    type=click.Choice(["frobenius", "mahalanobis", "covariance", "activation"]),
    default="frobenius",
    show_default=True,
    help="What the weight fit minimises: plain weight error, Denton's gradient-weighted "
    "(Mahalanobis; FWSVD's Fisher weighting) error, the output error under the layer's input covariance "
    "(SVD-LLM whitening), or ASVD's activation-scaled error. The data-aware metrics use --calibration "
    "examples.",
)
@click.option(
    "--linear-response",
    is_flag=True,
    help="With --reconstruct data/joint: fit the layer's output itself even where a (BatchNorm →) ReLU follows "
    "(by default the response after it is fitted: Zhang 2015's nonlinear reconstruction).",
)
@click.option(
    "--calibration-epochs",
    type=click.IntRange(min=0),
    default=2,
    show_default=True,
    help="For methods other than svd / channel-svd: Adam epochs on all factors after the "
    "least-squares fit of the last factor.",
)
@click.option(
    "--round-to",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="For global budgets: ranks are multiples of this (e.g. 8 for vector units).",
)
@click.option(
    "--cache-dir",
    type=click.Path(file_okay=False),
    default=None,
    help="Where sensitivity sweeps are cached (default ~/.cache/rankdown or $RANKDOWN_CACHE_DIR).",
)
@click.option(
    "--layers", multiple=True, callback=_selectors, help="Only these layers (name, or re:PATTERN); repeatable."
)
@click.option(
    "--skip", multiple=True, callback=_selectors, help="Leave these layers dense (name, or re:PATTERN); repeatable."
)
@click.option(
    "--latency-aware",
    is_flag=True,
    help="Choose each layer's method and rank by measured CPU time (cached per device), under "
    "--max-error; layers where nothing is faster stay dense.",
)
@click.option(
    "--max-error",
    type=POSITIVE,
    default=0.3,
    show_default=True,
    help="With --latency-aware: largest relative output error allowed per layer (of the layer's own "
    "output; with --sensitivity model, of the model's output when only that layer is factorized).",
)
@click.option(
    "--error-scope",
    type=click.Choice(["each", "sum"]),
    default="each",
    show_default=True,
    help="With --latency-aware: --max-error bounds each layer's error, or the sum over all layers "
    "(layers that cost the model little then take more, the least measured time overall). With a global "
    "budget: equalise the layers' errors (each), or minimise the sum of their squares (sum).",
)
@click.option(
    "--methods",
    "method_list",
    default="tucker2,channel-svd,separable,cp,svd",
    show_default=True,
    callback=_method_list,
    help="With --latency-aware: the methods to consider. With a global budget (--speedup, --target-macs, "
    "--target-params): allocate over method × rank per layer, so each layer takes its best form; the mixed "
    "plan is kept only if no single-method plan does better on the calibration examples (compared after a "
    "quick refit when --reconstruct asks for one).",
)
@click.option(
    "--latency-batch",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="With --latency-aware: the batch size to optimise for.",
)
@click.option(
    "--finetune-epochs",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Fine-tune the compressed model for this many epochs before measuring it.",
)
@click.option(
    "--progressive-steps",
    type=click.IntRange(min=1),
    default=None,
    help="Progressive fine-tuning (Denton 2014): factorize one layer at a time, each followed by "
    "this many training steps of the layers after it, the earlier ones frozen.",
)
@_train_options
@click.option(
    "--out",
    type=click.Path(file_okay=False),
    required=True,
    help="Output folder for plan.json, model.safetensors and report.json.",
)
@click.option("--force", is_flag=True, help="Replace an output folder that rankdown wrote earlier.")
@_data_options(("calib", "eval", "train"))
@_measure_options
def compress(
    model_spec,
    weights,
    input_shape,
    method,
    fixed_rank,
    params_fraction,
    macs_fraction,
    energy,
    evbmf_weakening,
    target_macs,
    target_params,
    speedup,
    sensitivity,
    budget_scope,
    calibration,
    reconstruct,
    metric,
    linear_response,
    calibration_epochs,
    round_to,
    cache_dir,
    layers,
    skip,
    latency_aware,
    max_error,
    error_scope,
    method_list,
    latency_batch,
    finetune_epochs,
    progressive_steps,
    lr,
    batch_size,
    weight_decay,
    distill,
    freeze_dense,
    seed,
    train_limit,
    out,
    force,
    data_dir,
    eval_limit,
    batch_sizes,
    latency_runs,
    threads,
    no_latency,
    no_guard,
    json_out,
    quiet,
    **data_kw,
):
    """Compress a model, measure it before and after, and save plan + weights + report."""
    from rankdown.app.pipeline import run_compress
    from rankdown.planning.compress import CompressConfig
    from rankdown.planning.rank import Energy, Evbmf, FixedRank, MacFraction, ParamFraction
    from rankdown.progress import set_quiet

    set_quiet(quiet)
    given = {
        k: v
        for k, v in {
            "--rank": fixed_rank,
            "--params": params_fraction,
            "--macs": macs_fraction,
            "--energy": energy,
            "--evbmf": evbmf_weakening,
            "--target-macs": target_macs,
            "--target-params": target_params,
            "--speedup": speedup,
        }.items()
        if v is not None
    }
    if len(given) > 1:
        raise click.UsageError(f"give one rank policy, not {' and '.join(given)}")
    if fixed_rank is not None:
        policy = FixedRank(fixed_rank)
    elif macs_fraction is not None:
        policy = MacFraction(macs_fraction)
    elif energy is not None:
        policy = Energy(energy)
    elif evbmf_weakening is not None:
        policy = Evbmf(evbmf_weakening)
    else:
        policy = ParamFraction(params_fraction if params_fraction is not None else 0.5)
    config = CompressConfig(method, policy, tuple(layers) or None, tuple(skip))
    from rankdown.app.pipeline import SWEEP_EXAMPLES, LatencyOptions

    if latency_aware and (given or target_macs or target_params or speedup):
        raise click.UsageError("--latency-aware chooses ranks itself: give no other rank policy or budget")
    latency_only = {
        "max_error": "--max-error",
        "error_scope": "--error-scope",
        "method_list": "--methods",
        "latency_batch": "--latency-batch",
    }
    budgeted = target_macs is not None or target_params is not None or speedup is not None
    also_budgets = ("method_list", "error_scope")  # meaningful for global budgets too
    stray = [flag for param, flag in latency_only.items() if _given(param) and not (param in also_budgets and budgeted)]
    if stray and not latency_aware:
        raise click.UsageError(
            f"{', '.join(stray)}: only used with --latency-aware (--methods, --error-scope: or a global budget)"
        )
    if sensitivity == "spectrum" and not _given("method_list") and method not in ("svd", "channel-svd"):
        raise click.UsageError(
            f"--sensitivity spectrum: closed-form errors need --method svd or channel-svd, not {method}"
        )
    if latency_aware and sensitivity == "spectrum":
        raise click.UsageError("--sensitivity spectrum is for global budgets; --latency-aware measures layer or model")
    if _given("budget_scope") and target_macs is None and target_params is None:
        raise click.UsageError("--budget-scope: only used with --target-params or --target-macs")
    if _given("round_to") and target_macs is None and target_params is None and speedup is None:
        # a uniform policy or a latency plan would ignore it: say so rather than round nothing
        raise click.UsageError("--round-to: only used with a global budget (--target-params, --target-macs, --speedup)")
    allocation = None
    if target_macs is not None or target_params is not None or speedup is not None:
        from rankdown.app.pipeline import AllocationOptions
        from rankdown.planning.allocate import Budget

        budget = Budget(macs=target_macs, params=target_params, speedup=speedup, scope=budget_scope)
        allocation = AllocationOptions(
            budget,
            sensitivity,
            min(calibration or SWEEP_EXAMPLES, SWEEP_EXAMPLES),
            round_to,
            cache_dir,
            methods=list(method_list) if _given("method_list") else None,
            objective="sum" if error_scope == "sum" else "max",
        )
    reconstruction = None
    for flag in ("linear_response", "calibration_epochs"):
        if _given(flag) and reconstruct == "filter":
            raise click.UsageError(f"--{flag.replace('_', '-')}: only used with --reconstruct data or joint")
    data_aware = reconstruct != "filter" or metric != "frobenius" or allocation is not None or latency_aware
    if _given("calibration") and not data_aware:
        raise click.UsageError(
            "--calibration: no step uses calibration examples here (they serve --reconstruct data/joint, "
            "--metric, a global budget and --latency-aware)"
        )
    if reconstruct != "filter":
        from rankdown.app.pipeline import ReconstructionOptions
        from rankdown.fitting.calibrate import CalibrationConfig

        reconstruction = ReconstructionOptions(
            calibration or 256,
            CalibrationConfig(mode=reconstruct, epochs=calibration_epochs, nonlinear=not linear_response, seed=seed),
        )
    if progressive_steps is not None and reconstruction is not None:
        raise click.UsageError(
            "--progressive-steps and --reconstruct data/joint are two ways to recover accuracy; give one"
        )
    if out is not None:
        from rankdown.storage import check_output_dir

        check_output_dir(out, force)  # before the data are opened and the model built
    data, metric_fn = _open_data(data_kw, input_shape, model_spec)
    _, report = run_compress(
        model_spec,
        config,
        weights=weights,
        input_shape=input_shape,
        data=data,
        metric_fn=metric_fn,
        warn=lambda message: click.echo(f"warning: {message}", err=True),
        out=out,
        force=force,
        opts=_opts(data_dir, eval_limit, batch_sizes, latency_runs, threads, no_latency, no_guard),
        argv=["rankdown", *sys.argv[1:]],
        allocation=allocation,
        finetune_config=_train_config(finetune_epochs, lr, batch_size, weight_decay, distill, freeze_dense, seed)
        if finetune_epochs
        else None,
        train_limit=train_limit,
        reconstruction=reconstruction,
        progressive=_train_config(
            1, lr, batch_size, weight_decay, 0.0, False, seed, max_steps_per_epoch=progressive_steps
        )
        if progressive_steps
        else None,
        metric=metric,
        metric_examples=calibration or 256,
        latency_aware=LatencyOptions(
            max_error,
            method_list,
            latency_batch,
            criterion=sensitivity if _given("sensitivity") else "layer",
            scope=error_scope,
            calibration=min(calibration or SWEEP_EXAMPLES, SWEEP_EXAMPLES),
            cache_dir=cache_dir,
        )
        if latency_aware
        else None,
    )
    _finish(report, json_out)
    click.echo(f"wrote {out}/plan.json, {out}/model.safetensors, {out}/report.json")


@main.command("eval")
@click.argument("folder", type=click.Path(file_okay=False))
@click.option(
    "--weights",
    type=click.Path(dir_okay=False),
    default=None,
    help="The dense original's weights, to measure it beside the compressed model.",
)
@_saved_model_option
@_data_options(("eval",))
@_measure_options
def eval_cmd(
    folder,
    weights,
    model_spec,
    data_dir,
    eval_limit,
    batch_sizes,
    latency_runs,
    threads,
    no_latency,
    no_guard,
    json_out,
    quiet,
    **data_kw,
):
    """Rebuild a saved compressed model from its plan and measure it again."""
    from rankdown.app.pipeline import run_eval
    from rankdown.progress import set_quiet

    set_quiet(quiet)
    data, _ = _open_data(data_kw, model_spec=_saved_spec(folder, model_spec))
    report = run_eval(
        folder,
        weights=weights,
        model_spec=model_spec,
        data=data,
        opts=_opts(data_dir, eval_limit, batch_sizes, latency_runs, threads, no_latency, no_guard),
        argv=["rankdown", *sys.argv[1:]],
    )
    _finish(report, json_out)


@main.command()
@click.argument("folder", type=click.Path(file_okay=False))
@click.option("--epochs", type=click.IntRange(min=1), default=2, show_default=True)
@_train_options
@click.option("--resume", is_flag=True, help="Continue from FOLDER/checkpoints/last.")
@_saved_model_option
@_data_options(("eval", "train"))
@_measure_options
def finetune(
    folder,
    epochs,
    lr,
    batch_size,
    weight_decay,
    distill,
    freeze_dense,
    seed,
    train_limit,
    resume,
    model_spec,
    data_dir,
    eval_limit,
    batch_sizes,
    latency_runs,
    threads,
    no_latency,
    no_guard,
    json_out,
    quiet,
    **data_kw,
):
    """Fine-tune a saved compressed model in place (checkpoints at each epoch end), then re-measure it."""
    from rankdown.app.pipeline import run_finetune
    from rankdown.progress import set_quiet

    set_quiet(quiet)
    config = _train_config(epochs, lr, batch_size, weight_decay, distill, freeze_dense, seed)
    data, _ = _open_data(data_kw, model_spec=_saved_spec(folder, model_spec))
    report = run_finetune(
        folder,
        config,
        resume=resume,
        model_spec=model_spec,
        data=data,
        train_limit=train_limit,
        opts=_opts(data_dir, eval_limit, batch_sizes, latency_runs, threads, no_latency, no_guard),
        argv=["rankdown", *sys.argv[1:]],
    )
    _finish(report, json_out)
    before = report.finetune["accuracy_before_finetune"] if report.finetune else None
    if before is not None and report.accuracy:
        click.echo(f"accuracy before fine-tuning {100 * before:.2f}% -> after {100 * report.accuracy['after']:.2f}%")


@main.command()
@click.option("--model", "model_spec", default="fashion-vgg", show_default=True)
@click.option("--epochs", type=click.IntRange(min=1), default=1, show_default=True)
@click.option(
    "--force-reg",
    type=NON_NEGATIVE,
    default=0.0,
    show_default=True,
    help="Force Regularization strength λ (Wen 2017): pulls each layer's filters toward low rank.",
)
@click.option("--force-kind", type=click.Choice(["l2", "l1"]), default="l2", show_default=True)
@click.option(
    "--force-adaptive",
    is_flag=True,
    help="Wen's adaptive strength: each layer's force scaled to λ × its loss-gradient norm.",
)
@click.option("--from-scratch", is_flag=True, help="Start from random weights instead of the model's own.")
@_train_options
@click.option("--data-dir", type=click.Path(file_okay=False), default=None)
@click.option(
    "--out", type=click.Path(dir_okay=False), required=True, help="Where to write the weights (.safetensors)."
)
@click.option("--force", is_flag=True, help="Replace an existing output file.")
@click.option("-q", "--quiet", is_flag=True)
def train(
    model_spec,
    epochs,
    force_reg,
    force_kind,
    force_adaptive,
    from_scratch,
    lr,
    batch_size,
    weight_decay,
    distill,
    freeze_dense,
    seed,
    train_limit,
    data_dir,
    out,
    force,
    quiet,
):
    """Train a dense bundled model (e.g. with Force Regularization before decomposing it); writes safetensors."""
    from pathlib import Path

    from rankdown.errors import OutputExistsError, RankdownError
    from rankdown.progress import set_quiet
    from rankdown.storage import atomic_write_bytes, check_output_file
    from rankdown.training.train import finetune as run_training
    from rankdown.zoo import BUNDLED, DATASETS, build_model

    set_quiet(quiet)
    if Path(out).exists() and not force:
        raise OutputExistsError(f"{out} exists; pass --force to replace it")
    check_output_file(out, "--out", ours=_trained_by_rankdown)
    if distill or freeze_dense:
        raise RankdownError("--distill and --freeze-dense apply to compressed models (rankdown finetune)")
    if model_spec not in BUNDLED:
        raise RankdownError(
            f"rankdown train retrains a bundled model on its own data; model {model_spec!r} has no bundled dataset"
        )
    split = DATASETS[BUNDLED[model_spec].dataset]("train", data_dir, train_limit)
    model = build_model(model_spec, pretrained=not from_scratch)
    test = DATASETS[BUNDLED[model_spec].dataset]("test", data_dir)
    skip = set(BUNDLED[model_spec].default_skip)
    layers = {
        n: m for n, m in model.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) and n not in skip
    }
    config = _train_config(
        epochs,
        lr,
        batch_size,
        weight_decay,
        0.0,
        False,
        seed,
        force_reg=force_reg,
        force_kind=force_kind,
        force_adaptive=force_adaptive,
    )
    history = run_training(model, split, config, regularized=layers, test_split=test)
    from safetensors.torch import save

    data = save(
        {k: v.contiguous() for k, v in model.state_dict().items()},
        metadata={"history": json.dumps(history), "command": " ".join(["rankdown", *sys.argv[1:]])},
    )
    atomic_write_bytes(Path(out), data)
    for row in history:
        click.echo(json.dumps(row))
    click.echo(f"wrote {out}")


def _trained_by_rankdown(path) -> bool:
    """A weights file ``rankdown train`` wrote: safetensors whose metadata holds its history."""
    try:
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            return "history" in (f.metadata() or {})
    except Exception:  # safetensors raises several types for a file that is not its own
        return False


@main.command()
@click.argument("model_spec", default="fashion-vgg")
@click.option("--weights", type=click.Path(dir_okay=False), default=None, help="State dict for the model.")
@click.option("--input-shape", callback=_shape, default=None, help="One example's shape without the batch.")
@click.option("--method", default="tucker2", show_default=True, help="Method whose sensitivity is measured.")
@click.option("--sensitivity", type=click.Choice(["model", "layer"]), default="layer", show_default=True)
@click.option("--calibration", type=click.IntRange(min=1), default=256, show_default=True)
@click.option("--data-dir", type=click.Path(file_okay=False), default=None)
@click.option("--cache-dir", type=click.Path(file_okay=False), default=None)
@click.option(
    "--out",
    type=click.Path(file_okay=False),
    required=True,
    help="Folder for analysis.json, spectra.png, energy.png and sensitivity.png.",
)
@click.option("--force", is_flag=True, help="Replace an output folder that rankdown wrote earlier.")
@_data_options(("calib",))
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
def analyze(
    model_spec,
    weights,
    input_shape,
    method,
    sensitivity,
    calibration,
    data_dir,
    cache_dir,
    out,
    force,
    quiet,
    **data_kw,
):
    """Per-layer spectra, EVBMF ranks, energy and sensitivity curves: look before choosing a budget."""
    from rankdown.app.analyze import analyze_model, render_analysis, save_analysis
    from rankdown.app.pipeline import MeasureOptions, build_workload, calib_inputs
    from rankdown.planning.compress import CompressConfig
    from rankdown.progress import set_quiet
    from rankdown.storage import check_output_dir

    set_quiet(quiet)
    check_output_dir(out, force)
    data, _ = _open_data(data_kw, input_shape)
    workload = build_workload(
        model_spec, weights=weights, input_shape=input_shape, data=data, opts=MeasureOptions(data_dir=data_dir)
    )
    calib = calib_inputs(workload.need("calib", "--calib-data", "analyze"), calibration, workload.model)
    config = CompressConfig(method, skip=workload.skip)
    result = analyze_model(workload.model, config, calib, criterion=sensitivity, cache_dir=cache_dir)
    result.model = model_spec
    save_analysis(result, out, force=force)
    render_analysis(result)
    click.echo(f"wrote {out}/analysis.json, spectra.png, energy.png, sensitivity.png")


@main.command("bench")
@click.argument("target")
@_saved_model_option
@click.option("--weights", type=click.Path(dir_okay=False), default=None)
@click.option("--input-shape", callback=_shape, default=None)
@click.option("--batch-sizes", default="1,64", show_default=True, callback=_batches)
@click.option("--threads", type=int, default=min(2, os.cpu_count() or 1), show_default=True, callback=_threads)
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default="float32", show_default=True)
@click.option("--runs", type=click.IntRange(min=1), default=30, show_default=True)
@click.option("--compile", "use_compile", is_flag=True, help="torch.compile the models (compile time excluded).")
@click.option("--cuda-graphs", is_flag=True, help="Replay captured CUDA graphs (CUDA only).")
@click.option(
    "--fold-bn",
    is_flag=True,
    help="Deployment folds first: batch norms into the preceding convs, the channel gathers of "
    "clustered layers (mono, bicluster) into their neighbours, and pointwise factors into an "
    "adjacent 1×1 conv or Linear where the product is cheaper.",
)
@click.option("--per-layer", is_flag=True, help="Also time every factorized layer beside its dense original.")
@click.option(
    "--onnxruntime",
    "use_ort",
    is_flag=True,
    help="Also time each model exported to ONNX (after the deployment folds, parity-checked) in onnxruntime, "
    "with the same load guard.",
)
@click.option("--no-guard", is_flag=True)
@click.option("--json", "json_out", type=click.Path(dir_okay=False), default=None, callback=_json_path)
@click.option("-q", "--quiet", is_flag=True)
def bench_cmd(
    target,
    model_spec,
    weights,
    input_shape,
    batch_sizes,
    threads,
    device,
    dtype,
    runs,
    use_compile,
    cuda_graphs,
    fold_bn,
    per_layer,
    use_ort,
    no_guard,
    json_out,
    quiet,
):
    """Latency of a saved compressed model beside its dense original (or of one model): measured
    speedup next to the theoretical MAC reduction, end to end and per layer."""
    from pathlib import Path

    from rankdown.app.pipeline import BenchOptions, run_bench
    from rankdown.app.report import render_bench
    from rankdown.progress import set_quiet
    from rankdown.storage import atomic_write_text

    set_quiet(quiet)
    opts = BenchOptions(
        batch_sizes, threads, device, dtype, runs, use_compile, cuda_graphs, fold_bn, per_layer, not no_guard, use_ort
    )
    result = run_bench(target, weights=weights, input_shape=input_shape, bench=opts, model_spec=model_spec)
    render_bench(result)
    if json_out:
        atomic_write_text(Path(json_out), json.dumps(result, indent=2) + "\n")


# Recipe sections, each holding compress options under their own names (without the dashes; a
# dash or an underscore alike): the file is the command line, grouped the way the config
# dataclasses group it. A key that is not an option of its section is an error naming it.
RECIPE_SECTIONS = {
    "model": ("model", "weights", "input-shape", "layers", "skip"),
    "data": (
        "calib-data",
        "calibration",
        "eval-data",
        "train-data",
        "preset",
        "image-size",
        "crop",
        "mean",
        "std",
        "grayscale",
        "eval",
        "data-dir",
        "eval-limit",
        "train-limit",
        "seq-len",
        "sequences",
    ),
    "plan": (
        "method",
        "rank",
        "params",
        "macs",
        "energy",
        "evbmf",
        "target-macs",
        "target-params",
        "speedup",
        "sensitivity",
        "budget-scope",
        "round-to",
        "cache-dir",
        "latency-aware",
        "max-error",
        "error-scope",
        "methods",
        "latency-batch",
        "metric",
    ),
    "reconstruct": ("reconstruct", "linear-response", "calibration-epochs"),
    "finetune": (
        "finetune-epochs",
        "progressive-steps",
        "lr",
        "batch-size",
        "weight-decay",
        "distill",
        "freeze-dense",
        "seed",
    ),
    "measure": ("batch-sizes", "latency-runs", "threads", "no-latency", "no-guard"),
    "output": ("out", "force", "json", "quiet"),
}


def recipe_args(path: str) -> list[str]:
    """A recipe file (TOML) as the compress command line it stands for."""
    from pathlib import Path

    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        raise RankdownError("rankdown run needs Python >= 3.11 (tomllib)") from None
    try:
        recipe = tomllib.loads(Path(path).read_text())
    except FileNotFoundError:
        raise RankdownError(f"recipe {path}: no such file") from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise RankdownError(f"recipe {path} could not be read ({exc})") from None
    args: list[str] = []
    for section, table in recipe.items():
        if section not in RECIPE_SECTIONS:
            raise RankdownError(f"recipe {path}: unknown section [{section}] (known: {', '.join(RECIPE_SECTIONS)})")
        if not isinstance(table, dict):
            raise RankdownError(f"recipe {path}: [{section}] must be a table of options")
        for key, value in table.items():
            flag = key.replace("_", "-")
            if flag not in RECIPE_SECTIONS[section]:
                home = next((k for k, flags in RECIPE_SECTIONS.items() if flag in flags), None)
                where = f"it belongs in [{home}]" if home else f"known: {', '.join(RECIPE_SECTIONS[section])}"
                raise RankdownError(f"recipe {path}: [{section}] has no option {key!r} ({where})")
            values = value if isinstance(value, list) and flag in ("layers", "skip") else [value]
            for v in values:
                if isinstance(v, bool):
                    if v:
                        args.append(f"--{flag}")
                elif isinstance(v, (int, float, str)):
                    args += [f"--{flag}", str(v)]
                elif isinstance(v, list) and all(isinstance(x, (int, float)) for x in v):
                    args += [f"--{flag}", ",".join(str(x) for x in v)]
                else:
                    raise RankdownError(f"recipe {path}: [{section}] {key} = {v!r} is not a flag's value")
    return args


@main.command("run")
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option("--print", "print_only", is_flag=True, help="Print the compress command the recipe stands for.")
def run_recipe(recipe, print_only):
    """Run a whole job from a recipe file (TOML): sections [model], [data], [plan], [reconstruct],
    [finetune], [measure], [output] hold compress options under their own names."""
    import shlex

    args = recipe_args(recipe)
    if print_only:
        click.echo(shlex.join(["rankdown", "compress", *args]))
        return
    ctx = compress.make_context("compress", args)
    with ctx:
        compress.invoke(ctx)


@main.command("export")
@click.argument("folder", type=click.Path(file_okay=False))
@click.option(
    "--format", "fmt", type=click.Choice(["onnx", "torchscript", "exported-program"]), default="onnx", show_default=True
)
@click.option(
    "--out",
    "out_file",
    type=click.Path(dir_okay=False),
    default=None,
    help="File to write (default: FOLDER/model.onnx, model.torchscript.pt or model.pt2).",
)
@click.option(
    "--batch",
    type=click.IntRange(1, 4096),
    default=1,
    show_default=True,
    help="Batch size of the example the model is exported at.",
)
@click.option(
    "--dynamic-batch/--static-batch",
    default=True,
    show_default=True,
    help="Whether the exported graph takes any batch size (ONNX, exported-program).",
)
@click.option("--no-fold", is_flag=True, help="Export as it is, without the deployment folds.")
@_saved_model_option
@_data_options(("eval",))
@click.option("--json", "json_out", type=click.Path(dir_okay=False), default=None, callback=_json_path)
@click.option("-q", "--quiet", is_flag=True)
def export_cmd(folder, fmt, out_file, batch, dynamic_batch, no_fold, model_spec, json_out, quiet, **data_kw):
    """Export a saved compressed model for deployment, after checking that the exported file gives
    PyTorch's outputs (on --eval-data, else on the example and seeded noise)."""
    from pathlib import Path

    from rankdown.app.pipeline import run_export
    from rankdown.deployment.export import default_path, is_rankdown_export
    from rankdown.progress import set_quiet
    from rankdown.storage import atomic_write_text, check_output_file

    set_quiet(quiet)
    target = Path(out_file) if out_file else default_path(folder, fmt)
    if not (Path(folder) / "plan.json").is_file():
        raise click.BadParameter(f"{folder} holds no plan.json: not a rankdown output folder", param_hint="FOLDER")
    check_output_file(target, "--out", ours=is_rankdown_export)
    data, _ = _open_data(data_kw, model_spec=_saved_spec(folder, model_spec))
    result = run_export(
        folder,
        target,
        fmt,
        batch=batch,
        dynamic_batch=dynamic_batch,
        fold=not no_fold,
        model_spec=model_spec,
        data=data,
    )
    p = result["parity"]
    click.echo(
        f"wrote {result['file']} ({fmt}{', opset ' + str(result['opset']) if result['opset'] else ''}, "
        f"{result['dtype']}, {'dynamic' if result['dynamic_batch'] else 'static'} batch, "
        f"{result['bytes'] / 2**20:.1f} MiB); parity with PyTorch on {p['examples']} examples "
        f"({result['checked_on']}): max abs error {p['max_abs_error']:.2e}, relative {p['rel_error']:.2e}"
    )
    if json_out:
        atomic_write_text(Path(json_out), json.dumps(result, indent=2) + "\n")


@main.command()
def methods() -> None:
    """List the registered methods and the layer types they handle."""
    from rankdown.methods import METHODS

    for (name, ltype), handler in sorted(METHODS.items(), key=lambda kv: kv[0][0]):
        click.echo(f"{name:12s} {ltype.__name__:8s} {(handler.__doc__ or '').strip().splitlines()[0]}")


def _one_line(text: str, limit: int = 600) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 1] + "…"


def run() -> None:
    """The entry point: every user error is one line on stderr and exit status 2; anything else
    (a bug) is one line and status 1, with the traceback under RANKDOWN_DEBUG=1."""
    try:
        code = main.main(standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.exceptions.NoArgsIsHelpError as exc:
        click.echo(exc.ctx.get_help() if exc.ctx else str(exc), err=True)
        sys.exit(2)
    except click.ClickException as exc:
        click.echo(f"error: {_one_line(exc.format_message())}", err=True)
        sys.exit(exc.exit_code)
    except RankdownError as exc:
        click.echo(f"error: {_one_line(str(exc))}", err=True)
        sys.exit(2)
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as exc:
        if os.environ.get("RANKDOWN_DEBUG") == "1":
            raise
        click.echo(
            f"error: unexpected {type(exc).__name__}: {_one_line(str(exc), 400)} (a rankdown bug? "
            "RANKDOWN_DEBUG=1 shows the traceback)",
            err=True,
        )
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)
