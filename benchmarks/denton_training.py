"""Benchmark: how accuracy is recovered after factorization, on the bundled model.

Denton et al. 2014 fine-tune progressively (approximate a layer, freeze it and the layers below,
fine-tune the layers above, move up); Zhang et al. 2015 reconstruct each layer's response on data,
through the ReLU that follows it (nonlinear) or not (linear). Here, for fashion-vgg's three inner
3×3 convs (features.3, .7, .10) at 2× and 4× fewer MACs, by channel SVD and Tucker-2:

- one-shot: factorize all, then fine-tune all for 3·S steps;
- progressive: S steps after each layer (3·S in all), earlier layers frozen;
- joint linear / joint nonlinear: Zhang's asymmetric data reconstruction (1,024 training images),
  linear response or after BatchNorm → ReLU, then the same 3·S fine-tuning steps.

Same AdamW settings everywhere (lr 1e-3, batch 128, warm-up then cosine). Accuracy on the full test
set; nothing is timed (the architectures are identical per method and cut).

    python benchmarks/denton_training.py              # ~25 min on 2 cores
    python benchmarks/denton_training.py --from-json  # redraw
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

from rankdown import CompressConfig, build_model, compress
from rankdown.fitting.calibrate import CalibrationConfig, reconstruct
from rankdown.measurement.bench import environment
from rankdown.planning.rank import MacFraction
from rankdown.training.progressive import progressive_compress
from rankdown.training.train import TrainConfig, finetune
from rankdown.zoo.fashion import load_fashion_mnist

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).parent))
from common import load_or_run, test_accuracy, write_section  # noqa: E402

LAYERS = ("features.3", "features.7", "features.10")
METHODS = ("channel-svd", "tucker2")
CUTS = (2.0, 4.0)
SCHEDULES = ("one-shot", "progressive", "joint linear", "joint nonlinear")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=100, help="fine-tuning steps per factorized layer (batch 128)")
    ap.add_argument("--calibration", type=int, default=1024)
    ap.add_argument("--eval-limit", type=int, default=None)
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/denton_training.json"))
    ap.add_argument("--from-json", action="store_true")
    args = ap.parse_args()
    result = load_or_run(args.out, args.from_json, lambda: run(args))
    plot(result, ROOT / "docs/img/denton_training.png")
    write_markdown(result, ROOT / "docs/benchmarks.md")


def run(args) -> dict:
    torch.set_num_threads(2)
    t0 = time.time()
    model = build_model("fashion-vgg").eval()
    test = load_fashion_mnist("test", limit=args.eval_limit)
    train = load_fashion_mnist("train")
    calib = train.images[: args.calibration]
    example = calib[:1]

    def acc(m):
        return test_accuracy(m, test)

    total = args.steps * len(LAYERS)
    ft_all = TrainConfig(epochs=1, lr=1e-3, max_steps_per_epoch=total, seed=0)
    ft_layer = TrainConfig(epochs=1, lr=1e-3, max_steps_per_epoch=args.steps, seed=0)
    dense_acc = acc(model)
    print(json.dumps({"dense": dense_acc}), flush=True)
    rows = []
    for cut in CUTS:
        for method in METHODS:
            cfg = CompressConfig(method, MacFraction(1 / cut), layers=LAYERS)
            base = compress(model, cfg, example)
            for schedule in SCHEDULES:
                t1 = time.time()
                row = {"cut": cut, "method": method, "schedule": schedule}
                if schedule == "progressive":
                    res, _ = progressive_compress(model, cfg, example, train, ft_layer)
                    row["accuracy"] = None  # every stage is fine-tuned: there is no "before"
                    row["accuracy_finetuned"] = acc(res.model)
                else:
                    m = copy.deepcopy(base.model)
                    if schedule.startswith("joint"):
                        cc = CalibrationConfig(mode="joint", nonlinear=schedule.endswith("nonlinear"))
                        fit = reconstruct(model, m, list(LAYERS), calib, cc)
                        row["output_error"] = {k: v.output_error_after for k, v in fit.items()}
                    row["accuracy"] = acc(m)
                    finetune(m, train, ft_all)
                    row["accuracy_finetuned"] = acc(m)
                row["seconds"] = time.time() - t1
                rows.append(row)
                print(json.dumps(row), flush=True)
    return {
        "command": "python benchmarks/denton_training.py " + " ".join(sys.argv[1:]),
        "environment": environment(),
        "steps_per_layer": args.steps,
        "finetune_steps_total": total,
        "calibration_examples": args.calibration,
        "test_examples": len(test),
        "dense_accuracy": dense_acc,
        "rows": rows,
        "seconds": time.time() - t0,
    }


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 4.2))
    width = 0.2
    groups = [(c, m) for c in CUTS for m in METHODS]
    for i, s in enumerate(SCHEDULES):
        vals = []
        for c, m in groups:
            r = [r for r in result["rows"] if r["cut"] == c and r["method"] == m and r["schedule"] == s]
            vals.append(100 * r[0]["accuracy_finetuned"] if r else float("nan"))
        ax.bar([j + (i - 1.5) * width for j in range(len(groups))], vals, width, label=s)
    ax.axhline(100 * result["dense_accuracy"], color="gray", lw=0.8, label="dense")
    ax.set_xticks(range(len(groups)), [f"{m} {c:g}×" for c, m in groups])
    lo = min(100 * r["accuracy_finetuned"] for r in result["rows"])
    ax.set_ylim(lo - 2, 100 * result["dense_accuracy"] + 1)
    ax.set_ylabel("test accuracy after fine-tuning, %")
    ax.set_title(
        f"fashion-vgg, 3 inner convs: {result['finetune_steps_total']} fine-tuning steps in every schedule", fontsize=10
    )
    ax.legend(fontsize=8, ncol=5, loc="lower left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def write_markdown(result: dict, path: Path) -> None:
    env = result["environment"]
    lines = [
        "## Recovering accuracy: progressive fine-tuning and Zhang's nonlinear reconstruction (fashion-vgg)",
        "",
        f"Command: `{result['command'].strip()}` ({result['seconds'] / 60:.0f} min); raw results "
        f"`benchmarks/results/denton_training.json`. Machine: {env['cpu']}, torch {env['torch']}, 2 threads.",
        "",
        f"Dense: {100 * result['dense_accuracy']:.2f}%. features.3, .7 and .10 at the stated MAC cut. Every "
        f"schedule gets {result['finetune_steps_total']} AdamW steps of 128 images (progressive: "
        f"{result['steps_per_layer']} after each layer, earlier layers and their batch-norm statistics frozen). "
        f"Joint reconstruction uses {result['calibration_examples']} training images. Accuracy on "
        f"{result['test_examples']:,} test images.",
        "",
        "| MAC cut | method | schedule | accuracy before fine-tuning | after fine-tuning | seconds |",
        "|---:|---|---|---:|---:|---:|",
    ]
    for r in result["rows"]:
        before = "–" if r["accuracy"] is None else f"{100 * r['accuracy']:.2f}%"
        lines.append(
            f"| {r['cut']:g}× | {r['method']} | {r['schedule']} | {before} | {100 * r['accuracy_finetuned']:.2f}% | "
            f"{r['seconds']:.0f} |"
        )
    lines += ["", "![schedules](img/denton_training.png)", ""]
    write_section(path, "denton_training", "\n".join(lines))


if __name__ == "__main__":
    main()
