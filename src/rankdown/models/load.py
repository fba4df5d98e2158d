"""Loading a user's model: ``package.module:factory`` callables, weights files (safetensors, or
torch files read with ``weights_only=True``: never unpickled code) and Hugging Face folders.
The bundled demo models live in :mod:`rankdown.zoo`, which builds on this module."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from rankdown.errors import RankdownError, first_line


class ModelError(RankdownError):
    """A model spec, factory or weights file could not be used."""


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from safetensors, or from a torch file with ``weights_only=True``."""
    import pickle

    path = Path(path)
    if not path.is_file():
        raise ModelError(f"weights file {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ModelError(
            f"weights file {path} holds Python objects, not only tensors; rankdown reads torch files with "
            "weights_only=True and never unpickles code: save model.state_dict() (or safetensors) instead"
        ) from exc
    except Exception as exc:  # safetensors and torch raise several types for a bad file
        raise ModelError(f"weights file {path} could not be read ({first_line(exc)})") from exc
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelError(f"weights file {path} does not hold a flat state dict of tensors")
    return state


def _names(keys: list[str], n: int = 3) -> str:
    shown = ", ".join(keys[:n])
    return shown + (f", … ({len(keys)} in all)" if len(keys) > n else "")


def state_dict_mismatch(model: nn.Module, state: dict[str, torch.Tensor]) -> str | None:
    """One line saying how ``state`` differs from ``model``'s state dict (keys, shapes, dtypes);
    None when it fits."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k}: {tuple(state[k].shape)} in the file, {tuple(v.shape)} in the model"
        for k, v in own.items()
        if k in state and state[k].shape != v.shape
    ]
    dtypes = [
        f"{k}: {state[k].dtype} in the file, {v.dtype} in the model"
        for k, v in own.items()
        if k in state and v.is_floating_point() and not state[k].is_floating_point()
    ]
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing ({_names(missing)})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected ({_names(unexpected)})")
    if shapes:
        parts.append(f"{len(shapes)} of another shape ({_names(shapes, 2)})")
    if dtypes:
        parts.append(f"{len(dtypes)} not floating point ({_names(dtypes, 2)})")
    return "; ".join(parts) or None


def _strip_wrapper_prefix(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """DataParallel/DDP checkpoints prefix every key with ``module.``: map them back."""
    own = model.state_dict()
    if state and all(k.startswith("module.") for k in state) and not any(k.startswith("module.") for k in own):
        return {k[len("module.") :]: v for k, v in state.items()}
    return state


def load_weights(model: nn.Module, path: str | Path, *, strict: bool = True) -> nn.Module:
    state = _strip_wrapper_prefix(model, load_state_dict_file(path))
    mismatch = state_dict_mismatch(model, state)
    if mismatch and (strict or "shape" in mismatch or "floating" in mismatch):
        raise ModelError(f"weights file {path} does not fit the model: {mismatch}")
    model.load_state_dict(state, strict=False)
    check_finite(model, f"weights file {path}")
    return model


def check_finite(model: nn.Module, source: str) -> None:
    """Refuse NaN or Inf in any floating parameter or buffer, naming the first tensor found."""
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ModelError(f"{source}: {name} holds NaN or Inf values")


def resolve_factory(spec: str) -> Callable[[], nn.Module]:
    """``package.module:factory`` → the callable; errors name the part that failed."""
    if ":" not in spec:
        raise ModelError(f"unknown model {spec!r}: not of the form package.module:factory")
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ModelError(f"model {spec!r}: expected package.module:factory")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ModelError(f"model {spec!r}: cannot import module {module_name!r} ({exc})") from exc
    except SystemExit as exc:
        raise ModelError(f"model {spec!r}: importing {module_name!r} called sys.exit({exc.code!r})") from None
    except Exception as exc:  # a syntax error or any error raised while the module runs
        raise ModelError(f"model {spec!r}: importing {module_name!r} failed ({first_line(exc)})") from exc
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ModelError(f"model {spec!r}: module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ModelError(f"model {spec!r}: {attr!r} is not callable")
    return obj


def build_model(spec: str, weights: str | Path | None = None, *, pretrained: bool = True) -> nn.Module:
    """Build a Hugging Face model (``hf:PATH``) or a user factory's model (with ``weights``)."""
    from rankdown.models.hf import is_hf

    if is_hf(spec):
        from rankdown.models.hf import load_model

        if weights is not None:
            raise ModelError(f"model {spec!r}: --weights is not used with hf: models (the folder holds them)")
        model = load_model(spec)
        check_finite(model, f"model {spec!r}")
        return model
    factory = resolve_factory(spec)
    try:
        model = factory()
    except SystemExit as exc:
        raise ModelError(f"model {spec!r}: the factory called sys.exit({exc.code!r})") from None
    except Exception as exc:  # the user's code: any error, one line
        raise ModelError(f"model {spec!r}: the factory raised {first_line(exc)}") from exc
    if not isinstance(model, nn.Module):
        raise ModelError(f"model {spec!r}: factory returned {type(model).__name__}, not an nn.Module")
    if weights is not None:
        load_weights(model, weights)
    elif pretrained:
        check_finite(model, f"model {spec!r}")
    return model.eval()
