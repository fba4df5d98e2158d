"""rankdown: low-rank factorization of PyTorch layers, measured on real hardware.

The public API is re-exported here lazily, so that ``import rankdown`` (and ``rankdown --help``)
stays fast and initialises nothing until a name is used.

Layout, bottom to top (a module imports only from its own level or below; tests/test_layout.py
checks it): shared helpers (errors, progress, storage, probe, surgery) and the tensor maths
(``decompose``); factorized modules (``layers``) and the method registry (``methods``); a user's
model (``models``) and data (``data``); ``measurement``; ``fitting``; ``planning``; ``training``;
``deployment``; the job's inputs (``workload``); then the application (``app``) and, beside it,
the demo ``zoo`` of bundled models, built as workloads the same way a user's model is.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "compress": "rankdown.planning.compress",
    "CompressConfig": "rankdown.planning.compress",
    "CompressResult": "rankdown.planning.compress",
    "FixedRank": "rankdown.planning.rank",
    "ParamFraction": "rankdown.planning.rank",
    "MacFraction": "rankdown.planning.rank",
    "Energy": "rankdown.planning.rank",
    "Evbmf": "rankdown.planning.rank",
    "Plan": "rankdown.planning.plan",
    "apply_plan": "rankdown.planning.plan",
    "save_compressed": "rankdown.planning.plan",
    "load_compressed": "rankdown.planning.plan",
    "LayerRanks": "rankdown.planning.rank",
    "build_model": "rankdown.zoo",
    "Workload": "rankdown.workload",
    "user_workload": "rankdown.workload",
    "bundled_workload": "rankdown.zoo",
    "Data": "rankdown.data.sources",
    "Batches": "rankdown.probe",
    "ImageFolder": "rankdown.data.sources",
    "ImageOptions": "rankdown.data.sources",
    "TensorFile": "rankdown.data.sources",
    "evaluate": "rankdown.measurement.quality",
    "run_job": "rankdown.app.pipeline",
    "Report": "rankdown.app.report",
    "MeasureOptions": "rankdown.app.pipeline",
    "AllocationOptions": "rankdown.app.pipeline",
    "LatencyOptions": "rankdown.app.pipeline",
    "ReconstructionOptions": "rankdown.app.pipeline",
    "Budget": "rankdown.planning.allocate",
    "allocate_ranks": "rankdown.planning.compress",
    "CalibrationConfig": "rankdown.fitting.calibrate",
    "reconstruct": "rankdown.fitting.calibrate",
    "TrainConfig": "rankdown.training.train",
    "finetune": "rankdown.training.train",
    "deploy": "rankdown.deployment.deploy",
    "export_model": "rankdown.deployment.export",
    "text_data": "rankdown.data.text",
    "count_macs": "rankdown.measurement.bench",
    "measure_latency": "rankdown.measurement.bench",
    "register": "rankdown.methods",
    "TuckerRank": "rankdown.methods",
    "GroupedRank": "rankdown.methods",
    "Method": "rankdown.methods",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'rankdown' has no attribute {name!r}")


if TYPE_CHECKING:
    from rankdown.app.pipeline import (
        AllocationOptions,
        LatencyOptions,
        MeasureOptions,
        ReconstructionOptions,
        run_job,
    )
    from rankdown.app.report import Report
    from rankdown.data.sources import Data, ImageFolder, ImageOptions, TensorFile
    from rankdown.data.text import text_data
    from rankdown.deployment.deploy import deploy
    from rankdown.deployment.export import export_model
    from rankdown.fitting.calibrate import CalibrationConfig, reconstruct
    from rankdown.measurement.bench import count_macs, measure_latency
    from rankdown.measurement.quality import evaluate
    from rankdown.methods import GroupedRank, Method, TuckerRank, register
    from rankdown.planning.allocate import Budget
    from rankdown.planning.compress import CompressConfig, CompressResult, allocate_ranks, compress
    from rankdown.planning.plan import Plan, apply_plan, load_compressed, save_compressed
    from rankdown.planning.rank import Energy, Evbmf, FixedRank, LayerRanks, MacFraction, ParamFraction
    from rankdown.probe import Batches
    from rankdown.training.train import TrainConfig, finetune
    from rankdown.workload import Workload, user_workload
    from rankdown.zoo import build_model, bundled_workload
