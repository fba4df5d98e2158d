"""Factorized layers made only of stock ``nn.Conv2d`` / ``nn.Linear`` inside an ``nn.Sequential``,
so that they export (TorchScript, ONNX, torch.compile) and run on the stock fast kernels.

Each class has ``build`` (shapes only, for loading a saved plan), ``from_factors`` (weights from
``rankdown.decompose``) and ``reconstruct_weight`` (the dense weight the chain computes), and keeps
the :class:`FactorizedLayer` protocol, through which fitting, metrics and reconstruction talk to
every method's module without branching on its class.
"""

from __future__ import annotations

import itertools
from typing import Any, ClassVar, TypeVar, overload

import torch
from torch import nn


class FactorizedLayer(nn.Module):
    """What the data-aware steps ask of a factorized module. A new method's module subclasses
    :class:`FactorChain` (a chain of stock layers) and overrides only what differs; the defaults
    say "not available", so a step that needs more refuses the method rather than guessing."""

    # Whether :meth:`undo_metric` is defined: a fit of the metric-weighted weight can be turned back
    # into a fit of the plain weight (Denton's Mahalanobis, SVD-LLM's whitening, ASVD's scaling).
    weighted_metrics: ClassVar[bool] = False

    def reconstruct_weight(self) -> torch.Tensor:
        raise NotImplementedError

    def input_factor(self) -> nn.Conv2d | nn.Linear:
        """The factor that mixes the input channels (where an input metric is undone)."""
        raise NotImplementedError(type(self).__name__)

    def output_factor(self) -> nn.Conv2d | nn.Linear:
        """The factor that writes the outputs (and holds the bias)."""
        raise NotImplementedError(type(self).__name__)

    def closed_form(self, dense: nn.Module) -> bool:
        """Whether the module is one rank-r product ``output_factor ∘ input_factor`` computing the
        dense layer's matmul on its im2col rows, so that data reconstruction has a closed form (the
        whitened SVD of the least-squares map)."""
        return False

    def last_factor(self) -> tuple[nn.Module, nn.Conv2d | nn.Linear] | None:
        """(head, last) with ``last(head(x)) == self(x)`` and ``last`` one plain matmul on its
        im2col rows, so that the output is linear in its weight (least squares); None when the
        module ends in anything else."""
        return None

    def undo_metric(self, t_in: torch.Tensor | None, d_out: torch.Tensor | None) -> None:
        """Turn a fit of diag(d_out) · W ×_in t_inᵀ into a fit of W, in place."""
        raise NotImplementedError(f"weighted metrics are not implemented for {type(self).__name__}")

    def balance(self) -> int:
        """Equalise the scale of the factors without changing the function; returns how many
        factor pairs (or groups) were balanced."""
        return 0

    def macs_per_position(self) -> int | None:
        """MACs per output position (per vector of the last dimension) for modules whose cost the
        stock layers' hooks cannot count; None for chains of stock layers."""
        return None


def plain_matmul(layer: nn.Module | None) -> bool:
    """A conv or linear whose output is one im2col matmul with its weight (zero padding, ungrouped)."""
    if not isinstance(layer, (nn.Conv2d, nn.Linear)) or getattr(layer, "groups", 1) != 1:
        return False
    return not (isinstance(layer, nn.Conv2d) and (layer.padding_mode != "zeros" or isinstance(layer.padding, str)))


class FactorChain(nn.Sequential, FactorizedLayer):
    """A factorized module that is a chain of stock layers: the first mixes the input channels,
    the last writes the outputs."""

    weighted_metrics = True

    # Typed, checked views of the chain's parts (an nn.Sequential's items are plain Modules).
    def conv(self, i: int) -> nn.Conv2d:
        return _part(self[i], nn.Conv2d)

    def linear(self, i: int) -> nn.Linear:
        return _part(self[i], nn.Linear)

    def permute(self, i: int) -> Permute:
        return _part(self[i], Permute)

    def input_factor(self) -> nn.Conv2d | nn.Linear:
        return _part(self[0], (nn.Conv2d, nn.Linear))

    def output_factor(self) -> nn.Conv2d | nn.Linear:
        return _part(self[-1], (nn.Conv2d, nn.Linear))

    def last_factor(self) -> tuple[nn.Module, nn.Conv2d | nn.Linear] | None:
        if len(self) < 2 or not plain_matmul(self[-1]):
            return None
        return self[:-1], self.output_factor()

    @torch.no_grad()
    def undo_metric(self, t_in: torch.Tensor | None, d_out: torch.Tensor | None) -> None:
        if t_in is not None:
            first = self.input_factor()
            w = torch.einsum("rc...,cd->rd...", first.weight.detach().double(), torch.linalg.inv(t_in.double()))
            first.weight.copy_(w.to(first.weight.dtype))
        if d_out is not None:
            _divide_rows(self.output_factor().weight, d_out)

    @torch.no_grad()
    def balance(self) -> int:
        return _balance_pairs(self)


_M = TypeVar("_M", bound=nn.Module)


@overload
def _part(module: nn.Module, kind: type[_M]) -> _M: ...
@overload
def _part(module: nn.Module, kind: tuple[type[nn.Conv2d], type[nn.Linear]]) -> nn.Conv2d | nn.Linear: ...
def _part(module: nn.Module, kind: Any) -> Any:
    if not isinstance(module, kind):
        raise TypeError(f"expected {kind} in the chain, found {type(module).__name__}")
    return module


def _pair(size: tuple[int, ...]) -> tuple[int, int]:
    """A conv's kernel size as the pair it is (the stubs type it as a tuple of any length)."""
    return (size[0], size[1])


def _bias(layer: nn.Conv2d | nn.Linear) -> torch.Tensor:
    if layer.bias is None:
        raise TypeError("the chain's last factor has no bias")
    return layer.bias


def _divide_rows(weight: torch.Tensor, d: torch.Tensor) -> None:
    w = weight.detach().double() / d.double().view(-1, *([1] * (weight.ndim - 1)))
    weight.copy_(w.to(weight.dtype))


class LowRankLinear(FactorChain):
    """``Linear(in, r, bias=False) → Linear(r, out)``: y = A (B x) + b."""

    @classmethod
    def build(cls, dense: nn.Linear, rank: int) -> LowRankLinear:
        kw = {"device": dense.weight.device, "dtype": dense.weight.dtype}
        return cls(
            nn.Linear(dense.in_features, rank, bias=False, **kw),
            nn.Linear(rank, dense.out_features, bias=dense.bias is not None, **kw),
        )

    @classmethod
    def from_factors(cls, dense: nn.Linear, a: torch.Tensor, b: torch.Tensor) -> LowRankLinear:
        layer = cls.build(dense, a.shape[1])
        with torch.no_grad():
            layer.linear(0).weight.copy_(b)
            layer.linear(1).weight.copy_(a)
            if dense.bias is not None:
                _bias(layer.linear(1)).copy_(dense.bias)
        return layer

    @property
    def rank(self) -> int:
        return self.linear(0).out_features

    def closed_form(self, dense: nn.Module) -> bool:
        return True

    def reconstruct_weight(self) -> torch.Tensor:
        return self.linear(1).weight @ self.linear(0).weight


def _conv_kwargs(dense: nn.Conv2d) -> dict[str, Any]:
    return {
        "stride": dense.stride,
        "padding": dense.padding,
        "dilation": dense.dilation,
        "padding_mode": dense.padding_mode,
        "device": dense.weight.device,
        "dtype": dense.weight.dtype,
    }


def _pointwise(cin: int, cout: int, bias: bool, like: nn.Conv2d) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 1, bias=bias, device=like.weight.device, dtype=like.weight.dtype)


class ChannelSVDConv2d(FactorChain):
    """``k×k conv C→r`` (original stride, padding, dilation, padding mode) then ``1×1 conv r→N``.

    The SVD of the kernel unfolded as N × (C·kh·kw): the spatial work happens once, at rank r.
    """

    @classmethod
    def build(cls, dense: nn.Conv2d, rank: int) -> ChannelSVDConv2d:
        first = nn.Conv2d(dense.in_channels, rank, _pair(dense.kernel_size), bias=False, **_conv_kwargs(dense))
        return cls(first, _pointwise(rank, dense.out_channels, dense.bias is not None, dense))

    @classmethod
    def from_factors(cls, dense: nn.Conv2d, a: torch.Tensor, b: torch.Tensor) -> ChannelSVDConv2d:
        layer = cls.build(dense, a.shape[1])
        with torch.no_grad():
            layer.conv(0).weight.copy_(b.reshape(layer.conv(0).weight.shape))
            layer.conv(1).weight.copy_(a[:, :, None, None])
            if dense.bias is not None:
                _bias(layer.conv(1)).copy_(dense.bias)
        return layer

    @property
    def rank(self) -> int:
        return self.conv(0).out_channels

    def closed_form(self, dense: nn.Module) -> bool:
        return plain_matmul(dense)  # the first factor pads as the dense layer does: zeros only

    def reconstruct_weight(self) -> torch.Tensor:
        a = self.conv(1).weight[:, :, 0, 0]
        return torch.einsum("nr,rcij->ncij", a, self.conv(0).weight)


class Tucker2Conv2d(FactorChain):
    """``1×1 conv C→r_in`` → ``k×k core r_in→r_out`` (original geometry) → ``1×1 conv r_out→N``.

    Padding commutes with the first 1×1 projection (it has no bias, and reflect/replicate/circular
    padding copy pixels), so every padding mode is carried exactly by the core.
    """

    @classmethod
    def build(cls, dense: nn.Conv2d, ranks: tuple[int, int]) -> Tucker2Conv2d:
        r_out, r_in = ranks
        first = _pointwise(dense.in_channels, r_in, False, dense)
        core = nn.Conv2d(r_in, r_out, _pair(dense.kernel_size), bias=False, **_conv_kwargs(dense))
        last = _pointwise(r_out, dense.out_channels, dense.bias is not None, dense)
        return cls(first, core, last)

    @classmethod
    def from_factors(
        cls, dense: nn.Conv2d, core: torch.Tensor, u_out: torch.Tensor, u_in: torch.Tensor
    ) -> Tucker2Conv2d:
        layer = cls.build(dense, (u_out.shape[1], u_in.shape[1]))
        with torch.no_grad():
            layer.conv(0).weight.copy_(u_in.T[:, :, None, None])
            layer.conv(1).weight.copy_(core)
            layer.conv(2).weight.copy_(u_out[:, :, None, None])
            if dense.bias is not None:
                _bias(layer.conv(2)).copy_(dense.bias)
        return layer

    @property
    def rank(self) -> tuple[int, int]:
        return (self.conv(1).out_channels, self.conv(1).in_channels)

    def reconstruct_weight(self) -> torch.Tensor:
        return torch.einsum(
            "abij,na,bc->ncij", self.conv(1).weight, self.conv(2).weight[:, :, 0, 0], self.conv(0).weight[:, :, 0, 0]
        )


def _axis_convs(
    dense: nn.Conv2d, c_in: int, c_mid: int, c_out: int, *, groups: int | tuple[int, int] = 1, bias: bool = False
) -> tuple[nn.Conv2d, nn.Conv2d]:
    """The kh×1 and 1×kw convs that split ``dense``'s geometry by axis, vertical first: stride,
    padding and dilation go to the axis they act on. Reflect, replicate and circular padding are
    separable by axis too, so every padding mode is carried exactly. (One home for CP and scheme 2.)"""
    if isinstance(dense.padding, str):
        raise ValueError("string padding ('same'/'valid') must be resolved before splitting a conv by axis")
    kw: dict[str, Any] = {
        "device": dense.weight.device,
        "dtype": dense.weight.dtype,
        "padding_mode": dense.padding_mode,
    }
    (kh, kw_), (sh, sw), (dh, dw), (ph, pw) = dense.kernel_size, dense.stride, dense.dilation, dense.padding
    g_v, g_h = groups if isinstance(groups, tuple) else (groups, groups)
    vert = nn.Conv2d(
        c_in, c_mid, (kh, 1), stride=(sh, 1), padding=(ph, 0), dilation=(dh, 1), groups=g_v, bias=False, **kw
    )
    horz = nn.Conv2d(
        c_mid, c_out, (1, kw_), stride=(1, sw), padding=(0, pw), dilation=(1, dw), groups=g_h, bias=bias, **kw
    )
    return vert, horz


class CPConv2d(FactorChain):
    """CP (Lebedev et al.): ``1×1 C→R`` → depthwise ``kh×1`` → depthwise ``1×kw`` → ``1×1 R→N``.

    Stride, padding and dilation split by axis between the two depthwise convs; reflect, replicate
    and circular padding are separable by axis, so every padding mode is carried exactly.
    """

    @classmethod
    def build(cls, dense: nn.Conv2d, rank: int) -> CPConv2d:
        first = _pointwise(dense.in_channels, rank, False, dense)
        vert, horz = _axis_convs(dense, rank, rank, rank, groups=rank, bias=False)
        last = _pointwise(rank, dense.out_channels, dense.bias is not None, dense)
        return cls(first, vert, horz, last)

    @classmethod
    def from_factors(cls, dense: nn.Conv2d, weights: torch.Tensor, factors: tuple[torch.Tensor, ...]) -> CPConv2d:
        a, b, c, d = factors  # (N,R), (C,R), (kh,R), (kw,R)
        layer = cls.build(dense, weights.numel())
        with torch.no_grad():
            layer.conv(0).weight.copy_(b.T[:, :, None, None])
            layer.conv(1).weight.copy_(c.T[:, None, :, None])
            layer.conv(2).weight.copy_((d * weights).T[:, None, None, :])
            layer.conv(3).weight.copy_(a[:, :, None, None])
            if dense.bias is not None:
                _bias(layer.conv(3)).copy_(dense.bias)
        return layer

    @property
    def rank(self) -> int:
        return self.conv(0).out_channels

    def reconstruct_weight(self) -> torch.Tensor:
        a, b = self.conv(3).weight[:, :, 0, 0], self.conv(0).weight[:, :, 0, 0]
        c, d = self.conv(1).weight[:, 0, :, 0], self.conv(2).weight[:, 0, 0, :]
        return torch.einsum("nr,rc,ri,rj->ncij", a, b, c, d)


class TTLinear(FactorizedLayer):
    """A Linear layer whose weight is a tensor-train matrix (Novikov et al.), applied core by core.

    Not a chain of stock layers: the contraction has no stock-module equivalent. It declares its
    own MAC count (``macs_per_position``) for rankdown.measurement.bench.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        out_modes: tuple[int, ...],
        in_modes: tuple[int, ...],
        ranks: tuple[int, ...],
        bias: bool,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.out_modes, self.in_modes = tuple(out_modes), tuple(in_modes)
        full_ranks = (*ranks, 1)
        self.cores = nn.ParameterList(
            nn.Parameter(torch.empty(full_ranks[k], m, n, full_ranks[k + 1], device=device, dtype=dtype))
            for k, (m, n) in enumerate(zip(out_modes, in_modes, strict=True))
        )
        self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype)) if bias else None

    @property
    def ranks(self) -> tuple[int, ...]:
        return tuple(int(c.shape[0]) for c in self.cores)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        b = x.reshape(-1, self.in_features).shape[0]
        state = x.reshape(b, 1, 1, self.in_features)  # (batch, outputs so far, rank, inputs left)
        for core in self.cores:
            r, m, n, s = core.shape
            o, rest = state.shape[1], state.shape[3] // n
            state = torch.einsum("bornq,rmns->bomsq", state.reshape(b, o, r, n, rest), core)
            state = state.reshape(b, o * m, s, rest)
        y = state.reshape(*lead, self.out_features)
        return y if self.bias is None else y + self.bias

    def macs_per_position(self) -> int:
        total, o, rest = 0, 1, self.in_features
        for core in self.cores:
            r, m, n, s = core.shape
            rest //= n
            total += o * r * n * rest * m * s
            o *= m
        return total

    def reconstruct_weight(self) -> torch.Tensor:
        from rankdown.decompose.tt import TTMatrix

        return TTMatrix(tuple(c for c in self.cores), self.out_modes, self.in_modes).to_matrix()

    def extra_repr(self) -> str:
        return f"{self.in_features} -> {self.out_features}, modes {self.out_modes}x{self.in_modes}, ranks {self.ranks}"


class SeparableConv2d(FactorChain):
    """Jaderberg et al. 2014 scheme 2: vertical ``kh×1`` conv C→K, then horizontal ``1×kw`` conv K→N.

    Stride, padding and dilation split by axis (vertical part first); every padding mode is
    separable by axis, so it is carried exactly. With ``batch_norm`` (low-rank training from
    scratch, Tai et al. 2016) a BatchNorm2d sits between the two convs.
    """

    @classmethod
    def build(cls, dense: nn.Conv2d, rank: int, batch_norm: bool = False) -> SeparableConv2d:
        vert, horz = _axis_convs(dense, dense.in_channels, rank, dense.out_channels, bias=dense.bias is not None)
        mid = [nn.BatchNorm2d(rank, device=dense.weight.device, dtype=dense.weight.dtype)] if batch_norm else []
        return cls(vert, *mid, horz)

    @classmethod
    def from_factors(cls, dense: nn.Conv2d, vertical: torch.Tensor, horizontal: torch.Tensor) -> SeparableConv2d:
        layer = cls.build(dense, vertical.shape[0])
        with torch.no_grad():
            layer.conv(0).weight.copy_(vertical)
            layer.conv(-1).weight.copy_(horizontal)
            if dense.bias is not None:
                _bias(layer.conv(-1)).copy_(dense.bias)
        return layer

    @property
    def rank(self) -> int:
        return self.conv(0).out_channels

    def reconstruct_weight(self) -> torch.Tensor:
        v, h = self.conv(0).weight[:, :, :, 0], self.conv(-1).weight[:, :, 0, :]  # (K, C, kh), (N, K, kw)
        return torch.einsum("kci,nkj->ncij", v, h)


class BasisConv2d(FactorChain):
    """Jaderberg et al. 2014 scheme 1: every input channel filtered by the same M separable basis
    filters (depthwise ``kh×1`` C→C·M, then depthwise ``1×kw``), then a ``1×1`` conv C·M→N.

    Stock grouped convs hold one copy of the basis per input channel (C·M·(kh+kw) weights, small
    beside the 1×1): that keeps the module exportable, and fine-tuning may then untie the copies.
    """

    @classmethod
    def build(cls, dense: nn.Conv2d, m: int) -> BasisConv2d:
        c = dense.in_channels
        vert, horz = _axis_convs(dense, c, c * m, c * m, groups=(c, c * m), bias=False)
        return cls(vert, horz, _pointwise(c * m, dense.out_channels, dense.bias is not None, dense))

    @classmethod
    def from_factors(
        cls, dense: nn.Conv2d, coeffs: torch.Tensor, vertical: torch.Tensor, horizontal: torch.Tensor
    ) -> BasisConv2d:
        """``coeffs`` (N, C, M), ``vertical`` (M, kh), ``horizontal`` (M, kw)."""
        n, c, m = coeffs.shape
        layer = cls.build(dense, m)
        with torch.no_grad():
            layer.conv(0).weight.copy_(vertical.repeat(c, 1)[:, None, :, None])
            layer.conv(1).weight.copy_(horizontal.repeat(c, 1)[:, None, None, :])
            layer.conv(2).weight.copy_(coeffs.reshape(n, c * m)[:, :, None, None])
            if dense.bias is not None:
                _bias(layer.conv(2)).copy_(dense.bias)
        return layer

    @property
    def rank(self) -> int:
        return self.conv(0).out_channels // self.conv(0).in_channels

    def input_factor(self) -> nn.Conv2d | nn.Linear:
        return self.conv(2)  # the depthwise basis keeps channels apart; the 1×1 mixes them

    @torch.no_grad()
    def undo_metric(self, t_in: torch.Tensor | None, d_out: torch.Tensor | None) -> None:
        if t_in is not None:  # the 1×1 reads channel c of each (c, m) pair
            w = self.conv(2).weight.detach().double()
            n, cm = w.shape[:2]
            c = t_in.shape[0]
            inv = torch.linalg.inv(t_in.double())
            w = torch.einsum("ncm,cd->ndm", w.reshape(n, c, cm // c), inv).reshape(w.shape)
            self.conv(2).weight.copy_(w.to(self.conv(2).weight.dtype))
        if d_out is not None:
            _divide_rows(self.conv(2).weight, d_out)

    def reconstruct_weight(self) -> torch.Tensor:
        c, m = self.conv(0).in_channels, self.rank
        v = self.conv(0).weight[:, 0, :, 0].reshape(c, m, -1)
        h = self.conv(1).weight[:, 0, 0, :].reshape(c, m, -1)
        a = self.conv(2).weight[:, :, 0, 0].reshape(-1, c, m)
        return torch.einsum("ncm,cmi,cmj->ncij", a, v, h)


class Permute(nn.Module):
    """Channel gather ``x[:, index]``. The index is a buffer, so it travels in the state dict."""

    index: torch.Tensor

    def __init__(self, channels: int, device=None) -> None:
        super().__init__()
        self.register_buffer("index", torch.arange(channels, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.index_select(1, self.index)


class MonochromaticConv2d(FactorChain):
    """Denton et al. 2014: ``1×1 C→C'`` colour transform, a grouped spatial conv (one colour
    channel per group of F/C' filters), and the gather that restores the filter order."""

    weighted_metrics = False  # the colour clusters are fitted on the plain weight

    @classmethod
    def build(cls, dense: nn.Conv2d, n_colours: int) -> MonochromaticConv2d:
        f = dense.out_channels
        colour = _pointwise(dense.in_channels, n_colours, False, dense)
        spatial = nn.Conv2d(
            n_colours, f, _pair(dense.kernel_size), groups=n_colours, bias=dense.bias is not None, **_conv_kwargs(dense)
        )
        return cls(colour, spatial, Permute(f, device=dense.weight.device))

    @classmethod
    def from_factors(cls, dense: nn.Conv2d, colours: torch.Tensor, spatial: torch.Tensor, order: torch.Tensor):
        layer = cls.build(dense, colours.shape[0])
        with torch.no_grad():
            layer.conv(0).weight.copy_(colours[:, :, None, None])
            layer.conv(1).weight.copy_(spatial[:, None])
            if dense.bias is not None:
                _bias(layer.conv(1)).copy_(dense.bias[order])
            layer.permute(2).index.copy_(torch.argsort(order))
        return layer

    @property
    def rank(self) -> int:
        return self.conv(0).out_channels

    def reconstruct_weight(self) -> torch.Tensor:
        k, f = self.rank, self.conv(1).out_channels
        cluster = torch.arange(f, device=self.conv(0).weight.device) // (f // k)
        w = torch.einsum("fc,fxy->fcxy", self.conv(0).weight[:, :, 0, 0][cluster], self.conv(1).weight[:, 0])
        return w.index_select(0, self.permute(2).index)


class _Clustered(FactorChain):
    """Chains that gather channels into groups first and back into order last (biclustering)."""

    def last_factor(self) -> tuple[nn.Module, nn.Conv2d | nn.Linear] | None:
        return None  # the last module is the gather

    @torch.no_grad()
    def undo_metric(self, t_in: torch.Tensor | None, d_out: torch.Tensor | None) -> None:
        """Groups survive only a diagonal input transform (a full one mixes channels across groups)."""
        if t_in is not None:
            t = t_in.double()
            if not torch.equal(t, torch.diag(t.diagonal())):
                raise NotImplementedError("biclustering keeps its groups only under a diagonal metric: use mahalanobis")
            scale = t.diagonal()[self.permute(0).index]  # input channels in grouped order
            g = self.conv(1).groups
            w = self.conv(1).weight.detach().double()
            w = w.reshape(g, -1, *w.shape[1:]) / scale.reshape(g, -1)[:, None, :, None, None]
            self.conv(1).weight.copy_(w.reshape(self.conv(1).weight.shape).to(self.conv(1).weight.dtype))
        if d_out is not None:
            order = torch.argsort(self.permute(-1).index)  # filter at each grouped position
            _divide_rows(self.conv(-2).weight, d_out.double()[order])


class BiclusterConv2d(_Clustered):
    """Denton et al. 2014 biclustering: input channels in G groups, filters in H groups, each of
    the G·H blocks a rank-K (k×k conv → 1×1) pair. Runs as: gather inputs into groups → grouped
    k×k conv (G groups) → channel shuffle → grouped 1×1 (H groups) → gather filters back."""

    @classmethod
    def build(cls, dense: nn.Conv2d, rank: tuple[int, int, int]) -> BiclusterConv2d:
        g, h, k = rank
        c, f = dense.in_channels, dense.out_channels
        first = nn.Conv2d(c, g * h * k, _pair(dense.kernel_size), groups=g, bias=False, **_conv_kwargs(dense))
        second = nn.Conv2d(
            g * h * k, f, 1, groups=h, bias=dense.bias is not None, device=dense.weight.device, dtype=dense.weight.dtype
        )
        dev = dense.weight.device
        return cls(Permute(c, device=dev), first, nn.ChannelShuffle(g), second, Permute(f, device=dev))

    @classmethod
    def from_factors(cls, dense: nn.Conv2d, bc) -> BiclusterConv2d:
        """``bc``: a :class:`rankdown.decompose.Biclustered`."""
        g, h, k = bc.first.shape[:3]
        layer = cls.build(dense, (g, h, k))
        with torch.no_grad():
            layer.permute(0).index.copy_(bc.in_order)
            layer.conv(1).weight.copy_(bc.first.reshape(layer.conv(1).weight.shape))
            layer.conv(3).weight.copy_(bc.second.permute(0, 1, 3, 2).reshape(layer.conv(3).weight.shape))
            if dense.bias is not None:
                _bias(layer.conv(3)).copy_(dense.bias[bc.out_order])
            layer.permute(4).index.copy_(torch.argsort(bc.out_order))
        return layer

    @property
    def rank(self) -> tuple[int, int, int]:
        g, h = self.conv(1).groups, self.conv(3).groups
        return (g, h, self.conv(1).out_channels // (g * h))

    def reconstruct_weight(self) -> torch.Tensor:
        g, h, k = self.rank
        f = self.conv(3).out_channels
        cg = self.conv(1).in_channels // g
        first = self.conv(1).weight.reshape(g, h, k, cg, *self.conv(1).kernel_size)
        second = self.conv(3).weight.reshape(h, f // h, k, g)
        block = torch.einsum("hfkg,ghkcxy->hfgcxy", second, first).reshape(f, g * cg, *self.conv(1).kernel_size)
        in_inv = torch.argsort(self.permute(0).index)
        return block.index_select(0, self.permute(4).index).index_select(1, in_inv)


class BiclusterCPConv2d(_Clustered):
    """Denton et al. 2014 biclustering with an outer-product approximation of each block: for each
    (input group g, filter group h, term k) a combination of the C/G inputs (α), one spatial kernel
    (β) and a spread to the F/H filters (γ). Runs as: gather inputs into groups → grouped 1×1 (G
    groups, C → G·H·K) → depthwise k×k (the dense stride, padding, dilation) → channel shuffle →
    grouped 1×1 (H groups) → gather filters back."""

    @classmethod
    def build(cls, dense: nn.Conv2d, rank: tuple[int, int, int]) -> BiclusterCPConv2d:
        g, h, k = rank
        c, f, mid = dense.in_channels, dense.out_channels, g * h * k
        dev, dt = dense.weight.device, dense.weight.dtype
        mix = nn.Conv2d(c, mid, 1, groups=g, bias=False, device=dev, dtype=dt)
        spatial = nn.Conv2d(mid, mid, _pair(dense.kernel_size), groups=mid, bias=False, **_conv_kwargs(dense))
        spread = nn.Conv2d(mid, f, 1, groups=h, bias=dense.bias is not None, device=dev, dtype=dt)
        return cls(Permute(c, device=dev), mix, spatial, nn.ChannelShuffle(g), spread, Permute(f, device=dev))

    @classmethod
    def from_factors(cls, dense: nn.Conv2d, bc) -> BiclusterCPConv2d:
        """``bc``: a :class:`rankdown.decompose.BiclusteredCP`."""
        g, h, k = bc.alpha.shape[:3]
        layer = cls.build(dense, (g, h, k))
        with torch.no_grad():
            layer.permute(0).index.copy_(bc.in_order)
            layer.conv(1).weight.copy_(bc.alpha.reshape(layer.conv(1).weight.shape))
            layer.conv(2).weight.copy_(bc.beta.reshape(layer.conv(2).weight.shape))
            layer.conv(4).weight.copy_(bc.gamma.permute(1, 3, 2, 0).reshape(layer.conv(4).weight.shape))
            if dense.bias is not None:
                _bias(layer.conv(4)).copy_(dense.bias[bc.out_order])
            layer.permute(5).index.copy_(torch.argsort(bc.out_order))
        return layer

    @property
    def rank(self) -> tuple[int, int, int]:
        g, h = self.conv(1).groups, self.conv(4).groups
        return (g, h, self.conv(1).out_channels // (g * h))

    @torch.no_grad()
    def balance(self) -> int:
        """Equal norms for the α, β and γ of every term (see :func:`balance_factors`)."""
        g, h, k = self.rank
        a = self.conv(1).weight.detach().double().reshape(g, h, k, -1)
        b = self.conv(2).weight.detach().double().reshape(g, h, k, -1)
        c = self.conv(4).weight.detach().double().reshape(h, -1, k, g).permute(3, 0, 2, 1)  # (g, h, k, F/H)
        norms = [t.norm(dim=-1) for t in (a, b, c)]
        ok = (norms[0] > 0) & (norms[1] > 0) & (norms[2] > 0)
        target = (norms[0] * norms[1] * norms[2]).clamp_min(1e-300) ** (1 / 3)
        scales = [torch.where(ok, target / n.clamp_min(1e-300), 1.0)[..., None] for n in norms]
        a, b, c = a * scales[0], b * scales[1], c * scales[2]
        self.conv(1).weight.copy_(a.reshape(self.conv(1).weight.shape).to(self.conv(1).weight.dtype))
        self.conv(2).weight.copy_(b.reshape(self.conv(2).weight.shape).to(self.conv(2).weight.dtype))
        self.conv(4).weight.copy_(
            c.permute(1, 3, 2, 0).reshape(self.conv(4).weight.shape).to(self.conv(4).weight.dtype)
        )
        return 1

    def reconstruct_weight(self) -> torch.Tensor:
        g, h, k = self.rank
        f, c = self.conv(4).out_channels, self.conv(1).in_channels
        kx, ky = self.conv(2).kernel_size
        alpha = self.conv(1).weight.reshape(g, h, k, c // g)
        beta = self.conv(2).weight.reshape(g, h, k, kx, ky)
        gamma = self.conv(4).weight.reshape(h, f // h, k, g)
        block = torch.einsum("hfkg,ghkc,ghkxy->hfgcxy", gamma, alpha, beta).reshape(f, c, kx, ky)
        return block.index_select(0, self.permute(5).index).index_select(1, torch.argsort(self.permute(0).index))


def balance_factors(module: nn.Module) -> int:
    """Give each intermediate channel equal norm in the factor that writes it and the dense factor
    that reads it (the product is unchanged). A weighted fit (Mahalanobis, covariance, whitened SVD)
    leaves the scale of its metric in one factor — up to orders of magnitude apart — and gradient
    fine-tuning of badly scaled factors is slow. Returns the number of factor pairs balanced."""
    return module.balance() if isinstance(module, FactorizedLayer) else 0


@torch.no_grad()
def _balance_pairs(chain: nn.Sequential) -> int:
    """The chains' balancing: every adjacent (writer, dense reader) pair of convs/linears."""
    done = 0
    for a, b in itertools.pairwise(list(chain)):
        dense_read = isinstance(b, nn.Linear) or (isinstance(b, nn.Conv2d) and b.groups == 1)
        if not isinstance(a, (nn.Conv2d, nn.Linear)) or not isinstance(b, (nn.Conv2d, nn.Linear)) or not dense_read:
            continue
        if a.weight.shape[0] != b.weight.shape[1]:
            continue
        wa = a.weight.detach().double()
        wb = b.weight.detach().double()
        na = wa.reshape(wa.shape[0], -1).norm(dim=1)
        nb = wb.transpose(0, 1).reshape(wb.shape[1], -1).norm(dim=1)
        ok = (na > 0) & (nb > 0)
        s = torch.where(ok, (nb / na.clamp_min(1e-300)).sqrt(), torch.ones_like(na))
        shape_a = (-1, *([1] * (wa.ndim - 1)))
        shape_b = (1, -1, *([1] * (wb.ndim - 2)))
        a.weight.copy_((wa * s.view(shape_a)).to(a.weight.dtype))
        if a.bias is not None:
            a.bias.copy_((a.bias.double() * s).to(a.bias.dtype))
        b.weight.copy_((wb / s.view(shape_b)).to(b.weight.dtype))
        done += 1
    return done
