"""Shared by the benchmark scripts: each owns one marked section of a markdown file."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from rankdown.measurement.bench import best_latency
from rankdown.storage import atomic_write_text
from rankdown.training.train import evaluate


def test_accuracy(model: nn.Module, split) -> float:
    """Top-1 accuracy on a whole test split, in batches of 500."""
    return evaluate(model, split.batches(500), total=math.ceil(len(split) / 500))


def test_correct(model: nn.Module, split) -> torch.Tensor:
    """Which test images the model gets right, one bool each: for paired tests between two models."""
    model.eval()
    with torch.inference_mode():
        return torch.cat([model(x).argmax(1) == y for x, y in split.batches(500)])


def batch_latencies(model: nn.Module, xs: dict[int, torch.Tensor], runs: int, threads: int = 2) -> dict:
    """Guarded best-layout latency at each batch size: ``runs`` windows at batch 1, a quarter of
    them (at least 5) at larger batches, whose single runs are long enough to need fewer."""
    return {
        str(b): best_latency(model, x, runs=runs if b == 1 else max(5, runs // 4), threads=threads, guard=True)
        for b, x in xs.items()
    }


def load_or_run(out: str | Path, from_json: bool, run: Callable[[], dict]) -> dict:
    """The raw results: read back from ``out`` (``--from-json``, to redraw), or measured now and
    written there atomically."""
    if from_json:
        return json.loads(Path(out).read_text())
    result = run()
    atomic_write_text(Path(out), json.dumps(result, indent=1, default=str) + "\n")
    return result


def write_section(path: Path, name: str, body: str, title: str = "# Benchmarks") -> None:
    """Replace the section between ``<!-- name:start -->`` and ``<!-- name:end -->`` (appended
    when absent), leaving the rest of the file as it is."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    text = path.read_text() if path.exists() else title + "\n"
    block = f"{start}\n{body.rstrip()}\n{end}\n"
    if start in text:
        rest = text.split(end, 1)[1].lstrip("\n")
        text = text.split(start)[0] + block + ("\n" + rest if rest else "")  # keep the blank line after it
    else:
        text = text.rstrip("\n") + "\n\n" + block
    atomic_write_text(path, text)
