"""Global rank allocation: one target for the whole model (MACs, parameters or a speedup factor),
spent across layers by equalising their measured sensitivity.

1. Sensitivity sweep: for each layer and a grid of candidate ranks, an error measured on
   calibration data — either layer-local (relative error of the layer's output on its recorded
   inputs: no extra forward passes of the model) or model-level (relative error of the model's
   output with only that layer factorized, as AIMET's greedy search does). Cached on disk, keyed
   by the model's weights, the data and the settings, so other targets reuse it.
2. Allocation: bisect an error threshold τ; each layer takes its cheapest option with error <= τ
   (staying dense is always an option, with error 0). The smallest τ that meets the budget wins.
3. Fill: leftover budget goes, one rank step at a time, to the layer with the largest error, so
   the result is within one rank step of the target and never over it.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from rankdown import __version__
from rankdown.errors import RankdownError
from rankdown.fitting.metrics import LayerMetric, metrics_digest, transformed
from rankdown.measurement.bench import Cost
from rankdown.methods import Method, Rank
from rankdown.planning.rank import Choice, candidate_cost
from rankdown.planning.sweep import Scorer, sweep
from rankdown.planning.sweep import dense_cost as dense_layer_cost
from rankdown.probe import Examples, stream
from rankdown.progress import progress
from rankdown.storage import atomic_write_text, default_cache_dir
from rankdown.surgery import get_module, weight_of


@dataclass(frozen=True)
class Budget:
    """Exactly one of: keep this fraction of the model's MACs, or of its parameters, or reach this
    theoretical speedup (MAC reduction factor)."""

    macs: float | None = None
    params: float | None = None
    speedup: float | None = None
    # "model": the fraction is of the whole model; "layers": of the layers being factorized only
    # (the LLM convention, "20 % of the block weights removed", which leaves embeddings aside).
    scope: str = "model"

    def __post_init__(self) -> None:
        if self.scope not in ("model", "layers"):
            raise RankdownError(f"budget scope must be 'model' or 'layers', got {self.scope!r}")
        given = [k for k, v in asdict(self).items() if v is not None and k != "scope"]
        if len(given) != 1:
            raise RankdownError(f"give exactly one budget (macs, params or speedup), got {given or 'none'}")
        if self.speedup is not None and not self.speedup > 1.0:
            raise RankdownError(f"speedup must be > 1, got {self.speedup}")
        for k in ("macs", "params"):
            v = getattr(self, k)
            if v is not None and not 0.0 < v < 1.0:
                raise RankdownError(f"{k} budget must be a fraction in (0, 1), got {v}")

    @property
    def kind(self) -> str:
        return "params" if self.params is not None else "macs"

    @property
    def fraction(self) -> float:
        if self.speedup is not None:
            return 1.0 / self.speedup
        return self.params if self.params is not None else self.macs  # type: ignore[return-value]


@dataclass
class Option:
    rank: Rank | Choice | None  # None: stay dense; a Choice in a mixed-method curve
    params: int
    macs: int
    error: float


@dataclass
class LayerCurve:
    name: str
    method: str
    options: list[Option] = field(default_factory=list)  # ascending cost, dense last


def _grid(method: Method, module: nn.Module, points: int, round_to: int) -> list[Rank]:
    """At most ``points`` of the method's candidate ranks, evenly spread, each rounded by the
    method to a multiple of ``round_to`` (every size of a Tucker-2 rank, not just the first)."""
    cands = list(method.candidates(module))
    if round_to > 1:
        cands = list(dict.fromkeys(method.round_rank(module, c, round_to) for c in cands))
    if len(cands) <= points:
        return list(cands)
    idx = sorted({round(i * (len(cands) - 1) / (points - 1)) for i in range(points)})
    return [cands[i] for i in idx]


def fingerprint(model: nn.Module, calib: Examples, settings: dict) -> str:
    """Hash of everything the sweep depends on: weights, architecture, data (one pass over a
    stream) and settings."""
    h = hashlib.sha256()
    h.update(json.dumps({**settings, "rankdown": __version__}, sort_keys=True, default=str).encode())
    h.update(str(model).encode())
    for k, v in model.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    for batch in stream(calib):
        for k, t in sorted(batch.items()) if isinstance(batch, Mapping) else [("", batch)]:
            h.update(k.encode())
            h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:24]


def sensitivity(
    model: nn.Module,
    targets: dict[str, Method],
    calib: Examples,
    *,
    criterion: str = "layer",
    points: int = 12,
    round_to: int = 1,
    cache_dir: Path | None = None,
    on_compute: Callable[[str], None] | None = None,
    metrics: dict[str, LayerMetric] | None = None,
) -> dict[str, LayerCurve]:
    """Error at a grid of ranks for each target layer (see the module docstring). With ``metrics``
    (rankdown.fitting.metrics.collect) each candidate is fitted under its layer's metric, as ``compress``
    will fit it, so that the curve scores the layer the plan will build."""
    if criterion not in ("layer", "model"):
        raise RankdownError(f"sensitivity criterion must be 'layer' or 'model', got {criterion!r}")
    weighted = {k: m for k, m in (metrics or {}).items() if k in targets and m.weighted}
    settings = {
        "criterion": criterion,
        "points": points,
        "round_to": round_to,
        "targets": {k: v.name for k, v in targets.items()},
    }
    if weighted:
        settings["metrics"] = metrics_digest(weighted)
    key = fingerprint(model, calib, settings)
    path = (cache_dir or default_cache_dir()) / f"sensitivity-{key}.json"
    if path.is_file():
        try:
            return _load_curves(json.loads(path.read_text()), model, targets, key)
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError, RankdownError):
            pass  # a damaged or tampered cache file is recomputed, never trusted
    if on_compute:
        on_compute(key)
    scorer = Scorer(model, list(targets), calib, criterion)
    grid = {fqn: [(m, _grid(m, get_module(model, fqn), points, round_to))] for fqn, m in targets.items()}
    scored = sweep(model, scorer, grid, metrics=weighted, desc=f"sensitivity ({criterion})")
    curves: dict[str, LayerCurve] = {}
    for fqn, method in targets.items():
        dense = dense_layer_cost(model, fqn, scorer.examples[fqn])
        curve = LayerCurve(fqn, method.name, [Option(c.rank, c.params, c.macs, c.error) for c in scored[fqn]])
        curve.options.append(Option(None, dense.params, dense.macs, 0.0))
        curves[fqn] = curve
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps({"key": key, "curves": _dump_curves(curves)}, indent=1))
    return curves


# Methods whose fit is a truncated SVD of the (weighted) weight matrix: their error at every rank
# follows from one SVD.
SPECTRUM_METHODS = ("svd", "channel-svd")


@torch.no_grad()
def spectrum_curves(
    model: nn.Module,
    targets: dict[str, Method],
    example_inputs: dict[str, torch.Tensor],
    metrics: dict | None = None,
    *,
    points: int = 64,
    round_to: int = 1,
) -> dict[str, LayerCurve]:
    """Error curves in closed form, no forward pass: a rank-r truncated SVD of the weighted matrix
    M loses exactly the tail of its singular values, so the relative error at rank r is
    sqrt(Σ_{i>r} σ_i² / Σ σ_i²). Under the covariance metric M = W·L (Σ = L Lᵀ the input second
    moment) and this is the layer's relative output error on the calibration data (SVD-LLM's
    truncation loss); under the other metrics, the weighted weight error. One SVD per layer, so it
    scales to the hundreds of matrices of a transformer where a sweep does not."""
    from rankdown.decompose import shifted_cholesky

    curves: dict[str, LayerCurve] = {}
    for fqn, method in progress(targets.items(), total=len(targets), desc="spectrum"):
        if method.name not in SPECTRUM_METHODS:
            raise RankdownError(
                f"layer {fqn!r}: closed-form (spectrum) allocation needs a truncated-SVD method "
                f"({', '.join(SPECTRUM_METHODS)}), not {method.name!r}"
            )
        module = get_module(model, fqn)
        m = (metrics or {}).get(fqn)
        w = weight_of(module).detach().double()
        if m is not None and m.patch_gram is not None:
            mat = w.reshape(w.shape[0], -1) @ shifted_cholesky(m.patch_gram)
        elif m is not None and m.weighted:
            mat = weight_of(transformed(module, m)).detach().double().reshape(w.shape[0], -1)
        else:
            mat = w.reshape(w.shape[0], -1)
        sq = torch.linalg.svdvals(mat) ** 2
        tail = sq.flip(0).cumsum(0).flip(0)  # tail[i] = Σ_{j>=i} σ_j²
        total = float(tail[0]) if len(tail) else 0.0
        dense_cost = dense_layer_cost(model, fqn, example_inputs[fqn])
        curve = LayerCurve(fqn, method.name)
        grid = _grid(method, module, points, round_to)
        for rank, cost in zip(grid, _costs_linear_in_rank(method, module, grid, example_inputs[fqn]), strict=True):
            if cost.params >= dense_cost.params and cost.macs >= dense_cost.macs:
                continue
            r = int(rank)  # type: ignore[arg-type]  # SPECTRUM_METHODS take integer ranks
            err = math.sqrt(float(tail[r]) / total) if r < len(tail) and total > 0 else 0.0
            curve.options.append(Option(rank, cost.params, cost.macs, err))
        curve.options.append(Option(None, dense_cost.params, dense_cost.macs, 0.0))
        curves[fqn] = curve
    return curves


def _costs_linear_in_rank(method: Method, module: nn.Module, ranks: list, example: torch.Tensor) -> list[Cost]:
    """Costs of a truncated SVD at ``ranks``: a + b·r, so two measured points give them all (210
    matrices × 64 ranks of meta-device counting took 30 s on SmolLM2). A third point checks the
    line; where it does not hold, every rank is counted."""
    if len(ranks) < 4:
        return [candidate_cost(method, module, r, example) for r in ranks]
    r0, r1, r2 = int(ranks[0]), int(ranks[-1]), int(ranks[len(ranks) // 2])
    c = {r: candidate_cost(method, module, r, example) for r in (r0, r1, r2)}

    def line(field: str, r: int) -> int:
        a, b = getattr(c[r0], field), getattr(c[r1], field)
        return a + (b - a) * (r - r0) // (r1 - r0)

    if any(
        line(f, r2) != getattr(c[r2], f) or (getattr(c[r1], f) - getattr(c[r0], f)) % (r1 - r0)
        for f in ("params", "macs")
    ):
        return [candidate_cost(method, module, r, example) for r in ranks]
    return [Cost(line("params", int(r)), line("macs", int(r))) for r in ranks]


@torch.no_grad()
def _dump_curves(curves: dict[str, LayerCurve]) -> dict:
    return {
        k: {
            "method": c.method,
            "options": [
                {**asdict(o), "rank": list(o.rank) if isinstance(o.rank, tuple) else o.rank} for o in c.options
            ],
        }
        for k, c in curves.items()
    }


def _load_curves(d: dict, model: nn.Module, targets: dict[str, Method], key: str) -> dict[str, LayerCurve]:
    """Cached curves, every value checked (a cache is data: a value that parses is not trusted):
    the key, the layers and methods, ranks valid for each layer, costs positive integers, errors
    finite and >= 0, the dense option last with error 0. Raises on anything else."""

    def count(v: object) -> int:
        if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < 2**62:
            raise ValueError(f"bad cost {v!r}")
        return v

    if d["key"] != key or set(d["curves"]) != set(targets):
        raise KeyError("cached curves are for another model, data or layers")
    curves = {}
    for k, c in d["curves"].items():
        m, module = targets[k], get_module(model, k)
        if c["method"] != m.name or not c["options"]:
            raise ValueError("cached curve for another method")
        opts = []
        for o in c["options"]:
            rank = None if o["rank"] is None else m.rank_from_json(o["rank"])
            if rank is not None:
                m.validate_rank(module, rank)
            err = o["error"]
            if not isinstance(err, (int, float)) or isinstance(err, bool) or not 0 <= err < math.inf:
                raise ValueError(f"bad error {err!r}")
            opts.append(Option(rank, count(o["params"]), count(o["macs"]), float(err)))
        if opts[-1].rank is not None or opts[-1].error != 0 or any(o.rank is None for o in opts[:-1]):
            raise ValueError("the dense option must come last, with error 0")
        curves[k] = LayerCurve(k, c["method"], opts)
    return curves


def allocate(
    curves: dict[str, LayerCurve],
    budget: Budget,
    total: int,
    fixed: int,
    step_options: dict[str, list[tuple[Rank | Choice, int]]] | None = None,
    objective: str = "max",
) -> dict[str, Rank | Choice | None]:
    """Choose one option per layer so that fixed + Σ cost <= budget.fraction × total.

    ``total`` is the dense model's cost (MACs or params, per ``budget.kind``), ``fixed`` the part
    no target layer touches. ``step_options`` (every rank with its cost, ascending) enables the
    final one-rank-step fill; without it the fill moves along the sweep's grid. ``objective``
    "max" equalises the layers' errors (the largest is made smallest); "sum" minimises the sum of
    their squares.
    """
    if objective not in ("max", "sum"):
        raise RankdownError(f"allocation objective must be 'max' or 'sum', got {objective!r}")
    kind = budget.kind
    limit = budget.fraction * total if budget.scope == "model" else fixed + budget.fraction * (total - fixed)
    cheapest = fixed + sum(min(o.__dict__[kind] for o in c.options) for c in curves.values())
    if cheapest > limit:
        raise RankdownError(
            f"target unreachable: keeping {budget.fraction:.3g} of the {kind} needs <= {limit:,.0f}, but the "
            f"smallest ranks still cost {cheapest:,.0f} ({cheapest / total:.3f} of the dense model)"
        )

    if objective == "sum":
        return _allocate_sum(curves, kind, limit, fixed, total)

    def pick(tau: float) -> dict[str, int]:
        out = {}
        for name, c in curves.items():
            ok = [i for i, o in enumerate(c.options) if o.error <= tau]
            out[name] = min(ok, key=lambda i: c.options[i].__dict__[kind])
        return out

    def spent(choice: dict[str, int]) -> int:
        return fixed + sum(curves[n].options[i].__dict__[kind] for n, i in choice.items())

    taus = sorted({o.error for c in curves.values() for o in c.options})
    lo, hi = 0, len(taus) - 1  # spent(pick(taus[hi])) is the cheapest choice, within budget
    while lo < hi:
        mid = (lo + hi) // 2
        if spent(pick(taus[mid])) <= limit:
            hi = mid
        else:
            lo = mid + 1
    choice = pick(taus[lo])
    ranks: dict[str, Rank | Choice | None] = {n: curves[n].options[i].rank for n, i in choice.items()}
    costs = {n: curves[n].options[i].__dict__[kind] for n, i in choice.items()}
    errors = {n: curves[n].options[i].error for n, i in choice.items()}
    # Fill: give spare budget, one step at a time, to the worst layer that can take it.
    spare = limit - (fixed + sum(costs.values()))
    steps = step_options or {
        n: [(o.rank, o.__dict__[kind]) for o in c.options if o.rank is not None] for n, c in curves.items()
    }
    # Never step up to a rank that costs as much as the dense layer.
    steps = {n: [(r, c) for r, c in ladder if c < curves[n].options[-1].__dict__[kind]] for n, ladder in steps.items()}
    stuck: set[str] = set()
    while True:
        movable = [n for n in curves if n not in stuck and ranks[n] is not None]
        if not movable:
            break
        n = max(movable, key=lambda k: errors[k])
        ladder = [(r, c) for r, c in steps[n] if _same_form(r, ranks[n])]
        pos = next((i for i, (r, _) in enumerate(ladder) if r == ranks[n]), None)
        if pos is None or pos + 1 >= len(ladder) or ladder[pos + 1][1] - costs[n] > spare:
            stuck.add(n)
            continue
        spare -= ladder[pos + 1][1] - costs[n]
        ranks[n], costs[n] = ladder[pos + 1]
        # Interpolate the error between grid points: only the order of layers matters here.
        grid = [o for o in curves[n].options if o.rank is not None and _same_form(o.rank, ranks[n])]
        below = [o.error for o in grid if o.__dict__[kind] <= costs[n]]
        errors[n] = below[-1] if below else errors[n]
        errors[n] *= 0.999  # move on to other layers when the grid cannot tell them apart
    return ranks


def _allocate_sum(
    curves: dict[str, LayerCurve], kind: str, limit: float, fixed: int, total: int
) -> dict[str, Rank | Choice | None]:
    """Minimise Σ error² under the budget: each layer takes the option minimising error² + λ·cost
    (a point of its convex hull), λ bisected until the budget is met; then the spare budget goes,
    step by step, to the option with the largest drop of error² per unit of extra cost."""

    def cost(o: Option) -> float:
        return o.__dict__[kind] / max(total, 1)

    def choose(lam: float) -> dict[str, int]:
        out = {}
        for n, c in curves.items():
            scores = [o.error**2 + lam * cost(o) for o in c.options]
            out[n] = scores.index(min(scores))
        return out

    def spent(choice: dict[str, int]) -> float:
        return fixed + sum(curves[n].options[i].__dict__[kind] for n, i in choice.items())

    lo, hi = 1e-12, 1.0
    while spent(choose(hi)) > limit and hi < 1e30:
        hi *= 10.0
    for _ in range(60):  # bisection on log λ
        mid = math.sqrt(lo * hi)
        if spent(choose(mid)) <= limit:
            hi = mid
        else:
            lo = mid
    choice = choose(hi)
    spare = limit - spent(choice)
    while True:
        best, best_gain = None, 0.0
        for n, c in curves.items():
            now = c.options[choice[n]]
            for i, o in enumerate(c.options):
                extra = o.__dict__[kind] - now.__dict__[kind]
                if 0 < extra <= spare and o.error < now.error:
                    gain = (now.error**2 - o.error**2) / extra
                    if gain > best_gain:
                        best, best_gain = (n, i), gain
        if best is None:
            break
        n, i = best
        spare -= curves[n].options[i].__dict__[kind] - curves[n].options[choice[n]].__dict__[kind]
        choice[n] = i
    return {n: curves[n].options[i].rank for n, i in choice.items()}


def _same_form(a: object, b: object) -> bool:
    """Whether rank ``a`` is of the same method as ``b`` (mixed plans hold Choices; a single
    method's ladder is all one form)."""
    from rankdown.planning.rank import Choice

    if isinstance(b, Choice):
        return isinstance(a, Choice) and a.method == b.method
    return True


def rank_ladders(
    model: nn.Module, targets: dict[str, Method], example_inputs: dict[str, torch.Tensor], kind: str, round_to: int = 1
) -> dict[str, list[tuple[Rank, int]]]:
    """Every candidate rank of each layer with its cost, for the one-rank-step fill."""
    out = {}
    for fqn, method in targets.items():
        module = get_module(model, fqn)
        cands = _grid(method, module, 10**9, round_to)
        if method.name in SPECTRUM_METHODS:  # truncated SVDs: cost a + b·rank
            costs = _costs_linear_in_rank(method, module, cands, example_inputs[fqn])
        else:
            costs = [candidate_cost(method, module, r, example_inputs[fqn]) for r in cands]
        out[fqn] = [(r, getattr(c, kind)) for r, c in zip(cands, costs, strict=True)]
    return out
