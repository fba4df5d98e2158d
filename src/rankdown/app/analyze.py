"""What a user looks at before choosing a budget: per-layer spectra, EVBMF ranks, energy curves
and sensitivity curves, as a table, JSON and PNG plots."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rankdown import decompose
from rankdown.measurement.bench import count_macs
from rankdown.planning.allocate import sensitivity
from rankdown.planning.compress import CompressConfig, data_targets
from rankdown.probe import Examples, stream
from rankdown.storage import atomic_write_dir
from rankdown.surgery import weight_of


def _unfoldings(w: torch.Tensor) -> dict[str, torch.Tensor]:
    if w.ndim == 2:
        return {"out": w}
    return {"out": w.reshape(w.shape[0], -1), "in": w.transpose(0, 1).reshape(w.shape[1], -1)}


@dataclass
class LayerAnalysis:
    """One layer: its spectra per unfolding, EVBMF and energy ranks, and its sensitivity curve
    (relative error against the fraction of the layer's MACs kept)."""

    name: str
    type: str
    shape: list[int]
    method: str
    macs: int
    macs_share: float
    spectra: dict[str, list[float]] = field(default_factory=dict)
    evbmf: dict[str, int] = field(default_factory=dict)
    energy_rank: dict[str, dict[str, int]] = field(default_factory=dict)
    sensitivity: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Analysis:
    """What ``rankdown analyze`` found; ``to_dict()`` is analysis.json."""

    criterion: str
    calibration_examples: int
    layers: list[LayerAnalysis]
    skipped: dict[str, str]
    model: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def analyze_model(
    model: nn.Module,
    config: CompressConfig,
    calibration: Examples,
    *,
    criterion: str = "layer",
    cache_dir: str | Path | None = None,
) -> Analysis:
    """Per-layer spectra, EVBMF and energy ranks, and sensitivity (error vs kept MACs)."""
    model = model.eval()
    calibration = stream(calibration)
    found = data_targets(model, config, calibration)
    selection, targets = found.selection, found.methods
    macs = count_macs(model, found.example)
    total_macs = sum(macs.values()) or 1
    curves = sensitivity(
        model, targets, calibration, criterion=criterion, cache_dir=Path(cache_dir) if cache_dir else None
    )
    layers = []
    for name, method in targets.items():
        w = weight_of(model.get_submodule(name)).detach()
        row = LayerAnalysis(
            name,
            type(model.get_submodule(name)).__name__,
            list(w.shape),
            method.name,
            macs.get(name, 0),
            macs.get(name, 0) / total_macs,
        )
        for mode, mat in _unfoldings(w).items():
            s = decompose.singular_values(mat)
            row.spectra[mode] = s.tolist()
            row.evbmf[mode] = decompose.evbmf(mat).rank
            row.energy_rank[mode] = {str(e): decompose.energy_rank(s, e) for e in (0.9, 0.95, 0.99)}
        dense = curves[name].options[-1]
        row.sensitivity = [
            {"rank": o.rank, "macs_kept": o.macs / max(dense.macs, 1), "error": o.error}
            for o in curves[name].options[:-1]
        ]
        layers.append(row)
    return Analysis(criterion, calibration.examples, layers, dict(selection.skipped))


def _save(fig: Any, ax: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_analysis(result: Analysis, folder: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for row in result.layers:
        s = torch.tensor(row.spectra["out"])
        ax.semilogy(torch.arange(1, len(s) + 1) / len(s), s / s[0], label=row.name)
    ax.set(
        xlabel="rank / full rank (output-mode unfolding)",
        ylabel="singular value / largest",
        title="Singular-value spectra",
    )
    paths.append(_save(fig, ax, folder / "spectra.png"))

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for row in result.layers:
        s2 = torch.tensor(row.spectra["out"]) ** 2
        ax.plot(torch.arange(1, len(s2) + 1) / len(s2), torch.cumsum(s2, 0) / s2.sum(), label=row.name)
    for e in (0.9, 0.95, 0.99):
        ax.axhline(e, color="gray", lw=0.5, ls=":")
    ax.set(xlabel="rank / full rank", ylabel="energy kept", title="Energy curves (output mode)")
    paths.append(_save(fig, ax, folder / "energy.png"))

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for row in result.layers:
        pts = sorted((p["macs_kept"], p["error"]) for p in row.sensitivity)
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=".", label=f"{row.name} ({row.method})")
    ax.set(
        xlabel="fraction of the layer's MACs kept",
        ylabel=f"relative error ({result.criterion} output)",
        title="Sensitivity",
        yscale="log",
    )
    paths.append(_save(fig, ax, folder / "sensitivity.png"))
    return paths


def save_analysis(result: Analysis, out: str | Path, *, force: bool = False) -> Path:
    def write(tmp: Path) -> None:
        (tmp / "analysis.json").write_text(json.dumps(result.to_dict(), indent=1) + "\n")
        plot_analysis(result, tmp)

    atomic_write_dir(Path(out), write, force)
    return Path(out)


def render_analysis(result: Analysis) -> None:
    import sys

    from rich.console import Console
    from rich.table import Table

    console = Console(file=sys.stdout)
    if not console.is_terminal:
        console = Console(file=sys.stdout, width=150)
    t = Table(
        title=f"rankdown analyze — sensitivity: {result.criterion} output, "
        f"{result.calibration_examples} calibration examples",
        title_justify="left",
    )
    for col in ("layer", "shape", "MACs %", "EVBMF out/in", "energy 90/95/99% (out)", "error at ½ MACs"):
        t.add_column(col, justify="left" if col in ("layer", "shape") else "right")
    for row in result.layers:
        ev = "/".join(str(row.evbmf[m]) for m in ("out", "in") if m in row.evbmf)
        en = "/".join(str(v) for v in row.energy_rank["out"].values())
        half = [p for p in row.sensitivity if p["macs_kept"] <= 0.5]
        err = f"{max(half, key=lambda p: p['macs_kept'])['error']:.3f}" if half else "-"
        t.add_row(row.name, "×".join(map(str, row.shape)), f"{100 * row.macs_share:.1f}", ev, en, err)
    console.print(t)
