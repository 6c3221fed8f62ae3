"""The main jobs, as Python functions: train a baseline, compress it with BPL, the demo.

Each writes one run directory: ``config.json``, ``split.json``, ``last.pt`` (resumable),
``best.pt``, ``log.csv``, ``metrics.json``, ``report.md`` with plots and, for
``compress``, ``deploy.pt`` (the fused, physically smaller model). The CLI is a thin
layer over these.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import shutil
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import distributed
from .config import PLACEMENTS, Config, run_dir_of
from .data import load_dataset
from .data.cache import DEFAULT_BUDGET
from .distill import Distillation
from .diversity import diversity_loss
from .engine import (
    FitResult,
    LossTerm,
    TrainSettings,
    evaluate,
    fit,
    make_loader,
    seed_everything,
    select_device,
)
from .errors import BPLError, CheckpointError, CorruptImageError
from .exporting import CALIBRATION_IMAGES, INT8_MAX_DROP, MIN_CALIBRATION_IMAGES
from .extension import extend, partner_blocks
from .files import BusyError, atomic_save, exclusive_lock
from .fusion import fuse
from .models import (
    baseline_from_weights,
    build_model,
    load_checkpoint,
    load_model,
    model_from_payload,
    model_payload,
    read_state_dict,
    reinitialize,
    save_model,
)
from .profiling import profile
from .pruning import (
    LEVELS,
    BudgetStep,
    PruneReport,
    SoftPruner,
    prune,
    prune_within,
    step_levels,
)
from .report import write_budget_curve, write_json, write_report
from .verification import verify

__all__ = [
    "compress",
    "demo",
    "evaluate_checkpoint",
    "export_checkpoint",
    "load_data",
    "prepare_run_dir",
    "run_dir_of",
    "profile_checkpoints",
    "train_baseline",
]

log = logging.getLogger(__name__)


def _has_progress(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds training worth resuming: a last.pt, or a budgeted search's steps."""
    return (run_dir / "last.pt").exists() or any((run_dir / "steps").glob("*/last.pt"))


#: What a run that ended before its first epoch may have left; a new run into its
#: directory starts without them (its split.json would otherwise be reused silently).
_STALE = ("split.json", "log.csv", "after_pruning.json", "metrics.json", "report.md")
#: The lock a run holds on its directory while it runs (see :func:`bpl.files.exclusive_lock`).
LOCK_FILE = ".bpl.lock"


def prepare_run_dir(cfg: Config, command: str) -> Path:
    """Create the run directory and save the resolved config; refuses to clobber a run."""
    run_dir = run_dir_of(cfg, command)
    if _has_progress(run_dir) and not cfg.resume:
        raise BPLError(
            f"{run_dir} already holds a run; pass --resume to continue it or --out DIR for a new one"
        )
    if cfg.resume and not _has_progress(run_dir):
        raise BPLError(f"--resume: no last.pt in {run_dir}; run without --resume to start")
    run_dir.mkdir(parents=True, exist_ok=True)
    if not cfg.resume:
        for name in _STALE:
            if (run_dir / name).exists():
                log.info("%s: removing %s of an earlier run that ended before its first epoch",
                         run_dir, name)
                (run_dir / name).unlink()
    write_json(run_dir / "config.json", {"command": command, **cfg.to_dict(command)})
    return run_dir


@contextlib.contextmanager
def _locked(run_dir: Path) -> Iterator[None]:
    """Hold the run directory's lock, or refuse: one run at a time writes a directory."""
    try:
        with exclusive_lock(run_dir / LOCK_FILE):
            yield
    except BusyError as busy:
        raise BPLError(f"{run_dir} is in use by another bpl run ({busy.holder}); wait for it "
                       "to end, or pass --out DIR for a new run") from None


@contextlib.contextmanager
def _run(cfg: Config, command: str) -> Iterator[Path]:
    """A run directory, locked while the run lasts, and removed again (with any parent
    folder made for it) if the run fails before its first epoch ends.

    Under torchrun rank 0 prepares it (and loads the data first, see :func:`load_data`).
    """
    main = distributed.current().is_main
    run_dir = run_dir_of(cfg, command)
    made = [p for p in (run_dir, *run_dir.parents) if not p.exists()]  # innermost first
    with _locked(run_dir) if main else contextlib.nullcontext():
        try:
            with distributed.main_first():
                if main:
                    prepare_run_dir(cfg, command)
            yield run_dir
        except BaseException:
            if main and made and not _has_progress(run_dir):
                shutil.rmtree(run_dir, ignore_errors=True)
                for parent in made[1:]:
                    with contextlib.suppress(OSError):  # only if empty: another run may be there
                        parent.rmdir()
            raise


def load_data(cfg: Config, run_dir: Path, progress: bool = True):
    """The dataset of ``cfg``, split as recorded in ``run_dir/split.json`` when that exists.

    Under torchrun rank 0 decodes into the cache file and writes the split first; the
    others then read that file (on other machines, one process builds it while the rest
    wait on its lock).
    """
    with distributed.main_first():
        data = load_dataset(
            cfg.data,
            cfg.data_root,
            image_size=cfg.image_size,
            seed=cfg.seed,
            train_ratio=cfg.train_ratio,
            val_ratio=cfg.val_ratio,
            train_subset=cfg.train_subset,
            split_file=run_dir / "split.json",
            cache=cfg.cache,
            cache_dir=cfg.cache_dir,
            cache_budget=cfg.cache_budget,
            skip_bad=cfg.skip_bad,
            download=cfg.download,
            progress=progress,
        )
    return data


def _meta(cfg: Config, data) -> dict[str, Any]:
    return {
        "classes": list(data.classes),
        "mean": list(data.mean),
        "std": list(data.std),
        "image_size": cfg.image_size,
        "epochs": cfg.epochs,
        "data": cfg.data,
        "data_root": str(Path(cfg.data_root).resolve()) if cfg.data_root else None,
    }


def _example(cfg: Config, batch: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, cfg.image_size, cfg.image_size)


def _measure(model: nn.Module, cfg: Config, top1: float | None) -> dict[str, Any]:
    model = model.cpu().eval()
    prof = profile(model, _example(cfg), latency=cfg.latency)
    return {"top1": top1, "macs": prof["macs"], "params": prof["params"],
            "latency_ms": prof.get("latency_ms")}


def _settings(cfg: Config, replay: list[float] | None = None) -> TrainSettings:
    """The engine's settings for ``cfg``: ``--epochs auto`` trains at most ``--max-epochs``."""
    settings = TrainSettings.from_object(cfg)
    if cfg.epochs == "auto":
        settings.epochs = cfg.max_epochs
    if replay is not None:
        settings.replay = list(replay)
    return settings


def _resume_state(run_dir: Path, cfg: Config) -> dict | None:
    """``last.pt`` of the run being resumed; more epochs than it has done may be asked, not fewer."""
    if not (run_dir / "last.pt").exists():
        return None
    state = load_checkpoint(run_dir / "last.pt")
    epochs = _settings(cfg).epochs
    if state.get("epoch", 0) > epochs:
        flag = "--max-epochs" if cfg.epochs == "auto" else "--epochs"
        raise BPLError(f"{flag} {epochs} is fewer than the {state['epoch']} epochs {run_dir} "
                       f"has already trained; pass {flag} of at least that")
    return state


def _fit(cfg: Config, model: nn.Module, data, run_dir: Path, meta: dict[str, Any], *,
         command: str, state: dict | None, progress: bool, started: float,
         loss_terms: dict[str, LossTerm] | None = None, hooks: list | None = None,
         replay: list[float] | None = None) -> FitResult:
    """Train ``model`` on the training split, validating on the validation split."""
    return fit(
        model, data.train, data.val, _settings(cfg, replay), run_dir,
        num_classes=data.num_classes,
        payload=lambda m: model_payload(m, cfg.arch, data.num_classes, meta),
        loss_terms=loss_terms,
        hooks=hooks or (),
        resume_state=state,
        record=cfg.to_dict(command),
        progress=progress,
        started=started,
    )


def _select(cfg: Config, model: nn.Module, run_dir: Path, result: FitResult,
            soft: bool = False) -> dict[str, Any]:
    """Load the epoch the run keeps into ``model``; returns what was kept and why.

    ``select="best"``: the epoch of best validation top-1 (``best.pt``); ``"last"``, no
    validation split, or the soft schedule (whose masks are final only at the end): the
    last epoch.
    """
    last = len(result.history)
    if cfg.select == "last" or soft or result.best_val_top1 is None:
        why = ("--select last" if cfg.select == "last" else
               "the soft schedule's pruning masks are final only after the last epoch" if soft
               else "there is no validation split (--val-ratio 0)")
        return {"epoch": last, "of": last, "why": why}
    if result.best_epoch != last:
        state = load_checkpoint(run_dir / "best.pt", model_only=True)["state_dict"]
        model.load_state_dict(state)
    return {"epoch": result.best_epoch, "of": last,
            "why": f"best validation top-1 ({result.best_val_top1:.2f}%)",
            "val_top1": result.best_val_top1}


def _test(model: nn.Module, data, cfg: Config, device: torch.device,
          part: str = "test") -> dict[str, Any]:
    """The one evaluation of the test split, at the end of a run (or of another ``part``)."""
    loader = make_loader(getattr(data, part), batch_size=cfg.batch_size, train=False,
                         device=device, shard=False, workers=cfg.workers)
    return evaluate(model.to(device), loader, data.num_classes, device=device)


def _phase_accuracy(model: nn.Module, data, cfg: Config, device: torch.device) -> dict[str, Any]:
    """Validation and test top-1 of ``model``: report figures only, nothing is chosen from them."""
    out = {"test_top1": _test(model, data, cfg, device)["top1"]}
    if data.val is not None and len(data.val):
        out["val_top1"] = _test(model, data, cfg, device, "val")["top1"]
    model.cpu()
    return out


def _after_pruning(pruned: nn.Module, data, cfg: Config, run_dir: Path,
                   device: torch.device) -> dict[str, Any]:
    """Accuracy right after pruning, before any fine-tuning; kept in the run for a resume."""
    path = run_dir / "after_pruning.json"
    if path.exists():
        return json.loads(path.read_text())
    result = _phase_accuracy(pruned, data, cfg, device) if distributed.current().is_main else {}
    if result:
        write_json(path, result)
    return result


def speed_record(report: PruneReport) -> dict[str, Any]:
    """What a compress run records of pruning to a speedup (``speedup.json``, metrics.json)."""
    return {"asked": report.speedup_target, "measured": report.speedup,
            "runtime": report.runtime, "batch_size": report.batch_size,
            "threads": report.threads, "latency_ms": report.latency_ms,
            "predicted": report.predicted_speedup, "macs_reduction": report.reduction,
            "trials": report.speed_trials, "latency_table": report.latency_table}


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.exists() else None


def train_baseline(cfg: Config, *, progress: bool = True) -> dict[str, Any]:
    """`bpl train`: train ``cfg.arch`` on ``cfg.data`` from scratch (or given weights)."""
    seed_everything(cfg.seed)
    _check_processes(cfg)
    with _run(cfg, "train") as run_dir:
        return _train_baseline(cfg, run_dir, progress)


def _check_processes(cfg: Config) -> None:
    """Refuse --sync-bn where it would do nothing (one process) or cannot run (the CPU)."""
    if not cfg.sync_bn:
        return
    if not distributed.current().enabled:
        raise BPLError("--sync-bn averages BatchNorm statistics over the processes of a torchrun "
                       "job, and this run is one process: leave it out, or start it with torchrun")
    if select_device(cfg.device).type != "cuda":
        raise BPLError("--sync-bn runs on CUDA only (PyTorch's SyncBatchNorm): leave it out on "
                       "the CPU")


def _train_baseline(cfg: Config, run_dir: Path, progress: bool) -> dict[str, Any]:
    t0 = time.perf_counter()
    if cfg.schedule == "replay":
        raise BPLError("--recipe rewind (--schedule replay) replays a baseline's learning rates "
                       "while fine-tuning it: it is for bpl compress; choose another --recipe "
                       "or --schedule for bpl train")
    data = load_data(cfg, run_dir, progress)
    meta = _meta(cfg, data)
    state = _resume_state(run_dir, cfg) if cfg.resume else None
    if state is not None:
        model, _ = model_from_payload(state["model"])
    else:
        model = build_model(cfg.arch, data.num_classes, pretrained=cfg.pretrained, weights=cfg.weights)
    result = _fit(cfg, model, data, run_dir, meta, command="train", state=state,
                  progress=progress, started=t0)
    if not distributed.current().is_main:
        return {}
    selected = _select(cfg, model, run_dir, result)
    _record_schedule(run_dir / "best.pt", result, selected)
    final = _test(model, data, cfg, select_device(cfg.device))
    metrics = {
        "command": "train",
        "config": cfg.to_dict("train"),
        "final": final,
        "classes": list(data.classes),
        "selected": selected,
        "epochs_trained": result.epochs,
        "stopped": result.stopped,
        "history": result.history,
        "models": {"baseline": _measure(model, cfg, final["top1"])},
        "wall_time_s": result.earlier_wall_time_s + time.perf_counter() - t0,
        "segments": result.segments,
        "precision": result.precision,
    }
    write_report(run_dir, metrics)
    return metrics


def _record_schedule(best: Path, result: FitResult, selected: dict[str, Any]) -> None:
    """Write into ``best.pt`` how long the baseline trained and the learning rate of each
    epoch up to the one kept: what `bpl compress --recipe rewind` replays."""
    if not best.exists():
        return
    payload = load_checkpoint(best, model_only=True)
    payload.setdefault("meta", {}).update(
        epochs=result.epochs, kept_epoch=selected["epoch"],
        lr_curve=[row["lr"] for row in result.history[: selected["epoch"]]])
    atomic_save(payload, best)


def _replay_curve(cfg: Config, base_meta: dict[str, Any]) -> list[float] | None:
    """The baseline's learning rates, for the replay schedule (``--recipe rewind``)."""
    if cfg.schedule != "replay":
        return None
    curve = base_meta.get("lr_curve")
    if not curve:
        raise BPLError(f"--recipe rewind replays the learning rates the baseline trained with, "
                       f"and {cfg.baseline} does not record them (only the best.pt of a bpl "
                       "train run of bpl 0.2 or later does); choose another --recipe")
    return [float(v) for v in curve]


def compress(cfg: Config, *, progress: bool = True) -> dict[str, Any]:
    """`bpl compress`: prune a baseline, extend, train with the diversity loss, fuse, verify.

    With ``cfg.max_drop`` it prunes in steps instead and keeps the smallest model within
    that many points of the baseline's validation top-1 (:func:`~bpl.pruning.prune_within`);
    with ``cfg.prune_steps`` > 1 it reaches ``cfg.flops_reduction`` in that many steps.
    """
    seed_everything(cfg.seed)
    if not cfg.baseline:
        raise BPLError("compress needs a baseline checkpoint: pass --baseline PATH (from bpl train)")
    _check_processes(cfg)
    baseline, base_meta = _load_baseline(cfg)
    if cfg.flops_reduction is None and cfg.max_drop is None and cfg.speedup is None:
        raise BPLError("compress needs a target: --flops-reduction R (remove that fraction of the "
                       "MACs, e.g. 0.74), --max-drop P (the smallest model within P points of "
                       "the baseline's validation top-1) or --speedup S (S times faster, "
                       "measured on --runtime)")
    if cfg.speedup is not None and distributed.current().enabled:
        raise BPLError("--speedup measures speed in one process, so that every process prunes "
                       "alike: prune without torchrun, or give a --flops-reduction")
    stepwise = cfg.max_drop is not None or cfg.prune_steps > 1
    if stepwise and distributed.current().enabled:
        raise BPLError("--max-drop and --prune-steps run in one process for now; run them "
                       "without torchrun, or give a one-step --flops-reduction")
    cfg.arch = base_meta.get("arch", cfg.arch)
    job = _compress_in_steps if stepwise else _compress
    with _run(cfg, "compress") as run_dir:
        return job(cfg, run_dir, baseline, base_meta, progress)


def _prepare(cfg: Config, run_dir: Path, baseline: nn.Module | None, base_meta: dict[str, Any],
             progress: bool):
    """The data of a compress run and the baseline, checked against each other."""
    data = load_data(cfg, run_dir, progress)
    if baseline is None:  # a weights file: the stock --arch for this data, strictly loaded
        baseline = baseline_from_weights(cfg.arch, data.num_classes, cfg.baseline)
        base_meta["num_classes"] = data.num_classes
        log.warning("%s holds no class names: its outputs are taken to be %s's classes in "
                    "sorted order (%s, ...)", cfg.baseline, cfg.data, ", ".join(data.classes[:3]))
    if base_meta.get("num_classes") != data.num_classes:
        raise BPLError(
            f"{cfg.baseline} was trained for {base_meta.get('num_classes')} classes but "
            f"{cfg.data} has {data.num_classes}; pass the baseline trained on this dataset"
        )
    _check_baseline_fits(cfg, base_meta, data)
    return data, baseline, _meta(cfg, data)


def _loss_terms(cfg: Config, student: nn.Module, baseline: nn.Module) -> dict[str, LossTerm]:
    """The method's terms added to the cross-entropy: diversity (with partners), distillation."""
    terms: dict[str, LossTerm] = {}
    if partner_blocks(student) and cfg.diversity_weight > 0:
        weight, granularity, compare = cfg.diversity_weight, cfg.granularity, cfg.diversity_compare
        terms["diversity"] = lambda step: diversity_loss(step.model, weight=weight,
                                                         granularity=granularity, compare=compare)
    if cfg.distill:
        terms["distill"] = Distillation(baseline, temperature=cfg.distill_temperature,
                                        weight=cfg.distill_weight)
    return terms


def _partner_args(cfg: Config) -> dict[str, Any]:
    return dict(partner=cfg.partner, kernel_sizes=PLACEMENTS[cfg.placement], init=cfg.init,
                share=cfg.partner_share)


def _check_inputs(data) -> torch.Tensor:
    """A few test images: the inputs every fusion and channel-removal check runs on."""
    return torch.stack([data.test[i][0] for i in range(min(8, len(data.test)))])


def _fuse_checked(student: nn.Module, check_x: torch.Tensor, tol: float
                  ) -> tuple[nn.Module, float]:
    """The partners folded in, and the fused model's error against ``student`` (checked)."""
    deploy = fuse(student)
    return deploy, verify(student, deploy, check_x, tol=tol)


def _compress(
    cfg: Config, run_dir: Path, baseline: nn.Module | None, base_meta: dict[str, Any],
    progress: bool
) -> dict[str, Any]:
    t0 = time.perf_counter()
    data, baseline, meta = _prepare(cfg, run_dir, baseline, base_meta, progress)
    main = distributed.current().is_main
    device = select_device(cfg.device)
    example = _example(cfg)
    state = _resume_state(run_dir, cfg) if cfg.resume else None
    hooks: list = []
    partner_args = _partner_args(cfg)
    after_pruning: dict[str, Any] = {}
    if state is not None:
        student, _ = model_from_payload(state["model"])
        if (run_dir / "after_pruning.json").exists():
            after_pruning = _after_pruning(student, data, cfg, run_dir, device)
    elif cfg.soft:
        start = reinitialize(copy.deepcopy(baseline).cpu()) if cfg.from_scratch else baseline.cpu()
        student = extend(start, **partner_args)
    else:
        speed = ({} if cfg.speedup is None else
                 dict(speedup=cfg.speedup, runtime=cfg.runtime, batch_size=cfg.latency_batch,
                      threads=cfg.latency_threads))
        pruned = prune(
            baseline.cpu(), example,
            flops_reduction=cfg.flops_reduction,
            importance=cfg.importance,
            global_pruning=cfg.global_pruning,
            round_to=cfg.round_to,
            accept_closest=cfg.accept_closest,
            **speed,
        )
        if cfg.speedup is not None and main:
            write_json(run_dir / "speedup.json", speed_record(pruned.bpl_prune_report))
        if cfg.from_scratch:  # the pruned architecture only: its trained weights are dropped
            log.info("--from-scratch: training the pruned architecture from fresh weights")
            reinitialize(pruned)
        else:
            after_pruning = _after_pruning(pruned, data, cfg, run_dir, device)
        student = extend(pruned, **partner_args) if cfg.partners else pruned
    if cfg.soft:
        hooks.append(SoftPruner(student, example, flops_reduction=cfg.flops_reduction,
                                every=cfg.soft_every, importance=cfg.importance,
                                round_to=cfg.round_to, partners=cfg.soft_partners))
    if partner_blocks(student) and state is None and main:
        log.info("partners: each training step costs 1.1-1.8x a --no-partners step; in bpl's "
                 "recovery study (docs/results.md) they were no more accurate than plain "
                 "fine-tuning (--no-partners); more --epochs was what won accuracy back")
    terms = _loss_terms(cfg, student, baseline)
    result = _fit(cfg, student, data, run_dir, meta, command="compress", state=state,
                  progress=progress, started=t0, loss_terms=terms, hooks=hooks,
                  replay=_replay_curve(cfg, base_meta))
    if not main:
        return {}
    selected = _select(cfg, student, run_dir, result, soft=cfg.soft)
    student = student.cpu().eval()
    base_eval = _test(baseline, data, cfg, device)
    if data.val is not None and len(data.val):  # the reference line of the curves
        base_eval["val_top1"] = _test(baseline, data, cfg, device, "val")["top1"]
    check_x = _check_inputs(data)
    metrics: dict[str, Any] = {"command": "compress", "config": cfg.to_dict("compress")}
    if cfg.soft:
        deploy = hooks[0].finalize(student, check_x, tol=cfg.verify_tol)
        metrics["removal_error"] = hooks[0].report.removal_error
        metrics["fusion_error"] = hooks[0].report.fusion_error
    elif cfg.partners:
        deploy, metrics["fusion_error"] = _fuse_checked(student, check_x, cfg.verify_tol)
    else:
        deploy = student
    deploy_eval = _test(deploy, data, cfg, device)
    save_model(run_dir / "deploy.pt", deploy.cpu(), arch=cfg.arch, num_classes=data.num_classes,
               meta={**meta, "epochs": result.epochs, "baseline_epochs": base_meta.get("epochs")})
    models = {
        "baseline": _measure(baseline, cfg, base_eval["top1"]),
        "compressed": _measure(deploy, cfg, deploy_eval["top1"]),
    }
    metrics.update(
        baseline=base_eval,
        baseline_epochs=base_meta.get("epochs"),
        after_pruning=after_pruning or None,
        final=deploy_eval,
        classes=list(data.classes),
        selected=selected,
        epochs_trained=result.epochs,
        stopped=result.stopped,
        history=result.history,
        models=models,
        macs_reduction=1 - models["compressed"]["macs"] / models["baseline"]["macs"],
        speedup=_read_json(run_dir / "speedup.json"),
        wall_time_s=result.earlier_wall_time_s + time.perf_counter() - t0,
        segments=result.segments,
        precision=result.precision,
    )
    write_report(run_dir, metrics)
    return metrics


def _compress_in_steps(
    cfg: Config, run_dir: Path, baseline: nn.Module | None, base_meta: dict[str, Any],
    progress: bool
) -> dict[str, Any]:
    """Prune in steps, recovering each for ``--epochs`` (with partners unless
    ``--no-partners``). `bpl compress --max-drop P` cuts to :data:`~bpl.pruning.LEVELS` and
    keeps the smallest model within P points of the baseline's validation top-1;
    `--flops-reduction R --prune-steps N` cuts to :func:`~bpl.pruning.step_levels` and keeps
    the last. Every step is kept in ``steps/<k>/`` (``deploy.pt``, its training run) and on
    the accuracy-vs-MACs curve; a cut-off run resumes at the step it was in."""
    t0 = time.perf_counter()
    data, baseline, meta = _prepare(cfg, run_dir, baseline, base_meta, progress)
    has_val = data.val is not None and len(data.val) > 0
    if cfg.max_drop is not None and not has_val:
        raise BPLError("--max-drop judges each step on the validation split, and there is none: "
                       "pass --val-ratio above 0")
    budget = math.inf if cfg.max_drop is None else cfg.max_drop
    levels = LEVELS if cfg.max_drop is not None else step_levels(cfg.flops_reduction,
                                                                   cfg.prune_steps)
    device = select_device(cfg.device)
    example = _example(cfg)
    check_x = _check_inputs(data)
    replay = _replay_curve(cfg, base_meta)
    steps_dir = run_dir / "steps"
    fits: dict[int, dict[str, Any]] = {}

    def score(model: nn.Module) -> float:  # validation top-1; NaN without a validation split
        top1 = _test(model, data, cfg, device, "val")["top1"] if has_val else math.nan
        model.cpu()
        return top1

    def recover(pruned: nn.Module, step: int) -> nn.Module:
        step_dir = steps_dir / str(step)
        step_dir.mkdir(parents=True, exist_ok=True)
        state = _resume_state(step_dir, cfg)
        student = (model_from_payload(state["model"])[0] if state is not None
                   else extend(pruned, **_partner_args(cfg)) if cfg.partners else pruned)
        result = _fit(cfg, student, data, step_dir, meta, command="compress", state=state,
                      progress=progress, started=time.perf_counter(),
                      loss_terms=_loss_terms(cfg, student, baseline), replay=replay)
        selected = _select(cfg, student, step_dir, result)
        student = student.cpu().eval()
        deploy, fusion_error = (_fuse_checked(student, check_x, cfg.verify_tol) if cfg.partners
                                else (student, None))
        fits[step] = {"epochs_trained": result.epochs, "stopped": result.stopped,
                      "selected": selected, "fusion_error": fusion_error,
                      "history": result.history, "precision": result.precision,
                      "train_time_s": sum(row["epoch_time_s"] for row in result.history)}
        return deploy

    def on_step(step: BudgetStep, model: nn.Module) -> None:
        step_dir = steps_dir / str(step.step)
        save_model(step_dir / "deploy.pt", model.cpu(), arch=cfg.arch,
                   num_classes=data.num_classes, meta={**meta, "budget_step": asdict(step)})
        write_json(step_dir / "step.json", {**asdict(step), **fits.get(step.step, {})})
        write_budget_curve(run_dir, reference, cfg.max_drop, _recorded_steps(steps_dir))

    baseline = baseline.cpu().eval()
    reference = score(baseline)
    if cfg.max_drop is not None:
        _warn_if_budget_in_noise(cfg.max_drop, reference, len(data.val))
    done = _recorded_steps(steps_dir)
    within = [d["step"] for d in done if d["within"]]
    start = load_model(steps_dir / str(within[-1]) / "deploy.pt")[0] if within else baseline
    search = prune_within(
        start, example, max_drop=budget, recover=recover, score=score, reference=reference,
        levels=levels,
        done=[BudgetStep(**{k: d[k] for k in BudgetStep.__dataclass_fields__}) for d in done],
        on_step=on_step, importance=cfg.importance, global_pruning=cfg.global_pruning,
        round_to=cfg.round_to)
    steps = _recorded_steps(steps_dir)
    chosen = search.chosen
    if chosen is None:
        raise BPLError(
            f"even the first step ({100 * search.steps[0].macs_reduction:.0f}% fewer MACs) fell "
            f"{reference - search.steps[0].score:.2f} points below the baseline on validation, "
            f"beyond --max-drop {cfg.max_drop:g}; allow a larger --max-drop or recover longer "
            f"(--epochs); the step is in {steps_dir / '1'}")
    deploy = search.model.cpu().eval()
    kept = steps[chosen.step - 1]
    trained = sum(st["epochs_trained"] for st in steps[: chosen.step])
    base_eval = _test(baseline, data, cfg, device)
    base_eval["val_top1"] = reference if has_val else None
    deploy_eval = _test(deploy, data, cfg, device)  # the one evaluation of the test split
    save_model(run_dir / "deploy.pt", deploy.cpu(), arch=cfg.arch, num_classes=data.num_classes,
               meta={**meta, "epochs": trained, "budget_step": asdict(chosen),
                     "baseline_epochs": base_meta.get("epochs")})
    models = {"baseline": _measure(baseline, cfg, base_eval["top1"]),
              "compressed": _measure(deploy, cfg, deploy_eval["top1"])}
    why = (f"step {chosen.step} of the search: the smallest model within --max-drop "
           f"{cfg.max_drop:g}" if cfg.max_drop is not None
           else f"step {chosen.step} of {len(levels)}: the last cut")
    selected = dict(kept["selected"], why=f"{why}; {kept['selected']['why']}")
    metrics = {
        "command": "compress", "config": cfg.to_dict("compress"),
        "budget": {**search.to_dict(), "steps": steps},
        "baseline": base_eval, "baseline_epochs": base_meta.get("epochs"),
        "final": deploy_eval, "classes": list(data.classes), "selected": selected,
        "fusion_error": kept.get("fusion_error"),
        "epochs_trained": trained,  # the kept model's: the recoveries of its step and before
        "stopped": search.stopped, "history": kept["history"], "models": models,
        "macs_reduction": 1 - models["compressed"]["macs"] / models["baseline"]["macs"],
        "wall_time_s": time.perf_counter() - t0, "precision": kept["precision"],
    }
    write_report(run_dir, metrics)
    return metrics


def budget_noise(top1: float, n: int) -> float:
    """Half-width in points of a 95% binomial interval of a top-1 of ``top1`` % on ``n``
    images: how far a validation score moves by chance alone."""
    p = min(max(top1 / 100, 0.5 / n), 1 - 0.5 / n)
    return 196 * math.sqrt(p * (1 - p) / n)


def _warn_if_budget_in_noise(max_drop: float, reference: float, n: int) -> None:
    """Say when the validation split is too small for the budget to be judged reliably."""
    noise = budget_noise(reference, n)
    if noise > max_drop:
        log.warning("--max-drop %g is judged on %d validation images: one image is %.2f points "
                    "and chance alone moves the score by about ±%.1f points (95%%), so steps "
                    "may be kept or refused by luck; a larger --val-ratio (or more data) "
                    "makes the budget mean what it says", max_drop, n, 100 / n, noise)


def _recorded_steps(steps_dir: Path) -> list[dict[str, Any]]:
    """The finished steps of a budgeted search (``steps/<k>/step.json``), in order."""
    found = sorted((int(p.parent.name), p) for p in steps_dir.glob("*/step.json")
                   if p.parent.name.isdigit())
    return [json.loads(p.read_text()) for _, p in found]


def _load_baseline(cfg: Config) -> tuple[nn.Module | None, dict[str, Any]]:
    """The baseline a checkpoint bpl wrote holds; for a plain state_dict or a whole
    torchvision/timm model file, ``(None, meta)``: it is built for ``--arch`` once the
    data says how many classes it has."""
    try:
        return load_model(cfg.baseline)
    except CheckpointError as not_ours:
        try:
            read_state_dict(Path(cfg.baseline))
        except CheckpointError:
            raise not_ours from None
        return None, {"arch": cfg.arch, "weights_file": str(cfg.baseline)}


def _check_baseline_fits(cfg: Config, base_meta: dict[str, Any], data) -> None:
    """Refuse a baseline trained on other classes; say so when its image size differs."""
    classes = base_meta.get("classes")
    if classes and list(classes) != list(data.classes):
        def show(names) -> str:
            return ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
        raise BPLError(
            f"{cfg.baseline} was trained on the classes [{show(list(classes))}] but the data "
            f"has [{show(list(data.classes))}]; pass the baseline trained on this data, or the "
            "--data-root it was trained on"
        )
    size = base_meta.get("image_size")
    if size and size != cfg.image_size:
        log.warning("the baseline was trained at %d px but this run uses --image-size %d: "
                    "its accuracy and MACs are measured at %d px; pass --image-size %d to "
                    "keep the baseline's", size, cfg.image_size, cfg.image_size, size)


def evaluate_checkpoint(
    path: str | Path,
    *,
    split: str | Path | None = None,
    batch_size: int = 64,
    device: str = "auto",
    overrides: dict[str, Any] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """`bpl evaluate`: accuracy of any checkpoint bpl wrote, on the test images of its run."""
    model, meta = load_model(path)
    data = _run_data(path, meta, split, overrides or {}, progress)
    dev = select_device(device)
    loader = make_loader(data.test, batch_size=batch_size, train=False, device=dev)
    metrics = evaluate(model.to(dev), loader, data.num_classes, device=dev)
    metrics["classes"] = list(data.classes)
    return metrics


def _run_data(path: str | Path, meta: dict[str, Any], split: str | Path | None,
              overrides: dict[str, Any], progress: bool, *, cache: bool = True):
    """The data of the run that wrote checkpoint ``path``, split as its split.json says
    (``split``, or the one beside the checkpoint); ``overrides`` replace the meta's
    dataset, root, image size, cache folder and skip_bad."""
    split_file = Path(split) if split else Path(path).parent / "split.json"
    if not split_file.exists():
        raise BPLError(f"no split file at {split_file}; pass --split with the run's split.json")
    o = overrides
    data = load_dataset(
        o.get("data", meta.get("data", "imagefolder")),
        o.get("data_root", meta.get("data_root")),
        image_size=o.get("image_size", meta.get("image_size", 224)),
        split_file=split_file,
        cache=o.get("cache", "auto" if cache else "off"),
        cache_dir=o.get("cache_dir"),
        cache_budget=o.get("cache_budget", DEFAULT_BUDGET),
        skip_bad=o.get("skip_bad", False),
        progress=progress,
    )
    if meta.get("classes") and list(data.classes) != list(meta["classes"]):
        raise BPLError(f"{path} was trained on other classes than {split_file} lists; "
                       "pass the split.json of the run that wrote the checkpoint")
    return data


def profile_checkpoints(
    paths: list[str | Path],
    *,
    image_size: int | None = None,
    batch_sizes: list[int] = (1, 16),
    threads: int | None = None,
    repeats: int = 20,
    onnx: bool = True,
) -> dict[str, Any]:
    """`bpl profile`: MACs, params and CPU latency (PyTorch, and onnxruntime if installed).

    All models and runtimes are timed interleaved in one run, so with two checkpoints
    (baseline, compressed) the speedups are fair ratios; they are shown next to the
    ideal speedup, the MACs ratio, as a fraction of it. PyTorch runs the form `bpl
    predict` uses (:func:`~bpl.exporting.deploy_form`: partners fused, BN folded,
    channels_last). An ``.onnx`` file from `bpl export` (fp32 or INT8) runs in
    onnxruntime alone, at the input size it was exported at, with the MACs and
    parameters its metadata records; fp32 against INT8 gets speedups but no fraction of
    the ideal (the MACs ratio does not count 8-bit arithmetic). When the last model's
    conv widths are not multiples of 8, or a runtime reaches under 0.6 of the ideal,
    ``note`` (also the table's last line) says so and suggests a fix
    (:func:`~bpl.profiling.speed_note`).
    """
    from .exporting import OnnxModule, deploy_form, onnx_module
    from .predict import load_predictor
    from .profiling import compare_latency, conv_widths, count_macs, count_params, speed_note

    if not 1 <= len(paths) <= 2:
        raise BPLError("profile takes one checkpoint, or two (baseline and compressed)")
    models: dict[str, nn.Module] = {}
    files: dict[str, tuple[OnnxModule, dict[str, Any]]] = {}  # ONNX files: session, metadata
    sizes: dict[str, int] = {}
    for p in paths:
        name = str(p) if str(p) not in sizes else f"{p} (2)"
        if Path(p).suffix.lower() == ".onnx":
            if not onnx:
                raise BPLError(f"{p} is an ONNX file, which only onnxruntime runs: drop --no-onnx")
            files[name] = load_predictor(p, threads=threads)
            sizes[name] = files[name][1].get("image_size", 224)
            if image_size and image_size != sizes[name]:
                raise BPLError(f"{p} takes {sizes[name]} px images, as it was exported: drop "
                               f"--image-size, or export it again with --image-size {image_size}")
            continue
        model, meta = load_model(p)
        models[name] = fuse(model.eval()) if partner_blocks(model) else model.eval()
        sizes[name] = image_size or meta.get("image_size", 224)
    if len(set(sizes.values())) > 1:
        raise BPLError(f"the checkpoints use different image sizes {sorted(set(sizes.values()))}; "
                       "pass --image-size")
    size = next(iter(sizes.values()))
    x1 = torch.randn(1, 3, size, size)
    # PyTorch runs each model as `bpl predict` does: BN folded, channels_last
    runners = {(n, "torch"): deploy_form(m) for n, m in models.items()}
    if onnx:
        try:
            runners.update({(n, "onnxruntime"): onnx_module(m, x1, threads=threads)
                            for n, m in models.items()})
        except BPLError as exc:  # the optional extra is missing: say so, profile torch alone
            log.warning("onnxruntime latency skipped: %s", exc)
    runners.update({(n, "onnxruntime"): module for n, (module, _) in files.items()})
    runtimes = sorted({rt for _, rt in runners}, key=["torch", "onnxruntime"].index)
    rows: dict[str, dict[str, Any]] = {}
    for n in sizes:  # in the order given; an ONNX file's counts are in its metadata
        meta = files[n][1] if n in files else {}
        rows[n] = {"macs": count_macs(models[n], x1) if n in models else meta.get("macs"),
                   "params": count_params(models[n]) if n in models else meta.get("params"),
                   "precision": meta.get("precision", "fp32"),
                   "latency_ms": {rt: {} for rt in runtimes if (n, rt) in runners}}
    keyed = {f"{n} [{rt}]": r for (n, rt), r in runners.items()}
    for bs in batch_sizes:
        lat = compare_latency(keyed, torch.randn(bs, 3, size, size), threads=threads,
                              repeats=repeats)
        for n, rt in runners:
            rows[n]["latency_ms"][rt][bs] = lat[f"{n} [{rt}]"]
    lines = [f"input {size}x{size} px, median latency over {repeats} interleaved runs "
             f"({torch.get_num_threads() if threads is None else threads} threads)", "",
             "| model | runtime | precision | MACs | params | "
             + " | ".join(f"batch {b} (ms)" for b in batch_sizes) + " |",
             "|---|---|---|---:|---:|" + "---:|" * len(batch_sizes)]
    for n, r in rows.items():
        for rt, by_bs in r["latency_ms"].items():
            lines.append(f"| {n} | {rt} | {r['precision']} | {_millions(r['macs'], 1)} | "
                         f"{_millions(r['params'], 2)} | "
                         + " | ".join(f"{by_bs[b]:.2f}" for b in batch_sizes) + " |")
    result: dict[str, Any] = {"image_size": size, "threads": threads, "models": rows}
    if len(rows) == 2:
        a, b = rows.values()
        both = [rt for rt in runtimes if rt in a["latency_ms"] and rt in b["latency_ms"]]
        result["speedup"] = {
            rt: {bs: a["latency_ms"][rt][bs] / b["latency_ms"][rt][bs] for bs in batch_sizes}
            for rt in both
        }
        ideal = a["macs"] / b["macs"] if a["macs"] and b["macs"] else None
        same = a["precision"] == b["precision"]
        if ideal:
            result["ideal_speedup"] = ideal
            lines += ["", f"ideal speedup (MACs ratio): {ideal:.2f}x" + (
                "" if same else f" ({a['precision']} against {b['precision']}: the MACs ratio "
                                "does not count cheaper arithmetic)")]
        if ideal and same:
            result["fraction_of_ideal"] = {
                rt: {bs: sp / ideal for bs, sp in by_bs.items()}
                for rt, by_bs in result["speedup"].items()
            }
        for rt, by_bs in result["speedup"].items():
            for bs, sp in by_bs.items():
                lines.append(f"{rt}, batch {bs}: {sp:.2f}x faster"
                             + (f" = {sp / ideal:.2f} of ideal" if ideal and same else ""))
    last = list(rows)[-1]
    result["note"] = speed_note(conv_widths(models[last]) if last in models else {},
                                result.get("fraction_of_ideal"))
    if result["note"]:
        lines += ["", result["note"]]
    result["table"] = "\n".join(lines)
    return result


def _millions(n: int | None, digits: int) -> str:
    """``n`` in millions with an M, or a dash when unknown."""
    return "–" if n is None else f"{n / 1e6:.{digits}f}M"


def export_checkpoint(
    path: str | Path,
    *,
    format: str = "onnx",
    out: str | Path | None = None,
    image_size: int | None = None,
    tol: float = 1e-4,
    int8: bool = False,
    calibration_data: str | Path | None = None,
    calibration_images: int = CALIBRATION_IMAGES,
    max_drop: float = INT8_MAX_DROP,
    force: bool = False,
    split: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """`bpl export`: a checkpoint to ONNX/TorchScript (fused, BN folded), parity-checked.

    ``int8=True``: a statically quantized ONNX model (:func:`~bpl.exporting.export`),
    calibrated on ``calibration_images`` images drawn at random (seed 0) from
    ``calibration_data`` (a folder) or else from the run's training split, each given the
    evaluation's preprocessing, and checked against fp32 on the run's validation split
    (refused beyond ``max_drop`` points unless ``force``). ``split`` and ``overrides``
    (data, data_root, cache_dir, skip_bad) find the run's data as `bpl evaluate` does.
    """
    from .exporting import export
    from .predict import onnx_metadata

    model, meta = load_model(path)
    size = image_size or meta.get("image_size", 224)
    suffix = ".int8.onnx" if int8 else ".onnx" if format == "onnx" else ".torchscript.pt"
    out = Path(out) if out else Path(path).with_suffix(suffix)
    metadata = onnx_metadata({**meta, "image_size": size}) if format == "onnx" else None
    extra = {}
    if int8:
        if format != "onnx":
            raise BPLError("--int8 writes an ONNX model: drop --format torchscript")
        extra = _int8_inputs(path, meta, size, calibration_data, calibration_images, split,
                             dict(overrides or {}, image_size=size), force, progress)
        extra["max_drop"] = None if force else max_drop
    return export(model, torch.randn(1, 3, size, size), out, format=format, tol=tol,
                  metadata=metadata, int8=int8, **extra)


def _int8_inputs(path: str | Path, meta: dict[str, Any], size: int,
                 folder: str | Path | None, count: int, split: str | Path | None,
                 overrides: dict[str, Any], force: bool, progress: bool) -> dict[str, Any]:
    """:func:`~bpl.exporting.export`'s calibration and validation images for a checkpoint:
    ``count`` from ``folder`` or the run's training split, and the run's validation split."""
    from .data import SceneDataset, eval_transform, resize_size
    from .data.images import load_resized
    from .predict import image_files

    if count < 1:
        raise BPLError(f"--calibration-images must be at least 1, got {count}")
    if meta.get("mean") is None or meta.get("std") is None:
        raise BPLError(f"{path} does not record its mean/std, so calibration images cannot be "
                       "preprocessed as in training; pass a checkpoint written by bpl")
    split_file = Path(split) if split else Path(path).parent / "split.json"
    data = (_run_data(path, meta, split_file, overrides, progress, cache=False)
            if split or split_file.exists() else None)
    pick = torch.Generator().manual_seed(0)
    transform = eval_transform(size, meta["mean"], meta["std"])
    if folder is not None:
        files = image_files([folder])
        chosen = sorted(torch.randperm(len(files), generator=pick)[:count].tolist())
        images = []
        for i in chosen:
            try:
                images.append(transform(load_resized(files[i], resize_size(size))))
            except CorruptImageError as exc:
                log.warning("calibration skips %s: %s", files[i], exc.reason)
        if not images:
            raise BPLError(f"none of the {len(chosen)} images chosen from {folder} could be "
                           "read; pass a folder of readable training images")
        calibration: Any = torch.stack(images)
        source = f"{len(images)} of the {len(files)} images in {Path(folder).resolve()}"
    elif data is not None:
        train = data.train
        chosen = sorted(torch.randperm(len(train), generator=pick)[:count].tolist())
        calibration = SceneDataset(train.source, [train.indices[i] for i in chosen],
                                   [train.targets[i] for i in chosen], transform, data.classes)
        source = (f"{len(chosen)} of the {len(train)} images of the training split of "
                  f"{data.name} ({data.root or 'bundled'}), as split in {split_file.resolve()}")
    else:
        raise BPLError(f"--int8 needs images to calibrate on and found no split.json beside "
                       f"{path}: pass --calibration-data DIR (a few hundred of your training "
                       "images), or --split with the run's split.json")
    validation = data.val if data is not None else None
    if validation is None and not force:
        why = "it has none" if data is not None else f"there is no split.json beside {path}"
        raise BPLError(f"--int8 checks INT8 against fp32 on the run's validation split and {why}: "
                       "pass --split with the run's split.json, or --force to write it unchecked")
    source += "; chosen at random (seed 0), preprocessed as for evaluation"
    return {"calibration": calibration, "calibration_source": source, "validation": validation,
            "min_calibration": min(count, MIN_CALIBRATION_IMAGES)}


#: The demo's settings: small enough for about two minutes on two CPU cores.
DEMO = {
    "data": "digits",
    "image_size": 32,
    "arch": "tiny_resnet",
    "batch_size": 64,
    "lr": 0.1,
    "schedule": "cosine",
    "weight_decay": 5e-4,
    "workers": 0,
    "seed": 0,
}


def demo(out: str | Path = "runs/demo", *, epochs: int | None = None,
         progress: bool = True) -> dict[str, Any]:
    """`bpl demo`: train a small baseline on digits, compress ~70% of its MACs with BPL, verify.

    Re-running with the same ``out`` resumes (or simply re-reports) what is already there.
    """
    out = Path(out)
    base = dict(DEMO, epochs=epochs or 10, out=str(out / "baseline"))
    base["resume"] = (out / "baseline" / "last.pt").exists()
    log.info("demo 1/2: training a %s baseline on digits -> %s", base["arch"], base["out"])
    train_baseline(Config(**base), progress=progress)
    # global pruning: tiny_resnet's narrow stages make a uniform ratio move in coarse steps
    comp = dict(DEMO, epochs=epochs or 10, lr=0.05, out=str(out / "compressed"),
                baseline=str(out / "baseline" / "best.pt"), flops_reduction=0.7,
                global_pruning=True)
    comp["resume"] = (out / "compressed" / "last.pt").exists()
    log.info("demo 2/2: pruning 70%% of the MACs, training with partners, fusing -> %s", comp["out"])
    return compress(Config(**comp), progress=progress)
