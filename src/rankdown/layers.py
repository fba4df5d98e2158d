"""Factorized layers made only of stock ``nn.Conv2d`` / ``nn.Linear`` inside an ``nn.Sequential``,
so that they export (TorchScript, ONNX, torch.compile) and run on the stock fast kernels.

Each class has ``build`` (shapes only, for loading a saved plan), ``from_factors`` (weights from
``rankdown.decompose``) and ``reconstruct_weight`` (the dense weight the chain computes).
"""

from __future__ import annotations

import torch
from torch import nn


class LowRankLinear(nn.Sequential):
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
            layer[0].weight.copy_(b)
            layer[1].weight.copy_(a)
            if dense.bias is not None:
                layer[1].bias.copy_(dense.bias)
        return layer

    @property
    def rank(self) -> int:
        return self[0].out_features

    def reconstruct_weight(self) -> torch.Tensor:
        return self[1].weight @ self[0].weight


def _conv_kwargs(dense: nn.Conv2d) -> dict:
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


class ChannelSVDConv2d(nn.Sequential):
    """``k×k conv C→r`` (original stride, padding, dilation, padding mode) then ``1×1 conv r→N``.

    The SVD of the kernel unfolded as N × (C·kh·kw): the spatial work happens once, at rank r.
    """

    @classmethod
    def build(cls, dense: nn.Conv2d, rank: int) -> ChannelSVDConv2d:
        first = nn.Conv2d(dense.in_channels, rank, dense.kernel_size, bias=False, **_conv_kwargs(dense))
        return cls(first, _pointwise(rank, dense.out_channels, dense.bias is not None, dense))

    @classmethod
    def from_factors(cls, dense: nn.Conv2d, a: torch.Tensor, b: torch.Tensor) -> ChannelSVDConv2d:
        layer = cls.build(dense, a.shape[1])
        with torch.no_grad():
            layer[0].weight.copy_(b.reshape(layer[0].weight.shape))
            layer[1].weight.copy_(a[:, :, None, None])
            if dense.bias is not None:
                layer[1].bias.copy_(dense.bias)
        return layer

    @property
    def rank(self) -> int:
        return self[0].out_channels

    def reconstruct_weight(self) -> torch.Tensor:
        a = self[1].weight[:, :, 0, 0]
        return torch.einsum("nr,rcij->ncij", a, self[0].weight)


class Tucker2Conv2d(nn.Sequential):
    """``1×1 conv C→r_in`` → ``k×k core r_in→r_out`` (original geometry) → ``1×1 conv r_out→N``.

    Padding commutes with the first 1×1 projection (it has no bias, and reflect/replicate/circular
    padding copy pixels), so every padding mode is carried exactly by the core.
    """

    @classmethod
    def build(cls, dense: nn.Conv2d, ranks: tuple[int, int]) -> Tucker2Conv2d:
        r_out, r_in = ranks
        first = _pointwise(dense.in_channels, r_in, False, dense)
        core = nn.Conv2d(r_in, r_out, dense.kernel_size, bias=False, **_conv_kwargs(dense))
        last = _pointwise(r_out, dense.out_channels, dense.bias is not None, dense)
        return cls(first, core, last)

    @classmethod
    def from_factors(
        cls, dense: nn.Conv2d, core: torch.Tensor, u_out: torch.Tensor, u_in: torch.Tensor
    ) -> Tucker2Conv2d:
        layer = cls.build(dense, (u_out.shape[1], u_in.shape[1]))
        with torch.no_grad():
            layer[0].weight.copy_(u_in.T[:, :, None, None])
            layer[1].weight.copy_(core)
            layer[2].weight.copy_(u_out[:, :, None, None])
            if dense.bias is not None:
                layer[2].bias.copy_(dense.bias)
        return layer

    @property
    def rank(self) -> tuple[int, int]:
        return (self[1].out_channels, self[1].in_channels)

    def reconstruct_weight(self) -> torch.Tensor:
        return torch.einsum("abij,na,bc->ncij", self[1].weight, self[2].weight[:, :, 0, 0], self[0].weight[:, :, 0, 0])
