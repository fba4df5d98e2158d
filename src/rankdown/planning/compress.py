"""The compress verb: select layers, choose ranks, factorize, swap — and say what happened."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from rankdown.errors import RankdownError, UnsupportedLayerError
from rankdown.fitting.metrics import factorize_weighted
from rankdown.measurement.bench import Cost, layer_costs
from rankdown.methods import Method, Rank, get_method, method_names, resolve_method
from rankdown.planning.allocate import Budget
from rankdown.planning.plan import LayerPlan, Plan
from rankdown.planning.rank import (
    Choice,
    FixedRank,
    LayerRanks,
    ParamFraction,
    RankPolicy,
    candidate_cost,
    choose_rank,
    policy_to_dict,
)
from rankdown.probe import Examples, Inputs, stream
from rankdown.progress import progress
from rankdown.surgery import FilterFn, Selection, record_inputs, replace_module, select_layers, weight_of


@dataclass(frozen=True)
class CompressConfig:
    """What to do. ``method`` names the conv method; Linear layers use the Linear handler of the
    same name if there is one, else truncated SVD."""

    method: str = "tucker2"
    rank: RankPolicy = field(default_factory=lambda: ParamFraction(0.5))
    layers: tuple[str, ...] | None = None  # names or "re:PATTERN"; None = every supported Conv2d/Linear
    skip: tuple[str, ...] = ()
    filter_fn: FilterFn | None = None  # API only: (module, fqn) -> bool

    def __post_init__(self) -> None:
        if self.method not in method_names():
            raise RankdownError(f"unknown method {self.method!r}; known: {', '.join(method_names())}")


@dataclass
class LayerReport:
    name: str
    layer_type: str
    method: str | None  # None: kept dense
    rank: Rank | None
    before: Cost
    after: Cost
    rel_error: float | None
    note: str = ""
    info: dict = field(default_factory=dict)  # method diagnostics (iterations, convergence, ...)
    target: bool = True  # False: excluded from factorization (skipped or unsupported), not merely left dense

    def to_dict(self) -> dict:
        d = asdict(self)
        d["rank"] = list(self.rank) if isinstance(self.rank, tuple) else self.rank
        return d


@dataclass
class CompressResult:
    model: nn.Module
    plan: Plan
    layers: list[LayerReport]

    @property
    def before(self) -> Cost:
        return sum((r.before for r in self.layers), Cost(0, 0))

    @property
    def after(self) -> Cost:
        return sum((r.after for r in self.layers), Cost(0, 0))


def _handler(config: CompressConfig, fqn: str, module: nn.Module) -> Method:
    handler = resolve_method(config.method, module)
    if handler is None:
        raise UnsupportedLayerError(fqn, type(module).__name__, f"no method handles {type(module).__name__}")
    handler.check(fqn, module)
    return handler


MAX_FALLBACKS = 8  # lower ranks tried, one step at a time, after a failed fit


def _below(candidate: Rank, rank: Rank) -> bool:
    """Whether ``candidate`` is a smaller rank than ``rank`` of the same kind (every size smaller
    or equal, one smaller), so that it costs no more."""
    a = candidate if isinstance(candidate, tuple) else (candidate,)
    b = rank if isinstance(rank, tuple) else (rank,)
    return len(a) == len(b) and all(x <= y for x, y in zip(a, b, strict=True)) and a != b


def _rank_text(rank: Rank) -> str:
    return "×".join(map(str, rank)) if isinstance(rank, tuple) else str(rank)


def select_targets(model: nn.Module, config: CompressConfig) -> Selection:
    """The layers ``config`` selects in ``model`` (unsupported ones are reported as skipped)."""
    return select_layers(
        model,
        is_candidate=lambda n, m: _handler(config, n, m),
        layers=config.layers,
        skip=config.skip,
        filter_fn=config.filter_fn,
    )


def compress(
    model: nn.Module,
    config: CompressConfig,
    example_input: Examples,
    *,
    inplace: bool = False,
    model_spec: str | None = None,
    metrics: dict | None = None,
) -> CompressResult:
    """Factorize the selected layers of ``model``.

    ``example_input`` (batch 1 is enough; a stream's first example is taken) drives a probe forward
    pass that records each layer's input size, for MAC counts and MAC-budget ranks. ``metrics`` (from
    :func:`rankdown.fitting.metrics.collect`) weighs each layer's fit by its data (Denton's Mahalanobis or
    data-covariance metric). Returns the compressed model (a copy unless
    ``inplace``), the plan that rebuilds it, and one report row per considered layer.
    """
    if not inplace:
        model = copy.deepcopy(model)
    model.eval()
    example = stream(example_input).first(1)
    selection = select_targets(model, config)
    for fqn in selection.targets:  # before any work: a NaN would end in a linear-algebra traceback
        w = weight_of(model.get_submodule(fqn))
        if not bool(torch.isfinite(w).all()):
            raise RankdownError(f"layer {fqn!r}: its weight holds NaN or Inf values")
    inputs = record_inputs(model, example, selection.targets)
    before = layer_costs(model, example, selection.targets + list(selection.skipped))
    rows: list[LayerReport] = []
    plan_layers: dict[str, LayerPlan] = {}

    def kept_dense(fqn: str, ltype: str, note: str, err: float | None = None) -> None:
        rows.append(LayerReport(fqn, ltype, None, None, before[fqn], before[fqn], err, note))

    for fqn in progress(selection.targets, total=len(selection.targets), desc=f"factorize ({config.method})"):
        module = model.get_submodule(fqn)
        handler = _handler(config, fqn, module)
        choice = config.rank.ranks.get(fqn) if isinstance(config.rank, LayerRanks) else None
        if isinstance(choice, Choice):  # a per-layer method (latency-aware plans)
            handler = get_method(choice.method, type(module))
            handler.check(fqn, module)
        ltype = type(module).__name__
        if fqn not in inputs:
            kept_dense(fqn, ltype, "not called by the example input: kept dense")
            continue
        try:
            rank = choose_rank(handler, module, config.rank, inputs[fqn], before[fqn], fqn)
        except RankdownError as exc:
            raise type(exc)(f"layer {fqn!r} ({ltype} {tuple(weight_of(module).shape)}): {exc}") from None
        if rank is None:
            if isinstance(config.rank, LayerRanks):
                kept_dense(fqn, ltype, f"kept dense by the plan ({config.rank.source})")
            else:
                kept_dense(fqn, ltype, f"no rank meets {config.rank.describe()}: kept dense")
            continue
        cost = candidate_cost(handler, module, rank, inputs[fqn])
        # A latency-aware choice was made on measured time, which is what counts; otherwise a form
        # that saves neither parameters nor MACs is not worth having.
        if not isinstance(choice, Choice) and cost.params >= before[fqn].params and cost.macs >= before[fqn].macs:
            kept_dense(fqn, ltype, f"rank {rank} would save neither parameters nor MACs: kept dense")
            continue
        fact = factorize_weighted(handler, fqn, module, rank, (metrics or {}).get(fqn))
        fallback = ""
        if fact.failure is not None and not isinstance(config.rank, FixedRank):
            # A budget is not missed without a word: a fit that fails (a degenerate CP) is retried at
            # the next lower ranks, which still meet the budget, before the layer is left dense.
            first_failure, lower = fact.failure, [c for c in handler.candidates(module) if _below(c, rank)]
            for smaller in list(reversed(lower))[:MAX_FALLBACKS]:
                retry = factorize_weighted(handler, fqn, module, smaller, (metrics or {}).get(fqn))
                if retry.failure is None:
                    fallback = f"{first_failure} at rank {_rank_text(rank)}: fell back to rank {_rank_text(smaller)}"
                    fact, rank = retry, smaller
                    break
        if fact.failure is not None:
            kept_dense(fqn, ltype, f"{fact.failure}: kept dense", fact.rel_error)
            continue
        replace_module(model, fqn, fact.module)
        plain = handler.layer_type.__name__
        plan_layers[fqn] = LayerPlan(handler.name, rank, plain, tuple(weight_of(module).shape))
        note = "" if type(module) is handler.layer_type else f"computes as a plain {plain} (probed)"
        note = "; ".join(n for n in (note, fallback) if n)
        rows.append(
            LayerReport(fqn, ltype, handler.name, rank, before[fqn], before[fqn], fact.rel_error, note, fact.info)
        )
    for fqn, reason in selection.skipped.items():
        kept_dense(fqn, type(model.get_submodule(fqn)).__name__, reason)
        rows[-1].target = False
    # Costs after, measured on the compressed model by the same counter as before.
    after_costs = layer_costs(model, example, [r.name for r in rows])
    for r in rows:
        r.after = after_costs[r.name]
    order = {n: i for i, (n, _) in enumerate(model.named_modules())}
    rows.sort(key=lambda r: order.get(r.name, 0))
    plan = Plan(
        plan_layers,
        model_spec,
        tuple(example.shape[1:]) if isinstance(example, torch.Tensor) else None,
        {
            "method": config.method,
            # what the layers really use: a mixed or latency-aware plan picks per layer
            "methods": sorted({lp.method for lp in plan_layers.values()}),
            "policy": policy_to_dict(config.rank),
        },
    )
    return CompressResult(model, plan, rows)


@dataclass
class Targets:
    """The layers a config selects that ran in a probe forward, with their methods: what the
    data-aware planners start from."""

    selection: Selection
    example: Inputs  # the calibration data's first example
    inputs: dict[str, torch.Tensor]  # each target's input, batch 1, on the meta device
    methods: dict[str, Method]


def data_targets(model: nn.Module, config: CompressConfig, calibration: Examples) -> Targets:
    selection = select_targets(model, config)
    example = stream(calibration).first(1)
    inputs = record_inputs(model, example, selection.targets)
    methods = {n: _handler(config, n, model.get_submodule(n)) for n in selection.targets if n in inputs}
    return Targets(selection, example, inputs, methods)


def allocate_ranks(
    model: nn.Module,
    config: CompressConfig,
    calibration: Examples,
    budget: Budget,
    *,
    criterion: str = "layer",
    points: int = 12,
    round_to: int = 1,
    cache_dir: str | Path | None = None,
    metrics: dict | None = None,
    methods: list[str] | None = None,
    objective: str = "max",
    refit: Callable[[nn.Module, list[str]], object] | None = None,
) -> LayerRanks:
    """Spend one whole-model ``budget`` across the layers ``config`` selects (see rankdown.planning.allocate).
    ``criterion`` "spectrum" takes each layer's error curve in closed form from its (``metrics``-
    weighted) singular values instead of a sweep (truncated-SVD methods only). With ``methods``,
    each layer's options are every (method, rank) those methods offer it, under the same error
    criterion, so the plan takes the best form for each layer (the ranks are then Choices). The
    mixed plan is then checked against each single-method plan on ``calibration``, each first
    passed through ``refit`` (model, factorized layers) when given: the data reconstruction that
    will follow, so that the check compares what the user will get (channel SVD loses most before a
    refit and gains most from it).

    Returns a LayerRanks policy: ``compress(model, replace(config, rank=policy), ...)`` applies it.
    """
    from rankdown.measurement.bench import model_cost
    from rankdown.planning.allocate import LayerCurve, allocate, rank_ladders, sensitivity, spectrum_curves

    model = model.eval()
    calibration = stream(calibration)
    found = data_targets(model, config, calibration)
    example, inputs, targets = found.example, found.inputs, found.methods
    kind = budget.kind

    def curves_for(chosen: dict[str, Method]) -> dict[str, LayerCurve]:
        if criterion == "spectrum":
            return spectrum_curves(model, chosen, inputs, metrics, round_to=round_to)
        return sensitivity(
            model,
            chosen,
            calibration,
            criterion=criterion,
            points=points,
            round_to=round_to,
            cache_dir=Path(cache_dir) if cache_dir else None,
            metrics=metrics,
        )

    total = getattr(model_cost(model, example), kind)
    if not methods:
        curves = curves_for(targets)
        ladders: dict[str, list[tuple[Rank | Choice, int]]] = {
            n: list(ladder) for n, ladder in rank_ladders(model, targets, inputs, kind, round_to).items()
        }
        fixed = total - sum(c.options[-1].__dict__[kind] for c in curves.values())
        ranks = allocate(curves, budget, total, fixed, ladders, objective)
        return LayerRanks(
            ranks, source=f"allocated: {kind} x{budget.fraction:.3g}, {criterion} sensitivity, {objective} error"
        )
    # Mixed: every layer's options are its (method, rank) pairs; one curve and one ladder per
    # method are kept too, for the single-method plans the mixed one is checked against.
    per_method = _methods_per_layer(model, targets, methods)
    by_method: dict[str, dict[str, LayerCurve]] = {}
    steps: dict[str, dict[str, list[tuple[Rank | Choice, int]]]] = {}
    for name in dict.fromkeys(m for forms in per_method.values() for m in forms):  # with fallbacks
        chosen = {n: per_method[n][name] for n in targets if name in per_method[n]}
        by_method[name] = {
            n: LayerCurve(n, name, [dataclasses.replace(o, rank=_tag(name, o.rank)) for o in c.options])
            for n, c in curves_for(chosen).items()
        }
        steps[name] = {
            n: [(Choice(name, r), c) for r, c in ladder]
            for n, ladder in rank_ladders(model, chosen, inputs, kind, round_to).items()
        }
    layers = [n for n in targets if any(n in c for c in by_method.values())]

    def plan(names: list[str]) -> dict[str, Rank | Choice | None]:
        curves, ladders = {}, {}
        for n in layers:
            forms = [m for m in names if n in by_method[m]] or [m for m in by_method if n in by_method[m]][:1]
            options = sorted(
                (o for m in forms for o in by_method[m][n].options if o.rank is not None),
                key=lambda o: o.__dict__[kind],
            )
            curves[n] = LayerCurve(n, "+".join(forms), [*options, by_method[forms[0]][n].options[-1]])
            ladders[n] = [step for m in forms for step in steps[m][n]]
        fixed = total - sum(c.options[-1].__dict__[kind] for c in curves.values())
        return allocate(curves, budget, total, fixed, ladders, objective)

    mixed = plan(methods)
    source = f"allocated: {kind} x{budget.fraction:.3g}, {criterion} sensitivity over {', '.join(methods)}"
    if criterion == "spectrum" or len(methods) < 2:
        return LayerRanks(mixed, source=source)
    # The allocation equalises per-layer errors, which do not add up exactly: the mixed plan is
    # checked against each single-method plan on the calibration data, and the best one is taken,
    # so that a mix is never worse there than the best single method.
    from rankdown.planning.sweep import model_outputs, relative_error

    reference = model_outputs(model, calibration)
    candidates = {"mixed": mixed, **{m: plan([m]) for m in methods if m in by_method}}
    errors: dict[str, float] = {}
    for label, ranks in candidates.items():
        same = next((k for k in errors if candidates[k] == ranks), None)
        if same is not None:  # the mix took one method everywhere: that plan is scored already
            errors[label] = errors[same]
            continue
        trial = compress(model, dataclasses.replace(config, rank=LayerRanks(ranks, "trial")), example)
        if refit is not None:
            refit(trial.model, list(trial.plan.layers))
        errors[label] = relative_error(model_outputs(trial.model, calibration), reference)
    best = min(errors, key=lambda k: (errors[k], k != "mixed"))
    detail = ", ".join(f"{k} {v:.4f}" for k, v in errors.items())
    after = " after a refit" if refit is not None else ""
    return LayerRanks(candidates[best], source=f"{source}; calibration error{after} {detail}: took {best}")


def _tag(name: str, rank: Rank | Choice | None) -> Rank | Choice | None:
    return None if rank is None or isinstance(rank, Choice) else Choice(name, rank)


def _methods_per_layer(model: nn.Module, targets: dict[str, Method], names: list[str]) -> dict[str, dict[str, Method]]:
    """For each layer, the named methods that can factorize it; a layer none of them handles keeps
    its default method (e.g. a Linear layer when only conv methods are named)."""
    unknown = [n for n in names if n not in method_names()]
    if unknown:
        raise RankdownError(f"unknown method {unknown[0]!r} (see: rankdown methods)")
    out: dict[str, dict[str, Method]] = {}
    for fqn, default in targets.items():
        module = model.get_submodule(fqn)
        usable = {}
        for name in names:
            handler = resolve_method(name, module)
            if handler is None or handler.name != name:  # not this method's layer type
                continue
            try:
                handler.check(fqn, module)
            except RankdownError:  # e.g. separable on a 1×1 conv
                continue
            usable[name] = handler
        out[fqn] = usable or {default.name: default}
    return out
