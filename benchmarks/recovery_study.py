"""Where do partners pay? BPL against plain pruning, distillation and both (issue 14).

For every dataset and seed a baseline is trained once; at every compression level the
arms start from that same baseline, pruned by the same deterministic L2 criterion to the
same model, share its split and its data order, and fine-tune for the same number of
epochs with the same optimiser, so paired differences isolate what an arm changes:

    plain    pruned, fine-tuned with cross-entropy alone
    bpl      pruned, partners + diversity loss (the partner variant the pilot chose), fused
    kd       pruned, cross-entropy + distillation from the unpruned baseline
    bpl+kd   both

Every run keeps the epoch of best validation top-1 (10% of the training split, carved
per class by the seed) and evaluates the test split once, at the end. The **pilot**
runs the partner variants (how partners start, where they go, the diversity weight) at
one compression level on a few seeds and chooses the variant with the best mean paired
*validation* difference against ``plain``; the study's ``bpl`` arms use that variant.
The test split plays no part in any choice.

    python benchmarks/recovery_study.py                 # pilot, then the study (resumable)
    python benchmarks/recovery_study.py --size          # time the arms' steps, estimate the cost
    python benchmarks/recovery_study.py --phase pilot   # the pilot alone
    python benchmarks/recovery_study.py --report        # aggregate what has finished
    python benchmarks/recovery_study.py --smoke         # 1-2 minute end-to-end check

Run directories (checkpoints; large) go to ``out`` (``runs/recovery``); the results
(``results.csv`` with one row per run, ``pilot.csv``, ``summary.md``, ``results.json``,
``accuracy_vs_macs.png``, ``sizing.json``) to ``results`` (``benchmarks/results/recovery``),
with a small ``records/`` entry per finished run. Re-running skips finished runs and
resumes cut-off ones; with the records committed, a later session on a fresh checkout
skips them too. It retrains a baseline only when fine-tuning runs of its seed are still
to come, and keeps that seed's recorded runs only if the retrained weights are identical
(they are paired with the baseline); otherwise it runs them again.
"""

from __future__ import annotations

import argparse
import copy
import csv
import hashlib
import json
import logging
import math
import shutil
import statistics
import sys
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import yaml

from bpl.config import Config, resolve_command
from bpl.distill import Distillation
from bpl.diversity import diversity_loss
from bpl.errors import BPLError
from bpl.extension import extend
from bpl.files import atomic_savefig, atomic_write_text
from bpl.models import build_model
from bpl.pipeline import compress, train_baseline
from bpl.pruning import prune
from bpl.report import write_json
from common import (
    NOT_PROTOCOL,
    apply_cpu_bf16,
    check_same_protocol,
    ci95,
    console_logging,
    log_to,
    machine,
    saved_partner_stats,
    split_counts,
    time_sgd_step,
    write_csv,
)

log = logging.getLogger("recovery_study")

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "recovery_cpu.yaml"

#: Partner variants the pilot compares; every one is hard-pruned with partners.
VARIANTS: dict[str, dict[str, Any]] = {
    "preserve": {"init": "preserve"},
    "split": {"init": "split"},
    "paper": {"init": "paper"},
    "split-all": {"init": "split", "placement": "all"},
    "split-div0.1": {"init": "split", "diversity_weight": 0.1},
}
ARMS = ("plain", "bpl", "kd", "bpl+kd")

DEFAULTS: dict[str, Any] = {
    "out": "runs/recovery",
    "results": "benchmarks/results/recovery",
    "arch": "resnet18",
    "datasets": {},  # name -> {data_root, image_size, train_subset}
    "seeds": [0, 1, 2, 3, 4],
    "reductions": [0.5, 0.74, 0.9, 0.95],
    "baseline_epochs": 30,
    "finetune_epochs": 10,
    "bpl_variant": "auto",  # a VARIANTS key, or auto: the pilot's choice
    "arms": list(ARMS),  # the study's arms (a subset of ARMS); plain is always one of them
    "paired_with": None,  # another study's results folder: report this one against it, run by run
    "baselines_from": None,  # another study's `out`: use its baselines (linked), train none here
    "cpu_bf16": None,  # False: fp32 on every CPU; True: bf16 forced; None: the default (fp32)
    "pilot": {"seeds": [0, 1], "reduction": 0.9, "variants": list(VARIANTS), "datasets": None},
    "threads": None,
    "common": {},  # bpl Config fields of every run
    "baseline": {},  # ... of the baselines
    "finetune": {},  # ... of every fine-tuning arm
}
SMOKE: dict[str, Any] = {
    "seeds": [0],
    "reductions": [0.5, 0.9],
    "baseline_epochs": 1,
    "finetune_epochs": 1,
    "pilot": {"seeds": [0], "reduction": 0.9, "variants": ["preserve", "split"], "datasets": None},
    "out": "runs/recovery_smoke",
    "results": "runs/recovery_smoke/results",
}
#: Fields the script sets per run; a config section may not set them.
_OWNED = {"data", "data_root", "image_size", "train_subset", "arch", "seed", "out", "epochs",
          "flops_reduction", "baseline", "resume", "soft", "partners", "distill"}


# --------------------------------------------------------------------------- settings


def _repo_path(path: str | None) -> str | None:
    if path is None or Path(path).is_absolute():
        return path
    return str(REPO / path)


def load_settings(path: str | Path | None, smoke: bool = False,
                  overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Defaults < the YAML file < --smoke < flags; paths made absolute, sections checked."""
    settings = copy.deepcopy(DEFAULTS)
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise BPLError(f"settings file not found: {path}")
        raw = yaml.safe_load(path.read_text()) or {}
        unknown = sorted(set(raw) - set(DEFAULTS))
        if unknown:
            raise BPLError(f"unknown setting(s) in {path}: {', '.join(unknown)}")
        settings.update(raw)
    if smoke:
        settings.update(copy.deepcopy(SMOKE))
    settings.update(overrides or {})
    fields = set(Config.__dataclass_fields__)
    for section in ("common", "baseline", "finetune"):
        bad = sorted(set(settings[section]) - fields)
        owned = sorted(set(settings[section]) & _OWNED)
        if bad or owned:
            raise BPLError(f"{section}: {', '.join(bad + owned)} cannot be set there")
    if not settings["datasets"]:
        raise BPLError("no datasets: give `datasets: {name: {data_root: ..., image_size: ...}}`")
    pilot = settings["pilot"]
    pilot["datasets"] = pilot.get("datasets") or list(settings["datasets"])
    unknown = sorted(set(pilot["variants"]) - set(VARIANTS))
    if unknown or (settings["bpl_variant"] not in VARIANTS and settings["bpl_variant"] != "auto"):
        raise BPLError(f"unknown partner variant(s) {unknown or settings['bpl_variant']}; "
                       f"choose from {', '.join(VARIANTS)}")
    arms = settings["arms"]
    if not arms or set(arms) - set(ARMS) or "plain" not in arms:
        raise BPLError(f"arms must be some of {', '.join(ARMS)}, plain among them (every arm is "
                       f"compared with it), got {arms}")
    for spec in settings["datasets"].values():
        spec["data_root"] = _repo_path(spec.get("data_root"))
    settings["out"] = _repo_path(settings["out"])
    settings["results"] = _repo_path(settings["results"])
    settings["paired_with"] = _repo_path(settings["paired_with"])
    settings["baselines_from"] = _repo_path(settings["baselines_from"])
    return settings


def _pct(r: float) -> str:
    return f"r{round(100 * r)}"


def run_dir(settings: dict[str, Any], dataset: str, seed: int, name: str,
            reduction: float | None = None) -> Path:
    """``<out>/<dataset>/seed<k>/baseline`` or ``.../r<percent>/<arm name>``."""
    base = Path(settings["out"]) / dataset / f"seed{seed}"
    return base / "baseline" if reduction is None else base / _pct(reduction) / name


def arm_fields(settings: dict[str, Any], arm: str, variant: str) -> tuple[str, dict[str, Any]]:
    """The run name and Config fields of an arm (``bpl`` arms with their partner variant)."""
    if arm in ("plain", "kd"):
        return arm, {"partners": False, "distill": arm == "kd"}
    fields = {"partners": True, "distill": arm.endswith("+kd"), **VARIANTS[variant]}
    return f"bpl-{variant}" + ("+kd" if arm.endswith("+kd") else ""), fields


def run_config(settings: dict[str, Any], dataset: str, seed: int,
               reduction: float | None = None, fields: dict[str, Any] | None = None,
               name: str = "baseline") -> Config:
    """The resolved bpl Config of one run (baseline when ``reduction`` is None)."""
    spec = settings["datasets"][dataset]
    values = dict(settings["common"])
    out = run_dir(settings, dataset, seed, name, reduction)
    if reduction is None:
        values.update(settings["baseline"], epochs=int(settings["baseline_epochs"]))
    else:
        values.update(settings["finetune"], epochs=int(settings["finetune_epochs"]),
                      flops_reduction=float(reduction), soft=False,
                      baseline=str(run_dir(settings, dataset, seed, "baseline") / "best.pt"))
        values.update(fields or {})
    values.update(data=dataset, data_root=spec.get("data_root"), image_size=int(spec["image_size"]),
                  train_subset=spec.get("train_subset"), arch=settings["arch"], seed=int(seed),
                  out=str(out), cache_dir=str(Path(settings["out"]) / "cache"))
    return resolve_command("train" if reduction is None else "compress", values)


# --------------------------------------------------------------------------- running


def record_path(settings: dict[str, Any], cfg: Config) -> Path:
    """Where the committed record of a run lives: ``<results>/records/<dataset>__seed<k>__...``."""
    rel = Path(cfg.out).relative_to(settings["out"])
    return Path(settings["results"]) / "records" / ("__".join(rel.parts) + ".json")


def _state_sha256(path: Path) -> str:
    """A fingerprint of the weights in a checkpoint (every tensor, in key order)."""
    state = torch.load(path, map_location="cpu", weights_only=False)
    state = state.get("state_dict", state)
    digest = hashlib.sha256()
    for key in sorted(state):
        digest.update(key.encode())
        digest.update(state[key].detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _protocol(cfg: Config) -> dict[str, Any]:
    """The settings that decide a run's numbers (a baseline's: none of compress's own)."""
    command = "compress" if cfg.baseline else "train"
    return {k: v for k, v in cfg.to_dict(command).items() if k not in NOT_PROTOCOL}


def write_record(settings: dict[str, Any], cfg: Config) -> dict[str, Any]:
    """Keep what the results need of a finished run (small JSON, committed with the results)
    so a later session can skip it without its checkpoints; a baseline also keeps a
    fingerprint of its weights, so a retrained baseline can be checked for sameness."""
    out = Path(cfg.out)
    timing = out / "timing.json"
    record: dict[str, Any] = {
        "config": _protocol(cfg),
        "metrics": json.loads((out / "metrics.json").read_text()),
        "wall_time_s": json.loads(timing.read_text())["wall_time_s"] if timing.exists() else None,
    }
    if cfg.partners and cfg.baseline and (out / "last.pt").exists():
        record["partner_stats"] = saved_partner_stats(out)
    if not cfg.baseline:
        record["state_sha256"] = _state_sha256(out / "best.pt")
    atomic_write_text(record_path(settings, cfg), json.dumps(record, separators=(",", ":")) + "\n")
    return record


def load_record(settings: dict[str, Any], cfg: Config) -> dict[str, Any] | None:
    """The record of a finished run (its run directory, else the committed record), or None."""
    out, path = Path(cfg.out), record_path(settings, cfg)
    if (out / "metrics.json").exists():
        check_same_protocol(out, cfg)
        return json.loads(path.read_text()) if path.exists() else write_record(settings, cfg)
    if not path.exists():
        return None
    record = json.loads(path.read_text())
    diff = sorted(k for k, v in _protocol(cfg).items()
                  if k in record["config"] and record["config"][k] != v)
    if diff:
        raise BPLError(f"{path} was run with other settings ({', '.join(diff[:5])}); move the "
                       "records folder away or pass another results folder")
    return record


def run(settings: dict[str, Any], cfg: Config, *, fmt: logging.Formatter, progress: bool,
        need_checkpoint: bool = False) -> dict[str, Any]:
    """Run (or resume, or read back) one bpl job; returns its record.

    A run with a record is not run again, unless it is a baseline whose checkpoint is
    gone and ``need_checkpoint`` (fine-tuning runs of its seed are still to come): then it
    is retrained, and :func:`study` checks the new weights against the record.
    """
    out = Path(cfg.out)
    record = load_record(settings, cfg)
    if record is not None and not (need_checkpoint and not (out / "best.pt").exists()):
        return record
    cfg.resume = (out / "last.pt").exists()
    check_same_protocol(out, cfg)
    if cfg.baseline:  # the fine-tuning runs of a seed share the baseline's split
        out.mkdir(parents=True, exist_ok=True)
        if not (out / "split.json").exists():
            shutil.copyfile(Path(cfg.baseline).parent / "split.json", out / "split.json")
    log.info("%s: %s, %d epochs", out, "resuming" if cfg.resume else "starting", cfg.epochs)
    t0 = time.perf_counter()
    with log_to(out / "run.log", fmt):
        metrics = (compress if cfg.baseline else train_baseline)(cfg, progress=progress)
    elapsed = time.perf_counter() - t0
    timing = out / "timing.json"  # wall time summed over invocations (a resumed run)
    spent = json.loads(timing.read_text())["wall_time_s"] if timing.exists() else 0.0
    write_json(timing, {"wall_time_s": spent + elapsed})
    log.info("%s done in %.0f s: validation top-1 %.2f%%", out, elapsed,
             metrics["selected"].get("val_top1", math.nan))
    fresh = write_record(settings, cfg)
    if record is not None and record.get("state_sha256") != fresh.get("state_sha256"):
        fresh["retrained_differs"] = True
    return fresh


def row(settings: dict[str, Any], cfg: Config, arm: str, record: dict[str, Any],
        base: dict[str, Any]) -> dict[str, Any]:
    """One results row: the deployed model of a run, how it was chosen, what it cost."""
    metrics, base_metrics = record["metrics"], base["metrics"]
    history = metrics.get("history") or []
    r = {
        "dataset": cfg.data,
        "seed": cfg.seed,
        "arm": arm,
        "flops_reduction": cfg.flops_reduction,
        "macs": metrics["models"]["compressed"]["macs"],
        "val_top1": metrics["selected"].get("val_top1"),
        "test_top1": metrics["final"]["top1"],
        "variant": Path(cfg.out).name,
        "macs_reduction": metrics["macs_reduction"],
        "params": metrics["models"]["compressed"]["params"],
        "baseline_macs": metrics["models"]["baseline"]["macs"],
        "baseline_val_top1": base_metrics["selected"].get("val_top1"),
        "baseline_test_top1": base_metrics["final"]["top1"],
        "test_images": metrics["final"]["samples"],
        "selected_epoch": metrics["selected"]["epoch"],
        "epochs": len(history),
        "train_time_s": sum(h.get("epoch_time_s", 0.0) for h in history),
        "wall_time_s": record.get("wall_time_s"),
        "distill_ms_per_step": statistics.fmean([h["distill_ms_per_step"] for h in history])
        if history and "distill_ms_per_step" in history[0] else None,
        "fusion_error": metrics.get("fusion_error"),
        "precision": ((metrics.get("precision") or [{}])[-1]).get("autocast"),
        "image_size": cfg.image_size,
        "run_dir": str(Path(cfg.out).relative_to(settings["out"])),
    }
    r.update(record.get("partner_stats") or {})
    return r


def _paired(rows: list[dict[str, Any]], key: str, arm: str, ref: str) -> list[float]:
    by = {(r["dataset"], r["seed"], r["flops_reduction"], r["arm"]): r[key] for r in rows}
    return [v - by[(d, s, f, ref)] for (d, s, f, a), v in by.items()
            if a == arm and (d, s, f, ref) in by and v is not None and by[(d, s, f, ref)] is not None]


def choose_variant(pilot_rows: list[dict[str, Any]], variants: list[str]) -> dict[str, Any]:
    """The variant with the best mean paired validation difference against plain."""
    scores = {}
    for v in variants:
        rows = [dict(r, arm="plain" if r["variant"] == "plain" else r["variant"])
                for r in pilot_rows]
        scores[v] = ci95(_paired(rows, "val_top1", f"bpl-{v}", "plain"))
    ranked = sorted((v for v in variants if scores[v]["n"]), key=lambda v: -scores[v]["mean"])
    if not ranked:
        raise BPLError("the pilot has no finished runs to choose a partner variant from")
    return {"variant": ranked[0], "val_difference_vs_plain": scores}


def _pilot_runs(settings: dict[str, Any], dataset: str, seed: int) -> list[tuple[str, Config]]:
    p = settings["pilot"]
    runs = []
    for name in ["plain"] + [f"bpl-{v}" for v in p["variants"]]:
        fields = {"partners": False} if name == "plain" else {"partners": True, **VARIANTS[name[4:]]}
        runs.append((name, run_config(settings, dataset, seed, p["reduction"], fields, name)))
    return runs


def _study_runs(settings: dict[str, Any], variant: str, dataset: str,
                seed: int) -> list[tuple[str, Config]]:
    runs = []
    for reduction in settings["reductions"]:
        for arm in settings["arms"]:
            name, fields = arm_fields(settings, arm, variant)
            runs.append((arm, run_config(settings, dataset, seed, reduction, fields, name)))
    return runs


def _run_seed(settings: dict[str, Any], dataset: str, seed: int,
              runs: list[tuple[str, Config]], *, fmt: logging.Formatter,
              progress: bool) -> list[dict[str, Any]]:
    """The baseline of one seed, then its fine-tuning runs, paired with that baseline.

    When the baseline has to be retrained (a new session has its record but not its
    checkpoint) and the retrained weights differ from the recorded ones, the seed's
    recorded fine-tuning runs no longer pair with it: they are discarded and run again.
    """
    todo = [cfg for _, cfg in runs if load_record(settings, cfg) is None]
    if settings.get("baselines_from") and todo:  # a fully recorded seed needs no weights
        _link_baseline(settings, dataset, seed)
    base = run(settings, run_config(settings, dataset, seed), fmt=fmt, progress=progress,
               need_checkpoint=bool(todo))
    if base.get("retrained_differs"):
        log.warning("%s seed %d: the retrained baseline differs from the recorded one; its "
                    "fine-tuning runs are run again against it", dataset, seed)
        for _, cfg in runs:
            record_path(settings, cfg).unlink(missing_ok=True)
    return [row(settings, cfg, name, run(settings, cfg, fmt=fmt, progress=progress), base)
            for name, cfg in runs]


def _link_baseline(settings: dict[str, Any], dataset: str, seed: int) -> None:
    """Link the other study's finished baseline of (dataset, seed) into this one's ``out``, so
    both fine-tune from the same weights; refuse to go on without it (it is not trained here,
    where it would be written into the other study's folder)."""
    theirs = Path(settings["baselines_from"]) / dataset / f"seed{seed}" / "baseline"
    mine = run_dir(settings, dataset, seed, "baseline")
    if not (theirs / "metrics.json").exists():
        raise BPLError(f"baselines_from: {theirs} has no finished baseline; run that study "
                       f"for seed {seed} first")
    if not mine.exists():
        mine.parent.mkdir(parents=True, exist_ok=True)
        mine.symlink_to(theirs.resolve(), target_is_directory=True)


def pilot(settings: dict[str, Any], *, fmt: logging.Formatter,
          progress: bool) -> list[dict[str, Any]]:
    """Every partner variant and plain at the pilot's reduction, on the pilot's seeds."""
    p = settings["pilot"]
    return [r for dataset in p["datasets"] for seed in p["seeds"]
            for r in _run_seed(settings, dataset, seed, _pilot_runs(settings, dataset, seed),
                               fmt=fmt, progress=progress)]


def study(settings: dict[str, Any], variant: str, datasets: list[str], *,
          fmt: logging.Formatter, progress: bool) -> list[dict[str, Any]]:
    """Every (dataset, seed, reduction, arm); seeds outermost, so a cut-off study is balanced."""
    return [r for seed in settings["seeds"] for dataset in datasets
            for r in _run_seed(settings, dataset, seed,
                               _study_runs(settings, variant, dataset, seed),
                               fmt=fmt, progress=progress)]


def finished_rows(settings: dict[str, Any], variant: str | None) -> tuple[list, list]:
    """(study rows, pilot rows) of every run that has finished, without running anything.

    There are pilot rows only when the settings choose the variant by pilot
    (``bpl_variant: auto``); with a fixed variant no pilot ran, and the study's own runs
    at the pilot's reduction must not be reported as one."""
    study_rows, pilot_rows = [], []
    p = settings["pilot"]
    piloted = settings["bpl_variant"] == "auto"
    for dataset in settings["datasets"]:
        for seed in sorted(set(settings["seeds"]) | (set(p["seeds"]) if piloted else set())):
            base = load_record(settings, run_config(settings, dataset, seed))
            if base is None:
                continue
            groups = []
            if piloted and dataset in p["datasets"] and seed in p["seeds"]:
                groups.append((pilot_rows, _pilot_runs(settings, dataset, seed)))
            if variant is not None and seed in settings["seeds"]:
                groups.append((study_rows, _study_runs(settings, variant, dataset, seed)))
            for rows, runs in groups:
                for name, cfg in runs:
                    record = load_record(settings, cfg)
                    if record is not None:
                        rows.append(row(settings, cfg, name, record, base))
    return study_rows, pilot_rows


# --------------------------------------------------------------------------- sizing


def size(settings: dict[str, Any], steps: int = 3) -> dict[str, Any]:
    """Time one training step of every arm at every reduction, and estimate the protocol's cost.

    Steps on random images of the dataset's size at the configured batch; the estimate
    is steps x images / batch x epochs, plus one forward pass per validation image per
    epoch (a third of a step) and one over the test split; data loading is not counted.
    """
    batch = int(settings["common"].get("batch_size", 64))
    variant = settings["bpl_variant"] if settings["bpl_variant"] != "auto" else "split"
    result: dict[str, Any] = {"batch_size": batch, "variant_timed": variant, "datasets": {},
                              "machine": machine(),
                              "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    for dataset, spec in settings["datasets"].items():
        s = int(spec["image_size"])
        counts = _split_counts(settings, dataset)
        x, y = torch.randn(batch, 3, s, s), torch.randint(0, counts["classes"], (batch,))
        base = build_model(settings["arch"], counts["classes"])
        times = {"baseline": time_sgd_step(base, x, y, [], steps)}
        kd = Distillation(base)
        for r in settings["reductions"]:
            pruned = prune(base, x[:1], flops_reduction=r)
            student = extend(pruned, init=VARIANTS[variant]["init"],
                             placement=VARIANTS[variant].get("placement", "paper"))

            def div(step, _m=student):
                return diversity_loss(_m)

            times[f"{_pct(r)}/plain"] = time_sgd_step(pruned, x, y, [], steps)
            times[f"{_pct(r)}/bpl"] = time_sgd_step(student, x, y, [div], steps)
            times[f"{_pct(r)}/kd"] = time_sgd_step(pruned, x, y, [kd], steps)
            times[f"{_pct(r)}/bpl+kd"] = time_sgd_step(student, x, y, [div, kd], steps)
        per_epoch = {k: v * counts["train"] / batch
                     + v / 3 * counts["val"] / batch for k, v in times.items()}
        finetune = sum(v for k, v in per_epoch.items() if k != "baseline")
        seed_s = (per_epoch["baseline"] * settings["baseline_epochs"]
                  + finetune * settings["finetune_epochs"])
        pilot_s = (per_epoch[f"{_pct(settings['pilot']['reduction'])}/plain"]
                   + per_epoch[f"{_pct(settings['pilot']['reduction'])}/bpl"]
                   * len(settings["pilot"]["variants"])) * settings["finetune_epochs"]
        result["datasets"][dataset] = {
            "image_size": s, **counts, "step_s": times, "epoch_s": per_epoch,
            "estimate_s": {"per_seed": seed_s, "study": seed_s * len(settings["seeds"]),
                           "pilot_extra_per_seed": pilot_s},
        }
        log.info("%s: %s", dataset, json.dumps(result["datasets"][dataset]["estimate_s"]))
    return result


def _split_counts(settings: dict[str, Any], dataset: str) -> dict[str, int]:
    """Image counts of the seed-0 split (scans the folder; decodes nothing)."""
    cfg = run_config(settings, dataset, 0)
    return split_counts(cfg.data, settings["datasets"][dataset]["data_root"], 0, cfg.train_ratio,
                        cfg.val_ratio, cfg.train_subset)


# --------------------------------------------------------------------------- reporting


def _fmt(st: dict[str, Any], digits: int = 2) -> str:
    if not st["n"]:
        return "-"
    text = f"{st['mean']:+.{digits}f}" if st.get("signed") else f"{st['mean']:.{digits}f}"
    return text + (f" ± {st['ci95']:.{digits}f}" if st["ci95"] is not None else "") + f" ({st['n']})"


def summarize(rows: list[dict[str, Any]], pilot_rows: list[dict[str, Any]],
              choice: dict[str, Any] | None) -> dict[str, Any]:
    """Per (dataset, reduction, arm): test and val top-1; paired differences against plain."""
    out: dict[str, Any] = {"study": {}, "pilot": {}}
    for d in sorted({r["dataset"] for r in rows}):
        for f in sorted({r["flops_reduction"] for r in rows if r["dataset"] == d}):
            sub = [r for r in rows if r["dataset"] == d and r["flops_reduction"] == f]
            cell = {}
            for arm in ARMS:
                mine = [r for r in sub if r["arm"] == arm]
                if not mine:
                    continue
                cell[arm] = {
                    "test_top1": ci95([r["test_top1"] for r in mine]),
                    "val_top1": ci95([r["val_top1"] for r in mine]),
                    "macs": ci95([r["macs"] for r in mine]),
                    "test_vs_plain": ci95(_paired(sub, "test_top1", arm, "plain"))
                    if arm != "plain" else None,
                    "test_vs_baseline": ci95([r["test_top1"] - r["baseline_test_top1"]
                                              for r in mine]),
                }
                if arm == "bpl+kd":
                    cell[arm]["test_vs_kd"] = ci95(_paired(sub, "test_top1", "bpl+kd", "kd"))
            out["study"][f"{d}/{_pct(f)}"] = cell
    for d in sorted({r["dataset"] for r in pilot_rows}):
        sub = [dict(r, arm=r["variant"]) for r in pilot_rows if r["dataset"] == d]
        out["pilot"][d] = {
            r_name: {"val_top1": ci95([r["val_top1"] for r in sub if r["arm"] == r_name]),
                     "val_vs_plain": ci95(_paired(sub, "val_top1", r_name, "plain"))
                     if r_name != "plain" else None}
            for r_name in sorted({r["arm"] for r in sub}, key=lambda n: (n != "plain", n))
        }
    out["choice"] = choice
    return out


def against_other(rows: list[dict[str, Any]], other: list[dict[str, Any]]) -> dict[str, Any]:
    """Per (dataset, reduction, arm): this study's run minus the other study's run of the same
    dataset, seed, reduction and arm (the same baseline and pruned model when the two share
    their baselines), test and validation top-1."""
    theirs = {(r["dataset"], int(r["seed"]), float(r["flops_reduction"]), r["arm"]): r
              for r in other}
    out: dict[str, Any] = {}
    for r in rows:
        mine = theirs.get((r["dataset"], int(r["seed"]), float(r["flops_reduction"]), r["arm"]))
        if mine is None:
            continue
        cell = out.setdefault(f"{r['dataset']}/{_pct(r['flops_reduction'])}/{r['arm']}",
                              {"test_top1": [], "val_top1": []})
        for key in cell:
            cell[key].append(float(r[key]) - float(mine[key]))
    return {k: {key: ci95(v) for key, v in cell.items()} for k, cell in out.items()}


def _against_lines(settings: dict[str, Any], against: dict[str, Any]) -> list[str]:
    other = Path(settings["paired_with"])
    where = other.relative_to(REPO) if other.is_relative_to(REPO) else other
    lines = [f"## Against `{where}`, run by run", "",
             "This study's run minus that study's run of the same dataset, seed, reduction "
             "and arm, in points (both runs keep their validation-chosen epoch).", "",
             "| dataset | fewer MACs | arm | test top-1 | val top-1 |", "|---|---:|---|---:|---:|"]
    for key, st in against.items():
        d, r, arm = key.split("/")
        lines.append(f"| {d} | {r[1:]}% | {arm} | {_fmt(dict(st['test_top1'], signed=True))} "
                     f"| {_fmt(dict(st['val_top1'], signed=True))} |")
    return lines + [""]


def markdown(settings: dict[str, Any], summary: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    lines = [f"# Recovery study: {settings['arch']}, {', '.join(settings['datasets'])}", "",
             "Mean over seeds ± half-width of the 95% confidence interval (t distribution), "
             "number of seeds in brackets. Paired differences are within a seed (same split, "
             "baseline, pruned model and data order), in percentage points; an interval that "
             "includes 0 is no measured difference. Test top-1 of the epoch chosen on the "
             "validation split; the test split was evaluated once per run.", ""]
    for key, cell in summary["study"].items():
        d, r = key.split("/")
        lines += [f"## {d}, {r[1:]}% fewer MACs", "",
                  "| arm | test top-1 | vs plain | vs baseline | val top-1 | MACs (M) |",
                  "|---|---:|---:|---:|---:|---:|"]
        for arm, st in cell.items():
            vs = st["test_vs_plain"]
            lines.append(f"| {arm} | {_fmt(st['test_top1'])} | "
                         f"{_fmt(dict(vs, signed=True)) if vs else '—'} | "
                         f"{_fmt(dict(st['test_vs_baseline'], signed=True))} | "
                         f"{_fmt(st['val_top1'])} | {st['macs']['mean'] / 1e6:.1f} |")
        if "bpl+kd" in cell and cell["bpl+kd"].get("test_vs_kd", {}).get("n"):
            lines.append(f"\nbpl+kd − kd: {_fmt(dict(cell['bpl+kd']['test_vs_kd'], signed=True))}")
        lines.append("")
    if summary["pilot"]:
        p = settings["pilot"]
        lines += ["## Pilot: which partner variant (validation split only)", "",
                  f"{round(100 * p['reduction'])}% fewer MACs, seeds {p['seeds']}, "
                  f"{settings['finetune_epochs']} epochs; validation top-1 of the kept epoch.", ""]
        for d, cell in summary["pilot"].items():
            lines += [f"{d}:", "", "| variant | val top-1 | vs plain |", "|---|---:|---:|"]
            for name, st in cell.items():
                vs = st["val_vs_plain"]
                lines.append(f"| {name} | {_fmt(st['val_top1'])} | "
                             f"{_fmt(dict(vs, signed=True)) if vs else '—'} |")
            lines.append("")
        if summary.get("choice"):
            lines.append(f"Chosen for the study's bpl arms: **{summary['choice']['variant']}** "
                         "(best mean paired validation difference against plain, all pilot "
                         "datasets and seeds together).")
    if summary.get("against"):
        lines += [""] + _against_lines(settings, summary["against"])
    lines += ["", f"{len(rows)} study runs.", ""]
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Top-1 against MACs, one panel per dataset, one curve per arm (95% CI), baseline line;
    below, each arm's paired difference against plain with its interval."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = sorted({r["dataset"] for r in rows})
    if not datasets:
        return
    fig, axes = plt.subplots(2, len(datasets), figsize=(5.5 * len(datasets), 7.5),
                             squeeze=False, gridspec_kw={"height_ratios": [3, 2]})
    for j, d in enumerate(datasets):
        ax, axd = axes[0][j], axes[1][j]
        sub = [r for r in rows if r["dataset"] == d]
        reductions = sorted({r["flops_reduction"] for r in sub})
        for i, arm in enumerate(ARMS):
            pts = [(f, [r for r in sub if r["arm"] == arm and r["flops_reduction"] == f])
                   for f in reductions]
            pts = [(f, rs) for f, rs in pts if rs]
            if not pts:
                continue
            st = [ci95([r["test_top1"] for r in rs]) for _, rs in pts]
            macs = [statistics.fmean(r["macs"] for r in rs) / 1e6 for _, rs in pts]
            ax.errorbar(macs, [s["mean"] for s in st], yerr=[s["ci95"] or 0 for s in st],
                        marker="o", capsize=3, color=f"C{i}", label=arm)
            if arm != "plain":
                diffs = [ci95(_paired([r for r in sub if r["flops_reduction"] == f],
                                      "test_top1", arm, "plain")) for f, _ in pts]
                xs = [100 * f + (i - 2) * 0.6 for f, _ in pts]
                axd.errorbar(xs, [s["mean"] for s in diffs], yerr=[s["ci95"] or 0 for s in diffs],
                             marker="o", capsize=3, ls="none", color=f"C{i}", label=f"{arm} − plain")
        base = statistics.fmean(r["baseline_test_top1"] for r in sub)
        ax.axhline(base, color="0.4", ls="--", lw=1, label=f"unpruned baseline ({base:.1f}%)")
        n_seeds = len({r["seed"] for r in sub})
        ax.set_title(f"{d}: test top-1 vs MACs ({n_seeds} seeds, 95% CI)")
        ax.set_xlabel("MACs (millions, one image)")
        ax.set_ylabel("test top-1 (%)")
        ax.set_ylim(top=min(100, ax.get_ylim()[1]))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        axd.axhline(0, color="0.4", lw=1)
        ticks = [100 * f for f in reductions]  # the arms sit side by side around each tick
        axd.set_xticks(ticks, [f"{t:.0f}" for t in ticks])
        axd.set_xlim(min(ticks) - 4, max(ticks) + 4)
        axd.set_title(f"{d}: paired difference against plain pruning")
        axd.set_xlabel("MACs removed (%)")
        axd.set_ylabel("test top-1 difference (points)")
        axd.grid(alpha=0.3)
        if axd.get_legend_handles_labels()[0]:  # no paired arm: nothing to label
            axd.legend(fontsize=8)
    fig.tight_layout()
    atomic_savefig(fig, path, dpi=120)
    plt.close(fig)


def write_results(settings: dict[str, Any], rows: list[dict[str, Any]],
                  pilot_rows: list[dict[str, Any]], choice: dict[str, Any] | None) -> None:
    other = Path(settings["paired_with"]) / "results.csv" if settings.get("paired_with") else None
    if other is not None and not other.is_file():  # checked before any file is written
        raise BPLError(f"paired_with: {other} not found; run that study's --report first")
    res = Path(settings["results"])
    res.mkdir(parents=True, exist_ok=True)
    for name, rs in (("results.csv", rows), ("pilot.csv", pilot_rows)):
        if not rs:
            (res / name).unlink(missing_ok=True)  # never a stale file beside fresh results
            continue
        write_csv(res / name, rs)
    summary = summarize(rows, pilot_rows, choice)
    if other is not None:
        with other.open(newline="") as fh:
            summary["against"] = against_other(rows, list(csv.DictReader(fh)))
    write_json(res / "results.json", {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "settings": settings, "machine": machine(), "summary": summary,
        "runs": rows, "pilot_runs": pilot_rows,
    })
    atomic_write_text(res / "summary.md", markdown(settings, summary, rows))
    if rows:
        plot(rows, res / "accuracy_vs_macs.png")


# --------------------------------------------------------------------------- entry point


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(DEFAULT_CONFIG), metavar="FILE")
    p.add_argument("--smoke", action="store_true", help="tiny end-to-end check")
    p.add_argument("--phase", choices=["all", "pilot", "study"], default="all")
    p.add_argument("--datasets", nargs="+", help="study only these datasets")
    p.add_argument("--seeds", nargs="+", type=int, help="study only these seeds")
    p.add_argument("--size", action="store_true", help="time the arms and estimate the cost")
    p.add_argument("--report", action="store_true", help="aggregate finished runs, run nothing")
    p.add_argument("--device", help="every run's device (cpu, cuda); not part of the protocol")
    p.add_argument("--threads", type=int,
                   help="torch CPU threads (default: all); 1 while other jobs share the cores")
    p.add_argument("--quiet", action="store_true")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with console_logging(args.quiet):
        return _main(args)


def _main(args: argparse.Namespace) -> int:
    try:
        overrides: dict[str, Any] = {}
        if args.seeds:
            overrides["seeds"] = args.seeds
        if args.threads:
            overrides["threads"] = args.threads
        settings = load_settings(args.config, args.smoke, overrides)
        if args.device:
            settings["common"]["device"] = args.device
        if settings.get("threads"):
            torch.set_num_threads(int(settings["threads"]))
        apply_cpu_bf16(settings.get("cpu_bf16"))
        res = Path(settings["results"])
        res.mkdir(parents=True, exist_ok=True)
        if args.size:
            write_json(res / "sizing.json", size(settings))
            print((res / "sizing.json").read_text())
            return 0
        fmt = logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S")
        progress = sys.stderr.isatty() and not args.quiet
        variant = settings["bpl_variant"]
        with log_to(Path(settings["out"]) / "study.log", fmt):
            if not args.report and args.phase in ("all", "pilot") and variant == "auto":
                pilot(settings, fmt=fmt, progress=progress)
            _, pilot_rows = finished_rows(settings, None)
            choice = None
            if variant == "auto" and pilot_rows:
                choice = choose_variant(pilot_rows, settings["pilot"]["variants"])
                variant = choice["variant"]
                log.info("pilot chose partner variant %s", variant)
            if not args.report and args.phase in ("all", "study"):
                if variant == "auto":
                    raise BPLError("bpl_variant is auto but the pilot has not run: run "
                                   "--phase pilot first, or set bpl_variant")
                datasets = args.datasets or list(settings["datasets"])
                study(settings, variant, datasets, fmt=fmt, progress=progress)
            rows, pilot_rows = finished_rows(settings, None if variant == "auto" else variant)
            write_results(settings, rows, pilot_rows, choice)
        print((res / "summary.md").read_text())
        return 0
    except BPLError as exc:
        print(f"recovery_study: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("recovery_study: interrupted; run the same command again to continue",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
