"""Data reconstruction: fit factorized layers to the dense layers' *outputs* on calibration data.

Filter reconstruction (what ``compress`` does) minimises ‖W − Ŵ‖. What matters is the layer's
output on the data it really sees, so (Jaderberg 2014, Zhang 2015) the factors are refitted, layer
by layer in execution order, to minimise

    data  : ‖W∗Z − Ŵ∗Z‖²   Z = the layer's input in the dense network
    joint : ‖W∗Z − Ŵ∗Ẑ‖²   Ẑ = its input in the network whose earlier layers are already
                             approximated (and calibrated): the error accumulated upstream is
                             compensated here. This is Zhang 2015's asymmetric objective.

Closed form where one exists — an SVD factorization (``svd`` for Linear, ``channel-svd`` for
Conv2d with zero padding) is linear in the im2col patches, so the optimum at rank r is the SVD of
M = W·Σ_ZẐ·Σ_ẐẐ⁻¹ whitened by Σ_ẐẐ (:func:`rankdown.decompose.whitened_truncated_svd`), plus the
bias that matches the output means. Every other factorized module gets the exact least-squares
fit of its last factor (the one that writes the outputs, linear given the others), then Adam on
all its factors for ``epochs``. Every 4th calibration batch is held out: ridge strengths are
chosen, and a refit is kept, by the error on those batches only. Calibration inputs stream in
batches: only second-moment statistics (closed form) or, under ``cache_mb``, the layer's (input,
target) pairs are held; above it the two networks are re-run each epoch, truncated at the layer.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from rankdown import decompose
from rankdown.errors import RankdownError
from rankdown.layers import FactorizedLayer, balance_factors
from rankdown.probe import Batches, Examples, Inputs, batch_len, batch_size_for, forward, real_rows, stream, token_mask
from rankdown.progress import progress
from rankdown.surgery import StopForward, hooked, record_inputs

MODES = ("data", "joint")


@dataclass(frozen=True)
class CalibrationConfig:
    mode: str = "joint"
    batch_size: int = 64
    epochs: int = 2  # Adam epochs after the closed-form step (non-SVD methods)
    lr: float = 3e-3  # relative: each tensor's step is lr × its RMS (Adam, cosine decay)
    cache_mb: float = 512.0
    closed_form: bool = True  # False: refit SVD layers by gradient too (for comparisons)
    nonlinear: bool = True  # fit the response after a following (BatchNorm →) ReLU (Zhang 2015)
    relu_iters: tuple[int, int] = (15, 10)  # alternations at λ = 0.1, then at λ = 1
    relu_rows: int = 100_000  # output pixels sampled for the alternation (fewer for wide inputs)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise RankdownError(f"calibration mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.batch_size < 1 or self.epochs < 0 or self.lr <= 0 or self.cache_mb < 0:
            raise RankdownError("calibration batch size must be >= 1, epochs >= 0, lr > 0 and cache >= 0")


def quick(config: CalibrationConfig) -> CalibrationConfig:
    """``config`` without its Adam epochs and ReLU-response iterations: the seconds-long refit that
    candidate plans get before they are compared."""
    return replace(config, epochs=0, relu_iters=(0, 0))


def _capture_input(model: nn.Module, fqn: str, run: Callable[[], object]) -> torch.Tensor:
    """The input of ``model``'s submodule ``fqn`` during ``run()``, which is cut short there."""
    box: dict[str, torch.Tensor] = {}

    def hook(_m, args):
        box["x"] = args[0].detach()
        raise StopForward

    with hooked([model.get_submodule(fqn).register_forward_pre_hook(hook)]), torch.no_grad():
        run()
    if "x" not in box:
        raise RankdownError(f"layer {fqn!r} was not called in a forward pass on the calibration inputs")
    return box["x"]


def _layer_input(model: nn.Module, fqn: str, x: Inputs) -> torch.Tensor:
    return _capture_input(model, fqn, lambda: forward(model, x))


def execution_order(model: nn.Module, fqns: list[str], example: Inputs) -> list[str]:
    """``fqns`` in the order a forward pass first calls them (not the registration order): the
    probe of :func:`rankdown.surgery.record_inputs` records them in that order."""
    seen = list(record_inputs(model, example, fqns))
    return seen + [f for f in fqns if f not in seen]


@dataclass
class Activation:
    """The channel-wise ``[BatchNorm →] ReLU`` that follows a layer, written per output channel as
    act(y) = scale · relu(sign · (y − threshold)) (a BatchNorm with γ < 0 flips the sign), so that
    Zhang 2015's per-element z-step applies unchanged to conv → BN → ReLU stacks."""

    modules: nn.Sequential  # copies, not in place: applied to targets and outputs alike
    sign: torch.Tensor
    threshold: torch.Tensor
    scale: torch.Tensor
    channel_dim: int  # 1 for conv outputs, -1 for linear ones

    def __call__(self, y: torch.Tensor) -> torch.Tensor:
        return self.modules(y)


def following_activation(model: nn.Module, fqn: str) -> Activation | None:
    """The ReLU (optionally after an eval-mode BatchNorm) that directly follows ``fqn`` inside an
    ``nn.Sequential``; None when there is none or the order of use is not visible (custom forward)."""
    parent_name, _, name = fqn.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    layer = parent.get_submodule(name)
    if not isinstance(parent, nn.Sequential) or not isinstance(layer, (nn.Conv2d, nn.Linear)):
        return None
    names = list(parent._modules)
    after = [parent._modules[n] for n in names[names.index(name) + 1 : names.index(name) + 3]]
    n_out = layer.weight.shape[0]
    sign, threshold, scale = torch.ones(n_out), torch.zeros(n_out), torch.ones(n_out)
    chain: list[nn.Module] = []
    if after and type(after[0]) is nn.BatchNorm2d and isinstance(layer, nn.Conv2d):
        bn = after.pop(0)
        assert isinstance(bn, nn.BatchNorm2d)
        if bn.training or not bn.track_running_stats or bn.num_features != n_out:
            return None
        if bn.running_var is None or bn.running_mean is None:
            return None
        with torch.no_grad():
            gamma = bn.weight.detach().float() if bn.affine else torch.ones(n_out)
            beta = bn.bias.detach().float() if bn.affine else torch.zeros(n_out)
            mult = gamma / (bn.running_var.float() + bn.eps).sqrt()  # BN(y) = mult·(y − mean) + beta
        if bool((mult == 0).any()):
            return None
        sign, scale = torch.sign(mult), mult.abs()
        threshold = bn.running_mean.float() - beta / mult
        chain.append(copy.deepcopy(bn))
    if not after or type(after[0]) is not nn.ReLU:
        return None
    chain.append(nn.ReLU())
    return Activation(nn.Sequential(*chain).eval(), sign, threshold, scale, 1 if isinstance(layer, nn.Conv2d) else -1)


# (dense input, compressed input) of one layer, batch by batch; re-iterable
Source = Callable[[], Iterator[tuple[torch.Tensor, torch.Tensor]]]


def _truncated_source(dense: nn.Module, compressed: nn.Module, fqn: str, data: Batches, config) -> Source:
    """Inputs of ``fqn`` from forward passes of the whole networks, cut at the layer (at the real
    tokens only, for padded token batches)."""

    def gen() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for xb in data.rebatch(config.batch_size):
            mask = token_mask(xb)
            z = real_rows(_layer_input(dense, fqn, xb), mask)
            yield z, (z if config.mode == "data" else real_rows(_layer_input(compressed, fqn, xb), mask))

    return gen


class _Pairs:
    """(input to the factorized layer, dense target) batches for one layer: cached when small,
    else recomputed from ``source`` each time they are iterated."""

    def __init__(self, layer: nn.Module, source: Source, n_batches: int, config, act: Activation | None = None) -> None:
        self.layer, self.source, self.n_batches, self.config = layer, source, n_batches, config
        self.act = act  # errors are measured after it (the response that the next layer sees)
        self.cache: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        first = next(self._compute())
        per_batch = sum(t.numel() * t.element_size() for t in first)
        if per_batch * n_batches <= config.cache_mb * 2**20:
            self.cache = list(self._compute())

    def zh(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(dense input, compressed input) batches (the same tensor twice in ``data`` mode: the
        sources give that)."""
        return self.source()

    def _compute(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for z, h in self.zh():
            with torch.no_grad():
                target = self.layer(z)
            yield h, target

    def __iter__(self):
        return iter(self.cache) if self.cache is not None else self._compute()

    def sq_error(self, out: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(squared error, squared target), after the activation when there is one."""
        if self.act is not None:
            out, target = self.act(out), self.act(target)
        return ((out - target) ** 2).sum(), (target**2).sum()


@torch.no_grad()
def _rel_output_error(module: nn.Module, pairs: _Pairs) -> float:
    num = den = 0.0
    for zin, target in pairs:
        e, t = pairs.sq_error(module(zin), target)
        num, den = num + float(e), den + float(t)
    return math.sqrt(num / max(den, 1e-300))


def patch_rows(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Rows of im2col patches (conv) or features (linear), as the dense layer's matmul sees them."""
    if isinstance(layer, nn.Conv2d):
        assert not isinstance(layer.padding, str), "string padding is resolved before fitting"
        cols = F.unfold(x, layer.kernel_size, dilation=layer.dilation, padding=layer.padding, stride=layer.stride)
        return cols.transpose(1, 2).reshape(-1, cols.shape[1])
    return x.reshape(-1, x.shape[-1])


def closed_form_applies(dense_layer: nn.Module, module: nn.Module) -> bool:
    return isinstance(module, FactorizedLayer) and module.closed_form(dense_layer)


_SHIFTS = (1e-6, 1e-4, 1e-2, 1e-1)  # ridge strengths tried, relative to the mean input energy


def _holdout(i: int, n_batches: int) -> bool:
    """Every 4th batch is held out to choose the ridge (with fewer than 4 batches, none is): with
    few examples and wide layers an exact fit interpolates the calibration set and generalises
    badly (seen on CharNet's conv3: 1,024 rows for 1,025 unknowns)."""
    return n_batches >= 4 and i % 4 == 3


@torch.no_grad()
def _heldout_error(module: nn.Module, pairs: _Pairs) -> float:
    num = den = 0.0
    for i, (zin, target) in enumerate(pairs):
        if _holdout(i, pairs.n_batches):
            e, t = pairs.sq_error(module(zin), target)
            num, den = num + float(e), den + float(t)
    return math.sqrt(num / den) if den else float("nan")


def _gram(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """aᵀb of one batch in the batch's own dtype, as float64 for the sums over batches. In float32
    it is about twice as fast as in float64 and within 1e-6 of it (1e-7 measured on a CNN's patch
    rows), below the smallest ridge tried; float64 inputs stay exact."""
    return (a.T @ b).double()


@torch.no_grad()
def _closed_form(dense_layer: nn.Module, module: nn.Module, pairs: _Pairs, mode: str) -> None:
    assert isinstance(module, FactorizedLayer) and isinstance(dense_layer, (nn.Conv2d, nn.Linear))
    d = dense_layer.weight[0].numel()
    s_hh = torch.zeros(d, d, dtype=torch.float64)
    s_zh = torch.zeros(d, d, dtype=torch.float64) if mode == "joint" else None
    mean_z = torch.zeros(d, dtype=torch.float64)
    mean_h = torch.zeros(d, dtype=torch.float64)
    first, last = module.input_factor(), module.output_factor()
    biased = dense_layer.bias is not None and last.bias is not None
    count = 0
    for i, (z, h) in enumerate(pairs.zh()):
        if _holdout(i, pairs.n_batches):
            continue
        ph = patch_rows(dense_layer, h)
        pz = ph if z is h else patch_rows(dense_layer, z)
        s_hh += _gram(ph, ph)
        if s_zh is not None:
            s_zh += _gram(pz, ph)
        if biased:  # the means only serve the bias shift
            mean_z += pz.sum(0).double()
            mean_h += ph.sum(0).double()
        count += ph.shape[0]
    w = dense_layer.weight.detach().double().reshape(dense_layer.weight.shape[0], -1)
    rank = first.weight.shape[0]
    original = {k: v.clone() for k, v in module.state_dict().items()}
    best = (_heldout_error(module, pairs), original)
    for shift in _SHIFTS:
        # joint: M = W Σ_zh Σ_hh⁻¹, the unconstrained least-squares map from Ẑ to W∗Z
        chol = decompose.shifted_cholesky(s_hh, shift)  # one factor for both solves (d² doubles, d = C·kh·kw)
        m = w if s_zh is None else torch.cholesky_solve((w @ s_zh).T, chol).T
        a, b = decompose.whitened_truncated_svd(m, s_hh, rank, shift=shift, chol=chol)
        first.weight.copy_(b.reshape(first.weight.shape).to(first.weight.dtype))
        last.weight.copy_(a.reshape(last.weight.shape).to(last.weight.dtype))
        if biased and last.bias is not None and dense_layer.bias is not None:
            bias_shift = (w @ mean_z - (a @ b) @ mean_h) / max(count, 1)
            last.bias.copy_((dense_layer.bias.detach().double() + bias_shift).to(last.bias.dtype))
        err = _heldout_error(module, pairs)
        if math.isnan(best[0]):  # no held-out data: take the smallest shift
            return
        if err < best[0]:
            best = (err, {k: v.clone() for k, v in module.state_dict().items()})
    module.load_state_dict(best[1])


@dataclass
class _Normal:
    """The sums of one least-squares problem over batches: FᵀF, FᵀT and ‖T‖²."""

    gram: torch.Tensor
    cross: torch.Tensor
    energy: float = 0.0


def _last_factor_least_squares(module: nn.Module, pairs: _Pairs) -> bool:
    """Refit the factor that writes the outputs by exact least squares on the data, the rest
    fixed: the output is linear in it (Zhang 2015's closed form, applied to the last factor of any
    factorized module). Returns False when the module has no such plain last conv/linear."""
    split = module.last_factor() if isinstance(module, FactorizedLayer) else None
    if split is None:
        return False
    head, last = split
    d = last.weight[0].numel() + (last.bias is not None)
    n_out = last.weight.shape[0]
    stats = {
        k: _Normal(torch.zeros(d, d, dtype=torch.float64), torch.zeros(d, n_out, dtype=torch.float64))
        for k in ("fit", "val")
    }
    n_batches = pairs.n_batches
    with torch.no_grad():
        for i, (zin, target) in enumerate(pairs):
            feats = patch_rows(last, head(zin))
            if last.bias is not None:
                feats = torch.cat([feats, torch.ones(feats.shape[0], 1, dtype=feats.dtype)], 1)
            t = _output_rows(target)
            st = stats["val" if _holdout(i, n_batches) else "fit"]
            st.gram += _gram(feats, feats)
            st.cross += _gram(feats, t)
            st.energy += float((t.double() ** 2).sum())
        w0 = last.weight.detach().double().reshape(n_out, -1)
        if last.bias is not None:
            w0 = torch.cat([w0, last.bias.detach().double()[:, None]], 1)
        gram, cross = stats["fit"].gram, stats["fit"].cross
        g_v, c_v, t_v = stats["val"].gram, stats["val"].cross, stats["val"].energy

        def val_error(w: torch.Tensor) -> float:
            return t_v - 2 * float((w.T * c_v).sum()) + float(((w @ g_v) * w).sum())

        scale = float(gram.diagonal().mean()) or 1.0
        eye = torch.eye(d, dtype=torch.float64)
        best_w, best_err = w0, val_error(w0)
        for shift in _SHIFTS:
            # ridge towards the current factor, not towards zero: a weak fit changes little
            sol = torch.linalg.solve(gram + shift * scale * eye, cross + shift * scale * w0.T).T
            err = val_error(sol)
            if t_v == 0.0:  # no held-out data: the smallest ridge
                best_w = sol
                break
            if err < best_err:
                best_w, best_err = sol, err
        if last.bias is not None:
            last.bias.copy_(best_w[:, -1].to(last.bias.dtype))
            best_w = best_w[:, :-1]
        last.weight.copy_(best_w.reshape(last.weight.shape).to(last.weight.dtype))
    return True


def _output_rows(y: torch.Tensor) -> torch.Tensor:
    """(examples·pixels, channels) rows of a conv (N, C, H, W) or linear (..., C) output."""
    return y.permute(0, 2, 3, 1).reshape(-1, y.shape[1]) if y.ndim == 4 else y.reshape(-1, y.shape[-1])


def relu_z_step(y: torch.Tensor, u: torch.Tensor, lam: float) -> torch.Tensor:
    """Zhang 2015's z-step, per element: argmin_z (relu(y) − relu(z))² + λ (z − u)², the cheaper
    of the best z ≤ 0 (min(u, 0)) and the best z ≥ 0 (max(0, (λu + relu(y)) / (λ + 1)))."""
    yr = y.clamp_min(0)
    z0 = u.clamp_max(0)
    z1 = ((lam * u + yr) / (lam + 1)).clamp_min(0)
    c0 = yr**2 + lam * (z0 - u) ** 2
    c1 = (z1 - yr) ** 2 + lam * (z1 - u) ** 2
    return torch.where(c0 <= c1, z0, z1)


@torch.no_grad()
def _response_fit(dense_layer: nn.Module, module: nn.Module, pairs: _Pairs, config: CalibrationConfig) -> bool:
    """Zhang 2015's nonlinear reconstruction: min Σ ‖act(y) − act(ŷ)‖² over the linear map that
    writes the outputs (the whole rank-r product for SVD layers, else the last factor), relaxed
    with auxiliary responses z and solved by alternating a per-element z-step with the
    least-squares map step, λ rising from 0.1 to 1. Starts from the linear fit already in place
    and is kept only if it lowers the held-out response error. Returns whether it applied."""
    act = pairs.act
    assert act is not None
    if not isinstance(module, FactorizedLayer):
        return False
    closed = config.closed_form and closed_form_applies(dense_layer, module)
    split = module.last_factor()
    if closed:  # the whole rank-r product: first factor and last
        first, head, last = module.input_factor(), None, module.output_factor()
        rank = first.weight.shape[0]
    elif split is not None:  # the last factor alone
        first, (head, last), rank = None, split, 0
    else:
        return False

    n_batches = pairs.n_batches
    n_fit = sum(not _holdout(i, n_batches) for i in range(n_batches))
    d = first.weight[0].numel() if first is not None else last.weight[0].numel()
    budget = min(config.relu_rows, (256 * 2**20) // (4 * d))  # the sampled features stay under 256 MB
    per_batch = max(1, budget // max(n_fit, 1))
    gen = torch.Generator().manual_seed(config.seed)
    picks: dict[int, torch.Tensor] = {}

    def rows(i: int, t: torch.Tensor) -> torch.Tensor:
        """A fixed random subset of batch i's rows (Zhang samples pixels too): cost, not quality."""
        if t.shape[0] <= per_batch:
            return t
        if i not in picks:
            picks[i] = torch.randperm(t.shape[0], generator=gen)[:per_batch]
        return t[picks[i]]

    def feats(i: int, zin: torch.Tensor) -> torch.Tensor:
        return rows(i, patch_rows(dense_layer, zin) if head is None else patch_rows(last, head(zin)))

    def current_map() -> torch.Tensor:
        w = last.weight.detach().double().reshape(last.weight.shape[0], -1)
        return w @ first.weight.detach().double().reshape(rank, -1) if first is not None else w

    sign, thr = act.sign.double(), act.threshold.double()
    weight = act.scale.double()  # per-channel weight of the response error
    has_bias = last.bias is not None
    before = _heldout_error(module, pairs)
    saved = {k: v.clone() for k, v in module.state_dict().items()}
    fs, ys = [], []
    for i, (zin, target) in enumerate(pairs):  # the sampled rows, held for all the iterations
        if not _holdout(i, n_batches):
            fs.append(feats(i, zin).float())
            ys.append(rows(i, _output_rows(target)).float())
    if not fs:
        return False
    f, y = torch.cat(fs), torch.cat(ys)
    del fs, ys
    count = f.shape[0]
    mean_f = f.double().mean(0) if has_bias else torch.zeros(f.shape[1], dtype=torch.float64)
    g_c = _gram(f, f) / count - torch.outer(mean_f, mean_f)
    chol = decompose.shifted_cholesky(g_c, 1e-4)
    y_v = (sign * (y.double() - thr)).float()  # in the activation's frame: act = scale · relu(y_v)
    w = current_map()
    b = last.bias.detach().double() if last.bias is not None else torch.zeros(w.shape[0], dtype=torch.float64)
    n1, n2 = config.relu_iters
    for lam in [0.1] * n1 + [1.0] * n2:
        u = f @ w.T.float() + b.float()
        z = sign.float() * relu_z_step(y_v, sign.float() * (u - thr.float()), lam) + thr.float()
        mean_z = z.double().mean(0) if has_bias else torch.zeros_like(b)
        c_c = _gram(z, f) / count - torch.outer(mean_z, mean_f)
        m = torch.cholesky_solve(c_c.T, chol).T
        if closed:  # the best rank-r map under the feature covariance, rows weighted as the error is
            a, bb = decompose.whitened_truncated_svd(m * weight[:, None], g_c, rank, shift=1e-4)
            a = a / weight[:, None]
            w = a @ bb
        else:
            w = m
        b = mean_z - w @ mean_f
    if first is not None:
        first.weight.copy_(bb.reshape(first.weight.shape).to(first.weight.dtype))
        last.weight.copy_(a.reshape(last.weight.shape).to(last.weight.dtype))
    else:
        last.weight.copy_(w.reshape(last.weight.shape).to(last.weight.dtype))
    if last.bias is not None:
        last.bias.copy_(b.to(last.bias.dtype))
    after = _heldout_error(module, pairs)
    if math.isnan(before):
        before, after = _rel_output_error_state(saved, module, pairs), _rel_output_error(module, pairs)
    if not after < before:
        module.load_state_dict(saved)
        return False
    return True


def _rel_output_error_state(state: dict, module: nn.Module, pairs: _Pairs) -> float:
    now = {k: v.clone() for k, v in module.state_dict().items()}
    module.load_state_dict(state)
    err = _rel_output_error(module, pairs)
    module.load_state_dict(now)
    return err


def _gradient(module: nn.Module, pairs: _Pairs, config: CalibrationConfig, desc: str) -> None:
    params = [p for p in module.parameters() if p.requires_grad]
    if not params or config.epochs == 0:
        return
    groups = [{"params": [p], "lr": config.lr * max(float(p.detach().pow(2).mean().sqrt()), 1e-8)} for p in params]
    opt = torch.optim.Adam(groups)
    n_batches = pairs.n_batches
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, config.epochs * n_batches))
    gen = torch.Generator().manual_seed(config.seed)
    held = _heldout_error(module, pairs)
    score = (lambda: _rel_output_error(module, pairs)) if math.isnan(held) else (lambda: _heldout_error(module, pairs))
    best = (score(), {k: v.clone() for k, v in module.state_dict().items()})
    for _ in progress(range(config.epochs), total=config.epochs, desc=desc):
        batches = list(pairs) if pairs.cache is None else pairs.cache
        for i in torch.randperm(len(batches), generator=gen).tolist():
            if _holdout(i, n_batches):
                continue
            zin, target = batches[i]
            e, t = pairs.sq_error(module(zin), target)
            loss = e / t.clamp_min(1e-30)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    err = score()
    if not err < best[0]:  # never hand back something worse (on held-out batches) than it was given
        module.load_state_dict(best[1])


def _kept_dense(dense: nn.Module, module: nn.Module, fqn: str) -> bool:
    """The plan left this layer dense: nothing to refit."""
    return type(module) is type(dense.get_submodule(fqn))


@dataclass
class LayerFit:
    """What the refit of one layer did: how (closed form, last factor by least squares, ReLU
    response, Adam), what error it was judged by, and the relative output error before and after."""

    how: str
    response: str
    output_error_before: float
    output_error_after: float

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def _refit(dense: nn.Module, fqn: str, module: nn.Module, pairs: _Pairs, config: CalibrationConfig) -> LayerFit:
    """Refit one factorized module to its dense layer on ``pairs``; returns what was done."""
    dense_layer = dense.get_submodule(fqn)
    act = pairs.act
    before = _rel_output_error(module, pairs)
    closed = config.closed_form and closed_form_applies(dense_layer, module)
    if closed:
        how = "closed form"
        _closed_form(dense_layer, module, pairs, config.mode)
    else:
        saved = {k: v.clone() for k, v in module.state_dict().items()}
        how = "last factor by least squares" if _last_factor_least_squares(module, pairs) else ""
        if _rel_output_error(module, pairs) > before:  # ill-conditioned data: keep the weight fit
            module.load_state_dict(saved)
            how = ""
    if act is not None and config.relu_iters != (0, 0) and _response_fit(dense_layer, module, pairs, config):
        how = (how + " + " if how else "") + "relu response"
    if not closed:
        if config.epochs:
            how = (how + " + " if how else "") + "adam"
            with torch.enable_grad():
                _gradient(module, pairs, config, desc=f"refit {fqn}")
        how = how or "unchanged"
    balance_factors(module)  # the whitened closed form leaves Σ's scale in one factor
    return LayerFit(
        how,
        "after " + " → ".join(type(m).__name__ for m in act.modules) if act else "linear",
        before,
        _rel_output_error(module, pairs),
    )


# Block by block. A network whose targets sit in a stack of repeated blocks (a transformer's
# layers, a ResNet stage) is refitted one block at a time from the blocks' inputs, held for all the
# calibration batches: each block runs a few times instead of the whole network once per layer
# (210 layers of a 30-block LM: 30x fewer forward passes). The chain is checked on the first batch
# (block i's output is block i+1's input, given the arguments the real forward gave it), else the
# layer-by-layer path runs.


HOLD_MB = 2048  # above this, the blocks' inputs are not held: layer by layer, streaming


def _stacks(model: nn.Module, fqns: list[str]) -> list[list[str]]:
    """Candidate stacks, those covering the most targets first (then those with the most blocks
    holding one): the children of any module (a ModuleList or Sequential, or a network whose own
    forward chains its stem, stages and head) when at least two of them hold targets. Whether the
    children really chain is checked by the caller."""
    found: list[tuple[int, int, list[str]]] = []
    for name, m in model.named_modules():
        kids = [f"{name}.{k}" if name else k for k in m._modules]
        if len(kids) >= 2:
            inside = [sum(f == kid or f.startswith(kid + ".") for f in fqns) for kid in kids]
            holding = sum(n > 0 for n in inside)
            if holding >= 2:
                found.append((sum(inside), holding, kids))
    return [kids for *_, kids in sorted(found, key=lambda t: (-t[0], -t[1]))]


Call = tuple[tuple, dict]  # a block's positional and keyword arguments


def _hidden(out: object) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out[0]  # type: ignore[index]


def _with_hidden(call: Call, h: torch.Tensor) -> Call:
    args, kwargs = call
    if args:
        return (h, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": h}


def _block_calls(model: nn.Module, blocks: list[str], x: Inputs, stop_at_first: bool) -> list[Call]:
    """The arguments each block is called with in a forward pass on ``x`` (the first only, cut there,
    with ``stop_at_first``). State objects (a KV cache) are dropped: a rerun must not append to one."""
    calls: list[Call] = []

    def keep(v: object) -> object:
        if isinstance(v, torch.Tensor):
            return v.detach().clone()  # the block may work in place (ReLU(inplace=True))
        if v is None or isinstance(v, (bool, int, float, str)):
            return v
        if isinstance(v, tuple) and all(isinstance(t, torch.Tensor) for t in v):
            return v
        return None

    def hook(_m, args, kwargs):
        calls.append((tuple(keep(a) for a in args), {k: keep(v) for k, v in kwargs.items()}))
        if stop_at_first:
            raise StopForward

    handles = [model.get_submodule(b).register_forward_pre_hook(hook, with_kwargs=True) for b in blocks]
    with hooked(handles), torch.no_grad():
        forward(model, x)
    return calls


def _hidden_of(call: Call) -> torch.Tensor | None:
    args, kwargs = call
    h = args[0] if args else kwargs.get("hidden_states")
    return h if isinstance(h, torch.Tensor) else None


@torch.no_grad()
def _chain_bytes(model: nn.Module, blocks: list[str], x: Inputs) -> int | None:
    """Bytes per example of the largest hidden state between the blocks when the chain holds on
    ``x`` (block i's output is block i+1's input), else None."""
    calls = _block_calls(model, blocks, x, stop_at_first=False)
    hidden = [_hidden_of(c) for c in calls]
    if len(calls) != len(blocks) or any(h is None for h in hidden):
        return None  # a block called twice or not at all, or no hidden-state argument to feed
    for i in range(len(blocks) - 1):
        args, kwargs = calls[i]
        try:
            out = _hidden(model.get_submodule(blocks[i])(*args, **kwargs))
        except Exception:  # calls in another order than the blocks are listed: no chain
            return None
        nxt = hidden[i + 1]
        if not isinstance(out, torch.Tensor) or nxt is None or out.shape != nxt.shape:
            return None
        if not torch.allclose(out, nxt, rtol=1e-4, atol=1e-5 * float(nxt.abs().max())):
            return None
    return max(h.numel() * h.element_size() for h in hidden if h is not None) // max(batch_len(x), 1)


def _caller(block: nn.Module, call: Call) -> Callable[[], object]:
    return lambda: block(*call[0], **call[1])


def _listed(zs: list[torch.Tensor], hs: list[torch.Tensor]) -> Source:
    return lambda: zip(zs, hs, strict=True)


@torch.no_grad()
def _dense_block_pass(
    dblock: nn.Module, block: str, layers: list[str], calls: list[Call]
) -> tuple[dict[str, list[torch.Tensor]], list[Call]]:
    """The dense inputs of every layer of the block (the first call in each batch), and the next
    block's calls, from one pass over the batches."""
    z: dict[str, list[torch.Tensor]] = {f: [] for f in layers}
    batch = [0]

    def recorder(f: str):
        def hook(_m, args):
            if len(z[f]) == batch[0]:
                z[f].append(args[0].detach())

        return hook

    hooks = [dblock.get_submodule(f[len(block) + 1 :]).register_forward_pre_hook(recorder(f)) for f in layers]
    nxt: list[Call] = []
    with hooked(hooks):
        for i, c in enumerate(calls):
            batch[0] = i
            nxt.append(_with_hidden(c, _hidden(dblock(*c[0], **c[1]))))
    missing = [f for f in layers if len(z[f]) != len(calls)]
    if missing:
        raise RankdownError(f"layer {missing[0]!r} was not called in a forward pass of its block")
    return z, nxt


def _blockwise(
    dense: nn.Module, compressed: nn.Module, blocks: list[str], order: list[str], data: Batches, config
) -> dict[str, LayerFit]:
    # one pass over the examples: what the first block is called with, per batch (held: the caller
    # checked that the hidden states fit), and the token masks (the fits see real tokens only)
    dense_calls: list[Call] = []
    masks: list[torch.Tensor | None] = []
    comp_h: list[torch.Tensor | None] = []
    for xb in data.rebatch(config.batch_size):
        dense_calls.append(_block_calls(dense, blocks, xb, True)[0])
        masks.append(token_mask(xb))
        comp_h.append(_hidden_of(_block_calls(compressed, blocks, xb, True)[0]))
    n = len(dense_calls)
    results: dict[str, LayerFit] = {}
    bar = progress(blocks, total=len(blocks), desc=f"calibrate ({config.mode}, block by block)")
    for block in bar:
        dblock, cblock = dense.get_submodule(block), compressed.get_submodule(block)
        layers = [f for f in order if f == block or f.startswith(block + ".")]
        comp_calls = [_with_hidden(c, h) for c, h in zip(dense_calls, comp_h, strict=True)]  # type: ignore[arg-type]
        z, next_dense = _dense_block_pass(dblock, block, layers, dense_calls)
        for f in layers:
            module = compressed.get_submodule(f)
            if _kept_dense(dense, module, f):
                continue
            rel = f[len(block) + 1 :]  # "": the block is the layer (a plain Sequential of layers)
            hs = z[f]
            if config.mode == "joint":
                hs = [_capture_input(cblock, rel, _caller(cblock, c)) for c in comp_calls]
            act = following_activation(dense, f) if config.nonlinear else None
            zs = [real_rows(t, m) for t, m in zip(z[f], masks, strict=True)]
            hs = [real_rows(t, m) for t, m in zip(hs, masks, strict=True)]
            pairs = _Pairs(dense.get_submodule(f), _listed(zs, hs), n, config, act)
            results[f] = _refit(dense, f, module, pairs, config)
            z[f] = []
        with torch.no_grad():
            comp_h = [_hidden(cblock(*c[0], **c[1])) for c in comp_calls]
        dense_calls = next_dense
    return results


def reconstruct(
    dense: nn.Module,
    compressed: nn.Module,
    fqns: list[str],
    inputs: Examples,
    config: CalibrationConfig | None = None,
) -> dict[str, LayerFit]:
    """Refit the factorized modules at ``fqns`` of ``compressed`` (in place) to ``dense``'s layer
    outputs on ``inputs`` (one batch or a stream: every pass reads it in batches); returns per layer
    the relative output error before and after."""
    config = config or CalibrationConfig()
    data = stream(inputs)
    n_examples = data.examples
    if n_examples < 1:
        raise RankdownError("data reconstruction needs at least one calibration example")
    # At least 4 batches whenever there are 4 examples, so that one is held out to choose the ridge
    # and keep a refit (see _holdout): 128 examples in batches of 64 had none, and an exact fit then
    # interpolated them (CharNet under a quick refit: output error 20× the signal). Token
    # sequences: batches by tokens too.
    one = data.first(1)
    size = min(config.batch_size, batch_size_for(one, config.batch_size), max(1, math.ceil(n_examples / 4)))
    config = replace(config, batch_size=size)
    dense.eval()
    compressed.eval()
    order = execution_order(dense, list(fqns), one)
    blocks = None
    for candidate in _stacks(dense, order):
        per_example = _chain_bytes(dense, candidate, one)
        # held for every example, each about a hidden state's size: the dense and compressed inputs
        # of the current block, the next block's dense inputs, the dense inputs of each of the
        # block's layers and one layer's compressed inputs (a ResNet block of 3 layers: 7; counting
        # 4, as this once did, let the held states reach about twice HOLD_MB)
        per_block = max(sum(f == b or f.startswith(b + ".") for f in order) for b in candidate)
        if per_example is not None and (4 + per_block) * per_example * n_examples <= HOLD_MB * 2**20:
            blocks = candidate
            break
    inside = [f for f in order if blocks and any(f == b or f.startswith(b + ".") for b in blocks)]
    if inside and order.index(inside[-1]) - order.index(inside[0]) + 1 != len(inside):
        inside = []  # a target outside the stack runs between its blocks: layer by layer
    before = order[: order.index(inside[0])] if inside else order
    after = order[order.index(inside[-1]) + 1 :] if inside else []
    results: dict[str, LayerFit] = {}

    def one_by_one(names: list[str]) -> None:
        if not names:
            return
        for fqn in progress(names, total=len(names), desc=f"calibrate ({config.mode})"):
            dense_layer, module = dense.get_submodule(fqn), compressed.get_submodule(fqn)
            if _kept_dense(dense, module, fqn):
                continue
            act = following_activation(dense, fqn) if config.nonlinear else None
            n = math.ceil(n_examples / config.batch_size)
            source = _truncated_source(dense, compressed, fqn, data, config)
            results[fqn] = _refit(dense, fqn, module, _Pairs(dense_layer, source, n, config, act), config)

    one_by_one([f for f in before if f not in inside])
    if inside:
        assert blocks is not None
        results.update(_blockwise(dense, compressed, blocks, inside, data, config))
    one_by_one([f for f in after if f not in inside])
    return results
