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

from rankdown.errors import RankdownError, first_line

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


class Maxout(nn.Module):
    """Element-wise max over ``pieces`` consecutive channels (cuda-convnet's ``eltmax``)."""

    def __init__(self, pieces: int) -> None:
        super().__init__()
        self.pieces = pieces

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        return x.view(b, c // self.pieces, self.pieces, h, w).amax(2)

    def extra_repr(self) -> str:
        return f"pieces={self.pieces}"


class PatchNorm(nn.Module):
    """Each patch minus its mean, over its std (eps 1e-7), as Jaderberg's released code does."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.flatten(1)
        mean = flat.mean(1).view(-1, 1, 1, 1)
        std = flat.std(1).view(-1, 1, 1, 1)
        return (x - mean) / (std + 1e-7)


class CharNet(nn.Module):
    """Jaderberg 2014's 4-layer maxout character classifier, for 24×24 grayscale patches.

    Verified from the released code: 24×24 input normalised per patch, maxout everywhere (no
    ReLU), an 8×8×64 map after two layers, 4-piece maxout in layers 3 and 4. Not found in any
    source and chosen here to fit those shapes with valid convolutions and no pooling: conv1
    9×9 1→48 (maxout 2), conv2 9×9 48→64 (maxout 2), conv3 8×8 64→128 (maxout 4), conv4 1×1
    128→classes (maxout 4). We drop the background class: the dataset has 36 classes only.
    conv2 then carries 88% of the MACs, conv2+conv3 94%, in line with "about 90%" in the paper.
    """

    def __init__(self, num_classes: int = 36, dropout: float = 0.3) -> None:
        super().__init__()
        self.norm = PatchNorm()
        self.conv1 = nn.Conv2d(1, 96, 9)
        self.act1 = Maxout(2)
        self.conv2 = nn.Conv2d(48, 128, 9)
        self.act2 = Maxout(2)
        self.drop2 = nn.Dropout(dropout)
        self.conv3 = nn.Conv2d(64, 512, 8)
        self.act3 = Maxout(4)
        self.drop3 = nn.Dropout(dropout)
        self.conv4 = nn.Conv2d(128, 4 * num_classes, 1)
        self.act4 = Maxout(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.conv1(self.norm(x)))
        x = self.drop2(self.act2(self.conv2(x)))
        x = self.drop3(self.act3(self.conv3(x)))
        return self.act4(self.conv4(x)).flatten(1)


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
    # The paper approximates conv2 and conv3 only: conv1 sees raw pixels, conv4 is 1×1.
    "charnet": BundledModel(
        "charnet", CharNet, (1, 24, 24), "charnet.safetensors", "chars", default_skip=("conv1", "conv4")
    ),
}


def _fashion(split: str, data_dir: str | None = None, limit: int | None = None):
    from rankdown.data import load_fashion_mnist

    return load_fashion_mnist(split, data_dir, limit=limit)


def _chars(split: str, data_dir: str | None = None, limit: int | None = None):
    from rankdown.chars import load_chars  # renders (once, then cached) only when asked for

    return load_chars(split, limit=limit)


# The bundled models' data: name -> load(split "train"/"test", data_dir, limit) -> rankdown.data.Split
DATASETS = {"fashion-mnist": _fashion, "chars": _chars}


class ModelError(RankdownError):
    """A model spec, factory or weights file could not be used."""


def bundled_weights_path(name: str) -> Path:
    spec = BUNDLED[name]
    if spec.weights is None:
        raise ModelError(f"bundled model {name!r} ships no weights")
    return Path(str(resources.files(WEIGHTS_PACKAGE).joinpath(spec.weights)))


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
        raise ModelError(
            f"unknown model {spec!r}: not a bundled model ({', '.join(sorted(BUNDLED))}) "
            "and not of the form package.module:factory"
        )
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
    """Build a bundled model (with its shipped weights), a Hugging Face model (``hf:PATH``) or a
    user factory (with ``weights``)."""
    from rankdown.hf import is_hf

    if is_hf(spec):
        from rankdown.hf import load_model

        if weights is not None:
            raise ModelError(f"model {spec!r}: --weights is not used with hf: models (the folder holds them)")
        model = load_model(spec)
        check_finite(model, f"model {spec!r}")
        return model
    if spec in BUNDLED:
        model = BUNDLED[spec].factory()
        if weights is not None:
            load_weights(model, weights)
        elif pretrained and BUNDLED[spec].weights is not None:
            load_weights(model, bundled_weights_path(spec))
    else:
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
