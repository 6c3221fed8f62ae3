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

from .data.cache import CACHE_MODES, DEFAULT_BUDGET, check_cache
from .data.splits import check_ratios
from .diversity import COMPARISONS, GRANULARITIES
from .engine import SCHEDULES, SELECT, VALIDATED, TrainSettings
from .errors import NOTHING, BPLError, wording
from .extension import PLACEMENTS  # where partners go: the paper's 3x3/5x5 convs, or all
from .partners import INITS, PARTNER_KINDS, partner_kind
from .pruning import SOFT_PARTNERS, importance_names
from .pruning.graph import check_fraction, check_round_to, check_speedup
from .pruning.latency import check_runtime

__all__ = [
    "CACHE_MODES",
    "COMMAND_DEFAULTS",
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
    "STRATEGIES",
    "Strategy",
    "strategy_of",
    "unused_options",
    "load_config_file",
    "resolve_config",
    "resume_config",
]

@dataclass
class Config(TrainSettings):
    """Everything a `bpl train` / `bpl compress` run needs; see ``bpl <command> --help``.

    Built on the engine's :class:`~bpl.engine.TrainSettings` (how :func:`~bpl.engine.fit`
    optimises: epochs, batch size, learning rate and schedule, precision, workers, seed),
    which it extends with the data, the model, compression and where the run goes.
    """

    # optimisation: the engine's, except that --epochs may be "auto"
    epochs: int | str = 10  # or "auto": until validation top-1 stops improving (cycles schedule)
    max_epochs: int = 300  # the cap of --epochs auto
    recipe: str | None = None
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
    # the run
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
        return {k: list(v) if isinstance(v, tuple) else v  # as JSON stores it
                for k, v in out.items() if k not in drop | NOT_SET_BY_USER}


#: Engine settings a run derives rather than takes (the replayed curve of --recipe rewind).
NOT_SET_BY_USER = frozenset({"replay"})
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


#: Where one command's default differs from :class:`Config`'s (``--help`` shows these).
#: `bpl compress` recovers a pruned model for 30 cosine epochs, the convergence study's
#: decision (docs/results.md, "Decision"): at 90% fewer MACs, 40 epochs beat 10 by 3.2 and
#: 3.8 validation points (UC Merced, EuroSAT) and 30 by nothing beyond the interval. A
#: `bpl train` baseline keeps Config's 10 (the study says: pass more, or auto).
COMMAND_DEFAULTS: dict[str, dict[str, Any]] = {"train": {}, "compress": {"epochs": 30}}

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

#: The options of one --epochs auto rule that the other ignores.
_PLATEAU_ONLY = ("patience", "decays", "gamma")
_CYCLES_ONLY = ("cycle_epochs",)
#: The options that only shape partners (``--no-partners`` refuses them when set).
_PARTNER_ONLY = ("partner", "init", "partner_share", "placement", "diversity_weight",
                 "granularity", "diversity_compare")

_FIELDS = {f.name: f for f in dataclasses.fields(Config) if f.name not in NOT_SET_BY_USER}


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
    base = dict(COMMAND_DEFAULTS.get(command, {}))
    if command == "compress":
        base.update(baseline_defaults(given))
    return _resolve(base, from_file, overrides)


def baseline_defaults(given: dict[str, Any]) -> dict[str, Any]:
    """The data, split ratios and image size the baseline of ``given`` was trained on (from
    its checkpoint's meta): compress's defaults for them. A folder of the user's own
    (``data_root``) replaces the baseline's data entirely."""
    from .models.checkpoints import read_meta  # models import nothing of the config

    path = given.get("baseline")
    meta = read_meta(path) if path else {}  # its weights are read once, by compress
    if "data_root" in given:
        return {"image_size": meta["image_size"]} if meta.get("image_size") else {}
    out = {k: meta[k] for k in ("data", "data_root", "image_size") if meta.get(k) is not None}
    split = meta.get("split") or {}  # bpl 0.3 on: how the baseline's data was split
    out.update({k: split[k] for k in ("train_ratio", "val_ratio", "train_subset")
                if split.get(k) is not None})
    return out


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
        said = {**from_file, **overrides}
        given = said.get("schedule")
        from_recipe = None if given else (RECIPES.get(recipe) or {}).get("schedule")
        # a cosine recipe run until it stops paying is cosine cycles, at the recipe's lr
        given = given or ("cycles" if from_recipe == "cosine" else from_recipe)
        if given is not None and given not in VALIDATED:
            what = (f"--recipe {recipe} (a {given} schedule)" if from_recipe
                    else f"--schedule {given}")
            raise BPLError(f"--epochs auto stops when validation top-1 stops improving, under "
                           f"--schedule cycles or plateau, so it cannot take {what}: leave it "
                           "out, or pass a number of --epochs")
        values["schedule"] = given or "cycles"
        foreign = sorted(k for k in (_PLATEAU_ONLY if values["schedule"] != "plateau"
                                     else _CYCLES_ONLY)
                         if k in said and said[k] != _FIELDS[k].default)
        if foreign:  # the other rule's option, set, would be ignored without a word
            flag = "--" + foreign[0].replace("_", "-")
            other = "plateau" if values["schedule"] != "plateau" else "cycles"
            raise BPLError(f"{flag} belongs to the {other} schedule, and --epochs auto trains "
                           f"under {values['schedule']}: add --schedule {other}, or leave "
                           f"{flag} out")
    if values.get("partners") is False:
        said = {**from_file, **overrides}
        unused = [k for k in _PARTNER_ONLY if k in said and said[k] != _FIELDS[k].default
                  and not (k == "placement" and values.get("soft"))]  # soft: which groups
        if unused:  # a partner's option, set, would be ignored without a word
            flag = "--" + unused[0].replace("_", "-")
            raise BPLError(f"{flag} says how partners are made or trained, and --no-partners "
                           "trains none: leave out one of the two")
    if values.get("data_root") and "data" not in values:
        # a folder without a dataset name is the user's own data, never the bundled digits
        from .data.registry import guess_dataset

        values["data"] = guess_dataset(values["data_root"])
    cfg = Config(**values)
    _check(cfg)
    return cfg


@dataclass(frozen=True)
class Strategy:
    """One way `bpl compress` cuts a model: the flag that picks it, the options of
    :data:`CUT_OPTIONS` it honours (the config refuses the others), and whether it runs
    under torchrun."""

    name: str
    picked_by: str
    summary: str
    honours: frozenset[str]
    distributed: bool = True
    #: Why an option it does not honour cannot apply: the refusal's words.
    refusals: dict[str, str] = field(default_factory=dict)


#: The options that pick a strategy or that only some strategies honour.
CUT_OPTIONS = frozenset({"flops_reduction", "max_drop", "speedup", "prune_steps", "soft",
                         "accept_closest", "global_pruning", "soft_every", "soft_partners",
                         "from_scratch", "partners", "runtime", "latency_batch",
                         "latency_threads"})
_ONE_TARGET = ("give one target: --flops-reduction (a fixed cut), --max-drop (the smallest model "
               "within a budget) or --speedup (a measured speed)")
_SPEED_ONCE = ("--speedup prunes once, by measured latency, before training; {} is for a "
               "--flops-reduction: leave out one of the two")
_HARD_STEPS = ("cuts in hard steps and cannot run the soft schedule of --soft; leave out one of "
               "the two")
_SCRATCH = ("--from-scratch trains the pruned architecture once from fresh weights; --max-drop "
            "and --prune-steps recover trained weights step by step: leave out one of them")
_CLOSEST = "takes the closest reachable cut at every step already: leave out --accept-closest"

#: The ways `bpl compress` cuts, by name; :func:`strategy_of` says which a config picks.
STRATEGIES: dict[str, Strategy] = {s.name: s for s in (
    Strategy("hard", "--flops-reduction", "prune once to a MACs cut, then recover",
             frozenset({"flops_reduction", "accept_closest", "global_pruning", "from_scratch",
                        "partners"})),
    Strategy("steps", "--prune-steps", "reach a MACs cut in several cuts, each recovered",
             frozenset({"flops_reduction", "prune_steps", "global_pruning", "partners"}),
             distributed=False,
             refusals={"from_scratch": _SCRATCH, "accept_closest": f"--prune-steps {_CLOSEST}"}),
    Strategy("budget", "--max-drop", "the smallest model within a validation budget, in steps",
             frozenset({"max_drop", "global_pruning", "partners"}), distributed=False,
             refusals={"flops_reduction": _ONE_TARGET, "speedup": _ONE_TARGET,
                       "from_scratch": _SCRATCH,
                       "prune_steps": "--max-drop cuts in its own steps (bpl.LEVELS); give "
                                      "--prune-steps only with a fixed --flops-reduction",
                       "accept_closest": f"--max-drop {_CLOSEST}"}),
    Strategy("speed", "--speedup", "prune once until the deployed model runs S times faster, "
             "measured", frozenset({"speedup", "runtime", "latency_batch", "latency_threads",
                                    "accept_closest", "from_scratch", "partners"}),
             distributed=False,  # each process would time, and prune to, other widths
             refusals={"flops_reduction": _ONE_TARGET,
                       "prune_steps": _SPEED_ONCE.format("--prune-steps"),
                       "global_pruning": _SPEED_ONCE.format("--global-pruning")}),
    Strategy("soft", "--soft", "zero the weakest filters while training, remove them at the end",
             frozenset({"flops_reduction", "soft", "soft_every", "soft_partners",
                        "from_scratch", "partners"}),
             refusals={
                 "global_pruning": "--soft picks filters layer by layer, as the reference code "
                                   "does; --global-pruning is for hard pruning: leave out one "
                                   "of the two",
                 "accept_closest": "--soft reaches its cut within a point or stops with an "
                                   "error; --accept-closest is for hard pruning: leave it out",
                 "max_drop": f"--max-drop {_HARD_STEPS}",
                 "speedup": _SPEED_ONCE.format("--soft"),
                 "prune_steps": f"--prune-steps {_HARD_STEPS}"}),
)}


def strategy_of(cfg: Config) -> Strategy:
    """The strategy a compress config picks: ``--soft``, ``--max-drop``, ``--speedup``,
    ``--prune-steps`` above 1, or one hard cut to ``--flops-reduction``."""
    if cfg.soft:
        return STRATEGIES["soft"]
    if cfg.max_drop is not None:
        return STRATEGIES["budget"]
    if cfg.speedup is not None:
        return STRATEGIES["speed"]
    return STRATEGIES["steps" if cfg.prune_steps > 1 else "hard"]


def unused_options(cfg: Config) -> frozenset[str]:
    """The options of :data:`CUT_OPTIONS` that the strategy ``cfg`` picks does not use."""
    return CUT_OPTIONS - strategy_of(cfg).honours


def _check_strategy(cfg: Config) -> None:
    """Refuse an option the picked strategy would ignore (one set away from its default)."""
    strategy = strategy_of(cfg)
    for name in sorted(unused_options(cfg)):
        if getattr(cfg, name) != _FIELDS[name].default:
            raise BPLError(strategy.refusals.get(name) or (
                f"{strategy.picked_by} ({strategy.summary}) does not use {_flag(name)}: leave "
                "it out"))


def _field_words(name: str, value: Any) -> str | None:
    """A config field named in a message: its flag (``--round-to``), with ``value``."""
    if name not in _FIELDS:
        return None
    return _flag(name) if value is NOTHING else f"{_flag(name)} {value}"


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
    for name in unused_options(cfg):  # saved by an older bpl; never used
        setattr(cfg, name, _FIELDS[name].default)
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
    if cfg.max_drop is not None and not 0.0 <= cfg.max_drop < 100.0:
        raise BPLError(f"--max-drop is in points of validation top-1, from 0 to 100, got "
                       f"{cfg.max_drop}")
    if cfg.max_drop is not None and cfg.val_ratio == 0:
        raise BPLError("--max-drop judges each step on the validation split: pass "
                       "--val-ratio above 0")
    if (isinstance(cfg.prune_steps, bool) or not isinstance(cfg.prune_steps, int)
            or cfg.prune_steps < 1):
        raise BPLError(f"--prune-steps must be a whole number of at least 1, got "
                       f"{cfg.prune_steps!r}")
    _check_strategy(cfg)
    _check_speedup(cfg)
    if cfg.epochs != "auto" and (isinstance(cfg.epochs, bool) or not isinstance(cfg.epochs, int)
                                 or cfg.epochs < 1):
        raise BPLError(f"--epochs must be a whole number of at least 1, or auto, got {cfg.epochs!r}")
    if cfg.max_epochs < 1:
        raise BPLError(f"--max-epochs must be at least 1, got {cfg.max_epochs}")
    if cfg.workers < 0:
        raise BPLError(f"--workers must be 0 (load in the main process) or more, got {cfg.workers}")
    if cfg.batch_size < 1:
        raise BPLError(f"--batch-size must be at least 1, got {cfg.batch_size}")
    if cfg.schedule not in SCHEDULES:
        raise BPLError(f"--schedule must be one of {', '.join(SCHEDULES)}, got {cfg.schedule!r}")
    if cfg.schedule in VALIDATED and cfg.val_ratio == 0:
        raise BPLError(f"--epochs auto (the {cfg.schedule} schedule) decides on the validation "
                       "split: pass --val-ratio above 0, or a fixed --epochs")
    if cfg.patience < 1 or cfg.decays < 0 or cfg.min_gain < 0:
        raise BPLError(f"--patience must be at least 1, --decays and --min-gain 0 or more; got "
                       f"{cfg.patience}, {cfg.decays} and {cfg.min_gain}")
    if cfg.cycle_epochs < 1:
        raise BPLError(f"--cycle-epochs must be at least 1, got {cfg.cycle_epochs}")
    if cfg.lr <= 0:
        raise BPLError(f"--lr must be positive, got {cfg.lr}")
    if cfg.diversity_weight < 0:
        raise BPLError(f"--diversity-weight must be 0 or more, got {cfg.diversity_weight}")
    if cfg.select not in SELECT:
        raise BPLError(f"--select must be one of {', '.join(SELECT)}, got {cfg.select!r}")
    if cfg.placement not in PLACEMENTS:
        raise BPLError(f"--placement must be one of {', '.join(PLACEMENTS)}, got {cfg.placement!r}")
    if cfg.granularity not in GRANULARITIES:
        raise BPLError(f"--granularity must be one of {', '.join(GRANULARITIES)}, got "
                       f"{cfg.granularity!r}")
    if cfg.importance not in importance_names():
        raise BPLError(f"--importance must be one of {', '.join(importance_names())}, got "
                       f"{cfg.importance!r}")
    # the owning modules' own checks, worded in the config's keys (its flags)
    with wording(_field_words):
        check_round_to(cfg.round_to)
        check_runtime(cfg.runtime)
        if cfg.flops_reduction is not None:
            check_fraction(cfg.flops_reduction, "flops_reduction",
                           "pass e.g. 0.74 for 74% fewer MACs")
        if cfg.speedup is not None:
            check_speedup(cfg.speedup)
        check_cache(cfg.cache, cfg.cache_budget)
        check_ratios(cfg.train_ratio, cfg.val_ratio, cfg.train_subset)
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
    if not cfg.partners and cfg.soft_partners != _FIELDS["soft_partners"].default:
        raise BPLError("--soft-partners says what partners' zeroed filters do, and "
                       "--no-partners trains none: leave out one of the two")
    if cfg.distill_temperature <= 0 or cfg.distill_weight < 0:
        raise BPLError(
            "--distill-temperature must be positive and --distill-weight 0 or more, got "
            f"{cfg.distill_temperature} and {cfg.distill_weight}"
        )
