"""Export a compressed model to what deployments run: ONNX (for onnxruntime), TorchScript, or a
torch.export ExportedProgram; after the deployment folds, checked before it is written.

The check: the exported file is loaded back in its runtime (onnxruntime for ONNX) and its outputs
are compared with PyTorch's on real inputs (every output tensor, max abs and relative error). A
file whose outputs differ beyond the tolerance is not written. A written file carries a rankdown
marker (ONNX metadata; an extra archive entry otherwise), so that a later export may replace it
and nothing else.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import tempfile
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from rankdown import __version__
from rankdown.errors import RankdownError, first_line
from rankdown.probe import Inputs, batch_len, batch_tile, forward

FORMATS = {"onnx": "model.onnx", "torchscript": "model.torchscript.pt", "exported-program": "model.pt2"}
MARKER = "rankdown.json"
OPSET = 18
# float32 rounding of a reordered sum (folds, fused kernels) stays far below this
TOLERANCE = 1e-4


def default_path(folder: str | Path, fmt: str) -> Path:
    return Path(folder) / FORMATS[fmt]


def is_rankdown_export(path: str | Path) -> bool:
    """Whether ``path`` is a file a rankdown export wrote (it carries the marker)."""
    p = Path(path)
    try:
        if p.suffix == ".onnx":
            import onnx

            m = onnx.load(str(p), load_external_data=False)
            return any(prop.key == "rankdown" for prop in m.metadata_props)
        with zipfile.ZipFile(p) as z:
            return any(n.endswith(MARKER) for n in z.namelist())
    except Exception:  # not ours: unreadable, not a zip, not ONNX
        return False


def _outputs(out: object) -> list[torch.Tensor]:
    leaves = [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
    if not leaves:
        raise RankdownError("the model's output holds no tensor to export")
    return leaves


def _args(x: Inputs) -> tuple[tuple, dict]:
    return ((), dict(x)) if isinstance(x, Mapping) else ((x,), {})


def _dynamic(x: Inputs, dynamic_batch: bool) -> Any:
    if not dynamic_batch:
        return None
    batch = torch.export.Dim("batch", min=1, max=4096)
    if isinstance(x, Mapping):
        return {k: {0: batch} for k in x}
    return ({0: batch},)


@contextlib.contextmanager
def _quiet_exporter() -> Any:
    """The ONNX exporter logs a warning per operator library it does not find (torchvision) and
    prints its progress: neither is the user's business."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), open(os.devnull, "w") as null, contextlib.redirect_stdout(null):
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def _onnx(model: nn.Module, example: Inputs, path: Path, dynamic_batch: bool) -> None:
    args, kwargs = _args(example)
    with _quiet_exporter():
        program = torch.onnx.export(
            model,
            args,
            kwargs=kwargs or None,
            dynamo=True,
            opset_version=OPSET,
            dynamic_shapes=_dynamic(example, dynamic_batch),
            verbose=False,
        )
    if program is None:  # pragma: no cover - dynamo=True always returns the program
        raise RankdownError("ONNX export returned nothing")
    program.model.metadata_props["rankdown"] = json.dumps({"version": __version__})
    program.save(str(path))


# onnxruntime's graph optimization levels, by the names its documentation uses
ORT_LEVELS = ("disable", "basic", "extended", "all")


def _onnx_runner(path: Path, threads: int | None = None, optimization: str = "all") -> Any:
    try:
        import onnxruntime as ort
    except ImportError:
        raise RankdownError("checking an ONNX export needs onnxruntime: pip install 'rankdown[onnx]'") from None
    if optimization not in ORT_LEVELS:
        raise RankdownError(f"onnxruntime optimization must be one of {', '.join(ORT_LEVELS)}, got {optimization!r}")
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    opts.graph_optimization_level = getattr(
        ort.GraphOptimizationLevel,
        "ORT_DISABLE_ALL" if optimization == "disable" else f"ORT_ENABLE_{optimization.upper()}",
    )
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]

    def run(x: Inputs) -> list[torch.Tensor]:
        values = list(x.values()) if isinstance(x, Mapping) else [x]
        feeds = {n: v.detach().cpu().numpy() for n, v in zip(names, values, strict=False)}
        return [torch.from_numpy(o) for o in session.run(None, feeds)]

    return run


class OrtModule(nn.Module):
    """An onnxruntime session behind an nn.Module's call, so that rankdown's latency measurement
    (guard, windows, medians) times it exactly as it times PyTorch. ``optimization``: the session's
    graph optimization level (one of ORT_LEVELS; onnxruntime's default is "all")."""

    def __init__(self, path: str | Path, threads: int | None = None, optimization: str = "all") -> None:
        super().__init__()
        self._run = _onnx_runner(Path(path), threads, optimization)

    def forward(self, *args: torch.Tensor, **kwargs: torch.Tensor) -> torch.Tensor:
        x: Inputs = kwargs if kwargs else args[0]
        return self._run(x)[0]


def onnxruntime_modules(
    model: nn.Module,
    example: Inputs,
    *,
    threads: int | None = None,
    optimizations: tuple[str, ...] = ("all",),
    check: list[Inputs] | None = None,
    dynamic_batch: bool = True,
) -> dict[str, OrtModule]:
    """``model`` exported to ONNX (deployment folds, parity-checked on ``check``) and opened in
    onnxruntime once per graph optimization level, ready to time like any module. The file lives
    only while the sessions are built: each session holds its own copy of the graph."""
    with tempfile.TemporaryDirectory(prefix="rankdown-ort-") as tmp:
        path = Path(tmp) / "model.onnx"
        export_model(model, example, path, "onnx", check=check, dynamic_batch=dynamic_batch)
        return {level: OrtModule(path, threads, level) for level in optimizations}


def _torchscript(model: nn.Module, example: Inputs, path: Path) -> None:
    args, kwargs = _args(example)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = (
            torch.jit.trace(model, example_kwarg_inputs=kwargs, strict=False)
            if kwargs
            else torch.jit.trace(model, args, strict=False)
        )
        # deprecated in favour of torch.export, but still what many deployments load
        torch.jit.save(traced, str(path), _extra_files={MARKER: json.dumps({"version": __version__})})


def _exported(model: nn.Module, example: Inputs, path: Path, dynamic_batch: bool) -> None:
    args, kwargs = _args(example)
    ep = torch.export.export(model, args, kwargs or None, dynamic_shapes=_dynamic(example, dynamic_batch))
    torch.export.save(ep, str(path), extra_files={MARKER: json.dumps({"version": __version__})})


def _runner(fmt: str, path: Path) -> Any:
    if fmt == "onnx":
        return _onnx_runner(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        loaded = torch.jit.load(str(path)) if fmt == "torchscript" else torch.export.load(str(path)).module()

    def run(x: Inputs) -> list[torch.Tensor]:
        with torch.no_grad():
            return _outputs(forward(loaded, x))

    return run


def parity(model: nn.Module, run: Any, inputs: list[Inputs]) -> dict:
    """Max abs and relative (‖Δ‖/‖y‖) error of ``run`` against ``model`` over every output tensor."""
    max_abs, sq_diff, sq_ref, n = 0.0, 0.0, 0.0, 0
    for x in inputs:
        with torch.no_grad():
            want = _outputs(forward(model, x))
        got = run(x)
        if len(got) != len(want) or any(g.shape != w.shape for g, w in zip(got, want, strict=False)):
            raise RankdownError(
                f"the exported model's outputs {[tuple(g.shape) for g in got]} do not match PyTorch's "
                f"{[tuple(w.shape) for w in want]}"
            )
        for g, w in zip(got, want, strict=True):
            d = (g.double() - w.double()).abs()
            max_abs = max(max_abs, float(d.max()) if d.numel() else 0.0)
            sq_diff += float((d**2).sum())
            sq_ref += float((w.double() ** 2).sum())
        n += batch_len(x)
    return {"examples": n, "max_abs_error": max_abs, "rel_error": (sq_diff / max(sq_ref, 1e-300)) ** 0.5}


def export_model(
    model: nn.Module,
    example: Inputs,
    path: str | Path,
    fmt: str = "onnx",
    *,
    check: list[Inputs] | None = None,
    dynamic_batch: bool = True,
    fold: bool = True,
    tolerance: float = TOLERANCE,
) -> dict:
    """Export ``model`` (a copy, after the deployment folds) to ``path``; ``check``: batches of
    real inputs to compare on (default: ``example``). Raises, writing nothing, when the exported
    model's outputs differ from PyTorch's by more than ``tolerance`` (relative)."""
    if fmt not in FORMATS:
        raise RankdownError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    path = Path(path)
    if dynamic_batch and batch_len(example) == 1:
        example = batch_tile(example, 2)  # torch.export specializes a size-1 dimension to 1
    model = copy.deepcopy(model).eval()
    folds = None
    if fold:
        from rankdown.deployment.deploy import deploy

        folds = deploy(model)
    dtype = next((str(p.dtype).replace("torch.", "") for p in model.parameters()), "float32")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.tmp-{os.getpid()}-", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        try:
            if fmt == "onnx":
                _onnx(model, example, tmp, dynamic_batch)
            elif fmt == "torchscript":
                _torchscript(model, example, tmp)
            else:
                _exported(model, example, tmp, dynamic_batch)
        except RankdownError:
            raise
        except Exception as exc:  # the exporters raise many types; one line, the first of the message
            raise RankdownError(f"{fmt} export failed ({first_line(exc)})") from exc
        checked = parity(model, _runner(fmt, tmp), check or [example])
        if not checked["rel_error"] <= tolerance:
            raise RankdownError(
                f"{fmt} export does not match PyTorch: relative error {checked['rel_error']:.3g} > {tolerance:g} "
                f"(max abs {checked['max_abs_error']:.3g}); nothing written"
            )
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    return {
        "format": fmt,
        "file": str(path),
        "bytes": path.stat().st_size,
        "dtype": dtype,
        "opset": OPSET if fmt == "onnx" else None,
        "dynamic_batch": dynamic_batch if fmt != "torchscript" else False,
        "folds": folds,
        "parity": checked,
        "tolerance": tolerance,
    }
