import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # for `import nets` (and `nets:factory` model specs)

from rankdown.zoo import BUNDLED, bundled_weights_path


def pytest_configure(config):
    torch.set_num_threads(2)


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA device")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def has_bundled_weights() -> bool:
    return bundled_weights_path("fashion-vgg").is_file()


@pytest.fixture(autouse=True)
def _quiet(monkeypatch):
    monkeypatch.setenv("RANKDOWN_QUIET", "1")


def write_idx(path: Path, array, magic: int, gz: bool = True) -> None:
    import gzip

    import numpy as np

    arr = np.asarray(array, dtype=np.uint8)
    header = magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    data = header + arr.tobytes()
    if gz:
        with gzip.open(str(path) + ".gz", "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


@pytest.fixture(scope="session")
def fake_fashion(tmp_path_factory) -> Path:
    """A tiny Fashion-MNIST-format folder (random pixels), for CLI tests without the Debian package."""
    import numpy as np

    root = tmp_path_factory.mktemp("fashion")
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 64), ("t10k", 48)):
        write_idx(root / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)), 2051)
        write_idx(root / f"{prefix}-labels-idx1-ubyte", rng.integers(0, 10, n), 2049)
    return root


__all__ = ["BUNDLED", "write_idx"]
