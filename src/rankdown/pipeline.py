"""The main job, end to end, shared by the CLI and the Python API: build → compress → evaluate →
measure → save. Each step is a library call; this module only strings them together."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from rankdown.allocate import Budget, relative_error
from rankdown.api import CompressConfig, CompressResult, allocate_ranks, compress, select_targets
from rankdown.bench import compare_latency, model_cost
from rankdown.calibrate import CalibrationConfig
from rankdown.data import load_fashion_mnist
from rankdown.errors import RankdownError
from rankdown.models import BUNDLED, build_model
from rankdown.plan import load_compressed, read_plan, save_compressed
from rankdown.probe import check_runs, example_input, model_dtype_device, primary_output
from rankdown.report import build_report
from rankdown.storage import atomic_write_dir, check_output_dir
from rankdown.train import TrainConfig, evaluate, finetune


def _chars(split: str, data_dir: str | None = None, limit: int | None = None):
    from rankdown.chars import load_chars  # renders (once, then cached) only when asked for

    return load_chars(split, limit=limit)


DATASETS = {"fashion-mnist": load_fashion_mnist, "chars": _chars}


@dataclass
class MeasureOptions:
    data_dir: str | None = None
    eval_limit: int | None = None  # first N test examples; None = the whole test split
    batch_sizes: tuple[int, ...] = (1, 64)
    latency_runs: int = 30
    threads: int | None = 2
    guard: bool = True
    measure_latency: bool = True


@dataclass
class AllocationOptions:
    budget: Budget
    criterion: str = "model"
    calibration: int = 256  # examples
    round_to: int = 1
    cache_dir: str | None = None

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["budget"] = {k: v for k, v in dataclasses.asdict(self.budget).items() if v is not None}
        return d


@dataclass
class LatencyOptions:
    max_error: float = 0.3  # per-layer relative output error on the calibration data
    methods: list[str] = dataclasses.field(default_factory=lambda: ["tucker2", "channel-svd", "separable", "cp", "svd"])
    batch: int = 1
    channels_last: bool = False
    calibration: int = 64
    cache_dir: str | None = None
    criterion: str = "layer"  # whose output max_error is measured on: the layer's own, or the model's
    scope: str = "each"  # max_error bounds each layer's error, or their sum


@dataclass
class ReconstructionOptions:
    """Data reconstruction after the filter fit (``--calibration N``, ``--reconstruct MODE``)."""

    examples: int
    config: CalibrationConfig = dataclasses.field(default_factory=CalibrationConfig)


def reconstruct_layers(
    result: CompressResult, dense: nn.Module, spec: str, shape: tuple[int, ...], opts: ReconstructionOptions, data_dir
) -> dict:
    """Refit ``result``'s factorized layers to the dense layers' outputs; notes go in the report rows."""
    from rankdown.calibrate import reconstruct

    calib = calibration_inputs(spec, shape, opts.examples, data_dir, dense)
    fitted = reconstruct(dense, result.model, list(result.plan.layers), calib, opts.config)
    for row in result.layers:
        if row.name in fitted:
            f = fitted[row.name]
            row.info["calibration"] = f
            errs = f"{f['output_error_before']:.3f}→{f['output_error_after']:.3f}"
            row.note = (row.note + "; " if row.note else "") + f"{opts.config.mode} fit ({f['how']}): out err {errs}"
    result.plan.meta["calibration"] = {
        "mode": opts.config.mode,
        "examples": opts.examples,
        "data": "training images" if spec in BUNDLED and BUNDLED[spec].dataset else "seeded Gaussian noise",
    }
    return fitted


def calibration_inputs(
    spec: str, shape: tuple[int, ...], n: int, data_dir: str | None, like: nn.Module | None = None
) -> torch.Tensor:
    """The first ``n`` training images for a bundled model; seeded Gaussian inputs otherwise (a
    user model's data is not known here: the sensitivity is then that of the layers' weights
    under white-noise inputs, which the report says)."""
    if n < 1:
        raise RankdownError(f"--calibration must be >= 1 example, got {n}")
    if spec in BUNDLED and BUNDLED[spec].dataset:
        x = DATASETS[BUNDLED[spec].dataset]("train", data_dir, limit=n).images
    else:
        x = torch.randn((n, *shape), generator=torch.Generator().manual_seed(0))
    if like is None:
        return x
    dtype, device = model_dtype_device(like)
    return x.to(dtype=dtype, device=device)


def input_shape_for(spec: str, input_shape: tuple[int, ...] | None) -> tuple[int, ...]:
    if input_shape is not None:
        if not input_shape or any(d <= 0 for d in input_shape):
            raise RankdownError(f"--input-shape must be positive sizes without the batch, got {input_shape}")
        return tuple(input_shape)
    if spec in BUNDLED:
        return BUNDLED[spec].input_shape
    raise RankdownError(f"model {spec!r} is not bundled: give --input-shape (one example, e.g. 3,224,224)")


@torch.no_grad()
def output_rel_error(dense: nn.Module, compressed: nn.Module, input_shape: tuple[int, ...], n: int = 32) -> float:
    x = example_input(dense, input_shape, n, random=True)
    return relative_error(primary_output(compressed.eval()(x)), primary_output(dense.eval()(x)))


def load_test_split(spec: str, opts: MeasureOptions):
    """The bundled model's test split, or None. Loaded before any compression work, so that a
    missing dataset fails in a second, not after minutes."""
    dataset = BUNDLED[spec].dataset if spec in BUNDLED else None
    if dataset is None:
        return None
    return dataset, DATASETS[dataset]("test", opts.data_dir, limit=opts.eval_limit)


def accuracy(test, models: dict[str, nn.Module | None]) -> dict | None:
    if test is None:
        return None
    name, split = test
    res: dict = {"dataset": f"{name} test", "n": len(split)}
    for key, m in models.items():
        res[key] = (
            None
            if m is None
            else evaluate(m, split.batches(500), total=math.ceil(len(split) / 500), desc=f"accuracy ({key})")
        )
    return res


def measure(
    test, dense: nn.Module | None, compressed: nn.Module, input_shape: tuple[int, ...], opts: MeasureOptions
) -> dict:
    return {
        "accuracy": accuracy(test, {"before": dense, "after": compressed}),
        "output_rel_error": None if dense is None else output_rel_error(dense, compressed, input_shape),
        "latency": compare_latency(
            dense,
            compressed,
            input_shape,
            batch_sizes=opts.batch_sizes,
            runs=opts.latency_runs,
            threads=opts.threads,
            guard=opts.guard,
        )
        if opts.measure_latency
        else None,
    }


def run_compress(
    spec: str,
    config: CompressConfig,
    *,
    weights: str | None = None,
    input_shape: tuple[int, ...] | None = None,
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
) -> tuple[CompressResult, dict]:
    """Compress ``spec`` (bundled name or package.module:factory), measure, and save to ``out``.

    With ``allocation``, ranks come from the global allocator under its whole-model budget, and
    ``config.rank`` is ignored."""
    opts = opts or MeasureOptions()
    if out is not None:
        check_output_dir(out, force)  # first, so that minutes of work are not thrown away at the end
    shape = input_shape_for(spec, input_shape)
    test = load_test_split(spec, opts)
    dense = build_model(spec, weights)
    if spec in BUNDLED and config.layers is None and not config.skip:
        config = CompressConfig(config.method, config.rank, None, BUNDLED[spec].default_skip, config.filter_fn)
    example = example_input(dense, shape)
    check_runs(dense, example, f"model {spec!r}")
    select_targets(dense, config)  # unknown or unsupported layers named by the user fail now
    if latency_aware is not None:
        from rankdown.latency import DeviceKey, latency_ranks

        calib = calibration_inputs(spec, shape, latency_aware.calibration, opts.data_dir, dense)
        key = DeviceKey.current(
            "cpu", batch=latency_aware.batch, threads=opts.threads, channels_last=latency_aware.channels_last
        )
        policy, _ = latency_ranks(
            dense,
            config,
            calib,
            key,
            max_error=latency_aware.max_error,
            methods=latency_aware.methods,
            cache_dir=latency_aware.cache_dir,
            guard=opts.guard,
            criterion=latency_aware.criterion,
            scope=latency_aware.scope,
        )
        config = dataclasses.replace(config, rank=policy)
    if allocation is not None:
        calib = calibration_inputs(spec, shape, allocation.calibration, opts.data_dir, dense)
        policy = allocate_ranks(
            dense,
            config,
            calib,
            allocation.budget,
            criterion=allocation.criterion,
            round_to=allocation.round_to,
            cache_dir=allocation.cache_dir,
        )
        config = dataclasses.replace(config, rank=policy)
    metrics = None
    if metric != "frobenius":
        from rankdown.metrics import collect

        calib = calibration_inputs(spec, shape, metric_examples, opts.data_dir, dense)
        metrics = collect(dense, select_targets(dense, config).targets, calib, metric)
    if progressive is not None:
        from rankdown.progressive import progressive_compress

        split = train_split_for(spec, opts.data_dir, train_limit, "rankdown.progressive.progressive_compress")
        if BUNDLED[spec].dataset == "chars":
            progressive = dataclasses.replace(progressive, flip=False)
        result, _ = progressive_compress(dense, config, example, split, progressive, metrics=metrics, model_spec=spec)
        result.plan.meta["progressive"] = {"steps_per_layer": progressive.max_steps_per_epoch, "lr": progressive.lr}
    else:
        result = compress(dense, config, example, model_spec=spec, metrics=metrics)
    result.plan.meta["metric"] = metric
    if allocation is not None:
        result.plan.meta["allocation"] = allocation.to_dict()
    if reconstruction is not None:
        reconstruct_layers(result, dense, spec, shape, reconstruction, opts.data_dir)
    ft = None
    if finetune_config is not None:
        acc0 = accuracy(test, {"after": result.model})
        history = finetune_compressed(
            result.model,
            dense,
            list(result.plan.layers),
            spec,
            finetune_config,
            data_dir=opts.data_dir,
            train_limit=train_limit,
        )
        ft = {
            "config": dataclasses.asdict(finetune_config),
            "history": history,
            "accuracy_before_finetune": (acc0 or {}).get("after"),
        }
    # None: the factory's (or the bundled model's) own weights are the original.
    result.plan.meta["source_weights"] = None if weights is None else str(Path(weights).resolve())
    measured = measure(test, dense, result.model, shape, opts)
    report = build_report(
        result,
        model_spec=spec,
        model_before=model_cost(dense, example),
        model_after=model_cost(result.model, example),
        argv=argv,
        **measured,
    )
    if ft is not None:
        report["finetune"] = ft
    if out is not None:
        save_compressed(out, result.model, result.plan, report, force=force)
    return result, report


@dataclass
class Saved:
    """A saved compressed model rebuilt from its folder, with its dense original where possible."""

    plan: object
    shape: tuple[int, ...]
    test: object
    model: nn.Module
    dense: nn.Module | None


def trusted_model_spec(folder: str | Path, plan_model: str | None, model_spec: str | None) -> str:
    """The model to build for a saved folder. A saved folder is data: it may name a bundled model,
    but never chooses code to import; a factory is built only when the user names it."""
    if model_spec is not None:
        return model_spec
    if not plan_model:
        raise RankdownError(f"{folder}/plan.json does not say which model it was made from: pass --model")
    if plan_model not in BUNDLED:
        raise RankdownError(
            f"{folder}/plan.json names the model {plan_model!r}, which is not bundled; a saved folder never "
            f"chooses code to run: pass --model {plan_model} (Python: model_spec=...) to build it"
        )
    return plan_model


def open_saved(
    folder: str | Path, opts: MeasureOptions, weights: str | None = None, model_spec: str | None = None
) -> Saved:
    """The dense original is rebuilt when it can be: a bundled model, a factory's own weights, or
    the weights file recorded in the plan (or given) if it still exists."""
    plan = read_plan(folder)
    spec = trusted_model_spec(folder, plan.model, model_spec)
    shape = input_shape_for(spec, plan.input_shape)
    test = load_test_split(spec, opts)
    model = load_compressed(folder, build_model(spec, pretrained=False))
    dense_weights = weights or plan.meta.get("source_weights")
    if dense_weights is not None and not isinstance(dense_weights, str):
        raise RankdownError(f"{folder}/plan.json: meta.source_weights must be a path, got {dense_weights!r}")
    dense = build_model(spec, dense_weights) if dense_weights is None or Path(dense_weights).is_file() else None
    plan.model = spec
    return Saved(plan, shape, test, model, dense)


def remeasure(saved: Saved, opts: MeasureOptions, argv: list[str] | None) -> dict:
    from rankdown.api import LayerReport
    from rankdown.bench import layer_costs

    example = example_input(saved.model, saved.shape)
    names = list(saved.plan.layers)
    after = layer_costs(saved.model, example, names)
    before = layer_costs(saved.dense, example, names) if saved.dense is not None else after
    rows = [
        LayerReport(n, lp.layer_type, lp.method, lp.rank, before[n], after[n], None)
        for n, lp in saved.plan.layers.items()
    ]
    measured = measure(saved.test, saved.dense, saved.model, saved.shape, opts)
    return build_report(
        CompressResult(saved.model, saved.plan, rows),
        model_spec=saved.plan.model,
        model_before=None if saved.dense is None else model_cost(saved.dense, example),
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
) -> dict:
    """Rebuild a saved compressed model from its plan and measure it again."""
    opts = opts or MeasureOptions()
    return remeasure(open_saved(folder, opts, weights, model_spec), opts, argv)


# --------------------------------------------------------------------------- training


def train_split_for(spec: str, data_dir: str | None, limit: int | None = None, api: str = "rankdown.train.finetune"):
    if spec not in BUNDLED or not BUNDLED[spec].dataset:
        raise RankdownError(
            f"fine-tuning needs training data: model {spec!r} has no bundled dataset (use the Python API, "
            f"{api}, with your own data)"
        )
    return DATASETS[BUNDLED[spec].dataset]("train", data_dir, limit=limit)


def finetune_compressed(
    result_model: nn.Module,
    dense: nn.Module,
    plan_layers: list[str],
    spec: str,
    config: TrainConfig,
    *,
    data_dir: str | None = None,
    train_limit: int | None = None,
    checkpoint_dir: Path | None = None,
    resume: bool = False,
) -> list[dict]:
    split = train_split_for(spec, data_dir, train_limit)
    if spec in BUNDLED and BUNDLED[spec].dataset == "chars" and config.flip:
        config = dataclasses.replace(config, flip=False)  # a mirrored character is another character
    teacher = dense if config.distill > 0 else None
    return finetune(
        result_model,
        split,
        config,
        teacher=teacher,
        trainable=plan_layers,
        checkpoint_dir=checkpoint_dir,
        resume=resume,
    )


def run_finetune(
    folder: str | Path,
    config: TrainConfig,
    *,
    resume: bool = False,
    train_limit: int | None = None,
    opts: MeasureOptions | None = None,
    argv: list[str] | None = None,
    model_spec: str | None = None,
) -> dict:
    """Fine-tune a saved compressed model in place. The folder changes in one step at the end
    (new weights, plan and report together, or nothing); epoch checkpoints go to
    FOLDER/checkpoints (``resume`` continues them) and are carried over."""
    from safetensors.torch import save_file

    from rankdown.plan import PLAN_FILE, REPORT_FILE, WEIGHTS_FILE

    opts = opts or MeasureOptions()
    folder = Path(folder)
    check_output_dir(folder, force=True)  # only a folder rankdown wrote is rewritten
    saved = open_saved(folder, opts, model_spec=model_spec)
    plan_text = (folder / PLAN_FILE).read_text()
    if config.distill > 0 and saved.dense is None:
        raise RankdownError("distillation needs the dense original, whose weights file is gone")
    before_acc = accuracy(saved.test, {"before_finetune": saved.model})
    history = finetune_compressed(
        saved.model,
        saved.dense,
        list(saved.plan.layers),
        saved.plan.model,
        config,
        data_dir=opts.data_dir,
        train_limit=train_limit,
        checkpoint_dir=folder / "checkpoints",
        resume=resume,
    )
    report = remeasure(saved, opts, argv)
    report["finetune"] = {
        "config": dataclasses.asdict(config),
        "history": history,
        "accuracy_before_finetune": (before_acc or {}).get("before_finetune"),
    }

    def write(tmp: Path) -> None:
        (tmp / PLAN_FILE).write_text(plan_text)
        state = {k: v.detach().contiguous().cpu() for k, v in saved.model.state_dict().items()}
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "rankdown-plan"})
        (tmp / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")

    atomic_write_dir(folder, write, force=True, keep=("checkpoints",))
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


def _e2e(model: nn.Module, shape: tuple[int, ...], b: int, o: BenchOptions) -> dict:
    from rankdown.bench import best_latency
    from rankdown.latency import cuda_latency

    dtype = getattr(torch, o.dtype)
    m = model.to(device=o.device, dtype=dtype).eval()
    if o.compile:
        m = torch.compile(m)
    x = torch.randn((b, *shape), device=o.device, dtype=dtype)
    if o.device == "cuda":
        runs = {
            cl: cuda_latency(m, x, runs=o.runs, channels_last=cl, cuda_graph=o.cuda_graphs)
            for cl in ((False, True) if x.ndim == 4 else (False,))
        }
        cl = min(runs, key=runs.get)
        return {"median_ms": runs[cl], "channels_last": cl}
    lat = best_latency(
        m, x, runs=o.runs if b <= 8 else max(5, o.runs // 3), threads=o.threads, guard=o.guard, desc=f"bench b{b}"
    )
    return lat.to_dict()


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
    from rankdown.bench import environment
    from rankdown.deploy import deploy
    from rankdown.latency import DeviceKey, LatencyTable
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
        plan, shape = saved.plan, saved.shape
        models["compressed"] = saved.model
        if saved.dense is not None:
            models["dense"] = saved.dense
    elif Path(target).exists() or ("/" in target and ":" not in target):
        raise RankdownError(f"{target} holds no plan.json: not a rankdown output folder (nor a model name)")
    else:
        models["model"] = build_model(target, weights)
        shape = input_shape_for(target, input_shape)
    if o.fold_bn:
        for m in models.values():
            deploy(m)
    example = example_input(next(iter(models.values())), shape)
    costs = {k: model_cost(m, example).macs for k, m in models.items()}
    if o.threads:
        torch.set_num_threads(o.threads)
    rows = []
    for b in o.batch_sizes:
        row: dict = {"batch": b}
        for k, m in models.items():
            row[k] = _e2e(m, shape, b, o)
        if "dense" in row and "compressed" in row:
            row["speedup"] = row["dense"]["median_ms"] / row["compressed"]["median_ms"]
            row["theoretical"] = costs["dense"] / costs["compressed"]
            row["ratio"] = row["speedup"] / row["theoretical"]
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
            from rankdown.bench import module_cost

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
