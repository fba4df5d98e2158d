"""The model's output with one layer changed, re-running only what that layer can reach.

A model-level sensitivity sweep scores every candidate of every layer by the model's output on
the calibration data, and a whole forward per candidate was almost all of its time (372 forwards,
183 of 194 s, on a small ResNet). A change at layer T cannot alter anything that finished before
T first runs: the siblings of T's ancestors that the forward called earlier (the stem and the
stages before T's, the blocks before T's block, the layers before T in its block). Each of those
is swapped for a stand-in that returns its recorded output, so a candidate costs the rest of the
network only.

Nothing about the model's forward is assumed: the order and the call counts come from one probe
forward (a module called more than once is never replayed), and before T's candidates are scored
the replayed model must reproduce the dense output on the first batch, or T's candidates run
through the whole model. Recorded outputs are bounded (``HOLD_MB``); past it, targets are grouped
so that each group's recordings fit, and a layer whose own do not runs the whole model.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from rankdown.probe import (
    Examples,
    Inputs,
    batch_len,
    batch_size_for,
    batch_slice,
    forward,
    primary_output,
    stream,
    to_layout,
    token_mask,
)
from rankdown.surgery import hooked, replace_module, swapped

HOLD_MB = 2048  # recorded outputs held at once, all batches together
ACTIVATION_BYTES = 2 * 2**20  # image batches sized so that the widest activation is about this


def _images(data: Inputs) -> bool:
    return isinstance(data, torch.Tensor) and data.ndim == 4 and data.is_floating_point()


def _channels_last(x: Inputs) -> Inputs:
    assert isinstance(x, torch.Tensor)
    return x.contiguous(memory_format=torch.channels_last)


def _tree_map(out: object, fn: Callable[[torch.Tensor], torch.Tensor]) -> object:
    if isinstance(out, torch.Tensor):
        return fn(out)
    if isinstance(out, tuple) and not hasattr(out, "_fields"):
        return tuple(_tree_map(v, fn) for v in out)
    if isinstance(out, list):
        return [_tree_map(v, fn) for v in out]
    if isinstance(out, dict) and type(out) is dict:
        return {k: _tree_map(v, fn) for k, v in out.items()}
    return out


def _nbytes(out: object) -> int:
    total = 0

    def add(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    _tree_map(out, add)
    return total


def _clone(out: object) -> object:
    # later modules may work in place (ReLU(inplace=True)) on what they are given
    return _tree_map(out, lambda t: t.detach().clone())


class _Replay(nn.Module):
    """Stands in for a module that ran before the changed layer: its recorded output, batch by batch."""

    def __init__(self, outputs: list[object]) -> None:
        super().__init__()
        self.outputs = outputs
        self.next = 0

    def forward(self, *_args: object, **_kwargs: object) -> object:
        out = self.outputs[self.next % len(self.outputs)]
        self.next += 1
        return _clone(out)


class Suffix:
    """Model outputs on ``data`` with one layer swapped, for layers ``fqns``: see the module docstring.
    ``data`` is one batch or a stream of them (:class:`rankdown.probe.Batches`); each run reads it
    in batches, in the same order, so that recorded outputs line up with their batches."""

    def __init__(self, model: nn.Module, data: Examples, fqns: list[str]) -> None:
        self.model, self.data, self.fqns = model, stream(data), list(fqns)
        self.channels_last = False
        first = self.data.first(batch_size_for(self.data.first()))
        if _images(first) and any(isinstance(m, nn.Conv2d) for m in model.modules()):
            # Measured on a small ResNet, 2 CPU cores: channels_last forwards 1.3x faster, and
            # batches whose activations stay near the cache size (below) 1.2x more.
            try:
                fast = to_layout(copy.deepcopy(model), True)
                with torch.no_grad():
                    forward(fast, _channels_last(batch_slice(first, 0, 2)))
                self.model, self.channels_last = fast, True
                first = _channels_last(first)
            except Exception:  # a forward that needs contiguous tensors (.view): the model as given
                pass
        self.n = self.data.examples
        self._probe(first)
        self.batch_size = batch_size_for(first)
        if _images(first):
            widest = max(self.bytes.values(), default=1)
            self.batch_size = max(1, min(self.batch_size, ACTIVATION_BYTES // max(widest, 1)))
        self.first_batch = batch_slice(first, 0, self.batch_size)
        self.masks: list[torch.Tensor | None] = []  # real tokens of each batch (None: all)
        self.reference_batches: list[torch.Tensor] = []
        with torch.no_grad():
            for b in self.batches():
                self.masks.append(token_mask(b))
                self.reference_batches.append(primary_output(forward(self.model, b)).detach())
        self.prefix = {f: self._prefix(f) for f in self.fqns}
        self.held: dict[str, list[object]] = {}
        self.verified: dict[str, bool] = {}

    def batches(self) -> Iterator[Inputs]:
        """The examples in this suffix's batches (channels_last where the model runs so)."""
        for b in self.data.rebatch(self.batch_size):
            yield _channels_last(b) if self.channels_last else b

    @property
    def reference(self) -> torch.Tensor:
        return torch.cat(self.reference_batches)

    @torch.no_grad()
    def _run(self) -> list[torch.Tensor]:
        return [primary_output(forward(self.model, b)).detach() for b in self.batches()]

    @torch.no_grad()
    def _probe(self, batch: Inputs) -> None:
        """Enter/exit order, call counts and output bytes per example of every module, from one
        batch."""
        self.enter: dict[int, int] = {}
        self.exit: dict[int, int] = {}
        self.calls: dict[int, int] = {}
        self.bytes: dict[int, int] = {}
        clock = iter(range(1 << 62))
        per_example = batch_len(batch)

        def pre(m: nn.Module, _args: object) -> None:
            self.enter.setdefault(id(m), next(clock))
            self.calls[id(m)] = self.calls.get(id(m), 0) + 1

        def post(m: nn.Module, _args: object, out: object) -> None:
            self.exit[id(m)] = next(clock)
            self.bytes[id(m)] = _nbytes(out) // max(per_example, 1)

        handles = []
        for _, m in self.model.named_modules():
            handles += [m.register_forward_pre_hook(pre), m.register_forward_hook(post)]
        with hooked(handles):
            forward(self.model, batch)

    def _prefix(self, fqn: str) -> list[str]:
        """The modules to replay for ``fqn``: siblings of its ancestors that finished, called once,
        before the ancestor on its path first ran."""
        parts = fqn.split(".")
        out = []
        for j in range(len(parts)):
            parent_name, path_child = ".".join(parts[:j]), ".".join(parts[: j + 1])
            parent = self.model.get_submodule(parent_name) if parent_name else self.model
            start = self.enter.get(id(parent.get_submodule(parts[j])))
            if start is None:
                return []  # the layer never ran: nothing is known about its prefix
            for name, child in parent.named_children():
                full = f"{parent_name}.{name}" if parent_name else name
                if full != path_child and self.calls.get(id(child)) == 1 and self.exit.get(id(child), start) < start:
                    out.append(full)
        return out

    def _cost(self, names: set[str]) -> int:
        return sum(self.bytes.get(id(self.model.get_submodule(n)), 0) for n in names) * self.n

    @torch.no_grad()
    def _hold_for(self, fqn: str) -> None:
        """Record the outputs ``fqn`` needs, with those of the following layers while they fit."""
        budget = HOLD_MB * 2**20
        if self._cost(set(self.prefix[fqn])) > budget:
            self.held = {}
            return
        want = set(self.prefix[fqn])
        for later in self.fqns[self.fqns.index(fqn) + 1 :]:
            more = want | set(self.prefix[later])
            if self._cost(more) > budget:
                break
            want = more
        self.held = {n: [] for n in want}
        handles = []
        for n in want:

            def keep(_m: nn.Module, _args: object, out: object, n: str = n) -> None:
                self.held[n].append(_clone(out))

            handles.append(self.model.get_submodule(n).register_forward_hook(keep))
        with hooked(handles):
            for b in self.batches():
                forward(self.model, b)

    @contextmanager
    def _replaying(self, fqn: str) -> Iterator[None]:
        names = self.prefix[fqn]
        stand_ins = {n: _Replay(self.held[n]) for n in names}
        old = {n: replace_module(self.model, n, r) for n, r in stand_ins.items()}
        try:
            yield
        finally:
            for n, m in old.items():
                replace_module(self.model, n, m)

    def _ready(self, fqn: str) -> bool:
        """Whether ``fqn``'s candidates can run on the suffix: recordings held (recorded again if a
        later group replaced them) and the replayed dense model reproducing the reference on the
        first batch (checked once)."""
        if not self.prefix[fqn] or self.verified.get(fqn) is False:
            return False
        if any(n not in self.held for n in self.prefix[fqn]):
            self._hold_for(fqn)
        if not all(n in self.held for n in self.prefix[fqn]):
            return False
        if fqn not in self.verified:
            first = self.reference_batches[0]
            try:
                with torch.no_grad(), self._replaying(fqn):
                    out = primary_output(forward(self.model, self.first_batch))
                self.verified[fqn] = out.shape == first.shape and bool(
                    torch.allclose(out, first, rtol=1e-5, atol=1e-6 * float(first.abs().max()))
                )
            except Exception:  # a parent that reads more than the replayed output: whole forwards
                self.verified[fqn] = False
        return self.verified[fqn]

    @torch.no_grad()
    def batch_outputs(self, fqn: str, layer: nn.Module) -> list[torch.Tensor]:
        """The model's output on the data with ``layer`` in place of ``fqn``, batch by batch (as
        ``reference_batches`` and ``masks``)."""
        if self.channels_last:
            layer = to_layout(copy.deepcopy(layer), True)
        if not self._ready(fqn):  # before the swap: recordings and the check are of the dense model
            with swapped(self.model, fqn, layer):
                return self._run()
        with swapped(self.model, fqn, layer), self._replaying(fqn):
            return self._run()

    def outputs(self, fqn: str, layer: nn.Module) -> torch.Tensor:
        """The same, as one tensor."""
        return torch.cat(self.batch_outputs(fqn, layer))
