"""Shared by the benchmark scripts: each owns one marked section of a markdown file."""

from __future__ import annotations

from pathlib import Path

from rankdown.plan import atomic_write_text


def write_section(path: Path, name: str, body: str, title: str = "# Benchmarks") -> None:
    """Replace the section between ``<!-- name:start -->`` and ``<!-- name:end -->`` (appended
    when absent), leaving the rest of the file as it is."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    text = path.read_text() if path.exists() else title + "\n"
    block = f"{start}\n{body.rstrip()}\n{end}\n"
    if start in text:
        text = text.split(start)[0] + block + text.split(end, 1)[1].lstrip("\n")
    else:
        text = text.rstrip("\n") + "\n\n" + block
    atomic_write_text(path, text)
