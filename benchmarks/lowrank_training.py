"""Experiment (Tai et al. 2016): a low-rank network trained from scratch against decompose-then-
fine-tune, at equal MACs, on Fashion-MNIST.

The bundled architecture with its three inner 3×3 convs (features.3, .7, .10) in scheme-2 form —
a 3×1 conv to K channels, then a 1×3 conv — with K chosen so that each of those layers keeps half
its MACs. Two ways to get its weights:
- decompose-then-fine-tune: the closed-form scheme-2 decomposition of the shipped dense model
  (trained 10 epochs), then ``--finetune-epochs`` of fine-tuning;
- from scratch: random initialisation, batch norm between the 3×1 and 1×3 convs as Tai et al. do,
  trained with the recipe that trained the dense model (``--scratch-epochs``, AdamW, one-cycle).
Writes benchmarks/results/lowrank_training.json and a section of docs/training.md.

    python benchmarks/lowrank_training.py
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

from rankdown import CompressConfig, MacFraction, build_model, compress
from rankdown.layers import SeparableConv2d
from rankdown.measurement.bench import environment, model_cost
from rankdown.surgery import get_module, replace_module
from rankdown.training.train import TrainConfig, finetune, train_classifier
from rankdown.zoo import FashionVGG
from rankdown.zoo.fashion import load_fashion_mnist

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).parent))
from common import load_or_run, test_accuracy, write_section  # noqa: E402

LAYERS = ("features.3", "features.7", "features.10")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scratch-epochs", type=int, default=5)
    ap.add_argument("--finetune-epochs", type=int, default=1)
    ap.add_argument("--train-limit", type=int, default=None)
    ap.add_argument("--eval-limit", type=int, default=None)
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/lowrank_training.json"))
    ap.add_argument("--from-json", action="store_true")
    args = ap.parse_args()
    result = load_or_run(args.out, args.from_json, lambda: run(args))
    write_markdown(result, ROOT / "docs/training.md")


def run(args) -> dict:
    torch.set_num_threads(2)
    t0 = time.time()
    train = load_fashion_mnist("train", limit=args.train_limit)
    test = load_fashion_mnist("test", limit=args.eval_limit)
    example = test.images[:1]

    def acc(m):
        return test_accuracy(m, test)

    dense = build_model("fashion-vgg")
    res = compress(dense, CompressConfig("separable", MacFraction(0.5), layers=LAYERS), example)
    ranks = {r.name: r.rank for r in res.layers if r.method}
    decomposed = res.model
    acc_decomposed = acc(decomposed)
    t1 = time.time()
    ft_history = finetune(decomposed, train, TrainConfig(epochs=args.finetune_epochs, lr=1e-3))
    ft_seconds = time.time() - t1
    acc_finetuned = acc(decomposed)

    torch.manual_seed(0)
    scratch = FashionVGG()
    for name in LAYERS:
        replace_module(scratch, name, SeparableConv2d.build(get_module(scratch, name), ranks[name], batch_norm=True))
    t1 = time.time()
    sc_history = train_classifier(scratch, train, epochs=args.scratch_epochs, seed=0, test_split=None)
    sc_seconds = time.time() - t1
    acc_scratch = acc(scratch.eval())
    macs = {
        "dense": model_cost(dense, example).macs,
        "decomposed": model_cost(decomposed, example).macs,
        "scratch": model_cost(copy.deepcopy(scratch), example).macs,
    }
    result = {
        "command": "python benchmarks/lowrank_training.py " + " ".join(sys.argv[1:]),
        "environment": environment(),
        "ranks": ranks,
        "macs": macs,
        "test_examples": len(test),
        "dense_accuracy": acc(dense),
        "decomposed_accuracy": acc_decomposed,
        "finetuned_accuracy": acc_finetuned,
        "finetune_epochs": args.finetune_epochs,
        "finetune_seconds": ft_seconds,
        "finetune_history": ft_history,
        "scratch_accuracy": acc_scratch,
        "scratch_epochs": args.scratch_epochs,
        "scratch_seconds": sc_seconds,
        "scratch_history": sc_history,
        "seconds": time.time() - t0,
    }
    return result


def write_markdown(r: dict, path: Path) -> None:
    env = r["environment"]
    ranks = ", ".join(f"{k} K={v}" for k, v in r["ranks"].items())
    lines = [
        "## Low-rank training from scratch vs decompose-then-fine-tune (Tai et al. 2016)",
        "",
        f"Command: `{r['command'].strip()}` ({r['seconds'] / 60:.0f} min); raw results "
        f"`benchmarks/results/lowrank_training.json`. Machine: {env['cpu']}, torch {env['torch']}, "
        f"{env['torch_threads']} threads.",
        "",
        f"Scheme-2 (3×1 then 1×3) layers in place of the three inner 3×3 convs ({ranks}: half of each layer's "
        f"MACs). Whole model: {r['macs']['dense'] / 1e6:.2f} M MACs dense, {r['macs']['decomposed'] / 1e6:.2f} M "
        f"decomposed, {r['macs']['scratch'] / 1e6:.2f} M from scratch (its extra batch norms are not counted). "
        f"Accuracy on {r['test_examples']:,} test images.",
        "",
        "| network | training | test accuracy |",
        "|---|---|---:|",
        f"| dense (shipped) | 10 epochs from scratch | {100 * r['dense_accuracy']:.2f}% |",
        f"| scheme-2, closed-form decomposition of the dense model | none after decomposition | "
        f"{100 * r['decomposed_accuracy']:.2f}% |",
        f"| scheme-2, decompose then fine-tune | dense's 10 epochs + {r['finetune_epochs']} epoch fine-tuning "
        f"({r['finetune_seconds'] / 60:.1f} min) | {100 * r['finetuned_accuracy']:.2f}% |",
        f"| scheme-2 with batch norm, from scratch | {r['scratch_epochs']} epochs, the dense model's recipe "
        f"({r['scratch_seconds'] / 60:.1f} min) | {100 * r['scratch_accuracy']:.2f}% |",
        "",
    ]
    write_section(path, "lowrank_training", "\n".join(lines), title="# Training")


if __name__ == "__main__":
    main()
