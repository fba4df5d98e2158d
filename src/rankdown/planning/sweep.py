"""The candidate sweep that the budget and the latency planners share: for each target layer and
each (method, rank) candidate, the fit (under the layer's metric, as ``compress`` will build it),
its parameters and MACs, its error on the calibration data and, when asked, its measured time.

The error is the layer's own output on its recorded inputs (``criterion="layer"``: no extra
forward passes) or the model's output with only that layer changed (``"model"``: each candidate
reruns only what follows the layer, see :mod:`rankdown.fitting.replay`); over the real tokens of
padded batches only.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
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
    Examples,
    batch_size_for,
    forward,
    primary_output,
    real_rows,
    stream,
    token_mask,
)
from rankdown.progress import progress
from rankdown.surgery import StopForward, get_module, hooked, record_inputs

CRITERIA = ("layer", "model")


def relative_error(a: torch.Tensor | Sequence[torch.Tensor], b: torch.Tensor | Sequence[torch.Tensor]) -> float:
    """‖a − b‖ / ‖b‖: b is the reference. Either one tensor each, or matching batches (the norms
    are pooled over them, so a streamed error equals the error on the whole set)."""
    pairs = [(a, b)] if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) else zip(a, b, strict=True)
    num = den = 0.0
    for x, ref in pairs:
        num += float(torch.linalg.vector_norm((x - ref).double()) ** 2)
        den += float(torch.linalg.vector_norm(ref.double()) ** 2)
    return math.sqrt(num) / max(math.sqrt(den), 1e-30)


@torch.no_grad()
def model_outputs(model: nn.Module, calib: Examples, batch_size: int | None = None) -> list[torch.Tensor]:
    """The model's output tensor on the calibration data, batch by batch (memory stays at one
    batch's activations, and the outputs)."""
    data = stream(calib)
    batch_size = batch_size or batch_size_for(data.first())
    return [primary_output(forward(model, b)) for b in data.rebatch(batch_size)]


# Layer inputs the layer criterion holds at once for all targets; above it, each target's inputs
# are recorded batch by batch when it is scored (one pass cut at the layer per target, all its
# candidates scored on each batch: time for memory). For a 135M-parameter LM, 64 sequences of 256
# tokens into all 210 matrices would be several GB.
HOLD_BYTES = 1 << 30


class Scorer:
    """Errors of candidate layers on ``calib`` (one batch or a stream of them), under one criterion
    (see the module docstring)."""

    def __init__(self, model: nn.Module, targets: list[str], calib: Examples, criterion: str = "layer") -> None:
        if criterion not in CRITERIA:
            raise RankdownError(f"error criterion must be 'layer' or 'model', got {criterion!r}")
        self.model, self.criterion, self.data = model.eval(), criterion, stream(calib)
        self.batch_size = batch_size_for(self.data.first())
        # one example of every target's input, on the meta device (for costs, timing and the bound)
        self.examples = record_inputs(self.model, self.data.first(1), targets)
        per_example = sum(x.numel() * x.element_size() for x in self.examples.values())
        self._held: dict[str, list[torch.Tensor]] | None = None
        if criterion == "layer" and per_example * self.data.examples <= HOLD_BYTES:
            self._held = {fqn: [] for fqn in self.examples}
            for rows in self._record(list(self.examples)):
                for fqn, r in rows.items():
                    self._held[fqn].append(r)
        self._current: tuple[str, list[torch.Tensor], list[torch.Tensor]] | None = None  # (fqn, rows, dense out)
        self.suffix = Suffix(model, self.data, list(targets)) if criterion == "model" else None

    @torch.no_grad()
    def _record(self, targets: list[str]) -> Iterator[dict[str, torch.Tensor]]:
        """Each batch's inputs of every target, at real tokens, in one pass; a single target's pass
        stops at it."""
        seen: dict[str, torch.Tensor] = {}
        single = len(targets) == 1

        def hook(_m, args, fqn):
            seen.setdefault(fqn, args[0].detach())  # a module called twice: its first call, as record_inputs
            if single:
                raise StopForward

        for batch in self.data.rebatch(self.batch_size):
            seen.clear()
            # hooked only during this batch's forward: the caller runs the layers between batches
            handles = [
                get_module(self.model, f).register_forward_pre_hook(lambda m, a, f=f: hook(m, a, f)) for f in targets
            ]
            with hooked(handles):  # a single target's pass ends at it
                forward(self.model, batch)
            mask = token_mask(batch)
            yield {fqn: real_rows(x, mask) for fqn, x in seen.items()}

    def _layer_batches(self, fqn: str) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(the target's input rows at real tokens, the dense layer's output on them), batch by
        batch: from what is held (one target's dense outputs kept at a time), else recorded now."""
        layer = get_module(self.model, fqn)
        if self._held is None:
            for rows in self._record([fqn]):
                if fqn in rows:
                    with torch.no_grad():
                        yield rows[fqn], layer(rows[fqn])
            return
        if self._current is None or self._current[0] != fqn:
            self._current = None  # free the previous target's tensors first
            with torch.no_grad():
                self._current = (fqn, self._held[fqn], [layer(r) for r in self._held[fqn]])
        yield from zip(self._current[1], self._current[2], strict=True)

    @torch.no_grad()
    def errors(self, fqn: str, candidates: Sequence[nn.Module]) -> list[float]:
        """Each candidate's error at ``fqn``, from one pass over the data."""
        if self.suffix is not None:
            s = self.suffix
            ref = [real_rows(r, m) for r, m in zip(s.reference_batches, s.masks, strict=True)]
            return [
                relative_error([real_rows(o, m) for o, m in zip(s.batch_outputs(fqn, c), s.masks, strict=True)], ref)
                for c in candidates
            ]
        num = [0.0] * len(candidates)
        den = 0.0
        for rows, dense in self._layer_batches(fqn):
            den += float(torch.linalg.vector_norm(dense.double()) ** 2)
            for i, c in enumerate(candidates):
                num[i] += float(torch.linalg.vector_norm((c(rows) - dense).double()) ** 2)
        return [math.sqrt(n) / max(math.sqrt(den), 1e-30) for n in num]

    def error(self, fqn: str, candidate: nn.Module) -> float:
        return self.errors(fqn, [candidate])[0]


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
        built: list[tuple[Method, Rank, Cost, nn.Module]] = []
        for method, ranks in options:
            for rank in ranks:
                cost = candidate_cost(method, module, rank, example)
                if only_paying and cost.params >= dense.params and cost.macs >= dense.macs:
                    continue
                fact = factorize_weighted(method, fqn, module, rank, (metrics or {}).get(fqn))
                if fact.module is not None:
                    built.append((method, rank, cost, fact.module))
        errors = scorer.errors(fqn, [m for *_, m in built])  # one pass over the data for all of them
        rows: list[Scored] = []
        for (method, rank, cost, candidate), err in zip(built, errors, strict=True):
            ms = timer(candidate, tuple(example.shape[1:])) if timer is not None else None
            rows.append(Scored(method.name, rank, cost.params, cost.macs, err, ms))
        out[fqn] = rows
    return out
