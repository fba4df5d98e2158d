"""What a model takes and gives: example inputs in the model's own dtype and device, the probe
forward pass that checks a model runs before any work, and the one tensor its output is compared
by (models return tuples, dicts and dataclasses, not only tensors)."""

from __future__ import annotations

import collections
import dataclasses
import itertools
from collections.abc import Callable, Iterable, Iterator, Mapping

import torch
from torch import nn

from rankdown.errors import RankdownError, first_line


def model_dtype_device(model: nn.Module) -> tuple[torch.dtype, torch.device]:
    """The dtype and device of the model's first floating parameter (float32 on CPU without one)."""
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype, p.device
    return torch.float32, torch.device("cpu")


def example_input(
    model: nn.Module, shape: tuple[int, ...], batch: int = 1, *, random: bool = False, seed: int = 0
) -> torch.Tensor:
    """A batch of ``shape`` inputs in the model's dtype and device: zeros, or seeded N(0, 1)."""
    dtype, device = model_dtype_device(model)
    if not random:
        return torch.zeros((batch, *shape), dtype=dtype, device=device)
    g = torch.Generator().manual_seed(seed)
    return torch.randn((batch, *shape), generator=g).to(dtype=dtype, device=device)


def primary_output(out: object) -> torch.Tensor:
    """The tensor a model's output is judged by: the output itself, else ``logits`` or the first
    tensor of a dict, tuple, list or dataclass (e.g. a Hugging Face ModelOutput)."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, Mapping):
        if isinstance(out.get("logits"), torch.Tensor):
            return out["logits"]
        values = list(out.values())
    elif isinstance(out, (tuple, list)):
        values = list(out)
    elif dataclasses.is_dataclass(out) and not isinstance(out, type):
        values = [getattr(out, f.name) for f in dataclasses.fields(out)]
    else:
        raise RankdownError(f"the model returned {type(out).__name__}, which holds no tensor to compare")
    for v in values:
        if isinstance(v, torch.Tensor):
            return v
    for v in values:  # nested (e.g. a tuple of tuples)
        if isinstance(v, (Mapping, tuple, list)) or dataclasses.is_dataclass(v):
            try:
                return primary_output(v)
            except RankdownError:
                continue
    raise RankdownError(f"the model returned {type(out).__name__}, which holds no tensor to compare")


# Inputs are a tensor (the first positional argument) or a dict of keyword inputs (token ids,
# attention masks...) whose tensors share the batch dimension. These helpers are the one place
# that knows the difference.
Inputs = torch.Tensor | Mapping[str, torch.Tensor]


def forward(model: nn.Module, x: Inputs) -> object:
    """``model(x)``, or ``model(**x)`` for keyword inputs."""
    return model(**x) if isinstance(x, Mapping) else model(x)


def batch_len(x: Inputs) -> int:
    if isinstance(x, Mapping):
        return int(next(iter(x.values())).shape[0])
    return int(x.shape[0])


# Forward passes over token sequences are batched by tokens, not examples: 64 sequences of 256
# tokens through a 50k-vocabulary model are 3 GB of logits.
BATCH_TOKENS = 2048


def batch_size_for(x: Inputs, examples: int = 64) -> int:
    """Examples per forward pass: ``examples``, or fewer for long token sequences."""
    if isinstance(x, Mapping):
        ids = x.get("input_ids")
        if isinstance(ids, torch.Tensor) and ids.ndim == 2 and not ids.is_floating_point():
            return max(1, min(examples, BATCH_TOKENS // max(int(ids.shape[1]), 1)))
    return examples


def token_mask(x: Inputs) -> torch.Tensor | None:
    """The attention mask of a keyword-input batch that carries one (True at real tokens)."""
    if isinstance(x, Mapping) and isinstance(x.get("attention_mask"), torch.Tensor):
        return x["attention_mask"].bool()
    return None


def real_rows(t: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """``t`` at the real positions of a padded token batch, as rows, when ``mask`` (see
    :func:`token_mask`) has ``t``'s leading shape; ``t`` unchanged otherwise (images, pooled
    outputs). Padding is not data: it must shape neither a fit nor an error (in one trial 63% of
    the calibration positions were padding, and a refit on them made the model worse)."""
    if mask is None or t.ndim <= mask.ndim or t.shape[: mask.ndim] != mask.shape:
        return t
    return t[mask]


def batch_slice(x: Inputs, start: int, stop: int) -> Inputs:
    if isinstance(x, Mapping):
        return {k: v[start:stop] for k, v in x.items()}
    return x[start:stop]


def batch_index(x: Inputs, idx: torch.Tensor) -> Inputs:
    if isinstance(x, Mapping):
        return {k: v[idx] for k, v in x.items()}
    return x[idx]


def batch_cat(parts: list[Inputs]) -> Inputs:
    if isinstance(parts[0], Mapping):
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}  # type: ignore[index]
    return torch.cat(parts)  # type: ignore[arg-type]


def batch_tile(x: Inputs, n: int) -> Inputs:
    """A batch of ``n`` made by repeating the examples of ``x`` (for timing at a batch size)."""
    reps = -(-n // batch_len(x))
    if isinstance(x, Mapping):
        return {k: v.repeat(reps, *([1] * (v.ndim - 1)))[:n] for k, v in x.items()}
    return x.repeat(reps, *([1] * (x.ndim - 1)))[:n]


def to_model(x: Inputs, model: nn.Module) -> Inputs:
    """Floating inputs in the model's dtype and device; integer inputs (token ids) keep theirs."""
    dtype, device = model_dtype_device(model)

    def move(t: torch.Tensor) -> torch.Tensor:
        return t.to(device=device, dtype=dtype) if t.is_floating_point() else t.to(device=device)

    return {k: move(v) for k, v in x.items()} if isinstance(x, Mapping) else move(x)


# Examples a stream keeps in memory after its first full pass, all batches together; above this it
# reads its source again on every pass (time for memory: an image folder is decoded again).
HOLD_BYTES = 1 << 30


def nbytes(x: Inputs) -> int:
    return sum(t.numel() * t.element_size() for t in (x.values() if isinstance(x, Mapping) else [x]))


class Batches:
    """Examples as a stream of batches, read again on every pass: what every data-aware step takes,
    so that none needs the examples as one tensor in memory (calibration sets can be thousands of
    images). ``read()`` gives a fresh iterator of batches each time. A stream whose batches add up
    to at most ``hold_bytes`` keeps them, so small sets are read (and decoded) once; a larger one
    is read again on every pass, and every pass must give the same examples (checked)."""

    def __init__(
        self,
        read: Callable[[], Iterable[Inputs]],
        examples: int | None = None,
        *,
        hold_bytes: int | None = None,
        name: str = "the calibration data",
    ) -> None:
        self._read, self._examples, self.name = read, examples, name
        self.hold_bytes = HOLD_BYTES if hold_bytes is None else hold_bytes
        self._held: list[Inputs] | None = None
        self._too_big = False  # known after the first pass began
        self._opening: Inputs | None = None  # the first batch of the first pass read again

    def __iter__(self) -> Iterator[Inputs]:
        if self._held is not None:
            yield from self._held
            return
        reader = iter(self._read())
        read: collections.deque[Inputs] = collections.deque()
        if not self._too_big:
            # first use: the pass is read whole before any of it is given, so that a set small
            # enough to hold is read exactly once, even when the first caller wants one batch
            size = 0
            for batch in reader:
                read.append(batch)
                size += nbytes(batch)
                if size > self.hold_bytes:
                    self._too_big = True
                    break
            else:
                self._held, self._examples = list(read), sum(batch_len(b) for b in read)
                yield from read
                return
        n = 0
        for batch in itertools.chain(_drain(read), reader):  # given, the batches read so far are let go
            if n == 0:
                self._check_opening(batch)
            n += batch_len(batch)
            yield batch
        self._examples = n  # reached only when the pass went to the end

    def _check_opening(self, batch: Inputs) -> None:
        """Every pass must give the same examples (fits, replays and errors line up batches across
        passes): a source that shuffles or augments is caught at the first batch of a later pass."""
        if self._opening is None or batch is self._opening:
            self._opening = batch
            return
        same = _trailing(batch) == _trailing(self._opening) and batch_len(batch) == batch_len(self._opening)
        if same:
            pairs = zip(*(v.values() if isinstance(v, Mapping) else [v] for v in (batch, self._opening)), strict=True)
            same = all(torch.equal(a, b) for a, b in pairs)
        if not same:
            raise RankdownError(
                f"{self.name} gave other examples on a second pass (a shuffling or augmenting loader?); "
                "give a map-style dataset or a loader without shuffle and random transforms"
            )

    @property
    def examples(self) -> int:
        """How many examples a pass gives (one counting pass when the source did not say)."""
        if self._examples is None:
            self._examples = sum(batch_len(b) for b in self)
        return self._examples

    def rebatch(self, size: int) -> Iterator[Inputs]:
        """The examples in batches of ``size``, whatever the source's batches (steps choose their
        batch size by memory and by the holdout they need). Source batches are joined only where
        their shapes agree past the batch dimension (token batches padded to their own longest
        sequence do not), so a batch can come out smaller."""
        parts: list[Inputs] = []
        for batch in self:
            if parts and _trailing(parts[0]) != _trailing(batch):
                yield from _cut(_join(parts), size)
                parts = []
            parts.append(batch)
            whole = _join(parts)
            done = batch_len(whole) // size * size
            yield from _cut(batch_slice(whole, 0, done), size)
            parts = [batch_slice(whole, done, batch_len(whole))] if done < batch_len(whole) else []
        if parts:
            yield from _cut(_join(parts), size)

    def first(self, n: int = 1) -> Inputs:
        """The first ``n`` examples as one batch (for probes: a layer's input shape, a batch size)."""
        for batch in self.rebatch(n):
            return batch
        raise RankdownError("no examples: the data gave an empty pass")

    def map(self, fn: Callable[[Inputs], Inputs]) -> Batches:
        """The stream with ``fn`` applied to each batch (e.g. :func:`to_model`); it holds nothing
        itself: this stream holds what it read."""
        return Batches(lambda: (fn(b) for b in self), self._examples, hold_bytes=0, name=self.name)


def _drain(q: collections.deque[Inputs]) -> Iterator[Inputs]:
    while q:
        yield q.popleft()


def _trailing(x: Inputs) -> object:
    if isinstance(x, Mapping):
        return {k: tuple(v.shape[1:]) for k, v in x.items()}
    return tuple(x.shape[1:])


def _join(parts: list[Inputs]) -> Inputs:
    return parts[0] if len(parts) == 1 else batch_cat(parts)


def _cut(x: Inputs, size: int) -> Iterator[Inputs]:
    n = batch_len(x)
    for i in range(0, n, size):
        yield batch_slice(x, i, min(i + size, n))


Examples = Inputs | Batches  # what a data-aware step takes: one batch, or a stream of them


def stream(x: Examples) -> Batches:
    """``x`` as a stream: a batch already in memory is one batch of it, not a copy."""
    return x if isinstance(x, Batches) else Batches(lambda: [x], batch_len(x), hold_bytes=0)


def to_layout(module: nn.Module, channels_last: bool) -> nn.Module:
    """``module`` in place in channels_last (or back to the contiguous layout); the one home of
    the call whose stubs lack the ``memory_format`` overload."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return module.to(memory_format=fmt)  # type: ignore[call-overload]


def describe(x: Inputs) -> str:
    if isinstance(x, Mapping):
        return "{" + ", ".join(f"{k}: {tuple(v.shape)}" for k, v in x.items()) + "}"
    return f"shape {tuple(x.shape)} and dtype {str(x.dtype).replace('torch.', '')}"


@torch.no_grad()
def check_runs(model: nn.Module, example: Inputs, what: str) -> torch.Tensor:
    """One forward pass before any work: a model that does not run on ``example`` (a wrong
    --input-shape, data of another shape, a model that needs other inputs) or whose output holds no
    tensor fails now, in one line, not after minutes. Returns the output tensor."""
    model.eval()
    try:
        out = forward(model, example)
    except Exception as exc:  # the user's model: any error
        raise RankdownError(f"{what} does not run on an input of {describe(example)} ({first_line(exc)})") from exc
    y = primary_output(out)
    if y.is_floating_point() and not bool(torch.isfinite(y).all()):
        raise RankdownError(f"{what} gives NaN or Inf on an input of {describe(example)}")
    return y
