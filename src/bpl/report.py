"""What a run leaves for people: metrics.json, report.md and its plots."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

from .files import atomic_write_json, atomic_write_text

__all__ = ["write_json", "write_report", "comparison_table"]

log = logging.getLogger(__name__)


def write_json(path: str | Path, data: Any) -> None:
    """Write JSON atomically (indented, numbers as floats where json cannot write them)."""
    atomic_write_json(path, data, indent=2, default=float)


def _fmt_count(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def comparison_table(rows: dict[str, dict[str, Any]]) -> str:
    """A markdown table of models (top-1, MACs, params, CPU latency), relative to the first row."""
    names = list(rows)
    ref = rows[names[0]]
    lines = [
        "| model | top-1 (%) | MACs | params | CPU latency (ms) |",
        "|---|---:|---:|---:|---:|",
    ]
    for name in names:
        r = rows[name]
        macs = f"{_fmt_count(r['macs'])}"
        params = f"{_fmt_count(r['params'])}"
        lat = f"{r['latency_ms']:.2f}" if r.get("latency_ms") is not None else "-"
        if name != names[0]:
            macs += f" ({100 * (1 - r['macs'] / ref['macs']):.1f}% fewer)"
            params += f" ({100 * (1 - r['params'] / ref['params']):.1f}% fewer)"
            if r.get("latency_ms") and ref.get("latency_ms"):
                lat += f" ({ref['latency_ms'] / r['latency_ms']:.2f}x faster)"
        top1 = f"{r['top1']:.2f}" if r.get("top1") is not None else "-"
        lines.append(f"| {name} | {top1} | {macs} | {params} | {lat} |")
    return "\n".join(lines)


def _plots(run_dir: Path, metrics: dict[str, Any]) -> list[str]:
    """Training curves and accuracy vs MACs as PNGs; returns the file names written."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as exc:  # plotting is a nicety, never a failure
        log.warning("no plots: matplotlib unavailable (%s)", exc)
        return []
    written = []
    history = metrics.get("history") or []
    if history:
        epochs = [h["epoch"] for h in history]
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
        ax1.plot(epochs, [h["train_loss"] for h in history], label="train loss")
        validated = all("val_loss" in h for h in history)
        if validated:
            ax1.plot(epochs, [h["val_loss"] for h in history], label="validation loss")
        if any(h.get("train_diversity") for h in history):
            ax1.plot(epochs, [h["train_diversity"] for h in history], label="diversity loss")
        ax1.set_xlabel("epoch")
        ax1.legend()
        ax2.plot(epochs, [h["train_top1"] for h in history], label="train top-1")
        if validated:
            ax2.plot(epochs, [h["val_top1"] for h in history], label="validation top-1")
        ax2.set_xlabel("epoch")
        ax2.set_ylabel("%")
        ax2.legend()
        fig.tight_layout()
        fig.savefig(run_dir / "curves.png", dpi=110)
        plt.close(fig)
        written.append("curves.png")
    models = metrics.get("models") or {}
    if len(models) > 1:
        fig, ax = plt.subplots(figsize=(5, 3.6))
        for name, r in models.items():
            ax.scatter(r["macs"] / 1e6, r["top1"], s=40)
            ax.annotate(name, (r["macs"] / 1e6, r["top1"]), textcoords="offset points", xytext=(5, 3))
        ax.set_xlabel("MACs (millions)")
        ax.set_ylabel("top-1 (%)")
        ax.set_title("accuracy vs MACs")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(run_dir / "accuracy_vs_macs.png", dpi=110)
        plt.close(fig)
        written.append("accuracy_vs_macs.png")
    return written


def write_report(run_dir: str | Path, metrics: dict[str, Any]) -> Path:
    """Write ``metrics.json``, the plots and ``report.md`` into ``run_dir``."""
    run_dir = Path(run_dir)
    write_json(run_dir / "metrics.json", metrics)
    plots = _plots(run_dir, metrics)
    cfg = metrics.get("config", {})
    lines = [f"# bpl {metrics.get('command', 'run')}: {cfg.get('arch', '?')} on {cfg.get('data', '?')}", ""]
    if metrics.get("models"):
        lines += [comparison_table(metrics["models"]), ""]
    for key, label in (
        ("fusion_error", "fusion check (max relative error, fused vs partner model)"),
        ("removal_error", "channel removal check (max relative error, pruned vs masked model)"),
    ):
        if metrics.get(key) is not None:
            lines.append(f"- {label}: {metrics[key]:.2e}")
    if metrics.get("macs_reduction") is not None:
        lines.append(f"- MACs reduction: {100 * metrics['macs_reduction']:.2f}% "
                     f"(asked {100 * cfg.get('flops_reduction', math.nan):.2f}%)")
    kept = metrics.get("selected")
    if kept:
        lines.append(f"- kept epoch {kept['epoch']} of {kept['of']}: {kept['why']}; the test "
                     "split was evaluated once, on this model")
    if metrics.get("wall_time_s") is not None:
        lines.append(f"- wall time: {metrics['wall_time_s']:.0f} s")
    lines.append("")
    lines += [f"![{p}]({p})" for p in plots]
    path = run_dir / "report.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path
