"""Bundled real data: Fashion-MNIST from the Debian package ``dataset-fashion-mnist``.

Nothing is downloaded: the idx files are read from disk (``--data-dir`` or ``$RANKDOWN_DATA_DIR``
or the Debian location), and a missing file is an error that says how to install it.
"""

from __future__ import annotations

import gzip
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from rankdown.errors import RankdownError

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
INSTALL_HINT = (
    "install the Debian package with `sudo apt-get install dataset-fashion-mnist`, "
    "or pass --data-dir pointing at a folder holding the four Fashion-MNIST idx files "
    "(train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz], t10k-...)"
)
CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
# Training-set statistics, fixed so that a model's preprocessing never depends on the slice loaded.
MEAN, STD = 0.2860, 0.3530


class DataError(RankdownError):
    """Data files missing or malformed."""


def default_data_dir() -> Path:
    env = os.environ.get("RANKDOWN_DATA_DIR")
    return Path(env) if env else DEBIAN_DIR


def _open(path: Path):
    for candidate in (path, path.with_name(path.name + ".gz")):
        if candidate.exists():
            return gzip.open(candidate, "rb") if candidate.suffix == ".gz" else open(candidate, "rb")
    raise DataError(f"Fashion-MNIST file {path.name}[.gz] not found in {path.parent}: {INSTALL_HINT}")


def read_idx(path: Path, magic: int) -> np.ndarray:
    """Read an idx1/idx3 file (optionally gzipped); checks magic number and size."""
    with _open(path) as f:
        raw = f.read()
    if len(raw) < 8 or int.from_bytes(raw[:4], "big") != magic:
        raise DataError(f"{path}: not an idx file with magic {magic} (corrupt or wrong file)")
    ndim = magic & 0xFF
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    offset = 4 + 4 * ndim
    expected = int(np.prod(dims))
    if len(raw) - offset != expected:
        raise DataError(f"{path}: expected {expected} bytes of data, found {len(raw) - offset} (truncated?)")
    return np.frombuffer(raw, np.uint8, offset=offset).reshape(dims)


@dataclass
class Split:
    images: torch.Tensor  # float32 (n, 1, 28, 28), normalised
    labels: torch.Tensor  # int64 (n,)

    def __len__(self) -> int:
        return len(self.labels)

    def batches(self, batch_size: int, *, shuffle: bool = False, generator: torch.Generator | None = None):
        n = len(self)
        order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
        for i in range(0, n, batch_size):
            idx = order[i : i + batch_size]
            yield self.images[idx], self.labels[idx]


def load_fashion_mnist(split: str, data_dir: str | Path | None = None, limit: int | None = None) -> Split:
    """Load ``split`` ("train" or "test"); ``limit`` keeps the first N examples (deterministic)."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    root = Path(data_dir) if data_dir is not None else default_data_dir()
    if not root.is_dir():
        raise DataError(f"Fashion-MNIST folder {root} does not exist: {INSTALL_HINT}")
    prefix = "train" if split == "train" else "t10k"
    x = read_idx(root / f"{prefix}-images-idx3-ubyte", 2051)
    y = read_idx(root / f"{prefix}-labels-idx1-ubyte", 2049)
    if len(x) != len(y):
        raise DataError(f"{root}: {len(x)} images but {len(y)} labels for split {split!r}")
    if limit is not None:
        if limit <= 0:
            raise ValueError(f"limit must be positive, got {limit}")
        x, y = x[:limit], y[:limit]
    images = (torch.from_numpy(x.copy()).float().div_(255.0).sub_(MEAN).div_(STD)).unsqueeze(1)
    return Split(images, torch.from_numpy(y.astype(np.int64)))
