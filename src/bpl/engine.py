"""Train and evaluate: the loop behind every bpl command, and nothing of BPL itself.

Loss = cross-entropy + whatever extra loss terms the caller passes (the pipeline passes
the diversity loss and distillation), SGD with momentum, a per-iteration cosine or step
schedule with warm-up (or the cosine cycles or plateau of ``--epochs auto``), mixed precision
and channels_last (float16 on CUDA; bfloat16 on a CPU with AMX when asked:
:mod:`bpl.precision`), and epoch hooks (the soft pruner is one). After every epoch the model is evaluated on the
validation set (in float32), the epoch with the best validation top-1 is kept in
``best.pt``, and the whole training state is
written atomically to ``last.pt``, so a run killed at any point resumes from the last
complete epoch and ends exactly where an uninterrupted run would have. The test split
never enters this module: the caller evaluates it once, at the end.
"""

from __future__ import annotations

import csv
import importlib.util
import io
import logging
import math
import os
import random
import shutil
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from torch.utils.data.distributed import DistributedSampler
from tqdm.auto import tqdm

from . import distributed
from .errors import BPLError, TrainingDiverged
from .files import atomic_save, atomic_write_text
from .modules import eval_mode
from .precision import Precision, choose_precision

__all__ = [
    "ANNEALED",
    "SCHEDULES",
    "SELECT",
    "EpochHook",
    "FitResult",
    "Cycles",
    "Plateau",
    "LossTerm",
    "Step",
    "TrainSettings",
    "TrainingDiverged",
    "annealed_best",
    "annealed_epochs",
    "annealed_stretch",
    "check_compile",
    "replayed_curve",
    "evaluate",
    "fit",
    "make_loader",
    "select_device",
    "seed_everything",
]

log = logging.getLogger(__name__)
CHECKPOINT_FORMAT = "bpl-train/1"
#: Learning-rate schedules :func:`fit` runs (after ``warmup_epochs`` of linear warm-up):
#: cosine to zero, x``gamma`` at ``milestones``, a 1-cycle (up over the first 30%, then
#: down to 1/10,000 of the start), constant, ``plateau`` (x``gamma`` whenever validation
#: top-1 stops improving, ending the run after ``decays`` decays: :class:`Plateau`), and
#: ``replay``: the per-epoch learning rates in ``TrainSettings.replay`` (another run's,
#: for learning-rate rewinding) stretched or squeezed over this run's epochs, and
#: ``cycles``: cosine cycles of ``cycle_epochs`` restarting at the full learning rate,
#: until a cycle no longer improves validation top-1 (:class:`Cycles`).
SCHEDULES: tuple[str, ...] = ("cosine", "step", "onecycle", "constant", "plateau", "replay",
                              "cycles")
#: The schedules that decide on the validation split (when to decay, when to stop).
VALIDATED: tuple[str, ...] = ("plateau", "cycles")
#: An epoch is trained at an annealed learning rate when its rate has come down to this
#: fraction of the schedule's peak or less, and is not rising (a warm-up's first epochs
#: are not annealed): the last ~20% of a cosine, each cycle's tail, the epochs after a
#: 10x decay. ``select="annealed"`` keeps the best of these.
ANNEALED = 0.1
#: Which epoch a run keeps (``TrainSettings.select``): the best on the validation split,
#: the best of the annealed epochs, or the last.
SELECT: tuple[str, ...] = ("best", "annealed", "last")


@dataclass
class TrainSettings:
    """How :func:`fit` optimises: plain values, nothing about the model or the method."""

    epochs: int = 10
    batch_size: int = 64
    lr: float = 0.05
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 1e-4
    schedule: str = "cosine"
    milestones: Sequence[float] = (0.5, 0.75)
    gamma: float = 0.1
    warmup_epochs: int = 0
    patience: int = 10  # plateau: epochs without a validation gain before the lr decays
    min_gain: float = 0.0  # plateau: validation top-1 points that count as a gain
    decays: int = 2  # plateau: decays of the lr; the plateau after the last ends the run
    cycle_epochs: int = 40  # cycles: the length of each cosine cycle (40: the recovery study's baselines)
    # cycles and plateau: end training when the rule says it has converged (--epochs auto,
    # epochs the cap); False trains all the epochs, the rule only steering the rate
    until_converged: bool = True
    replay: Sequence[float] = ()  # replay: the learning rate of each epoch of the run replayed
    label_smoothing: float = 0.0
    device: str = "auto"
    amp: bool = True  # mixed precision: fp16 on CUDA; on a CPU only with cpu_bf16
    cpu_bf16: bool = False  # bf16 + channels_last on a CPU with AMX (opt-in: docs/results.md)
    channels_last: bool = True  # with mixed precision (and always on CUDA)
    workers: int = 0
    sync_bn: bool = False
    seed: int = 0
    compile: bool = False  # torch.compile the model for training (evaluation stays eager)
    select: str = "best"  # which epoch best.pt holds: "best", "annealed" (best at <=ANNEALED of the peak rate) or "last"

    @classmethod
    def from_object(cls, obj: Any) -> TrainSettings:
        """The fields of ``obj`` (a config, a namespace) that share a name with these."""
        return cls(**{f: getattr(obj, f) for f in cls.__dataclass_fields__ if hasattr(obj, f)})


@dataclass
class Step:
    """What an extra loss term sees of one training step."""

    model: nn.Module  # the model being trained (wrapped in DDP under torchrun)
    inputs: torch.Tensor
    targets: torch.Tensor
    logits: torch.Tensor
    autocast: Callable[[], AbstractContextManager]  # the step's mixed-precision context


#: An extra loss term: a function of the step, returning a scalar added to the loss.
LossTerm = Callable[[Step], torch.Tensor]


class EpochHook(Protocol):
    """Something that acts on the model during training (the soft pruner is one)."""

    def after_step(self) -> None: ...
    def epoch_end(self, epoch: int) -> None: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


@dataclass
class FitResult:
    """What :func:`fit` returns: per-epoch history and which epoch validation chose."""

    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = 0  # the epoch in best.pt: best validation top-1 (the last without one)
    best_val_top1: float | None = None
    resumed_from: int = 0
    precision: list[dict[str, str]] = field(default_factory=list)  # what each segment ran in
    earlier_wall_time_s: float = 0.0  # wall time of the segments before a resume
    segments: int = 1  # how many runs (the first and each resume) made this one
    stopped: str = ""  # why training ended: the epochs ran out, or (plateau) it converged

    @property
    def epochs(self) -> int:
        """Epochs trained, all segments together."""
        return len(self.history)


class Plateau:
    """The ``plateau`` schedule: decay on a plateau of validation top-1, stop at the last.

    An epoch counts as a gain when validation top-1 beats the best so far by more than
    ``min_gain`` points. After ``patience`` epochs without one, the learning rate is
    multiplied by ``gamma``; once it has been decayed ``decays`` times, the next
    plateau ends training: the model has converged at the smallest learning rate.
    """

    def __init__(self, patience: int, min_gain: float, decays: int, gamma: float) -> None:
        self.patience, self.min_gain, self.decays, self.gamma = patience, min_gain, decays, gamma
        self.best: float | None = None
        self.since = 0  # epochs since the last gain (or decay)
        self.done = 0  # decays so far
        self.converged = False

    @property
    def factor(self) -> float:
        """What the learning rate is multiplied by now."""
        return self.gamma ** self.done

    def update(self, val_top1: float) -> str | None:
        """Take one epoch's validation top-1; return what changed ("decay", "stop") if anything."""
        if self.best is None or val_top1 > self.best + self.min_gain:
            self.best, self.since = val_top1, 0
            return None
        self.since += 1
        if self.since < self.patience:
            return None
        self.since = 0
        if self.done < self.decays:
            self.done += 1
            return "decay"
        self.converged = True
        return "stop"

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "since": self.since, "done": self.done,
                "converged": self.converged}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.since = state["best"], state["since"]
        self.done, self.converged = state["done"], state["converged"]

    def describe(self) -> str:
        """Why a converged run stopped, in words for the log and the report."""
        gain = f" by more than {self.min_gain:g} points" if self.min_gain else ""
        return (f"converged: validation top-1 did not improve{gain} for {self.patience} "
                f"epoch{'s' if self.patience > 1 else ''} after {self.done} learning-rate "
                f"decay{'s' if self.done != 1 else ''}")


class Cycles:
    """The ``cycles`` schedule: cosine cycles that restart at the full learning rate (SGDR,
    Loshchilov & Hutter 2017), until one does not pay.

    Each cycle anneals from the peak to zero over ``length`` epochs (the first after the
    warm-up). At the end of a cycle, when its best validation top-1 does not beat the best
    of the cycles before it by more than ``min_gain`` points, training ends: another cycle
    is not expected to pay either. A cycle is judged by its best epoch, which comes near
    its end, where the rate is small (in the convergence pilot each cycle's best was within
    2 points of its last epoch's, and both rules stopped at the same cycles).
    """

    def __init__(self, length: int, min_gain: float) -> None:
        self.length, self.min_gain = length, min_gain
        self.epochs = 0  # epochs seen
        self.best: float | None = None  # best validation top-1 so far
        self.before: float | None = None  # ... when the current cycle began
        self.gain: float | None = None  # what the last finished cycle added
        self.converged = False

    @property
    def cycles(self) -> int:
        """Cycles finished."""
        return self.epochs // self.length

    def update(self, val_top1: float) -> str | None:
        """Take one epoch's validation top-1; "restart" or "stop" at the end of a cycle."""
        self.epochs += 1
        self.best = val_top1 if self.best is None else max(self.best, val_top1)
        if self.epochs % self.length:
            return None
        if self.before is not None:
            self.gain = self.best - self.before
            if self.gain <= self.min_gain:
                self.converged = True
                return "stop"
        self.before = self.best
        return "restart"

    def state_dict(self) -> dict[str, Any]:
        return {"epochs": self.epochs, "best": self.best, "before": self.before,
                "gain": self.gain, "converged": self.converged}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epochs, self.best, self.before = state["epochs"], state["best"], state["before"]
        self.gain, self.converged = state["gain"], state["converged"]

    def describe(self) -> str:
        """Why a converged run stopped, in words for the log and the report."""
        gain = f"more than {self.min_gain:g} points" if self.min_gain else "anything"
        return (f"converged: cosine cycle {self.cycles} of {self.length} epochs added "
                f"{self.gain:+.2f} points of validation top-1, not {gain}")


def select_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA when available, else the CPU."""
    ctx = distributed.current()
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and ctx.enabled:
        name = f"cuda:{ctx.local_rank}"
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BPLError(f"--device {name} asked for CUDA, but no GPU is visible; use --device cpu")
    return device


def check_compile(device: torch.device) -> None:
    """Refuse ``compile`` up front where torch.compile cannot build its kernels.

    On the CPU its backend compiles C++ (a compiler named by ``$CXX``, or g++ / c++ /
    clang++ on the PATH); on CUDA it needs Triton.
    """
    if device.type == "cpu":
        names = [os.environ.get("CXX"), "g++", "c++", "clang++"]
        if not any(name and shutil.which(name) for name in names):
            raise BPLError("--compile on the CPU needs a C++ compiler and none was found "
                           "(g++, c++, clang++ or $CXX); install one (apt-get install g++) "
                           "or train without --compile")
    elif device.type == "cuda" and importlib.util.find_spec("triton") is None:
        raise BPLError("--compile on CUDA needs Triton, which is not installed; "
                       "pip install triton, or train without --compile")


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices) and prefer deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True


def make_loader(
    dataset: Dataset,
    *,
    batch_size: int,
    train: bool,
    device: torch.device,
    workers: int = 0,
    seed: int = 0,
    shard: bool = True,
) -> DataLoader:
    """A DataLoader of this process's share of ``dataset``.

    ``batch_size`` is the global batch: under torchrun each of the N processes
    takes ``batch_size / N`` samples a step (a DistributedSampler, reseeded every
    epoch by :func:`fit`), so the learning rate means the same for any N. Evaluation
    gives rank r the samples r, r+N, r+2N, ...: every sample exactly once overall.
    ``shard=False`` gives the whole set to this process.
    """
    ctx = distributed.current() if shard else distributed.Context()
    batch = batch_size if train else max(batch_size, 64)
    if ctx.enabled and not train:  # any evaluation batch will do: share it out evenly
        batch = -(-batch // ctx.world_size) * ctx.world_size
    if ctx.enabled and batch % ctx.world_size:
        raise BPLError(f"--batch-size {batch} must be divisible by the {ctx.world_size} processes")
    batch //= ctx.world_size
    sampler = None
    if ctx.enabled and train:
        sampler = DistributedSampler(dataset, ctx.world_size, ctx.rank, shuffle=True,
                                     seed=seed, drop_last=True)
    elif ctx.enabled:
        dataset = Subset(dataset, range(ctx.rank, len(dataset), ctx.world_size))
    return DataLoader(
        dataset,
        batch_size=batch,
        shuffle=train and sampler is None,
        sampler=sampler,
        drop_last=train and len(dataset) > batch,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        persistent_workers=workers > 0,
        generator=torch.Generator() if train else None,
    )


def _cosine(start: float, end: float, progress: float) -> float:
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * min(max(progress, 0.0), 1.0)))


def _lr_lambda(
    cfg: TrainSettings, steps_per_epoch: int, plateau: Plateau | Cycles | None = None
) -> Callable[[int], float]:
    """The learning rate of each step, as a multiple of ``cfg.lr``."""
    if cfg.schedule not in SCHEDULES:
        raise BPLError(f"--schedule must be one of {', '.join(SCHEDULES)}, got {cfg.schedule!r}")
    total = cfg.epochs * steps_per_epoch
    warm = cfg.warmup_epochs * steps_per_epoch
    bounds = [int(m * total) for m in cfg.milestones]
    curve = [float(v) / cfg.lr for v in getattr(cfg, "replay", ())]
    if cfg.schedule == "replay" and not curve:
        raise BPLError("the replay schedule (--recipe rewind) needs the learning rates to replay")

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        progress = (step - warm) / max(1, total - warm)
        if cfg.schedule == "cosine":
            return _cosine(1.0, 0.0, progress)
        if cfg.schedule == "step":
            return cfg.gamma ** sum(step >= b for b in bounds)
        if cfg.schedule == "onecycle":  # torch's OneCycleLR shape: from 1/25 up, then down to 1/25e4
            up = 0.3
            return (_cosine(1 / 25, 1.0, progress / up) if progress < up
                    else _cosine(1.0, 1 / 25e4, (progress - up) / (1 - up)))
        if cfg.schedule == "plateau":
            return plateau.factor if isinstance(plateau, Plateau) else 1.0
        if cfg.schedule == "cycles":  # the warm-up belongs to the first cycle
            cycle = cfg.cycle_epochs * steps_per_epoch
            first = step < cycle
            into = (step - warm) if first else (step % cycle)
            return _cosine(1.0, 0.0, into / max(1, cycle - (warm if first else 0)))
        if cfg.schedule == "replay":  # epoch e of the curve spans [e, e+1) of its length
            at = min(max(progress, 0.0), 1.0) * len(curve) - 0.5
            low = min(max(int(math.floor(at)), 0), len(curve) - 1)
            high = min(low + 1, len(curve) - 1)
            frac = min(max(at - low, 0.0), 1.0)
            return curve[low] + (curve[high] - curve[low]) * frac
        return 1.0  # constant

    return factor


def replayed_curve(curve: Sequence[float]) -> list[float]:
    """What learning-rate rewinding replays of a run's per-epoch learning rates: all of them,
    or, where the run restarted its learning rate (the ``cycles`` schedule), its last
    complete cycle, so the replay is one anneal from the peak rather than every cycle
    squeezed together. A restart is a jump of more than 1.5x after the rate first fell
    (a warm-up's rise is not one)."""
    curve = [float(v) for v in curve]
    starts, fell = [], False
    for i in range(1, len(curve)):
        if curve[i] < curve[i - 1]:
            fell = True
        elif fell and curve[i] > 1.5 * curve[i - 1]:
            starts.append(i)
    if not starts:
        return curve
    bounds = [0, *starts, len(curve)]
    length = starts[1] - starts[0] if len(starts) > 1 else starts[0]
    if bounds[-1] - bounds[-2] >= length:  # the last cycle ran to its end
        return curve[bounds[-2]:]
    return curve[bounds[-3]:bounds[-2]]


def _refresh_lr(scheduler: torch.optim.lr_scheduler.LambdaLR) -> None:
    """Set the optimiser's learning rate to what the schedule says now (after a plateau decay)."""
    groups = scheduler.optimizer.param_groups
    for group, base, factor in zip(groups, scheduler.base_lrs, scheduler.lr_lambdas, strict=True):
        group["lr"] = base * factor(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in groups]


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: DataLoader,
    num_classes: int,
    *,
    device: torch.device | None = None,
    precision: Precision | None = None,
    progress: bool = False,
    distributed_sum: bool = False,
) -> dict[str, Any]:
    """Loss, top-1, top-5 (percent), per-class accuracy and the confusion matrix on ``loader``.

    With ``distributed_sum`` every rank passes its shard and the counts are summed over
    ranks, so the result covers the whole set once. ``precision`` (default: float32, the
    precision a deployed model runs in, and :func:`fit`'s validation) may make it faster.
    """
    device = device or next(model.parameters()).device
    precision = precision or Precision(None, False, device.type, "float32")
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.long)
    with eval_mode(model):  # every module's own flag back afterwards, also on an error
        loss_sum, top5_hits, seen = 0.0, 0, 0
        k = min(5, num_classes)
        for x, y in tqdm(loader, desc="evaluate", leave=False, disable=None if progress else True):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with precision.autocast():
                logits = model(precision.prepare(x)).float()
            loss_sum += nn.functional.cross_entropy(logits, y, reduction="sum").item()
            top5_hits += (logits.topk(k, dim=1).indices == y[:, None]).any(dim=1).sum().item()
            pred = logits.argmax(dim=1)
            confusion += torch.bincount(
                (y * num_classes + pred).cpu(), minlength=num_classes * num_classes
            ).reshape(num_classes, num_classes)
            seen += y.numel()
    if distributed_sum:
        totals = torch.tensor([loss_sum, top5_hits, seen], dtype=torch.float64)
        loss_sum, top5_hits, seen = distributed.all_reduce_sum(totals).tolist()
        confusion = distributed.all_reduce_sum(confusion)
    if seen == 0:
        raise BPLError("the evaluation set is empty; check the dataset split")
    per_class = (confusion.diag().float() / confusion.sum(1).clamp_min(1).float() * 100).tolist()
    return {
        "loss": loss_sum / seen,
        "top1": 100.0 * confusion.diag().sum().item() / seen,
        "top5": 100.0 * top5_hits / seen,
        "per_class_top1": per_class,
        "confusion": confusion.tolist(),
        "samples": int(seen),
    }


def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class _Logs:
    """The per-epoch CSV log, plus TensorBoard events when tensorboard is installed.

    The CSV is rewritten from the whole history after each checkpoint, so after a
    resume it holds exactly the epochs that ``last.pt`` holds.
    """

    def __init__(self, run_dir: Path) -> None:
        self.csv_path = run_dir / "log.csv"
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        except Exception:  # tensorboard is optional
            self.writer = None

    def write(self, history: list[dict[str, float]]) -> None:
        text = io.StringIO(newline="")
        writer = csv.DictWriter(text, fieldnames=list(history[-1]))
        writer.writeheader()
        writer.writerows(history)
        atomic_write_text(self.csv_path, text.getvalue())
        if self.writer is not None:
            row = history[-1]
            for key, value in row.items():
                if key != "epoch":
                    self.writer.add_scalar(key, value, int(row["epoch"]))
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def fit(
    model: nn.Module,
    train_set: Dataset,
    val_set: Dataset | None,
    settings: TrainSettings,
    run_dir: str | Path,
    *,
    num_classes: int,
    payload: Callable[[nn.Module], dict],
    loss_terms: Mapping[str, LossTerm] | None = None,
    hooks: Sequence[EpochHook] = (),
    resume_state: dict | None = None,
    record: Mapping[str, Any] | None = None,
    progress: bool = True,
    started: float | None = None,
) -> FitResult:
    """Train ``model`` for ``settings.epochs`` epochs, checkpointing ``last.pt`` and ``best.pt``.

    The loss is cross-entropy plus each of ``loss_terms`` (name -> function of the
    :class:`Step`), logged per epoch as ``train_<name>`` with its cost in
    ``<name>_ms_per_step``. ``hooks`` act after every optimiser step and epoch.
    ``val_set`` is evaluated after every epoch; ``best.pt`` holds the epoch with the
    best validation top-1 (every epoch's model in turn when there is no validation set,
    so the last). ``payload(model)`` turns the model into the dict stored in a
    checkpoint; ``record`` (the run's config) is stored beside it. ``resume_state`` is
    a ``last.pt`` loaded by the caller, whose model weights are already in ``model``.
    ``started`` (a ``time.perf_counter()`` value, default: now) is when this segment of the
    run began; each checkpoint adds its time to that of the earlier segments, so a
    resumed run reports its whole wall time (``FitResult.earlier_wall_time_s``).
    """
    started = time.perf_counter() if started is None else started
    run_dir = Path(run_dir)
    ctx = distributed.current()
    device = select_device(settings.device)
    precision = choose_precision(device, settings.amp, settings.channels_last, settings.cpu_bf16)
    if ctx.is_main:
        log.info("training in %s", precision)
    model.to(device)
    if precision.channels_last:
        model.to(memory_format=torch.channels_last)
    loader_args = dict(batch_size=settings.batch_size, device=device, workers=settings.workers,
                       seed=settings.seed)
    train_loader = make_loader(train_set, train=True, **loader_args)
    val_loader = (make_loader(val_set, train=False, **loader_args)
                  if val_set is not None and len(val_set) else None)
    optimizer = torch.optim.SGD(
        model.parameters(),
        lr=settings.lr,
        momentum=settings.momentum,
        nesterov=settings.nesterov and settings.momentum > 0,
        weight_decay=settings.weight_decay,
    )
    plateau: Plateau | Cycles | None = None  # the schedules that decide on validation
    if settings.schedule in VALIDATED:
        if val_loader is None:
            raise BPLError(f"the {settings.schedule} schedule (--epochs auto) decides on the "
                           "validation split, and there is none: pass --val-ratio above 0, or "
                           "a fixed --epochs with another --schedule")
        plateau = (Plateau(settings.patience, settings.min_gain, settings.decays, settings.gamma)
                   if settings.schedule == "plateau"
                   else Cycles(settings.cycle_epochs, settings.min_gain))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _lr_lambda(settings, len(train_loader), plateau)
    )
    scaler = torch.amp.GradScaler(device.type, enabled=precision.scaled)
    result = FitResult()
    start = 0
    if resume_state is not None:
        optimizer.load_state_dict(resume_state["optimizer"])
        scheduler.load_state_dict(resume_state["scheduler"])
        if precision.scaled and resume_state.get("scaler"):  # empty where no scaler ran before
            scaler.load_state_dict(resume_state["scaler"])
        for hook, state in zip(hooks, resume_state.get("hooks", []), strict=True):
            hook.load_state_dict(state)
        start = result.resumed_from = resume_state["epoch"]
        result.history = list(resume_state["history"])
        result.best_val_top1 = resume_state.get("best_val_top1")
        result.best_epoch = resume_state["best_epoch"]
        result.earlier_wall_time_s = resume_state.get("wall_time_s", 0.0)
        result.segments = resume_state.get("segments", 1) + 1
        result.precision = list(resume_state.get("precision", []))
        if plateau is not None and resume_state.get("plateau"):
            plateau.load_state_dict(resume_state["plateau"])
            _refresh_lr(scheduler)
        _set_rng_state(resume_state["rng"])
        log.info("resuming after epoch %d of %d", start, settings.epochs)
    result.precision.append(precision.describe())
    net = distributed.wrap(model, device, sync_bn=settings.sync_bn)  # DDP under torchrun
    if settings.compile:
        check_compile(device)
        net = torch.compile(net)  # training steps only; evaluation and checkpoints use `model`
    if settings.select not in SELECT:
        raise BPLError(f"select must be one of {', '.join(SELECT)}, got {settings.select!r}")
    peak, anneals = _peak_lr(settings)
    first_rate = settings.lr * _lr_lambda(settings, len(train_loader), plateau)(0)  # epoch 1's
    trainer = _Trainer(net, optimizer, scheduler, scaler, settings, device, precision,
                       dict(loss_terms or {}), hooks, progress and ctx.is_main)
    logs = _Logs(run_dir) if ctx.is_main else None
    try:
        for epoch in range(start, settings.epochs):
            if plateau is not None and plateau.converged and settings.until_converged:
                break
            row = trainer.train_epoch(train_loader, epoch)
            for hook in hooks:
                hook.epoch_end(epoch)
            annealed = annealed_epochs([*result.history, row], peak, first_rate)[-1]
            candidate = settings.select == "best" or (settings.select == "annealed" and (
                annealed or not anneals))
            improved = True
            if val_loader is not None:
                # the bare model: DDP's forward would broadcast buffers, and shards differ;
                # in float32, as the test split and the deployed model run (a pass over the
                # validation split costs a few percent of an epoch, so bf16 would save little)
                metrics = evaluate(model, val_loader, num_classes, device=device,
                                   distributed_sum=ctx.enabled)
                row.update(val_loss=metrics["loss"], val_top1=metrics["top1"],
                           val_top5=metrics["top5"], val_samples=metrics["samples"])
                better = candidate and (result.best_val_top1 is None
                                        or metrics["top1"] > result.best_val_top1)
                # best.pt: the kept epoch, or the latest while none can be kept yet (select
                # "last", or "annealed" before the rate has annealed)
                improved = better or settings.select == "last" or result.best_val_top1 is None
                if better:
                    result.best_val_top1 = metrics["top1"]
                if plateau is not None:
                    change = plateau.update(metrics["top1"])
                    if change == "decay":
                        _refresh_lr(scheduler)  # x gamma from the next step on
                    if change and ctx.is_main and (change != "stop" or settings.until_converged):
                        _log_change(plateau, change, settings)
            if improved:
                result.best_epoch = epoch + 1
            result.history.append(row)
            if not ctx.is_main:
                continue
            log.info(
                "epoch %d/%d  loss %.4f  train %.2f%%  val top-1 %s  (%.1fs)",
                epoch + 1, settings.epochs, row["train_loss"], row["train_top1"],
                f"{row['val_top1']:.2f}%" if "val_top1" in row else "-", row["epoch_time_s"],
            )
            state = {
                "format": CHECKPOINT_FORMAT,
                "model": payload(model),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(),
                "hooks": [h.state_dict() for h in hooks],
                "epoch": epoch + 1,
                "history": result.history,
                "rng": _rng_state(),
                "config": dict(record or {}),
                "best_val_top1": result.best_val_top1,
                "best_epoch": result.best_epoch,
                "wall_time_s": result.earlier_wall_time_s + time.perf_counter() - started,
                "segments": result.segments,
                "precision": result.precision,
                "plateau": plateau.state_dict() if plateau is not None else None,
            }
            if improved:
                atomic_save(state["model"], run_dir / "best.pt")
            atomic_save(state, run_dir / "last.pt")
            logs.write(result.history)
    finally:
        if logs is not None:
            logs.close()
        distributed.unwrap(net)
    result.stopped = (plateau.describe() if plateau is not None and plateau.converged
                      and settings.until_converged
                      else f"reached the last of {settings.epochs} epochs")
    return result


def _peak_lr(settings: TrainSettings) -> tuple[float, bool]:
    """The highest learning rate ``settings``' schedule reaches, and whether it anneals
    (falls to :data:`ANNEALED` of that peak) at all: a constant rate never does."""
    if settings.schedule == "replay" and settings.replay:
        curve = [float(v) for v in settings.replay]
        return max(curve), min(curve) <= ANNEALED * max(curve)
    return settings.lr, settings.schedule != "constant"


def annealed_epochs(history: Sequence[Mapping[str, Any]], peak: float | None = None,
                    start: float | None = None) -> list[bool]:
    """Which epochs of ``history`` were trained at an annealed learning rate: ending at most
    :data:`ANNEALED` of ``peak`` (default: the highest rate in the history), and not rising
    (a warm-up's or a 1-cycle's low first rates do not count).

    An epoch's end is the rate its last step used, ``lr_last`` (recorded since bpl 0.3); a
    row's ``lr`` is the rate after that step, so the last epoch of a cosine cycle records
    the next cycle's peak although it ended at the cycle's lowest rate. A row without
    ``lr_last`` (older runs) is judged by its ``lr``, which misses those epochs, as those
    runs did. ``start``: the first epoch's starting rate, which a history lacks (without
    it the first epoch is not counted)."""
    if not history:
        return []
    rates = [float(row["lr"]) for row in history]
    limit = ANNEALED * (max(rates) if peak is None else peak)
    out, before = [], start
    for row, lr in zip(history, rates, strict=True):
        end = float(row.get("lr_last", lr))
        out.append(before is not None and end <= limit and end <= before)
        before = lr  # the next epoch starts at the rate this one left
    return out


def annealed_best(history: Sequence[Mapping[str, Any]], peak: float | None = None
                  ) -> tuple[int, float] | None:
    """(epoch, validation top-1) of the best epoch of ``history`` trained at an annealed
    learning rate (:func:`annealed_epochs`; ``peak``: the schedule's peak, default the
    highest rate in the history), the epoch ``select="annealed"`` keeps; None if no epoch
    was annealed or validated. Ties go to the earlier epoch, as in training."""
    best: tuple[int, float] | None = None
    for epoch, (row, annealed) in enumerate(zip(history, annealed_epochs(history, peak),
                                                strict=True), start=1):
        top1 = row.get("val_top1")
        if annealed and top1 is not None and (best is None or top1 > best[1]):
            best = (epoch, float(top1))
    return best


def annealed_stretch(history: Sequence[Mapping[str, Any]], epoch: int | None = None,
                     peak: float | None = None) -> tuple[int, int, float] | None:
    """(first epoch, last epoch, mean validation top-1) of the stretch of consecutive
    annealed, validated epochs (:func:`annealed_epochs`) that holds ``epoch`` (default:
    the last), or, if ``epoch`` is in none, of the stretch nearest to it (the later on a
    tie); None if the run has none. The level a model settled at, read from several
    evaluations rather than the luckiest one: ``--max-drop`` judges a step and the
    baseline by the stretch of the epoch each keeps. The best of many noisy evaluations is
    biased upwards, and more so the more epochs there are to pick from (a baseline's cycles
    against a step's one anneal)."""
    flags = annealed_epochs(history, peak)
    stretches: list[tuple[int, int]] = []
    for i, (row, annealed) in enumerate(zip(history, flags, strict=True), start=1):
        if not annealed or row.get("val_top1") is None:
            continue
        if stretches and stretches[-1][1] == i - 1:
            stretches[-1] = (stretches[-1][0], i)
        else:
            stretches.append((i, i))
    if not stretches:
        return None
    at = len(history) if epoch is None else epoch
    first, last = min(stretches, key=lambda s: (max(s[0] - at, at - s[1], 0), -s[0]))
    tops = [float(row["val_top1"]) for row in history[first - 1:last]]
    return first, last, sum(tops) / len(tops)


def _log_change(rule: Plateau | Cycles, change: str, settings: TrainSettings) -> None:
    if isinstance(rule, Cycles):
        log.info("cosine cycle %d ended%s: %s", rule.cycles,
                 "" if rule.gain is None else f", {rule.gain:+.2f} points of validation top-1",
                 "converged" if change == "stop" else "another cycle")
    else:
        log.info("validation top-1 has not improved for %d epochs: %s", settings.patience,
                 f"learning rate x{settings.gamma:g} ({rule.done} of {settings.decays} decays)"
                 if change == "decay" else "converged")


class _Trainer:
    """One epoch of training: forward, the loss and its extra terms, step, hooks, bookkeeping."""

    def __init__(
        self,
        net: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        scaler: torch.amp.GradScaler,
        settings: TrainSettings,
        device: torch.device,
        precision: Precision,
        terms: dict[str, LossTerm],
        hooks: Sequence[EpochHook],
        progress: bool,
    ) -> None:
        self.net, self.optimizer, self.scheduler, self.scaler = net, optimizer, scheduler, scaler
        self.settings, self.device, self.precision = settings, device, precision
        self.terms, self.hooks, self.progress = terms, hooks, progress
        self.criterion = nn.CrossEntropyLoss(label_smoothing=settings.label_smoothing)

    def autocast(self) -> AbstractContextManager:
        return self.precision.autocast()

    def _timed_terms(self, step: Step) -> Iterator[tuple[str, torch.Tensor, float]]:
        for name, term in self.terms.items():
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            t0 = time.perf_counter()
            value = term(step).float()
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            yield name, value, time.perf_counter() - t0

    def train_epoch(self, loader: DataLoader, epoch: int) -> dict[str, float]:
        cfg, device = self.settings, self.device
        # Each epoch's shuffling and augmentation depend only on (seed, epoch, rank): resume-exact.
        if isinstance(loader.sampler, DistributedSampler):
            loader.sampler.set_epoch(epoch)
        else:
            loader.generator.manual_seed(cfg.seed * 10_007 + epoch)
        torch.manual_seed(cfg.seed * 10_007 + epoch + 1_000_003 * distributed.current().rank)
        self.net.train()
        keys = ["loss", "ce", *self.terms, *(f"{n}_s" for n in self.terms), "correct", "seen"]
        sums = dict.fromkeys(keys, 0.0)
        steps, lr_last = 0, 0.0
        t0 = time.perf_counter()
        # disable=None: bars on a terminal only, not in logs redirected to files
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False,
                   disable=None if self.progress else True)
        for step, (x, y) in enumerate(bar):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            x = self.precision.prepare(x)
            with self.autocast():
                logits = self.net(x)
                ce = self.criterion(logits, y)
            loss = ce.float()
            n = y.numel()
            for name, value, seconds in self._timed_terms(Step(self.net, x, y, logits,
                                                               self.autocast)):
                loss = loss + value
                sums[name] += value.item() * n
                sums[f"{name}_s"] += seconds
            if not torch.isfinite(loss):
                raise TrainingDiverged(
                    f"loss became {loss.item()} at epoch {epoch + 1}, step {step + 1}; lower the "
                    "learning rate (--lr) or check the data"
                )
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            lr_last = self.optimizer.param_groups[0]["lr"]
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.scheduler.step()
            for hook in self.hooks:
                hook.after_step()
            steps += 1
            sums["loss"] += loss.item() * n
            sums["ce"] += ce.item() * n
            sums["correct"] += (logits.argmax(1) == y).sum().item()
            sums["seen"] += n
            elapsed = time.perf_counter() - t0
            bar.set_postfix(
                loss=f"{sums['loss'] / sums['seen']:.3f}",
                acc=f"{100 * sums['correct'] / sums['seen']:.1f}",
                img_s=f"{sums['seen'] / max(elapsed, 1e-9):.0f}",
            )
        elapsed = time.perf_counter() - t0
        if distributed.current().enabled:  # report the whole global batch, not this rank's share
            totals = distributed.all_reduce_sum(
                torch.tensor([sums[k] for k in keys], dtype=torch.float64))
            sums.update(zip(keys, totals.tolist()))
            for name in self.terms:  # time per step: the mean over ranks, not the sum
                sums[f"{name}_s"] /= distributed.current().world_size
        seen = max(sums["seen"], 1)
        row = {
            "epoch": epoch + 1,
            "lr": self.optimizer.param_groups[0]["lr"],  # the rate after the epoch's last step
            "lr_last": lr_last,  # the rate its last step used (annealed_epochs)
            "train_loss": sums["loss"] / seen,
            "train_ce": sums["ce"] / seen,
        }
        row.update({f"train_{name}": sums[name] / seen for name in self.terms})
        row.update({f"{name}_ms_per_step": 1000 * sums[f"{name}_s"] / max(steps, 1)
                    for name in self.terms})
        row.update(train_top1=100.0 * sums["correct"] / seen, epoch_time_s=elapsed,
                   images_per_s=seen / max(elapsed, 1e-9))
        return row
