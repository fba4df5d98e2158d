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
    "LayerRanks": "rankdown.rank",
    "build_model": "rankdown.models",
    "Workload": "rankdown.workload",
    "user_workload": "rankdown.workload",
    "bundled_workload": "rankdown.workload",
    "Data": "rankdown.sources",
    "ImageFolder": "rankdown.sources",
    "ImageOptions": "rankdown.sources",
    "TensorFile": "rankdown.sources",
    "evaluate": "rankdown.quality",
    "run_job": "rankdown.pipeline",
    "MeasureOptions": "rankdown.pipeline",
    "AllocationOptions": "rankdown.pipeline",
    "LatencyOptions": "rankdown.pipeline",
    "ReconstructionOptions": "rankdown.pipeline",
    "Budget": "rankdown.allocate",
    "allocate_ranks": "rankdown.api",
    "CalibrationConfig": "rankdown.calibrate",
    "reconstruct": "rankdown.calibrate",
    "TrainConfig": "rankdown.train",
    "finetune": "rankdown.train",
    "deploy": "rankdown.deploy",
    "export_model": "rankdown.export",
    "text_data": "rankdown.text",
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
    from rankdown.allocate import Budget
    from rankdown.api import CompressConfig, CompressResult, allocate_ranks, compress
    from rankdown.bench import count_macs, measure_latency
    from rankdown.calibrate import CalibrationConfig, reconstruct
    from rankdown.deploy import deploy
    from rankdown.export import export_model
    from rankdown.methods import Method, register
    from rankdown.models import build_model
    from rankdown.pipeline import (
        AllocationOptions,
        LatencyOptions,
        MeasureOptions,
        ReconstructionOptions,
        run_job,
    )
    from rankdown.plan import Plan, apply_plan, load_compressed, save_compressed
    from rankdown.quality import evaluate
    from rankdown.rank import Energy, Evbmf, FixedRank, LayerRanks, MacFraction, ParamFraction
    from rankdown.sources import Data, ImageFolder, ImageOptions, TensorFile
    from rankdown.text import text_data
    from rankdown.train import TrainConfig, finetune
    from rankdown.workload import Workload, bundled_workload, user_workload
