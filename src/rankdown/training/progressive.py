"""Progressive fine-tuning (Denton et al. 2014, section 3.3): approximate one layer, freeze it and
every layer before it, fine-tune the layers after it, then approximate the next one.

The alternative, approximate everything and then fine-tune, lets later layers be fitted to an input
that is still about to change; here each layer is factorized from weights that have already
adapted to the approximations upstream of it. Ranks and methods are chosen once, on the dense
model, so both schedules compare at the same MACs.
"""

from __future__ import annotations

import copy

from torch import nn

from rankdown.fitting.calibrate import execution_order
from rankdown.planning.compress import CompressConfig, CompressResult, compress
from rankdown.planning.rank import LayerRanks
from rankdown.probe import Inputs, batch_slice
from rankdown.progress import progress
from rankdown.surgery import record_inputs
from rankdown.training.train import TrainConfig, finetune


def called_up_to(model: nn.Module, fqn: str, example: Inputs) -> list[str]:
    """Every module with parameters or buffers whose first call comes no later than ``fqn``'s
    (``fqn`` included): what "the layers before it" means for a model with a custom forward."""
    names = [n for n, m in model.named_modules() if n and (list(m.parameters(False)) or list(m.buffers(False)))]
    names = list(dict.fromkeys([*names, fqn]))
    order = list(record_inputs(model, example, names))
    before = order[: order.index(fqn) + 1]
    return [n for n in before if not n.startswith(fqn + ".")]


def progressive_compress(
    model: nn.Module,
    config: CompressConfig,
    example: Inputs,
    train_split,
    train_config: TrainConfig,
    *,
    metrics: dict | None = None,
    model_spec: str | None = None,
) -> tuple[CompressResult, list[dict]]:
    """Factorize ``model``'s layers one at a time in execution order, fine-tuning the later layers
    for ``train_config`` after each (a few hundred steps: ``max_steps_per_epoch``). Returns the
    fine-tuned model with the plan and report rows chosen on the dense model (their weight errors
    are those of the dense fits), and the per-layer training histories."""
    planned = compress(model, config, example, metrics=metrics, model_spec=model_spec)
    current = copy.deepcopy(model)
    order = execution_order(current, list(planned.plan.layers), batch_slice(example, 0, 1))
    histories: list[dict] = []
    for fqn in progress(order, total=len(order), desc="progressive"):
        lp = planned.plan.layers[fqn]
        step = CompressConfig(lp.method, LayerRanks({fqn: lp.rank}, "progressive"), layers=(fqn,))
        compress(current, step, example, inplace=True, metrics=metrics)
        frozen = called_up_to(current, fqn, batch_slice(example, 0, 1))
        hist = finetune(current, train_split, train_config, frozen=frozen)
        histories.append({"layer": fqn, "frozen": len(frozen), "history": hist})
    for p in current.parameters():
        p.requires_grad_(True)
    current.eval()
    return CompressResult(current, planned.plan, planned.layers), histories
