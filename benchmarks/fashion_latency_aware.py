"""Benchmark: on the bundled model, accuracy against *measured* CPU speedup for latency-aware
plans and MAC-only plans.

Both planners see the same candidates (Tucker-2, channel SVD, separable, CP for the three inner
convs; SVD for the hidden Linear; ranks rounded to multiples of 8), each with its error on
64 training images: the layer's own output error (``layer``), or the model's output error with
only that layer replaced (``model``). For each per-layer error budget, the latency-aware planner
takes the fastest candidate (by this machine's latency table), the MAC-only planner the one with
the fewest MACs. Each plan is then measured end to end (batch 1 and 64, 2 threads, guarded, best
layout) and scored on the test set, without fine-tuning.

    python benchmarks/fashion_latency_aware.py                  # both error criteria
    python benchmarks/fashion_latency_aware.py --criteria layer
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from rankdown import CompressConfig, build_model, compress
from rankdown.measurement.bench import environment, model_cost
from rankdown.planning.latency import DeviceKey, latency_ranks, plan_by_latency, plan_by_latency_sum, plan_by_macs
from rankdown.planning.rank import LayerRanks
from rankdown.zoo.fashion import load_fashion_mnist

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).parent))
from common import batch_latencies, load_or_run, test_accuracy, write_section  # noqa: E402

LAYERS = ("features.3", "features.7", "features.10", "classifier.2")
BUDGETS = {
    "layer": (0.1, 0.2, 0.3, 0.4, 0.5, 0.6),
    "model": (0.05, 0.1, 0.15, 0.2, 0.3, 0.4),
    "model-sum": (0.1, 0.2, 0.3, 0.4, 0.6, 0.8),  # a budget on the sum of the four layers' errors
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=40)
    ap.add_argument("--eval-limit", type=int, default=None)
    ap.add_argument(
        "--criteria",
        default="layer,model,model-sum",
        help="error budgets to plan with: layer, model (each layer's error bounded), model-sum (their sum)",
    )
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/fashion_latency_aware.json"))
    ap.add_argument("--from-json", action="store_true")
    args = ap.parse_args()
    result = load_or_run(args.out, args.from_json, lambda: run(args))
    plot(result, ROOT / "docs/img/fashion_latency_aware.png")
    write_markdown(result, ROOT / "docs/benchmarks.md")


def run(args) -> dict:
    torch.set_num_threads(2)
    t0 = time.time()
    model = build_model("fashion-vgg")
    test = load_fashion_mnist("test", limit=args.eval_limit)
    calib = load_fashion_mnist("train", limit=64).images
    example = calib[:1]
    cfg = CompressConfig("tucker2", layers=LAYERS)
    key = DeviceKey.current("cpu", batch=1, threads=2)
    criteria = args.criteria.split(",")
    options = {
        c: latency_ranks(
            model,
            cfg,
            calib,
            key,
            max_error=1.0,
            methods=["tucker2", "channel-svd", "separable", "cp", "svd"],
            criterion=c,
        )[1]
        for c in ("layer", "model")
        if any(k.startswith(c) for k in criteria)
    }
    options["model-sum"] = options.get("model")
    xs = {b: torch.randn(b, 1, 28, 28, generator=torch.Generator().manual_seed(0)) for b in (1, 64)}

    def lat(m):
        return {b: v.median_ms for b, v in batch_latencies(m, xs, args.runs).items()}

    dense = {
        "accuracy": test_accuracy(model, test),
        "latency": lat(model),
        "macs": model_cost(model, example).macs,
    }
    rows = []
    for crit, tau in ((c, t) for c in criteria for t in BUDGETS[c]):
        planners = (
            (("latency-aware", plan_by_latency_sum),)
            if crit == "model-sum"
            else (("latency-aware", plan_by_latency), ("MAC-only", plan_by_macs))
        )
        for how, planner in planners:
            plan = planner(options[crit], tau)
            res = compress(model, CompressConfig("tucker2", LayerRanks(plan, how), layers=LAYERS), example)
            row = {
                "criterion": crit,
                "max_error": tau,
                "plan": how,
                "choices": {k: None if v is None else [v.method, v.rank] for k, v in plan.items()},
                "accuracy": test_accuracy(res.model, test),
                "macs": model_cost(res.model, example).macs,
                "latency": lat(res.model),
            }
            row["speedup"] = {b: dense["latency"][b] / row["latency"][b] for b in row["latency"]}
            rows.append(row)
            print(
                json.dumps({k: row[k] for k in ("criterion", "max_error", "plan", "accuracy", "speedup")}),
                flush=True,
            )
    result = {
        "command": "python benchmarks/fashion_latency_aware.py " + " ".join(sys.argv[1:]),
        "environment": environment(),
        "dense": dense,
        "rows": rows,
        "test_examples": len(test),
        "seconds": time.time() - t0,
    }
    return result


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    criteria = list(dict.fromkeys(r.get("criterion", "layer") for r in result["rows"]))
    for ax, b in zip(axes, ("1", "64"), strict=True):
        for crit in criteria:
            for how, marker in (("latency-aware", "o"), ("MAC-only", "s")):
                rows = sorted(
                    (r for r in result["rows"] if r["plan"] == how and r.get("criterion", "layer") == crit),
                    key=lambda r: r["speedup"][b],
                )
                if not rows:
                    continue
                ax.plot(
                    [r["speedup"][b] for r in rows],
                    [100 * r["accuracy"] for r in rows],
                    marker=marker,
                    ls={"model": "-", "model-sum": "-."}.get(crit, "--"),
                    label=f"{how}, {crit} error",
                )
        ax.axhline(100 * result["dense"]["accuracy"], color="gray", ls=":", label="dense")
        ax.axvline(1.0, color="black", lw=0.5)
        ax.set(title=f"batch {b}", xlabel="measured CPU speedup vs fastest dense (2 threads)")
        ax.legend(fontsize=8)
    axes[0].set_ylabel("test accuracy, % (no fine-tuning)")
    fig.suptitle("fashion-vgg: accuracy vs measured speed", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def write_markdown(result: dict, path: Path) -> None:
    env, d = result["environment"], result["dense"]
    lines = [
        "## Bundled model: latency-aware vs MAC-only plans, accuracy against measured speed",
        "",
        f"Command: `{result['command'].strip()}` ({result['seconds'] / 60:.0f} min); raw results "
        f"`benchmarks/results/fashion_latency_aware.json`. Machine: {env['cpu']}, torch {env['torch']}, 2 threads.",
        "",
        f"Dense: {100 * d['accuracy']:.2f}%, batch 1 {d['latency']['1']:.3f} ms, batch 64 {d['latency']['64']:.2f} ms. "
        "Both planners choose among the same measured candidates under the same per-layer error budget, "
        "measured on 64 training images either on the layer's own output (*layer*) or on the model's output with "
        "only that layer factorized (*model*). *model-sum* bounds the sum of the four layers' model errors instead "
        "(`--error-scope sum`, latency-aware only). Accuracy on "
        f"{result['test_examples']:,} test images without fine-tuning.",
        "",
        "| error | budget | plan | forms (features.3, .7, .10, classifier.2) | accuracy | b1 speedup | b64 speedup |",
        "|---|---:|---|---|---:|---:|---:|",
    ]
    for r in result["rows"]:
        forms = ", ".join(
            "dense" if v is None else f"{v[0]} {tuple(v[1]) if isinstance(v[1], list) else v[1]}"  # JSON lists
            for v in r["choices"].values()
        )
        lines.append(
            f"| {r.get('criterion', 'layer')} | {r['max_error']:g} | {r['plan']} | {forms} | "
            f"{100 * r['accuracy']:.2f}% | "
            f"{r['speedup']['1']:.2f}× | {r['speedup']['64']:.2f}× |"
        )
    lines += ["", "![accuracy vs measured speed](img/fashion_latency_aware.png)", ""]
    write_section(path, "fashion_latency_aware", "\n".join(lines))


if __name__ == "__main__":
    main()
