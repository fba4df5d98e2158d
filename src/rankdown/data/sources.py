"""The user's data, for every data-aware step: calibration, sensitivity, fitting metrics, latency
error budgets, reconstruction, fine-tuning and evaluation.

A :class:`Data` wraps what a user has: a ``DataLoader``, a map-style ``Dataset``, any re-iterable
of batches, a tensor, or an ``(inputs, labels)`` pair. A batch is a tensor, an ``(inputs,
labels)`` tuple, or a dict of keyword inputs (a ``labels`` key, as Hugging Face batches carry, is
taken as the labels). Data are streamed in batches. From the command line a source is an image
folder (class sub-folders give labels; a flat folder is unlabelled), a tensor file
(``.safetensors`` / ``.npz`` holding ``inputs`` and optional ``labels``, or ``.npy`` holding
inputs), ``package.module:function`` returning a DataLoader, or ``noise`` (seeded Gaussian inputs,
only when asked for, and the report says so). Images are decoded by Pillow.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, default_collate

from rankdown.errors import RankdownError, first_line
from rankdown.probe import Batches, Inputs, batch_cat, batch_index, batch_len, batch_slice

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
TENSOR_SUFFIXES = (".safetensors", ".npz", ".npy")


class DataError(RankdownError):
    """User data that cannot be used; the message names the flag or file."""


@dataclass(frozen=True)
class ImageOptions:
    """How images become tensors: resize (shorter side to ``size``, or exactly (h, w)), center
    crop, grayscale or RGB, then ``(x / 255 − mean) / std`` per channel."""

    size: int | tuple[int, int] | None = None
    crop: int | tuple[int, int] | None = None
    grayscale: bool = False
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        for name in ("size", "crop"):
            v = getattr(self, name)
            sizes = (v,) if isinstance(v, int) else (v or ())
            if any(not isinstance(s, int) or not 0 < s <= 16384 for s in sizes):
                raise DataError(f"image {name} must be positive pixel sizes, got {v!r}")
        if self.std is not None and any(not (s > 0 and math.isfinite(s)) for s in self.std):
            raise DataError(f"image std must be positive, got {self.std}")
        if self.mean is not None and any(not math.isfinite(m) for m in self.mean):
            raise DataError(f"image mean must be finite, got {self.mean}")


PRESETS = {
    "imagenet": ImageOptions(size=256, crop=224, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)),
    "none": ImageOptions(),
}


def _pair(v: int | tuple[int, int]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


class ImageFolder(Dataset):
    """Images under ``root``: one sub-folder per class (labels by sorted folder name), or a flat
    folder of unlabelled images. Every file's header is checked when the folder is opened, so an
    unreadable image fails before any work, by name."""

    def __init__(self, root: str | Path, options: ImageOptions | None = None, what: str = "image folder") -> None:
        from PIL import Image

        self.root, self.options, self.what = Path(root), options or ImageOptions(), what
        if not self.root.is_dir():
            raise DataError(f"{what} {root}: no such folder")
        subdirs = sorted(p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if subdirs:
            self.classes: list[str] | None = [p.name for p in subdirs]
            files = [(f, i) for i, d in enumerate(subdirs) for f in sorted(d.rglob("*")) if _is_image(f)]
        else:
            self.classes = None
            files = [(f, -1) for f in sorted(self.root.iterdir()) if _is_image(f)]
        if not files:
            raise DataError(f"{what} {root}: no images ({', '.join(IMAGE_SUFFIXES[:4])}, ...) found")
        sizes = set()
        for f, _ in files:
            try:
                with Image.open(f) as im:
                    im.verify()
                    sizes.add(im.size)
            except Exception as exc:  # Pillow raises several types for a bad file
                raise DataError(f"{what}: {f} is not a readable image ({type(exc).__name__})") from None
        if len(sizes) > 1 and self.options.size is None and self.options.crop is None:
            raise DataError(
                f"{what} {root}: images of {len(sizes)} different sizes; give --image-size (and --crop) to resize them"
            )
        self.files = files

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        from PIL import Image

        path, label = self.files[i]
        o = self.options
        try:
            with Image.open(path) as raw:
                img = raw.convert("L" if o.grayscale else "RGB")
            bilinear = Image.Resampling.BILINEAR
            if o.size is not None:
                if isinstance(o.size, int):
                    w, h = img.size
                    s = o.size / min(w, h)
                    img = img.resize((max(1, round(w * s)), max(1, round(h * s))), bilinear)
                else:
                    img = img.resize((o.size[1], o.size[0]), bilinear)
            if o.crop is not None:
                ch, cw = _pair(o.crop)
                w, h = img.size
                if ch > h or cw > w:
                    raise DataError(f"{self.what}: {path} ({w}x{h}) is smaller than the crop {ch}x{cw}")
                left, top = (w - cw) // 2, (h - ch) // 2
                img = img.crop((left, top, left + cw, top + ch))
            x = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8)
            x = x.reshape(img.size[1], img.size[0], -1).permute(2, 0, 1).float().div_(255.0)
        except DataError:
            raise
        except Exception as exc:  # decoding errors of a file that passed the header check
            raise DataError(f"{self.what}: {path} could not be decoded ({type(exc).__name__})") from None
        if o.mean is not None or o.std is not None:
            c = x.shape[0]
            mean = torch.tensor(o.mean or (0.0,) * c).reshape(-1, 1, 1)
            std = torch.tensor(o.std or (1.0,) * c).reshape(-1, 1, 1)
            if mean.shape[0] not in (1, c) or std.shape[0] not in (1, c):
                raise DataError(f"{self.what}: mean/std have {mean.shape[0]}/{std.shape[0]} values for {c} channels")
            x = (x - mean) / std
        return x if label < 0 else (x, torch.tensor(label))


def _is_image(f: Path) -> bool:
    return f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES and not f.name.startswith(".")


class _Pairs(Dataset):
    """(inputs, labels) tensors as a map-style dataset."""

    def __init__(self, inputs: Inputs, labels: torch.Tensor | None) -> None:
        self.inputs, self.labels = inputs, labels
        if labels is not None and labels.shape[0] != batch_len(inputs):
            raise DataError(f"{batch_len(inputs)} inputs but {labels.shape[0]} labels")

    def __len__(self) -> int:
        return batch_len(self.inputs)

    def __getitem__(self, i: int):
        x = {k: v[i] for k, v in self.inputs.items()} if isinstance(self.inputs, Mapping) else self.inputs[i]
        return x if self.labels is None else (x, self.labels[i])

    def iter_batches(self, batch_size: int) -> Iterator:
        """Slices, not a DataLoader: in-memory tensors need no per-example collation."""
        for i in range(0, len(self), batch_size):
            x = batch_slice(self.inputs, i, i + batch_size)
            yield x if self.labels is None else (x, self.labels[i : i + batch_size])


class TensorFile(_Pairs):
    """``inputs`` (and optional ``labels``) from a ``.safetensors`` or ``.npz`` file, or inputs alone
    from a ``.npy``. Keyword inputs: keys ``inputs.NAME`` (e.g. ``inputs.input_ids``). Nothing is
    unpickled (``allow_pickle=False``)."""

    def __init__(self, path: str | Path, what: str = "tensor file") -> None:
        self.path, self.what = Path(path), what
        if not self.path.is_file():
            raise DataError(f"{what} {path}: no such file")
        try:
            tensors = self._read()
        except DataError:
            raise
        except Exception as exc:  # numpy and safetensors raise several types for a bad file
            raise DataError(f"{what} {path} could not be read ({first_line(exc)})") from None
        keyed = {k[len("inputs.") :]: v for k, v in tensors.items() if k.startswith("inputs.")}
        if "inputs" in tensors:
            self.inputs: Inputs = tensors["inputs"]
        elif keyed:
            self.inputs = keyed
        else:
            raise DataError(f"{what} {path} holds no 'inputs' (keys: {', '.join(sorted(tensors)) or 'none'})")
        n = batch_len(self.inputs)
        parts = self.inputs.values() if isinstance(self.inputs, Mapping) else [self.inputs]
        for t in parts:
            if t.shape[0] != n:
                raise DataError(f"{what} {path}: keyword inputs of different lengths")
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise DataError(f"{what} {path}: inputs hold NaN or Inf")
        self.labels = tensors.get("labels")
        if self.labels is not None:
            lab = self.labels
            if lab.is_floating_point() or lab.ndim == 0 or lab.shape[0] != n:
                raise DataError(
                    f"{what} {path}: labels must be integers, one per example ({n}), got {tuple(lab.shape)}"
                )
            self.labels = lab.long()
        if n == 0:
            raise DataError(f"{what} {path} holds no examples")

    def _read(self) -> dict[str, torch.Tensor]:
        import numpy as np

        suffix = self.path.suffix.lower()
        if suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(self.path))
        if suffix == ".npz":
            with np.load(self.path, allow_pickle=False) as z:
                return {k: torch.from_numpy(np.array(z[k])) for k in z.files}
        if suffix == ".npy":
            return {"inputs": torch.from_numpy(np.load(self.path, allow_pickle=False))}
        raise DataError(f"{self.what} {self.path}: expected {', '.join(TENSOR_SUFFIXES)}")


class Noise(Dataset):
    """Seeded N(0, 1) inputs of ``shape``: only when the user asks for it (``noise``)."""

    def __init__(self, shape: tuple[int, ...], n: int = 4096, seed: int = 0) -> None:
        self.shape, self.n, self.seed = tuple(shape), n, seed

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.randn(self.shape, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + i))


def split_batch(batch: Any, what: str = "data") -> tuple[Inputs, torch.Tensor | None]:
    """(inputs, labels or None) from a batch as loaders give them."""
    if isinstance(batch, torch.Tensor):
        return batch, None
    if isinstance(batch, Mapping):
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        if not inputs or not all(isinstance(v, torch.Tensor) for v in inputs.values()):
            raise DataError(f"{what}: a dict batch must map input names to tensors")
        labels = batch.get("labels")
        return inputs, labels if isinstance(labels, torch.Tensor) else None
    if isinstance(batch, (tuple, list)) and 1 <= len(batch) <= 2:
        x = batch[0]
        y = batch[1] if len(batch) == 2 else None
        if isinstance(x, (torch.Tensor, Mapping)) and (y is None or isinstance(y, torch.Tensor)):
            return (split_batch(x, what)[0] if isinstance(x, Mapping) else x), y
    raise DataError(
        f"{what}: a batch must be a tensor, an (inputs, labels) pair or a dict of keyword inputs, "
        f"got {type(batch).__name__}"
    )


@dataclass
class Data:
    """The user's data as rankdown's steps see it (see the module docstring)."""

    source: Any
    name: str = "data"
    batch_size: int = 64
    noise: bool = False
    # What the examples are, where the input alone says too little: "causal-lm" (token sequences
    # judged by next-token perplexity) or "embedding" (judged by pooled-output cosine); None otherwise.
    task: str | None = None
    classes: list[str] | None = field(default=None, repr=False)
    _first: tuple[Inputs, torch.Tensor | None] | None = field(default=None, repr=False)
    _drawn: dict[tuple[int, int], Batches] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        s = self.source
        if isinstance(s, torch.Tensor):
            self.source = _Pairs(s, None)
        elif isinstance(s, tuple) and len(s) == 2 and isinstance(s[0], (torch.Tensor, Mapping)):
            self.source = _Pairs(s[0], s[1])
        elif hasattr(s, "images") and hasattr(s, "labels"):  # rankdown.zoo.fashion.Split (bundled data)
            self.source = _Pairs(s.images, s.labels)
        if self.classes is None:
            self.classes = getattr(self.source, "classes", None)
        try:
            self._first = split_batch(next(iter(self._loader(self.batch_size))), self.name)
        except StopIteration:
            raise DataError(f"{self.name} is empty") from None
        except DataError:
            raise
        except TypeError as exc:
            raise DataError(f"{self.name}: not a DataLoader, dataset or iterable of batches ({exc})") from None

    @property
    def dataset(self) -> Dataset | None:
        """A map-style dataset (what fine-tuning shuffles by index), or None for a plain iterable."""
        if isinstance(self.source, DataLoader):
            ds = self.source.dataset
            return ds if hasattr(ds, "__getitem__") and hasattr(ds, "__len__") else None
        if isinstance(self.source, Dataset) and hasattr(self.source, "__len__"):
            return self.source
        return None

    @property
    def labelled(self) -> bool:
        return self._first is not None and self._first[1] is not None

    def __len__(self) -> int:
        ds = self.dataset
        if ds is None:
            raise TypeError("an iterable of batches has no length")
        return len(ds)  # type: ignore[arg-type]

    def _loader(self, batch_size: int) -> Iterable:
        if isinstance(self.source, _Pairs):
            return self.source.iter_batches(batch_size)
        if isinstance(self.source, DataLoader):
            return self.source
        if isinstance(self.source, Dataset):
            return DataLoader(self.source, batch_size=batch_size, shuffle=False, collate_fn=default_collate)
        if isinstance(self.source, Iterator):
            raise DataError(f"{self.name}: a one-shot iterator cannot be read twice; pass a DataLoader or a list")
        return self.source

    def batches(self, limit: int | None = None) -> Iterator[tuple[Inputs, torch.Tensor | None]]:
        """(inputs, labels or None) batches, the last one cut so that at most ``limit`` examples come."""
        seen = 0
        for raw in self._loader(self.batch_size):
            x, y = split_batch(raw, self.name)
            n = batch_len(x)
            if limit is not None and seen + n > limit:
                x, y = batch_slice(x, 0, limit - seen), (None if y is None else y[: limit - seen])
                n = limit - seen
            if n > 0:
                yield x, y
            seen += n
            if limit is not None and seen >= limit:
                return

    @property
    def collate(self) -> Callable[[list], Any]:
        """How a list of the dataset's items becomes a batch (a DataLoader's own collate_fn, e.g.
        a tokenizer's padding, else PyTorch's default)."""
        fn = getattr(self.source, "collate_fn", None)
        return fn if isinstance(self.source, DataLoader) and fn is not None else default_collate

    def stream(self, n: int, seed: int = 0) -> Batches:
        """``n`` examples' inputs as a stream of batches (see :class:`rankdown.probe.Batches`: read
        once and kept while small, else read again on each pass), drawn by a seeded permutation
        from a map-style dataset (an image folder is sorted by class: its first examples are one
        class), else the first ``n`` examples of an iterable. The same (n, seed) is the same stream
        for every step that asks."""
        if (n, seed) not in self._drawn:
            self._drawn[(n, seed)] = self._draw(n, seed)
        return self._drawn[(n, seed)]

    def inputs(self, n: int, seed: int = 0) -> Inputs:
        """The same draw as one batch, for a user who wants it in hand (the steps take the stream)."""
        return batch_cat(list(self.stream(n, seed)))

    def _draw(self, n: int, seed: int) -> Batches:
        ds = self.dataset
        if ds is not None:  # by index: the same examples on every pass, whatever the loader shuffles
            size = len(ds)  # type: ignore[arg-type]
            g = torch.Generator().manual_seed(seed)
            idx = torch.randperm(size, generator=g)[:n].sort().values if size > n else torch.arange(size)
            chunks = idx.split(self.batch_size)
            if isinstance(ds, _Pairs):
                pairs = ds
                return Batches(lambda: (batch_index(pairs.inputs, c) for c in chunks), len(idx), name=self.name)
            source = ds

            def read() -> Iterator[Inputs]:
                for c in chunks:
                    yield split_batch(self.collate([source[int(i)] for i in c]), self.name)[0]

            return Batches(read, len(idx), name=self.name)
        # an iterable of batches is read again on each pass when too large to hold: the stream
        # checks that it gives the same examples each time
        return Batches(lambda: (x for x, _ in self.batches(limit=n)), name=self.name)

    def example(self) -> Inputs:
        assert self._first is not None
        return batch_slice(self._first[0], 0, 1)

    def describe(self) -> str:
        return self.name + (" (seeded Gaussian noise, not real data)" if self.noise else "")


def load_factory_data(spec: str, what: str) -> Any:
    """``package.module:function`` → what it returns (a DataLoader or iterable of batches)."""
    from rankdown.models.load import resolve_factory

    fn: Callable[[], Any] = resolve_factory(spec)
    try:
        return fn()
    except SystemExit as exc:
        raise DataError(f"{what} {spec}: the function called sys.exit({exc.code!r})") from None
    except Exception as exc:  # the user's code
        raise DataError(f"{what} {spec}: the function raised {first_line(exc)}") from None


def open_data(
    spec: str,
    what: str,
    *,
    image_options: ImageOptions | None = None,
    input_shape: tuple[int, ...] | None = None,
    batch_size: int = 64,
    text: dict | None = None,
) -> Data:
    """A CLI data source (see the module docstring); ``what`` names the flag in errors. ``text``:
    the tokenizer and options that make ``text:FILE`` (or a .txt file) token sequences."""
    from rankdown.data.text import TEXT_PREFIX, is_text_spec, text_data

    if is_text_spec(spec):
        if not text or text.get("tokenizer") is None:
            raise DataError(f"{what} {spec}: text data needs a tokenizer: use it with --model hf:PATH")
        return text_data(
            spec.removeprefix(TEXT_PREFIX),
            text["tokenizer"],
            seq_len=text.get("seq_len", 256),
            max_sequences=text.get("sequences"),
            task=text.get("task") or "causal-lm",
            what=what,
        )
    if spec == "noise":
        if input_shape is None:
            raise DataError(f"{what} noise needs --input-shape (the shape of one example)")
        return Data(Noise(input_shape), f"noise {tuple(input_shape)}", batch_size, noise=True)
    path = Path(spec)
    if path.is_dir():
        ds = ImageFolder(path, image_options, what)
        kind = f"{len(ds.classes)} classes" if ds.classes else "unlabelled"
        return Data(ds, f"{spec} ({len(ds)} images, {kind})", batch_size, classes=ds.classes)
    if path.suffix.lower() in TENSOR_SUFFIXES:
        tf = TensorFile(path, what)
        return Data(tf, f"{spec} ({len(tf)} examples{'' if tf.labels is not None else ', unlabelled'})", batch_size)
    if ":" in spec and not path.exists():
        return Data(load_factory_data(spec, what), spec, batch_size)
    raise DataError(
        f"{what} {spec}: no such folder or file (expected an image folder, a .safetensors/.npz/.npy file, "
        "text:FILE for a language model, package.module:function returning a DataLoader, or noise)"
    )
