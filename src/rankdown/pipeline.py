"""The main job, end to end, shared by the CLI and the Python API: build → compress → evaluate →
measure → save. Each step is a library call; this module only strings them together."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from rankdown.allocate import Budget
from rankdown.api import CompressConfig, CompressResult, allocate_ranks, compress
from rankdown.bench import compare_latency, model_cost
from rankdown.data import load_fashion_mnist
from rankdown.errors import RankdownError
from rankdown.models import BUNDLED, build_model
from rankdown.plan import load_compressed, read_plan, save_compressed
from rankdown.report import build_report
from rankdown.train import evaluate

DATASETS = {"fashion-mnist": load_fashion_mnist}


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


def calibration_inputs(spec: str, shape: tuple[int, ...], n: int, data_dir: str | None) -> torch.Tensor:
    """The first ``n`` training images for a bundled model; seeded Gaussian inputs otherwise (a
    user model's data is not known here: the sensitivity is then that of the layers' weights
    under white-noise inputs, which the report says)."""
    if n < 1:
        raise RankdownError(f"--calibration must be >= 1 example, got {n}")
    if spec in BUNDLED and BUNDLED[spec].dataset:
        return DATASETS[BUNDLED[spec].dataset]("train", data_dir, limit=n).images
    return torch.randn((n, *shape), generator=torch.Generator().manual_seed(0))


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
    x = torch.randn((n, *input_shape), generator=torch.Generator().manual_seed(0))
    a, b = dense.eval()(x), compressed.eval()(x)
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(a).clamp_min(1e-30))


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
) -> tuple[CompressResult, dict]:
    """Compress ``spec`` (bundled name or package.module:factory), measure, and save to ``out``.

    With ``allocation``, ranks come from the global allocator under its whole-model budget, and
    ``config.rank`` is ignored."""
    opts = opts or MeasureOptions()
    if out is not None and Path(out).exists() and (not Path(out).is_dir() or any(Path(out).iterdir())) and not force:
        # Checked first so that minutes of work are not thrown away at the end.
        raise RankdownError(f"output folder {out} is not empty; pass --force to replace it")
    shape = input_shape_for(spec, input_shape)
    test = load_test_split(spec, opts)
    dense = build_model(spec, weights)
    if spec in BUNDLED and config.layers is None and not config.skip:
        config = CompressConfig(config.method, config.rank, None, BUNDLED[spec].default_skip, config.filter_fn)
    example = torch.zeros((1, *shape))
    if allocation is not None:
        calib = calibration_inputs(spec, shape, allocation.calibration, opts.data_dir)
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
    result = compress(dense, config, example, model_spec=spec)
    if allocation is not None:
        result.plan.meta["allocation"] = allocation.to_dict()
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
    if out is not None:
        save_compressed(out, result.model, result.plan, report, force=force)
    return result, report


def run_eval(
    folder: str | Path, *, weights: str | None = None, opts: MeasureOptions | None = None, argv: list[str] | None = None
) -> dict:
    """Rebuild a saved compressed model from its plan and re-measure it (and its dense original
    when that can be rebuilt: a bundled model, or the plan's recorded weights file)."""
    opts = opts or MeasureOptions()
    plan = read_plan(folder)
    if not plan.model:
        raise RankdownError(f"{folder}/plan.json does not say which model it was made from ('model' is empty)")
    shape = input_shape_for(plan.model, plan.input_shape)
    test = load_test_split(plan.model, opts)
    compressed = load_compressed(folder, build_model(plan.model, pretrained=False))
    dense_weights = weights or plan.meta.get("source_weights")
    dense = None
    if dense_weights is None or Path(dense_weights).is_file():
        dense = build_model(plan.model, dense_weights)
    example = torch.zeros((1, *shape))
    from rankdown.api import LayerReport  # local: only eval rebuilds rows from a plan
    from rankdown.bench import layer_costs

    names = list(plan.layers)
    after = layer_costs(compressed, example, names)
    before = layer_costs(dense, example, names) if dense is not None else after
    rows = [
        LayerReport(n, lp.layer_type, lp.method, lp.rank, before[n], after[n], None) for n, lp in plan.layers.items()
    ]
    result = CompressResult(compressed, plan, rows)
    measured = measure(test, dense, compressed, shape, opts)
    return build_report(
        result,
        model_spec=plan.model,
        model_before=None if dense is None else model_cost(dense, example),
        model_after=model_cost(compressed, example),
        argv=argv,
        **measured,
    )
