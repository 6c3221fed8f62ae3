"""The run configuration: one flat dataclass, filled from defaults, a recipe, a file, then flags.

Flat on purpose: every field is one command-line flag (``image_size`` <-> ``--image-size``)
and one key of a YAML/JSON config file, and the resolved config is saved as JSON in
the run directory so a run can be repeated or resumed from it alone.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .data.cache import CACHE_MODES, DEFAULT_BUDGET
from .diversity import COMPARISONS, GRANULARITIES
from .engine import SCHEDULES
from .errors import BPLError
from .partners import INITS, PARTNER_KINDS, partner_kind
from .pruning import SOFT_PARTNERS, importance_names
from .pruning.latency import RUNTIMES

__all__ = [
    "CACHE_MODES",
    "COMPRESS_ONLY",
    "Config",
    "PLACEMENTS",
    "RECIPES",
    "baseline_defaults",
    "resolve_command",
    "run_dir_of",
    "RESUME_SAFE",
    "SCHEDULES",
    "SELECT",
    "load_config_file",
    "resolve_config",
    "resume_config",
]

#: Where partners go: the paper's 3x3/5x5 convs, or every conv (1x1 and 7x7 included).
PLACEMENTS: dict[str, tuple[int, ...] | None] = {"paper": (3, 5), "all": None}
#: Which epoch a training run keeps: the best on the validation split, or the last.
SELECT: tuple[str, ...] = ("best", "last")


@dataclass
class Config:
    """Everything a `bpl train` / `bpl compress` run needs; see ``bpl <command> --help``."""

    # data
    data: str = "digits"
    data_root: str | None = None
    image_size: int = 224
    train_ratio: float | None = None
    val_ratio: float = 0.1
    train_subset: float | None = None
    cache: str = "auto"  # auto: in memory within --cache-budget, read from disk beyond
    cache_dir: str | None = None  # None: $BPL_CACHE_DIR or ~/.cache/bpl/images
    cache_budget: float = DEFAULT_BUDGET
    skip_bad: bool = False
    download: bool = False
    # model
    arch: str = "resnet18"
    weights: str | None = None
    pretrained: bool = False
    baseline: str | None = None
    # optimisation
    recipe: str | None = None
    epochs: int | str = 10  # or "auto": until validation top-1 stops improving (plateau schedule)
    max_epochs: int = 300  # the cap of --epochs auto
    batch_size: int = 64
    lr: float = 0.05
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 1e-4
    schedule: str = "cosine"
    milestones: list[float] = field(default_factory=lambda: [0.5, 0.75])
    gamma: float = 0.1
    warmup_epochs: int = 0
    patience: int = 10  # seed-0 pilot: 5 stopped baselines early (docs/results.md)
    min_gain: float = 0.0
    decays: int = 2
    label_smoothing: float = 0.0
    # compression
    flops_reduction: float | None = None  # a fixed cut; or ...
    max_drop: float | None = None  # ... the smallest model within this many validation points
    speedup: float | None = None  # ... or this many times faster, measured on --runtime
    runtime: str = "onnxruntime"  # --speedup: where the speed is measured
    latency_batch: int = 1  # --speedup: the batch the speed is measured at
    latency_threads: int | None = None  # --speedup: threads (None: torch's, all cores)
    prune_steps: int = 1  # a fixed cut reached in this many cuts, each recovered for --epochs
    accept_closest: bool = False
    soft: bool = False
    soft_every: int = 1
    soft_partners: str = "regrow"  # the reference's: partner filters regrow between re-masks
    from_scratch: bool = False  # train the pruned architecture from fresh weights
    importance: str = "l2"
    global_pruning: bool = False
    round_to: int | None = 8  # channel counts multiples of 8 (fast kernels); 1 or None: none
    partner: str = "same"
    init: str = "preserve"
    partner_share: float = 1 / 3
    placement: str = "paper"
    diversity_weight: float = 0.01
    granularity: str = "stage"
    diversity_compare: str = "raw"
    partners: bool = True
    distill: bool = False
    distill_temperature: float = 4.0
    distill_weight: float = 1.0
    select: str = "best"
    # execution
    device: str = "auto"
    amp: bool = True  # fp16 on CUDA (bpl.precision)
    cpu_bf16: bool = False  # bf16 + channels_last on a CPU with AMX: faster, opt-in
    channels_last: bool = True  # together with mixed precision
    workers: int = 0
    sync_bn: bool = False
    compile: bool = False
    seed: int = 0
    out: str | None = None
    resume: bool = False
    verify_tol: float = 1e-4
    latency: bool = True

    def to_dict(self, command: str | None = None) -> dict[str, Any]:
        """All fields, or the settings of a ``command`` (``train``/``compress``) run: only
        the fields it uses, and not ``resume`` (an action, so the saved file is a valid
        ``--config`` for a new run)."""
        out = dataclasses.asdict(self)
        drop = {"train": COMPRESS_ONLY | {"resume"},
                "compress": TRAIN_ONLY | {"resume"}}.get(command or "", set())
        return {k: v for k, v in out.items() if k not in drop}


#: Fields only `bpl compress` reads (a train run's config.json leaves them out).
COMPRESS_ONLY = frozenset({
    "baseline", "flops_reduction", "max_drop", "speedup", "runtime", "latency_batch",
    "latency_threads", "prune_steps", "accept_closest", "soft", "soft_every",
    "soft_partners", "from_scratch", "importance", "global_pruning", "round_to", "partner", "init",
    "partner_share", "placement", "diversity_weight", "granularity", "diversity_compare", "partners", "distill", "distill_temperature", "distill_weight", "verify_tol",
})
#: Fields only `bpl train` reads.
TRAIN_ONLY = frozenset({"weights", "pretrained"})
#: What ``--resume`` lets a flag change: none of it alters what the run computes so far.
#: (A resumed run may also compute in another precision: its checkpoints hold float32 weights.)
RESUME_SAFE = frozenset({"epochs", "max_epochs", "device", "workers", "latency", "cache", "cache_dir",
                         "cache_budget", "out", "resume", "compile", "amp", "channels_last",
                         "cpu_bf16"})


#: Named recipes; a recipe fills fields before the config file and the flags do.
RECIPES: dict[str, dict[str, Any]] = {
    # The paper's reference code: lr 1e-3, x0.1 at 50% and 75% of the epochs, wd 1e-4, batch 64.
    "reference": {
        "lr": 1e-3,
        "schedule": "step",
        "milestones": [0.5, 0.75],
        "gamma": 0.1,
        "weight_decay": 1e-4,
        "batch_size": 64,
        "momentum": 0.9,
    },
    # Recovery after pruning (compared in benchmarks/convergence_study.py, docs/results.md):
    # cosine from 0.05 (bpl 0.1's default), ...
    "cosine": {"schedule": "cosine", "lr": 0.05, "warmup_epochs": 0},
    # ... learning-rate rewinding: the baseline's own learning rates, epoch by epoch, replayed
    # over the fine-tuning epochs (Renda et al. 2020; Le & Hua 2021's scaled restarting), ...
    "rewind": {"schedule": "replay", "warmup_epochs": 0},
    # ... a 1-cycle with a large peak (Le & Hua 2021), ...
    "onecycle": {"schedule": "onecycle", "lr": 0.1, "warmup_epochs": 0},
    # ... and the classic fine-tune: a small constant learning rate.
    "constant": {"schedule": "constant", "lr": 1e-3, "warmup_epochs": 0},
}

_FIELDS = {f.name: f for f in dataclasses.fields(Config)}


def read_options_file(
    path: str | Path, what: str = "config file", *, empty_ok: bool = False
) -> dict[str, Any]:
    """A YAML or JSON file of ``option: value`` as a dict (``-`` in keys becomes ``_``)."""
    path = Path(path)
    if not path.is_file():
        raise BPLError(f"{what} not found: {path}; pass an existing YAML or JSON file")
    text = path.read_text()
    try:
        if path.suffix.lower() == ".json":
            raw = json.loads(text)
        else:
            import yaml

            raw = yaml.safe_load(text)
    except Exception as exc:
        raise BPLError(f"cannot parse {what} {path}: {exc}".splitlines()[0]) from exc
    if raw is None and empty_ok:
        raw = {}
    if not isinstance(raw, dict):
        raise BPLError(f"{what} {path} must hold a mapping of option: value")
    return {str(k).replace("-", "_"): v for k, v in raw.items()}


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML or JSON config file into a dict of known fields (``-`` or ``_`` keys)."""
    out = read_options_file(path)
    out.pop("command", None)  # a run's own config.json names the command that wrote it
    unknown = sorted(set(out) - set(_FIELDS))
    if unknown:
        raise BPLError(
            f"unknown option(s) in {path}: {', '.join(unknown)}; see `bpl <command> --help`"
        )
    return out


def resolve_command(command: str, overrides: dict[str, Any] | None = None,
                    file: str | Path | None = None) -> Config:
    """The config of a `bpl train` / `bpl compress` command, resolved in one place, each
    source read once: defaults < the baseline's data and image size (compress) < recipe <
    ``file`` < ``overrides`` (the flags); with ``resume``, the run's own ``config.json``,
    which the file and flags may change only where :data:`RESUME_SAFE` allows."""
    from_file = load_config_file(file) if file else {}
    overrides = dict(overrides or {})
    given = {**from_file, **overrides}
    if given.get("resume"):
        out = given.get("out") or run_dir_of(_resolve({}, from_file, overrides), command)
        return resume_config(out, command, given)
    base = baseline_defaults(given) if command == "compress" else {}
    return _resolve(base, from_file, overrides)


def baseline_defaults(given: dict[str, Any]) -> dict[str, Any]:
    """The data and image size the baseline of ``given`` was trained on (from its
    checkpoint's meta): compress's defaults for them. A folder of the user's own
    (``data_root``) replaces the baseline's data entirely."""
    from .models import load_checkpoint  # models import nothing of the config

    path = given.get("baseline")
    try:
        meta = load_checkpoint(path, model_only=True).get("meta", {}) if path else {}
    except BPLError:
        return {}  # compress itself says what is wrong with the file
    keys = ("image_size",) if "data_root" in given else ("data", "data_root", "image_size")
    return {k: meta[k] for k in keys if meta.get(k) is not None}


def run_dir_of(cfg: Config, command: str) -> Path:
    """``--out``, or ``runs/<command>-<arch>-<data>``."""
    return Path(cfg.out or f"runs/{command}-{cfg.arch}-{cfg.data}")


def resolve_config(
    base: dict[str, Any] | None = None,
    file: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
) -> Config:
    """Defaults < ``base`` (the command's own defaults) < recipe < file < ``overrides``."""
    return _resolve(dict(base or {}), load_config_file(file) if file else {}, overrides)


def _resolve(base: dict[str, Any], from_file: dict[str, Any],
             overrides: dict[str, Any] | None) -> Config:
    values: dict[str, Any] = dict(base)
    overrides = dict(overrides or {})
    recipe = overrides.get("recipe", from_file.get("recipe", values.get("recipe")))
    if recipe is not None:
        if recipe not in RECIPES:
            raise BPLError(f"unknown recipe {recipe!r}; choose one of {', '.join(RECIPES)}")
        values.update(RECIPES[recipe])
    values.update(from_file)
    values.update(overrides)
    if values.get("schedule") == "replay" and "lr" in {**from_file, **overrides}:
        raise BPLError("--recipe rewind (--schedule replay) replays the baseline's own learning "
                       "rates, so it cannot take --lr: leave --lr out, or choose another --recipe")
    if values.get("epochs") == "auto":
        given = {**(RECIPES.get(recipe) or {}), **from_file, **overrides}.get("schedule")
        if given not in (None, "plateau"):
            raise BPLError(f"--epochs auto anneals on plateaus of validation top-1 (--schedule "
                           f"plateau), so it cannot take --schedule {given}: leave --schedule "
                           "out, or pass a number of --epochs")
        values["schedule"] = "plateau"
    if values.get("data_root") and "data" not in values:
        # a folder without a dataset name is the user's own data, never the bundled digits
        from .data.registry import guess_dataset

        values["data"] = guess_dataset(values["data_root"])
    cfg = Config(**values)
    _check(cfg)
    return cfg


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def resume_config(run_dir: str | Path, command: str, overrides: dict[str, Any]) -> Config:
    """The config of the run in ``run_dir`` (its own ``config.json``), to continue it.

    ``overrides`` (flags and ``--config`` values given with ``--resume``) may change only
    :data:`RESUME_SAFE` fields, e.g. more ``--epochs``; any other value that differs from
    the run's is refused, since the run so far was computed with the saved one.
    """
    run_dir = Path(run_dir)
    path = run_dir / "config.json"
    if not path.is_file():
        raise BPLError(f"--resume: no run in {run_dir} (no config.json); run without --resume "
                       "to start one, or pass --out with the run directory")
    raw = read_options_file(path)
    saved_command = raw.pop("command", command)
    if saved_command != command:
        raise BPLError(f"{run_dir} is a `bpl {saved_command}` run; continue it with "
                       f"`bpl {saved_command} --out {run_dir} --resume`")
    saved = {k: v for k, v in raw.items() if k in _FIELDS}
    changed = []
    for key, value in overrides.items():
        if key in RESUME_SAFE or key not in _FIELDS:
            continue
        was = saved.get(key, _FIELDS[key].default if _FIELDS[key].default is not
                        dataclasses.MISSING else _FIELDS[key].default_factory())
        if _normal(value) != _normal(was):
            changed.append(f"{_flag(key)} {value!r} (the run has {was!r})")
    if changed:
        raise BPLError(
            f"--resume continues {run_dir} with the settings in its config.json; "
            f"{'; '.join(changed)}: leave these out, or start a new run with another --out "
            f"(with --resume only {', '.join(_flag(k) for k in sorted(RESUME_SAFE - {'out', 'resume'}))} "
            "may change)"
        )
    values = {**saved, **{k: v for k, v in overrides.items() if k in RESUME_SAFE}}
    values.update(out=str(run_dir), resume=True)
    cfg = Config(**values)
    _check(cfg)
    return cfg


def _normal(value: Any) -> Any:
    """Compare config values as JSON would store them (tuples as lists, ints as floats)."""
    if isinstance(value, tuple | list):
        return [_normal(v) for v in value]
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return value


#: The smallest --image-size: below it the stock networks' five stride-2 stages leave no
#: spatial detail, and the resize-and-crop rule degenerates.
MIN_IMAGE_SIZE = 16


def _check_speedup(cfg: Config) -> None:
    """--speedup and its measurement settings (checked before any data loads)."""
    if cfg.runtime not in RUNTIMES:
        raise BPLError(f"--runtime must be one of {', '.join(RUNTIMES)}, got {cfg.runtime!r}")
    if (isinstance(cfg.latency_batch, bool) or not isinstance(cfg.latency_batch, int)
            or cfg.latency_batch < 1):
        raise BPLError(f"--latency-batch must be a whole number of at least 1, got "
                       f"{cfg.latency_batch!r}")
    if cfg.latency_threads is not None and (
            isinstance(cfg.latency_threads, bool) or not isinstance(cfg.latency_threads, int)
            or cfg.latency_threads < 1):
        raise BPLError(f"--latency-threads must be a whole number of at least 1, got "
                       f"{cfg.latency_threads!r}")
    if cfg.speedup is None:
        return
    given = [flag for flag, value in (("--flops-reduction", cfg.flops_reduction),
                                      ("--max-drop", cfg.max_drop)) if value is not None]
    if given:
        raise BPLError(f"give --speedup (a measured speed), --flops-reduction (a fixed cut) or "
                       f"--max-drop (an accuracy budget), not --speedup and {given[0]}")
    if isinstance(cfg.speedup, bool) or not isinstance(cfg.speedup, int | float) \
            or cfg.speedup <= 1:
        raise BPLError(f"--speedup is how many times faster the pruned model must run, above "
                       f"1 (e.g. 2), got {cfg.speedup!r}")
    for flag, set_ in (("--soft", cfg.soft), ("--global-pruning", cfg.global_pruning),
                       ("--prune-steps", cfg.prune_steps > 1)):
        if set_:
            raise BPLError(f"--speedup prunes once, by measured latency, before training; "
                           f"{flag} is for a --flops-reduction: leave out one of the two")
    if cfg.runtime == "onnxruntime":
        from .exporting import _require_onnx

        _require_onnx()  # the measurement needs the extra: say so before the data loads


def _check(cfg: Config) -> None:
    for f in dataclasses.fields(cfg):  # NaN and infinity pass every < and > check below
        value = getattr(cfg, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise BPLError(f"{_flag(f.name)} must be a finite number, got {value}")
    if (isinstance(cfg.image_size, bool) or not isinstance(cfg.image_size, int)
            or cfg.image_size < MIN_IMAGE_SIZE):
        raise BPLError(f"--image-size must be a whole number of pixels, at least "
                       f"{MIN_IMAGE_SIZE}, got {cfg.image_size!r}")
    if cfg.flops_reduction is not None and not 0.0 < cfg.flops_reduction < 1.0:
        raise BPLError(
            f"--flops-reduction must be between 0 and 1 (exclusive), got {cfg.flops_reduction}"
        )
    if cfg.max_drop is not None:
        if cfg.flops_reduction is not None:
            raise BPLError("give --flops-reduction (a fixed cut) or --max-drop (the smallest model "
                           "within a budget), not both")
        if not 0.0 <= cfg.max_drop < 100.0:
            raise BPLError(f"--max-drop is in points of validation top-1, from 0 to 100, got "
                           f"{cfg.max_drop}")
        if cfg.soft:
            raise BPLError("--max-drop prunes in hard steps and cannot run the soft schedule; "
                           "give --soft a fixed --flops-reduction, or leave --soft out")
        if cfg.val_ratio == 0:
            raise BPLError("--max-drop judges each step on the validation split: pass "
                           "--val-ratio above 0")
    if (isinstance(cfg.prune_steps, bool) or not isinstance(cfg.prune_steps, int)
            or cfg.prune_steps < 1):
        raise BPLError(f"--prune-steps must be a whole number of at least 1, got "
                       f"{cfg.prune_steps!r}")
    if cfg.prune_steps > 1:
        if cfg.max_drop is not None:
            raise BPLError("--max-drop cuts in its own steps (bpl.LEVELS); give --prune-steps "
                           "only with a fixed --flops-reduction")
        if cfg.soft:
            raise BPLError("--prune-steps cuts in hard steps and cannot run the soft schedule; "
                           "leave out --prune-steps or --soft")
    _check_speedup(cfg)
    if cfg.epochs != "auto" and (isinstance(cfg.epochs, bool) or not isinstance(cfg.epochs, int)
                                 or cfg.epochs < 1):
        raise BPLError(f"--epochs must be a whole number of at least 1, or auto, got {cfg.epochs!r}")
    if cfg.max_epochs < 1:
        raise BPLError(f"--max-epochs must be at least 1, got {cfg.max_epochs}")
    if cfg.cache not in CACHE_MODES:
        raise BPLError(f"--cache must be one of {', '.join(CACHE_MODES)}, got {cfg.cache!r}")
    if not 0.0 <= cfg.cache_budget <= 1.0:
        raise BPLError(f"--cache-budget is a share of the available memory, from 0 to 1, got "
                       f"{cfg.cache_budget}")
    if cfg.workers < 0:
        raise BPLError(f"--workers must be 0 (load in the main process) or more, got {cfg.workers}")
    if cfg.batch_size < 1:
        raise BPLError(f"--batch-size must be at least 1, got {cfg.batch_size}")
    if cfg.schedule not in SCHEDULES:
        raise BPLError(f"--schedule must be one of {', '.join(SCHEDULES)}, got {cfg.schedule!r}")
    if cfg.schedule == "plateau" and cfg.val_ratio == 0:
        raise BPLError("--epochs auto (the plateau schedule) decides on the validation split: "
                       "pass --val-ratio above 0, or a fixed --epochs")
    if cfg.patience < 1 or cfg.decays < 0 or cfg.min_gain < 0:
        raise BPLError(f"--patience must be at least 1, --decays and --min-gain 0 or more; got "
                       f"{cfg.patience}, {cfg.decays} and {cfg.min_gain}")
    if cfg.lr <= 0:
        raise BPLError(f"--lr must be positive, got {cfg.lr}")
    if cfg.diversity_weight < 0:
        raise BPLError(f"--diversity-weight must be 0 or more, got {cfg.diversity_weight}")
    if not 0.0 <= cfg.val_ratio < 1.0:
        raise BPLError(f"--val-ratio must be at least 0 and below 1, got {cfg.val_ratio}")
    if cfg.train_subset is not None and not 0.0 < cfg.train_subset <= 1.0:
        raise BPLError(f"--train-subset must be above 0 and at most 1, got {cfg.train_subset}")
    if cfg.select not in SELECT:
        raise BPLError(f"--select must be one of {', '.join(SELECT)}, got {cfg.select!r}")
    if cfg.placement not in PLACEMENTS:
        raise BPLError(f"--placement must be one of {', '.join(PLACEMENTS)}, got {cfg.placement!r}")
    if cfg.granularity not in GRANULARITIES:
        raise BPLError(f"--granularity must be one of {', '.join(GRANULARITIES)}, got "
                       f"{cfg.granularity!r}")
    if cfg.soft:  # what the soft schedule cannot honour is refused, not ignored
        if not cfg.partners:
            raise BPLError("--soft zeroes the filters of each block and its partner (the "
                           "reference recipe), so it always trains partners: leave out "
                           "--no-partners, or --soft")
        if cfg.global_pruning:
            raise BPLError("--soft picks filters layer by layer, as the reference code does; "
                           "--global-pruning is for hard pruning: leave out one of the two")
        if cfg.accept_closest:
            raise BPLError("--soft reaches its cut within a point or stops with an error; "
                           "--accept-closest is for hard pruning: leave it out")
    if cfg.importance not in importance_names():
        raise BPLError(f"--importance must be one of {', '.join(importance_names())}, got "
                       f"{cfg.importance!r}")
    if cfg.round_to is not None and (
        isinstance(cfg.round_to, bool) or not isinstance(cfg.round_to, int) or cfg.round_to < 1
    ):
        raise BPLError(f"--round-to must be a positive whole number (1: no rounding), got "
                       f"{cfg.round_to!r}")
    if cfg.init not in INITS:
        raise BPLError(f"--init must be one of {', '.join(INITS)}, got {cfg.init!r}")
    if cfg.partner not in PARTNER_KINDS:
        raise BPLError(f"--partner must be one of {', '.join(PARTNER_KINDS)}, got {cfg.partner!r}")
    if cfg.init not in partner_kind(cfg.partner).inits:
        raise BPLError(f"--init {cfg.init} is for --partner same (a copy of the block); "
                       f"--partner {cfg.partner} starts with "
                       f"{' or '.join(partner_kind(cfg.partner).inits)}")
    if cfg.diversity_compare not in COMPARISONS:
        raise BPLError(f"--diversity-compare must be one of {', '.join(COMPARISONS)}, got "
                       f"{cfg.diversity_compare!r}")
    if cfg.soft_partners not in SOFT_PARTNERS:
        raise BPLError(f"--soft-partners must be one of {', '.join(SOFT_PARTNERS)}, got "
                       f"{cfg.soft_partners!r}")
    if cfg.from_scratch and (cfg.max_drop is not None or cfg.prune_steps > 1):
        raise BPLError("--from-scratch trains the pruned architecture once from fresh weights; "
                       "--max-drop and --prune-steps recover trained weights step by step: leave "
                       "out one of them")
    if cfg.distill_temperature <= 0 or cfg.distill_weight < 0:
        raise BPLError(
            "--distill-temperature must be positive and --distill-weight 0 or more, got "
            f"{cfg.distill_temperature} and {cfg.distill_weight}"
        )
