"""Weighted fitting metrics for every method that fits weights (Denton et al. 2014, section 3.1).

Frobenius (the default) treats every weight alike. Two data-aware metrics weigh the error by what
it does to the layer's output:

- ``mahalanobis``: Denton's diagonal Mahalanobis metric. α_p = sqrt(Σ (∂L/∂W_p)²) over
  calibration data (an empirical Fisher diagonal, labels = the dense model's own predictions, so
  no labels are needed). Fitting α ⊙ W elementwise would destroy the factor structure, so α is
  reduced to its best separable form α ≈ a_out ⊗ a_in (root-mean-square over the other modes):
  then diag(a_out) · W · diag(a_in) is decomposed by any method and the scaling is undone on the
  factor that touches each mode. Exactly the paper's "fit on α ⊙ W and rescale" when α is separable.
- ``activation``: ASVD's activation-aware scaling (Yuan et al. 2023): input channel j weighted by
  (mean |x_j|)^α, α = 0.5, so that channels carrying large activations (the outliers of
  transformer layers) are kept. A diagonal input transform, so every method can use it.
- ``covariance``: the error under the layer's input distribution, E‖(W − Ŵ) x‖². With the
  input-channel second moment Σ = L Lᵀ, decompose W ×_in Lᵀ and undo with L⁻¹ on the input
  factor. For ``svd`` / ``channel-svd`` the full im2col covariance (channels × kernel taps) is used
  through the closed form of :func:`rankdown.decompose.whitened_truncated_svd`, as SVD-LLM does
  for transformer Linear layers; structured conv methods use the channel covariance, which keeps
  their structure.

A transform on the input mode must reach the one factor that mixes input channels, and the output
scaling the one that produces outputs; :func:`undo` knows each layer class.
"""

from __future__ import annotations

import copy
import hashlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from rankdown import decompose
from rankdown.errors import RankdownError
from rankdown.fitting.calibrate import patch_rows
from rankdown.layers import FactorizedLayer, balance_factors
from rankdown.probe import (
    Examples,
    batch_size_for,
    forward,
    primary_output,
    real_rows,
    stream,
    token_mask,
)
from rankdown.surgery import hooked, weight_of

METRICS = ("frobenius", "mahalanobis", "covariance", "activation")
ASVD_ALPHA = 0.5


@dataclass
class LayerMetric:
    """How one layer's fit is weighted: an input-mode transform ``t_in`` (C×C, lower
    triangular or diagonal), an output-mode scale ``d_out`` (N), or the full patch Gram."""

    t_in: torch.Tensor | None = None
    d_out: torch.Tensor | None = None
    patch_gram: torch.Tensor | None = None  # (C·kh·kw)², for the closed-form SVD methods

    @property
    def weighted(self) -> bool:
        """Whether a fit under it differs from the plain one (frobenius collects empty metrics)."""
        return self.t_in is not None or self.d_out is not None


def metrics_digest(metrics: dict[str, LayerMetric]) -> str:
    """Hash of the statistics, for caches of results computed under them."""
    h = hashlib.sha256()
    for fqn in sorted(metrics):
        h.update(fqn.encode())
        for t in (metrics[fqn].t_in, metrics[fqn].d_out, metrics[fqn].patch_gram):
            h.update(b"-" if t is None else t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:24]


def _input_rows(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Input vectors as rows: channels of every position (conv), features (linear)."""
    if isinstance(module, nn.Conv2d):
        return x.transpose(0, 1).reshape(x.shape[1], -1).T
    return x.reshape(-1, x.shape[-1])


def collect(
    model: nn.Module, fqns: list[str], inputs: Examples, metric: str, *, batch_size: int | None = None
) -> dict[str, LayerMetric]:
    """Statistics for ``metric`` at each layer, streamed over ``inputs`` in batches."""
    data = stream(inputs)
    batch_size = batch_size or batch_size_for(data.first())
    if metric not in METRICS:
        raise RankdownError(f"metric must be one of {', '.join(METRICS)}, got {metric!r}")
    out = {fqn: LayerMetric() for fqn in fqns}
    if metric == "frobenius":
        return out
    model.eval()
    mods = {fqn: model.get_submodule(fqn) for fqn in fqns}
    if metric in ("covariance", "activation"):
        grams: dict[str, torch.Tensor] = {}
        patch: dict[str, torch.Tensor] = {}
        counts: dict[str, int] = {}
        mask: list[torch.Tensor | None] = [None]  # the batch's attention mask (True at real tokens), if any
        # Linear layers fed the same tensor (a transformer's q/k/v, gate/up) share one statistic per
        # batch: held with the tensor, so its id is not reused within the batch
        shared: dict[int, tuple[torch.Tensor, torch.Tensor, int]] = {}

        def linear_stat(x: torch.Tensor) -> tuple[torch.Tensor, int]:
            if id(x) not in shared:
                rows = real_rows(x, mask[0]).reshape(-1, x.shape[-1]).double()
                stat = rows.abs().sum(0) if metric == "activation" else rows.T @ rows
                shared[id(x)] = (x, stat, rows.shape[0])
            return shared[id(x)][1:]

        def hook(m, args, fqn):
            x = args[0]  # not detached (a new object): q/k/v share their statistic by the input's id
            if isinstance(m, nn.Linear):
                stat, n = linear_stat(x)
                grams[fqn] = grams.get(fqn, 0) + stat
                counts[fqn] = counts.get(fqn, 0) + n
                return
            rows = _input_rows(m, x).double()
            if metric == "activation":  # sums of |x| per channel; no Gram needed
                grams[fqn] = grams.get(fqn, 0) + rows.abs().sum(0)
                counts[fqn] = counts.get(fqn, 0) + rows.shape[0]
                return
            grams[fqn] = grams.get(fqn, 0) + rows.T @ rows
            if m.padding_mode == "zeros" and not isinstance(m.padding, str):
                p = patch_rows(m, x).double()
                patch[fqn] = patch.get(fqn, 0) + p.T @ p

        handles = [m.register_forward_pre_hook(lambda m, a, f=f: hook(m, a, f)) for f, m in mods.items()]
        with hooked(handles), torch.no_grad():
            for batch in data.rebatch(batch_size):
                mask[0] = token_mask(batch)
                shared.clear()
                forward(model, batch)
            shared.clear()
        for fqn in fqns:
            if fqn in grams and metric == "activation":
                scale = (grams[fqn] / max(counts[fqn], 1)).pow(ASVD_ALPHA)
                floor = 1e-3 * float(scale.max()) if float(scale.max()) > 0 else 1.0  # dead channels: not 0
                out[fqn] = LayerMetric(t_in=torch.diag(scale.clamp_min(floor)))
            elif fqn in grams:
                pg = grams[fqn] if isinstance(mods[fqn], nn.Linear) else patch.get(fqn)  # a Linear's patches: its rows
                out[fqn] = LayerMetric(t_in=decompose.shifted_cholesky(grams[fqn]), patch_gram=pg)
        return out
    # mahalanobis: squared gradients of the loss against the model's own predictions
    sq = {fqn: torch.zeros_like(weight_of(m), dtype=torch.float64) for fqn, m in mods.items()}
    for xb in data.rebatch(batch_size):
        with torch.no_grad():
            logits = primary_output(forward(model, xb))
            labels = logits.argmax(-1)
            pad = token_mask(xb)
            if pad is not None and labels.shape == pad.shape:
                labels = labels.masked_fill(~pad, -100)  # cross_entropy's ignore_index: no gradient from padding
        model.zero_grad(set_to_none=True)
        # per-example gradients summed in squares would need one backward per example; batches
        # of the mean loss are the usual (Fisher-weighted SVD) approximation.
        logits = primary_output(forward(model, xb))
        F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)).backward()
        for fqn, m in mods.items():
            grad = weight_of(m).grad
            if grad is not None:
                sq[fqn] += grad.double() ** 2
    model.zero_grad(set_to_none=True)
    for fqn, s in sq.items():
        alpha = s.sqrt()
        dims_out = tuple(range(1, alpha.ndim))
        a_out = alpha.pow(2).mean(dim=dims_out).sqrt()
        a_in = alpha.transpose(0, 1).reshape(alpha.shape[1], -1).pow(2).mean(1).sqrt()
        # floor: a weight that never moved the loss still gets a little weight (avoids division by 0)
        out[fqn] = LayerMetric(t_in=torch.diag(_floored(a_in)), d_out=_floored(a_out))
    return out


def _floored(v: torch.Tensor) -> torch.Tensor:
    """A weight that never moved the loss still gets a little weight (no division by 0)."""
    return v.clamp_min(1e-3 * float(v.max()) if float(v.max()) > 0 else 1.0)


def transformed(module: nn.Module, metric: LayerMetric) -> nn.Module:
    """A copy of ``module`` whose weight is diag(d_out) · W ×_in t_inᵀ: the tensor to decompose."""
    clone = copy.deepcopy(module)
    w = weight_of(module).detach().double()
    if metric.t_in is not None:
        w = torch.einsum("nc...,cd->nd...", w, metric.t_in.double())
    if metric.d_out is not None:
        w = w * metric.d_out.double().view(-1, *([1] * (w.ndim - 1)))
    with torch.no_grad():
        weight_of(clone).copy_(w.to(weight_of(module).dtype))
    return clone


def undo(layer: nn.Module, metric: LayerMetric) -> None:
    """Undo :func:`transformed` on the factor that mixes input channels and the one that writes
    outputs, in place (the module's :meth:`~rankdown.layers.FactorizedLayer.undo_metric`)."""
    if not (isinstance(layer, FactorizedLayer) and layer.weighted_metrics):
        raise RankdownError(f"weighted metrics are not implemented for {type(layer).__name__}; use --metric frobenius")
    try:
        layer.undo_metric(metric.t_in, metric.d_out)
    except NotImplementedError as exc:
        raise RankdownError(str(exc)) from None


def factorize_weighted(handler, fqn: str, module: nn.Module, rank, metric: LayerMetric | None):
    """``handler.factorize`` under ``metric``; the reported error stays the plain weight error."""
    from rankdown.methods import Factorized, _rel_error

    if metric is None or not metric.weighted:
        return handler.factorize(module, rank)
    whitened = handler.whitened_fit(module, rank, metric.patch_gram) if metric.patch_gram is not None else None
    if whitened is not None:
        balance_factors(whitened)
        err = _rel_error(weight_of(module), whitened.reconstruct_weight())
        return Factorized(whitened, err, {"metric": "covariance (im2col)"})
    fact = handler.factorize(transformed(module, metric), rank)
    if fact.module is None:
        return fact
    if not (isinstance(fact.module, FactorizedLayer) and fact.module.weighted_metrics):
        raise RankdownError(
            f"layer {fqn!r}: weighted metrics are not implemented for method {handler.name!r}; use --metric frobenius"
        )
    try:
        undo(fact.module, metric)
    except RankdownError as exc:
        raise RankdownError(f"layer {fqn!r}: {exc}") from None
    balance_factors(fact.module)
    info = {**fact.info, "metric": "weighted"}
    err = _rel_error(weight_of(module), fact.module.reconstruct_weight())
    return Factorized(fact.module, err, info, fact.failure)
