"""The main job, end to end, shared by the CLI and the Python API: build → compress → evaluate →
measure → save. Each step is a library call; this module only strings them together."""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import torch
from torch import nn
from torch.utils.data import default_collate

from rankdown.app.report import Report, build_report
from rankdown.data.sources import Data
from rankdown.errors import RankdownError
from rankdown.fitting.calibrate import CalibrationConfig, LayerFit
from rankdown.measurement.bench import compare_latency, model_cost
from rankdown.measurement.quality import MetricFn, evaluate
from rankdown.planning.allocate import Budget
from rankdown.planning.compress import CompressConfig, CompressResult, allocate_ranks, compress, select_targets
from rankdown.planning.plan import Plan, load_compressed, read_plan, save_compressed
from rankdown.planning.sweep import relative_error
from rankdown.probe import (
    Batches,
    Inputs,
    batch_size_for,
    batch_tile,
    check_runs,
    example_input,
    forward,
    primary_output,
    stream,
    to_model,
)
from rankdown.storage import check_output_dir
from rankdown.training.train import TrainConfig, finetune
from rankdown.workload import Workload, user_workload
from rankdown.zoo import BUNDLED, build_model, bundled_workload


@dataclass
class MeasureOptions:
    data_dir: str | None = None
    eval_limit: int | None = None  # first N test examples; None = the whole test split
    batch_sizes: tuple[int, ...] = (1, 64)
    latency_runs: int = 30
    threads: int | None = 2
    guard: bool = True
    measure_latency: bool = True


# Examples a sensitivity sweep or a latency-aware error budget runs on: each candidate costs a pass
# over them, and on the user-model benchmark plans swept on 64 were as accurate as on 256.
SWEEP_EXAMPLES = 64


@dataclass
class AllocationOptions:
    budget: Budget
    criterion: str = "model"
    calibration: int = SWEEP_EXAMPLES
    round_to: int = 1
    cache_dir: str | None = None
    methods: list[str] | None = None  # allocate over method × rank per layer
    objective: str = "max"  # equalise the layers' errors (max) or minimise the sum of their squares

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["budget"] = {
            k: v
            for k, v in dataclasses.asdict(self.budget).items()
            if v is not None and not (k == "scope" and v == "model")  # the default, as plans always had it
        }
        return d


@dataclass
class LatencyOptions:
    max_error: float = 0.3  # per-layer relative output error on the calibration data
    methods: list[str] = dataclasses.field(default_factory=lambda: ["tucker2", "channel-svd", "separable", "cp", "svd"])
    batch: int = 1
    channels_last: bool = False
    calibration: int = SWEEP_EXAMPLES
    cache_dir: str | None = None
    criterion: str = "layer"  # whose output max_error is measured on: the layer's own, or the model's
    scope: str = "each"  # max_error bounds each layer's error, or their sum


@dataclass
class ReconstructionOptions:
    """Data reconstruction after the filter fit (``--reconstruct MODE`` on ``--calibration N`` examples)."""

    examples: int
    config: CalibrationConfig = dataclasses.field(default_factory=CalibrationConfig)


def reconstruct_layers(
    result: CompressResult, dense: nn.Module, calib: Data, opts: ReconstructionOptions
) -> dict[str, LayerFit]:
    """Refit ``result``'s factorized layers to the dense layers' outputs; notes go in the report rows."""
    from rankdown.fitting.calibrate import reconstruct

    fitted = reconstruct(
        dense, result.model, list(result.plan.layers), calib_inputs(calib, opts.examples, dense), opts.config
    )
    for row in result.layers:
        if row.name in fitted:
            f = fitted[row.name]
            row.info["calibration"] = f.to_dict()
            errs = f"{f.output_error_before:.3f}→{f.output_error_after:.3f}"
            row.note = (row.note + "; " if row.note else "") + f"{opts.config.mode} fit ({f.how}): out err {errs}"
    result.plan.meta["calibration"] = {"mode": opts.config.mode, "examples": opts.examples, "data": calib.describe()}
    return fitted


def _quick_refit(
    dense: nn.Module, calib: Data, opts: ReconstructionOptions | None
) -> Callable[[nn.Module, list[str]], object] | None:
    """The reconstruction a mixed plan's candidates get before they are compared: the one asked
    for, without its Adam epochs and ReLU-response iterations (seconds, not tens of), on up to
    2 × SWEEP_EXAMPLES of a second draw of the calibration data (seed 1), so that the comparison
    on the sweep's examples (seed 0) is mostly out of sample."""
    if opts is None:
        return None
    from rankdown.fitting.calibrate import quick, reconstruct

    pool = calib_inputs(calib, min(opts.examples, 2 * SWEEP_EXAMPLES), dense, seed=1)
    return lambda model, fqns: reconstruct(dense, model, fqns, pool, quick(opts.config))


def calib_inputs(data: Data, n: int, model: nn.Module, seed: int = 0) -> Batches:
    """``n`` calibration examples (a seeded draw, see ``Data.stream``) as a stream of batches in
    the model's dtype and device: no step holds them as one tensor."""
    if n < 1:
        raise RankdownError(f"--calibration must be >= 1 example, got {n}")
    s = data.stream(n, seed)
    s.first()
    s.first()  # a set too large to hold is read on every pass: one that changes fails now, not mid-work
    return s.map(lambda x: to_model(x, model))


def input_shape_for(spec: str, input_shape: tuple[int, ...] | None) -> tuple[int, ...] | None:
    if input_shape is not None:
        if not input_shape or any(d <= 0 for d in input_shape):
            raise RankdownError(f"--input-shape must be positive sizes without the batch, got {input_shape}")
        return tuple(input_shape)
    if spec in BUNDLED:
        return BUNDLED[spec].input_shape
    return None


@torch.no_grad()
def noise_output_error(dense: nn.Module, compressed: nn.Module, example: Inputs, n: int = 32) -> float | None:
    """Relative output error on seeded Gaussian inputs: what a report can say without data."""
    if not isinstance(example, torch.Tensor) or not example.is_floating_point():
        return None
    x = example_input(dense, tuple(example.shape[1:]), n, random=True)
    return relative_error(primary_output(compressed.eval()(x)), primary_output(dense.eval()(x)))


def _accuracy_block(quality: dict | None) -> dict | None:
    """The report's accuracy summary (top-1), where labels exist."""
    if not quality or "top1" not in quality["metrics"]:
        return None
    top1 = quality["metrics"]["top1"]
    name = quality["data"]
    return {"dataset": name, "n": quality["examples"], "before": top1.get("dense"), "after": top1.get("compressed")}


def measure(workload: Workload, dense: nn.Module | None, compressed: nn.Module, opts: MeasureOptions) -> dict:
    """Quality on the evaluation data (or, with none, the output error on noise, said so), and
    latency on the example input tiled to each batch size."""
    data = workload.get("eval")
    quality = None
    if data is not None:
        quality = evaluate(
            {"dense": dense, "compressed": compressed},
            data,
            limit=opts.eval_limit,
            metric=workload.metric,
            desc="evaluate",
        )
        if workload.eval_from_calib:
            quality["note"] = "evaluated on the calibration data (no separate --eval-data was given)"
    if quality is not None and "output_rel_error" in quality["metrics"]:
        out_err, out_err_on = quality["metrics"]["output_rel_error"]["compressed"], quality["data"]
    else:
        out_err = None if dense is None else noise_output_error(dense, compressed, workload.example)
        out_err_on = None if out_err is None else "seeded Gaussian noise (no evaluation data)"
    # Token sequences: batch sizes capped by tokens (64 sequences of 256 tokens is not a latency
    # a language model is served at); the report states the sizes used.
    sizes = tuple(sorted({batch_size_for(workload.example, b) for b in opts.batch_sizes}))
    return {
        "accuracy": _accuracy_block(quality),
        "quality": quality,
        "output_rel_error": out_err,
        "output_rel_error_on": out_err_on,
        "latency": compare_latency(
            dense,
            compressed,
            workload.example,
            batch_sizes=sizes,
            runs=opts.latency_runs,
            threads=opts.threads,
            guard=opts.guard,
        )
        if opts.measure_latency
        else None,
    }


def token_speed_of(
    workload: Workload, dense: nn.Module | None, compressed: nn.Module, opts: MeasureOptions
) -> dict | None:
    """Prefill and batch-1 decode tokens/s of a language model, dense vs compressed (None for
    other models, or without latency measurement)."""
    data = workload.get("eval") or workload.get("calib")
    if not opts.measure_latency or dense is None or data is None or data.task != "causal-lm":
        return None
    from rankdown.models.hf import token_speed

    ids = workload.example["input_ids"] if isinstance(workload.example, dict) else None
    if ids is None:
        return None
    return token_speed({"dense": dense, "compressed": compressed}, ids[:1, :128], threads=opts.threads)


# Past this, the part of the output that depends on the input is mostly gone: the error relative to
# the dense output's variation over the data (its deviation from its mean), not to its size, which a
# constant offset (a bias, an untrained head) can dominate.
COLLAPSE_ERROR = 0.7


def collapse_warning(dense: nn.Module, compressed: nn.Module, workload: Workload, n: int = 64) -> str | None:
    """Say before committing when a plan will wreck the model: the compressed model's output on the
    calibration data (or the example) against the dense model's, with the next steps to try."""
    data = workload.get("calib")
    x = calib_inputs(data, n, dense) if data is not None else stream(workload.example)
    refs, outs = [], []
    with torch.no_grad():
        for b in x:
            refs.append(primary_output(forward(dense.eval(), b)).float())
            outs.append(primary_output(forward(compressed.eval(), b)).float())
    if len({t.shape[1:] for t in refs}) > 1:  # token batches padded to their own lengths: token rows
        refs, outs = [t.reshape(-1, t.shape[-1]) for t in refs], [t.reshape(-1, t.shape[-1]) for t in outs]
    ref, out = torch.cat(refs), torch.cat(outs)  # outputs of at most n examples
    err = relative_error(out, ref)
    signal = float(torch.linalg.vector_norm(ref - ref.mean(0, keepdim=True))) if ref.shape[0] > 1 else 0.0
    err_signal = float(torch.linalg.vector_norm(out - ref)) / signal if signal > 0 else err
    agree = float((out.argmax(-1) == ref.argmax(-1)).float().mean()) if ref.ndim >= 2 and ref.shape[-1] > 1 else None
    # Classifiers are judged by their decisions (a random-init net's outputs barely vary over the
    # data, so any change is large against that variation); other outputs by the variation.
    collapsed = agree < 0.5 if agree is not None else err_signal >= COLLAPSE_ERROR
    if not collapsed:
        return None
    said = f"output error {err:.2f} of the output, {err_signal:.2f} of its variation over the data" + (
        f", top-1 agreement {100 * agree:.0f}%" if agree is not None else ""
    )
    on = "the calibration data" if data is not None else "the example input"
    return (
        f"this plan changes the model's output a lot ({said} with the dense model on {on}): expect most of "
        "its quality to be lost. Next: a milder budget (e.g. --params 0.7 or --speedup 1.5), a data-aware "
        "plan (--speedup N with --calib-data), reconstruction (--reconstruct joint), or fine-tuning on your "
        "data (--finetune-epochs 1 with --train-data)"
    )


def run_job(
    workload: Workload,
    config: CompressConfig,
    *,
    out: str | Path | None = None,
    force: bool = False,
    opts: MeasureOptions | None = None,
    argv: list[str] | None = None,
    allocation: AllocationOptions | None = None,
    finetune_config: TrainConfig | None = None,
    train_limit: int | None = None,
    latency_aware: LatencyOptions | None = None,
    reconstruction: ReconstructionOptions | None = None,
    progressive: TrainConfig | None = None,
    metric: str = "frobenius",
    metric_examples: int = 256,
    weights: str | None = None,
    warn: Callable[[str], None] | None = None,
) -> tuple[CompressResult, Report]:
    """The end-to-end job on a workload (a model and its data): plan, factorize, refit, fine-tune,
    measure quality and latency, save. Every data-aware step uses the workload's data, and one
    with none fails before any work, naming the flag that provides it.

    With ``allocation`` or ``latency_aware``, ranks come from that planner and ``config.rank`` is
    ignored. ``warn`` receives a warning when the plan is predicted to wreck the model."""
    opts = opts or MeasureOptions()
    clock = _Stages()
    if out is not None:
        check_output_dir(out, force)  # first, so that minutes of work are not thrown away at the end
    dense = workload.model.eval()
    spec = workload.spec
    check_runs(dense, workload.example, f"model {spec!r}" if spec else "the model")
    if config.layers is None and not config.skip and workload.skip:
        config = dataclasses.replace(config, skip=workload.skip)
    select_targets(dense, config)  # unknown or unsupported layers named by the user fail now
    # Every data-aware step's data, fetched (and checked) once, before any work; the error names
    # the first step that needs what is missing.
    calib_steps = [
        step
        for step, wanted in (
            ("--latency-aware", latency_aware is not None),
            ("a global budget (--target-macs, --target-params, --speedup)", allocation is not None),
            (f"--metric {metric}", metric != "frobenius"),
            ("data reconstruction (--reconstruct)", reconstruction is not None),
        )
        if wanted
    ]
    calib = workload.need("calib", "--calib-data", calib_steps[0]) if calib_steps else None
    train_steps = [s for s, w in (("--progressive-steps", progressive), ("fine-tuning", finetune_config)) if w]
    if train_steps:
        _trainable(workload.need("train", "--train-data", train_steps[0]), "--train-data")
    example = workload.example
    clock.lap("checks and data")
    if latency_aware is not None:
        from rankdown.planning.latency import DeviceKey, latency_ranks

        assert calib is not None
        key = DeviceKey.current(
            "cpu", batch=latency_aware.batch, threads=opts.threads, channels_last=latency_aware.channels_last
        )
        policy, _ = latency_ranks(
            dense,
            config,
            calib_inputs(calib, latency_aware.calibration, dense),
            key,
            max_error=latency_aware.max_error,
            methods=latency_aware.methods,
            cache_dir=latency_aware.cache_dir,
            guard=opts.guard,
            criterion=latency_aware.criterion,
            scope=latency_aware.scope,
        )
        config = dataclasses.replace(config, rank=policy)
        clock.lap("latency plan")
    metrics = None
    if metric != "frobenius":
        from rankdown.fitting.metrics import collect

        assert calib is not None
        metrics = collect(
            dense, select_targets(dense, config).targets, calib_inputs(calib, metric_examples, dense), metric
        )
        clock.lap("statistics")
    if allocation is not None:
        assert calib is not None
        policy = allocate_ranks(
            dense,
            config,
            calib_inputs(calib, allocation.calibration, dense),
            allocation.budget,
            criterion=allocation.criterion,
            round_to=allocation.round_to,
            cache_dir=allocation.cache_dir,
            metrics=metrics,
            methods=allocation.methods,
            objective=allocation.objective,
            refit=_quick_refit(dense, calib, reconstruction) if allocation.methods else None,
        )
        config = dataclasses.replace(config, rank=policy)
        clock.lap("allocation")
    if progressive is not None:
        from rankdown.training.progressive import progressive_compress

        train = _trainable(workload.need("train", "--train-data", "--progressive-steps"), "--train-data")
        progressive = dataclasses.replace(progressive, augment=workload.augment, flip=workload.flip)
        result, _ = progressive_compress(
            dense, config, example, train.dataset, progressive, metrics=metrics, model_spec=spec
        )
        result.plan.meta["progressive"] = {"steps_per_layer": progressive.max_steps_per_epoch, "lr": progressive.lr}
    else:
        result = compress(dense, config, example, model_spec=spec, metrics=metrics)
    clock.lap("progressive fine-tuning" if progressive is not None else "factorization")
    result.plan.meta["metric"] = metric
    if calib is not None:
        result.plan.meta["calibration_data"] = calib.describe()
    if allocation is not None:
        result.plan.meta["allocation"] = allocation.to_dict()
    if reconstruction is not None:
        assert calib is not None
        reconstruct_layers(result, dense, calib, reconstruction)
        clock.lap("reconstruction")
    warning = collapse_warning(dense, result.model, workload)
    if warning and warn is not None:
        warn(warning)
    ft = None
    if finetune_config is not None:
        q0 = _quality_now(result.model, workload, opts)
        history = finetune_on(result.model, dense, list(result.plan.layers), workload, finetune_config, train_limit)
        ft = _finetune_record(finetune_config, history, q0)
        clock.lap("fine-tuning")
    # None: the factory's (or the bundled model's) own weights are the original.
    result.plan.meta["source_weights"] = None if weights is None else str(Path(weights).resolve())
    measured = measure(workload, dense, result.model, opts)
    tokens = token_speed_of(workload, dense, result.model, opts)
    clock.lap("measurement")
    report = build_report(
        result,
        model_spec=spec,
        model_before=model_cost(dense, example),
        model_after=model_cost(result.model, example),
        argv=argv,
        **measured,
    )
    if allocation is not None:
        report.budget = budget_check(allocation.budget, report.totals.to_dict(), result)
        if report.budget["missed"] and warn is not None:
            warn(report.budget["missed"])
    report.warning = warning or None
    report.tokens_per_s = tokens
    report.finetune = ft
    report.seconds = clock.seconds
    if out is not None:
        save_compressed(out, result.model, result.plan, report.to_dict(), force=force)
    return result, report


class _Stages:
    """Wall-clock seconds of each stage of the job, for the report: what a user would cut first."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._t = time.perf_counter()

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.seconds[stage] = round(self.seconds.get(stage, 0.0) + now - self._t, 3)
        self._t = now


def budget_check(budget: Budget, totals: dict, result: CompressResult) -> dict:
    """Target against delivered, always in the report; ``missed`` says how far short a plan fell
    (a fit that failed and left its layer dense) in one line, or is None."""
    kind = budget.kind
    asked = budget.fraction
    if budget.scope == "layers":  # the layers the budget was spent on: skipped ones are not in it
        rows = [r for r in result.layers if r.target]
        before = sum(getattr(r.before, kind) for r in rows)
        delivered = sum(getattr(r.after, kind) for r in rows) / max(before, 1)
    else:
        delivered = totals[f"{kind}_after"] / max(totals[f"{kind}_before"], 1)
    missed = None
    if delivered > asked * 1.02:  # more than a rank step or two over
        dense = [r.name for r in result.layers if r.method is None and ("fail" in r.note or "degenerat" in r.note)]
        missed = f"budget missed: asked for {asked:.3f} of the {kind}, delivered {delivered:.3f}" + (
            f" (left dense after a failed fit: {', '.join(dense)})" if dense else ""
        )
    return {
        "kind": kind,
        "scope": budget.scope,
        "asked_fraction": asked,
        "delivered_fraction": delivered,
        "missed": missed,
    }


def _quality_now(model: nn.Module, workload: Workload, opts: MeasureOptions) -> dict | None:
    """The model's quality on the evaluation data before fine-tuning (None without data)."""
    data = workload.get("eval")
    return None if data is None else evaluate({"compressed": model}, data, limit=opts.eval_limit)


def _finetune_record(config: TrainConfig, history: list[dict], before: dict | None) -> dict:
    """The report's fine-tuning section: settings, history, and quality before it."""
    metrics = None if before is None else before["metrics"]
    return {
        "config": dataclasses.asdict(config),
        "history": history,
        "accuracy_before_finetune": ((metrics or {}).get("top1") or {}).get("compressed"),
        "quality_before_finetune": metrics,
    }


def _trainable(data: Data, flag: str) -> Data:
    if data.dataset is None:
        raise RankdownError(
            f"{flag} {data.name}: fine-tuning shuffles examples by index, so it needs a DataLoader over a "
            "map-style Dataset (or an image folder or tensor file), not a plain iterable of batches"
        )
    return data


def run_compress(
    spec: str,
    config: CompressConfig,
    *,
    weights: str | None = None,
    input_shape: tuple[int, ...] | None = None,
    data: dict[str, Data] | None = None,
    metric_fn: MetricFn | None = None,
    opts: MeasureOptions | None = None,
    **job,
) -> tuple[CompressResult, Report]:
    """The job for a model named on the command line: a bundled name (with its own data, unless
    ``data`` replaces it) or package.module:factory (with ``data``: "calib", "eval", "train")."""
    opts = opts or MeasureOptions()
    if job.get("out") is not None:
        check_output_dir(job["out"], job.get("force", False))
    workload = build_workload(spec, weights=weights, input_shape=input_shape, data=data, opts=opts, metric_fn=metric_fn)
    return run_job(workload, config, opts=opts, weights=weights, **job)


def build_workload(
    spec: str,
    *,
    weights: str | None = None,
    input_shape: tuple[int, ...] | None = None,
    data: dict[str, Data] | None = None,
    opts: MeasureOptions | None = None,
    metric_fn: MetricFn | None = None,
) -> Workload:
    opts = opts or MeasureOptions()
    data = {k: v for k, v in (data or {}).items() if v is not None}
    if spec in BUNDLED and not data:
        w = bundled_workload(spec, data_dir=opts.data_dir, eval_limit=opts.eval_limit, weights=weights)
        w.metric = metric_fn
        return w
    model = build_model(spec, weights)
    shape = input_shape_for(spec, input_shape)
    skip = BUNDLED[spec].default_skip if spec in BUNDLED else None
    example = None
    if not data and shape is None:
        from rankdown.models.hf import example_tokens, is_hf

        example = example_tokens(model) if is_hf(spec) else None
    return user_workload(
        model,
        calib=data.get("calib"),
        eval=data.get("eval"),
        train=data.get("train"),
        example=example,
        input_shape=shape,
        spec=spec,
        metric=metric_fn,
        skip=skip,
    )


@dataclass
class Saved:
    """A saved compressed model rebuilt from its folder, with its dense original where possible."""

    plan: Plan
    workload: Workload  # the dense original (model None when its weights are gone) and the data
    model: nn.Module
    dense: nn.Module | None


def trusted_model_spec(folder: str | Path, plan_model: str | None, model_spec: str | None) -> str:
    """The model to build for a saved folder. A saved folder is data: it may name a bundled model,
    but never chooses code to import; a factory is built only when the user names it."""
    if model_spec is not None:
        return model_spec
    if not plan_model:
        raise RankdownError(f"{folder}/plan.json does not say which model it was made from: pass --model")
    from rankdown.models.hf import is_hf

    if plan_model not in BUNDLED and not is_hf(plan_model):  # hf: loads data only (no remote code)
        raise RankdownError(
            f"{folder}/plan.json names the model {plan_model!r}, which is not bundled; a saved folder never "
            f"chooses code to run: pass --model {plan_model} (Python: model_spec=...) to build it"
        )
    return plan_model


def open_saved(
    folder: str | Path,
    opts: MeasureOptions,
    weights: str | None = None,
    model_spec: str | None = None,
    data: dict[str, Data] | None = None,
) -> Saved:
    """The dense original is rebuilt when it can be: a bundled model, a factory's own weights, or
    the weights file recorded in the plan (or given) if it still exists."""
    plan = read_plan(folder)
    spec = trusted_model_spec(folder, plan.model, model_spec)
    model = load_compressed(folder, build_model(spec, pretrained=False))
    dense_weights = weights or plan.meta.get("source_weights")
    if dense_weights is not None and not isinstance(dense_weights, str):
        raise RankdownError(f"{folder}/plan.json: meta.source_weights must be a path, got {dense_weights!r}")
    available = dense_weights is None or Path(dense_weights).is_file()
    workload = build_workload(
        spec,
        weights=dense_weights if available else None,
        input_shape=plan.input_shape,
        data=data,
        opts=opts,
    )
    plan.model = spec
    return Saved(plan, workload, model, workload.model if available else None)


def remeasure(saved: Saved, opts: MeasureOptions, argv: list[str] | None) -> Report:
    from rankdown.measurement.bench import layer_costs
    from rankdown.planning.compress import LayerReport

    example = saved.workload.example
    names = list(saved.plan.layers)
    after = layer_costs(saved.model, example, names)
    # Costs do not depend on the weights: the architecture gives them even when the dense
    # weights file has gone (then saved.dense is None and only quality against it is unknown).
    before = layer_costs(saved.workload.model, example, names)
    rows = [
        LayerReport(n, lp.layer_type, lp.method, lp.rank, before[n], after[n], None)
        for n, lp in saved.plan.layers.items()
    ]
    measured = measure(saved.workload, saved.dense, saved.model, opts)
    return build_report(
        CompressResult(saved.model, saved.plan, rows),
        model_spec=saved.plan.model,
        model_before=model_cost(saved.workload.model, example),
        model_after=model_cost(saved.model, example),
        argv=argv,
        **measured,
    )


def run_eval(
    folder: str | Path,
    *,
    weights: str | None = None,
    opts: MeasureOptions | None = None,
    argv: list[str] | None = None,
    model_spec: str | None = None,
    data: dict[str, Data] | None = None,
) -> Report:
    """Rebuild a saved compressed model from its plan and measure it again."""
    opts = opts or MeasureOptions()
    return remeasure(open_saved(folder, opts, weights, model_spec, data), opts, argv)


# --------------------------------------------------------------------------- training


def finetune_on(
    model: nn.Module,
    dense: nn.Module | None,
    plan_layers: list[str],
    workload: Workload,
    config: TrainConfig,
    train_limit: int | None = None,
    *,
    checkpoint_dir: Path | None = None,
    resume: bool = False,
) -> list[dict]:
    """Fine-tune on the workload's training data: the task loss where it has labels (plus
    distillation if asked), distillation from the dense model alone where it has none."""
    train = _trainable(workload.need("train", "--train-data", "fine-tuning"), "--train-data")
    config = dataclasses.replace(
        config, augment=config.augment and workload.augment, flip=config.flip and workload.flip
    )
    if train.task == "causal-lm":  # next-token prediction: the text is its own label
        config = dataclasses.replace(config, causal_lm=True)
    elif not train.labelled:
        if dense is None:
            raise RankdownError(
                "unlabelled training data: fine-tuning distils from the dense model, whose weights are gone"
            )
        config = dataclasses.replace(config, distill=1.0)
    teacher = dense if config.distill > 0 else None
    dataset = train.dataset
    if train_limit is not None and dataset is not None and train_limit < len(dataset):  # type: ignore[arg-type]
        dataset = (
            torch.utils.data.Subset(dataset, range(train_limit))
            if not hasattr(dataset, "images")
            else _head(dataset, train_limit)
        )
    if train.collate is not default_collate:  # the user's DataLoader batches with its own collate_fn
        dataset = _Collated(dataset, train.collate)
    return finetune(
        model,
        dataset,
        config,
        teacher=teacher,
        trainable=plan_layers,
        checkpoint_dir=checkpoint_dir,
        resume=resume,
    )


class _Collated(torch.utils.data.Dataset):
    """A map-style dataset with the collate_fn its DataLoader batches it with."""

    def __init__(self, dataset, collate_fn) -> None:
        self.dataset, self.collate_fn = dataset, collate_fn

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        return self.dataset[i]


def _head(split, n: int):
    from rankdown.zoo.fashion import Split

    return Split(split.images[:n], split.labels[:n])


def run_finetune(
    folder: str | Path,
    config: TrainConfig,
    *,
    resume: bool = False,
    train_limit: int | None = None,
    opts: MeasureOptions | None = None,
    argv: list[str] | None = None,
    model_spec: str | None = None,
    data: dict[str, Data] | None = None,
) -> Report:
    """Fine-tune a saved compressed model in place. The folder changes in one step at the end
    (new weights, plan and report together, or nothing); epoch checkpoints go to
    FOLDER/checkpoints (``resume`` continues them) and are carried over."""
    opts = opts or MeasureOptions()
    folder = Path(folder)
    check_output_dir(folder, force=True)  # only a folder rankdown wrote is rewritten
    saved = open_saved(folder, opts, model_spec=model_spec, data=data)
    _trainable(saved.workload.need("train", "--train-data", "fine-tuning"), "--train-data")
    if config.distill > 0 and saved.dense is None:
        raise RankdownError("distillation needs the dense original, whose weights file is gone")
    q0 = _quality_now(saved.model, saved.workload, opts)
    history = finetune_on(
        saved.model,
        saved.dense,
        list(saved.plan.layers),
        saved.workload,
        config,
        train_limit,
        checkpoint_dir=folder / "checkpoints",
        resume=resume,
    )
    report = remeasure(saved, opts, argv)
    report.finetune = _finetune_record(config, history, q0)
    save_compressed(folder, saved.model, saved.plan, report.to_dict(), force=True, keep=("checkpoints",))
    return report


# --------------------------------------------------------------------------- bench


@dataclass
class BenchOptions:
    batch_sizes: tuple[int, ...] = (1, 64)
    threads: int = 2
    device: str = "cpu"
    dtype: str = "float32"
    runs: int = 30
    compile: bool = False
    cuda_graphs: bool = False
    fold_bn: bool = False
    per_layer: bool = False
    guard: bool = True
    onnxruntime: bool = False


def _runs(o: BenchOptions, b: int) -> int:
    """Fewer repeats at large batch: each call is long enough to time on its own."""
    return o.runs if b <= 8 else max(5, o.runs // 3)


def _e2e(model: nn.Module, example: Inputs, b: int, o: BenchOptions) -> dict:
    from rankdown.measurement.bench import best_latency, compiled_latency
    from rankdown.planning.latency import cuda_latency

    dtype = getattr(torch, o.dtype)
    m = model.to(device=o.device, dtype=dtype).eval()
    x = to_model(batch_tile(example, b), m)
    if o.compile and o.device == "cpu":
        return compiled_latency(
            m, x, runs=_runs(o, b), threads=o.threads, guard=o.guard, desc=f"compiled b{b}"
        ).to_dict()
    if o.compile:
        m = cast(nn.Module, torch.compile(m))  # an OptimizedModule, typed as a callable
    if o.device == "cuda":
        if not isinstance(x, torch.Tensor):
            raise RankdownError("--device cuda times models whose input is one tensor")
        xt = x
        times = {
            cl: cuda_latency(m, xt, runs=o.runs, channels_last=cl, cuda_graph=o.cuda_graphs)
            for cl in ((False, True) if xt.ndim == 4 else (False,))
        }
        best = min(times, key=lambda k: times[k])
        return {"median_ms": times[best], "channels_last": best}
    lat = best_latency(m, x, runs=_runs(o, b), threads=o.threads, guard=o.guard, desc=f"bench b{b}")
    return lat.to_dict()


def _ort_models(models: dict[str, nn.Module], example: Inputs, o: BenchOptions) -> dict[str, nn.Module]:
    """Each model exported to ONNX (folded, dynamic batch, parity-checked) and wrapped for timing."""
    from rankdown.deployment.export import onnxruntime_modules

    if o.device != "cpu":
        raise RankdownError("--onnxruntime times on the CPU only")
    check = [example, batch_tile(example, 2)]
    return {k: onnxruntime_modules(m, example, threads=o.threads, check=check)["all"] for k, m in models.items()}


def _ort_latency(m: nn.Module, example: Inputs, b: int, o: BenchOptions) -> dict:
    from rankdown.measurement.bench import measure_latency

    lat = measure_latency(m, batch_tile(example, b), runs=_runs(o, b), guard=o.guard, desc=f"onnxruntime b{b}")
    return lat.to_dict()


def run_export(
    folder: str | Path,
    path: str | Path,
    fmt: str,
    *,
    batch: int = 1,
    dynamic_batch: bool = True,
    fold: bool = True,
    model_spec: str | None = None,
    data: dict[str, Data] | None = None,
) -> dict:
    """A saved compressed model exported to ``path`` (see rankdown.deployment.export), checked on the
    evaluation data when given, else on the example and seeded noise of its shape."""
    from rankdown.deployment.export import export_model

    saved = open_saved(folder, MeasureOptions(), model_spec=model_spec, data=data)
    example = batch_tile(saved.workload.example, batch)
    ev = (data or {}).get("eval")
    if ev is not None:
        check = [to_model(x, saved.model) for x, _ in ev.batches(limit=64)]
        on = ev.describe()
    else:
        check = [example]
        if isinstance(example, torch.Tensor) and example.is_floating_point():
            check.append(example_input(saved.model, tuple(example.shape[1:]), 4, random=True))
        on = "the example input and seeded noise"
    result = export_model(saved.model, example, path, fmt, check=check, dynamic_batch=dynamic_batch, fold=fold)
    result["checked_on"] = on
    return result


def run_bench(
    target: str,
    *,
    weights: str | None = None,
    input_shape: tuple[int, ...] | None = None,
    bench: BenchOptions | None = None,
    model_spec: str | None = None,
) -> dict:
    """End-to-end (and optionally per-layer) latency of a saved compressed model beside its dense
    original, or of one model; each in its fastest layout; with the theoretical MAC reduction."""
    from rankdown.deployment.deploy import deploy
    from rankdown.measurement.bench import environment
    from rankdown.planning.latency import DeviceKey, LatencyTable
    from rankdown.surgery import record_inputs

    o = bench or BenchOptions()
    if o.device == "cuda" and not torch.cuda.is_available():
        raise RankdownError("--device cuda: no CUDA device is available here")
    if o.cuda_graphs and o.device != "cuda":
        raise RankdownError("--cuda-graphs needs --device cuda")
    if o.device == "cpu" and o.dtype != "float32":
        raise RankdownError("on CPU rankdown benchmarks float32 only (bf16/fp16 CPU kernels are not the fast path)")
    models: dict[str, nn.Module] = {}
    plan = None
    if (Path(target) / "plan.json").is_file():
        saved = open_saved(target, MeasureOptions(), weights, model_spec)
        plan, example = saved.plan, saved.workload.example
        models["compressed"] = saved.model
        if saved.dense is not None:
            models["dense"] = saved.dense
    elif Path(target).exists() or ("/" in target and ":" not in target):
        raise RankdownError(f"{target} holds no plan.json: not a rankdown output folder (nor a model name)")
    else:
        shape = input_shape_for(target, input_shape)
        if shape is None:
            raise RankdownError(f"model {target!r} is not bundled: give --input-shape (one example, e.g. 3,224,224)")
        models["model"] = build_model(target, weights)
        example = example_input(models["model"], shape)
    if o.fold_bn:
        for m in models.values():
            deploy(m)
    costs = {k: model_cost(m, example).macs for k, m in models.items()}
    if o.threads:
        torch.set_num_threads(o.threads)
    rows = []
    ort = _ort_models(models, example, o) if o.onnxruntime else {}
    for b in o.batch_sizes:
        row: dict = {"batch": b}
        for k, m in models.items():
            row[k] = _e2e(m, example, b, o)
        for k, m in ort.items():
            row[f"{k} (onnxruntime)"] = _ort_latency(m, example, b, o)
        if "dense" in row and "compressed" in row:
            row["speedup"] = row["dense"]["median_ms"] / row["compressed"]["median_ms"]
            row["theoretical"] = costs["dense"] / costs["compressed"]
            row["ratio"] = row["speedup"] / row["theoretical"]
            if ort:
                ort_speedup = row["dense (onnxruntime)"]["median_ms"] / row["compressed (onnxruntime)"]["median_ms"]
                row["speedup_onnxruntime"] = ort_speedup
                row["ratio_onnxruntime"] = ort_speedup / row["theoretical"]
        rows.append(row)
    layers = []
    if o.per_layer and plan is not None and "dense" in models:
        key = DeviceKey.current(o.device, getattr(torch, o.dtype), o.batch_sizes[0], o.threads)
        table = LatencyTable(key, runs=o.runs, guard=o.guard)
        names = list(plan.layers)
        ins = record_inputs(models["dense"].cpu().float(), example, names)
        for n in names:
            dense_l, comp_l = models["dense"].get_submodule(n), models["compressed"].get_submodule(n)
            in_shape = tuple(ins[n].shape[1:])
            dm, cm = table.time(copy.deepcopy(dense_l), in_shape), table.time(copy.deepcopy(comp_l), in_shape)
            from rankdown.measurement.bench import module_cost

            mac_d = module_cost(dense_l.cpu().float(), torch.zeros((1, *in_shape))).macs
            mac_c = module_cost(comp_l.cpu().float(), torch.zeros((1, *in_shape))).macs
            layers.append(
                {
                    "name": n,
                    "method": plan.layers[n].method,
                    "dense_ms": dm,
                    "compressed_ms": cm,
                    "speedup": dm / cm,
                    "theoretical": mac_d / max(mac_c, 1),
                    "ratio": dm / cm / (mac_d / max(mac_c, 1)),
                }
            )
        table.save()
    return {
        "target": target,
        "options": dataclasses.asdict(o),
        "macs": costs,
        "end_to_end": rows,
        "layers": layers,
        "environment": environment(),
    }
