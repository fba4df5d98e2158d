"""The candidate sweep that the budget and the latency planners share: for each target layer and
each (method, rank) candidate, the fit (under the layer's metric, as ``compress`` will build it),
its parameters and MACs, its error on the calibration data and, when asked, its measured time.

The error is the layer's own output on its recorded inputs (``criterion="layer"``: no extra
forward passes) or the model's output with only that layer changed (``"model"``: each candidate
reruns only what follows the layer, see :mod:`rankdown.fitting.replay`); over the real tokens of
padded batches only.
"""

from __future__ import annotations

import contextlib
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
from rankdown.surgery import get_module, record_inputs

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


# Layer inputs the layer criterion holds at once for all targets; above it, each target's inputs
# are recorded when it is scored (one pass cut at the layer per target: time for memory). For a
# 135M-parameter LM, 64 sequences of 256 tokens into all 210 matrices would be several GB.
HOLD_BYTES = 1 << 30


class _Stop(Exception):
    pass


class Scorer:
    """Errors of candidate layers on ``calib``, under one criterion (see the module docstring)."""

    def __init__(self, model: nn.Module, targets: list[str], calib: Inputs, criterion: str = "layer") -> None:
        if criterion not in CRITERIA:
            raise RankdownError(f"error criterion must be 'layer' or 'model', got {criterion!r}")
        self.model, self.criterion, self.calib = model.eval(), criterion, calib
        self.mask = token_mask(calib)
        # one example of every target's input, on the meta device (for costs, timing and the bound)
        self.examples = record_inputs(self.model, batch_slice(calib, 0, 1), targets)
        per_example = sum(x.numel() * x.element_size() for x in self.examples.values())
        self._held: dict[str, torch.Tensor] | None = None
        if criterion == "layer" and per_example * batch_len(calib) <= HOLD_BYTES:
            self._held = self._record(list(self.examples), calib)
        self._current: tuple[str, torch.Tensor, torch.Tensor] | None = None  # (fqn, rows, dense output)
        self.suffix = Suffix(model, calib, list(targets)) if criterion == "model" else None
        self.reference = real_rows(self.suffix.reference, self.mask) if self.suffix is not None else None

    @torch.no_grad()
    def _record(self, targets: list[str], data: Inputs) -> dict[str, torch.Tensor]:
        """Every target's inputs on ``data`` (batch by batch), in one pass; a single target's pass
        stops at it."""
        parts: dict[str, list[torch.Tensor]] = {fqn: [] for fqn in targets}
        single = len(targets) == 1

        def hook(_m, args, fqn):
            parts[fqn].append(args[0].detach())
            if single:
                raise _Stop

        handles = [
            get_module(self.model, f).register_forward_pre_hook(lambda m, a, f=f: hook(m, a, f)) for f in targets
        ]
        try:
            size = batch_size_for(data)
            for i in range(0, batch_len(data), size):
                with contextlib.suppress(_Stop):  # a single target's pass ends at it
                    forward(self.model, batch_slice(data, i, i + size))
        finally:
            for h in handles:
                h.remove()
        return {fqn: torch.cat(p) for fqn, p in parts.items() if p}

    def _layer(self, fqn: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(the target's input rows at real tokens, the dense layer's output on them); one target
        at a time is kept."""
        if self._current is None or self._current[0] != fqn:
            self._current = None  # free the previous target's tensors first
            x = self._held[fqn] if self._held is not None else self._record([fqn], self.calib)[fqn]
            rows = real_rows(x, self.mask)
            with torch.no_grad():
                self._current = (fqn, rows, get_module(self.model, fqn)(rows))
        return self._current[1], self._current[2]

    @torch.no_grad()
    def error(self, fqn: str, candidate: nn.Module) -> float:
        if self.suffix is not None and self.reference is not None:
            return relative_error(real_rows(self.suffix.outputs(fqn, candidate), self.mask), self.reference)
        rows, dense = self._layer(fqn)
        return relative_error(candidate(rows), dense)


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
        example = scorer.examples[fqn]
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
                ms = timer(fact.module, tuple(example.shape[1:])) if timer is not None else None
                rows.append(Scored(method.name, rank, cost.params, cost.macs, scorer.error(fqn, fact.module), ms))
        out[fqn] = rows
    return out
