"""Train a bundled model from scratch on its bundled data and write its safetensors weights.

python scripts/train_bundled.py --model fashion-vgg --epochs 10   # -> src/rankdown/zoo/weights/fashion_vgg.safetensors
python scripts/train_bundled.py --model charnet --epochs 8        # -> src/rankdown/zoo/weights/charnet.safetensors

The shipped weights were made with this code under its earlier names (scripts/train_fashion_vgg.py,
scripts/train_charnet.py; both still run it), as their metadata records.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from rankdown.training.train import evaluate, train_classifier
from rankdown.zoo import BUNDLED, DATASETS

EPOCHS = {"fashion-vgg": 10, "charnet": 8}
WEIGHTS = Path(__file__).resolve().parent.parent / "src/rankdown/zoo/weights"


def main(argv: list[str] | None = None, script: str = "scripts/train_bundled.py") -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=sorted(EPOCHS), required=True)
    ap.add_argument("--epochs", type=int, default=None, help="default: 10 for fashion-vgg, 8 for charnet")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--data-dir", default=None, help="Fashion-MNIST folder (default: the Debian package's)")
    ap.add_argument("--out", default=None, help="default: the shipped weights file (needs --force to replace)")
    ap.add_argument("--force", action="store_true")
    args = ap.parse_args(argv)
    spec = BUNDLED[args.model]
    args.epochs = args.epochs or EPOCHS[args.model]
    out = Path(args.out or WEIGHTS / spec.weights)
    if out.exists() and not args.force:
        sys.exit(f"{out} exists; pass --force to replace it")
    torch.set_num_threads(args.threads)
    load = DATASETS[spec.dataset]
    train, test = load("train", args.data_dir), load("test", args.data_dir)
    model = spec.factory()
    t0 = time.time()
    history = train_classifier(
        model,
        train,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        test_split=test,
        flip=spec.dataset != "chars",  # a mirrored character is another character
    )
    acc = evaluate(model.eval(), test.batches(1000))
    given = {k: v for k, v in vars(args).items() if v is not None and v is not False}
    meta = {
        "test_accuracy": f"{acc:.4f}",
        "epochs": str(args.epochs),
        "seed": str(args.seed),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "train_seconds": f"{time.time() - t0:.0f}",
        "history": json.dumps(history),
        "command": f"python {script} "
        + " ".join(f"--{k.replace('_', '-')}" + ("" if v is True else f" {v}") for k, v in given.items()),
    }
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, suffix=".tmp")
    os.close(fd)
    try:
        save_file(state, tmp, metadata=meta)
        os.replace(tmp, out)  # never a half-written weights file
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    print(json.dumps({k: v for k, v in meta.items() if k != "history"}, indent=1))


if __name__ == "__main__":
    main()
