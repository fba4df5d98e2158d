"""Export parity and speed in each deployable runtime, on the bundled Fashion-MNIST VGG.

The trained model at 2x fewer MACs (uniform, each of four methods) is exported to ONNX,
TorchScript and torch.export after the deployment folds; each file's outputs are compared with
PyTorch's on 512 test images (max abs, relative error). Then every model, dense included, is timed
at batch 1 and 64 on 2 threads in three runtimes: eager PyTorch (best layout), torch.compile
(inductor) and onnxruntime, with the same load guard; speedups are against the dense model in the
same runtime.

    python benchmarks/export_runtimes.py [--from-json]
"""

from __future__ import annotations

import argparse
import copy
import tempfile
from pathlib import Path

import torch
from common import load_or_run, write_section

from rankdown import CompressConfig, MacFraction, build_model, compress
from rankdown.deployment.deploy import deploy
from rankdown.deployment.export import FORMATS, OrtModule, export_model
from rankdown.measurement.bench import best_latency, environment, measure_latency
from rankdown.zoo.fashion import load_fashion_mnist

HERE = Path(__file__).parent
OUT = HERE / "results" / "export_runtimes.json"
DOCS = HERE.parent / "docs" / "benchmarks.md"
METHODS = ("tucker2", "channel-svd", "separable", "cp")
SKIP = ("features.0", "classifier.5")


def run(runs: int) -> dict:
    torch.set_num_threads(2)
    test = load_fashion_mnist("test", limit=512)
    x = test.images
    dense = build_model("fashion-vgg").eval()
    models = {"dense": dense}
    for m in METHODS:
        models[m] = compress(dense, CompressConfig(m, MacFraction(0.5), skip=SKIP), x[:1]).model
    out: dict = {"environment": environment(), "models": {}}
    for name, model in models.items():
        row: dict = {"parity": {}, "ms": {}}
        folded = copy.deepcopy(model).eval()
        deploy(folded)
        with tempfile.TemporaryDirectory() as tmp:
            for fmt, file in FORMATS.items():
                info = export_model(model, x[:1], Path(tmp) / file, fmt, check=[x[:256], x[256:]])
                row["parity"][fmt] = info["parity"]
            ort = OrtModule(Path(tmp) / FORMATS["onnx"], threads=2)
            for b in (1, 64):
                xb = x[:b]
                row["ms"][f"eager b{b}"] = best_latency(folded, xb, runs=runs, threads=2).median_ms
                row["ms"][f"onnxruntime b{b}"] = measure_latency(ort, xb, runs=runs, threads=2).median_ms
        compiled = torch.compile(copy.deepcopy(folded))
        for b in (1, 64):
            with torch.no_grad():
                compiled(x[:b])  # compile outside the timing
            row["ms"][f"compiled b{b}"] = measure_latency(compiled, x[:b], runs=runs, threads=2).median_ms
        out["models"][name] = row
        print(name, row["ms"], flush=True)
    return out


def table(r: dict) -> None:
    env = r["environment"]
    d = r["models"]["dense"]["ms"]
    lines = [
        "## Export: parity and speed per runtime (bundled Fashion-MNIST VGG, 2× fewer MACs)",
        "",
        f"`python benchmarks/export_runtimes.py` ({env['cpu']}, torch {env['torch']}, 2 threads). Parity: each "
        "exported file against PyTorch on 512 test images, relative error (max abs). Times: median ms, guarded; "
        "speedup against the dense model in the same runtime, batch norms folded.",
        "",
        "| model | ONNX (onnxruntime) | TorchScript | torch.export |",
        "|---|---:|---:|---:|",
    ]
    for name, row in r["models"].items():
        cells = [f"{p['rel_error']:.1e} ({p['max_abs_error']:.1e})" for p in row["parity"].values()]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "| model | eager b1 | compiled b1 | onnxruntime b1 | eager b64 | compiled b64 | onnxruntime b64 |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    keys = ["eager b1", "compiled b1", "onnxruntime b1", "eager b64", "compiled b64", "onnxruntime b64"]
    for name, row in r["models"].items():
        cells = [f"{row['ms'][k]:.2f}" + ("" if name == "dense" else f" (×{d[k] / row['ms'][k]:.2f})") for k in keys]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    write_section(DOCS, "export", "\n".join(lines))


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--from-json", action="store_true")
    ap.add_argument("--runs", type=int, default=30)
    a = ap.parse_args()
    table(load_or_run(OUT, a.from_json, lambda: run(a.runs)))
