"""Latency-aware planning: choose each layer's method and rank by *measured* time on the user's
device, not by MACs, and leave a layer dense when nothing is faster.

A latency table maps (device, dtype, batch, threads, layout, torch version) × (module structure,
input shape) to a median time. It is cached on disk, so a second plan on the same device costs
only the decompositions. Candidate ranks are rounded to hardware-friendly multiples.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rankdown import __version__
from rankdown.errors import RankdownError
from rankdown.measurement.bench import measure_latency
from rankdown.methods import METHODS, Method, Rank
from rankdown.planning.rank import Choice
from rankdown.planning.sweep import Scorer, dense_cost, sweep
from rankdown.probe import Examples, Inputs, batch_slice, to_layout
from rankdown.progress import progress
from rankdown.storage import default_cache_dir
from rankdown.surgery import get_module

# DeviceKey has a field named torch, which hides the module inside its body
_DType = torch.dtype
_FLOAT32 = torch.float32


@dataclass(frozen=True)
class DeviceKey:
    device: str  # "cpu" or "cuda"
    name: str  # processor or GPU model
    dtype: str
    batch: int
    threads: int
    channels_last: bool
    torch: str

    @classmethod
    def current(
        cls,
        device: str = "cpu",
        dtype: _DType = _FLOAT32,
        batch: int = 1,
        threads: int | None = None,
        channels_last: bool = False,
    ) -> DeviceKey:
        if device == "cuda":
            if not torch.cuda.is_available():
                raise RankdownError("device 'cuda' asked for, but no CUDA device is available")
            name = torch.cuda.get_device_name()
        else:
            from rankdown.measurement.bench import environment

            name = environment()["cpu"]
        return cls(
            device,
            name,
            str(dtype).replace("torch.", ""),
            batch,
            threads or torch.get_num_threads(),
            channels_last,
            torch.__version__,
        )

    def slug(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]


class LatencyTable:
    """Measured layer times for one DeviceKey, persisted as JSON (written atomically)."""

    def __init__(self, key: DeviceKey, cache_dir: str | Path | None = None, runs: int = 20, guard: bool = True) -> None:
        self.key, self.runs, self.guard = key, runs, guard
        self.path = Path(cache_dir or default_cache_dir()) / f"latency-{key.slug()}.json"
        self.entries: dict[str, float] = {}  # guarded measurements: cached on disk
        self.contended: dict[str, float] = {}  # measured under foreign load: used in this run only, never saved
        self.measured = 0  # how many entries this instance had to measure (tests and progress)
        if self.path.is_file():
            try:
                data = json.loads(self.path.read_text())
            except (ValueError, OSError, RecursionError):
                data = None
            if isinstance(data, dict) and data.get("key") == asdict(key) and isinstance(data.get("entries"), dict):
                # A cache is data: an entry that is not a plausible time (a positive finite number of
                # ms, under a minute) is dropped and measured again, never trusted because it parses.
                self.entries = {
                    k: float(v)
                    for k, v in data["entries"].items()
                    if isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < 60_000
                }

    @staticmethod
    def signature(module: nn.Module, in_shape: tuple[int, ...]) -> str:
        # The module's repr holds every sub-layer's geometry (channels, kernel, stride, padding...).
        return f"{tuple(in_shape)}|{module!r}"

    def time(self, module: nn.Module, in_shape: tuple[int, ...]) -> float:
        """Median ms of ``module`` on an input of ``in_shape`` (one example; the key's batch is used)."""
        sig = self.signature(module, in_shape)
        if sig in self.entries:
            return self.entries[sig]
        if sig in self.contended:
            return self.contended[sig]
        k = self.key
        dtype = getattr(torch, k.dtype)
        m = module.to(device=k.device, dtype=dtype).eval()
        x = torch.randn((k.batch, *in_shape), device=k.device, dtype=dtype)
        contended = False
        if k.device == "cuda":
            ms = cuda_latency(m, x, runs=self.runs, channels_last=k.channels_last)
        else:
            lat = measure_latency(
                m,
                x,
                runs=self.runs,
                warmup=3,
                threads=k.threads,
                channels_last=k.channels_last,
                guard=self.guard,
                window_s=0.05,
                desc="latency table",
            )
            ms, contended = lat.median_ms, lat.contended
        (self.contended if contended else self.entries)[sig] = ms
        self.measured += 1
        return ms

    def save(self) -> None:
        from rankdown.storage import atomic_write_text

        atomic_write_text(
            self.path, json.dumps({"key": asdict(self.key), "rankdown": __version__, "entries": self.entries}, indent=0)
        )


def cuda_latency(
    model: nn.Module,
    x: torch.Tensor,
    *,
    runs: int = 30,
    warmup: int = 10,
    channels_last: bool = False,
    cuda_graph: bool = False,
) -> float:
    """Median ms by CUDA events after warm-up; optionally replayed from a captured CUDA graph."""
    if channels_last and x.ndim == 4:
        model = to_layout(model, True)
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        for _ in range(warmup):
            model(x)
        fn = lambda: model(x)  # noqa: E731
        if cuda_graph:
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                model(x)
            fn = g.replay
        torch.cuda.synchronize()
        times = []
        for _ in range(runs):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2]


@dataclass
class Candidate:
    method: str | None  # None: dense
    rank: Rank | None
    ms: float
    error: float
    macs: int

    def choice(self) -> Choice | None:
        return None if self.method is None or self.rank is None else Choice(self.method, self.rank)


@dataclass
class LayerOptions:
    name: str
    dense_ms: float
    candidates: list[Candidate] = field(default_factory=list)


def _round_rank(method: Method, module: nn.Module, fraction: float, multiple: int) -> Rank:
    cands = list(method.candidates(module))
    r = cands[min(len(cands) - 1, max(0, round(fraction * (len(cands) - 1))))]
    return method.round_rank(module, r, multiple)


def _applicable(fqn: str, module: nn.Module, methods: list[str]) -> list[tuple[str, Method]]:
    """The methods (of those asked for) that can factorize this layer; the others are skipped."""
    out = []
    for name in methods:
        base = next((t for t in type(module).__mro__ if (name, t) in METHODS), None)
        handler = None if base is None else METHODS[(name, base)]
        if handler is None:
            continue
        try:
            handler.check(fqn, module)
        except RankdownError:
            continue
        out.append((name, handler))
    return out


def layer_options(
    model: nn.Module,
    targets: list[str],
    calibration: Examples,
    table: LatencyTable,
    methods: list[str],
    fractions: tuple[float, ...] = (0.125, 0.25, 0.375, 0.5, 0.75),
    multiple: int = 8,
    *,
    criterion: str = "layer",
) -> dict[str, LayerOptions]:
    """For each target layer: its dense time, and every (method, rank) candidate with its measured
    time and its output error on the calibration data, from the sweep the budget planner uses too
    (:mod:`rankdown.planning.sweep`). ``criterion="layer"``: the layer's own output (cheap, but
    blind to how much the model cares: a 0.3 error in an early conv can cost far more accuracy than
    in the classifier). ``"model"``: the whole model's output with only this layer replaced."""
    scorer = Scorer(model, targets, calibration, criterion)
    targets = [t for t in targets if t in scorer.examples]
    ranks: dict[str, list[tuple[Method, list[Rank]]]] = {}
    for fqn in targets:
        module = get_module(model, fqn)
        ranks[fqn] = []
        for _, handler in _applicable(fqn, module, methods):
            per_method = dict.fromkeys(_round_rank(handler, module, f, multiple) for f in fractions)  # in order, once
            ranks[fqn].append((handler, list(per_method)))

    def timed(candidate: nn.Module, in_shape: tuple[int, ...]) -> float:
        return table.time(_clone(candidate), in_shape)

    scored = sweep(model, scorer, ranks, timer=timed, only_paying=False, desc="latency candidates")
    out: dict[str, LayerOptions] = {}
    for fqn in targets:
        x = scorer.examples[fqn]
        opts = LayerOptions(fqn, timed(get_module(model, fqn), tuple(x.shape[1:])))
        opts.candidates.append(Candidate(None, None, opts.dense_ms, 0.0, dense_cost(model, fqn, x).macs))
        opts.candidates += [Candidate(c.method, c.rank, c.ms or 0.0, c.error, c.macs) for c in scored[fqn]]
        out[fqn] = opts
    table.save()
    return out


def _clone(module: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(module)


def plan_by_latency(
    options: dict[str, LayerOptions], max_error: float, margin: float = 0.03
) -> dict[str, Choice | None]:
    """Per layer, the fastest candidate whose error is at most ``max_error`` — but only if the table
    says it beats the dense layer by more than ``margin`` (noise); otherwise the layer stays dense."""
    if not max_error > 0:
        raise RankdownError(f"max error must be > 0, got {max_error}")
    plan: dict[str, Choice | None] = {}
    for name, opts in options.items():
        ok = [
            c
            for c in opts.candidates
            if c.method is not None and c.error <= max_error and c.ms < opts.dense_ms * (1 - margin)
        ]
        best = min(ok, key=lambda c: c.ms) if ok else None
        plan[name] = None if best is None else best.choice()
    return plan


def _flip(holds: Callable[[float], bool], start: float, cap: float = 1e12) -> tuple[float, float]:
    """(lo, hi) around the multiplier where ``holds`` (true at 0, monotone) turns false: hi grows
    ×4 from ``start`` until it does (or reaches ``cap``), then 80 halvings. The Lagrangian planners
    take lo (the last value that fits) or hi (the first), depending on which side fits."""
    lo, hi = 0.0, start
    while holds(hi) and hi < cap:
        lo, hi = hi, hi * 4
    for _ in range(80):
        mid = (lo + hi) / 2
        if holds(mid):
            lo = mid
        else:
            hi = mid
    return lo, hi


def _fill(
    choice: dict[str, Candidate],
    pool: dict[str, list[Candidate]],
    slack: Callable[[dict[str, Candidate]], float],
    gain: Callable[[Candidate, Candidate, float], Any],
) -> dict[str, Choice | None]:
    """After a Lagrangian plan: repeat the single-layer move with the highest ``gain`` (None: not
    allowed within the slack left) until none is left; then the plan as Choices."""
    while True:
        left = slack(choice)
        best, best_key = None, None
        for n, cs in pool.items():
            for c in cs:
                key = gain(choice[n], c, left)
                if key is not None and (best_key is None or key > best_key):
                    best, best_key = (n, c), key
        if best is None:
            break
        choice[best[0]] = best[1]
    return {n: c.choice() for n, c in choice.items()}


def plan_by_latency_sum(
    options: dict[str, LayerOptions], error_budget: float, margin: float = 0.03
) -> dict[str, Choice | None]:
    """The least measured time whose per-layer errors *sum* to at most ``error_budget``: a layer
    that costs the model little may take more error than one that costs it much, where
    ``plan_by_latency`` lets every layer use the whole budget. Each layer minimises ms + μ·error,
    μ is bisected to the smallest value that fits, and the slack left is then spent on the moves
    that save the most ms per unit of error. Candidates within ``margin`` of the dense time are
    not considered (noise), so dense stays the choice where nothing is clearly faster."""
    if not error_budget > 0:
        raise RankdownError(f"error budget must be > 0, got {error_budget}")
    pool = {
        n: [o.candidates[0]] + [c for c in o.candidates[1:] if c.ms < o.dense_ms * (1 - margin)]
        for n, o in options.items()
    }

    def pick(mu: float) -> dict[str, Candidate]:
        return {n: min(cs, key=lambda c: (c.ms + mu * c.error, c.error)) for n, cs in pool.items()}

    def spent(choice: dict[str, Candidate]) -> float:
        return sum(c.error for c in choice.values())

    _, hi = _flip(lambda mu: spent(pick(mu)) > error_budget, 1e-6)
    choice = pick(hi)

    def gain(current: Candidate, c: Candidate, slack: float):  # ms saved per error added
        dt, de = current.ms - c.ms, c.error - current.error
        if dt <= 0 or de > slack:
            return None
        return dt / de if de > 0 else float("inf")

    return _fill(choice, pool, lambda ch: error_budget - spent(ch), gain)


def plan_by_macs(options: dict[str, LayerOptions], max_error: float) -> dict[str, Choice | None]:
    """The MAC-only counterpart (what peers do): the fewest MACs within the error budget."""
    plan: dict[str, Choice | None] = {}
    for name, opts in options.items():
        ok = [
            c
            for c in opts.candidates
            if c.method is not None and c.error <= max_error and c.macs < opts.candidates[0].macs
        ]
        best = min(ok, key=lambda c: c.macs) if ok else None
        plan[name] = None if best is None else best.choice()
    return plan


def plan_error(options: dict[str, LayerOptions], plan: dict[str, Choice | None]) -> dict[str, float]:
    """The measured errors of a plan's choices: the largest of one layer and their sum."""
    errors = [
        next(c.error for c in options[n].candidates if c.method == ch.method and c.rank == ch.rank)
        for n, ch in plan.items()
        if ch is not None
    ]
    return {"max": max(errors, default=0.0), "sum": float(sum(errors))}


def predicted_ms(options: dict[str, LayerOptions], plan: dict[str, Choice | None]) -> float:
    total = 0.0
    for name, opts in options.items():
        choice = plan.get(name)
        if choice is None:
            total += opts.dense_ms
        else:
            total += next(c.ms for c in opts.candidates if c.method == choice.method and c.rank == choice.rank)
    return total


def layer_speed(options: dict[str, LayerOptions], plan: dict[str, Choice | None]) -> dict[str, dict]:
    """Per planned layer, from the latency table: dense and chosen ms, the measured speedup, the
    ideal one (the layer's MAC reduction) and their ratio, so a user sees which layers fall short
    of their MAC count (per-call overhead of small factors, memory-bound 1×1 and depthwise passes)."""
    out = {}
    for name, opts in options.items():
        choice = plan.get(name)
        dense = next(c for c in opts.candidates if c.method is None)
        chosen = (
            dense
            if choice is None
            else next(c for c in opts.candidates if c.method == choice.method and c.rank == choice.rank)
        )
        speedup, ideal = opts.dense_ms / chosen.ms, dense.macs / max(chosen.macs, 1)
        out[name] = {
            "method": chosen.method,
            "dense_ms": opts.dense_ms,
            "ms": chosen.ms,
            "speedup": speedup,
            "ideal": ideal,
            "achieved_over_ideal": speedup / ideal,
        }
    return out


def slower_than_dense(
    dense: nn.Module,
    compressed: nn.Module,
    layers: list[str],
    example: Inputs,
    table: LatencyTable,
    margin: float = 0.03,
) -> dict[str, dict[str, float]]:
    """The factorized layers of ``compressed`` that the table does not measure faster than their
    dense originals by more than ``margin``, at the input shape ``example`` gives each of them
    (for a language model, one token: batch-1 decode), with both times. What a data-aware plan
    chose for quality may still lose to the dense layer on the user's device: such a layer is
    better left dense (it costs weights, never quality)."""
    from rankdown.surgery import record_inputs

    inputs = record_inputs(dense, batch_slice(example, 0, 1), layers)
    out: dict[str, dict[str, float]] = {}
    for fqn in progress(layers, total=len(layers), desc="dense or factorized"):
        in_shape = tuple(inputs[fqn].shape[1:])
        dense_ms = table.time(_clone(get_module(dense, fqn)), in_shape)
        ms = table.time(_clone(get_module(compressed, fqn)), in_shape)
        if ms >= dense_ms * (1 - margin):
            out[fqn] = {"dense_ms": dense_ms, "ms": ms}
    table.save()
    return out


def latency_ranks(
    model: nn.Module,
    config,
    calibration: Examples,
    key: DeviceKey,
    *,
    max_error: float,
    methods: list[str],
    cache_dir: str | Path | None = None,
    mac_only: bool = False,
    runs: int = 20,
    guard: bool = True,
    criterion: str = "layer",
    scope: str = "each",
):
    """A LayerRanks policy of per-layer Choices, chosen by measured time (or by MACs, for
    comparison) under an error budget (``criterion``: see ``layer_options``) that bounds each
    layer's error (``scope="each"``) or their sum (``"sum"``, latency-aware only). Returns
    (policy, options)."""
    if scope not in ("each", "sum") or (scope == "sum" and mac_only):
        raise RankdownError(f"error scope must be 'each' or (latency-aware only) 'sum', got {scope!r}")
    from rankdown.planning.compress import select_targets
    from rankdown.planning.rank import LayerRanks

    selection = select_targets(model, config)
    table = LatencyTable(key, cache_dir, runs=runs, guard=guard)
    options = layer_options(model, selection.targets, calibration, table, methods, criterion=criterion)
    if mac_only:
        plan = plan_by_macs(options, max_error)
    elif scope == "sum":
        plan = plan_by_latency_sum(options, max_error)
    else:
        plan = plan_by_latency(options, max_error)
    summed = "summed " if scope == "sum" else ""
    src = (
        f"{'MAC' if mac_only else 'latency'}-aware, {criterion} error {summed}<= {max_error:g}, "
        f"{key.device} batch {key.batch}"
    )
    if table.contended:
        src += f"; {len(table.contended)} timings measured under foreign CPU load (used, not cached)"
    return LayerRanks(plan, source=src), options


def plan_for_mac_budget(
    options: dict[str, LayerOptions], budget_macs: float, max_error: float | None = None
) -> dict[str, Choice | None]:
    """A plan that meets a MAC budget (the target layers' share of a whole-model target) while
    keeping as much of it as possible in the forms that cost the least measured time for what
    they keep: each layer minimises ms − λ·MACs (MACs kept stand in for accuracy), with λ >= 0
    bisected to the largest value whose plan still fits the budget. λ = 0 would be the fastest
    plan regardless of how little it keeps; dense stays an option for every layer.

    Time alone does not bound the error (a real CNN kept 46% of its accuracy with a time-only 2×
    plan): ``max_error`` drops every candidate whose measured error (``layer_options``) is above
    it, and :func:`plan_error` says what error a plan has."""
    if max_error is not None:
        if not max_error > 0:
            raise RankdownError(f"max error must be > 0, got {max_error}")
        options = {
            n: LayerOptions(o.name, o.dense_ms, [c for c in o.candidates if c.method is None or c.error <= max_error])
            for n, o in options.items()
        }

    def pick(lam: float) -> dict[str, Candidate]:
        return {n: min(o.candidates, key=lambda c: c.ms - lam * c.macs) for n, o in options.items()}

    def macs(choice: dict[str, Candidate]) -> float:
        return sum(c.macs for c in choice.values())

    if macs(pick(0.0)) > budget_macs:
        raise RankdownError("MAC budget unreachable with the measured candidates")
    lo, _ = _flip(lambda lam: macs(pick(lam)) <= budget_macs, 1e-9)
    choice = pick(lo)
    # Fill: the relaxation's plan can sit well under the budget (the candidates are discrete, and
    # one λ serves every layer). Spend the slack, one upgrade at a time, on the move that keeps the
    # most MACs per millisecond it adds (free ones first).

    def gain(current: Candidate, c: Candidate, slack: float):
        dm, dt = c.macs - current.macs, c.ms - current.ms
        if dm <= 0 or dm > slack:
            return None
        return (dt <= 0, dm / dt if dt > 0 else dm)

    return _fill(choice, {n: o.candidates for n, o in options.items()}, lambda ch: budget_macs - macs(ch), gain)


def timing_options(
    model: nn.Module,
    targets: list[str],
    example: torch.Tensor,
    table: LatencyTable,
    methods: list[str],
    fractions: tuple[float, ...] = (0.0625, 0.125, 0.25, 0.375, 0.5, 0.75),
    multiple: int = 8,
) -> dict[str, LayerOptions]:
    """Like ``layer_options`` but without data: candidates are built with random weights (time does
    not depend on the values), so a plan for a speed target costs no decomposition at all."""
    from rankdown.measurement.bench import module_cost
    from rankdown.planning.rank import _meta_copy, candidate_cost
    from rankdown.surgery import record_inputs

    inputs = record_inputs(model, batch_slice(example, 0, 1), targets)
    out: dict[str, LayerOptions] = {}
    for fqn in progress(targets, total=len(targets), desc="latency table"):
        module = get_module(model, fqn)
        in_shape = tuple(inputs[fqn].shape[1:])
        dense_macs = module_cost(_meta_copy(module), inputs[fqn]).macs
        opts = LayerOptions(fqn, table.time(_clone(module), in_shape))
        opts.candidates.append(Candidate(None, None, opts.dense_ms, 0.0, dense_macs))
        for name, handler in _applicable(fqn, module, methods):
            for rank in {_round_rank(handler, module, f, multiple) for f in fractions}:
                cost = candidate_cost(handler, module, rank, inputs[fqn])
                if cost.macs >= dense_macs:
                    continue
                ms = table.time(handler.build(module, rank), in_shape)
                opts.candidates.append(Candidate(name, rank, ms, 0.0, cost.macs))
        out[fqn] = opts
    table.save()
    return out
