"""Deployment transforms that keep stock modules: folding batch norm into the preceding conv
(dense or the last conv of a factorized chain), folding channel gathers into neighbours, and
merging adjacent pointwise factors."""

from __future__ import annotations

import itertools

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights

from rankdown.layers import Permute


def _last_conv(module: nn.Module) -> nn.Conv2d | None:
    if type(module) is nn.Conv2d:
        return module
    last = module[-1] if isinstance(module, nn.Sequential) and len(module) else None
    return last if type(last) is nn.Conv2d else None


def _fuse(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> bool:
    if type(bn) is not nn.BatchNorm2d or not bn.track_running_stats or bn.num_features != conv.out_channels:
        return False
    if bn.running_mean is None or bn.running_var is None:
        return False
    bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
    w, b = fuse_conv_bn_weights(conv.weight, bias, bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias)
    conv.weight, conv.bias = w, b
    return True


@torch.no_grad()
def fold_batchnorm(model: nn.Module) -> int:
    """Fold every eval-mode BatchNorm2d that directly follows a conv (dense, or the last conv of a
    factorized chain) into that conv's weight and bias, replacing the batch norm by
    ``nn.Identity``. Returns how many were folded.

    Pairs inside an ``nn.Sequential`` are found by position. Pairs wired by a custom forward (a
    ResNet block's conv2 → bn2) are found by tracing the model with torch.fx; a model that does
    not trace keeps those batch norms, since their order of use cannot be seen otherwise."""
    if model.training:
        raise ValueError("fold_batchnorm needs a model in eval mode (batch statistics would change)")
    folded = 0
    for parent in list(model.modules()):
        if not isinstance(parent, nn.Sequential):
            continue
        names = list(parent._modules)
        for a, b in itertools.pairwise(names):
            conv, bn = _last_conv(parent._modules[a]), parent._modules[b]
            if conv is not None and type(bn) is nn.BatchNorm2d and _fuse(conv, bn):
                parent._modules[b] = nn.Identity()
                folded += 1
    return folded + _fold_traced(model)


def _fold_traced(model: nn.Module) -> int:
    import torch.fx

    from rankdown.surgery import replace_module

    try:
        graph = torch.fx.symbolic_trace(model).graph
    except Exception:  # any model fx cannot trace keeps its remaining batch norms
        return 0
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[str(node.target)] = calls.get(str(node.target), 0) + 1
    folded = 0
    for node in graph.nodes:
        if node.op != "call_module" or len(node.args) != 1 or not isinstance(node.args[0], torch.fx.Node):
            continue
        src = node.args[0]
        conv_name, bn_name = str(src.target), str(node.target)
        if src.op != "call_module" or len(src.users) != 1 or calls[conv_name] > 1 or calls[bn_name] > 1:
            continue  # the conv's output is used elsewhere too, or a module is called twice: not foldable
        conv, bn = model.get_submodule(conv_name), model.get_submodule(bn_name)
        if (
            isinstance(conv, nn.Conv2d)
            and type(conv) is nn.Conv2d
            and isinstance(bn, nn.BatchNorm2d)
            and _fuse(conv, bn)
        ):
            replace_module(model, bn_name, nn.Identity())
            folded += 1
    return folded


# Modules that act on each channel alone: a channel gather commutes with them (batch norm once its
# per-channel parameters are gathered too).
_CHANNELWISE = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.GELU,
    nn.SiLU,
    nn.Hardswish,
    nn.Sigmoid,
    nn.Tanh,
    nn.Identity,
    nn.Dropout,
    nn.MaxPool2d,
    nn.AvgPool2d,
    nn.BatchNorm2d,
)


def _permute_bn(bn: nn.BatchNorm2d, index: torch.Tensor) -> None:
    for name in ("weight", "bias", "running_mean", "running_var"):
        t = getattr(bn, name)
        if t is not None:
            t.data = t.data[index]


def _plain(conv: nn.Module) -> nn.Conv2d | None:
    return conv if isinstance(conv, nn.Conv2d) and type(conv) is nn.Conv2d and conv.groups == 1 else None


def _end(module: nn.Module, at: int) -> nn.Conv2d | Permute | None:
    """A plain conv, or the conv or gather at position ``at`` of a chain."""
    plain = _plain(module)
    if plain is not None:
        return plain
    if isinstance(module, nn.Sequential) and len(module):
        end = module[at]
        return end if isinstance(end, Permute) else _plain(end)
    return None


def _writer(module: nn.Module) -> nn.Conv2d | Permute | None:
    """What produces ``module``'s output channels and can reorder them: a dense conv, the last
    conv of a factorized chain, or the gather that ends a chain."""
    return _end(module, -1)


def _reader(module: nn.Module) -> nn.Conv2d | Permute | None:
    """What consumes ``module``'s input channels and can absorb a reordering of them."""
    return _end(module, 0)


def _neighbour(parent: nn.Sequential, names: list[str], i: int, step: int) -> tuple[list[nn.Module], nn.Module | None]:
    """The channel-wise modules passed, and the first other module met, walking from position i."""
    between = []
    j = i + step
    while 0 <= j < len(names) and isinstance(parent._modules[names[j]], _CHANNELWISE):
        between.append(parent._modules[names[j]])
        j += step
    return between, (parent._modules[names[j]] if 0 <= j < len(names) else None)


@torch.no_grad()
def fold_permutations(model: nn.Module) -> int:
    """Fold the channel gathers of Denton's clustered layers (monochromatic, biclustered) into
    their neighbours inside an ``nn.Sequential``: an input gather reorders the output filters of
    the conv before it, an output gather reorders the input columns of the conv after it (through
    any channel-wise modules in between, batch norm included), and the gather becomes
    ``nn.Identity``. The function is unchanged; the gathers' memory copies are gone. The result
    is for deployment: its state dict no longer matches the plan. Returns how many were folded."""
    if model.training:
        raise ValueError("fold_permutations needs a model in eval mode")
    folded = 0
    for parent in list(model.modules()):
        if not isinstance(parent, nn.Sequential):
            continue
        names = list(parent._modules)
        for i, name in enumerate(names):
            block = parent._modules[name]
            if not isinstance(block, nn.Sequential) or len(block) < 2:
                continue
            # input gather ← the writer before it
            first = block[0]
            if isinstance(first, Permute):
                between, neighbour = _neighbour(parent, names, i, -1)
                w = None if neighbour is None else _writer(neighbour)
                if w is not None:
                    idx = first.index
                    if isinstance(w, nn.Conv2d):
                        w.weight.data = w.weight.data[idx]
                        if w.bias is not None:
                            w.bias.data = w.bias.data[idx]
                    else:  # two gathers in a row compose into one
                        w.index.copy_(w.index[idx])
                    for m in between:
                        if isinstance(m, nn.BatchNorm2d):
                            _permute_bn(m, idx)
                    block[0] = nn.Identity()
                    folded += 1
            # output gather → the reader after it
            last = block[-1]
            if isinstance(last, Permute):
                between, neighbour = _neighbour(parent, names, i, +1)
                r = None if neighbour is None else _reader(neighbour)
                if r is not None:
                    idx = last.index  # y_out[:, c] = y[:, idx[c]]
                    inv = torch.argsort(idx)
                    if isinstance(r, nn.Conv2d):
                        r.weight.data = r.weight.data[:, inv]
                    else:
                        r.index.copy_(idx[r.index])
                    for m in between:
                        if isinstance(m, nn.BatchNorm2d):
                            _permute_bn(m, inv)
                    block[-1] = nn.Identity()
                    folded += 1
    return folded


def _pointwise(m: nn.Module | None) -> nn.Conv2d | nn.Linear | None:
    """``m`` when it is a plain Linear or a plain 1×1 conv (a matrix on channels), else None."""
    if isinstance(m, nn.Linear) and type(m) is nn.Linear:
        return m
    plain = (
        isinstance(m, nn.Conv2d)
        and type(m) is nn.Conv2d
        and m.kernel_size == (1, 1)
        and m.stride == (1, 1)
        and m.padding in ((0, 0), "valid")
        and m.groups == 1
    )
    return m if plain and isinstance(m, nn.Conv2d) else None


def _matrix(m: nn.Conv2d | nn.Linear) -> torch.Tensor:
    return m.weight.reshape(m.weight.shape[0], -1)


def _merged(first_module: nn.Module, second_module: nn.Module) -> nn.Module | None:
    """``second ∘ first`` as one layer of the same kind, when it costs fewer MACs than the pair."""
    first, second = _pointwise(first_module), _pointwise(second_module)
    if first is None or second is None or type(first) is not type(second):
        return None
    a, b = _matrix(first), _matrix(second)
    if a.shape[0] != b.shape[1] or b.shape[0] * a.shape[1] >= a.numel() + b.numel():
        return None
    w = b @ a
    has_bias = first.bias is not None or second.bias is not None
    bias = second.bias.clone() if second.bias is not None else torch.zeros(w.shape[0], dtype=w.dtype)
    if first.bias is not None:
        bias = bias + b @ first.bias
    out: nn.Conv2d | nn.Linear
    if isinstance(first, nn.Linear):
        out = nn.Linear(w.shape[1], w.shape[0], bias=has_bias, device=w.device, dtype=w.dtype)
    else:
        out = nn.Conv2d(w.shape[1], w.shape[0], 1, bias=has_bias, device=w.device, dtype=w.dtype)
    out.weight.copy_(w.reshape(out.weight.shape))
    if out.bias is not None:
        out.bias.copy_(bias)
    return out


@torch.no_grad()
def merge_pointwise(model: nn.Module) -> int:
    """Merge a factorized layer's pointwise end factor with a plain 1×1 conv (or Linear) that
    follows it directly inside an ``nn.Sequential`` — and a plain one before a factorized layer's
    pointwise first factor — when the product costs fewer MACs than the pair (it does whenever
    the rank is below the width in between). Nothing non-linear may sit between them: fold batch
    norms first (:func:`fold_batchnorm`). Returns how many pairs were merged."""
    merged = 0
    for parent in list(model.modules()):
        if not isinstance(parent, nn.Sequential):
            continue
        names = list(parent._modules)
        for left, right in itertools.pairwise(names):
            a, b = parent._modules[left], parent._modules[right]
            if isinstance(a, nn.Sequential) and len(a) > 1 and not isinstance(b, nn.Sequential):
                new = _merged(a[-1], b)
                if new is not None:
                    a[-1] = new
                    parent._modules[right] = nn.Identity()
                    merged += 1
            elif isinstance(b, nn.Sequential) and len(b) > 1 and not isinstance(a, nn.Sequential):
                new = _merged(a, b[0])
                if new is not None:
                    b[0] = new
                    parent._modules[left] = nn.Identity()
                    merged += 1
    return merged


def deploy(model: nn.Module) -> dict[str, int]:
    """Every transform above, in the order they depend on (batch norms out of the way first, so
    that pointwise factors can meet): what ``rankdown bench --fold-bn`` measures. In place; the
    function is unchanged up to float rounding. Returns how many of each were applied."""
    return {
        "batchnorm": fold_batchnorm(model),
        "gathers": fold_permutations(model),
        "pointwise": merge_pointwise(model),
    }
