"""Rank policies: how one number from the user becomes a rank per layer.

Each policy is its own type, so a rank (an integer) can never be confused with a fraction:
``FixedRank(1)`` and ``ParamFraction(1.0)`` are different things, spelled differently
(``--rank 1`` vs ``--params 1.0``).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from rankdown.errors import RankError
from rankdown.measurement.bench import Cost, module_cost
from rankdown.methods import Method, Rank


def _fraction(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < float(value) <= 1.0:
        raise RankError(f"{name} must be a fraction in (0, 1], got {value!r}")
    return float(value)


@dataclass(frozen=True)
class FixedRank:
    """The same integer rank for every layer (clipped per mode for Tucker-2)."""

    rank: int

    def __post_init__(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise RankError(f"rank must be a positive integer, got {self.rank!r}")

    def describe(self) -> str:
        return f"rank {self.rank}"


@dataclass(frozen=True)
class ParamFraction:
    """Keep at most this fraction of each layer's parameters."""

    fraction: float

    def __post_init__(self) -> None:
        _fraction("params fraction", self.fraction)

    def describe(self) -> str:
        return f"params <= {self.fraction:g} per layer"


@dataclass(frozen=True)
class MacFraction:
    """Keep at most this fraction of each layer's MACs (at the probed input size)."""

    fraction: float

    def __post_init__(self) -> None:
        _fraction("MACs fraction", self.fraction)

    def describe(self) -> str:
        return f"MACs <= {self.fraction:g} per layer"


@dataclass(frozen=True)
class Energy:
    """Smallest rank keeping this share of the squared singular values (per unfolding)."""

    energy: float

    def __post_init__(self) -> None:
        _fraction("energy", self.energy)

    def describe(self) -> str:
        return f"energy >= {self.energy:g}"


@dataclass(frozen=True)
class Evbmf:
    """Ranks from empirical variational Bayes (Nakajima 2013; Kim et al. 2016), optionally
    weakened toward full rank as MUSCO does: rank = full − weakening·(full − EVBMF rank)."""

    weakening: float = 1.0

    def __post_init__(self) -> None:
        if isinstance(self.weakening, bool) or not 0.0 <= float(self.weakening) <= 1.0:
            raise RankError(f"EVBMF weakening must be in [0, 1], got {self.weakening!r}")

    def describe(self) -> str:
        return f"EVBMF (weakening {self.weakening:g})"


@dataclass(frozen=True)
class Choice:
    """A per-layer decision that names its method too (latency-aware plans choose both)."""

    method: str
    rank: Rank


@dataclass(frozen=True)
class LayerRanks:
    """An explicit rank per layer (e.g. from the global allocator); a layer mapped to None or
    absent stays dense."""

    ranks: dict
    source: str = "given"

    def describe(self) -> str:
        return f"per-layer ranks ({self.source})"


RankPolicy = FixedRank | ParamFraction | MacFraction | Energy | Evbmf | LayerRanks


def policy_to_dict(policy: RankPolicy) -> dict:
    if isinstance(policy, LayerRanks):
        return {"layer_ranks": policy.source}
    key = {FixedRank: "rank", ParamFraction: "params", MacFraction: "macs", Energy: "energy", Evbmf: "evbmf"}[
        type(policy)
    ]
    return {key: next(iter(vars(policy).values()))}


# A cost depends on the layer's geometry alone, and the allocators ask for the same (geometry,
# rank) many times: one mixed-method plan of a 15-conv CNN built 4,216 meta modules (7.9 s).
_COSTS: dict[tuple, Cost] = {}
_COSTS_MAX = 1 << 16


def candidate_cost(method: Method, module: nn.Module, rank: Rank, example: torch.Tensor) -> Cost:
    """Cost of the factorized form, built on the meta device (no allocation, no decomposition)."""
    key = (type(method), type(module), module.extra_repr(), repr(rank), tuple(example.shape))
    cost = _COSTS.get(key)
    if cost is None:
        cost = module_cost(method.build(_meta_copy(module), rank), example.to("meta"))
        if len(_COSTS) >= _COSTS_MAX:
            _COSTS.clear()
        _COSTS[key] = cost
    return cost


def _meta_copy(module: nn.Module) -> nn.Module:
    # A shallow stand-in with meta weights so that ``build`` copies geometry but allocates nothing.
    clone = copy.copy(module)
    clone._parameters = {
        k: (None if v is None else nn.Parameter(torch.empty_like(v, device="meta")))
        for k, v in module._parameters.items()
    }
    return clone


def choose_rank(
    method: Method, module: nn.Module, policy: RankPolicy, example: torch.Tensor, dense: Cost, fqn: str = ""
) -> Rank | None:
    """The rank for ``module`` under ``policy``; None when no rank meets a fraction budget.

    ``example`` is one input of this layer (batch 1), as seen by the probe forward pass.
    """
    if isinstance(policy, FixedRank):
        return method.rank_from_int(module, policy.rank)
    if isinstance(policy, LayerRanks):
        value = policy.ranks.get(fqn)
        return value.rank if isinstance(value, Choice) else value
    if isinstance(policy, Energy):
        return method.energy_rank(module, policy.energy)
    if isinstance(policy, Evbmf):
        return method.evbmf_rank(module, policy.weakening)
    budget_attr = "params" if isinstance(policy, ParamFraction) else "macs"
    budget = policy.fraction * getattr(dense, budget_attr)
    cands = list(method.candidates(module))
    # Costs grow with rank: bisect for the largest candidate within budget.
    lo, hi, best = 0, len(cands) - 1, None
    while lo <= hi:
        mid = (lo + hi) // 2
        if getattr(candidate_cost(method, module, cands[mid], example), budget_attr) <= budget:
            best, lo = cands[mid], mid + 1
        else:
            hi = mid - 1
    return best
