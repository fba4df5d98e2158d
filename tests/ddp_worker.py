"""Run under torchrun by tests/test_train.py: fine-tunes a tiny model with DDP on synthetic data."""

import gc
import json
import os
import sys
from pathlib import Path

import torch
from torch import nn

from rankdown.training.train import TrainConfig, _dist, finetune, init_distributed
from rankdown.zoo.fashion import Split


def synthetic(n: int = 512) -> Split:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 1, 8, 8, generator=g)
    w = torch.randn(64, 4, generator=g)
    return Split(x, (x.reshape(n, -1) @ w).argmax(1))


def main() -> None:
    out, resume = Path(sys.argv[1]), "--resume" in sys.argv
    init_distributed()
    rank, world = _dist()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Dropout(0.1), nn.Linear(8 * 64, 4))
    kill = os.environ.get("KILL_RANK1_AT_EPOCH")
    if kill and rank == 1:
        import rankdown.training.train as tr

        real = tr.augment
        calls = {"n": 0}

        def dying(x, g, **kw):  # a worker that dies in the middle of epoch KILL (3 batches in)
            calls["n"] += 1
            if calls["n"] == (int(kill) - 1) * 4 + 3:
                os._exit(3)
            return real(x, g, **kw)

        tr.augment = dying
    cfg = TrainConfig(epochs=4, batch_size=32, lr=3e-3, seed=0, augment=True, max_steps_per_epoch=4)
    history = finetune(model, synthetic(), cfg, checkpoint_dir=out / "ckpt", resume=resume)
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    sums = [None] * world
    torch.distributed.all_gather_object(sums, [float(flat.sum()), float(flat.abs().sum())])
    if rank == 0:
        (out / "result.json").write_text(json.dumps({"world": world, "sums": sums, "history": history}))
    # End deterministically: every rank past its last collective, no tensor of one left to the
    # garbage collector at interpreter exit, then the process group torn down.
    torch.distributed.barrier()
    del sums, flat
    gc.collect()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
