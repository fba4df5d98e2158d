"""Measurement: parameters and MACs per layer, and wall-clock latency guarded against other load.

MACs are counted for Conv2d and Linear only (the layers rankdown changes), by forward hooks, so a
factorized layer — a chain of stock Conv2d/Linear — is counted by the same code as a dense one.
This is the only home of the MAC formulas.
"""

from __future__ import annotations

import contextlib
import copy
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass, replace
from typing import cast

import torch
from torch import nn

from rankdown.layers import FactorizedLayer
from rankdown.probe import Inputs, batch_len, forward, to_layout
from rankdown.progress import progress
from rankdown.surgery import hooked


@dataclass(frozen=True)
class Cost:
    params: int
    macs: int  # multiply-accumulates for one example

    def __add__(self, other: Cost) -> Cost:
        return Cost(self.params + other.params, self.macs + other.macs)


def _leaf_macs(module: nn.Module, inp: torch.Tensor, out: torch.Tensor) -> int:
    batch = out.shape[0] if out.ndim > 1 else 1
    per_out = out.numel() // max(batch, 1)
    if isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        return per_out * (module.in_channels // module.groups) * kh * kw
    if isinstance(module, nn.Linear):
        return per_out * module.in_features
    declared = module.macs_per_position() if isinstance(module, FactorizedLayer) else None
    if declared is not None:  # a layer that is no chain of stock layers (TTLinear) states its own cost
        return per_out // out.shape[-1] * declared
    return 0


def count_macs(model: nn.Module, example: Inputs) -> dict[str, int]:
    """MACs of every Conv2d/Linear in ``model`` for one example, by fully qualified name."""
    macs: dict[str, int] = {}
    handles = []
    for name, mod in model.named_modules():
        if isinstance(mod, (nn.Conv2d, nn.Linear)) or hasattr(mod, "macs_per_position"):

            def hook(m, args, out, name=name):
                macs[name] = macs.get(name, 0) + _leaf_macs(m, args[0], out)

            handles.append(mod.register_forward_hook(hook))
    with hooked(handles), torch.no_grad():
        forward(model, example)
    return macs


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def layer_costs(model: nn.Module, example: Inputs, fqns: list[str]) -> dict[str, Cost]:
    """Cost of each named subtree (a dense layer or the factorized module that replaced it)."""
    macs = count_macs(model, example)
    out = {}
    for fqn in fqns:
        sub = model.get_submodule(fqn)
        m = sum(v for k, v in macs.items() if k == fqn or k.startswith(fqn + "."))
        out[fqn] = Cost(n_params(sub), m)
    return out


def model_cost(model: nn.Module, example: Inputs) -> Cost:
    return Cost(n_params(model), sum(count_macs(model, example).values()))


def module_cost(module: nn.Module, example: torch.Tensor) -> Cost:
    """Cost of one module on one example; works on the meta device, so candidates cost nothing to try."""
    return Cost(n_params(module), sum(count_macs(module, example).values()))


# --------------------------------------------------------------------------- latency


def _cpu_ticks() -> tuple[int, int] | None:
    """(busy, total) jiffies of the whole machine, or None where /proc/stat is absent."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except OSError:
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return sum(fields) - idle, sum(fields)


def _own_ticks() -> int:
    t = os.times()
    return round((t.user + t.system) * os.sysconf("SC_CLK_TCK"))


class LoadGuard:
    """Measures the share of the machine's CPU time spent by *other* processes during a window.

    On a shared 2-core machine one busy foreign process slows 2-thread torch by 10-100x
    (shared/anchors/cpu_RESULTS.md), so timing windows with foreign load are thrown away.
    """

    def __init__(self) -> None:
        self.available = _cpu_ticks() is not None

    def start(self) -> tuple[tuple[int, int] | None, int]:
        return _cpu_ticks(), _own_ticks()

    def foreign_share(self, start) -> float:
        (busy0, total0), own0 = start[0], start[1]
        busy1, total1 = _cpu_ticks()  # type: ignore[misc]
        dt = total1 - total0
        if dt <= 0:
            return 0.0
        foreign = (busy1 - busy0) - (_own_ticks() - own0)
        return max(0.0, foreign / dt)


@dataclass
class Latency:
    median_ms: float
    p25_ms: float
    p75_ms: float
    runs: int
    batch: int
    threads: int
    channels_last: bool
    foreign_share_max: float | None  # None when unguarded
    rejected_windows: int
    contended: bool  # True when the guard gave up waiting for a quiet machine

    def to_dict(self) -> dict:
        return asdict(self)


def measure_latency(
    model: nn.Module,
    example: Inputs,
    *,
    runs: int = 30,
    warmup: int = 5,
    threads: int | None = None,
    channels_last: bool = False,
    guard: bool = True,
    window_s: float = 0.3,
    max_foreign: float = 0.05,
    max_rejects: int = 30,
    desc: str = "latency",
) -> Latency:
    """Median latency of ``model(example)`` in eval/inference mode after ``warmup`` calls.

    With ``guard``, calls are grouped in windows of at least ``window_s`` (the kernel's tick is
    10 ms); a window in which other processes used more than ``max_foreign`` of the CPUs is
    discarded and re-run, up to ``max_rejects`` times, after which results are marked contended.
    """
    if runs < 1:
        raise ValueError(f"runs must be >= 1, got {runs}")
    old_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    model = model.eval()
    x = example
    if channels_last and isinstance(example, torch.Tensor) and example.ndim == 4:
        model = to_layout(model, True)
        x = example.contiguous(memory_format=torch.channels_last)
    else:
        channels_last = False
    lg = LoadGuard() if guard else None
    guarded = bool(lg and lg.available)
    times: list[float] = []
    rejected, share_max, contended = 0, 0.0, False
    try:
        with torch.inference_mode():
            for _ in range(warmup):
                forward(model, x)
            bar = progress(range(runs), total=runs, desc=desc)
            pending = iter(bar)
            while len(times) < runs:
                start = lg.start() if lg is not None and guarded else None
                t_window = time.perf_counter()
                window: list[float] = []
                while True:
                    t0 = time.perf_counter()
                    forward(model, x)
                    window.append(time.perf_counter() - t0)
                    if len(times) + len(window) >= runs and not guarded:
                        break
                    if time.perf_counter() - t_window >= window_s or len(times) + len(window) >= runs * 4:
                        break
                if lg is not None and guarded:
                    share = lg.foreign_share(start)
                    if share > max_foreign and rejected < max_rejects:
                        rejected += 1
                        continue
                    contended = contended or share > max_foreign
                    share_max = max(share_max, share)
                for t in window:
                    if len(times) < runs:
                        times.append(t)
                        next(pending, None)
    finally:
        if threads is not None:
            torch.set_num_threads(old_threads)
        if channels_last:
            to_layout(model, False)
    q = statistics.quantiles(times, n=4) if len(times) >= 2 else [times[0]] * 3
    return Latency(
        median_ms=statistics.median(times) * 1e3,
        p25_ms=q[0] * 1e3,
        p75_ms=q[2] * 1e3,
        runs=len(times),
        batch=batch_len(example),
        threads=threads or torch.get_num_threads(),
        channels_last=channels_last,
        foreign_share_max=share_max if guarded else None,
        rejected_windows=rejected,
        contended=contended,
    )


def best_latency(model: nn.Module, example: Inputs, **kw) -> Latency:
    """The faster of NCHW and channels_last (4-D inputs): speedups are measured against the
    fastest dense layout, since channels_last alone speeds dense CNNs up 1.6-1.8x on CPU."""
    first = measure_latency(model, example, channels_last=False, **kw)
    if not isinstance(example, torch.Tensor) or example.ndim != 4:
        return first
    second = measure_latency(model, example, channels_last=True, **kw)
    return min(first, second, key=lambda lat: lat.median_ms)


def compiled_latency(model: nn.Module, example: Inputs, *, freezing: tuple[bool, ...] = (False, True), **kw) -> Latency:
    """The fastest torch.compile (inductor) form: each layout (4-D inputs), each with and without
    inductor's freezing (weights become constants, which lets it prepack them for oneDNN; which
    of the two is faster depends on the model).
    Each form is compiled afresh from a copy and run once before it is timed, so the compile time
    is not timed; the result's ``channels_last`` says which layout won."""
    import torch._inductor.config as inductor

    best: Latency | None = None
    layouts = (False, True) if isinstance(example, torch.Tensor) and example.ndim == 4 else (False,)
    for cl in layouts:
        for freeze in freezing:
            torch._dynamo.reset()
            m, x = copy.deepcopy(model).eval(), example
            if cl and isinstance(x, torch.Tensor):
                m, x = to_layout(m, True), x.contiguous(memory_format=torch.channels_last)
            with inductor.patch(freezing=freeze), torch.inference_mode():
                compiled = cast(nn.Module, torch.compile(m))  # an OptimizedModule, typed as a callable
                lat = measure_latency(compiled, x, **kw)
            lat = replace(lat, channels_last=cl)
            if best is None or lat.median_ms < best.median_ms:
                best = lat
    torch._dynamo.reset()
    assert best is not None
    return best


def environment() -> dict[str, str]:
    """Machine and versions, written beside every measurement."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    import numpy

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "platform": platform.platform(),
        "cpu": cpu,
        "cpu_count": str(os.cpu_count()),
        "torch_threads": str(torch.get_num_threads()),
    }


def compare_latency(
    dense: nn.Module | None,
    compressed: nn.Module,
    example,
    *,
    batch_sizes: tuple[int, ...] = (1, 64),
    runs: int = 30,
    threads: int | None = 2,
    guard: bool = True,
    seed: int = 0,
) -> dict[str, dict]:
    """Latency of both models per batch size, each in its fastest memory layout; speedup =
    dense/compressed. Inputs: seeded N(0, 1) of the example's shape for a float tensor example,
    else the example (token ids, keyword inputs) repeated to the batch size."""
    from rankdown.probe import batch_tile, example_input

    out: dict[str, dict] = {}
    for b in batch_sizes:
        x: Inputs
        if isinstance(example, torch.Tensor) and example.is_floating_point():
            x = example_input(compressed, tuple(example.shape[1:]), b, random=True, seed=seed + b)
        else:
            x = batch_tile(example, b)
        # Fewer repeats at large batch: each call is long enough to time on its own.
        n = max(5, runs // 3) if b > 8 else runs
        row: dict = {"batch": b, "runs": n}
        if dense is not None:
            row["dense"] = best_latency(dense, x, runs=n, threads=threads, guard=guard, desc=f"dense b{b}").to_dict()
        row["compressed"] = best_latency(
            compressed, x, runs=n, threads=threads, guard=guard, desc=f"compressed b{b}"
        ).to_dict()
        if dense is not None:
            row["speedup"] = row["dense"]["median_ms"] / row["compressed"]["median_ms"]
        out[f"batch_{b}"] = row
    return out
