"""What a run leaves for people: metrics.json, report.md and its plots."""

from __future__ import annotations

import logging
import math
import warnings
from pathlib import Path
from typing import Any

from .files import atomic_savefig, atomic_write_json, atomic_write_text

__all__ = ["write_budget_curve", "write_json", "write_report", "comparison_table"]

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


#: History columns that are not extra loss terms, though they start with ``train_``.
_NOT_TERMS = {"train_loss", "train_ce", "train_top1"}


def _percent_axis(ax) -> None:
    """An accuracy axis never runs above 100%."""
    low, high = ax.get_ylim()
    ax.set_ylim(max(low, 0.0), min(high, 100.0) if high > 0 else 100.0)


def _curves(plt, history: list[dict[str, Any]], metrics: dict[str, Any]):
    """Losses, extra loss terms (own axis: their scale is not the cross-entropy's) and accuracy."""
    epochs = [h["epoch"] for h in history]
    terms = [k for k in history[-1] if k.startswith("train_") and k not in _NOT_TERMS]
    n = 3 if terms else 2
    fig, axes = plt.subplots(1, n, figsize=(4.6 * n, 3.8))
    marker = "o" if len(epochs) <= 20 else "None"  # a run of few epochs still shows its points
    for ax in axes:
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_prop_cycle(marker=[marker] * 10, color=plt.rcParams["axes.prop_cycle"].by_key()["color"])
    ax_loss, ax_acc = axes[0], axes[-1]
    validated = all("val_loss" in h for h in history)
    ax_loss.plot(epochs, [h.get("train_ce", h["train_loss"]) for h in history],
                 label="train cross-entropy")
    if validated:
        ax_loss.plot(epochs, [h["val_loss"] for h in history], label="validation loss")
    ax_loss.set(title="cross-entropy", xlabel="epoch", ylabel="loss")
    ax_loss.legend()
    if terms:
        ax_terms = axes[1]
        for key in terms:
            ax_terms.plot(epochs, [h.get(key, float("nan")) for h in history],
                          label=key.removeprefix("train_") + " loss")
        ax_terms.set(title="extra loss terms (weighted)", xlabel="epoch", ylabel="loss")
        ax_terms.legend()
    ax_acc.plot(epochs, [h["train_top1"] for h in history], label="train top-1")
    if validated:
        ax_acc.plot(epochs, [h["val_top1"] for h in history], label="validation top-1")
    base = (metrics.get("baseline") or {}).get("val_top1")
    if base is not None:
        ax_acc.axhline(base, color="grey", linestyle="--", label=f"baseline validation ({base:.1f}%)")
    ax_acc.set(title="accuracy", xlabel="epoch", ylabel="top-1 (%)")
    _percent_axis(ax_acc)
    ax_acc.legend(fontsize="small")
    return fig


def _confusion(plt, confusion: list[list[int]], classes: list[str]):
    """The test confusion matrix, rows = true class, as a picture with class names."""
    n = len(classes)
    side = min(3.0 + 0.45 * n, 14.0)
    fig, ax = plt.subplots(figsize=(side + 1.0, side))
    image = ax.imshow(confusion, cmap="Blues")
    fig.colorbar(image, ax=ax, label="test images")
    ax.set_xticks(range(n), classes, rotation=60, ha="right", fontsize="small")
    ax.set_yticks(range(n), classes, fontsize="small")
    if n <= 25:
        top = max(max(row) for row in confusion) or 1
        for i, row in enumerate(confusion):
            for j, v in enumerate(row):
                if v:
                    ax.text(j, i, str(v), ha="center", va="center", fontsize="x-small",
                            color="white" if v > top / 2 else "black")
    ax.set(title="confusion matrix (test split)", xlabel="predicted", ylabel="true")
    return fig


#: Fonts with CJK glyphs that plots fall back to, where installed (class names in Chinese,
#: Japanese or Korean; matplotlib's own DejaVu Sans has none).
WIDE_FONTS = ("Noto Sans CJK SC", "Noto Sans CJK JP", "Noto Sans CJK KR", "Source Han Sans SC",
              "WenQuanYi Zen Hei", "Microsoft YaHei", "SimHei", "PingFang SC", "Hiragino Sans",
              "Malgun Gothic", "Arial Unicode MS")


def _pyplot():
    """matplotlib's pyplot on the file-only backend, or None (with a warning) without it."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib import font_manager
    except Exception as exc:  # plotting is a nicety, never a failure
        log.warning("no plots: matplotlib unavailable (%s)", exc)
        return None
    installed = {f.name for f in font_manager.fontManager.ttflist}
    plt.rcParams["font.family"] = ["DejaVu Sans", *(f for f in WIDE_FONTS if f in installed)]
    return plt


def missing_glyphs(texts: list[str]) -> list[str]:
    """Characters of ``texts`` that no font of the plots draws (they would show as boxes)."""
    import matplotlib.pyplot as plt
    from matplotlib import font_manager
    from matplotlib.ft2font import FT2Font

    covered: set[int] = set()
    for family in plt.rcParams["font.family"]:
        path = font_manager.findfont(family, fallback_to_default=False)
        covered |= set(FT2Font(path).get_charmap())
    chars = dict.fromkeys(c for t in texts for c in t if not c.isspace())  # in order
    return [c for c in chars if ord(c) not in covered]


def _plots(run_dir: Path, metrics: dict[str, Any]) -> list[str]:
    """Training curves, accuracy vs MACs and the confusion matrix as PNGs; returns file names."""
    plt = _pyplot()
    if plt is None:
        return []
    try:
        with warnings.catch_warnings():  # said once, in words, by _draw (missing_glyphs)
            warnings.filterwarnings("ignore", message="Glyph .* missing from font")
            return _draw(plt, run_dir, metrics)
    except Exception as exc:  # a finished run must never be lost to a figure
        plt.close("all")
        log.warning("plots skipped: %s: %s", type(exc).__name__, exc)
        return []


def _draw(plt, run_dir: Path, metrics: dict[str, Any]) -> list[str]:
    """Draw and save every figure the metrics allow; returns the file names."""
    figures = {}
    history = metrics.get("history") or []
    if history:
        figures["curves.png"] = _curves(plt, history, metrics)
    models = metrics.get("models") or {}
    if len(models) > 1:
        fig, ax = plt.subplots(figsize=(5.5, 4))
        for name, r in models.items():
            ax.scatter(r["macs"] / 1e6, r["top1"], s=40)
            ax.annotate(name, (r["macs"] / 1e6, r["top1"]), textcoords="offset points",
                        xytext=(5, 3))
        ax.set(title="accuracy vs MACs (test split)", xlabel="MACs (millions)",
               ylabel="top-1 (%)")
        ax.margins(x=0.25, y=0.15)
        _percent_axis(ax)
        ax.grid(alpha=0.3)
        figures["accuracy_vs_macs.png"] = fig
    final, classes = metrics.get("final") or {}, metrics.get("classes")
    if final.get("confusion") and classes:
        missing = missing_glyphs(classes)
        if missing:
            log.warning("class names use characters no installed font draws (%s); "
                        "confusion.png shows boxes for them: install a font that has them "
                        "(e.g. Debian's fonts-noto-cjk)",
                        "".join(missing[:8]))
        figures["confusion.png"] = _confusion(plt, final["confusion"], classes)
    for name, fig in figures.items():
        _save_figure(fig, run_dir / name)
        plt.close(fig)
    return list(figures)


def _save_figure(fig, path: Path) -> None:
    fig.tight_layout()
    atomic_savefig(fig, path, format="png", dpi=110, bbox_inches="tight")  # no label is clipped


def write_budget_curve(run_dir: str | Path, reference: float, max_drop: float | None,
                       steps: list[dict[str, Any]]) -> None:
    """``budget_steps.csv`` and ``budget_curve.png``: every step of a ``--max-drop`` search
    (or of ``--prune-steps``: ``max_drop`` None), validation top-1 against the MACs
    removed, with the baseline and the budget."""
    run_dir = Path(run_dir)
    rows = ["step,asked_macs_reduction,macs_reduction,val_top1,drop,within_budget,epochs,model"]
    rows += [f"{st['step']},{st['target']:.4f},{st['macs_reduction']:.4f},{st['score']:.2f},"
             f"{reference - st['score']:.2f},{str(st['within']).lower()},"
             f"{st.get('epochs_trained', '')},steps/{st['step']}/deploy.pt" for st in steps]
    atomic_write_text(run_dir / "budget_steps.csv", "\n".join(rows) + "\n")
    plt = _pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(5.5, 4))
    ax.axhline(reference, color="gray", label="baseline")
    if max_drop is not None:
        ax.axhline(reference - max_drop, color="gray", linestyle="--",
                   label=f"budget (-{max_drop:g})")
    for within, colour in ((True, "tab:blue"), (False, "tab:red")):
        mine = [st for st in steps if st["within"] == within]
        label = ("steps" if max_drop is None else
                 "within the budget" if within else "beyond the budget")
        ax.scatter([100 * st["macs_reduction"] for st in mine], [st["score"] for st in mine],
                   color=colour, label=label)
    for st in steps:
        ax.annotate(str(st["step"]), (100 * st["macs_reduction"], st["score"]),
                    textcoords="offset points", xytext=(4, 4))
    ax.set(title="steps of the search (validation split)" if max_drop is not None
           else "pruning steps (validation split)", xlabel="MACs removed (%)",
           ylabel="validation top-1 (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    _save_figure(fig, run_dir / "budget_curve.png")
    plt.close(fig)


def _num(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.2f}"


def _pct(value: float | None) -> str:
    return "- (no validation split)" if value is None or math.isnan(value) else f"{value:.2f}%"


def _budget_lines(budget: dict[str, Any]) -> list[str]:
    """The steps of a ``--max-drop`` search (or ``--prune-steps``) and which one the run kept."""
    searched = budget.get("max_drop") is not None
    title = (f"## The search: the smallest model within {budget['max_drop']:g} points" if searched
             else f"## The steps: {len(budget['steps'])} cuts, each recovered")
    ref = budget.get("reference_from") or {}
    source, judged = "", ""
    if ref.get("first_epoch") is not None:  # the annealed tail's mean (bpl 0.3 on)
        source = (f" (epochs {ref['first_epoch']}-{ref['last_epoch']}: {ref['from']}; the "
                  f"checkpoint, epoch {ref['checkpoint_epoch']}, scores "
                  f"{_pct(ref['checkpoint_val_top1'])})")
    elif ref.get("checkpoint_val_top1") is not None:  # the annealed epoch (earlier runs)
        source = (f" (epoch {ref['epoch']}: {ref['from']}; the checkpoint, epoch "
                  f"{ref['checkpoint_epoch']}, scores {_pct(ref['checkpoint_val_top1'])}, the "
                  "best of every epoch, a maximum the steps are not held to)")
    if any(st.get("judged_on") for st in budget["steps"]):
        judged = (" Each step is scored by the mean validation top-1 of the annealed epochs "
                  "around the one it keeps" + (", as the baseline is: the best of many noisy evaluations would "
                              "flatter whichever model had more of them."
                              if ref.get("first_epoch") is not None else
                              "; the baseline, without its training curves, by its "
                              "checkpoint's score."))
    lines = [title, "",
             f"Baseline validation top-1: {_pct(budget['reference'])}{source}.{judged} Each "
             "step cut the previous step's model further and recovered it; "
             f"{'the search ended: ' if searched else ''}{budget['stopped']}.", "",
             "| step | MACs removed (%) | validation top-1 (%) | below the baseline | epochs | "
             "model |", "|---:|---:|---:|---:|---:|---|"]
    for st in budget["steps"]:
        kept = " **(kept)**" if st["step"] == budget.get("chosen_step") else ""
        lines.append(f"| {st['step']}{kept} | {100 * st['macs_reduction']:.1f} | "
                     f"{_num(st['score'])} | {_num(budget['reference'] - st['score'])} | "
                     f"{st.get('epochs_trained', '?')} | `steps/{st['step']}/deploy.pt` |")
    lines += ["", "Any step's model deploys like the kept one: `bpl export RUN/steps/K/deploy.pt`, "
              "`bpl evaluate RUN/steps/K/deploy.pt` (which evaluates the test split again: "
              "choose on this table, not on that).", "", "![budget_curve.png](budget_curve.png)",
              ""]
    return lines


def _phases(metrics: dict[str, Any]) -> list[str]:
    """Baseline -> right after pruning -> after fine-tuning, with the epochs of each phase."""
    cfg = metrics.get("config", {})
    base, pruned, final = metrics.get("baseline") or {}, metrics.get("after_pruning"), metrics["final"]
    kept = metrics.get("selected") or {}

    def cell(v: float | None) -> str:
        return "-" if v is None else f"{v:.2f}"

    partners = cfg.get("partners", True)
    trained = "training" if cfg.get("soft") or cfg.get("from_scratch") else "fine-tuning"
    method = ("soft pruning while training" if cfg.get("soft") else
              "from fresh weights" if cfg.get("from_scratch") else
              "plain fine-tuning" if not partners else "")
    if partners:
        method += (", " if method else "") + "partners + diversity loss"
    if cfg.get("distill"):
        method += " + distillation"
    base_epochs = metrics.get("baseline_epochs")
    lines = ["| phase | epochs of training | validation top-1 (%) | test top-1 (%) |",
             "|---|---:|---:|---:|",
             f"| baseline | {base_epochs if base_epochs is not None else '?'} | "
             f"{cell(base.get('val_top1'))} | {cell(base.get('top1'))} |"]
    if pruned:
        lines.append(f"| right after pruning | +0 | {cell(pruned.get('val_top1'))} | "
                     f"{cell(pruned.get('test_top1'))} |")
    more = kept.get("epoch", cfg.get("epochs", "?"))
    if metrics.get("budget"):  # every step's recovery trained the kept model
        more = metrics.get("epochs_trained", "?")
        method += f", {metrics['budget'].get('chosen_step')} steps"
    lines.append(f"| after {trained} ({method}) | +{more} | "
                 f"{cell(kept.get('val_top1'))} | {cell(final.get('top1'))} |")
    # what the run adds to plain training (its name, possessive, and the control without it)
    helper = (("the partners", "the partners'", "`--no-partners`") if partners else
              ("distillation", "distillation's", "without `--distill`") if cfg.get("distill")
              else None)
    if helper:
        name, owner, control = helper
        lines += ["", f"The compressed model trained {more} more "
                  "epochs than the baseline: part of any gain over the baseline can come from "
                  f"that training alone, not from {name}. To isolate {owner} effect, run "
                  f"the control with the same settings and {control} and compare the two, over "
                  "several `--seed`s. In bpl's own study (docs/results.md: resnet18 on UC "
                  "Merced and EuroSAT, 50-95% fewer MACs, 5 seeds) neither partners nor "
                  "distillation beat plain fine-tuning beyond the 95% interval; what changed "
                  "accuracy measurably was the size of the cut and the length of the "
                  "fine-tuning."]
    gap = (base.get("val_top1") or math.nan) - (kept.get("val_top1") or math.nan)
    if gap > 1.0:  # NaN (a number missing) compares False
        lines += ["", f"**This model is {gap:.1f} points below the baseline on validation.** "
                  + _what_helped(cfg.get("epochs"))]
    return lines


def _what_helped(epochs: Any) -> str:
    """What bpl's convergence study (docs/results.md) found to win accuracy back, for a
    recovery of ``epochs``: more epochs up to the default, a smaller cut beyond it."""
    from .config import COMMAND_DEFAULTS

    enough = COMMAND_DEFAULTS["compress"]["epochs"]
    smaller = ("a smaller `--flops-reduction`, or `--max-drop P` for the smallest model within "
               "P points")
    if isinstance(epochs, int) and epochs < enough:
        return (f"Two changes measurably helped in bpl's study: fine-tuning longer (at 90% "
                f"fewer MACs, {enough} epochs instead of 10 won back about 3 validation points "
                f"on UC Merced and EuroSAT; `--epochs {enough}`, the default), and {smaller}.")
    return (f"In bpl's study, past {enough} epochs longer fine-tuning won back nothing beyond "
            "the 95% interval (at 90% fewer MACs: 40 epochs, or `--epochs auto`'s 80-200); "
            f"what measurably helped was a smaller cut: {smaller}.")


def _per_class(metrics: dict[str, Any]) -> list[str]:
    final, classes = metrics.get("final") or {}, metrics.get("classes")
    if not classes or not final.get("per_class_top1"):
        return []
    counts = [sum(row) for row in final.get("confusion", [])] or [None] * len(classes)
    lines = ["## Per-class accuracy (test split)", "", "| class | test images | top-1 (%) |",
             "|---|---:|---:|"]
    for name, n, acc in zip(classes, counts, final["per_class_top1"]):
        lines.append(f"| {name} | {n if n is not None else '-'} | {acc:.2f} |")
    return lines + [""]


def _precision_lines(segments: list[dict[str, str]]) -> list[str]:
    """Which precision and memory format training ran in (per segment where they differ);
    validation and the test split were evaluated in float32."""
    if not segments:
        return []
    kinds = list(dict.fromkeys(f"{s['autocast']}, {s['memory_format']} ({s['why']})"
                               for s in segments))
    text = "; then ".join(kinds) if len(kinds) > 1 else kinds[0]
    return [f"- trained in {text}; the test split was evaluated in float32"]


def write_report(run_dir: str | Path, metrics: dict[str, Any]) -> Path:
    """Write ``metrics.json``, the plots and ``report.md`` into ``run_dir``."""
    run_dir = Path(run_dir)
    write_json(run_dir / "metrics.json", metrics)
    plots = _plots(run_dir, metrics)
    cfg = metrics.get("config", {})
    lines = [f"# bpl {metrics.get('command', 'run')}: {cfg.get('arch', '?')} on {cfg.get('data', '?')}", ""]
    if metrics.get("models"):
        lines += [comparison_table(metrics["models"]), ""]
    if metrics.get("budget"):
        lines += _budget_lines(metrics["budget"])
    if metrics.get("command") == "compress" and metrics.get("final"):
        lines += _phases(metrics) + [""]
    for key, label in (
        ("fusion_error", "fusion check (max relative error, fused vs partner model)"),
        ("removal_error", "channel removal check (max relative error, pruned vs masked model)"),
    ):
        if metrics.get(key) is not None:
            lines.append(f"- {label}: {metrics[key]:.2e}")
    speed = metrics.get("speedup")
    if metrics.get("macs_reduction") is not None:
        asked = (f"asked {100 * cfg['flops_reduction']:.2f}%" if cfg.get("flops_reduction")
                 else f"what the {speed['asked']:.2f}x speedup asked for took" if speed
                 else f"the smallest within --max-drop {cfg.get('max_drop')}")
        lines.append(f"- MACs reduction: {100 * metrics['macs_reduction']:.2f}% ({asked})")
    if speed:
        threads = f", {speed['threads']} thread(s)" if speed.get("threads") else ""
        lines.append(
            f"- speedup: asked {speed['asked']:.2f}x, measured {speed['measured']:.2f}x in "
            f"{speed['runtime']} at batch {speed['batch_size']}{threads} (the pruned model "
            "against the baseline, BN folded, timed interleaved, medians; "
            f"{speed['latency_ms']['unpruned']:.2f} -> {speed['latency_ms']['pruned']:.2f} ms); "
            f"{100 * speed['macs_reduction']:.2f}% fewer MACs came with it"
            + ("; uniform cuts, which were measured as fast keeping more MACs than the latency "
               "table's allocation" if speed.get("allocation") == "uniform" else
               "; cuts allocated by the measured latency table"
               if speed.get("allocation") else ""))
        from .pruning.speed import BUSY_SPREAD

        if (speed.get("unpruned_spread") or 0.0) > BUSY_SPREAD:
            lines.append(
                f"- **the machine was busy while pruning**: the baseline's time varied by "
                f"{100 * speed['unpruned_spread']:.0f}% across the speed search, so the measured "
                "speedup may be off; check it with `bpl profile`, or prune on an idle machine")
    if metrics.get("stopped"):
        lines.append(f"- trained {metrics.get('epochs_trained', '?')} epochs; training ended: "
                     f"{metrics['stopped']}")
    kept = metrics.get("selected")
    if kept:
        lines.append(f"- kept epoch {kept['epoch']} of {kept['of']}: {kept['why']}; the test "
                     "split was evaluated once, on this model")
    if metrics.get("wall_time_s") is not None:
        segments = metrics.get("segments", 1)
        resumed = f" over {segments} segments (the run was resumed)" if segments > 1 else ""
        lines.append(f"- wall time: {metrics['wall_time_s']:.0f} s{resumed}")
    images = metrics.get("images")
    if images:
        why = f" ({images['why']})" if images.get("why") else ""
        lines.append(f"- images read: {images['mode']}{why}")
    lines += _precision_lines(metrics.get("precision") or [])
    lines.append("")
    lines += _per_class(metrics)
    lines += [f"![{p}]({p})" for p in plots]
    path = run_dir / "report.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path
