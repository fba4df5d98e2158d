"""A character dataset like Jaderberg 2014's: 24×24 grayscale case-insensitive characters.

ICDAR 2003 cannot be downloaded here, so characters are rendered from the Latin fonts of Debian
font packages (``scripts/setup.sh`` installs them) with random shifts, scales, rotations, blur,
noise, contrast, polarity and cluttered backgrounds (gradients, texture, strokes and fragments of
neighbouring characters, as real crops have). Fonts are split by *family* into train and test, so
the test set measures generalisation to unseen typefaces. Every image is a pure function of
(seed, split, index) and the font list, so a set is reproducible and cached on disk.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import subprocess
import zipfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from rankdown.storage import atomic_write_bytes
from rankdown.zoo.fashion import DataError, Split

CLASSES = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"
SIZE = 24
FONT_HINT = (
    "install Latin fonts with `apt-get install fonts-urw-base35 fonts-texgyre fonts-liberation2 "
    "fonts-freefont-ttf fonts-dejavu-extra fonts-croscore ...` (scripts/setup.sh does it)"
)
_VERSION = "chars-v1"  # bump when rendering changes: it is part of the cache key
_CHUNK = 512


@dataclass(frozen=True)
class Font:
    path: str
    family: str


def _fc_list() -> list[Font]:
    if shutil.which("fc-list") is None:
        return []
    out = subprocess.run(
        ["fc-list", "-f", "%{file}\t%{family[0]}\n", ":lang=en"], capture_output=True, text=True, check=False
    ).stdout
    fonts = []
    for line in out.splitlines():
        path, _, family = line.partition("\t")
        if path.lower().endswith((".ttf", ".otf", ".pfb", ".t1")) and family:
            fonts.append(Font(path, family.strip()))
    return fonts


@lru_cache(maxsize=1)
def discover_fonts() -> tuple[Font, ...]:
    """Latin fonts that really draw the 36 classes distinctly (symbol fonts also claim ``:lang=en``)."""
    from PIL import ImageFont

    usable = []
    for font in sorted(set(_fc_list()), key=lambda f: f.path):
        try:
            face = ImageFont.truetype(font.path, 20)
            masks = {bytes(face.getmask(ch)) for ch in CLASSES}
        except OSError:
            continue
        if len(masks) >= 34:  # a few fonts draw O and 0 alike; a symbol font draws boxes
            usable.append(font)
    return tuple(usable)


def _family_bucket(family: str) -> int:
    return int(hashlib.sha1(family.encode()).hexdigest(), 16) % 5


def font_split(split: str, fonts: tuple[Font, ...] | None = None) -> list[Font]:
    """Families hashed into five buckets; bucket 0 is the test split. Hashing (not a sorted list)
    keeps a family's side fixed when fonts are added or removed."""
    fonts = discover_fonts() if fonts is None else fonts
    families = sorted({f.family for f in fonts})
    if len(families) < 2:
        raise DataError(f"need fonts from at least 2 families to split train/test, found {len(families)}: {FONT_HINT}")
    test = {f for f in families if _family_bucket(f) == 0}
    if not test:  # tiny font sets: still keep one family out for testing
        test = {min(families, key=lambda f: hashlib.sha1(f.encode()).hexdigest())}
    if len(test) == len(families):
        test = {sorted(test)[0]}
    chosen = [f for f in fonts if (f.family in test) == (split == "test")]
    return chosen


@lru_cache(maxsize=4096)
def _face(path: str, size: int):
    from PIL import ImageFont

    return ImageFont.truetype(path, size)


def _background(rng: np.random.Generator, canvas: int) -> np.ndarray:
    kind = rng.integers(4)
    base = rng.uniform(0.0, 1.0)
    if kind == 0:  # flat
        bg = np.full((canvas, canvas), base)
    elif kind == 1:  # linear gradient
        yy, xx = np.mgrid[0:canvas, 0:canvas] / canvas
        a, b = rng.uniform(-0.5, 0.5, size=2)
        bg = base + a * (xx - 0.5) + b * (yy - 0.5)
    else:  # smooth texture: upsampled noise
        coarse = rng.normal(0, 1, size=(5, 5))
        idx = np.linspace(0, 4, canvas)
        i0 = np.floor(idx).astype(int).clip(0, 3)
        t = idx - i0
        rows = coarse[i0] * (1 - t)[:, None] + coarse[i0 + 1] * t[:, None]
        tex = rows[:, i0] * (1 - t)[None, :] + rows[:, i0 + 1] * t[None, :]
        bg = base + rng.uniform(0.05, 0.25) * tex
    return bg


def render_one(index: int, seed: int, fonts: list[Font], rng: np.random.Generator) -> tuple[np.ndarray, int]:
    """One 24×24 uint8 image and its class."""
    from PIL import Image, ImageDraw, ImageFilter

    label = int(rng.integers(len(CLASSES)))
    ch = CLASSES[label]
    if ch.isalpha() and rng.random() < 0.5:
        ch = ch.lower()
    font = fonts[int(rng.integers(len(fonts)))]
    canvas = 3 * SIZE  # render large, rotate, then crop the centre: no empty corners
    size = int(rng.integers(16, 27))
    face = _face(font.path, size)

    # Ink mask of the centre character plus, sometimes, neighbours cut by the crop as in real text.
    mask = Image.new("L", (canvas, canvas), 0)
    draw = ImageDraw.Draw(mask)
    cx, cy = canvas / 2 + rng.uniform(-2, 2), canvas / 2 + rng.uniform(-2, 2)
    draw.text((cx, cy), ch, font=face, fill=255, anchor="mm")
    if rng.random() < 0.5:
        gap = rng.uniform(0.55, 0.85) * size
        for side in (-1, 1):
            if rng.random() < 0.7:
                other = CLASSES[int(rng.integers(len(CLASSES)))]
                other = other.lower() if other.isalpha() and rng.random() < 0.5 else other
                draw.text((cx + side * (gap + 0.1 * size), cy), other, font=face, fill=255, anchor="mm")
    if rng.random() < 0.3:  # stray strokes (underlines, frame edges)
        for _ in range(int(rng.integers(1, 3))):
            x0, y0, x1, y1 = rng.uniform(0, canvas, size=4)
            draw.line((x0, y0, x1, y1), fill=255, width=int(rng.integers(1, 3)))
    mask = mask.rotate(float(rng.uniform(-12, 12)), resample=Image.Resampling.BILINEAR, center=(cx, cy))
    scale = rng.uniform(0.9, 1.1)
    crop = SIZE * scale
    box = (cx - crop / 2, cy - crop / 2, cx + crop / 2, cy + crop / 2)
    ink = np.asarray(mask.resize((SIZE, SIZE), Image.Resampling.BILINEAR, box=box), dtype=np.float64) / 255.0

    bg = _background(rng, SIZE)
    # Ink at least 0.3 away from the mean background; the polarity flips when the first choice clips.
    contrast = rng.uniform(0.3, 0.9) * (1 if rng.random() < 0.5 else -1)
    if not 0.0 <= bg.mean() + contrast <= 1.0:
        contrast = -contrast
    fg = np.clip(bg.mean() + contrast, 0, 1)
    img = bg * (1 - ink) + fg * ink
    pil = Image.fromarray(np.clip(img * 255, 0, 255).astype(np.uint8))
    if rng.random() < 0.5:
        pil = pil.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.3, 1.0))))
    img = np.asarray(pil, dtype=np.float64) / 255.0
    img = img + rng.normal(0, rng.uniform(0.0, 0.06), size=img.shape)
    return np.clip(img * 255, 0, 255).astype(np.uint8), label


def _render_chunk(args: tuple[int, str, int, int, list[Font]]) -> tuple[np.ndarray, np.ndarray]:
    seed, split, start, stop, fonts = args
    # One generator per chunk, seeded by its position: the result does not depend on the worker count.
    rng = np.random.default_rng([seed, 0 if split == "train" else 1, start])
    images = np.empty((stop - start, SIZE, SIZE), np.uint8)
    labels = np.empty(stop - start, np.int64)
    for i in range(start, stop):
        images[i - start], labels[i - start] = render_one(i, seed, fonts, rng)
    return images, labels


def render(split: str, n: int, seed: int = 0, fonts: list[Font] | None = None, workers: int = 1):
    """``n`` images of ``split`` as uint8 (n, 24, 24) and int64 labels; deterministic for ``seed``."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if n <= 0:
        raise ValueError(f"n must be positive, got {n}")
    fonts = font_split(split) if fonts is None else fonts
    if not fonts:
        raise DataError(f"no fonts for the {split} split: {FONT_HINT}")
    jobs = [(seed, split, s, min(s + _CHUNK, n), fonts) for s in range(0, n, _CHUNK)]
    if workers > 1 and len(jobs) > 1:
        with ProcessPoolExecutor(workers) as pool:
            parts = list(pool.map(_render_chunk, jobs))
    else:
        parts = [_render_chunk(j) for j in jobs]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def cache_dir() -> Path:
    from rankdown.storage import default_cache_dir  # one cache root for everything rankdown keeps

    return default_cache_dir() / "chars"


def default_size(split: str) -> int:
    return 54_000 if split == "train" else 10_800


def load_chars(split: str, n: int | None = None, seed: int = 0, limit: int | None = None) -> Split:
    """The rendered set as a :class:`Split` (float in [0, 1]; the model normalises each patch).

    Cached under ``~/.cache/rankdown/chars`` keyed by version, split, size, seed and the font files.
    Image i depends only on (seed, split, i), so ``limit`` renders just the first ``limit`` images
    when the full set is not cached yet: the same images the full set starts with.
    """
    n = default_size(split) if n is None else n
    if limit is not None and limit <= 0:
        raise ValueError(f"limit must be positive, got {limit}")
    fonts = font_split(split)

    def path_for(count: int) -> Path:
        key = hashlib.sha1(
            "\n".join([_VERSION, split, str(count), str(seed), *(f"{f.path}|{f.family}" for f in fonts)]).encode()
        ).hexdigest()[:16]
        return cache_dir() / f"{split}-{count}-{key}.npz"

    count = n if limit is None else min(n, limit)
    path = path_for(n) if path_for(n).exists() else path_for(count)
    cached = None
    if path.exists():
        try:
            with np.load(path) as z:
                cached = z["images"], z["labels"]
        except (OSError, ValueError, KeyError, zipfile.BadZipFile):
            cached = None  # a damaged cache file is rendered again and replaced
    if cached is not None:
        images, labels = cached
    else:
        images, labels = render(split, count, seed, fonts, workers=min(4, os.cpu_count() or 1))
        buf = io.BytesIO()
        np.savez_compressed(buf, images=images, labels=labels)
        atomic_write_bytes(path, buf.getvalue())
    images, labels = images[:count], labels[:count]
    x = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)
    return Split(x, torch.from_numpy(labels.astype(np.int64)))
