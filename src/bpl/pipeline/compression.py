"""`bpl compress`: prune a baseline, extend it with partners, train, fuse, verify;
in one cut, in steps, within an accuracy budget, or softly (its strategies: :data:`bpl.config.STRATEGIES`)."""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import distributed
from ..config import Config, strategy_of
from ..distill import Distillation
from ..diversity import Diversity
from ..engine import (
    LossTerm,
    annealed_stretch,
    replayed_curve,
    seed_everything,
    select_device,
)
from ..errors import BPLError, CheckpointError
from ..extension import extend, partner_blocks
from ..fusion import fuse
from ..models import (
    baseline_from_weights,
    load_model,
    model_from_payload,
    read_state_dict,
    reinitialize,
    save_model,
)
from ..modules import reports
from ..partners import partner_kind
from ..pruning import (
    LEVELS,
    BudgetStep,
    PruneReport,
    SoftPruner,
    prune,
    prune_within,
    step_levels,
)
from ..report import write_budget_curve, write_json, write_report
from ..verification import verify
from .fitting import (
    adopt_baseline_split,
    check_processes,
    check_same_split,
    evaluate_split,
    example_input,
    fit_run,
    images_read,
    load_data,
    measure,
    resume_state,
    run_meta,
    select_epoch,
)
from .rundir import open_run

log = logging.getLogger(__name__)


def _replay_curve(cfg: Config, base_meta: dict[str, Any]) -> list[float] | None:
    """The baseline's learning rates, for the replay schedule (``--recipe rewind``)."""
    if cfg.schedule != "replay":
        return None
    curve = base_meta.get("lr_curve")
    if not curve:
        raise BPLError(f"--recipe rewind replays the learning rates the baseline trained with, "
                       f"and {cfg.baseline} does not record them (only the best.pt of a bpl "
                       "train run of bpl 0.2 or later does); choose another --recipe")
    replay = replayed_curve(curve)
    if len(replay) < len(curve):
        log.info("--recipe rewind: the baseline restarted its learning rate; replaying its "
                 "last complete cycle (%d of its %d epochs)", len(replay), len(curve))
    return replay




def _phase_accuracy(model: nn.Module, data, cfg: Config, device: torch.device) -> dict[str, Any]:
    """Validation and test top-1 of ``model``: report figures only, nothing is chosen from them."""
    out = {"test_top1": evaluate_split(model, data, cfg, device)["top1"]}
    if data.val is not None and len(data.val):
        out["val_top1"] = evaluate_split(model, data, cfg, device, "val")["top1"]
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
            "allocation": report.speed_allocation, "trials": report.speed_trials,
            "latency_table": report.latency_table, "unpruned_spread": report.latency_spread}


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.exists() else None


def compress(cfg: Config, *, progress: bool = True) -> dict[str, Any]:
    """`bpl compress`: prune a baseline, extend, train with the diversity loss, fuse, verify.

    With ``cfg.max_drop`` it prunes in steps instead and keeps the smallest model within
    that many points of the baseline's validation top-1 (:func:`~bpl.pruning.prune_within`);
    with ``cfg.prune_steps`` > 1 it reaches ``cfg.flops_reduction`` in that many steps.
    """
    seed_everything(cfg.seed)
    if not cfg.baseline:
        raise BPLError("compress needs a baseline checkpoint: pass --baseline PATH (from bpl train)")
    check_processes(cfg)
    baseline, base_meta = _load_baseline(cfg)
    if cfg.flops_reduction is None and cfg.max_drop is None and cfg.speedup is None:
        raise BPLError("compress needs a target: --flops-reduction R (remove that fraction of the "
                       "MACs, e.g. 0.74), --max-drop P (the smallest model within P points of "
                       "the baseline's validation top-1) or --speedup S (S times faster, "
                       "measured on --runtime)")
    strategy = strategy_of(cfg)
    if not strategy.distributed and distributed.current().enabled:
        raise BPLError(f"{strategy.picked_by} runs in one process for now; run it without "
                       "torchrun, or give a one-step --flops-reduction")
    cfg.arch = base_meta.get("arch", cfg.arch)
    job = {"hard": _compress, "speed": _compress, "soft": _compress,
           "steps": _compress_in_steps, "budget": _compress_in_steps}[strategy.name]
    with open_run(cfg, "compress") as run_dir:
        return job(cfg, run_dir, baseline, base_meta, progress)


def _prepare(cfg: Config, run_dir: Path, baseline: nn.Module | None, base_meta: dict[str, Any],
             progress: bool):
    """The data of a compress run and the baseline, checked against each other."""
    if distributed.current().is_main:
        adopt_baseline_split(cfg, run_dir, base_meta)
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
    return data, baseline, run_meta(cfg, data)


def _loss_terms(cfg: Config, student: nn.Module, baseline: nn.Module) -> dict[str, LossTerm]:
    """The method's terms added to the cross-entropy: diversity (with partners), distillation."""
    terms: dict[str, LossTerm] = {}
    if partner_blocks(student) and cfg.diversity_weight > 0:
        terms["diversity"] = Diversity(diversity_weight=cfg.diversity_weight,
                                       granularity=cfg.granularity,
                                       diversity_compare=cfg.diversity_compare)
    if cfg.distill:
        terms["distill"] = Distillation(baseline, distill_temperature=cfg.distill_temperature,
                                        distill_weight=cfg.distill_weight)
    return terms


def _partner_args(cfg: Config) -> dict[str, Any]:
    return dict(partner=cfg.partner, placement=cfg.placement, init=cfg.init,
                partner_share=cfg.partner_share)


def _check_inputs(data) -> torch.Tensor:
    """A few test images: the inputs every fusion and channel-removal check runs on."""
    return torch.stack([data.test[i][0] for i in range(min(8, len(data.test)))])


def _fuse_checked(student: nn.Module, check_x: torch.Tensor, tol: float
                  ) -> tuple[nn.Module, float]:
    """The partners folded in, and the fused model's error against ``student`` (checked)."""
    deploy = fuse(student)
    return deploy, verify(student, deploy, check_x, verify_tol=tol)


def _compress(
    cfg: Config, run_dir: Path, baseline: nn.Module | None, base_meta: dict[str, Any],
    progress: bool
) -> dict[str, Any]:
    t0 = time.perf_counter()
    data, baseline, meta = _prepare(cfg, run_dir, baseline, base_meta, progress)
    main = distributed.current().is_main
    device = select_device(cfg.device)
    example = example_input(cfg)
    state = resume_state(run_dir, cfg) if cfg.resume else None
    hooks: list = []
    partner_args = _partner_args(cfg)
    after_pruning: dict[str, Any] = {}
    if state is not None:
        student, _ = model_from_payload(state["model"])
        if (run_dir / "after_pruning.json").exists():
            after_pruning = _after_pruning(student, data, cfg, run_dir, device)
    elif cfg.soft:
        # a copy: the baseline is scored (and distilled from) after training
        start = copy.deepcopy(baseline).cpu()
        if cfg.from_scratch:
            reinitialize(start)
        student = extend(start, inplace=True, **partner_args) if cfg.partners else start
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
            write_json(run_dir / "speedup.json", speed_record(reports(pruned)["prune"]))
        if cfg.from_scratch:  # the pruned architecture only: its trained weights are dropped
            log.info("--from-scratch: training the pruned architecture from fresh weights")
            reinitialize(pruned)
        else:
            after_pruning = _after_pruning(pruned, data, cfg, run_dir, device)
        student = extend(pruned, **partner_args) if cfg.partners else pruned
    if cfg.soft:
        hooks.append(SoftPruner(student, example, flops_reduction=cfg.flops_reduction,
                                soft_every=cfg.soft_every, importance=cfg.importance,
                                round_to=cfg.round_to, soft_partners=cfg.soft_partners,
                                placement=cfg.placement))
    if partner_blocks(student) and state is None and main:
        log.info("%s partners: each training step costs about %s a --no-partners step "
                 "(resnet18, benchmarks/results/train_step_kinds.md); in bpl's recovery study "
                 "(docs/results.md) partners were no more accurate than plain fine-tuning "
                 "(--no-partners); more --epochs was what won accuracy back",
                 cfg.partner, partner_kind(cfg.partner).step_cost)
    terms = _loss_terms(cfg, student, baseline)
    result = fit_run(cfg, student, data, run_dir, meta, command="compress", state=state,
                  progress=progress, started=t0, loss_terms=terms, hooks=hooks,
                  replay=_replay_curve(cfg, base_meta))
    if not main:
        return {}
    selected = select_epoch(cfg, student, run_dir, result, soft=cfg.soft)
    student = student.cpu().eval()
    base_eval = evaluate_split(baseline, data, cfg, device)
    if data.val is not None and len(data.val):  # the reference line of the curves
        base_eval["val_top1"] = evaluate_split(baseline, data, cfg, device, "val")["top1"]
    check_x = _check_inputs(data)
    metrics: dict[str, Any] = {"command": "compress", "config": cfg.to_dict("compress")}
    if cfg.soft:
        deploy = hooks[0].finalize(student, check_x, verify_tol=cfg.verify_tol)
        soft = reports(deploy)["soft"]
        metrics["removal_error"] = soft.removal_error
        metrics["fusion_error"] = soft.fusion_error
        metrics["soft_updates"] = soft.updates
    elif cfg.partners:
        deploy, metrics["fusion_error"] = _fuse_checked(student, check_x, cfg.verify_tol)
    else:
        deploy = student
    deploy_eval = evaluate_split(deploy, data, cfg, device)
    if cfg.soft and data.val is not None and len(data.val):
        # the soft schedule's last re-pick comes after the last validation: score what ships
        selected["val_top1"] = evaluate_split(deploy, data, cfg, device, "val")["top1"]
    save_model(deploy.cpu(), run_dir / "deploy.pt", arch=cfg.arch, num_classes=data.num_classes,
               meta={**meta, "epochs": result.epochs, "baseline_epochs": base_meta.get("epochs")})
    models = {
        "baseline": measure(baseline, cfg, base_eval["top1"]),
        "compressed": measure(deploy, cfg, deploy_eval["top1"]),
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
        images=images_read(data),
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
    if cfg.max_drop is not None and cfg.select == "best":
        # a step keeps its best epoch at an annealed learning rate, not a mid-schedule maximum
        # (it is judged by its annealed tail's mean, as the baseline is: _budget_reference)
        cfg = replace(cfg, select="annealed")
    budget = math.inf if cfg.max_drop is None else cfg.max_drop
    levels = LEVELS if cfg.max_drop is not None else step_levels(cfg.flops_reduction,
                                                                   cfg.prune_steps)
    device = select_device(cfg.device)
    example = example_input(cfg)
    check_x = _check_inputs(data)
    replay = _replay_curve(cfg, base_meta)
    steps_dir = run_dir / "steps"
    fits: dict[int, dict[str, Any]] = {}

    def score(model: nn.Module) -> float:  # validation top-1; NaN without a validation split
        top1 = evaluate_split(model, data, cfg, device, "val")["top1"] if has_val else math.nan
        model.cpu()
        return top1

    def judge(model: nn.Module) -> float:
        """A recovered step's validation top-1 as the budget reads it: the mean of the
        annealed stretch of the epoch it kept (engine.annealed_stretch; recover() just
        recorded it for the latest step), as the baseline's is read; the kept model's own
        score where the recovery never annealed (--recipe constant)."""
        judged = fits[max(fits)].get("judged_on") if fits else None
        return judged["val_top1"] if judged else score(model)

    def recover(pruned: nn.Module, step: int) -> nn.Module:
        step_dir = steps_dir / str(step)
        step_dir.mkdir(parents=True, exist_ok=True)
        state = resume_state(step_dir, cfg)
        student = (model_from_payload(state["model"])[0] if state is not None
                   else extend(pruned, **_partner_args(cfg)) if cfg.partners else pruned)
        result = fit_run(cfg, student, data, step_dir, meta, command="compress", state=state,
                      progress=progress, started=time.perf_counter(),
                      loss_terms=_loss_terms(cfg, student, baseline), replay=replay)
        selected = select_epoch(cfg, student, step_dir, result)
        student = student.cpu().eval()
        deploy, fusion_error = (_fuse_checked(student, check_x, cfg.verify_tol) if cfg.partners
                                else (student, None))
        fits[step] = {"epochs_trained": result.epochs, "stopped": result.stopped,
                      "selected": selected, "fusion_error": fusion_error,
                      "history": result.history, "precision": result.precision,
                      "train_time_s": sum(row["epoch_time_s"] for row in result.history)}
        stretch = (annealed_stretch(result.history, selected["epoch"])
                   if cfg.max_drop is not None and has_val else None)
        if stretch is not None:
            fits[step]["judged_on"] = {
                "first_epoch": stretch[0], "last_epoch": stretch[1], "val_top1": stretch[2],
                "from": "the mean validation top-1 of the annealed epochs around the kept one"}
        return deploy

    def on_step(step: BudgetStep, model: nn.Module) -> None:
        step_dir = steps_dir / str(step.step)
        save_model(model.cpu(), step_dir / "deploy.pt", arch=cfg.arch,
                   num_classes=data.num_classes, meta={**meta, "budget_step": asdict(step)})
        write_json(step_dir / "step.json", {**asdict(step), **fits.get(step.step, {})})
        write_budget_curve(run_dir, reference, cfg.max_drop, _recorded_steps(steps_dir))

    baseline = baseline.cpu().eval()
    reference = score(baseline)
    reference_info = {"val_top1": reference, "from": "the baseline's validation top-1"}
    if cfg.max_drop is not None:
        reference_info = _budget_reference(cfg, base_meta, reference)
        reference = reference_info["val_top1"]
        _warn_if_budget_in_noise(cfg.max_drop, reference, len(data.val))
    done = _recorded_steps(steps_dir)
    within = [d["step"] for d in done if d["within"]]
    start = load_model(steps_dir / str(within[-1]) / "deploy.pt")[0] if within else baseline
    search = prune_within(
        start, example, max_drop=budget, recover=recover,
        score=judge if cfg.max_drop is not None else score, reference=reference,
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
    base_eval = evaluate_split(baseline, data, cfg, device)
    base_eval["val_top1"] = reference if has_val else None
    deploy_eval = evaluate_split(deploy, data, cfg, device)  # the one evaluation of the test split
    save_model(deploy.cpu(), run_dir / "deploy.pt", arch=cfg.arch, num_classes=data.num_classes,
               meta={**meta, "epochs": trained, "budget_step": asdict(chosen),
                     "baseline_epochs": base_meta.get("epochs")})
    models = {"baseline": measure(baseline, cfg, base_eval["top1"]),
              "compressed": measure(deploy, cfg, deploy_eval["top1"])}
    why = (f"step {chosen.step} of the search: the smallest model within --max-drop "
           f"{cfg.max_drop:g}" if cfg.max_drop is not None
           else f"step {chosen.step} of {len(levels)}: the last cut")
    selected = dict(kept["selected"], why=f"{why}; {kept['selected']['why']}")
    metrics = {
        "command": "compress", "config": cfg.to_dict("compress"),
        "budget": {**search.to_dict(), "steps": steps, "reference_from": reference_info},
        "baseline": base_eval, "baseline_epochs": base_meta.get("epochs"),
        "final": deploy_eval, "classes": list(data.classes), "selected": selected,
        "fusion_error": kept.get("fusion_error"),
        "epochs_trained": trained,  # the kept model's: the recoveries of its step and before
        "stopped": search.stopped, "history": kept["history"], "models": models,
        "macs_reduction": 1 - models["compressed"]["macs"] / models["baseline"]["macs"],
        "wall_time_s": time.perf_counter() - t0, "precision": kept["precision"],
        "images": images_read(data),
    }
    write_report(run_dir, metrics)
    return metrics


def baseline_history(cfg: Config, base_meta: dict[str, Any]) -> list[dict[str, Any]] | None:
    """The baseline's training history (learning rate and validation top-1 of every epoch):
    from its checkpoint (``meta["curves"]``, bpl 0.3 on) or the ``metrics.json`` of the run
    beside it, when that run is the one that wrote the checkpoint; None otherwise."""
    curves = base_meta.get("curves")
    if curves:
        rows = [{"lr": lr, "val_top1": v} for lr, v in zip(curves["lr"], curves["val_top1"],
                                                          strict=True)]
        for row, top in zip(rows, curves.get("lr_last") or [], strict=False):
            if top is not None:  # bpl 0.3 on: the rate of each epoch's last step (annealed_epochs)
                row["lr_last"] = top
        return rows
    if not cfg.baseline or base_meta.get("kept_epoch") is None:
        return None
    beside = Path(cfg.baseline).parent / "metrics.json"
    try:
        metrics = json.loads(beside.read_text())
    except (OSError, ValueError):
        return None
    history = metrics.get("history") or []
    same = (metrics.get("command") == "train" and len(history) == base_meta.get("epochs")
            and (metrics.get("selected") or {}).get("epoch") == base_meta["kept_epoch"])
    return history if same else None


def _budget_reference(cfg: Config, base_meta: dict[str, Any], measured: float
                      ) -> dict[str, Any]:
    """What ``--max-drop`` measures each step against: the mean validation top-1 of the
    stretch of annealed epochs that holds the checkpoint's epoch, or the stretch nearest
    to it if it was kept mid-schedule (:func:`~bpl.engine.annealed_stretch`), as each step
    is judged. The run's last stretch may be another model: a cycles baseline ends with
    the cycle that did not beat the kept one. A single epoch's score is
    the maximum of many noisy evaluations: ``--select best`` kept baselines up to 1.8
    points above their best annealed epoch, and even the best annealed epoch of a
    baseline's cycles judged cuts 0.8-2.7 points worse than held-out images found them
    (docs/results.md), more than a 1-point budget. Without the baseline's curves: the
    checkpoint's own score."""
    history = baseline_history(cfg, base_meta)
    kept = base_meta.get("kept_epoch")
    stretch = annealed_stretch(history, kept) if history else None
    if stretch is None:
        return {"val_top1": measured, "epoch": kept,
                "from": "the baseline checkpoint's validation top-1"}
    first, last, top1 = stretch
    log.info("--max-drop measures against %.2f%%, the baseline's mean validation top-1 over "
             "the annealed epochs %d-%d around its checkpoint's (epoch %s: %.2f%%), as each "
             "step is judged", top1, first, last, kept, measured)
    return {"val_top1": top1, "first_epoch": first, "last_epoch": last,
            "checkpoint_val_top1": measured, "checkpoint_epoch": kept,
            "from": "the mean validation top-1 of the baseline's annealed epochs around its "
                    "checkpoint's"}


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
    check_same_split(cfg, base_meta, data)
    size = base_meta.get("image_size")
    if size and size != cfg.image_size:
        log.warning("the baseline was trained at %d px but this run uses --image-size %d: "
                    "its accuracy and MACs are measured at %d px; pass --image-size %d to "
                    "keep the baseline's", size, cfg.image_size, cfg.image_size, size)
