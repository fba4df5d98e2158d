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

from rankdown.data.sources import Data
from rankdown.errors import RankdownError
from rankdown.probe import batch_len, forward, primary_output, to_model
from rankdown.progress import progress

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
    nll: dict[str, float] = {}
    scored = 0
    for x, y in progress(data.batches(limit), desc=desc):
        outs = {k: primary_output(forward(m, to_model(x, m))).float() for k, m in live.items()}
        b = batch_len(x)
        n += b
        if data.task == "causal-lm":
            ids, mask = token_inputs(x, data.name)
            for k, o in outs.items():
                nll[k] = nll.get(k, 0.0) + float(next_token_nll(o, ids, mask, data.name))
            scored += int(mask[:, 1:].sum())
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
            sq_ref += float((r * r).sum(dtype=torch.float64))
            for k, o in outs.items():
                if k == reference:
                    continue
                sq_diff[k] = sq_diff.get(k, 0.0) + float(((o - r) ** 2).sum(dtype=torch.float64))
                if data.task == "embedding":
                    mask = token_inputs(x, data.name)[1]
                    cos = F.cosine_similarity(_mean_pool(o, mask), _mean_pool(r, mask), dim=-1)
                    add("embedding_cosine", k, float(cos.sum()))
                elif _classes(o):
                    add("top1_agreement", k, float((o.argmax(-1) == r.argmax(-1)).float().mean()) * b)
                    kl = F.kl_div(F.log_softmax(o, -1), F.log_softmax(r, -1), log_target=True, reduction="none")
                    add("kl_to_dense", k, float(kl.sum(-1).mean()) * b)
    if n == 0:
        raise RankdownError(f"{data.name}: no examples to evaluate on")
    metrics = {name: {k: v / n for k, v in per.items()} for name, per in sums.items()}
    if nll:
        metrics["perplexity"] = {k: math.exp(min(v / max(scored, 1), 700.0)) for k, v in nll.items()}
        metrics["tokens_scored"] = {k: float(scored) for k in nll}
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


def token_inputs(x: Any, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(x, dict) or "input_ids" not in x:
        raise RankdownError(f"{name}: token losses and metrics need keyword inputs with input_ids")
    ids = x["input_ids"]
    return ids, x.get("attention_mask", torch.ones_like(ids))


def next_token_nll(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor, name: str) -> torch.Tensor:
    """Summed negative log-likelihood of each token given the ones before it (padding skipped):
    perplexity's numerator, and a causal LM's task loss in fine-tuning."""
    if logits.shape[:2] != ids.shape or logits.ndim != 3:
        raise RankdownError(
            f"{name}: perplexity needs next-token logits of shape (batch, tokens, vocabulary), "
            f"got {tuple(logits.shape)} for token ids {tuple(ids.shape)}"
        )
    lp = F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1).to(logits.device), reduction="none"
    )
    return (lp * mask[:, 1:].reshape(-1).to(lp)).sum()


def _mean_pool(h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sentence embeddings as sentence-transformers pools them: the mean over real tokens."""
    if h.ndim == 2:
        return h
    m = mask.to(h)[..., None]
    return (h * m).sum(1) / m.sum(1).clamp_min(1.0)


# Quality metrics where smaller is better; every other is larger-is-better except the errors.
LOWER_IS_BETTER = ("perplexity", "kl_to_dense", "output_rel_error")


def headline(quality: dict) -> tuple[str, str | None]:
    """The metric a report leads with: top-1 accuracy with labels, perplexity for a language model,
    embedding cosine for an encoder, else top-1 agreement, else the relative output error; and
    which model key holds the compressed value."""
    m = quality.get("metrics", {})
    for name in ("top1", "perplexity", "embedding_cosine", "top1_agreement", "output_rel_error"):
        if name in m:
            return name, None
    return next(iter(m), ""), None
