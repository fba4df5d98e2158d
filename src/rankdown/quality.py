"""Quality of a compressed model on the user's data, for any model: top-1/top-5 accuracy where
labels exist, and always agreement with the dense model (top-1 agreement, KL divergence of the
output distributions, relative output error), plus a user's own metric. Streamed in batches."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from rankdown.errors import RankdownError
from rankdown.probe import batch_len, forward, primary_output, to_model
from rankdown.progress import progress
from rankdown.sources import Data

MetricFn = Callable[[nn.Module, Any], dict]


def _classes(y: torch.Tensor) -> bool:
    """Outputs with a class dimension last (logits): agreement and KL are defined on them."""
    return y.ndim >= 2 and y.shape[-1] > 1


@torch.no_grad()
def evaluate(
    models: dict[str, nn.Module | None],
    data: Data,
    *,
    reference: str | None = "dense",
    limit: int | None = None,
    metric: MetricFn | None = None,
    desc: str = "evaluate",
) -> dict:
    """Metrics of each model on ``data`` (at most ``limit`` examples): ``{"data", "examples",
    "metrics": {name: {model: value}}}``. Agreement metrics compare each model with ``reference``."""
    live = {k: m.eval() for k, m in models.items() if m is not None}
    ref = live.get(reference) if reference else None
    sums: dict[str, dict[str, float]] = {}
    n = 0

    def add(metric_name: str, model_name: str, value: float) -> None:
        sums.setdefault(metric_name, {}).setdefault(model_name, 0.0)
        sums[metric_name][model_name] += value

    sq_diff: dict[str, float] = {}
    sq_ref = 0.0
    for x, y in progress(data.batches(limit), desc=desc):
        outs = {k: primary_output(forward(m, to_model(x, m))).float() for k, m in live.items()}
        b = batch_len(x)
        n += b
        if y is not None:
            for k, o in outs.items():
                if not _classes(o) or o.shape[:-1] != y.shape:
                    raise RankdownError(
                        f"{data.name}: labels of shape {tuple(y.shape)} do not match outputs of shape {tuple(o.shape)}"
                    )
                if int(y.max()) >= o.shape[-1] or int(y.min()) < 0:
                    raise RankdownError(f"{data.name}: label {int(y.max())} is out of the {o.shape[-1]} outputs")
                top = o.topk(min(5, o.shape[-1]), dim=-1).indices
                add("top1", k, float((top[..., 0] == y).float().mean()) * b)
                if o.shape[-1] > 5:
                    add("top5", k, float((top == y[..., None]).any(-1).float().mean()) * b)
        if ref is not None:
            r = outs[reference]  # type: ignore[index]
            sq_ref += float((r.double() ** 2).sum())
            for k, o in outs.items():
                if k == reference:
                    continue
                sq_diff[k] = sq_diff.get(k, 0.0) + float(((o.double() - r.double()) ** 2).sum())
                if _classes(o):
                    add("top1_agreement", k, float((o.argmax(-1) == r.argmax(-1)).float().mean()) * b)
                    kl = F.kl_div(F.log_softmax(o, -1), F.log_softmax(r, -1), log_target=True, reduction="none")
                    add("kl_to_dense", k, float(kl.sum(-1).mean()) * b)
    if n == 0:
        raise RankdownError(f"{data.name}: no examples to evaluate on")
    metrics = {name: {k: v / n for k, v in per.items()} for name, per in sums.items()}
    if ref is not None and sq_diff:
        metrics["output_rel_error"] = {k: math.sqrt(v / max(sq_ref, 1e-300)) for k, v in sq_diff.items()}
    if metric is not None:
        for k, m in live.items():
            try:
                values = metric(m, data)
            except Exception as exc:  # the user's code
                raise RankdownError(f"--eval metric raised {type(exc).__name__}: {exc}") from exc
            if not isinstance(values, dict):
                raise RankdownError(f"--eval metric must return a dict of name -> number, got {type(values).__name__}")
            for name, v in values.items():
                if isinstance(v, bool) or not isinstance(v, (int, float)):
                    raise RankdownError(f"--eval metric {name!r} must be a number, got {v!r}")
                metrics.setdefault(str(name), {})[k] = float(v)
    return {"data": data.describe(), "examples": n, "labelled": data.labelled, "metrics": metrics}


def headline(quality: dict) -> tuple[str, str | None]:
    """The metric a report leads with: top-1 accuracy with labels, else top-1 agreement, else the
    relative output error; and which model key holds the compressed value."""
    m = quality.get("metrics", {})
    for name in ("top1", "top1_agreement", "output_rel_error"):
        if name in m:
            return name, None
    return next(iter(m), ""), None
