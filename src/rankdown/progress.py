"""One place for progress bars, so that quiet mode and non-TTY output behave the same everywhere."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")

_QUIET = False


def set_quiet(quiet: bool) -> None:
    global _QUIET
    _QUIET = quiet


def progress(it: Iterable[T], *, total: int | None = None, desc: str = "") -> Iterator[T]:
    """Wrap ``it`` in a progress bar on stderr; silent when quiet or RANKDOWN_QUIET=1."""
    disable = _QUIET or os.environ.get("RANKDOWN_QUIET") == "1"
    return iter(tqdm(it, total=total, desc=desc, disable=disable, leave=False, file=sys.stderr, dynamic_ncols=True))
