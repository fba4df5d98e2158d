"""Bundled models and the loader for a user's own ``package.module:factory``.

A bundled model is a name, a factory, an input shape and, where trained, safetensors weights that
ship inside the package. Weights are never unpickled: safetensors, or ``torch.load(weights_only=True)``
for a user's ``.pt`` checkpoint.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch
from torch import nn

from rankdown.errors import RankdownError

WEIGHTS_PACKAGE = "rankdown.weights"


class FashionVGG(nn.Module):
    """A small VGG-style CNN for 28×28 grayscale images (Fashion-MNIST).

    Two blocks of two 3×3 convs with batch norm, then a two-layer classifier. Wide enough that
    its 3×3 convs carry most of the MACs, which is where low-rank factorization pays.
    """

    def __init__(self, num_classes: int = 10, width: int = 32) -> None:
        super().__init__()
        w = width

        def block(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

        self.features = nn.Sequential(
            *block(1, w),
            *block(w, w),
            nn.MaxPool2d(2),
            *block(w, 2 * w),
            *block(2 * w, 2 * w),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Dropout(0.3),
            nn.Linear(2 * w * 7 * 7, 256),
            nn.ReLU(inplace=True),
            nn.Dropout(0.3),
            nn.Linear(256, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


@dataclass(frozen=True)
class BundledModel:
    name: str
    factory: Callable[[], nn.Module]
    input_shape: tuple[int, ...]  # one example, without the batch dimension
    weights: str | None  # file name inside rankdown/weights
    dataset: str | None
    # Layers left dense unless asked for: the first conv sees raw pixels through 9-weight filters
    # (little to gain, much to lose) and the 10-way head is tiny; the papers leave both alone too.
    default_skip: tuple[str, ...] = ()


BUNDLED: dict[str, BundledModel] = {
    "fashion-vgg": BundledModel(
        "fashion-vgg",
        FashionVGG,
        (1, 28, 28),
        "fashion_vgg.safetensors",
        "fashion-mnist",
        default_skip=("features.0", "classifier.5"),
    ),
}


class ModelError(RankdownError):
    """A model spec, factory or weights file could not be used."""


def bundled_weights_path(name: str) -> Path:
    spec = BUNDLED[name]
    if spec.weights is None:
        raise ModelError(f"bundled model {name!r} ships no weights")
    return Path(str(resources.files(WEIGHTS_PACKAGE).joinpath(spec.weights)))


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from safetensors, or from a torch file with ``weights_only=True``."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"weights file {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # safetensors and torch raise several types for a bad file
        raise ModelError(f"weights file {path} could not be read ({type(exc).__name__}: {exc})") from exc
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelError(f"weights file {path} does not hold a flat state dict of tensors")
    return state


def load_weights(model: nn.Module, path: str | Path, *, strict: bool = True) -> nn.Module:
    state = load_state_dict_file(path)
    try:
        model.load_state_dict(state, strict=strict)
    except RuntimeError as exc:
        raise ModelError(f"weights file {path} does not fit the model: {exc}") from exc
    return model


def resolve_factory(spec: str) -> Callable[[], nn.Module]:
    """``package.module:factory`` → the callable; errors name the part that failed."""
    if ":" not in spec:
        raise ModelError(
            f"unknown model {spec!r}: not a bundled model ({', '.join(sorted(BUNDLED))}) "
            "and not of the form package.module:factory"
        )
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ModelError(f"model {spec!r}: cannot import module {module_name!r} ({exc})") from exc
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ModelError(f"model {spec!r}: module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ModelError(f"model {spec!r}: {attr!r} is not callable")
    return obj


def build_model(spec: str, weights: str | Path | None = None, *, pretrained: bool = True) -> nn.Module:
    """Build a bundled model (with its shipped weights) or a user factory (with ``weights``)."""
    if spec in BUNDLED:
        model = BUNDLED[spec].factory()
        if weights is not None:
            load_weights(model, weights)
        elif pretrained and BUNDLED[spec].weights is not None:
            load_weights(model, bundled_weights_path(spec))
    else:
        model = resolve_factory(spec)()
        if not isinstance(model, nn.Module):
            raise ModelError(f"model {spec!r}: factory returned {type(model).__name__}, not an nn.Module")
        if weights is not None:
            load_weights(model, weights)
    return model.eval()
