"""Training and fine-tuning: one engine for the bundled model's training, fine-tuning after
compression (optionally distilled from the dense teacher), Force Regularization, and runs under
``torchrun`` (DistributedDataParallel: gloo on CPU, nccl on GPU).

Checkpoints are written atomically at epoch ends: the model as safetensors, the optimizer,
scheduler and random-number states as a plain-tensor file read back with ``weights_only=True``.
``resume`` continues exactly where the last checkpoint stopped: the same data order, the same
augmentation and dropout draws, hence the same weights as an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import math
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from rankdown.errors import RankdownError, first_line
from rankdown.measurement.quality import next_token_nll, token_inputs
from rankdown.planning.plan import retied_state, untied_state
from rankdown.probe import Inputs, batch_len, forward, primary_output, to_model
from rankdown.progress import progress


def augment(x: torch.Tensor, generator: torch.Generator, max_shift: int = 2, flip: bool = True) -> torch.Tensor:
    """Random horizontal flip (not for characters) and a random shift of up to ``max_shift`` pixels."""
    n, _, h, w = x.shape
    if flip:
        mask = torch.rand(n, generator=generator) < 0.5
        x = torch.where(mask[:, None, None, None], x.flip(3), x)
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


# --------------------------------------------------------------------------- Force Regularization


class ForceRegularizer:
    """Wen et al. 2017: attractive forces between each layer's normalised filters, added to the
    gradients before each optimizer step, so that training pulls filters toward a low-rank set.

    For filter i (a row of the N × C·k·k weight), w_i = W_i/‖W_i‖ and the added gradient is
    λ‖W_i‖ Σ_j P_i (w_i − w_j)/‖w_i − w_j‖^p, with P_i the projection on the tangent of the unit
    sphere at w_i (forces turn filters, they do not shrink them). ``kind="l2"`` is the authors'
    default "Degradation" force (p = 0); ``kind="l1"`` their "Constant" force (p = 1).
    ``adaptive``: the authors' ``force_decay_type=adaptive`` — each layer's force is rescaled to
    λ·‖∇L‖ (λ is then a ratio to the loss gradient, not an absolute strength), so one λ suits
    layers whose gradients differ by orders of magnitude.
    """

    def __init__(self, layers: dict[str, nn.Module], strength: float, kind: str = "l2", adaptive: bool = False) -> None:
        if strength < 0:
            raise RankdownError(f"force regularization strength must be >= 0, got {strength}")
        if kind not in ("l2", "l1"):
            raise RankdownError(f"force regularization kind must be 'l2' or 'l1', got {kind!r}")
        self.layers, self.strength, self.kind, self.adaptive = layers, strength, kind, adaptive

    @staticmethod
    def force_grad(weight: torch.Tensor, kind: str) -> torch.Tensor:
        w = weight.detach().reshape(weight.shape[0], -1)
        norms = w.norm(dim=1, keepdim=True).clamp_min(1e-12)
        u = w / norms
        if kind == "l2":
            f = u.shape[0] * u - u.sum(0, keepdim=True)  # Σ_j (u_i − u_j)
        else:
            diff = u[:, None, :] - u[None, :, :]
            dist = diff.norm(dim=2, keepdim=True).clamp_min(1e-12)
            f = (diff / dist).sum(1)
        f = f - (f * u).sum(1, keepdim=True) * u  # tangent projection
        return (norms * f).reshape(weight.shape)

    def apply(self) -> None:
        if self.strength == 0:
            return
        from rankdown.surgery import weight_of

        for module in self.layers.values():
            w = weight_of(module)
            g = self.force_grad(w, self.kind)
            lam = self.strength
            if self.adaptive:
                grad_norm = 0.0 if w.grad is None else float(w.grad.norm())
                lam = lam * grad_norm / max(float(g.norm()), 1e-12)
            if w.grad is None:
                w.grad = lam * g
            else:
                w.grad.add_(g, alpha=lam)


# --------------------------------------------------------------------------- the engine


@dataclass
class TrainConfig:
    epochs: int = 2
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup_fraction: float = 0.05  # linear warm-up, then cosine decay to zero
    distill: float = 0.0  # weight of the KL term against the teacher (0 = task loss only)
    # the task loss of unlabelled token sequences: each token predicted from the ones before it
    causal_lm: bool = False
    temperature: float = 4.0
    freeze_dense: bool = False  # train only the factorized layers (and nothing else)
    augment: bool = True
    flip: bool = True  # horizontal flips in the augmentation: never for characters
    seed: int = 0
    force_reg: float = 0.0
    force_kind: str = "l2"
    force_adaptive: bool = False  # λ relative to each layer's loss-gradient norm (Wen's "adaptive")
    optimizer: str = "adamw"  # or "sgd" (momentum 0.9, as Wen et al. trained with Force Regularization)
    max_steps_per_epoch: int | None = None  # for tests and smoke runs

    def validate(self) -> None:
        if self.epochs < 1 or self.batch_size < 1:
            raise RankdownError(f"epochs and batch size must be >= 1, got {self.epochs} and {self.batch_size}")
        if not self.lr > 0:
            raise RankdownError(f"learning rate must be > 0, got {self.lr}")
        if self.optimizer not in ("adamw", "sgd"):
            raise RankdownError(f"optimizer must be 'adamw' or 'sgd', got {self.optimizer!r}")
        if not 0.0 <= self.distill <= 1.0:
            raise RankdownError(f"distillation weight must be in [0, 1], got {self.distill}")


def fetch(train, idx: torch.Tensor) -> tuple[Inputs, torch.Tensor | None]:
    """The examples at ``idx``: tensor indexing for in-memory splits, else the dataset's items
    collated (any map-style Dataset: images, tensors, or dicts of keyword inputs)."""
    if hasattr(train, "images") and hasattr(train, "labels"):
        return train.images[idx], train.labels[idx]
    from torch.utils.data import default_collate

    from rankdown.data.sources import split_batch

    collate = getattr(train, "collate_fn", None) or default_collate
    return split_batch(collate([train[int(i)] for i in idx]), "training data")


def _dist() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def init_distributed() -> bool:
    """Join the process group when started by torchrun (WORLD_SIZE > 1); gloo on CPU, nccl on GPU."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or torch.distributed.is_initialized():
        return torch.distributed.is_available() and torch.distributed.is_initialized()
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    torch.distributed.init_process_group(backend)
    return True


CKPT_MODEL, CKPT_STATE, CKPT_META = "model.safetensors", "state.pt", "meta.json"


def _save_checkpoint(
    folder: Path, model: nn.Module, opt, sched, epoch: int, gen: torch.Generator, history: list[dict], config: dict
) -> None:
    from rankdown.storage import atomic_write_dir

    def write(tmp: Path) -> None:
        save_file(untied_state(model), str(tmp / CKPT_MODEL))  # tied weights (an LM's head) once
        torch.save(
            {
                "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(),
                "generator": gen.get_state(),
                "torch_rng": torch.get_rng_state(),
            },
            tmp / CKPT_STATE,
        )
        (tmp / CKPT_META).write_text(json.dumps({"epoch": epoch, "history": history, "config": config}, indent=1))

    atomic_write_dir(folder / "last", write, force=True)


def _load_checkpoint(folder: Path, epochs: int) -> tuple[dict, dict, dict] | None:
    """The last checkpoint, validated (a checkpoint is data: its epoch, history and optimizer state
    are checked, not trusted because they parse); None when there is none."""
    last = folder / "last"
    if not (last / CKPT_META).is_file():
        return None
    try:
        meta = json.loads((last / CKPT_META).read_text())
        model = load_file(str(last / CKPT_MODEL))
        state = torch.load(last / CKPT_STATE, map_location="cpu", weights_only=True)
    except Exception as exc:  # several error types for a damaged file
        raise RankdownError(f"checkpoint {last} could not be read ({first_line(exc)})") from exc
    bad = None
    epoch = meta.get("epoch") if isinstance(meta, dict) else None
    if not isinstance(meta, dict):
        bad = "meta.json is not an object"
    elif not isinstance(epoch, int) or isinstance(epoch, bool) or not 1 <= epoch <= epochs:
        bad = f"epoch {epoch!r} is not an epoch of this {epochs}-epoch run"
    elif not isinstance(meta.get("history"), list) or len(meta["history"]) != epoch:
        bad = "its history does not list one row per finished epoch"
    elif not isinstance(meta.get("config", {}), dict):
        bad = "its config is not an object"
    elif not isinstance(state, dict) or not {"optimizer", "scheduler", "generator", "torch_rng"} <= set(state):
        bad = "state.pt lacks the optimizer, scheduler or random-number states"
    elif not all(isinstance(state[k], torch.Tensor) for k in ("generator", "torch_rng")):
        bad = "its random-number states are not tensors"
    if bad:
        raise RankdownError(f"checkpoint {last} cannot be resumed: {bad}")
    return meta, model, state


def finetune(
    model: nn.Module,
    train_split,
    config: TrainConfig,
    *,
    teacher: nn.Module | None = None,
    trainable: Iterable[str] | None = None,
    frozen: Iterable[str] = (),
    regularized: dict[str, nn.Module] | None = None,
    test_split=None,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
) -> list[dict]:
    """Train ``model`` on ``train_split`` (a rankdown.zoo.fashion.Split, or any map-style Dataset whose
    items are inputs, (inputs, label) pairs or dicts of keyword inputs); returns per-epoch history.
    Without labels the loss is distillation from ``teacher`` alone.

    ``trainable``: names of the submodules to train when ``config.freeze_dense`` (the factorized
    layers). ``frozen``: submodules kept fixed, batch-norm statistics included (progressive
    fine-tuning). ``regularized``: layers that Force Regularization acts on. Under torchrun the model is
    wrapped in DistributedDataParallel, each process takes every world-th example of the shuffled
    order, and only rank 0 logs and writes checkpoints.
    """
    config.validate()
    rank, world = _dist()
    torch.manual_seed(config.seed)
    gen = torch.Generator().manual_seed(config.seed)
    if config.freeze_dense:
        names = list(trainable or [])
        if not names:
            raise RankdownError("freeze_dense needs the names of the layers to train (none were factorized?)")
        for p in model.parameters():
            p.requires_grad_(False)
        for n in names:
            for p in model.get_submodule(n).parameters():
                p.requires_grad_(True)
    frozen = list(frozen)
    for n in frozen:
        for p in model.get_submodule(n).parameters():
            p.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise RankdownError("nothing to train: every parameter is frozen")
    net: nn.Module = model
    if world > 1:
        net = nn.parallel.DistributedDataParallel(model)
    opt: torch.optim.Optimizer
    if config.optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=config.lr, momentum=0.9, weight_decay=config.weight_decay)
    else:
        opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    per_rank = math.ceil(len(train_split) / world)
    steps = math.ceil(per_rank / config.batch_size)
    if config.max_steps_per_epoch:
        steps = min(steps, config.max_steps_per_epoch)
    total, warm = config.epochs * steps, max(1, int(config.warmup_fraction * config.epochs * steps))

    def lr_at(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    force = (
        ForceRegularizer(regularized or {}, config.force_reg, config.force_kind, config.force_adaptive)
        if config.force_reg
        else None
    )
    history: list[dict] = []
    start_epoch = 0
    ckpt = Path(checkpoint_dir) if checkpoint_dir else None
    if resume:
        if ckpt is None:
            raise RankdownError("resume needs a checkpoint folder")
        loaded = _load_checkpoint(ckpt, config.epochs)
        if loaded is None:
            raise RankdownError(f"no checkpoint to resume from in {ckpt}")
        meta, weights, state = loaded
        weights = retied_state(model, weights)
        saved = meta.get("config", {})
        changed = sorted(k for k, v in dataclasses.asdict(config).items() if k in saved and saved[k] != v)
        if changed:
            raise RankdownError(
                "resume continues an interrupted run with the same settings; these differ from the checkpoint's: "
                + ", ".join(f"{k} ({saved[k]!r} -> {getattr(config, k)!r})" for k in changed)
            )
        from rankdown.models.load import state_dict_mismatch

        mismatch = state_dict_mismatch(model, weights)
        if mismatch:
            raise RankdownError(f"checkpoint in {ckpt} does not fit this model: {mismatch}")
        try:
            model.load_state_dict(weights)
            opt.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["scheduler"])
            gen.set_state(state["generator"])
            torch.set_rng_state(state["torch_rng"])
        except (RuntimeError, ValueError, KeyError, TypeError) as exc:
            raise RankdownError(f"checkpoint in {ckpt} cannot be resumed ({first_line(exc)})") from exc
        start_epoch, history = int(meta["epoch"]), list(meta["history"])
    if teacher is not None:
        teacher.eval()
    for epoch in range(start_epoch, config.epochs):
        net.train()
        for n in frozen:
            model.get_submodule(n).eval()
        order = torch.randperm(len(train_split), generator=gen)
        mine = order[rank::world]
        t0, seen, loss_sum, correct = time.perf_counter(), 0, 0.0, 0
        bar = (
            progress(range(steps), total=steps, desc=f"epoch {epoch + 1}/{config.epochs}")
            if rank == 0
            else iter(range(steps))
        )
        for step in bar:
            idx = mine[step * config.batch_size : (step + 1) * config.batch_size]
            if len(idx) == 0:
                break
            x, y = fetch(train_split, idx)
            x = to_model(x, model)
            if config.augment and isinstance(x, torch.Tensor) and x.ndim == 4:
                x = augment(x, gen, flip=config.flip)
            logits = primary_output(forward(net, x))
            flat = logits.reshape(-1, logits.shape[-1])  # (batch[, positions], classes)
            if config.causal_lm:
                ids, mask = token_inputs(x, "training data")
                loss = next_token_nll(logits, ids, mask, "training data") / mask[:, 1:].sum().clamp(min=1)
            elif y is None and (teacher is None or config.distill <= 0):
                raise RankdownError("unlabelled training data: fine-tuning needs distillation from the dense model")
            else:
                loss = F.cross_entropy(flat, y.reshape(-1)) if y is not None else flat.new_zeros(())
            task = y is not None or config.causal_lm
            if teacher is not None and config.distill > 0:
                with torch.no_grad():
                    t_flat = primary_output(forward(teacher, x)).reshape(-1, logits.shape[-1])
                kd = (
                    F.kl_div(
                        F.log_softmax(flat / config.temperature, 1),
                        F.softmax(t_flat / config.temperature, 1),
                        reduction="batchmean",
                    )
                    * config.temperature**2
                )
                loss = (1 - config.distill) * loss + config.distill * kd if task else kd
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if force is not None:
                force.apply()
            opt.step()
            sched.step()
            b = batch_len(x)
            seen += b
            loss_sum += loss.item() * b
            if y is not None:
                correct += int((logits.argmax(-1) == y).float().mean() * b)
            if rank == 0 and hasattr(bar, "set_postfix"):
                bar.set_postfix(
                    loss=f"{loss_sum / seen:.4f}",
                    acc=f"{correct / seen:.3f}",
                    ex_s=f"{seen * world / (time.perf_counter() - t0):.0f}",
                )
        row = {
            "epoch": epoch + 1,
            "train_loss": loss_sum / max(seen, 1),
            "train_acc": correct / max(seen, 1),
            "examples_per_s": seen * world / (time.perf_counter() - t0),
        }
        if test_split is not None and rank == 0:
            row["test_acc"] = evaluate(model, test_split.batches(500), total=math.ceil(len(test_split) / 500))
        history.append(row)
        if ckpt is not None and rank == 0:
            _save_checkpoint(ckpt, model, opt, sched, epoch + 1, gen, history, dataclasses.asdict(config))
        if world > 1:
            torch.distributed.barrier()
    if net is not model:
        # The DDP wrapper sits in a reference cycle (its reducer refers back to it): left to the
        # final garbage collection at interpreter exit, gloo's worker threads can still hold its
        # tensors then, and the process aborts ("terminate called without an active exception").
        # Free it here, while the process group is alive.
        del net, opt, sched
        gc.collect()
    model.eval()
    return history


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
    flip: bool = True,
) -> list[dict]:
    """Training from scratch as the bundled model was trained (AdamW, one-cycle schedule): kept
    unchanged so that scripts/train_bundled.py reproduces the shipped weights."""
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
            loss = F.cross_entropy(model(augment(x, g, flip=flip)), y)
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
