"""The candidate sweep that the budget and the latency planners share: for each target layer and
each (method, rank) candidate, the fit (under the layer's metric, as ``compress`` will build it),
its parameters and MACs, its error on the calibration data and, when asked, its measured time.

The error is the layer's own output on its recorded inputs (``criterion="layer"``: no extra
forward passes) or the model's output with only that layer changed (``"model"``: each candidate
reruns only what follows the layer, see :mod:`rankdown.fitting.replay`); over the real tokens of
padded batches only.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from rankdown.errors import RankdownError
from rankdown.fitting.metrics import LayerMetric, factorize_weighted
from rankdown.fitting.replay import Suffix
from rankdown.measurement.bench import Cost, module_cost, n_params
from rankdown.methods import Method, Rank
from rankdown.planning.rank import _meta_copy, candidate_cost
from rankdown.probe import (
    Inputs,
    batch_len,
    batch_size_for,
    batch_slice,
    forward,
    primary_output,
    real_rows,
    token_mask,
)
from rankdown.progress import progress
from rankdown.surgery import get_module

CRITERIA = ("layer", "model")


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖: b is the reference."""
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b).clamp_min(1e-30))


@torch.no_grad()
def model_outputs(model: nn.Module, calib: Inputs, batch_size: int | None = None) -> torch.Tensor:
    """The model's output tensor on the calibration data, computed in batches (memory stays at one
    batch's activations)."""
    n = batch_len(calib)
    batch_size = batch_size or batch_size_for(calib)
    return torch.cat(
        [primary_output(forward(model, batch_slice(calib, i, i + batch_size))) for i in range(0, n, batch_size)]
    )


class Scorer:
    """Errors of candidate layers on ``calib``, under one criterion (see the module docstring)."""

    def __init__(self, model: nn.Module, targets: list[str], calib: Inputs, criterion: str = "layer") -> None:
        if criterion not in CRITERIA:
            raise RankdownError(f"error criterion must be 'layer' or 'model', got {criterion!r}")
        self.model, self.criterion = model.eval(), criterion
        self.mask = token_mask(calib)
        parts: dict[str, list[torch.Tensor]] = {fqn: [] for fqn in targets}
        handles = []
        for fqn in targets:

            def hook(_m, args, fqn=fqn):
                parts[fqn].append(args[0].detach())

            handles.append(get_module(model, fqn).register_forward_pre_hook(hook))
        try:
            with torch.no_grad():
                model_outputs(model, calib)  # for the hooks: every target's inputs
        finally:
            for h in handles:
                h.remove()
        # every target's inputs on the calibration data, as the layer sees them (shapes for costs
        # and timing); the errors use their real-token rows
        self.inputs = {fqn: torch.cat(p) for fqn, p in parts.items() if p}
        self._rows = {fqn: real_rows(x, self.mask) for fqn, x in self.inputs.items()}
        self._dense_out: dict[str, torch.Tensor] = {}
        self.suffix = Suffix(model, calib, list(targets)) if criterion == "model" else None
        self.reference = real_rows(self.suffix.reference, self.mask) if self.suffix is not None else None

    @torch.no_grad()
    def error(self, fqn: str, candidate: nn.Module) -> float:
        if self.suffix is not None and self.reference is not None:
            return relative_error(real_rows(self.suffix.outputs(fqn, candidate), self.mask), self.reference)
        if fqn not in self._dense_out:
            self._dense_out[fqn] = get_module(self.model, fqn)(self._rows[fqn])
        return relative_error(candidate(self._rows[fqn]), self._dense_out[fqn])


@dataclass
class Scored:
    method: str
    rank: Rank
    params: int
    macs: int
    error: float
    ms: float | None = None  # measured time, when the sweep was given a timer


def dense_cost(model: nn.Module, fqn: str, example: torch.Tensor) -> Cost:
    """The dense layer's parameters and MACs on one example (meta device: nothing computed)."""
    module = get_module(model, fqn)
    return Cost(n_params(module), module_cost(_meta_copy(module), example.to("meta")).macs)


def sweep(
    model: nn.Module,
    scorer: Scorer,
    candidates: Mapping[str, Sequence[tuple[Method, Sequence[Rank]]]],
    *,
    metrics: dict[str, LayerMetric] | None = None,
    timer: Callable[[nn.Module, tuple[int, ...]], float] | None = None,
    only_paying: bool = True,
    desc: str = "candidates",
) -> dict[str, list[Scored]]:
    """Every candidate of every layer, scored. ``only_paying``: candidates that cost at least the
    dense layer in both parameters and MACs are left out (staying dense is cheaper); a planner
    that times candidates keeps them, since a fit can run faster than it counts. A fit that fails
    (a degenerate CP) is left out too."""
    out: dict[str, list[Scored]] = {}
    for fqn, options in progress(candidates.items(), total=len(candidates), desc=desc):
        module = get_module(model, fqn)
        x = scorer.inputs[fqn]
        example = x[:1].to("meta")
        dense = dense_cost(model, fqn, example)
        rows: list[Scored] = []
        for method, ranks in options:
            for rank in ranks:
                cost = candidate_cost(method, module, rank, example)
                if only_paying and cost.params >= dense.params and cost.macs >= dense.macs:
                    continue
                fact = factorize_weighted(method, fqn, module, rank, (metrics or {}).get(fqn))
                if fact.module is None:
                    continue
                ms = timer(fact.module, tuple(x.shape[1:])) if timer is not None else None
                rows.append(Scored(method.name, rank, cost.params, cost.macs, scorer.error(fqn, fact.module), ms))
        out[fqn] = rows
    return out
