"""Training and evaluation loops for classifiers (used to train the bundled model and to score
compressed ones). Kept small on purpose: the fine-tuning engine builds on these.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from rankdown.progress import progress


def augment(x: torch.Tensor, generator: torch.Generator, max_shift: int = 2) -> torch.Tensor:
    """Random horizontal flip and a random shift of up to ``max_shift`` pixels (pad and crop)."""
    n, _, h, w = x.shape
    flip = torch.rand(n, generator=generator) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(3), x)
    pad = F.pad(x, (max_shift,) * 4, value=float(x.min()))
    dy, dx = torch.randint(0, 2 * max_shift + 1, (2,), generator=generator).tolist()
    return pad[:, :, dy : dy + h, dx : dx + w]


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    *,
    total: int | None = None,
    desc: str = "evaluate",
) -> float:
    """Top-1 accuracy over ``batches``."""
    model.eval()
    correct = seen = 0
    for x, y in progress(batches, total=total, desc=desc):
        correct += int((model(x).argmax(1) == y).sum())
        seen += len(y)
    if seen == 0:
        raise ValueError("evaluate: no data")
    return correct / seen


def train_classifier(
    model: nn.Module,
    split,
    *,
    epochs: int,
    batch_size: int = 128,
    lr: float = 2e-3,
    weight_decay: float = 5e-4,
    seed: int = 0,
    test_split=None,
) -> list[dict]:
    """AdamW with a one-cycle schedule and light augmentation. Returns per-epoch history."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    steps_per_epoch = math.ceil(len(split) / batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps_per_epoch)
    history = []
    for epoch in range(epochs):
        model.train()
        loss_sum = 0.0
        bar = progress(
            split.batches(batch_size, shuffle=True, generator=g),
            total=steps_per_epoch,
            desc=f"epoch {epoch + 1}/{epochs}",
        )
        for x, y in bar:
            loss = F.cross_entropy(model(augment(x, g)), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += loss.item() * len(y)
        row = {"epoch": epoch + 1, "train_loss": loss_sum / len(split)}
        if test_split is not None:
            row["test_acc"] = evaluate(model, test_split.batches(1000), total=math.ceil(len(test_split) / 1000))
        history.append(row)
        print(row, flush=True)
    return history
