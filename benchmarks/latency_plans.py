"""Benchmark: MAC-only plans vs latency-aware plans on VGG-16 and ResNet-50 at 224×224.

For a whole-model target of 2× and 4× fewer MACs (every conv but the stem, and the Linear layers, may be
factorized):
- MAC-only: uniform Tucker-2 (each layer keeps the same fraction of its MACs, bisected to meet the
  target), what low-rank tools do;
- latency-aware: rankdown measures every candidate form (Tucker-2, channel SVD, scheme-2
  separable, CP, and SVD for a Linear layer, at ranks rounded to multiples of 8; dense too) of
  every layer at its real input shape on this machine, then picks the combination with the least
  measured time whose MACs meet the same target while keeping the most MACs per measured ms
  (rankdown.planning.latency.plan_for_mac_budget).
End-to-end latency: median of guarded runs, each model in its faster layout (NCHW or
channels_last), batch 1, 2 threads, as built and after rankdown.deployment.deploy.deploy (batch norms folded
into the convs before them, gathers folded, pointwise factors merged). The dense baseline is the
faster of its two forms. The dense model and the latency-aware plans are also exported to ONNX and
timed in onnxruntime (when it is installed) at each graph optimization level, and compiled with
torch.compile (inductor) in their fastest form. Weights are random (latency does not depend on them).

    python benchmarks/latency_plans.py            # CPU; add --device cuda on a GPU machine
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch
from torch import nn

from rankdown import CompressConfig, MacFraction, compress
from rankdown.deployment.deploy import deploy
from rankdown.measurement.bench import best_latency, compiled_latency, environment, measure_latency, model_cost
from rankdown.planning.latency import (
    Candidate,
    DeviceKey,
    LatencyTable,
    LayerOptions,
    cuda_latency,
    layer_speed,
    plan_for_mac_budget,
    predicted_ms,
    timing_options,
)
from rankdown.planning.rank import LayerRanks

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).parent))
import zoo  # noqa: E402
from common import load_or_run, write_section  # noqa: E402

METHODS = ["tucker2", "channel-svd", "separable", "cp", "svd"]  # svd: the Linear layers


def deployed(model: nn.Module) -> nn.Module:
    out = copy.deepcopy(model).eval()
    deploy(out)
    return out


def targets_of(model: nn.Module, stem: str) -> list[str]:
    # Every conv but the stem, and the Linear layers: under 1% of the MACs, but at batch 1 VGG-16's
    # classifier (124 M weights) is about a third of its time at 4x, and weight-bound.
    return [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear)) and n != stem]


def uniform_tucker(model, targets, target, example):
    """Largest uniform per-layer MAC fraction (Tucker-2; SVD for Linear) meeting the whole-model target.
    Bisected over the convs alone (a full SVD of VGG-16's 4096 x 25088 weight at every step would
    dominate the run; the Linear layers hold under 1% of the MACs), then applied to every target."""
    dense = model_cost(model, example).macs
    convs = tuple(n for n in targets if isinstance(model.get_submodule(n), nn.Conv2d))
    lo, hi, best = 0.01, 1.0 / target, 0.01
    for _ in range(10):
        mid = (lo + hi) / 2
        res = compress(model, CompressConfig("tucker2", MacFraction(mid), layers=convs), example)
        if dense / model_cost(res.model, example).macs >= target:
            best, lo = mid, mid
        else:
            hi = mid
    return compress(model, CompressConfig("tucker2", MacFraction(best), layers=tuple(targets)), example)


def floored(model: nn.Module, options: dict[str, LayerOptions], target: float) -> dict[str, LayerOptions]:
    """A Linear layer keeps at least 1/target of its MACs, like every layer of the uniform plan:
    its MACs barely count towards the budget, and random weights give no error to bound it by,
    so time alone would cut VGG-16's classifier to its smallest rank."""

    def keep(name: str, c: Candidate, dense: int) -> bool:
        return c.method is None or not isinstance(model.get_submodule(name), nn.Linear) or c.macs * target >= dense

    out = {}
    for name, o in options.items():
        dense = next(c.macs for c in o.candidates if c.method is None)
        out[name] = LayerOptions(o.name, o.dense_ms, [c for c in o.candidates if keep(name, c, dense)])
    return out


def e2e(model: nn.Module, x: torch.Tensor, device: str, runs: int) -> dict:
    if device == "cuda":
        m, xx = model.to("cuda", torch.bfloat16), x.to("cuda", torch.bfloat16)
        lats = {cl: cuda_latency(m, xx, runs=runs, channels_last=cl) for cl in (False, True)}
        cl = min(lats, key=lats.get)
        return {"median_ms": lats[cl], "channels_last": cl}
    return best_latency(model, x, runs=runs, threads=2, guard=True).to_dict()


def ort_ms(model: nn.Module, x: torch.Tensor, runs: int) -> dict[str, float] | None:
    """Median ms of the model exported to ONNX (deployment folds, parity-checked) in onnxruntime,
    2 threads, guarded like eager, at each graph optimization level; None without onnxruntime
    (``pip install 'rankdown[onnx]'``)."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return None
    from rankdown.deployment.export import ORT_LEVELS, onnxruntime_modules

    sessions = onnxruntime_modules(model, x, threads=2, optimizations=ORT_LEVELS, check=[x], dynamic_batch=False)
    return {
        level: measure_latency(s, x, runs=runs, guard=True, desc=f"onnxruntime {level}").median_ms
        for level, s in sessions.items()
    }


def compiled_ms(model: nn.Module, x: torch.Tensor, runs: int) -> dict:
    """torch.compile (inductor) of the deployed model in its fastest form (layout, freezing)."""
    return compiled_latency(deployed(model), x, runs=runs, threads=2, guard=True, desc="compiled").to_dict()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nets", default="vgg16,resnet50")
    ap.add_argument("--targets", default="2,4")
    ap.add_argument("--runs", type=int, default=11)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/latency_plans.json"))
    ap.add_argument("--from-json", action="store_true")
    args = ap.parse_args()
    result = load_or_run(args.out, args.from_json, lambda: run(args))
    write_markdown(result, ROOT / "docs/benchmarks.md")


def run(args) -> dict:
    torch.set_num_threads(2)
    t0 = time.time()
    rows = []
    for net in args.nets.split(","):
        torch.manual_seed(0)
        model = getattr(zoo, net)().eval()
        stem = "features.0" if net == "vgg16" else "conv1"
        targets = targets_of(model, stem)
        example = torch.zeros(1, 3, 224, 224)
        x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
        dense_cost = model_cost(model, example).macs
        dense_lats = {"as built": e2e(model, x, args.device, args.runs)}
        dense_lats["deployed"] = e2e(deployed(model), x, args.device, args.runs)
        dense_lat = min(dense_lats.values(), key=lambda d: d["median_ms"])
        dense_ort = ort_ms(model, x, args.runs) if args.device == "cpu" else None
        dense_compiled = compiled_ms(model, x, args.runs) if args.device == "cpu" else None
        dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
        key = DeviceKey.current(args.device, dtype, 1, 2, channels_last=True)
        table = LatencyTable(key, args.cache_dir, runs=10)
        options = timing_options(model, targets, example, table, METHODS)
        fixed = dense_cost - sum(o.candidates[0].macs for o in options.values())
        for target in (float(t) for t in args.targets.split(",")):
            naive = uniform_tucker(model, targets, target, example)
            plan = plan_for_mac_budget(floored(model, options, target), dense_cost / target - fixed)
            aware = compress(
                model, CompressConfig("tucker2", LayerRanks(plan, "latency"), layers=tuple(targets)), example
            )
            for how, res in (("MAC-only (uniform Tucker-2)", naive), ("latency-aware", aware)):
                lat = e2e(res.model, x, args.device, args.runs)
                dep = e2e(deployed(res.model), x, args.device, args.runs)
                theo = dense_cost / model_cost(res.model, example).macs
                row = {
                    "net": net,
                    "target": target,
                    "plan": how,
                    "theoretical": theo,
                    "dense_ms": dense_lat["median_ms"],
                    "ms": lat["median_ms"],
                    "speedup": dense_lat["median_ms"] / lat["median_ms"],
                    "latency": lat,
                    "dense_latency": dense_lats,
                    "deployed_ms": dep["median_ms"],
                    "deployed_speedup": dense_lat["median_ms"] / dep["median_ms"],
                    "methods": sorted({r.method for r in res.layers if r.method}),
                    "dense_layers": sum(1 for r in res.layers if not r.method),
                }
                if dense_ort is not None and how == "latency-aware":
                    # against the dense model at the same optimization level, and at its fastest
                    row["dense_ort_levels"] = dense_ort
                    row["ort_levels"] = ort_ms(res.model, x, args.runs)
                    row["dense_ort_ms"] = min(dense_ort.values())
                    row["ort_ms"] = min(row["ort_levels"].values())
                    row["ort_ratio"] = row["dense_ort_ms"] / row["ort_ms"] / theo
                if dense_compiled is not None and how == "latency-aware":
                    row["dense_compiled"] = dense_compiled
                    row["compiled"] = compiled_ms(res.model, x, args.runs)
                    row["compiled_ratio"] = dense_compiled["median_ms"] / row["compiled"]["median_ms"] / theo
                row["ratio"] = row["speedup"] / theo
                row["deployed_ratio"] = row["deployed_speedup"] / theo
                if how == "latency-aware":
                    row["predicted_layer_ms"] = predicted_ms(options, plan)
                    row["layer_speed"] = layer_speed(options, plan)
                    row["linear_ranks"] = {
                        n: str(c.rank) for n, c in plan.items() if c and isinstance(model.get_submodule(n), nn.Linear)
                    }
                    row["choices"] = {k: dataclasses.asdict(v) if v else None for k, v in plan.items()}
                rows.append(row)
                print(
                    json.dumps(
                        {
                            k: row[k]
                            for k in (
                                "net",
                                "target",
                                "plan",
                                "theoretical",
                                "dense_ms",
                                "ms",
                                "deployed_ms",
                                "ratio",
                                "deployed_ratio",
                            )
                        }
                    ),
                    flush=True,
                )
    result = {
        "command": "python benchmarks/latency_plans.py " + " ".join(sys.argv[1:]),
        "environment": environment(),
        "device": args.device,
        "rows": rows,
        "seconds": time.time() - t0,
    }
    return result


def write_markdown(result: dict, path: Path) -> None:
    env = result["environment"]
    lines = [
        "## Measured speed: MAC-only vs latency-aware plans on VGG-16 and ResNet-50",
        "",
        f"Command: `{result['command'].strip()}` ({result['seconds'] / 60:.0f} min); raw results "
        "`benchmarks/results/latency_plans.json`.",
        "",
        f"Machine: {env['cpu']}, {env['cpu_count']} CPUs; torch {env['torch']}; {result['device']}, batch 1, "
        "2 threads, 224×224, random weights. Whole-model targets of 2× and 4× fewer MACs; every conv but the stem, "
        "and the Linear layers (each keeping at least 1/target of its MACs), may be factorized. Speedups are "
        "against the fastest dense model (its faster "
        "layout, with or without batch norms folded); meas/theo is measured speedup ÷ MAC reduction (the "
        "issue's target: ≥ 0.8). "
        "*Deployed*: after `rankdown.deployment.deploy.deploy` (what `rankdown bench --fold-bn` measures). "
        "*onnxruntime*: the latency-aware plan and the dense model exported to ONNX (deployment folds, "
        "parity-checked) and timed in onnxruntime on 2 threads, the same guarded way, at each graph optimization "
        "level; its meas/theo is the plan's fastest level against the dense model's fastest level. *compiled*: "
        "`torch.compile` (inductor) of the deployed model, in its fastest form (layout, with or without inductor's "
        "freezing; `rankdown.measurement.bench.compiled_latency`), compile time not timed; against the dense model "
        "compiled the same way.",
        "",
        "| net | target | plan | MAC reduction | dense ms | plan ms | meas/theo | deployed ms | deployed speedup "
        "| deployed meas/theo | onnxruntime ms (dense) | onnxruntime meas/theo | compiled ms (dense) "
        "| compiled meas/theo | forms used |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in result["rows"]:
        forms = ", ".join(r["methods"]) + (f"; {r['dense_layers']} dense" if r["dense_layers"] else "")
        dep = (
            f"{r['deployed_ms']:.1f} | {r['deployed_speedup']:.2f}× | **{r['deployed_ratio']:.2f}**"
            if "deployed_ms" in r
            else "| |"
        )
        ort = f"{r['ort_ms']:.1f} ({r['dense_ort_ms']:.1f}) | **{r['ort_ratio']:.2f}**" if "ort_ms" in r else "- | -"
        comp = (
            f"{r['compiled']['median_ms']:.1f} ({r['dense_compiled']['median_ms']:.1f}) | **{r['compiled_ratio']:.2f}**"
            if "compiled" in r
            else "- | -"
        )
        lines.append(
            f"| {r['net']} | {r['target']:.0f}× | {r['plan']} | {r['theoretical']:.2f}× | "
            f"{r['dense_ms']:.1f} | {r['ms']:.1f} | {r['ratio']:.2f} | {dep} | {ort} | {comp} | {forms} |"
        )
    lines += ort_levels(result["rows"])
    for r in result["rows"]:
        if "layer_speed" in r and r["target"] == max(x["target"] for x in result["rows"]):
            lines += ["", *per_layer(r)]
    lines.append("")
    write_section(path, "latency_plans", "\n".join(lines))


def ort_levels(rows: list[dict]) -> list[str]:
    """The latency-aware plans in onnxruntime at each graph optimization level, each against the
    dense model at the same level: which of onnxruntime's rewrites the factorized graphs need."""
    rows = [r for r in rows if "ort_levels" in r]
    if not rows:
        return []
    levels = list(rows[0]["ort_levels"])
    lines = [
        "",
        "onnxruntime by graph optimization level (latency-aware plans; ms of the plan / the dense model at the "
        "same level, and meas/theo at that level):",
        "",
        "| net | target | " + " | ".join(levels) + " |",
        "|---|---|" + "---:|" * len(levels),
    ]
    for r in rows:
        cells = [
            f"{r['ort_levels'][v]:.1f} / {r['dense_ort_levels'][v]:.1f} "
            f"({r['dense_ort_levels'][v] / r['ort_levels'][v] / r['theoretical']:.2f})"
            for v in levels
        ]
        lines.append(f"| {r['net']} | {r['target']:.0f}× | " + " | ".join(cells) + " |")
    return lines


def per_layer(r: dict, top: int = 8) -> list[str]:
    """Where a latency-aware plan falls short of its MAC count: the layers that lose the most
    time against their ideal (dense ms ÷ MAC reduction), from the planner's latency table."""
    speed = r["layer_speed"]
    lost = {n: v["ms"] - v["dense_ms"] / v["ideal"] for n, v in speed.items()}
    planned = sum(v["ms"] for v in speed.values())
    lines = [
        f"{r['net']} at {r['target']:.0f}×, latency-aware, per layer (the planner's table, batch 1): the "
        f"planned layers take {planned:.1f} ms of the model's {r['ms']:.1f} ms "
        f"({sum(lost.values()):.1f} ms above their ideal in all); the {top} layers furthest from it:",
        "",
        "| layer | form | dense ms | ms | speedup | ideal (MAC ÷) | achieved ÷ ideal | ms above ideal |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for n in sorted(lost, key=lost.get, reverse=True)[:top]:
        v = speed[n]
        lines.append(
            f"| {n} | {v['method'] or 'dense'} | {v['dense_ms']:.2f} | {v['ms']:.2f} | ×{v['speedup']:.2f} | "
            f"×{v['ideal']:.2f} | {v['achieved_over_ideal']:.2f} | {lost[n]:.2f} |"
        )
    return lines


if __name__ == "__main__":
    main()
