"""Plans (versioned JSON: per layer, method and rank) and compressed-model folders.

A compressed model is saved as ``plan.json`` + ``model.safetensors`` (+ ``report.json``).
Loading builds the original architecture from its definition, applies the plan to get the
factorized structure, then loads the tensors: nothing is ever unpickled.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from rankdown.errors import PlanError, RankError
from rankdown.methods import Rank, computes_as_plain, get_method
from rankdown.storage import atomic_write_dir
from rankdown.surgery import get_module, replace_module, weight_of

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
        """Every field is validated: a plan is data, and a value is not trusted because it parses."""
        if not isinstance(d, dict) or d.get("format") != PLAN_FORMAT:
            raise PlanError(f"not a rankdown plan (expected format {PLAN_FORMAT!r})")
        if d.get("version") != PLAN_VERSION:
            raise PlanError(f"plan version {d.get('version')!r} is not supported (this rankdown reads {PLAN_VERSION})")
        layers = {}
        entries = d.get("layers")
        if not isinstance(entries, dict):
            raise PlanError("malformed plan: 'layers' must be an object of layer name -> entry")
        for fqn, e in entries.items():
            if not isinstance(e, dict) or not {"method", "rank", "layer_type", "weight_shape"} <= set(e):
                raise PlanError(f"malformed plan: layer {fqn!r} needs method, rank, layer_type and weight_shape")
            if e["layer_type"] not in ("Conv2d", "Linear"):
                raise PlanError(f"plan layer {fqn!r}: unknown layer type {e['layer_type']!r}")
            try:
                method = get_method(e["method"], getattr(nn, e["layer_type"]))
                rank = method.rank_from_json(e["rank"])
            except (RankError, TypeError) as exc:
                raise PlanError(f"plan layer {fqn!r}: {exc}") from None
            ndim = 4 if e["layer_type"] == "Conv2d" else 2
            layers[fqn] = LayerPlan(
                e["method"], rank, e["layer_type"], _sizes(e["weight_shape"], f"layer {fqn!r}", ndim)
            )
        model = d.get("model")
        if model is not None and not isinstance(model, str):
            raise PlanError(f"malformed plan: 'model' must be a string, got {type(model).__name__}")
        input_shape = d.get("input_shape")
        meta = d.get("meta", {})
        if meta is None:
            meta = {}
        if not isinstance(meta, dict):
            raise PlanError(f"malformed plan: 'meta' must be an object, got {type(meta).__name__}")
        return cls(layers, model, None if input_shape is None else _sizes(input_shape, "input_shape"), meta)

    @classmethod
    def from_json(cls, text: str) -> Plan:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise PlanError(f"plan is not valid JSON: {exc}") from exc
        except RecursionError:
            raise PlanError("plan is not valid JSON: nested too deeply") from None
        return cls.from_dict(data)


def _sizes(value: Any, what: str, ndim: int | None = None) -> tuple[int, ...]:
    """A list of positive integer sizes (as many as ``ndim``), and not absurdly many values."""
    ok = (
        isinstance(value, list)
        and 0 < len(value) <= 8
        and all(isinstance(v, int) and not isinstance(v, bool) and 0 < v <= 2**31 for v in value)
    )
    if not ok or (ndim is not None and len(value) != ndim) or math.prod(value) > 2**34:
        want = f"{ndim} positive sizes" if ndim else "positive sizes"
        raise PlanError(f"malformed plan: {what} must be a list of {want}, got {value!r}")
    return tuple(value)


def apply_plan(model: nn.Module, plan: Plan) -> nn.Module:
    """Give a freshly built model the plan's factorized structure (weights uninitialised: load them next)."""
    for fqn, lp in plan.layers.items():
        dense = get_module(model, fqn)
        ltype = getattr(nn, lp.layer_type)
        plain = type(dense) is ltype or computes_as_plain(dense, ltype)
        if not plain or tuple(weight_of(dense).shape) != lp.weight_shape:
            raise PlanError(
                f"plan layer {fqn!r} expects {lp.layer_type} with weight {lp.weight_shape}, model has "
                f"{type(dense).__name__} with weight {tuple(getattr(dense, 'weight', torch.empty(0)).shape)}"
            )
        method = get_method(lp.method, ltype)
        try:
            method.validate_rank(dense, lp.rank)
        except RankError as exc:
            raise PlanError(f"plan layer {fqn!r}: {exc}") from None
        replace_module(model, fqn, method.build(dense, lp.rank))
    return model


# --------------------------------------------------------------------------- folders


def tied_aliases(model: nn.Module) -> dict[str, str]:
    """State-dict keys that name the same tensor as an earlier key (tied weights) -> that key."""
    seen: dict[tuple[int, int, tuple[int, ...]], str] = {}
    out = {}
    for k, v in model.state_dict(keep_vars=True).items():
        ident = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape))
        if ident in seen and v.numel() > 0:
            out[k] = seen[ident]
        else:
            seen[ident] = k
    return out


def untied_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict with each tied tensor once (safetensors refuses shared memory; the model
    built again ties them itself), for any safetensors file of a model's weights."""
    aliases = tied_aliases(model)
    return {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items() if k not in aliases}


def retied_state(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` read from an untied file, with each tied key of ``model`` filled from the key it
    was stored under."""
    aliases = tied_aliases(model)
    return {**state, **{k: state[a] for k, a in aliases.items() if k not in state and a in state}}


def save_compressed(
    out: str | Path,
    model: nn.Module,
    plan: Plan,
    report: dict | None = None,
    *,
    force: bool = False,
    keep: tuple[str, ...] = (),
) -> Path:
    """Write plan + weights (+ report) as one folder, atomically; ``keep``: entries of the folder
    being replaced that the new one carries over (a fine-tuned folder's checkpoints)."""

    def write(tmp: Path) -> None:
        (tmp / PLAN_FILE).write_text(plan.to_json() + "\n")
        save_file(untied_state(model), str(tmp / WEIGHTS_FILE), metadata={"format": PLAN_FORMAT})
        if report is not None:
            (tmp / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")

    atomic_write_dir(Path(out), write, force, keep=keep)
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
    from rankdown.models.load import state_dict_mismatch

    apply_plan(model, plan)
    state = retied_state(model, state)  # tied in the model built again: stored once, under the first name
    mismatch = state_dict_mismatch(model, state)
    if mismatch:
        raise PlanError(f"{weights} does not match the plan's architecture: {mismatch}")
    bad = next((k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())), None)
    if bad is not None:
        raise PlanError(f"{weights}: {bad} holds NaN or Inf values")
    model.load_state_dict(state, strict=True)
    return model.eval()
