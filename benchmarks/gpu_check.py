"""Driver of scripts/gpu_check.sh: compress VGG-16 and ResNet-50 (random weights) at 2x and 4x fewer
MACs with uniform Tucker-2, then `rankdown bench --device cuda --dtype bfloat16` at batch 1 and 32,
eager, with CUDA graphs, and with torch.compile; one JSON per run.

    python benchmarks/gpu_check.py run --out runs/gpu     # on a GPU machine
    python benchmarks/gpu_check.py table --out runs/gpu   # the docs/benchmarks.md section
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent
DOCS = HERE.parent / "docs" / "benchmarks.md"
MODELS = {"vgg16": "zoo:vgg16", "resnet50": "zoo:resnet50"}
MODES = {"eager": [], "cuda-graphs": ["--cuda-graphs"], "compile": ["--compile"]}


def rankdown(*args: str) -> None:
    cmd = [sys.executable, "-m", "rankdown", *args]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, env={**__import__("os").environ, "PYTHONPATH": str(HERE)})


def run(out: Path) -> None:
    import torch

    if not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device")
    for name, spec in MODELS.items():
        for speedup in (2, 4):
            folder = out / f"{name}-x{speedup}"
            rankdown(
                "compress", "--model", spec, "--input-shape", "3,224,224", "--method", "tucker2",
                "--macs", str(1 / speedup), "--out", str(folder), "--force", "--no-latency", "-q",
            )  # fmt: skip
            for mode, flags in MODES.items():
                rankdown(
                    "bench", str(folder), "--model", spec, "--device", "cuda", "--dtype", "bfloat16",
                    "--batch-sizes", "1,32", "--runs", "50", "--fold-bn", *flags,
                    "--json", str(out / f"{name}-x{speedup}-{mode}.json"), "-q",
                )  # fmt: skip


def table(out: Path) -> None:
    sys.path.insert(0, str(HERE))
    from common import write_section

    gpu = (out / "gpu.txt").read_text().strip() if (out / "gpu.txt").is_file() else "?"
    lines = [
        "## GPU: VGG-16 and ResNet-50, bfloat16 (scripts/gpu_check.sh)",
        "",
        f"`bash scripts/gpu_check.sh` on {gpu}. Uniform Tucker-2 at the MAC fraction shown; speedup of the "
        "compressed model over the dense one, each in its faster layout, batch norms folded.",
        "",
        "| model | MACs | mode | batch 1 speedup (/ theoretical) | batch 32 speedup (/ theoretical) |",
        "|---|---|---|---:|---:|",
    ]
    for name in MODELS:
        for speedup in (2, 4):
            for mode in MODES:
                f = out / f"{name}-x{speedup}-{mode}.json"
                if not f.is_file():
                    continue
                rows = {r["batch"]: r for r in json.loads(f.read_text())["end_to_end"]}
                cells = [f"×{rows[b]['speedup']:.2f} ({rows[b]['ratio']:.2f})" if b in rows else "-" for b in (1, 32)]
                lines.append(f"| {name} | 1/{speedup} | {mode} | " + " | ".join(cells) + " |")
    write_section(DOCS, "gpu", "\n".join(lines))


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("stage", choices=["run", "table"])
    ap.add_argument("--out", type=Path, default=Path("runs/gpu"))
    a = ap.parse_args()
    run(a.out) if a.stage == "run" else table(a.out)
