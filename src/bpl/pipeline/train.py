"""`bpl train`: a baseline trained from scratch or from pretrained weights."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from .. import distributed
from ..config import Config
from ..engine import (
    FitResult,
    seed_everything,
    select_device,
)
from ..errors import BPLError
from ..files import atomic_save
from ..models import (
    build_model,
    load_checkpoint,
    model_from_payload,
)
from ..report import write_report
from .fitting import (
    check_processes,
    evaluate_split,
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


def train_baseline(cfg: Config, *, progress: bool = True) -> dict[str, Any]:
    """`bpl train`: train ``cfg.arch`` on ``cfg.data`` from scratch (or given weights)."""
    seed_everything(cfg.seed)
    check_processes(cfg)
    with open_run(cfg, "train") as run_dir:
        return _train_baseline(cfg, run_dir, progress)




def _train_baseline(cfg: Config, run_dir: Path, progress: bool) -> dict[str, Any]:
    t0 = time.perf_counter()
    if cfg.schedule == "replay":
        raise BPLError("--recipe rewind (--schedule replay) replays a baseline's learning rates "
                       "while fine-tuning it: it is for bpl compress; choose another --recipe "
                       "or --schedule for bpl train")
    data = load_data(cfg, run_dir, progress)
    meta = run_meta(cfg, data)
    state = resume_state(run_dir, cfg) if cfg.resume else None
    if state is not None:
        model, _ = model_from_payload(state["model"])
    else:
        model = build_model(cfg.arch, data.num_classes, pretrained=cfg.pretrained, weights=cfg.weights)
    result = fit_run(cfg, model, data, run_dir, meta, command="train", state=state,
                  progress=progress, started=t0)
    if not distributed.current().is_main:
        return {}
    selected = select_epoch(cfg, model, run_dir, result)
    _record_schedule(run_dir / "best.pt", result, selected)
    final = evaluate_split(model, data, cfg, select_device(cfg.device))
    metrics = {
        "command": "train",
        "config": cfg.to_dict("train"),
        "final": final,
        "classes": list(data.classes),
        "selected": selected,
        "epochs_trained": result.epochs,
        "stopped": result.stopped,
        "history": result.history,
        "models": {"baseline": measure(model, cfg, final["top1"])},
        "wall_time_s": result.earlier_wall_time_s + time.perf_counter() - t0,
        "segments": result.segments,
        "precision": result.precision,
        "images": images_read(data),
    }
    write_report(run_dir, metrics)
    return metrics


def _record_schedule(best: Path, result: FitResult, selected: dict[str, Any]) -> None:
    """Write into ``best.pt`` how long the baseline trained, the learning rate of each
    epoch up to the one kept (what `bpl compress --recipe rewind` replays) and the rates and
    validation top-1 of every epoch (what `bpl compress --max-drop` measures against)."""
    if not best.exists():
        return
    payload = load_checkpoint(best, model_only=True)
    payload.setdefault("meta", {}).update(
        epochs=result.epochs, kept_epoch=selected["epoch"],
        lr_curve=[row["lr"] for row in result.history[: selected["epoch"]]],
        curves={"lr": [row["lr"] for row in result.history],
                "lr_last": [row.get("lr_last") for row in result.history],
                "val_top1": [row.get("val_top1") for row in result.history]})
    atomic_save(payload, best)
