"""Benchmark: methods × fitting metrics on the bundled model (Denton et al. 2014, section 3).

The three inner 3×3 convs of fashion-vgg (features.3, .7, .10) are factorized at 2× and 4× fewer
MACs each, by channel SVD, Tucker-2, scheme 2 (separable) and biclustering (G = H = 2, SVD or
outer-product blocks), each fitted
under the Frobenius, Mahalanobis (gradient-weighted) and data-covariance metrics (256 training
images; biclustering keeps its groups only under the diagonal Mahalanobis metric). Accuracy on
the test set without fine-tuning and after the same short fine-tuning budget (AdamW, 150 steps
of 128 images, lr 1e-3), and measured CPU speedup (2 threads, guarded, fastest layout) beside the
theoretical one. The bundled models are grayscale, so the monochromatic method
(for colour first layers) has nothing to do here.

    python benchmarks/denton_metrics.py                  # ~25 min on 2 cores
    python benchmarks/denton_metrics.py --model charnet  # the character model (conv2, conv3)
    python benchmarks/denton_metrics.py --from-json      # redraw
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
from rankdown.fitting.metrics import collect
from rankdown.measurement.bench import count_macs, environment
from rankdown.planning.rank import MacFraction
from rankdown.training.train import TrainConfig, finetune
from rankdown.zoo import DATASETS

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).parent))
from common import batch_latencies, load_or_run, test_accuracy, write_section  # noqa: E402

MODELS = {  # layers factorized, dataset, horizontal flips in fine-tuning
    "fashion-vgg": (("features.3", "features.7", "features.10"), "fashion-mnist", True),
    "charnet": (("conv2", "conv3"), "chars", False),
}
METHODS = ("channel-svd", "tucker2", "separable", "bicluster", "bicluster-cp")
METRICS = ("frobenius", "mahalanobis", "covariance")
CUTS = (2.0, 4.0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=sorted(MODELS), default="fashion-vgg")
    ap.add_argument("--steps", type=int, default=150, help="fine-tuning steps (batch 128)")
    ap.add_argument("--lr", type=float, default=1e-3, help="fine-tuning learning rate (AdamW)")
    ap.add_argument("--calibration", type=int, default=256)
    ap.add_argument("--runs", type=int, default=40)
    ap.add_argument("--eval-limit", type=int, default=None)
    ap.add_argument("--out", default=None, help="default: benchmarks/results/denton_metrics[_MODEL].json")
    ap.add_argument("--from-json", action="store_true")
    args = ap.parse_args()
    suffix = "" if args.model == "fashion-vgg" else "_" + args.model.replace("-", "_")
    args.out = args.out or str(ROOT / f"benchmarks/results/denton_metrics{suffix}.json")
    result = load_or_run(args.out, args.from_json, lambda: run(args))
    plot(result, ROOT / f"docs/img/denton_metrics{suffix}.png")
    out = Path(args.out).resolve()
    raw = out.relative_to(ROOT) if out.is_relative_to(ROOT) else out
    write_markdown(result, ROOT / "docs/benchmarks.md", suffix, raw)


def run(args) -> dict:
    torch.set_num_threads(2)
    t0 = time.time()
    layers, dataset, flip = MODELS[args.model]
    model = build_model(args.model)
    test = DATASETS[dataset]("test", limit=args.eval_limit)
    train = DATASETS[dataset]("train")
    calib = train.images[: args.calibration]
    example = calib[:1]
    shape = tuple(example.shape[1:])
    xs = {b: torch.randn(b, *shape, generator=torch.Generator().manual_seed(0)) for b in (1, 64)}

    def acc(m):
        return test_accuracy(m, test)

    def lat(m):
        return batch_latencies(m, xs, args.runs)

    def macs(m):
        return sum(count_macs(m, example).values())

    stats = {metric: collect(model, list(layers), calib, metric) for metric in METRICS}
    dense_lat = lat(model)
    dense = {
        "accuracy": acc(model),
        "latency_ms": {b: v.median_ms for b, v in dense_lat.items()},
        "macs": macs(model),
    }
    print(json.dumps(dense), flush=True)
    ft_cfg = TrainConfig(epochs=1, lr=args.lr, max_steps_per_epoch=args.steps, seed=0, flip=flip)
    rows = []
    for cut in CUTS:
        for method in METHODS:
            timed = None
            for metric in METRICS:
                if method.startswith("bicluster") and metric == "covariance":
                    continue  # a full channel transform would mix channels across the groups
                cfg = CompressConfig(method, MacFraction(1 / cut), layers=layers)
                res = compress(model, cfg, example, metrics=stats[metric])
                if timed is None:  # same architecture for every metric: time it once
                    timed = lat(res.model)
                row = {
                    "cut": cut,
                    "method": method,
                    "metric": metric,
                    "ranks": {r.name: r.rank for r in res.layers},
                    "weight_error": {r.name: r.rel_error for r in res.layers},
                    "theoretical_speedup": dense["macs"] / macs(res.model),
                    "accuracy": acc(res.model),
                    "latency_ms": {b: v.median_ms for b, v in timed.items()},
                    "contended": any(v.contended for v in timed.values()),
                }
                tuned = copy.deepcopy(res.model)
                finetune(tuned, train, ft_cfg)
                row["accuracy_finetuned"] = acc(tuned.eval())
                row["measured_speedup"] = {b: dense["latency_ms"][b] / row["latency_ms"][b] for b in row["latency_ms"]}
                rows.append(row)
                keys = ("cut", "method", "metric", "accuracy", "accuracy_finetuned", "measured_speedup")
                print(json.dumps({k: row[k] for k in keys}), flush=True)
    return {
        "command": "python benchmarks/denton_metrics.py " + " ".join(sys.argv[1:]),
        "model": args.model,
        "layers": list(layers),
        "environment": environment(),
        "calibration_examples": args.calibration,
        "finetune_steps": args.steps,
        "finetune_lr": args.lr,
        "test_examples": len(test),
        "dense": dense,
        "rows": rows,
        "seconds": time.time() - t0,
    }


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(14, 4.3), sharey=True)
    width = 0.26
    model = result.get("model", "fashion-vgg")
    methods = [m for m in METHODS if any(r["method"] == m for r in result["rows"])]
    for ax, key, title in (
        (axes[0], "accuracy", "no fine-tuning"),
        (axes[1], "accuracy_finetuned", f"after {result['finetune_steps']} fine-tuning steps"),
    ):
        labels = [f"{m}\n{c:g}×" for c in CUTS for m in methods]
        for i, metric in enumerate(METRICS):
            vals = []
            for c in CUTS:
                for m in methods:
                    r = [r for r in result["rows"] if r["cut"] == c and r["method"] == m and r["metric"] == metric]
                    vals.append(100 * r[0][key] if r else float("nan"))
            ax.bar([j + (i - 1) * width for j in range(len(vals))], vals, width, label=metric)
        ax.axhline(100 * result["dense"]["accuracy"], color="gray", lw=0.8)
        ax.set_xticks(range(len(labels)), labels, fontsize=7)
        ax.set_title(title, fontsize=10)
        ax.set_ylim(max(0, 100 * result["dense"]["accuracy"] - 50), 100 * result["dense"]["accuracy"] + 3)
    axes[0].set_ylabel("test accuracy, %")
    axes[0].legend(fontsize=8)
    layers = ", ".join(result.get("layers", ["features.3", "features.7", "features.10"]))
    fig.suptitle(f"{model} ({layers}) at 2× / 4× fewer MACs: fitting metric × method", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def write_markdown(result: dict, path: Path, suffix: str, raw: Path) -> None:
    env, d = result["environment"], result["dense"]
    model = result.get("model", "fashion-vgg")
    layers = result.get("layers", ["features.3", "features.7", "features.10"])
    methods = [m for m in METHODS if any(r["method"] == m for r in result["rows"])]
    lines = [
        f"## Denton 2014's fitting metrics, for every method ({model})",
        "",
        f"Command: `{result['command'].strip()}` ({result['seconds'] / 60:.0f} min); raw results "
        f"`{raw}`. Machine: {env['cpu']}, torch {env['torch']}, 2 threads.",
        "",
        f"Dense: {100 * d['accuracy']:.2f}%, batch 1 {d['latency_ms']['1']:.3f} ms, batch 64 "
        f"{d['latency_ms']['64']:.2f} ms. {', '.join(layers)} each at the stated MAC cut; metrics from "
        f"{result['calibration_examples']} training images; fine-tuning: {result['finetune_steps']} AdamW steps of 128 "
        f"images at lr {result.get('finetune_lr', 1e-3):g}. Accuracy on {result['test_examples']:,} test images. "
        "Factor scales are balanced after every weighted fit (`rankdown.layers.balance_factors`).",
        "",
        f"| MAC cut | method | metric | weight error ({', '.join(layers)}) | accuracy | after fine-tuning | "
        "theoretical | measured b1 | measured b64 |",
        "|---:|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        werr = ", ".join("–" if r["weight_error"][k] is None else f"{r['weight_error'][k]:.3f}" for k in layers)
        flag = " (contended)" if r["contended"] else ""
        lines.append(
            f"| {r['cut']:g}× | {r['method']} | {r['metric']} | {werr} | {100 * r['accuracy']:.2f}% | "
            f"{100 * r['accuracy_finetuned']:.2f}% | {r['theoretical_speedup']:.2f}× | "
            f"{r['measured_speedup']['1']:.2f}×{flag} | {r['measured_speedup']['64']:.2f}× |"
        )
    wins, wins_ft = {}, {}
    for c in CUTS:
        for m in methods:
            rs = [r for r in result["rows"] if r["cut"] == c and r["method"] == m]
            wins[(c, m)] = max(rs, key=lambda r: r["accuracy"])["metric"]
            wins_ft[(c, m)] = max(rs, key=lambda r: r["accuracy_finetuned"])["metric"]
    lines += [
        "",
        "Best metric before fine-tuning, per cut and method: "
        + "; ".join(f"{m} {c:g}×: {w}" for (c, m), w in wins.items())
        + ".",
        "After fine-tuning: " + "; ".join(f"{m} {c:g}×: {w}" for (c, m), w in wins_ft.items()) + ".",
        "",
        f"![metrics](img/denton_metrics{suffix}.png)",
        "",
    ]
    write_section(path, "denton_metrics" + suffix, "\n".join(lines))


if __name__ == "__main__":
    main()
