"""Shared by the benchmark scripts: each owns one marked section of a markdown file."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from rankdown.plan import atomic_write_text


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
