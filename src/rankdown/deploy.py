"""Deployment transforms that keep stock modules: folding batch norm into the preceding conv
(dense or the last conv of a factorized chain)."""

from __future__ import annotations

import itertools

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights


def _last_conv(module: nn.Module) -> nn.Conv2d | None:
    if type(module) is nn.Conv2d:
        return module
    if isinstance(module, nn.Sequential) and len(module) and type(module[-1]) is nn.Conv2d:
        return module[-1]
    return None


@torch.no_grad()
def fold_batchnorm(model: nn.Module) -> int:
    """Fold every eval-mode BatchNorm2d that directly follows a conv inside an ``nn.Sequential``
    into that conv (its weight and bias), replacing the batch norm by ``nn.Identity``. Returns how
    many were folded. Batch norms reached only through a custom forward (e.g. ResNet blocks' bn1)
    are left alone: their order of use is not visible without tracing."""
    if model.training:
        raise ValueError("fold_batchnorm needs a model in eval mode (batch statistics would change)")
    folded = 0
    for parent in list(model.modules()):
        if not isinstance(parent, nn.Sequential):
            continue
        names = list(parent._modules)
        for a, b in itertools.pairwise(names):
            conv, bn = _last_conv(parent._modules[a]), parent._modules[b]
            if conv is None or type(bn) is not nn.BatchNorm2d or not bn.track_running_stats:
                continue
            if bn.num_features != conv.out_channels:
                continue
            bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
            w, b_ = fuse_conv_bn_weights(conv.weight, bias, bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias)
            conv.weight = w
            conv.bias = b_
            parent._modules[b] = nn.Identity()
            folded += 1
    return folded
