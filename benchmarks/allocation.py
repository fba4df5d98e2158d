"""Benchmark: one global budget spent by sensitivity, against the same MACs spread uniformly.

On the bundled Fashion-MNIST model, for Tucker-2 and CP at 2×, 3× and 4× fewer MACs (first conv and
head dense, as by default):
- uniform: the same fraction of MACs kept in every layer, bisected until the whole model meets the
  target (as benchmarks/fashion_speed.py does);
- allocated (layer): ranks from rankdown's allocator, layer-local output error as sensitivity;
- allocated (model): the same with the model-output error as sensitivity.
Test accuracy before any fine-tuning, on the full test set. Calibration: the first 256 training
images. Writes benchmarks/results/allocation.json, docs/img/allocation.png and a section of
docs/benchmarks.md.

    python benchmarks/allocation.py
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

from rankdown import CompressConfig, build_model, compress
from rankdown.measurement.bench import environment, model_cost
from rankdown.planning.allocate import Budget
from rankdown.planning.compress import allocate_ranks
from rankdown.zoo import BUNDLED
from rankdown.zoo.fashion import load_fashion_mnist

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).parent))
from common import load_or_run, test_accuracy, write_section  # noqa: E402
from fashion_speed import compress_to_target  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calibration", type=int, default=256)
    ap.add_argument("--eval-limit", type=int, default=None)
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/allocation.json"))
    ap.add_argument("--from-json", action="store_true")
    args = ap.parse_args()
    result = load_or_run(args.out, args.from_json, lambda: run(args))
    plot(result, ROOT / "docs/img/allocation.png")
    write_markdown(result, ROOT / "docs/benchmarks.md")


def run(args) -> dict:
    torch.set_num_threads(2)
    t0 = time.time()
    model = build_model("fashion-vgg")
    test = load_fashion_mnist("test", limit=args.eval_limit)
    calib = load_fashion_mnist("train", limit=args.calibration).images
    example = calib[:1]
    dense_macs = model_cost(model, example).macs

    def acc(m):
        return test_accuracy(m, test)

    rows = []
    skip = BUNDLED["fashion-vgg"].default_skip
    for method in ("tucker2", "cp"):
        for target in (2.0, 3.0, 4.0):
            _, res = compress_to_target(model, method, target, example)
            rows.append(
                {
                    "method": method,
                    "target": target,
                    "how": "uniform",
                    "macs_reduction": dense_macs / model_cost(res.model, example).macs,
                    "accuracy": acc(res.model),
                }
            )
            for criterion in ("layer", "model"):
                cfg = CompressConfig(method, skip=skip)
                policy = allocate_ranks(
                    model, cfg, calib, Budget(speedup=target), criterion=criterion, cache_dir=args.cache_dir
                )
                res = compress(model, dataclasses.replace(cfg, rank=policy), example)
                rows.append(
                    {
                        "method": method,
                        "target": target,
                        "how": f"allocated ({criterion})",
                        "macs_reduction": dense_macs / model_cost(res.model, example).macs,
                        "accuracy": acc(res.model),
                        "ranks": {k: list(v) if isinstance(v, tuple) else v for k, v in policy.ranks.items()},
                    }
                )
            for r in rows[-3:]:
                print(json.dumps({k: v for k, v in r.items() if k != "ranks"}), flush=True)
    result = {
        "command": "python benchmarks/allocation.py " + " ".join(sys.argv[1:]),
        "environment": environment(),
        "dense_accuracy": acc(model),
        "test_examples": len(test),
        "calibration": args.calibration,
        "rows": rows,
        "seconds": time.time() - t0,
    }
    return result


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, method in zip(axes, ("tucker2", "cp"), strict=True):
        for how, marker in (("uniform", "o"), ("allocated (layer)", "s"), ("allocated (model)", "^")):
            rows = [r for r in result["rows"] if r["method"] == method and r["how"] == how]
            ax.plot([r["macs_reduction"] for r in rows], [100 * r["accuracy"] for r in rows], marker=marker, label=how)
        ax.axhline(100 * result["dense_accuracy"], color="gray", ls=":", label="dense")
        ax.set(title=method, xlabel="MAC reduction (theoretical speedup)")
        ax.legend(fontsize=8)
    axes[0].set_ylabel("test accuracy, % (no fine-tuning)")
    fig.suptitle("fashion-vgg: uniform vs sensitivity-allocated ranks at equal MACs", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def write_markdown(result: dict, path: Path) -> None:
    env = result["environment"]
    lines = [
        "## Global budgets: sensitivity-allocated vs uniform ranks",
        "",
        f"Command: `{result['command'].strip()}` ({result['seconds'] / 60:.0f} min). Raw results: "
        "`benchmarks/results/allocation.json`. Machine: "
        f"{env['cpu']}, torch {env['torch']}.",
        "",
        f"Bundled model, accuracy on {result['test_examples']:,} test images **before fine-tuning** "
        f"(dense: {100 * result['dense_accuracy']:.2f}%). Calibration: the first {result['calibration']} "
        "training images. Uniform = the same MAC fraction in every layer; allocated = `--speedup S` with "
        "`--sensitivity layer` or `model`.",
        "",
        "| method | target | uniform | allocated (layer) | allocated (model) |",
        "|---|---|---:|---:|---:|",
    ]
    for method in ("tucker2", "cp"):
        for target in (2.0, 3.0, 4.0):
            cells = []
            for how in ("uniform", "allocated (layer)", "allocated (model)"):
                r = next(
                    x for x in result["rows"] if x["method"] == method and x["target"] == target and x["how"] == how
                )
                cells.append(f"{100 * r['accuracy']:.2f}% (÷{r['macs_reduction']:.2f})")
            lines.append(f"| {method} | {target:.0f}× | " + " | ".join(cells) + " |")
    lines += ["", "![allocation](img/allocation.png)", ""]
    write_section(path, "allocation", "\n".join(lines))


if __name__ == "__main__":
    main()
