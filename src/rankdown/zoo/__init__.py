"""The demo zoo: bundled models with their weights and data, built as workloads the same way a
user's model is. Nothing in the library imports this package; the application and the examples do.

A bundled model is a name, a factory, an input shape and, where trained, safetensors weights that
ship inside the package.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from torch import nn

from rankdown.data.sources import Data
from rankdown.errors import RankdownError
from rankdown.models.load import ModelError, load_weights
from rankdown.models.load import build_model as build_user_model
from rankdown.probe import example_input
from rankdown.workload import Workload
from rankdown.zoo.nets import CharNet, FashionVGG

WEIGHTS_PACKAGE = "rankdown.zoo.weights"


@dataclass(frozen=True)
class BundledModel:
    name: str
    factory: Callable[[], nn.Module]
    input_shape: tuple[int, ...]  # one example, without the batch dimension
    weights: str | None  # file name inside rankdown/zoo/weights
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
    from rankdown.zoo.fashion import load_fashion_mnist

    return load_fashion_mnist(split, data_dir, limit=limit)


def _chars(split: str, data_dir: str | None = None, limit: int | None = None):
    from rankdown.zoo.chars import load_chars  # renders (once, then cached) only when asked for

    return load_chars(split, limit=limit)


# The bundled models' data: name -> load(split "train"/"test", data_dir, limit) -> rankdown.zoo.fashion.Split
DATASETS = {"fashion-mnist": _fashion, "chars": _chars}


def bundled_weights_path(name: str) -> Path:
    spec = BUNDLED[name]
    if spec.weights is None:
        raise ModelError(f"bundled model {name!r} ships no weights")
    return Path(str(resources.files(WEIGHTS_PACKAGE).joinpath(spec.weights)))


def build_model(spec: str, weights: str | Path | None = None, *, pretrained: bool = True) -> nn.Module:
    """Build a bundled model (with its shipped weights), or else what
    :func:`rankdown.models.load.build_model` builds (a Hugging Face folder, a user factory)."""
    if spec not in BUNDLED:
        if ":" not in spec:
            raise ModelError(
                f"unknown model {spec!r}: not a bundled model ({', '.join(sorted(BUNDLED))}) "
                "and not of the form package.module:factory"
            )
        return build_user_model(spec, weights, pretrained=pretrained)
    model = BUNDLED[spec].factory()
    if weights is not None:
        load_weights(model, weights)
    elif pretrained and BUNDLED[spec].weights is not None:
        load_weights(model, bundled_weights_path(spec))
    return model.eval()


def bundled_workload(
    name: str, *, data_dir: str | None = None, eval_limit: int | None = None, weights: str | None = None
) -> Workload:
    """A bundled model with its own data: training images to calibrate and fine-tune on, the test
    split to evaluate on. Data load lazily (Fashion-MNIST from the Debian package, characters
    rendered once and cached)."""
    spec = BUNDLED[name]
    model = build_model(name, weights)
    example = example_input(model, spec.input_shape)
    if spec.dataset not in DATASETS:  # pragma: no cover - every bundled model has data
        raise RankdownError(f"bundled model {name!r} has no data")
    load = DATASETS[spec.dataset]
    # The test split is read now (a missing package fails in a second, not after the work); the
    # training split when a step first needs it.
    eval_ = Data(load("test", data_dir, eval_limit), f"{spec.dataset} test", batch_size=500)

    def train() -> Data:
        return Data(load("train", data_dir, None), f"{spec.dataset} train", batch_size=128)

    # A mirrored character is another character: no flips for charnet.
    return Workload(model, example, train, eval_, train, name, None, spec.default_skip, True, spec.dataset != "chars")
