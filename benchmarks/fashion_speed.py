"""Benchmark: the bundled Fashion-MNIST model under Tucker-2 and channel SVD at 2x and 4x fewer MACs.

For each (method, target) the per-layer MAC fraction is bisected until the whole model's
Conv2d/Linear MACs fall by at least the target (first conv and head left dense, as by default).
Reports test accuracy before fine-tuning, and the measured CPU speedup beside the theoretical one,
each model timed in its faster layout (NCHW or channels_last), guarded against foreign CPU load.

    python benchmarks/fashion_speed.py            # writes benchmarks/results/fashion_speed.json,
                                                  # docs/img/fashion_speed.png and docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from rankdown import CompressConfig, MacFraction, build_model, compress
from rankdown.measurement.bench import best_latency, environment, model_cost
from rankdown.storage import atomic_write_text
from rankdown.zoo import BUNDLED
from rankdown.zoo.fashion import load_fashion_mnist

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).parent))
from common import test_accuracy, write_section  # noqa: E402


def compress_to_target(model, method: str, target: float, example: torch.Tensor):
    """Largest per-layer MAC fraction whose whole-model MAC reduction reaches ``target``."""
    skip = BUNDLED["fashion-vgg"].default_skip
    dense_macs = model_cost(model, example).macs
    lo, hi, best = 0.01, 1.0 / target, None
    for _ in range(12):
        mid = (lo + hi) / 2
        res = compress(model, CompressConfig(method, MacFraction(mid), skip=skip), example)
        reduction = dense_macs / model_cost(res.model, example).macs
        if reduction >= target:
            best, lo = (mid, res), mid
        else:
            hi = mid
    if best is None:
        best = (lo, compress(model, CompressConfig(method, MacFraction(lo), skip=skip), example))
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=50, help="timed runs at batch 1 (a third of them at batch 64)")
    ap.add_argument("--eval-limit", type=int, default=None)
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/fashion_speed.json"))
    ap.add_argument("--plot", default=str(ROOT / "docs/img/fashion_speed.png"))
    ap.add_argument("--markdown", default=str(ROOT / "docs/benchmarks.md"))
    ap.add_argument("--from-json", action="store_true", help="only redraw the plot and markdown from --out")
    args = ap.parse_args()
    if args.from_json:
        result = json.loads(Path(args.out).read_text())
        plot(result, Path(args.plot))
        write_markdown(result, Path(args.markdown), Path(args.plot), Path(args.out))
        return
    torch.set_num_threads(args.threads)
    t_start = time.time()
    model = build_model("fashion-vgg")
    example = torch.zeros(1, 1, 28, 28)
    test = load_fashion_mnist("test", limit=args.eval_limit)

    def acc(m):
        return test_accuracy(m, test)

    g = torch.Generator().manual_seed(0)
    inputs = {b: torch.randn(b, 1, 28, 28, generator=g) for b in (1, 64)}

    def latency(m):
        out = {}
        for b, x in inputs.items():
            runs = args.runs if b == 1 else max(5, args.runs // 3)
            out[str(b)] = best_latency(m, x, runs=runs, threads=args.threads, guard=True).to_dict()
        return out

    dense = {
        "accuracy": acc(model),
        "macs": model_cost(model, example).macs,
        "params": model_cost(model, example).params,
        "latency": latency(model),
    }
    rows = []
    for method in ("tucker2", "channel-svd"):
        for target in (2.0, 4.0):
            t0 = time.time()
            fraction, res = compress_to_target(model, method, target, example)
            cost = model_cost(res.model, example)
            row = {
                "method": method,
                "target": target,
                "layer_mac_fraction": fraction,
                "ranks": {r.name: r.rank for r in res.layers if r.method},
                "rel_errors": {r.name: r.rel_error for r in res.layers if r.method},
                "macs": cost.macs,
                "params": cost.params,
                "theoretical_speedup": dense["macs"] / cost.macs,
                "accuracy": acc(res.model),
                "latency": latency(res.model),
                "compress_seconds": None,
            }
            row["compress_seconds"] = time.time() - t0
            for b in inputs:
                row[f"speedup_b{b}"] = dense["latency"][str(b)]["median_ms"] / row["latency"][str(b)]["median_ms"]
            rows.append(row)
            print(
                json.dumps(
                    {
                        k: row[k]
                        for k in ("method", "target", "theoretical_speedup", "accuracy", "speedup_b1", "speedup_b64")
                    }
                ),
                flush=True,
            )
    command = "python benchmarks/fashion_speed.py " + " ".join(sys.argv[1:])
    result = {
        "command": command.strip(),
        "environment": environment(),
        "test_examples": len(test),
        "dense": dense,
        "rows": rows,
        "seconds": time.time() - t_start,
    }
    atomic_write_text(Path(args.out), json.dumps(result, indent=2) + "\n")
    plot(result, Path(args.plot))
    write_markdown(result, Path(args.markdown), Path(args.plot), Path(args.out))


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    dense = result["dense"]
    for method, marker in (("tucker2", "o"), ("channel-svd", "s")):
        rows = [r for r in result["rows"] if r["method"] == method]
        th = [r["theoretical_speedup"] for r in rows]
        ax1.plot(th, [100 * r["accuracy"] for r in rows], marker=marker, label=method)
        for b, ls in ((1, "-"), (64, "--")):
            ax2.plot(th, [r[f"speedup_b{b}"] for r in rows], marker=marker, ls=ls, label=f"{method}, batch {b}")
    ax1.axhline(100 * dense["accuracy"], color="gray", ls=":", label="dense")
    ax1.set(
        xlabel="theoretical speedup (MAC reduction)",
        ylabel="test accuracy, % (no fine-tuning)",
        title="Accuracy before fine-tuning",
    )
    lim = max(r["theoretical_speedup"] for r in result["rows"]) * 1.1
    ax2.plot([1, lim], [1, lim], color="gray", ls=":", label="measured = theoretical")
    ax2.axhline(1.0, color="black", lw=0.5)
    ax2.set(
        xlabel="theoretical speedup (MAC reduction)",
        ylabel="measured CPU speedup vs fastest dense",
        title=f"CPU, {result['environment']['torch_threads']} threads",
    )
    ax1.legend(fontsize=8)
    ax2.legend(fontsize=7)
    fig.suptitle("fashion-vgg: " + result["environment"]["cpu"], fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def write_markdown(result: dict, path: Path, plot_path: Path, json_path: Path) -> None:
    env, dense = result["environment"], result["dense"]
    lines = [
        "## Bundled Fashion-MNIST model: Tucker-2 and channel SVD at 2× and 4× fewer MACs",
        "",
        f"Command: `{result['command']}` (about {result['seconds'] / 60:.0f} min). Raw results: "
        f"`{os.path.relpath(json_path, ROOT)}`.",
        "",
        f"Machine: {env['cpu']}, {env['cpu_count']} CPUs, {env['platform']}; torch {env['torch']}, "
        f"Python {env['python']}, numpy {env['numpy']}; {env['torch_threads']} threads.",
        "",
        f"Accuracy is on {result['test_examples']:,} Fashion-MNIST test images, **before any fine-tuning**. "
        "Theoretical speedup is the whole model's Conv2d/Linear MAC reduction; the first conv and the 10-way "
        "head stay dense. Latency is the median of guarded runs (windows with >5% foreign CPU load are "
        "re-run), each model in its faster layout (NCHW or channels_last), so speedups are against the "
        "fastest dense baseline.",
        "",
        f"Dense: accuracy {100 * dense['accuracy']:.2f}%, {dense['macs'] / 1e6:.2f} M MACs, "
        f"{dense['params'] / 1e3:.0f} k params, batch 1 {dense['latency']['1']['median_ms']:.3f} ms "
        f"({'NHWC' if dense['latency']['1']['channels_last'] else 'NCHW'}), batch 64 "
        f"{dense['latency']['64']['median_ms']:.2f} ms "
        f"({'NHWC' if dense['latency']['64']['channels_last'] else 'NCHW'}).",
        "",
        "| method | target | MACs | theoretical | accuracy (Δ) | b1 ms | b1 speedup (meas/theo) | b64 ms "
        "| b64 speedup (meas/theo) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        th = r["theoretical_speedup"]
        lat1, lat64 = r["latency"]["1"], r["latency"]["64"]
        lines.append(
            f"| {r['method']} | {r['target']:.0f}× | {r['macs'] / 1e6:.2f} M | {th:.2f}× | "
            f"{100 * r['accuracy']:.2f}% ({100 * (r['accuracy'] - dense['accuracy']):+.2f}) | "
            f"{lat1['median_ms']:.3f} | {r['speedup_b1']:.2f}× ({r['speedup_b1'] / th:.2f}) | "
            f"{lat64['median_ms']:.2f} | {r['speedup_b64']:.2f}× ({r['speedup_b64'] / th:.2f}) |"
        )
    lines += ["", f"![accuracy and speedup]({os.path.relpath(plot_path, path.parent)})", ""]
    lines += ["Ranks chosen (r_out×r_in for Tucker-2):", ""]
    for r in result["rows"]:
        ranks = ", ".join(
            f"{k} {'×'.join(map(str, v)) if isinstance(v, (list, tuple)) else v}" for k, v in r["ranks"].items()
        )
        lines.append(f"- {r['method']} {r['target']:.0f}×: {ranks}")
    lines.append("")
    write_section(path, "fashion_speed", "\n".join(lines))


if __name__ == "__main__":
    main()
