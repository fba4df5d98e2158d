"""Mixed-method allocation (issue 17) on the bundled Fashion-MNIST VGG (or CharNet, or the user's CNN
of benchmarks/user_model.py, which must have run first): at 2×, 3× and 4× fewer
MACs, a global budget spent over method × rank per layer against each single-method plan at the
same budget; layer-level sensitivity on 256 training images, no fine-tuning; test accuracy on
2,000 test images, delivered MAC reduction, and the seconds the whole compression took; then the
mixed plan after joint data reconstruction on the same 256 images, and the seconds in all.

    python benchmarks/mixed_methods.py [--model fashion-vgg|charnet|usernet] [--from-json]
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import tempfile
import time
from pathlib import Path

import torch
from common import load_or_run, test_accuracy, test_correct, write_section

from rankdown import CompressConfig, ParamFraction, build_model, compress
from rankdown.app.pipeline import SWEEP_EXAMPLES
from rankdown.fitting.calibrate import CalibrationConfig, quick, reconstruct
from rankdown.measurement.bench import environment, model_cost
from rankdown.planning.allocate import Budget
from rankdown.planning.compress import allocate_ranks
from rankdown.storage import default_cache_dir
from rankdown.zoo.fashion import load_fashion_mnist

HERE = Path(__file__).parent
OUT = HERE / "results" / "mixed_methods.json"
DOCS = HERE.parent / "docs" / "benchmarks.md"
METHODS = ["tucker2", "channel-svd", "separable"]
SKIP = ("features.0", "classifier.5")


# where the budget is spent, how layers are scored, and whether every plan (not only the mixed one)
# is also refitted; the bundled models, then the user's CNN of benchmarks/user_model.py
MODELS = {
    "fashion-vgg": {
        "skip": SKIP,
        "layers": None,
        "title": "bundled Fashion-MNIST VGG",
        "criterion": "layer",
        "refit_all": True,
    },
    "charnet": {
        "skip": (),
        "layers": ("conv2", "conv3"),
        "title": "bundled CharNet, conv2 + conv3",
        "criterion": "layer",
        "refit_all": True,
    },
    "usernet": {
        "skip": (),
        "layers": None,
        "title": "the user's CNN of benchmarks/user_model.py, never seen by rankdown",
        "criterion": "model",
        "refit_all": True,
    },
}


def data(name: str):
    if name == "charnet":
        from rankdown.zoo.chars import load_chars

        return load_chars("train", limit=4096), load_chars("test", limit=2000)
    return load_fashion_mnist("train", limit=4096), load_fashion_mnist("test", limit=2000)


def dense_model(name: str) -> torch.nn.Module:
    if name != "usernet":
        return build_model(name).eval()
    import usernet
    from safetensors.torch import load_file

    weights = default_cache_dir() / "bench-user-model" / "usernet-12000-3.safetensors"
    if not weights.is_file():
        raise SystemExit(f"{weights} is missing: run benchmarks/user_model.py first (it trains the user's model)")
    model = usernet.make()
    model.load_state_dict(load_file(str(weights)))
    return model.eval()


@torch.no_grad()
def mcnemar(a: str, b: str) -> tuple[int, int, float]:
    """Images only ``a`` gets right, only ``b`` gets right, and the exact two-sided McNemar p-value
    (binomial on the disagreements): how likely a gap this large is from two equally good plans."""
    only_a = sum(x == "1" and y == "0" for x, y in zip(a, b, strict=True))
    only_b = sum(x == "0" and y == "1" for x, y in zip(a, b, strict=True))
    n, k = only_a + only_b, min(only_a, only_b)
    p = min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2**n) if n else 1.0
    return only_a, only_b, p


def run(name: str = "fashion-vgg") -> dict:
    torch.set_num_threads(2)
    train, test = data(name)
    calib = train.images[torch.randperm(len(train.images), generator=torch.Generator().manual_seed(0))[:256]]
    dense = dense_model(name)
    where = MODELS[name]
    # a model-level sweep costs a forward per candidate: SWEEP_EXAMPLES of the images, as the CLI does
    sweep = calib[:SWEEP_EXAMPLES] if where["criterion"] == "model" else calib
    refit = None
    if where.get("refit_all"):  # as the CLI does when --calibration follows: plans compared after a quick refit
        pool = train.images[torch.randperm(len(train.images), generator=torch.Generator().manual_seed(1))[:128]]
        refit = lambda model, fqns: reconstruct(dense, model, fqns, pool, quick(CalibrationConfig("joint")))  # noqa: E731
    out: dict = {"environment": environment(), "dense": test_accuracy(dense, test), "runs": {}, "model": name}
    with tempfile.TemporaryDirectory() as cache:
        for speedup in (2.0, 3.0, 4.0):
            for methods in [[m] for m in METHODS] + [METHODS]:
                label = "+".join(methods) if len(methods) > 1 else methods[0]
                base = CompressConfig(methods[0], ParamFraction(0.5), skip=where["skip"], layers=where["layers"])
                t = time.perf_counter()
                policy = allocate_ranks(
                    dense, base, sweep, Budget(speedup=speedup), criterion=where["criterion"], cache_dir=cache,
                    methods=methods if len(methods) > 1 else None, refit=refit,
                )  # fmt: skip
                result = compress(dense, dataclasses.replace(base, rank=policy), calib[:1])
                seconds = time.perf_counter() - t
                out["runs"][f"{label}|{speedup}"] = {
                    "top1": test_accuracy(result.model, test),
                    "macs_reduction": model_cost(dense, calib[:1]).macs / model_cost(result.model, calib[:1]).macs,
                    "seconds": seconds,
                    "methods": sorted({r.method for r in result.layers if r.method}),
                    "source": policy.source,
                }
                if len(methods) > 1 or where.get("refit_all"):  # then joint data reconstruction, same images
                    t = time.perf_counter()
                    reconstruct(dense, result.model, list(result.plan.layers), calib, CalibrationConfig("joint"))
                    seconds = time.perf_counter() - t
                    right = test_correct(result.model, test)
                    out["runs"][f"{label}|{speedup}"]["reconstructed"] = {
                        "top1": right.float().mean().item(),
                        "seconds": seconds,
                        "correct": "".join("1" if c else "0" for c in right.tolist()),  # for the paired test
                    }
                print(label, speedup, out["runs"][f"{label}|{speedup}"], flush=True)
    return out


def sweep_words(name: str) -> str:
    if MODELS[name]["criterion"] == "model":
        return f"model-level sensitivity on {SWEEP_EXAMPLES} of 256 training images (the CLI's default)"
    return "layer-level sensitivity on 256 training images"


def paired(r: dict, labels: list[str]) -> str:
    """The mixed plan against the best single-method plan, both refitted, image by image."""
    parts = []
    for speedup in (2.0, 3.0, 4.0):
        mixed = r["runs"][f"{labels[-1]}|{speedup}"]["reconstructed"]
        best = max(labels[:-1], key=lambda m: r["runs"][f"{m}|{speedup}"]["reconstructed"]["top1"])
        single = r["runs"][f"{best}|{speedup}"]["reconstructed"]
        only_m, only_s, p = mcnemar(mixed["correct"], single["correct"])
        gap = 100 * (mixed["top1"] - single["top1"])
        took = r["runs"][f"{labels[-1]}|{speedup}"]["source"].rsplit("took ", 1)[-1]
        if only_m == only_s == 0:
            parts.append(f"×{speedup:g}: the same predictions as {best} + joint reconstruction (the check took {took})")
            continue
        parts.append(
            f"×{speedup:g}: {gap:+.2f} points against {best} + joint reconstruction ({only_m} test images right "
            f"only with the mixed plan, {only_s} only with {best}; exact McNemar p = {p:.2f}; the check took {took})"
        )
    tested = any("McNemar" in p for p in parts)
    return (
        "Mixed plan against the best single-method plan after the same reconstruction, image by image: "
        + "; ".join(parts)
        + (". A p-value near 1 means the two plans are as good as each other on these 2,000 images." if tested else ".")
    )


def table(r: dict) -> None:
    env = r["environment"]
    name = r.get("model", "fashion-vgg")
    labels = [*METHODS, "+".join(METHODS)]
    flag = "" if name == "fashion-vgg" else f" --model {name}"
    lines = [
        f"## Mixed methods under one budget ({MODELS[name]['title']})",
        "",
        f"`python benchmarks/mixed_methods.py{flag}` ({env['cpu']}, torch {env['torch']}, 2 threads). Global MAC "
        f"budget, {sweep_words(name)}, no fine-tuning; top-1 on 2,000 test images "
        f"(dense {100 * r['dense']:.2f}%), delivered MAC reduction, seconds for the whole compression "
        "(sweep, allocation, factorization: the ×2 runs include the sensitivity sweeps, the ×3 and ×4 runs "
        "reuse them from the cache). The mixed run allocates over every method, then checks its plan against "
        "each single-method plan on the calibration images and keeps the best: "
        + "; ".join(
            f"×{k.split('|')[1].rstrip('0').rstrip('.')} {v['source'].split('; ')[1]}"
            for k, v in r["runs"].items()
            if "+" in k
        )
        + ". The last column refits the mixed plan's layers to the dense layers' outputs (joint data "
        "reconstruction, `--calibration 256 --reconstruct joint`: closed form for SVD layers, least squares of "
        "the last factor, the response through the following ReLU and 2 Adam epochs for the others) on the same "
        "256 images; its seconds include the compression before it."
        + (
            " Here, as the CLI does when reconstruction follows, the check compares each candidate after a quick "
            "refit (no Adam epochs, no ReLU response, on 128 other training images), and every single-method plan "
            "is refitted like the mixed one too: its cell gives top-1 before → after."
            if MODELS[name].get("refit_all")
            else ""
        ),
        "",
        "| target | " + " | ".join(labels) + " | mixed + joint reconstruction |",
        "|---|" + "---:|" * (len(labels) + 1),
    ]
    for speedup in (2.0, 3.0, 4.0):
        cells = []
        for label in labels:
            x = r["runs"][f"{label}|{speedup}"]
            refit = f" → {100 * x['reconstructed']['top1']:.2f}%" if "reconstructed" in x and "+" not in label else ""
            cells.append(f"{100 * x['top1']:.2f}%{refit} (×{x['macs_reduction']:.2f}, {x['seconds']:.0f} s)")
        rec = r["runs"][f"{labels[-1]}|{speedup}"]
        rec_s = rec["seconds"] + rec["reconstructed"]["seconds"]
        cells.append(f"{100 * rec['reconstructed']['top1']:.2f}% ({rec_s:.0f} s in all)")
        lines.append(f"| ×{speedup:g} | " + " | ".join(cells) + " |")
    if all("correct" in r["runs"][f"{labels[-1]}|{t}"]["reconstructed"] for t in (2.0, 3.0, 4.0)):
        lines += ["", paired(r, labels)]
    write_section(DOCS, "mixed" if name == "fashion-vgg" else f"mixed_{name}", "\n".join(lines))


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--from-json", action="store_true")
    ap.add_argument("--model", choices=list(MODELS), default="fashion-vgg")
    a = ap.parse_args()
    out = OUT if a.model == "fashion-vgg" else OUT.with_name(f"mixed_methods_{a.model}.json")
    table(load_or_run(out, a.from_json, lambda: run(a.model)))
