"""A workload: a model and the data it is judged by. The end-to-end job takes one; a user builds it
from their own ``nn.Module`` and data, and the bundled models are workloads built the same way."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from rankdown.data.sources import Data
from rankdown.errors import RankdownError
from rankdown.measurement.quality import MetricFn
from rankdown.probe import Inputs, example_input, forward
from rankdown.surgery import hooked


@dataclass
class Workload:
    """``example``: one input (batch 1) for probes, MAC counts and latency. ``calib``: data for every
    data-aware step (sensitivity, fitting metrics, reconstruction, latency error budgets);
    ``eval``: quality; ``train``: fine-tuning. ``spec`` names how a saved folder rebuilds the model
    (a bundled name or package.module:factory; None for a model object). ``skip``: layers kept
    dense unless asked for (by default the layers that see the raw input)."""

    model: nn.Module
    example: Inputs
    calib: Data | Callable[[], Data] | None = None  # a callable loads the data when first needed
    eval: Data | Callable[[], Data] | None = None
    train: Data | Callable[[], Data] | None = None
    spec: str | None = None
    metric: MetricFn | None = None
    skip: tuple[str, ...] = ()
    augment: bool = False  # shift/flip augmentation while fine-tuning: only where it suits the data
    flip: bool = True
    eval_from_calib: bool = False  # no evaluation data was given: quality is measured on the calibration data

    def get(self, what: str) -> Data | None:
        """The data for a role ("calib", "eval", "train"), loaded on first use."""
        data = getattr(self, what)
        if callable(data) and not isinstance(data, Data):
            data = data()
            for role in ("calib", "eval", "train"):  # roles sharing one loader share its data
                if getattr(self, role) is getattr(self, what):
                    setattr(self, role, data)
        return data

    def need(self, what: str, flag: str, step: str) -> Data:
        """The data a step needs, or a one-line error naming the flag that provides it."""
        data = self.get(what)
        if data is None:
            raise RankdownError(
                f"{step} needs {what if what != 'calib' else 'calibration'} data: give {flag} (an image folder, a "
                ".safetensors/.npz/.npy file, package.module:function returning a DataLoader"
                + (", or noise to use seeded Gaussian inputs)" if what == "calib" else ")")
            )
        return data


def raw_input_layers(model: nn.Module, example: Inputs) -> tuple[str, ...]:
    """Conv2d/Linear layers called on the model's input itself (raw pixels): small, and sensitive
    where a low-rank fit gains least, so they stay dense by default, as the papers leave them."""
    inputs = list(example.values()) if isinstance(example, dict) else [example]
    found: list[str] = []
    handles = [
        m.register_forward_pre_hook(
            lambda _m, args, name=name: found.append(name) if args and any(args[0] is t for t in inputs) else None
        )
        for name, m in model.named_modules()
        if isinstance(m, (nn.Conv2d, nn.Linear)) and name
    ]
    with hooked(handles), torch.no_grad():
        forward(model, example)
    return tuple(dict.fromkeys(found))


def tied_layers(model: nn.Module) -> tuple[str, ...]:
    """Conv2d/Linear layers whose weight is shared with another module (an LM head tied to the
    token embedding): factorizing one would untie it and store both, so they stay dense."""
    owners: dict[int, list[str]] = {}
    for name, m in model.named_modules():
        for p in m.parameters(recurse=False):
            owners.setdefault(id(p), []).append(name)
    return tuple(
        name
        for name, m in model.named_modules()
        if isinstance(m, (nn.Conv2d, nn.Linear)) and len(owners.get(id(m.weight), [])) > 1
    )


def user_workload(
    model: nn.Module,
    *,
    calib: Data | None = None,
    eval: Data | None = None,
    train: Data | None = None,
    example: Inputs | None = None,
    input_shape: tuple[int, ...] | None = None,
    spec: str | None = None,
    metric: MetricFn | None = None,
    skip: tuple[str, ...] | None = None,
) -> Workload:
    """A workload from a user's model and data. Each data role defaults sensibly to the others:
    calibration to the training data, else the evaluation data; evaluation and training to the
    calibration data (the report says when evaluation ran on the calibration data)."""
    calib = calib or train or eval
    eval_from_calib = eval is None and calib is not None
    eval = eval or calib
    train = train or calib
    if example is None:
        if calib is not None:
            example = calib.example()
        elif input_shape is not None:
            example = example_input(model, input_shape)
        else:
            raise RankdownError(
                "give data (--calib-data, --eval-data or --train-data) or --input-shape for one example"
            )
    from rankdown.probe import check_runs, to_model

    example = to_model(example, model)
    check_runs(model, example, f"model {spec!r}" if spec else "the model")  # before any other forward pass
    if skip is None:
        skip = tuple(dict.fromkeys((*raw_input_layers(model.eval(), example), *tied_layers(model))))
    w = Workload(model.eval(), example, calib, eval, train, spec, metric, tuple(skip))
    w.eval_from_calib = eval_from_calib
    return w
