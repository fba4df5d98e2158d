"""rankdown: low-rank factorization of PyTorch layers, measured on real hardware.

The public API is re-exported here lazily, so that ``import rankdown`` (and ``rankdown --help``)
stays fast and initialises nothing until a name is used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "compress": "rankdown.api",
    "CompressConfig": "rankdown.api",
    "CompressResult": "rankdown.api",
    "FixedRank": "rankdown.rank",
    "ParamFraction": "rankdown.rank",
    "MacFraction": "rankdown.rank",
    "Energy": "rankdown.rank",
    "Evbmf": "rankdown.rank",
    "Plan": "rankdown.plan",
    "apply_plan": "rankdown.plan",
    "save_compressed": "rankdown.plan",
    "load_compressed": "rankdown.plan",
    "build_model": "rankdown.models",
    "run_compress": "rankdown.pipeline",
    "MeasureOptions": "rankdown.pipeline",
    "count_macs": "rankdown.bench",
    "measure_latency": "rankdown.bench",
    "register": "rankdown.methods",
    "Method": "rankdown.methods",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'rankdown' has no attribute {name!r}")


if TYPE_CHECKING:
    from rankdown.api import CompressConfig, CompressResult, compress
    from rankdown.bench import count_macs, measure_latency
    from rankdown.methods import Method, register
    from rankdown.models import build_model
    from rankdown.pipeline import MeasureOptions, run_compress
    from rankdown.plan import Plan, apply_plan, load_compressed, save_compressed
    from rankdown.rank import Energy, Evbmf, FixedRank, MacFraction, ParamFraction
