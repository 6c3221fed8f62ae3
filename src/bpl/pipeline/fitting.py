"""Training a model inside a run: its data (and a compress run's reuse of its baseline's
split), settings, resumable fit, epoch choice and test, shared by `bpl train` and
`bpl compress`."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import distributed
from ..config import Config
from ..data import load_dataset, read_split, split_digests
from ..engine import (
    ANNEALED,
    FitResult,
    LossTerm,
    TrainSettings,
    evaluate,
    fit,
    make_loader,
    select_device,
)
from ..errors import BPLError
from ..files import atomic_write_text
from ..models import (
    load_checkpoint,
    model_payload,
)
from ..profiling import profile

log = logging.getLogger(__name__)


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


def same_data(cfg: Config, base_meta: dict[str, Any]) -> bool:
    """Whether this run reads the data the baseline was trained on (same dataset, same root)."""
    root = str(Path(cfg.data_root).resolve()) if cfg.data_root else None
    return base_meta.get("data") == cfg.data and base_meta.get("data_root") == root


def adopt_baseline_split(cfg: Config, run_dir: Path, base_meta: dict[str, Any]) -> None:
    """Start a new run from the baseline's own split (``split.json`` beside its checkpoint,
    as `bpl evaluate` and `bpl export` read it) when this run reads the same data with the
    same ratios: its test images are then exactly the baseline's, whatever ``--seed``
    (which then only seeds the training)."""
    target = run_dir / "split.json"
    source = Path(cfg.baseline).parent / "split.json" if cfg.baseline else None
    if target.exists() or source is None or not source.is_file() or not same_data(cfg, base_meta):
        return
    split = read_split(source)
    asked = {"val_ratio": cfg.val_ratio, "train_subset": cfg.train_subset}
    if cfg.train_ratio is not None:
        asked["train_ratio"] = cfg.train_ratio
    if any(split.get(k) != v for k, v in asked.items()):
        return  # another split asked for: made by --seed, and checked (check_same_split)
    atomic_write_text(target, source.read_text())
    log.info("using the baseline's split (%s): the same training, validation and test images",
             source)


def check_same_split(cfg: Config, base_meta: dict[str, Any], data) -> None:
    """Refuse to test a baseline on another split than it was trained with (its training
    images would be scored as test images); say so when only its validation part differs
    (validation could then hold images it trained on). Baselines that do not record their
    split (bpl 0.2 and earlier, other tools) are not checked."""
    theirs = base_meta.get("split")
    if not theirs or not same_data(cfg, base_meta):
        return
    ours = split_digests(data.split)
    how = ", ".join(f"--{k.replace('_', '-')} {theirs[k]}" for k in ("seed", "val_ratio",
                                                                      "train_subset")
                    if theirs.get(k) is not None)
    if ours["test"] != theirs["test"]:
        raise BPLError(f"{cfg.baseline} was trained on another split of the data ({how}) than "
                       "this run's: images it trained on would be scored as test images; "
                       f"pass the options it was split with ({how})")
    if ours["val"] != theirs.get("val"):
        log.warning("%s was validated on other images than this run's validation split (it "
                    "was split with %s): validation may score images it trained on",
                    cfg.baseline, how)


def run_meta(cfg: Config, data) -> dict[str, Any]:
    return {
        "classes": list(data.classes),
        "mean": list(data.mean),
        "std": list(data.std),
        "image_size": cfg.image_size,
        "epochs": cfg.epochs,
        "data": cfg.data,
        "data_root": str(Path(cfg.data_root).resolve()) if cfg.data_root else None,
        # which images the run trained, chose and tested on: `bpl compress` refuses to test
        # a baseline on images it trained on (another --seed, say)
        "split": {"seed": cfg.seed, "train_ratio": cfg.train_ratio, "val_ratio": cfg.val_ratio,
                  "train_subset": cfg.train_subset, **split_digests(data.split)},
    }


def images_read(data) -> dict[str, Any]:
    """How the run read its images (``memory``, ``mmap``, ``off`` or ``bundled``) and why:
    kept in ``metrics.json`` so a run's speed can be told apart from its cache's."""
    return {"mode": data.cache_mode, "why": data.cache_why}


def example_input(cfg: Config, batch: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, cfg.image_size, cfg.image_size)


def measure(model: nn.Module, cfg: Config, top1: float | None) -> dict[str, Any]:
    model = model.cpu().eval()
    prof = profile(model, example_input(cfg), latency=cfg.latency)
    return {"top1": top1, "macs": prof["macs"], "params": prof["params"],
            "latency_ms": prof.get("latency_ms")}


def train_settings(cfg: Config, replay: list[float] | None = None) -> TrainSettings:
    """The engine's settings for ``cfg``: ``--epochs auto`` trains at most ``--max-epochs``
    and stops when its rule says so; a number of ``--epochs`` trains that many, under any
    schedule (the cycles restart, the plateau rule only decays the rate)."""
    settings = TrainSettings.from_object(cfg)
    settings.until_converged = cfg.epochs == "auto"
    if cfg.epochs == "auto":
        settings.epochs = cfg.max_epochs
    if replay is not None:
        settings.replay = list(replay)
    return settings


def resume_state(run_dir: Path, cfg: Config) -> dict | None:
    """``last.pt`` of the run being resumed; more epochs than it has done may be asked, not fewer."""
    if not (run_dir / "last.pt").exists():
        return None
    state = load_checkpoint(run_dir / "last.pt")
    epochs = train_settings(cfg).epochs
    if state.get("epoch", 0) > epochs:
        flag = "--max-epochs" if cfg.epochs == "auto" else "--epochs"
        raise BPLError(f"{flag} {epochs} is fewer than the {state['epoch']} epochs {run_dir} "
                       f"has already trained; pass {flag} of at least that")
    return state


def fit_run(cfg: Config, model: nn.Module, data, run_dir: Path, meta: dict[str, Any], *,
         command: str, state: dict | None, progress: bool, started: float,
         loss_terms: dict[str, LossTerm] | None = None, hooks: list | None = None,
         replay: list[float] | None = None) -> FitResult:
    """Train ``model`` on the training split, validating on the validation split."""
    return fit(
        model, data.train, data.val, train_settings(cfg, replay), run_dir,
        num_classes=data.num_classes,
        payload=lambda m: model_payload(m, cfg.arch, data.num_classes, meta),
        loss_terms=loss_terms,
        hooks=hooks or (),
        resume_state=state,
        record=cfg.to_dict(command),
        progress=progress,
        started=started,
    )


def select_epoch(cfg: Config, model: nn.Module, run_dir: Path, result: FitResult,
            soft: bool = False) -> dict[str, Any]:
    """Load the epoch the run keeps into ``model``; returns what was kept and why.

    ``select="best"``: the epoch of best validation top-1 (``best.pt``); ``"annealed"``:
    the best of the epochs trained at an annealed learning rate (:data:`~bpl.engine.ANNEALED`);
    ``"last"``, no validation split, no annealed epoch, or the soft schedule (whose masks
    are final only at the end): the last epoch.
    """
    last = len(result.history)
    if cfg.select == "last" or soft or result.best_val_top1 is None:
        why = ("--select last" if cfg.select == "last" else
               "the soft schedule's pruning masks are final only after the last epoch" if soft
               else "there is no validation split (--val-ratio 0)"
               if not any("val_top1" in row for row in result.history)
               else f"no epoch was trained at an annealed learning rate (at most "
                    f"{ANNEALED:g} of the peak), so --select annealed had none to choose")
        return {"epoch": last, "of": last, "why": why}
    if result.best_epoch != last:
        state = load_checkpoint(run_dir / "best.pt", model_only=True)["state_dict"]
        model.load_state_dict(state)
    among = " among the annealed epochs" if cfg.select == "annealed" else ""
    return {"epoch": result.best_epoch, "of": last,
            "why": f"best validation top-1{among} ({result.best_val_top1:.2f}%)",
            "val_top1": result.best_val_top1}


def evaluate_split(model: nn.Module, data, cfg: Config, device: torch.device,
          part: str = "test") -> dict[str, Any]:
    """The one evaluation of the test split, at the end of a run (or of another ``part``)."""
    loader = make_loader(getattr(data, part), batch_size=cfg.batch_size, train=False,
                         device=device, shard=False, workers=cfg.workers)
    return evaluate(model.to(device), loader, data.num_classes, device=device)




def check_processes(cfg: Config) -> None:
    """Refuse --sync-bn where it would do nothing (one process) or cannot run (the CPU)."""
    if not cfg.sync_bn:
        return
    if not distributed.current().enabled:
        raise BPLError("--sync-bn averages BatchNorm statistics over the processes of a torchrun "
                       "job, and this run is one process: leave it out, or start it with torchrun")
    if select_device(cfg.device).type != "cuda":
        raise BPLError("--sync-bn runs on CUDA only (PyTorch's SyncBatchNorm): leave it out on "
                       "the CPU")
