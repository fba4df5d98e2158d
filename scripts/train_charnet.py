"""Train the bundled character model (Jaderberg 2014's maxout CharNet) on the rendered character set.

python scripts/train_charnet.py --epochs 8 --out src/rankdown/weights/charnet.safetensors
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch
from safetensors.torch import save_file

from rankdown.chars import load_chars
from rankdown.models import CharNet
from rankdown.train import evaluate, train_classifier


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="src/rankdown/weights/charnet.safetensors")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    train, test = load_chars("train"), load_chars("test")
    model = CharNet()
    t0 = time.time()
    history = train_classifier(
        model,
        train,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        test_split=test,
        flip=False,
    )
    acc = evaluate(model.eval(), test.batches(1000))
    meta = {
        "test_accuracy": f"{acc:.4f}",
        "epochs": str(args.epochs),
        "seed": str(args.seed),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "train_seconds": f"{time.time() - t0:.0f}",
        "history": json.dumps(history),
        "command": "python scripts/train_charnet.py "
        + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v is not None),
    }
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, args.out, metadata=meta)
    print(json.dumps({k: v for k, v in meta.items() if k != "history"}, indent=1))


if __name__ == "__main__":
    main()
