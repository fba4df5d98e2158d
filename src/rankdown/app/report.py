"""Reports: one typed result per run (its ``to_dict()`` is report.json), and its rendering as
terminal tables."""

from __future__ import annotations

import datetime
import sys
from dataclasses import asdict, dataclass, field
from typing import Any, cast

from rich.console import Console, JustifyMethod
from rich.table import Table

from rankdown import __version__
from rankdown.measurement.bench import Cost, environment
from rankdown.planning.compress import CompressResult, LayerReport

NOTES = (
    "totals: all parameters of the model and the MACs of all its Conv2d/Linear layers, per example; "
    "latency: median ms in the faster of NCHW and channels_last, guarded against foreign CPU load."
)


@dataclass
class Totals:
    """Whole-model costs: all parameters, and the MACs of every Conv2d/Linear, per example."""

    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    params_reduction: float
    macs_reduction: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Report:
    """What one run measured. The nested dicts (quality, latency, budget, fine-tuning) are the
    JSON records of the steps that wrote them; the optional parts are left out of ``to_dict()``
    when a run had no such step."""

    model: str | None
    plan_meta: dict[str, Any]
    layers: list[LayerReport]
    totals: Totals
    accuracy: dict[str, Any] | None = None
    quality: dict[str, Any] | None = None
    output_rel_error: float | None = None
    output_rel_error_on: str | None = None
    latency: dict[str, Any] | None = None
    command: list[str] | None = None
    rankdown: str = __version__
    created: str = field(
        default_factory=lambda: datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    )
    environment: dict[str, str] = field(default_factory=environment)
    notes: str = NOTES
    # the steps a run may add
    budget: dict[str, Any] | None = None
    warning: str | None = None
    tokens_per_s: dict[str, Any] | None = None
    finetune: dict[str, Any] | None = None
    seconds: dict[str, float] | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "rankdown": self.rankdown,
            "created": self.created,
            "command": self.command,
            "model": self.model,
            "plan_meta": self.plan_meta,
            "layers": [r.to_dict() for r in self.layers],
            "totals": self.totals.to_dict(),
            "accuracy": self.accuracy,
            "quality": self.quality,
            "output_rel_error": self.output_rel_error,
            "output_rel_error_on": self.output_rel_error_on,
            "latency": self.latency,
            "environment": self.environment,
            "notes": self.notes,
        }
        for key in ("budget", "warning", "tokens_per_s", "finetune", "seconds"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return out


def _fmt_int(n: int) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


def build_report(
    result: CompressResult,
    *,
    model_spec: str | None,
    model_before: Cost,
    model_after: Cost,
    accuracy: dict | None,
    latency: dict | None,
    output_rel_error: float | None,
    quality: dict | None = None,
    output_rel_error_on: str | None = None,
    argv: list[str] | None = None,
) -> Report:
    before, after = model_before, model_after
    totals = Totals(
        before.params,
        after.params,
        before.macs,
        after.macs,
        before.params / max(after.params, 1),
        before.macs / max(after.macs, 1),
    )
    if latency:
        for row in latency.values():
            if "speedup" in row:
                row["theoretical_speedup"] = totals.macs_reduction
                row["measured_over_theoretical"] = row["speedup"] / totals.macs_reduction
    return Report(
        model_spec,
        result.plan.meta,
        list(result.layers),
        totals,
        accuracy=accuracy,
        quality=quality,
        output_rel_error=output_rel_error,
        output_rel_error_on=output_rel_error_on,
        latency=latency,
        command=argv,
    )


def _rank_str(rank) -> str:
    if rank is None:
        return "-"
    return "×".join(str(r) for r in rank) if isinstance(rank, (list, tuple)) else str(rank)


def render(report: Report | dict, console: Console | None = None) -> None:
    """The report as terminal tables (from a run, or from a saved report.json)."""
    if isinstance(report, Report):
        report = report.to_dict()
    if console is None:
        console = Console(file=sys.stdout)
        if not console.is_terminal:  # logs and pipes: do not squeeze the table into 80 columns
            console = Console(file=sys.stdout, width=150)
    t = Table(
        title=f"rankdown {report.get('model') or ''} — {report['plan_meta'].get('method', '')}, "
        f"{report['plan_meta'].get('policy', '')}",
        title_justify="left",
    )
    for col, just in (
        ("layer", "left"),
        ("type", "left"),
        ("method", "left"),
        ("rank", "right"),
        ("params", "right"),
        ("→ params", "right"),
        ("MACs", "right"),
        ("→ MACs", "right"),
        ("rel. err", "right"),
        ("note", "left"),
    ):
        t.add_column(col, justify=cast(JustifyMethod, just), overflow="fold")
    for r in report["layers"]:
        t.add_row(
            r["name"],
            r["layer_type"],
            r["method"] or "dense",
            _rank_str(r["rank"]),
            _fmt_int(r["before"]["params"]),
            _fmt_int(r["after"]["params"]),
            _fmt_int(r["before"]["macs"]),
            _fmt_int(r["after"]["macs"]),
            "-" if r["rel_error"] is None else f"{r['rel_error']:.3f}",
            r["note"],
        )
    tot = report["totals"]
    t.add_section()
    t.add_row(
        "model total",
        "",
        "",
        "",
        _fmt_int(tot["params_before"]),
        _fmt_int(tot["params_after"]),
        _fmt_int(tot["macs_before"]),
        _fmt_int(tot["macs_after"]),
        "",
        f"params ÷{tot['params_reduction']:.2f}, MACs ÷{tot['macs_reduction']:.2f}",
    )
    console.print(t)
    s = Table(title="before → after", title_justify="left")
    s.add_column("measure")
    s.add_column("dense", justify="right")
    s.add_column("compressed", justify="right")
    s.add_column("change", justify="right")
    acc = report.get("accuracy")
    if acc:
        b, a = acc.get("before"), acc["after"]
        s.add_row(
            f"accuracy ({acc['dataset']}, n={acc['n']})",
            "-" if b is None else f"{100 * b:.2f}%",
            f"{100 * a:.2f}%",
            "" if b is None else f"{100 * (a - b):+.2f} pts",
        )
    quality = report.get("quality") or {}
    shown = {"top1"} if acc else set()
    labels = {
        "top5": ("top-5 accuracy", True),
        "top1_agreement": ("top-1 agreement with dense", True),
        "kl_to_dense": ("KL(dense ‖ compressed)", False),
        "perplexity": ("perplexity", False),
        "embedding_cosine": ("embedding cosine to dense", False),
    }
    for name, per in (quality.get("metrics") or {}).items():
        if name in shown or name in ("output_rel_error", "tokens_scored"):
            continue
        label, pct = labels.get(name, (name, False))
        fmt = (lambda v: f"{100 * v:.2f}%") if pct else (lambda v: f"{v:.4g}")
        d, c = per.get("dense"), per.get("compressed")
        change = "" if d is None or c is None else (f"{100 * (c - d):+.2f} pts" if pct else f"{c - d:+.4g}")
        s.add_row(
            f"{label} ({quality['data']}, n={quality['examples']})",
            "-" if d is None else fmt(d),
            "-" if c is None else fmt(c),
            change,
        )
    if report.get("output_rel_error") is not None:
        on = report.get("output_rel_error_on")
        s.add_row(f"output rel. error vs dense{f' ({on})' if on else ''}", "", f"{report['output_rel_error']:.4f}", "")
    for key, row in (report.get("latency") or {}).items():
        comp = row["compressed"]
        dense = row.get("dense")
        layout = lambda lat: "NHWC" if lat["channels_last"] else "NCHW"  # noqa: E731
        flag = " (contended!)" if comp["contended"] or (dense and dense["contended"]) else ""
        s.add_row(
            f"latency {key.replace('_', ' ')}, {comp['threads']} threads{flag}",
            "-" if dense is None else f"{dense['median_ms']:.2f} ms {layout(dense)}",
            f"{comp['median_ms']:.2f} ms {layout(comp)}",
            "" if dense is None else f"×{row['speedup']:.2f} (theory ×{row['theoretical_speedup']:.2f})",
        )
    tps = report.get("tokens_per_s")
    if tps and "dense" in tps:
        for key, label in (("prefill_tokens_per_s", "prefill"), ("decode_tokens_per_s", "decode, batch 1")):
            d, c = tps["dense"][key], tps["compressed"][key]
            s.add_row(f"tokens/s {label}, {tps['threads']} threads", f"{d:.1f}", f"{c:.1f}", f"×{c / d:.2f}")
    console.print(s)
    if report.get("seconds"):
        stages = ", ".join(f"{k} {v:.1f} s" for k, v in report["seconds"].items())
        console.print(f"time: {stages} (total {sum(report['seconds'].values()):.1f} s)")
    if quality.get("note"):
        console.print(f"note: {quality['note']}")
    if report.get("warning"):
        console.print(f"[bold yellow]warning:[/] {report['warning']}")


def render_bench(result: dict, console: Console | None = None) -> None:
    if console is None:
        console = Console(file=sys.stdout)
        if not console.is_terminal:
            console = Console(file=sys.stdout, width=150)
    o = result["options"]
    t = Table(
        title=f"rankdown bench {result['target']} — {o['device']} {o['dtype']}, {o['threads']} threads"
        + (", torch.compile" if o["compile"] else "")
        + (", BN folded" if o["fold_bn"] else ""),
        title_justify="left",
    )
    keys = [k for k in ("dense", "compressed", "model") if k in result["macs"]]
    first = result["end_to_end"][0] if result["end_to_end"] else {}
    keys += [f"{k} (onnxruntime)" for k in list(keys) if f"{k} (onnxruntime)" in first]
    t.add_column("batch", justify="right")
    for k in keys:
        t.add_column(f"{k} ms", justify="right")
    pair = "compressed" in keys and "dense" in keys
    if pair:
        for col in ("measured speedup", "theoretical (MACs)", "measured / theoretical"):
            t.add_column(col, justify="right")
        if "speedup_onnxruntime" in first:
            t.add_column("onnxruntime speedup (/ theoretical)", justify="right")
    for row in result["end_to_end"]:
        cells = [str(row["batch"])]
        for k in keys:
            lat = row[k]
            layout = "" if "onnxruntime" in k else (" NHWC" if lat["channels_last"] else " NCHW")
            cells.append(f"{lat['median_ms']:.3f}{layout}")
        if "speedup" in row:
            cells += [f"×{row['speedup']:.2f}", f"×{row['theoretical']:.2f}", f"{row['ratio']:.2f}"]
        if "speedup_onnxruntime" in row:
            cells.append(f"×{row['speedup_onnxruntime']:.2f} ({row['ratio_onnxruntime']:.2f})")
        t.add_row(*cells)
    console.print(t)
    if result["layers"]:
        lt = Table(title=f"per layer, batch {o['batch_sizes'][0]}", title_justify="left")
        for col in ("layer", "method", "dense ms", "compressed ms", "speedup", "theoretical", "ratio"):
            lt.add_column(col, justify="left" if col in ("layer", "method") else "right")
        for r in result["layers"]:
            lt.add_row(
                r["name"],
                r["method"],
                f"{r['dense_ms']:.3f}",
                f"{r['compressed_ms']:.3f}",
                f"×{r['speedup']:.2f}",
                f"×{r['theoretical']:.2f}",
                f"{r['ratio']:.2f}",
            )
        console.print(lt)
