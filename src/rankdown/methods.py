"""Method handlers and their registry.

A handler knows, for one method and one layer type: whether a layer can be represented exactly,
its rank space, how to build the factorized module (shapes only, for loading a plan) and how to
factorize a trained layer. Later methods plug in with ``@register`` without touching the core.
"""

from __future__ import annotations

import copy
import math
import weakref
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, NamedTuple

import torch
from torch import nn

from rankdown import decompose
from rankdown.errors import RankError, UnsupportedLayerError
from rankdown.layers import (
    BasisConv2d,
    BiclusterConv2d,
    BiclusterCPConv2d,
    ChannelSVDConv2d,
    CPConv2d,
    FactorChain,
    LowRankLinear,
    MonochromaticConv2d,
    SeparableConv2d,
    TTLinear,
    Tucker2Conv2d,
)
from rankdown.surgery import weight_of


class TuckerRank(NamedTuple):
    """Tucker-2's ranks: of the output mode and of the input mode."""

    out: int
    in_: int


class GroupedRank(NamedTuple):
    """Biclustering's rank: input-channel groups, filter groups, and the rank of each block."""

    groups_in: int
    groups_out: int
    k: int


# A method's rank: an integer, or the NamedTuple the method defines (its fields say what each size
# is; shared code never indexes into one, the method rounds and scales its own).
Rank = int | TuckerRank | GroupedRank


@dataclass
class Factorized:
    module: nn.Module | None  # None when the fit failed (see ``failure``)
    rel_error: float  # ||W - W_hat||_F / ||W||_F of the weight the new module computes
    info: dict[str, Any] = field(default_factory=dict)
    failure: str | None = None  # why the fit must not be used (e.g. a degenerate CP)


def _weakened(full: int, found: int, weakening: float) -> int:
    """MUSCO's weakening: rank = full - w * (full - EVBMF rank); w = 1 is plain EVBMF."""
    return max(1, min(full, round(full - weakening * (full - found))))


def _evbmf(matrix: torch.Tensor, weakening: float) -> int:
    return _weakened(min(matrix.shape), decompose.evbmf(matrix).rank, weakening)


class Method(ABC):
    """One factorization of one layer type."""

    name: ClassVar[str]
    layer_type: ClassVar[type[nn.Module]]
    rank_arity: ClassVar[int] = 1  # 1: an integer rank; n > 1: a tuple of n integers
    rank_type: ClassVar[Callable[..., Rank] | None] = None  # the NamedTuple of a tuple rank

    def check(self, fqn: str, module: nn.Module) -> None:
        """Raise UnsupportedLayerError unless the layer can be represented exactly."""
        if hasattr(module, "parametrizations"):
            raise UnsupportedLayerError(fqn, type(module).__name__, "its weight is parametrized (e.g. weight_norm)")
        if type(module) is not self.layer_type and not computes_as_plain(module, self.layer_type):
            raise UnsupportedLayerError(
                fqn,
                type(module).__name__,
                f"method {self.name!r} handles plain {self.layer_type.__name__} only"
                + (
                    " (this subclass computes something else on a probe input)"
                    if isinstance(module, self.layer_type)
                    else ""
                ),
            )
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor) or isinstance(weight, nn.parameter.UninitializedParameter):
            raise UnsupportedLayerError(fqn, type(module).__name__, "its weight is not initialized")

    @abstractmethod
    def max_rank(self, module: nn.Module) -> int:
        """Largest meaningful integer rank (what ``--rank`` is checked against)."""

    def rank_from_int(self, module: nn.Module, rank: int) -> Rank:
        _check_int_rank(self, module, rank)
        return rank

    def candidates(self, module: nn.Module) -> Sequence[Rank]:
        """Ranks in increasing cost, the last one exact (or, for CP, the last that still saves)."""
        return range(1, self.max_rank(module) + 1)

    @abstractmethod
    def energy_rank(self, module: nn.Module, energy: float) -> Rank: ...

    def evbmf_rank(self, module: nn.Module, weakening: float) -> Rank:
        raise RankError(f"EVBMF ranks are not defined for method {self.name!r}")

    @abstractmethod
    def build(self, module: nn.Module, rank: Rank) -> nn.Module:
        """The factorized module's structure (weights uninitialised), e.g. to load a saved plan."""

    @abstractmethod
    def factorize(self, module: nn.Module, rank: Rank) -> Factorized: ...

    def whitened_fit(self, module: nn.Module, rank: Rank, patch_gram: torch.Tensor) -> FactorChain | None:
        """The fit that minimises the output error under the Gram of the layer's im2col rows, in
        closed form (SVD-LLM's whitening), where the method's module is one rank-r product of the
        unfolded weight; None where it is not (the caller then fits the transformed weight)."""
        return None

    def validate_rank(self, module: nn.Module, rank: Rank) -> None:
        """Raise RankError unless ``rank`` is a rank this method can build for ``module`` (a plan
        is data: its ranks are checked before anything is allocated)."""
        _check_int_rank(self, module, rank)  # type: ignore[arg-type]

    def round_rank(self, module: nn.Module, rank: Rank, multiple: int) -> Rank:
        """``rank`` with every size the hardware sees rounded to a multiple (vector units like
        multiples of 8), still valid for this layer. Defined by the method, so shared code never
        indexes into a tuple."""
        return _round_to(int(rank), multiple, self.max_rank(module))  # type: ignore[arg-type]

    # Plans store ranks as JSON; these keep the representation in one place.
    def rank_to_json(self, rank: Rank) -> Any:
        return list(rank) if isinstance(rank, tuple) else int(rank)

    def rank_from_json(self, value: Any) -> Rank:
        """Strict: integers only (no floats, strings or booleans), as many as the method's rank has."""

        def positive_int(v: Any) -> bool:
            return isinstance(v, int) and not isinstance(v, bool) and v >= 1

        if self.rank_arity == 1:
            if not positive_int(value):
                raise RankError(f"{self.name} rank must be a positive integer, got {value!r}")
            return int(value)
        if not (isinstance(value, list) and len(value) == self.rank_arity and all(positive_int(v) for v in value)):
            raise RankError(f"{self.name} rank must be a list of {self.rank_arity} positive integers, got {value!r}")
        assert self.rank_type is not None, f"{self.name}: a tuple rank needs its rank_type"
        return self.rank_type(*(int(v) for v in value))


_PROBED: weakref.WeakKeyDictionary[nn.Module, tuple[int, bool]] = weakref.WeakKeyDictionary()


def computes_as_plain(module: nn.Module, layer_type: type[nn.Module]) -> bool:
    """Whether a subclass of Conv2d/Linear (ported "same padding" convs, quantization stubs,
    wrappers) computes exactly what the plain layer with its weights computes: probed once on a
    random input (float64), within float rounding. Only then may it be factorized like one."""
    if not isinstance(module, layer_type) or layer_type not in (nn.Conv2d, nn.Linear):
        return False
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or isinstance(weight, nn.parameter.UninitializedParameter):
        return False
    key = weight._version
    cached = _PROBED.get(module)
    if cached is not None and cached[0] == key:
        return cached[1]
    ok = False
    try:
        probe = copy.deepcopy(module).double().eval()
        plain: nn.Module
        if layer_type is nn.Conv2d:
            c = _as_conv(probe)
            geometry: dict[str, Any] = {  # the stubs type these as tuples of any length
                "kernel_size": c.kernel_size,
                "stride": c.stride,
                "padding": c.padding,
                "dilation": c.dilation,
            }
            plain = nn.Conv2d(
                c.in_channels,
                c.out_channels,
                groups=c.groups,
                bias=c.bias is not None,
                padding_mode=c.padding_mode,
                dtype=torch.float64,
                **geometry,
            )
            size = [d * (k - 1) + 1 + 2 * s + 3 for d, k, s in zip(c.dilation, c.kernel_size, c.stride, strict=True)]
            x = torch.randn(2, c.in_channels, *size, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        else:
            lin = _as_linear(probe)
            plain = nn.Linear(lin.in_features, lin.out_features, lin.bias is not None, dtype=torch.float64)
            x = torch.randn(3, lin.in_features, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            weight_of(plain).copy_(weight_of(probe))
            bias, plain_bias = getattr(probe, "bias", None), getattr(plain, "bias", None)
            if isinstance(bias, torch.Tensor) and isinstance(plain_bias, torch.Tensor):
                plain_bias.copy_(bias)
            a, b = probe(x), plain(x)
        ok = isinstance(a, torch.Tensor) and a.shape == b.shape and bool(torch.allclose(a, b, rtol=1e-9, atol=1e-12))
    except Exception:  # a forward that needs other inputs, or fails on a probe: not a plain layer
        ok = False
    _PROBED[module] = (key, ok)
    return ok


METHODS: dict[tuple[str, type[nn.Module]], Method] = {}
# The method a layer type falls back to when the requested one has no handler for it
# (e.g. ``--method tucker2`` factorizes Linear layers by truncated SVD).
DEFAULT_FOR_TYPE: dict[type[nn.Module], str] = {}


def register(cls: type[Method]) -> type[Method]:
    METHODS[(cls.name, cls.layer_type)] = cls()
    DEFAULT_FOR_TYPE.setdefault(cls.layer_type, cls.name)
    return cls


def method_names() -> list[str]:
    return sorted({name for name, _ in METHODS})


def get_method(name: str, layer_type: type[nn.Module]) -> Method:
    try:
        return METHODS[(name, layer_type)]
    except KeyError:
        raise RankError(
            f"unknown method {name!r} for {layer_type.__name__}; known: {', '.join(method_names())}"
        ) from None


def resolve_method(name: str, module: nn.Module) -> Method | None:
    """The handler for ``module`` under the requested method name (with the type's fallback)."""
    if name not in method_names():
        raise RankError(f"unknown method {name!r}; known: {', '.join(method_names())}")
    # isinstance, not type equality: a subclass reaches its handler's check(), which refuses it
    # with the reason, instead of a vague "no method".
    for ltype in type(module).__mro__:
        if (name, ltype) in METHODS:
            return METHODS[(name, ltype)]
        if ltype in DEFAULT_FOR_TYPE:
            return METHODS[(DEFAULT_FOR_TYPE[ltype], ltype)]
    return None


def _as_conv(module: nn.Module) -> nn.Conv2d:
    """A conv method's layer, typed (``check`` has already refused anything else)."""
    if not isinstance(module, nn.Conv2d):
        raise UnsupportedLayerError("layer", type(module).__name__, "this method handles Conv2d only")
    return module


def _as_linear(module: nn.Module) -> nn.Linear:
    if not isinstance(module, nn.Linear):
        raise UnsupportedLayerError("layer", type(module).__name__, "this method handles Linear only")
    return module


def _one(rank: Rank) -> int:
    """An integer method's rank, typed."""
    if not isinstance(rank, int):
        raise RankError(f"expected an integer rank, got {rank!r}")
    return rank


def _tucker(rank: Rank) -> TuckerRank:
    if isinstance(rank, int) or len(rank) != 2:
        raise RankError(f"Tucker-2 ranks must be (r_out, r_in), got {rank!r}")
    return TuckerRank(*rank)


def _grouped(rank: Rank) -> GroupedRank:
    if isinstance(rank, int) or len(rank) != 3:
        raise RankError(f"grouped ranks must be (groups_in, groups_out, k), got {rank!r}")
    return GroupedRank(*rank)


def _rel_error(dense_weight: torch.Tensor, approx: torch.Tensor) -> float:
    w = dense_weight.detach().double()
    denom = float(torch.linalg.vector_norm(w)) or 1.0
    return float(torch.linalg.vector_norm(approx.detach().double() - w)) / denom


def _whitened(module: nn.Module, rank: Rank, patch_gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    w = weight_of(module)
    return decompose.whitened_truncated_svd(w.reshape(w.shape[0], -1), patch_gram, _one(rank))


def _round_to(v: int, multiple: int, top: int) -> int:
    """The nearest multiple of ``multiple`` (at least one multiple, at most ``top``); values below
    one multiple stay as they are."""
    if multiple <= 1 or v < multiple:
        return v
    return min(top, max(multiple, round(v / multiple) * multiple))


def _check_int_rank(method: Method, module: nn.Module, rank: int) -> None:
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise RankError(f"rank must be a positive integer, got {rank!r}")
    if rank > method.max_rank(module):
        raise RankError(f"rank {rank} exceeds the largest rank {method.max_rank(module)} of this layer")


@register
class LinearSVD(Method):
    """Truncated SVD of a Linear weight: two Linear layers through a rank-r bottleneck."""

    name = "svd"
    layer_type = nn.Linear

    def max_rank(self, module: nn.Module) -> int:
        module = _as_linear(module)
        return min(module.weight.shape)

    def energy_rank(self, module: nn.Module, energy: float) -> Rank:
        module = _as_linear(module)
        return decompose.energy_rank(decompose.singular_values(module.weight), energy)

    def evbmf_rank(self, module: nn.Module, weakening: float) -> Rank:
        module = _as_linear(module)
        return _evbmf(module.weight, weakening)

    def build(self, module: nn.Module, rank: Rank) -> nn.Module:
        module = _as_linear(module)
        return LowRankLinear.build(module, _one(rank))

    def factorize(self, module: nn.Module, rank: Rank) -> Factorized:
        module = _as_linear(module)
        a, b = decompose.truncated_svd(module.weight, _one(rank))
        layer = LowRankLinear.from_factors(module, a, b)
        return Factorized(layer, _rel_error(module.weight, layer.reconstruct_weight()))

    def whitened_fit(self, module: nn.Module, rank: Rank, patch_gram: torch.Tensor) -> FactorChain | None:
        module = _as_linear(module)
        return LowRankLinear.from_factors(module, *_whitened(module, rank, patch_gram))


class _ConvMethod(Method):
    layer_type = nn.Conv2d

    def check(self, fqn: str, module: nn.Module) -> None:
        super().check(fqn, module)
        if module.groups != 1:
            raise UnsupportedLayerError(fqn, "Conv2d", f"grouped convolution (groups={module.groups})")


@register
class ChannelSVD(_ConvMethod):
    """k×k conv to r channels then 1×1 conv (SVD of the N × C·kh·kw unfolding)."""

    name = "channel-svd"

    def max_rank(self, module: nn.Module) -> int:
        module = _as_conv(module)
        return min(module.weight.shape[0], module.weight[0].numel())

    def energy_rank(self, module: nn.Module, energy: float) -> Rank:
        module = _as_conv(module)
        w = module.weight
        return decompose.energy_rank(decompose.singular_values(w.reshape(w.shape[0], -1)), energy)

    def evbmf_rank(self, module: nn.Module, weakening: float) -> Rank:
        module = _as_conv(module)
        return _evbmf(module.weight.reshape(module.weight.shape[0], -1), weakening)

    def build(self, module: nn.Module, rank: Rank) -> nn.Module:
        module = _as_conv(module)
        return ChannelSVDConv2d.build(module, _one(rank))

    def factorize(self, module: nn.Module, rank: Rank) -> Factorized:
        module = _as_conv(module)
        w = module.weight
        a, b = decompose.truncated_svd(w.reshape(w.shape[0], -1), _one(rank))
        layer = ChannelSVDConv2d.from_factors(module, a, b)
        return Factorized(layer, _rel_error(w, layer.reconstruct_weight()))

    def whitened_fit(self, module: nn.Module, rank: Rank, patch_gram: torch.Tensor) -> FactorChain | None:
        module = _as_conv(module)
        return ChannelSVDConv2d.from_factors(module, *_whitened(module, rank, patch_gram))


@register
class Tucker2(_ConvMethod):
    """Tucker-2 (HOSVD + HOOI): 1×1 → k×k core → 1×1. Ranks are (r_out, r_in)."""

    name = "tucker2"
    rank_arity = 2
    rank_type = TuckerRank

    def max_rank(self, module: nn.Module) -> int:
        module = _as_conv(module)
        return max(module.out_channels, module.in_channels)

    def validate_rank(self, module: nn.Module, rank: Rank) -> None:
        module = _as_conv(module)
        n, c = module.out_channels, module.in_channels
        if not (isinstance(rank, tuple) and len(rank) == 2 and 1 <= rank[0] <= n and 1 <= rank[1] <= c):
            raise RankError(f"Tucker-2 ranks must be (r_out, r_in) within (1..{n}, 1..{c}), got {rank!r}")

    def round_rank(self, module: nn.Module, rank: Rank, multiple: int) -> Rank:
        module = _as_conv(module)
        r = TuckerRank(*rank)  # type: ignore[misc]
        return TuckerRank(
            _round_to(r.out, multiple, module.out_channels), _round_to(r.in_, multiple, module.in_channels)
        )

    def rank_from_int(self, module: nn.Module, rank: int) -> Rank:
        module = _as_conv(module)
        _check_int_rank(self, module, rank)
        return TuckerRank(min(rank, module.out_channels), min(rank, module.in_channels))

    def candidates(self, module: nn.Module) -> Sequence[Rank]:
        module = _as_conv(module)
        # Both modes shrink in proportion, so one scalar orders the candidates by cost.
        n, c = module.out_channels, module.in_channels
        out: list[Rank] = []
        for r_out in range(1, n + 1):
            r_in = min(c, max(1, round(r_out * c / n)))
            if not out or out[-1] != (r_out, r_in):
                out.append(TuckerRank(r_out, r_in))
        if out[-1] != (n, c):
            out.append(TuckerRank(n, c))
        return out

    def energy_rank(self, module: nn.Module, energy: float) -> Rank:
        module = _as_conv(module)
        w = module.weight
        s_out = decompose.singular_values(w.reshape(w.shape[0], -1))
        s_in = decompose.singular_values(w.transpose(0, 1).reshape(w.shape[1], -1))
        return TuckerRank(decompose.energy_rank(s_out, energy), decompose.energy_rank(s_in, energy))

    def evbmf_rank(self, module: nn.Module, weakening: float) -> Rank:
        """Kim et al. 2016: EVBMF on the output- and input-mode unfoldings."""
        module = _as_conv(module)
        w = module.weight
        return TuckerRank(
            _evbmf(w.reshape(w.shape[0], -1), weakening),
            _evbmf(w.transpose(0, 1).reshape(w.shape[1], -1), weakening),
        )

    def build(self, module: nn.Module, rank: Rank) -> nn.Module:
        module = _as_conv(module)
        return Tucker2Conv2d.build(module, _tucker(rank))

    def factorize(self, module: nn.Module, rank: Rank) -> Factorized:
        module = _as_conv(module)
        f = decompose.tucker2(module.weight, _tucker(rank))
        layer = Tucker2Conv2d.from_factors(module, f.core, f.u_out, f.u_in)
        return Factorized(
            layer, _rel_error(module.weight, layer.reconstruct_weight()), {"hooi_iterations": f.iterations}
        )


def _resolved_padding(fqn: str, module: nn.Conv2d) -> tuple[int, int]:
    if not isinstance(module.padding, str):
        return (module.padding[0], module.padding[1])
    if module.padding == "valid":
        return (0, 0)
    total = [d * (k - 1) for d, k in zip(module.dilation, module.kernel_size, strict=True)]
    if any(t % 2 for t in total) or any(st != 1 for st in module.stride):
        raise UnsupportedLayerError(fqn, "Conv2d", "padding='same' with an even effective kernel pads unevenly")
    return (total[0] // 2, total[1] // 2)


@register
class CP(_ConvMethod):
    """CP (Lebedev 2015): 1×1 → depthwise kh×1 → depthwise 1×kw → 1×1, by damped ALS."""

    name = "cp"

    def check(self, fqn: str, module: nn.Module) -> None:
        super().check(fqn, module)
        _resolved_padding(fqn, _as_conv(module))

    def max_rank(self, module: nn.Module) -> int:
        module = _as_conv(module)
        # Past this rank a CP layer holds more parameters than the dense kernel.
        n, c, kh, kw = module.weight.shape
        return max(1, math.ceil(n * c * kh * kw / (n + c + kh + kw)))

    def energy_rank(self, module: nn.Module, energy: float) -> Rank:
        raise RankError("an energy threshold has no meaning for CP ranks; use --rank, --params or --macs")

    def build(self, module: nn.Module, rank: Rank) -> nn.Module:
        module = _as_conv(module)
        return CPConv2d.build(_with_padding(module), _one(rank))

    def factorize(self, module: nn.Module, rank: Rank) -> Factorized:
        module = _as_conv(module)
        fit = decompose.cp(module.weight, _one(rank))
        if fit.degenerate:  # one retry, damped hard, before giving up
            fit = decompose.cp(module.weight, _one(rank), damping=0.1)
        info = {
            "cp_iterations": fit.iterations,
            "cp_converged": fit.converged,
            "cp_min_congruence": round(fit.min_congruence, 4),
        }
        if fit.degenerate:
            return Factorized(
                None, fit.rel_error, info, f"CP fit degenerated (component congruence {fit.min_congruence:.2f})"
            )
        layer = CPConv2d.from_factors(_with_padding(module), fit.weights, fit.factors)
        return Factorized(layer, _rel_error(module.weight, layer.reconstruct_weight()), info)


def _with_padding(module: nn.Conv2d) -> nn.Conv2d:
    """A shallow copy whose string padding ('same'/'valid') is resolved to numbers."""
    if not isinstance(module.padding, str):
        return module
    clone = copy.copy(module)
    clone.padding = _resolved_padding("", module)
    return clone


@register
class Separable(_ConvMethod):
    """Jaderberg 2014 scheme 2: kh×1 conv to K channels, then 1×kw; closed-form optimum (Tai 2016)."""

    name = "separable"

    def check(self, fqn: str, module: nn.Module) -> None:
        super().check(fqn, module)
        _resolved_padding(fqn, _as_conv(module))

    def max_rank(self, module: nn.Module) -> int:
        module = _as_conv(module)
        return min(decompose.separable_unfolding(module.weight).shape)

    def energy_rank(self, module: nn.Module, energy: float) -> Rank:
        module = _as_conv(module)
        return decompose.energy_rank(decompose.singular_values(decompose.separable_unfolding(module.weight)), energy)

    def evbmf_rank(self, module: nn.Module, weakening: float) -> Rank:
        module = _as_conv(module)
        return _evbmf(decompose.separable_unfolding(module.weight), weakening)

    def build(self, module: nn.Module, rank: Rank) -> nn.Module:
        module = _as_conv(module)
        return SeparableConv2d.build(_with_padding(module), _one(rank))

    def factorize(self, module: nn.Module, rank: Rank) -> Factorized:
        module = _as_conv(module)
        v, h = decompose.separable(module.weight, _one(rank))
        layer = SeparableConv2d.from_factors(_with_padding(module), v, h)
        return Factorized(layer, _rel_error(module.weight, layer.reconstruct_weight()))


@register
class Basis(_ConvMethod):
    """Jaderberg 2014 scheme 1: M rank-1 basis filters shared by all input channels, then a 1×1."""

    name = "basis"

    def check(self, fqn: str, module: nn.Module) -> None:
        super().check(fqn, module)
        _resolved_padding(fqn, _as_conv(module))

    def max_rank(self, module: nn.Module) -> int:
        module = _as_conv(module)
        kh, kw = module.kernel_size
        return kh * kw

    def energy_rank(self, module: nn.Module, energy: float) -> Rank:
        module = _as_conv(module)
        # The energy of the unconstrained basis (SVD of the N·C × kh·kw filter matrix): a lower
        # bound on the M the rank-1 basis needs for that energy.
        w = module.weight
        return decompose.energy_rank(decompose.singular_values(w.reshape(-1, w[0, 0].numel())), energy)

    def build(self, module: nn.Module, rank: Rank) -> nn.Module:
        module = _as_conv(module)
        return BasisConv2d.build(_with_padding(module), _one(rank))

    def factorize(self, module: nn.Module, rank: Rank) -> Factorized:
        module = _as_conv(module)
        f = decompose.basis_filters(module.weight, _one(rank))
        layer = BasisConv2d.from_factors(_with_padding(module), f.coeffs, f.vertical, f.horizontal)
        return Factorized(layer, _rel_error(module.weight, layer.reconstruct_weight()), {"iterations": f.iterations})


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@register
class MonochromaticMethod(_ConvMethod):
    """Denton 2014 monochromatic (for first layers with few input channels): rank = number of
    shared colour vectors C', which must divide the number of filters."""

    name = "mono"

    def max_rank(self, module: nn.Module) -> int:
        module = _as_conv(module)
        return module.out_channels

    def validate_rank(self, module: nn.Module, rank: Rank) -> None:
        module = _as_conv(module)
        self.rank_from_int(module, rank)  # type: ignore[arg-type]

    def round_rank(self, module: nn.Module, rank: Rank, multiple: int) -> Rank:
        return rank  # a number of colours must divide the filters: not rounded

    def rank_from_int(self, module: nn.Module, rank: int) -> Rank:
        module = _as_conv(module)
        _check_int_rank(self, module, rank)
        if module.out_channels % rank:
            raise RankError(
                f"monochromatic colours must divide the {module.out_channels} filters "
                f"(balanced clusters); choose one of {_divisors(module.out_channels)}"
            )
        return rank

    def candidates(self, module: nn.Module) -> Sequence[Rank]:
        module = _as_conv(module)
        return _divisors(module.out_channels)

    def energy_rank(self, module: nn.Module, energy: float) -> Rank:
        raise RankError("an energy threshold has no meaning for monochromatic colours; use --rank")

    def build(self, module: nn.Module, rank: Rank) -> nn.Module:
        module = _as_conv(module)
        return MonochromaticConv2d.build(module, _one(rank))

    def factorize(self, module: nn.Module, rank: Rank) -> Factorized:
        module = _as_conv(module)
        m = decompose.monochromatic(module.weight, _one(rank))
        layer = MonochromaticConv2d.from_factors(module, m.colours, m.spatial, m.order)
        return Factorized(layer, _rel_error(module.weight, layer.reconstruct_weight()))


@register
class Bicluster(_ConvMethod):
    """Denton 2014 biclustering + SVD: rank (G, H, K) = input groups, filter groups, rank per block.
    An integer rank K uses G = H = 2 where the channel counts allow (else 1)."""

    name = "bicluster"
    rank_arity = 3
    rank_type = GroupedRank

    def _groups(self, module: nn.Module) -> tuple[int, int]:
        module = _as_conv(module)
        return (2 if module.in_channels % 2 == 0 else 1, 2 if module.out_channels % 2 == 0 else 1)

    def _block_max(self, module: nn.Module, g: int, h: int) -> int:
        module = _as_conv(module)
        kh, kw = module.kernel_size
        return min(module.out_channels // h, module.in_channels // g * kh * kw)

    def max_rank(self, module: nn.Module) -> int:
        module = _as_conv(module)
        return self._block_max(module, *self._groups(module))

    def rank_from_int(self, module: nn.Module, rank: int) -> Rank:
        module = _as_conv(module)
        _check_int_rank(self, module, rank)
        return GroupedRank(*self._groups(module), rank)

    def validate_rank(self, module: nn.Module, rank: Rank) -> None:
        module = _as_conv(module)
        if not (isinstance(rank, tuple) and len(rank) == 3):
            raise RankError(f"{self.name} rank must be (groups_in, groups_out, k), got {rank!r}")
        g, h, k = rank
        if module.in_channels % g or module.out_channels % h:
            raise RankError(
                f"{self.name} groups ({g}, {h}) must divide the channels ({module.in_channels}, {module.out_channels})"
            )
        if not 1 <= k <= self._block_max(module, g, h):
            raise RankError(
                f"{self.name} rank {k} must be in [1, {self._block_max(module, g, h)}] for groups ({g}, {h})"
            )

    def round_rank(self, module: nn.Module, rank: Rank, multiple: int) -> Rank:
        module = _as_conv(module)
        r = GroupedRank(*rank)  # type: ignore[misc]
        return r._replace(k=_round_to(r.k, multiple, self._block_max(module, r.groups_in, r.groups_out)))

    def candidates(self, module: nn.Module) -> Sequence[Rank]:
        module = _as_conv(module)
        g, h = self._groups(module)
        return [GroupedRank(g, h, k) for k in range(1, self._block_max(module, g, h) + 1)]

    def energy_rank(self, module: nn.Module, energy: float) -> Rank:
        raise RankError("an energy threshold is not implemented for biclustered ranks; use --rank, --params or --macs")

    def build(self, module: nn.Module, rank: Rank) -> nn.Module:
        module = _as_conv(module)
        return BiclusterConv2d.build(module, _grouped(rank))

    def factorize(self, module: nn.Module, rank: Rank) -> Factorized:
        module = _as_conv(module)
        self.validate_rank(module, rank)
        g, h, k = _grouped(rank)
        layer = self._fit(module, g, h, k)
        return Factorized(layer, _rel_error(module.weight, layer.reconstruct_weight()), {"groups": [g, h]})

    def _fit(self, module: nn.Module, g: int, h: int, k: int) -> FactorChain:
        module = _as_conv(module)
        return BiclusterConv2d.from_factors(module, decompose.biclustered(module.weight, g, h, k))


@register
class BiclusterCP(Bicluster):
    """Denton 2014 biclustering + outer products: rank (G, H, K), K rank-1 (channel ⊗ spatial ⊗
    filter) terms per block. Cheaper per term than the SVD variant (a depthwise k×k instead of a
    full k×k over C/G channels), so more terms fit the same MACs."""

    name = "bicluster-cp"

    def _block_max(self, module: nn.Module, g: int, h: int) -> int:
        module = _as_conv(module)
        kh, kw = module.kernel_size
        return module.in_channels // g * kh * kw  # where the CP is exact by construction

    def build(self, module: nn.Module, rank: Rank) -> nn.Module:
        module = _as_conv(module)
        return BiclusterCPConv2d.build(module, _grouped(rank))

    def _fit(self, module: nn.Module, g: int, h: int, k: int) -> FactorChain:
        module = _as_conv(module)
        return BiclusterCPConv2d.from_factors(module, decompose.biclustered_cp(module.weight, g, h, k))


@register
class TensorTrain(Method):
    """Tensor-train matrix (Novikov 2015) for Linear, by TT-SVD; the rank caps every TT rank."""

    name = "tt"
    layer_type = nn.Linear
    n_modes = 3

    def modes(self, module: nn.Module) -> tuple[tuple[int, ...], tuple[int, ...]]:
        module = _as_linear(module)
        return (
            decompose.factorize_dim(module.out_features, self.n_modes),
            decompose.factorize_dim(module.in_features, self.n_modes),
        )

    def max_rank(self, module: nn.Module) -> int:
        module = _as_linear(module)
        return max(decompose.tt_full_ranks(*self.modes(module)))

    def energy_rank(self, module: nn.Module, energy: float) -> Rank:
        raise RankError("an energy threshold is not implemented for TT ranks; use --rank, --params or --macs")

    def _ranks(self, module: nn.Module, rank: int) -> tuple[int, ...]:
        module = _as_linear(module)
        return (1, *(min(rank, f) for f in decompose.tt_full_ranks(*self.modes(module))))

    def build(self, module: nn.Module, rank: Rank) -> TTLinear:
        module = _as_linear(module)
        out_modes, in_modes = self.modes(module)
        return TTLinear(
            module.in_features,
            module.out_features,
            out_modes,
            in_modes,
            self._ranks(module, _one(rank)),
            module.bias is not None,
            device=module.weight.device,
            dtype=module.weight.dtype,
        )

    def factorize(self, module: nn.Module, rank: Rank) -> Factorized:
        module = _as_linear(module)
        out_modes, in_modes = self.modes(module)
        tt = decompose.tt_matrix(module.weight, out_modes, in_modes, _one(rank))
        layer = self.build(module, rank)
        with torch.no_grad():
            for dst, src in zip(layer.cores, tt.cores, strict=True):
                dst.copy_(src)
            if module.bias is not None and layer.bias is not None:
                layer.bias.copy_(module.bias)
        return Factorized(layer, _rel_error(module.weight, layer.reconstruct_weight()), {"tt_ranks": list(tt.ranks)})
