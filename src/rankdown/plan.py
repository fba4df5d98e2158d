"""Plans (versioned JSON: per layer, method and rank) and compressed-model folders.

A compressed model is saved as ``plan.json`` + ``model.safetensors`` (+ ``report.json``).
Loading builds the original architecture from its definition, applies the plan to get the
factorized structure, then loads the tensors: nothing is ever unpickled.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from rankdown.errors import OutputExistsError, PlanError, RankError
from rankdown.methods import Rank, get_method
from rankdown.surgery import get_module, replace_module

PLAN_FORMAT = "rankdown-plan"
PLAN_VERSION = 1
PLAN_FILE, WEIGHTS_FILE, REPORT_FILE = "plan.json", "model.safetensors", "report.json"


@dataclass(frozen=True)
class LayerPlan:
    method: str
    rank: Rank
    layer_type: str  # "Conv2d" / "Linear": checked against the fresh model on apply
    weight_shape: tuple[int, ...]


@dataclass
class Plan:
    layers: dict[str, LayerPlan]
    model: str | None = None  # how to rebuild the original: bundled name or package.module:factory
    input_shape: tuple[int, ...] | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        layers = {}
        for fqn, lp in self.layers.items():
            method = get_method(lp.method, getattr(nn, lp.layer_type))
            layers[fqn] = {
                "method": lp.method,
                "rank": method.rank_to_json(lp.rank),
                "layer_type": lp.layer_type,
                "weight_shape": list(lp.weight_shape),
            }
        return {
            "format": PLAN_FORMAT,
            "version": PLAN_VERSION,
            "model": self.model,
            "input_shape": list(self.input_shape) if self.input_shape else None,
            "layers": layers,
            "meta": self.meta,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, d: Any) -> Plan:
        if not isinstance(d, dict) or d.get("format") != PLAN_FORMAT:
            raise PlanError(f"not a rankdown plan (expected format {PLAN_FORMAT!r})")
        if d.get("version") != PLAN_VERSION:
            raise PlanError(f"plan version {d.get('version')!r} is not supported (this rankdown reads {PLAN_VERSION})")
        layers = {}
        try:
            for fqn, e in d["layers"].items():
                if e["layer_type"] not in ("Conv2d", "Linear"):
                    raise PlanError(f"plan layer {fqn!r}: unknown layer type {e['layer_type']!r}")
                try:
                    method = get_method(e["method"], getattr(nn, e["layer_type"]))
                except RankError as exc:
                    raise PlanError(f"plan layer {fqn!r}: {exc}") from None
                layers[fqn] = LayerPlan(
                    e["method"],
                    method.rank_from_json(e["rank"]),
                    e["layer_type"],
                    tuple(int(v) for v in e["weight_shape"]),
                )
        except (KeyError, TypeError, AttributeError) as exc:
            raise PlanError(f"malformed plan: {type(exc).__name__}: {exc}") from exc
        shape = d.get("input_shape")
        return cls(layers, d.get("model"), tuple(shape) if shape else None, d.get("meta") or {})

    @classmethod
    def from_json(cls, text: str) -> Plan:
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as exc:
            raise PlanError(f"plan is not valid JSON: {exc}") from exc


def apply_plan(model: nn.Module, plan: Plan) -> nn.Module:
    """Give a freshly built model the plan's factorized structure (weights uninitialised: load them next)."""
    for fqn, lp in plan.layers.items():
        dense = get_module(model, fqn)
        if type(dense).__name__ != lp.layer_type or tuple(dense.weight.shape) != lp.weight_shape:
            raise PlanError(
                f"plan layer {fqn!r} expects {lp.layer_type} with weight {lp.weight_shape}, model has "
                f"{type(dense).__name__} with weight {tuple(getattr(dense, 'weight', torch.empty(0)).shape)}"
            )
        replace_module(model, fqn, get_method(lp.method, type(dense)).build(dense, lp.rank))
    return model


# --------------------------------------------------------------------------- folders


def _atomic_write_dir(out: Path, write: Callable[[Path], None], force: bool) -> None:
    """Write into a sibling temp folder, then rename: a crash leaves no half-written output."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"output {out} exists and is not a folder")
    if out.exists() and any(out.iterdir()) and not force:
        raise OutputExistsError(f"output folder {out} is not empty; pass --force (force=True) to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        write(tmp)
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / "x")
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write a file through a temp file and a rename: readers never see half of it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def save_compressed(
    out: str | Path, model: nn.Module, plan: Plan, report: dict | None = None, *, force: bool = False
) -> Path:
    def write(tmp: Path) -> None:
        (tmp / PLAN_FILE).write_text(plan.to_json() + "\n")
        state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": PLAN_FORMAT})
        if report is not None:
            (tmp / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")

    _atomic_write_dir(Path(out), write, force)
    return Path(out)


def read_plan(folder: str | Path) -> Plan:
    path = Path(folder) / PLAN_FILE
    if not path.is_file():
        raise PlanError(f"{folder} holds no {PLAN_FILE}: not a rankdown output folder")
    return Plan.from_json(path.read_text())


def load_compressed(folder: str | Path, model: nn.Module) -> nn.Module:
    """Apply the folder's plan to ``model`` (freshly built, original architecture) and load its weights."""
    plan = read_plan(folder)
    weights = Path(folder) / WEIGHTS_FILE
    if not weights.is_file():
        raise PlanError(f"{folder} holds no {WEIGHTS_FILE}")
    try:
        state = load_file(str(weights))
    except Exception as exc:  # safetensors raises its own error types for a corrupt file
        raise PlanError(f"{weights} could not be read ({type(exc).__name__}: {exc})") from exc
    apply_plan(model, plan)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise PlanError(f"{weights} does not match the plan's architecture: {exc}") from exc
    return model.eval()
