"""Reproduce the BPL comparison on real data: UC Merced, five arms, several seeds (issue 9).

For every seed the baseline (arm A) is trained once; arms B-F start from that same
baseline checkpoint (``<out>/seed<k>/A/last.pt``, the last epoch, not the test-selected
best) and share its 80/20 split, so the arms of one seed differ only in what the arm
changes:

    A  baseline, unpruned, trained from scratch (or from the config's weights)
    B  hard-pruned to ``flops_reduction`` fewer MACs, fine-tuned plainly (no partners)
    C  the same pruned model with BPL: partners + diversity loss, fused after training
    D  ablation of C: partners without the diversity loss (``diversity_weight=0``)
    E  the reference code's soft schedule (``soft=True``) on the extended full model,
       then fused and physically pruned
    F  as C with the reference code's partner initialisation (``init="paper"``: both BN
       scales 0.5) instead of a partner that starts at scale 0

B-F train for the same number of epochs with the same optimiser settings.  Each run has
its own directory ``<out>/seed<k>/<arm>`` (bpl's usual run directory plus ``run.log``).
Re-running the script skips finished runs (``metrics.json`` present) and resumes cut-off
ones (``last.pt`` present), so an interrupted reproduction continues where it stopped.
At the end it writes ``results.json`` and ``results.csv`` (one row per seed and arm),
``summary.md`` (mean +- sample std per arm, paired differences) and
``accuracy_vs_macs.png`` into ``<out>``.

    python benchmarks/reproduce_ucm.py                      # the CPU protocol (configs/ucm_cpu.yaml)
    python benchmarks/reproduce_ucm.py --smoke              # 1-2 minute end-to-end check
    python benchmarks/reproduce_ucm.py --config benchmarks/configs/paper_gpu.yaml   # the paper's recipe

Settings come from, lowest to highest priority: built-in defaults, ``--config FILE``
(default ``benchmarks/configs/ucm_cpu.yaml``; ``--config none`` for the defaults alone),
``--smoke``, command-line flags.  Relative paths in the defaults and config files are
relative to the repository; relative paths given as flags are relative to the current
directory.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import shutil
import statistics
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from bpl.config import Config, read_options_file, resolve_command
from bpl.errors import BPLError
from bpl.files import atomic_savefig, atomic_write_text
from bpl.models import load_model
from bpl.pipeline import compress, train_baseline
from bpl.profiling import compare_latency
from bpl.report import write_json
from common import (
    apply_cpu_bf16,
    check_same_protocol,
    console_logging,
    log_to,
    machine,
    saved_partner_stats,
    write_csv,
)

log = logging.getLogger("reproduce_ucm")

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "ucm_cpu.yaml"
#: The paper's headline reduction: ResNet-50 on UC Merced, 73.97% fewer MACs.
PAPER_REDUCTION = 0.7397


@dataclass(frozen=True)
class Arm:
    """One arm of the comparison: the bpl job it runs and the Config fields it sets."""

    key: str
    label: str
    description: str
    command: str  # "train" or "compress"
    fields: dict[str, Any]


ARMS: dict[str, Arm] = {
    "A": Arm("A", "baseline", "unpruned baseline", "train", {}),
    "B": Arm("B", "pruned + fine-tune", "hard-pruned, fine-tuned plainly (no partners)",
             "compress", {"soft": False, "partners": False}),
    "C": Arm("C", "pruned + BPL", "hard-pruned, partners + diversity loss, fused",
             "compress", {"soft": False, "partners": True}),
    "D": Arm("D", "pruned + partners, no div.", "as C without the diversity loss",
             "compress", {"soft": False, "partners": True, "diversity_weight": 0.0}),
    "E": Arm("E", "soft BPL (reference)", "soft schedule on the extended model, fused + pruned",
             "compress", {"soft": True, "partners": True}),
    "F": Arm("F", "pruned + BPL, reference init", "as C with both BN scales starting at 0.5",
             "compress", {"soft": False, "partners": True, "init": "paper"}),
}

#: Built-in defaults; the config file and the flags override them.
DEFAULTS: dict[str, Any] = {
    "data": "ucm",
    "data_root": "../shared/data/ucmerced",
    "out": "runs/reproduce_ucm",
    "cache_dir": None,  # None: <out>/cache
    "seeds": [0, 1, 2],
    "arms": list(ARMS),
    "arch": "resnet18",
    "image_size": 96,
    "baseline_epochs": 30,
    "finetune_epochs": 6,
    "flops_reduction": PAPER_REDUCTION,
    "threads": None,  # torch intra-op threads; None: torch's default (all cores)
    "cpu_bf16": None,  # False: fp32 on every CPU (runs before issue 25); None: bf16 where AMX is
    "common": {},  # Config fields for every run
    "baseline": {},  # Config fields for arm A only
    "finetune": {},  # Config fields for arms B-F only
}

#: What --smoke changes: tiny images, one epoch per phase, one seed.
SMOKE: dict[str, Any] = {
    "image_size": 32,
    "baseline_epochs": 1,
    "finetune_epochs": 1,
    "seeds": [0],
    "out": "runs/reproduce_ucm_smoke",
}

#: Fields the script sets itself; a config section may not set them.
_OWNED = {"data", "data_root", "image_size", "arch", "seed", "out", "cache_dir", "epochs",
          "flops_reduction", "baseline", "resume", "soft", "partners"}
#: Config fields that may differ between a finished run and this call (paths, bookkeeping).
_CONFIG_FIELDS = {f.name for f in dataclasses.fields(Config)}
_METRICS = ("top1", "macs", "params", "latency_ms", "speedup", "macs_reduction", "wall_time_s",
            "partner_norm_ratio", "partner_kernel_cos")
#: Timed passes per deployed model in the final interleaved latency pass.
LATENCY_REPEATS = 50


# --------------------------------------------------------------------------- settings


def _relative_to_repo(path: str | None) -> str | None:
    """A relative path from the defaults or a config file is relative to the repository."""
    if path is None or Path(path).is_absolute():
        return path
    return str(REPO / path)


def load_settings_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML/JSON settings file and check its keys (script keys + Config sections)."""
    settings = read_options_file(path, "settings file", empty_ok=True)
    unknown = sorted(set(settings) - set(DEFAULTS))
    if unknown:
        raise BPLError(f"unknown setting(s) in {path}: {', '.join(unknown)}; "
                       f"known: {', '.join(DEFAULTS)}")
    for section in ("common", "baseline", "finetune"):
        settings[section] = _check_section(settings.get(section) or {}, f"{path}: {section}")
    return settings


def _check_section(section: Any, where: str) -> dict[str, Any]:
    """A section is a mapping of bpl Config fields, minus the ones the script owns."""
    if not isinstance(section, dict):
        raise BPLError(f"{where} must be a mapping of bpl Config fields")
    section = {str(k).replace("-", "_"): v for k, v in section.items()}
    unknown = sorted(set(section) - _CONFIG_FIELDS)
    if unknown:
        raise BPLError(f"{where}: {', '.join(unknown)} are not bpl Config fields")
    owned = sorted(set(section) & _OWNED)
    if owned:
        raise BPLError(f"{where}: {', '.join(owned)} are set by the script; use the top-level "
                       "settings (image_size, arch, baseline_epochs, ...) instead")
    return section


def build_parser() -> argparse.ArgumentParser:
    """Command-line flags; every flag defaults to 'not given' so the config file can fill it."""
    p = argparse.ArgumentParser(
        description="Reproduce BPL on UC Merced: arms A-F x seeds, aggregated with mean +- std.",
        epilog="example:\n  python benchmarks/reproduce_ucm.py --config "
               "benchmarks/configs/ucm_cpu.yaml\n  python benchmarks/reproduce_ucm.py --smoke",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    s = argparse.SUPPRESS
    p.add_argument("--config", default=str(DEFAULT_CONFIG), metavar="FILE",
                   help="YAML/JSON settings (default: %(default)s)")
    p.add_argument("--smoke", action="store_true",
                   help="tiny end-to-end check: 32 px, 1 epoch per phase, seed 0")
    p.add_argument("--data", default=s, help="bpl dataset name (ucm, nwpu-resisc45, rsd46-whu, "
                   "imagefolder)")
    p.add_argument("--data-root", default=s, metavar="DIR")
    p.add_argument("--out", default=s, metavar="DIR", help="output folder of the reproduction")
    p.add_argument("--cache-dir", default=s, metavar="DIR",
                   help="decoded-image cache (default: <out>/cache)")
    p.add_argument("--seeds", default=s, type=int, nargs="+")
    p.add_argument("--arms", default=s, nargs="+", choices=list(ARMS))
    p.add_argument("--arch", default=s)
    p.add_argument("--image-size", default=s, type=int, metavar="PX")
    p.add_argument("--baseline-epochs", default=s, type=int)
    p.add_argument("--finetune-epochs", default=s, type=int, help="epochs of every arm B-F")
    p.add_argument("--flops-reduction", default=s, type=float, metavar="R")
    p.add_argument("--device", default=s,
                   help="where every run trains (cpu, cuda, cuda:1, auto); overrides the config's "
                   "common.device; not part of the protocol, so runs from several devices mix")
    p.add_argument("--workers", default=s, type=int, metavar="N",
                   help="DataLoader worker processes (overrides common.workers)")
    p.add_argument("--threads", default=s, type=int, metavar="N",
                   help="torch CPU threads (default: all); 1 when other jobs share the cores")
    p.add_argument("--dry-run", action="store_true",
                   help="print every run's resolved bpl Config and its state, train nothing")
    p.add_argument("--quiet", action="store_true", help="only warnings on the console")
    return p


def resolve_settings(args: argparse.Namespace) -> dict[str, Any]:
    """Defaults < config file < --smoke < flags, with paths made absolute."""
    settings = json.loads(json.dumps(DEFAULTS))  # deep copy
    if args.config and str(args.config).lower() != "none":
        settings.update(load_settings_file(args.config))
    if args.smoke:
        settings.update(SMOKE)
    skip = {"config", "smoke", "quiet", "dry_run"}
    flags = {k: v for k, v in vars(args).items() if k not in skip}
    for key in ("out", "data_root", "cache_dir"):  # a path given on the command line: from cwd
        if key in flags:
            flags[key] = str(Path(flags[key]).resolve())
    for key in ("device", "workers"):  # execution settings of every run: Config fields
        if key in flags:
            settings["common"][key] = flags.pop(key)
    settings.update(flags)
    arms = [a.upper() for a in settings["arms"]]
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        raise BPLError(f"unknown arm(s) {unknown}; choose from {', '.join(ARMS)}")
    if any(a != "A" for a in arms) and "A" not in arms:
        arms.insert(0, "A")  # B-F start from the seed's baseline: it is always run
    settings["arms"] = sorted(set(arms))
    seeds = settings["seeds"]
    settings["seeds"] = [int(s) for s in (seeds if isinstance(seeds, list) else [seeds])]
    for key in ("baseline_epochs", "finetune_epochs", "image_size"):
        if int(settings[key]) < 1:
            raise BPLError(f"{key} must be at least 1, got {settings[key]}")
    settings["out"] = _relative_to_repo(settings["out"])
    settings["data_root"] = _relative_to_repo(settings["data_root"])
    settings["cache_dir"] = _relative_to_repo(settings["cache_dir"]) or str(
        Path(settings["out"]) / "cache")
    return settings


def run_fields(settings: dict[str, Any], seed: int, arm: Arm, run_dir: Path) -> dict[str, Any]:
    """The bpl Config fields of one run (everything except ``resume``)."""
    fields = dict(settings["common"])
    if arm.command == "train":
        fields.update(settings["baseline"])
        fields["epochs"] = int(settings["baseline_epochs"])
    else:
        fields.update(settings["finetune"])
        fields["epochs"] = int(settings["finetune_epochs"])
        fields["baseline"] = str(run_dir.parent / "A" / "last.pt")
        fields["flops_reduction"] = float(settings["flops_reduction"])
        fields.update(arm.fields)
        if not fields.get("soft"):  # the soft schedule's settings are for the soft arm
            fields = {k: v for k, v in fields.items() if k not in ("soft_every", "soft_partners")}
    fields.update(
        data=settings["data"],
        data_root=settings["data_root"],
        image_size=int(settings["image_size"]),
        arch=settings["arch"],
        seed=int(seed),
        out=str(run_dir),
        cache_dir=settings["cache_dir"],
    )
    return fields


# --------------------------------------------------------------------------- running


def _ledger(out: Path) -> dict[str, float]:
    path = out / "timing.json"
    return json.loads(path.read_text()) if path.exists() else {}


def run_one(settings: dict[str, Any], seed: int, arm: Arm, *, progress: bool,
            fmt: logging.Formatter) -> dict[str, Any]:
    """Run (or resume, or skip if finished) one arm of one seed; returns its metrics."""
    out = Path(settings["out"])
    run_dir = out / f"seed{seed}" / arm.key
    fields = run_fields(settings, seed, arm, run_dir)
    finished = (run_dir / "metrics.json").exists()
    resume = not finished and (run_dir / "last.pt").exists()
    cfg = resolve_command(arm.command, {**fields, "resume": resume})
    check_same_protocol(run_dir, cfg)
    if finished:
        log.info("seed %d arm %s (%s): finished earlier, skipped", seed, arm.key, arm.label)
        return json.loads((run_dir / "metrics.json").read_text())
    if arm.command == "compress":
        base_split = run_dir.parent / "A" / "split.json"
        run_dir.mkdir(parents=True, exist_ok=True)
        if not (run_dir / "split.json").exists():
            shutil.copyfile(base_split, run_dir / "split.json")  # the baseline's test images
    log.info("seed %d arm %s (%s): %s, %d epochs -> %s", seed, arm.key, arm.label,
             "resuming" if resume else "starting", cfg.epochs, run_dir)
    t0 = time.perf_counter()
    with log_to(run_dir / "run.log", fmt):
        job = train_baseline if arm.command == "train" else compress
        metrics = job(cfg, progress=progress)
    if arm.fields.get("partners"):
        saved_partner_stats(run_dir)
    elapsed = time.perf_counter() - t0
    ledger = _ledger(out)
    key = f"seed{seed}/{arm.key}"
    ledger[key] = ledger.get(key, 0.0) + elapsed
    write_json(out / "timing.json", ledger)
    log.info("seed %d arm %s done in %.0f s: top-1 %.2f%%", seed, arm.key, elapsed,
             metrics["final"]["top1"])
    return metrics


def result_row(settings: dict[str, Any], seed: int, arm: Arm,
               metrics: dict[str, Any]) -> dict[str, Any]:
    """One CSV/JSON row: the deployed model of the arm and what it cost to get it."""
    model = metrics["models"]["baseline" if arm.command == "train" else "compressed"]
    history = metrics.get("history") or []
    ledger = _ledger(Path(settings["out"]))
    return {
        "seed": seed,
        "arm": arm.key,
        "label": arm.label,
        "top1": metrics["final"]["top1"],
        "top5": metrics["final"].get("top5"),
        "test_images": metrics["final"].get("samples"),
        "selected_epoch": (metrics.get("selected") or {}).get("epoch", metrics.get("best_epoch")),
        "macs": model["macs"],
        "params": model["params"],
        "latency_ms": model.get("latency_ms"),
        "macs_reduction": metrics.get("macs_reduction", 0.0),
        "epochs": len(history),
        "train_time_s": sum(h.get("epoch_time_s", 0.0) for h in history),
        "wall_time_s": ledger.get(f"seed{seed}/{arm.key}", metrics.get("wall_time_s")),
        "device": (metrics.get("config") or {}).get("device"),  # where the run trained
        "fusion_error": metrics.get("fusion_error"),
        "removal_error": metrics.get("removal_error"),
        "run_dir": str(Path(settings["out"]) / f"seed{seed}" / arm.key),
    }


def time_deployed(settings: dict[str, Any], rows: list[dict[str, Any]],
                  repeats: int = LATENCY_REPEATS) -> None:
    """Time every run's deployed model at batch 1, all interleaved in one pass.

    Each run also timed its model when it finished, but minutes apart and beside
    whatever else the machine did then; timing all of them in turn in one pass makes
    the latencies of different arms comparable. ``latency_ms`` becomes this pass's
    median, ``speedup`` the seed's baseline latency over it; the run's own figure stays
    as ``latency_in_run_ms``.
    """
    models = {}
    for row in rows:
        path = Path(row["run_dir"]) / ("last.pt" if ARMS[row["arm"]].command == "train"
                                       else "deploy.pt")
        if path.is_file():
            models[f"seed{row['seed']}/{row['arm']}"] = load_model(path)[0].eval()
        else:  # e.g. checkpoints deleted to save space: keep the run, without a latency
            log.warning("%s is missing: seed %s arm %s is left out of the latency pass",
                        path, row["seed"], row["arm"])
    size = int(settings["image_size"])
    log.info("timing %d deployed models interleaved (batch 1, %d repeats)", len(models), repeats)
    latency = compare_latency(models, torch.randn(1, 3, size, size), repeats=repeats)
    for row in rows:
        row["latency_in_run_ms"] = row["latency_ms"]
        row["latency_ms"] = latency.get(f"seed{row['seed']}/{row['arm']}")
        baseline = latency.get(f"seed{row['seed']}/A")
        row["speedup"] = baseline / row["latency_ms"] if baseline and row["latency_ms"] else None


# --------------------------------------------------------------------------- aggregation


def _mean_std(values: Sequence[float | None]) -> dict[str, float | int | None]:
    vals = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    if not vals:
        return {"mean": None, "std": None, "n": 0}
    std = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return {"mean": statistics.fmean(vals), "std": std, "n": len(vals)}


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean and sample std per arm; paired top-1 differences within a seed: every arm against
    B (plain pruning), then D and F against C (what the diversity loss and the init change),
    then every arm against A."""
    by_arm: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_arm.setdefault(row["arm"], []).append(row)
    per_arm = {arm: {m: _mean_std([r.get(m) for r in rs]) for m in _METRICS}
               for arm, rs in sorted(by_arm.items())}
    top1 = {(r["seed"], r["arm"]): r["top1"] for r in rows}
    pairs = [(arm, "B") for arm in sorted(by_arm) if arm not in "AB"]
    pairs += [("D", "C"), ("F", "C")]
    pairs += [(arm, "A") for arm in sorted(by_arm) if arm != "A"]
    paired: dict[str, dict[str, Any]] = {}
    for arm, ref in pairs:
        diffs = [top1[(s, arm)] - top1[(s, ref)] for s, a in top1 if a == arm and (s, ref) in top1]
        if diffs:
            paired[f"{arm}-{ref}"] = _mean_std(diffs)
    trained_on: dict[str, list[str]] = {}
    for row in rows:
        trained_on.setdefault(str(row.get("device")), []).append(f"{row['seed']}{row['arm']}")
    return {"per_arm": per_arm, "paired_top1_difference": paired, "trained_on": trained_on}


def _pm(stat: dict[str, Any], fmt: str = "{:.2f}", scale: float = 1.0) -> str:
    if stat["mean"] is None:
        return "-"
    text = fmt.format(stat["mean"] * scale)
    return text + (" ± " + fmt.format(stat["std"] * scale) if stat["n"] > 1 else "")


def summary_markdown(settings: dict[str, Any], summary: dict[str, Any],
                     total_s: float, invocation_s: float) -> str:
    """The per-arm table (mean ± sample std over seeds) and the paired differences."""
    seeds = ", ".join(map(str, settings["seeds"]))
    lines = [
        f"# BPL reproduction: {settings['arch']} on {settings['data']} at "
        f"{settings['image_size']} px",
        "",
        f"Seeds {seeds}; baseline {settings['baseline_epochs']} epochs, every arm B-F "
        f"{settings['finetune_epochs']} epochs; target {100 * settings['flops_reduction']:.2f}% "
        "fewer MACs. Top-1 is the last epoch's on the held-out 20% (not the best epoch). "
        "Mean ± sample std over seeds; MACs at batch 1; CPU latency at batch 1, every "
        f"deployed model timed in turn in one pass (median of {LATENCY_REPEATS}); speedup "
        "is the seed's baseline latency over the arm's.",
        "",
        "| arm | | top-1 (%) | MACs (M) | params (M) | MACs reduction (%) | "
        "CPU latency (ms) | speedup | wall time (s) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    if len(summary["trained_on"]) > 1:  # runs from more than one kind of machine
        where = "; ".join(f"{dev}: {', '.join(runs)}" for dev, runs in summary["trained_on"].items())
        lines[-2:-2] = [f"Trained on more than one device (runs as seed+arm): {where}.", ""]
    for arm, st in summary["per_arm"].items():
        lines.append(
            f"| {arm} | {ARMS[arm].label} | {_pm(st['top1'])} | {_pm(st['macs'], '{:.1f}', 1e-6)} "
            f"| {_pm(st['params'], '{:.2f}', 1e-6)} | {_pm(st['macs_reduction'], '{:.2f}', 100)} "
            f"| {_pm(st['latency_ms'])} | {_pm(st['speedup'])} | {_pm(st['wall_time_s'], '{:.0f}')} |"
        )
    with_partners = {a: st for a, st in summary["per_arm"].items() if st["partner_norm_ratio"]["n"]}
    if with_partners:
        lines += ["", "Partners at the end of training, before fusion (mean over partner blocks): "
                      "norm of the BN-folded partner kernel over the block's, and the cosine of "
                      "the raw kernels.", "",
                  "| arm | partner / block kernel norm | kernel cosine |", "|---|---:|---:|"]
        lines += [f"| {a} | {_pm(st['partner_norm_ratio'], '{:.3f}')} | "
                  f"{_pm(st['partner_kernel_cos'], '{:.3f}')} |" for a, st in with_partners.items()]
    if summary["paired_top1_difference"]:
        lines += ["", "Paired top-1 differences (same seed: same split and baseline), "
                      "percentage points:", "", "| difference | mean ± std | n |", "|---|---:|---:|"]
        for name, st in summary["paired_top1_difference"].items():
            lines.append(f"| {name} | {_pm(st)} | {st['n']} |")
    lines += ["", f"Total time of all runs (summed over invocations): {total_s / 60:.1f} min; "
                  f"this invocation: {invocation_s / 60:.1f} min.", ""]
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], summary: dict[str, Any], path: Path, title: str) -> None:
    """Left: top-1 against MACs, per-seed points and the per-arm mean with std error bars.
    Right: top-1 per arm with each seed's runs joined, since the arms of one seed share
    the split and the baseline and differ less from each other than seeds do."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax_seed) = plt.subplots(1, 2, figsize=(10, 4.2),
                                      gridspec_kw={"width_ratios": [3, 2]})
    arms = list(summary["per_arm"])
    for i, (arm, st) in enumerate(summary["per_arm"].items()):
        color = f"C{i}"
        pts = [r for r in rows if r["arm"] == arm]
        ax.scatter([r["macs"] / 1e6 for r in pts], [r["top1"] for r in pts], s=12, alpha=0.4,
                   color=color)
        ax.errorbar(st["macs"]["mean"] / 1e6, st["top1"]["mean"], yerr=st["top1"]["std"],
                    xerr=st["macs"]["std"] / 1e6, fmt="o", capsize=4, color=color,
                    label=f"{arm}: {ARMS[arm].label}")
        ax_seed.scatter([i] * len(pts), [r["top1"] for r in pts], s=18, color=color, zorder=3)
    for seed in sorted({r["seed"] for r in rows}):
        by_arm = {r["arm"]: r["top1"] for r in rows if r["seed"] == seed}
        xs = [i for i, a in enumerate(arms) if a in by_arm]
        ax_seed.plot(xs, [by_arm[arms[i]] for i in xs], color="0.5", lw=0.8, alpha=0.7)
        if xs:
            ax_seed.annotate(f"seed {seed}", (xs[-1], by_arm[arms[xs[-1]]]), fontsize=7,
                             xytext=(4, 0), textcoords="offset points", va="center")
    ax.set_xlabel("MACs (millions, batch 1)")
    ax.set_ylabel("top-1 (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    ax_seed.set_xticks(range(len(arms)), arms)
    ax_seed.set_xlim(-0.5, len(arms) - 0.2)
    ax_seed.set_xlabel("arm")
    images = {r.get("test_images") for r in rows} - {None}
    one = f" (one test image: {100 / min(images):.2f} points)" if images else ""
    ax_seed.set_title(f"top-1 per seed{one}", fontsize=9)
    ax_seed.grid(alpha=0.3)
    fig.tight_layout()
    atomic_savefig(fig, path, dpi=120)
    plt.close(fig)


def write_results(settings: dict[str, Any], rows: list[dict[str, Any]],
                  invocation_s: float) -> dict[str, Any]:
    """results.json, results.csv, summary.md and accuracy_vs_macs.png in ``settings['out']``."""
    out = Path(settings["out"])
    summary = summarize(rows)
    total_s = sum(r["wall_time_s"] or 0.0 for r in rows)
    results = {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "settings": settings,
        "arms": {k: dataclasses.asdict(a) for k, a in ARMS.items() if k in settings["arms"]},
        "machine": machine(),
        "runs": rows,
        "summary": summary,
        "total_wall_time_s": total_s,
        "invocation_wall_time_s": invocation_s,
    }
    write_json(out / "results.json", results)
    write_csv(out / "results.csv", rows)
    atomic_write_text(out / "summary.md",
                      summary_markdown(settings, summary, total_s, invocation_s))
    title = (f"{settings['arch']} on {settings['data']}, {settings['image_size']} px, "
             f"seeds {settings['seeds']}")
    plot(rows, summary, out / "accuracy_vs_macs.png", title)
    return results


@contextmanager
def _restore_threads(count: int) -> Iterator[None]:
    try:
        yield
    finally:
        torch.set_num_threads(count)


def plan(settings: dict[str, Any]) -> list[dict[str, Any]]:
    """Every run of the reproduction with its resolved bpl Config and state, nothing run."""
    runs = []
    for seed in settings["seeds"]:
        for key in settings["arms"]:
            run_dir = Path(settings["out"]) / f"seed{seed}" / key
            cfg = resolve_command(ARMS[key].command, run_fields(settings, seed, ARMS[key], run_dir))
            state = ("finished" if (run_dir / "metrics.json").exists()
                     else "cut off, will resume" if (run_dir / "last.pt").exists() else "to run")
            runs.append({"seed": seed, "arm": key, "state": state, "config": cfg.to_dict()})
    return runs


def reproduce(settings: dict[str, Any], *, progress: bool = False) -> dict[str, Any]:
    """Run every (seed, arm) not yet finished, then aggregate; returns the results dict."""
    t0 = time.perf_counter()
    out = Path(settings["out"])
    out.mkdir(parents=True, exist_ok=True)
    threads_before = torch.get_num_threads()
    if settings.get("threads"):
        torch.set_num_threads(int(settings["threads"]))
    apply_cpu_bf16(settings.get("cpu_bf16"))
    fmt = logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S")
    with log_to(out / "reproduce.log", fmt), _restore_threads(threads_before):
        log.info("reproduction -> %s; seeds %s, arms %s, %s at %d px, baseline %d / fine-tune %d "
                 "epochs", out, settings["seeds"], "".join(settings["arms"]), settings["arch"],
                 settings["image_size"], settings["baseline_epochs"], settings["finetune_epochs"])
        write_json(out / "settings.json", settings)
        rows = []
        for seed in settings["seeds"]:
            for key in settings["arms"]:
                arm = ARMS[key]
                metrics = run_one(settings, seed, arm, progress=progress, fmt=fmt)
                rows.append(result_row(settings, seed, arm, metrics))
        time_deployed(settings, rows)
        for row in rows:
            if ARMS[row["arm"]].fields.get("partners"):
                row.update(saved_partner_stats(Path(row["run_dir"])))
        invocation_s = time.perf_counter() - t0
        results = write_results(settings, rows, invocation_s)
        log.info("wrote %s, results.csv, summary.md, accuracy_vs_macs.png (this call %.1f min, "
                 "all runs %.1f min)", out / "results.json", invocation_s / 60,
                 results["total_wall_time_s"] / 60)
    return results


def main(argv: Sequence[str] | None = None) -> int:
    """Parse flags, run the reproduction, print the summary table; returns the exit status."""
    args = build_parser().parse_args(argv)
    with console_logging(args.quiet):
        return _main(args)


def _main(args: argparse.Namespace) -> int:
    try:
        settings = resolve_settings(args)
        if args.dry_run:
            print(json.dumps({"settings": settings, "runs": plan(settings)}, indent=1))
            return 0
        progress = sys.stdout.isatty() and sys.stderr.isatty() and not args.quiet
        results = reproduce(settings, progress=progress)
        print((Path(settings["out"]) / "summary.md").read_text())
        return 0 if results["runs"] else 1
    except BPLError as exc:
        print(f"reproduce_ucm: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("reproduce_ucm: interrupted; run the same command again to continue",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
