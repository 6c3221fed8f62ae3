"""Hard pruning: remove the least important channels now, to a channel ratio or a MACs target."""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch_pruning as tp
from torch import nn

from ..errors import PruningError
from ..extension import partner_blocks
from ..modules import (
    Inputs,
    Scratch,
    as_args,
    eval_mode,
    find_output_layers,
    flat_tensors,
    record_report,
)
from ..profiling import count_params
from .graph import (
    DEFAULT_ROUND_TO,
    LayerRef,
    check_fraction,
    check_round_to,
    check_speedup,
    deploy_macs,
    make_pruner,
    prune_to_widths,
    resolve_layers,
    rounds,
)
from .importance import CachedImportance, make_importance, score_groups
from .latency import Measure
from .search import max_local_ratio, over_round_to, search_ratio
from .speed import MAX_TRIALS, SPEED_TOLERANCE, speedup_prune

__all__ = ["PruneReport", "prune"]

log = logging.getLogger(__name__)


@dataclass
class PruneReport:
    """What :func:`prune` did (``bpl.reports(pruned)["prune"]``)."""

    channel_ratio: float
    macs_before: int
    macs_after: int
    params_before: int
    params_after: int
    target: float | None = None
    trials: int = 0
    ignored: list[str] = field(default_factory=list)
    round_to: int | None = None  # the rounding used (smaller than asked after a fallback)
    # pruning to a speedup (speedup=): asked, measured (a fresh interleaved run of the
    # deploy forms, medians), where and how, and the measured trials of the search
    speedup_target: float | None = None
    speedup: float | None = None
    runtime: str | None = None
    batch_size: int | None = None
    threads: int | None = None
    latency_ms: dict[str, float] | None = None  # {"unpruned": ..., "pruned": ...}
    predicted_speedup: float | None = None  # what the latency table predicted
    speed_trials: list[dict[str, Any]] = field(default_factory=list)
    #: which allocation the speed search kept: "latency" (the table's) or "uniform" (the
    #: guard's, where uniform cuts were measured as fast keeping more MACs)
    speed_allocation: str | None = None
    latency_table: dict[str, Any] | None = None  # its cache file, and whether it was read
    #: how much the unpruned model's time varied across the search ((max - min) / median;
    #: above 0.15 the machine was busy and the measured speedup may be off)
    latency_spread: float | None = None

    @property
    def reduction(self) -> float:
        """Achieved fraction of MACs removed."""
        return 1.0 - self.macs_after / self.macs_before

    def __str__(self) -> str:
        speed = ""
        if self.speedup is not None:
            how = " by uniform cuts" if self.speed_allocation == "uniform" else ""
            speed = (f"{self.speedup:.2f}x faster measured in {self.runtime} at batch "
                     f"{self.batch_size}{how} (asked {self.speedup_target:.2f}x): ")
        return (
            speed + f"channel ratio {self.channel_ratio:.4f}: MACs {self.macs_before:,} -> "
            f"{self.macs_after:,} ({100 * self.reduction:.2f}% fewer), params "
            f"{self.params_before:,} -> {self.params_after:,}"
            + (f", round_to {self.round_to}" if rounds(self.round_to) else ", no rounding")
        )


def prune(
    model: nn.Module,
    example_inputs: Inputs,
    *,
    flops_reduction: float | None = None,
    channel_ratio: float | None = None,
    importance: str | tp.importance.Importance = "l2",
    global_pruning: bool = False,
    round_to: int | None = DEFAULT_ROUND_TO,
    ignored_layers: Iterable[LayerRef] | LayerRef | None = None,
    inplace: bool = False,
    tolerance: float = 0.01,
    accept_closest: bool = False,
    speedup: float | None = None,
    runtime: str = "onnxruntime",
    batch_size: int | None = None,
    threads: int | None = None,
    measure: Measure | None = None,
    latency_cache: str | Path | bool | None = None,
    speed_tolerance: float = SPEED_TOLERANCE,
    max_trials: int = MAX_TRIALS,
) -> nn.Module:
    """Physically remove channels from ``model`` (plain or extended) and return it.

    Give exactly one of ``flops_reduction`` (the fraction of FLOPs to remove, counted as
    MACs; the channel ratio is searched until the reduction is within ``tolerance``),
    ``channel_ratio`` (the fraction of each group's channels to remove) or ``speedup``
    (below). ``importance`` names the criterion
    (see :data:`IMPORTANCES`; ``"l2"`` is the paper's filter norm). The layers producing
    the model's outputs are never pruned, so the output shape is unchanged;
    ``ignored_layers`` (modules or qualified names) protects more.

    ``round_to`` (8 by default) keeps each group's channel count a multiple of that
    number, the nearest one to what the ratio asks, because CPU kernels run much closer
    to the ideal speedup on such widths; groups narrower than ``2 * round_to`` and groups
    of grouped convs are not rounded (:func:`~bpl.pruning.graph.rounded_keep`). ``1`` or
    ``None`` means no rounding. When rounding makes a ``flops_reduction`` unreachable
    within ``tolerance`` (a small network moves in coarse steps), the search is repeated
    with half the ``round_to`` until it lands, with a warning; the report says which
    was used. A ``flops_reduction`` beyond what the model allows, or missed by more than
    ``tolerance`` even unrounded, raises :class:`PruningError` naming the closest
    reachable value; ``accept_closest=True`` prunes to that value instead. The result's
    :class:`PruneReport` is ``bpl.reports(result)["prune"]``.

    ``speedup=S`` (above 1) prunes until the model, deployed with BN folded in
    ``runtime`` (``"onnxruntime"``: its ONNX export; ``"torch"``: the channels_last
    deploy form of `bpl predict`) on this machine, runs ``S`` times faster than the
    unpruned one: both timed interleaved, medians, at ``batch_size`` (default: the batch
    of ``example_inputs``) with ``threads`` (default: torch's). The cuts go where the
    runtime spends time, by a per-layer latency table measured once and cached in
    ``latency_cache`` (a folder; default :func:`~bpl.pruning.latency.latency_cache_dir`;
    False: not kept), and the search stops when the measured speedup is within 3% of
    ``S`` (``SPEED_AIM``), or after at most ``max_trials`` measured trials with the
    nearest within ``speed_tolerance`` (5%) of ``S`` (:mod:`bpl.pruning.speed`). A
    speedup beyond the fastest reachable raises :class:`PruningError` naming it.
    ``measure`` replaces the timing (a callable taking ``{name: (module, input)}`` and
    returning median ms; tests pass a deterministic one). The report adds the speedup asked and measured and the latencies. Takes a
    plain model (prune before :func:`~bpl.extend`) and not ``global_pruning``.
    """
    targets = [v for v in (flops_reduction, channel_ratio, speedup) if v is not None]
    if len(targets) != 1:
        raise PruningError(
            "give exactly one of flops_reduction (e.g. 0.74 for 74% fewer MACs), "
            "channel_ratio (fraction of channels to remove per layer) or speedup (e.g. 2.0 "
            "for twice as fast, measured)"
        )
    if speedup is not None:
        check_speedup(speedup)
        if global_pruning:
            raise PruningError("speedup= allocates the cuts by measured latency itself; "
                               "leave out global_pruning")
        if partner_blocks(model):
            raise PruningError("speedup= prunes a plain model: prune before bpl.extend, or "
                               "fuse the partners first (bpl.fuse)")
        if not 0 < speed_tolerance < 1:
            raise PruningError(f"speed_tolerance must be between 0 and 1, got {speed_tolerance!r}")
    elif flops_reduction is not None:
        flops_reduction = check_fraction(
            flops_reduction, "flops_reduction", "pass e.g. 0.74 for 74% fewer MACs"
        )
    else:
        channel_ratio = check_fraction(
            channel_ratio, "channel_ratio", "pass e.g. 0.5 to remove half the channels"
        )
    check_round_to(round_to)
    imp = make_importance(importance)
    args = as_args(example_inputs)
    ignored = list(dict.fromkeys(
        resolve_layers(model, ignored_layers) + find_output_layers(model, args)
    ))
    scratch = Scratch(model, args)
    reference = scratch.copy(model)
    with eval_mode(reference), torch.no_grad():
        shapes = [t.shape for t in flat_tensors(reference(*scratch.args))]
    macs_before = deploy_macs(reference, scratch.args)
    params_before = count_params(model)
    target = model if inplace else copy.deepcopy(model)
    trials = 0
    speed: Any = None
    if speedup is not None:
        speed, scores = speedup_prune(
            target, args, imp, ignored, speedup=float(speedup), runtime=runtime,
            batch_size=batch_size, threads=threads, measure=measure, cache=latency_cache,
            round_to=round_to, tolerance=speed_tolerance, max_trials=max_trials,
            accept_closest=accept_closest,
        )
        prune_to_widths(target, args, CachedImportance(scores, target), speed.keep,
                        ignored=ignored)
        widths = sum(_widths_before(scores, speed.keep))
        ratio = 1.0 - sum(speed.keep.values()) / widths if widths else 0.0
        trials = len(speed.trials)
    elif channel_ratio is not None:
        ratio = channel_ratio
        options = _options(ignored, global_pruning, round_to)
        make_pruner(target, args, imp, ratio, **options).step()
    else:
        scores, sizes = score_groups(target, args, imp, _options(ignored, global_pruning, None))
        def attempt(current: int | None, last: bool
                    ) -> tuple[float, dict[str, int] | None, dict, int | None]:
            nonlocal trials
            options = _options(ignored, global_pruning, current)
            # Global ranking can empty a group, which Torch-Pruning then skips entirely;
            # keep the global search below the ratios where that becomes likely.
            p_max = 0.95 if global_pruning else max_local_ratio(sizes, current)
            tried: list[_Trial] = []

            def reduction_at(p: float, keep: dict[str, int] | None = None) -> float:
                nonlocal trials
                trials += 1
                trial = scratch.copy(target)
                pruner = make_pruner(trial, scratch.args, CachedImportance(scores, trial), p,
                                     keep=keep, **options)
                pruner.step()
                f = 1.0 - deploy_macs(trial, scratch.args) / macs_before
                tried.append(_Trial(p, f, dict(pruner.kept)))
                return f

            try:
                found, _, _ = search_ratio(
                    reduction_at, flops_reduction, p_max, tolerance, knob="channel ratio",
                    accept_closest=accept_closest and last,
                )
                return found, None, options, current
            except PruningError:
                mixed = _mix_widths(tried, reduction_at, flops_reduction, tolerance)
                if mixed is None:
                    raise
                return mixed[0], mixed[1], options, current

        ratio, keep, options, round_to = over_round_to(round_to, attempt, flops_reduction,
                                                       tolerance, type(model).__name__)
        make_pruner(target, args, CachedImportance(scores, target), ratio, keep=keep,
                    **options).step()
    check = scratch.copy(target)
    with eval_mode(check), torch.no_grad():
        new_shapes = [t.shape for t in flat_tensors(check(*scratch.args))]
    if new_shapes != shapes:  # a protection failed: never hand back a model with other outputs
        raise PruningError(
            f"pruning changed the output shapes {shapes} -> {new_shapes}; pass the classifier "
            "in ignored_layers"
        )
    report = PruneReport(
        channel_ratio=ratio,
        macs_before=macs_before,
        macs_after=deploy_macs(check, scratch.args),
        params_before=params_before,
        params_after=count_params(target),
        target=flops_reduction,
        trials=trials,
        ignored=ignored,
        round_to=round_to if rounds(round_to) else None,
    )
    if speed is not None:
        report.speedup_target = float(speedup)
        report.speedup = speed.speedup
        report.runtime = runtime
        report.batch_size = batch_size or int(args[0].shape[0])
        report.threads = speed.threads
        report.latency_ms = {"unpruned": speed.unpruned_ms, "pruned": speed.pruned_ms}
        report.predicted_speedup = speed.predicted
        report.speed_trials = speed.trials
        report.speed_allocation = speed.allocation
        report.latency_table = speed.table
        report.latency_spread = speed.unpruned_spread
    log.info("pruned %s: %s", type(model).__name__, report)
    record_report(target, "prune", report)
    return target


def _widths_before(scores: dict, keep: dict[str, int]) -> list[int]:
    """The unpruned widths of the groups ``keep`` names (their score vectors' lengths)."""
    return [len(scores[name]) for name in keep if scores.get(name) is not None]


@dataclass
class _Trial:
    """One pruning of the search: the ratio, the MAC reduction, the rounded groups' counts."""

    ratio: float
    reduction: float
    kept: dict[str, int]


def _mix_widths(
    tried: list[_Trial], evaluate: Callable[..., float], flops_reduction: float,
    tolerance: float,
) -> tuple[float, dict[str, int]] | None:
    """Land between two rounded trials that straddle ``flops_reduction`` by moving single groups.

    With rounding, groups of one width all move to the next multiple at the same ratio,
    so the reduction can jump over the target (resnet18 at 64 px: 48.5% -> 54.0% for a
    50% target). Starting from the closest trial below, some of the groups whose count
    differs in the closest trial above are moved to that count, every count staying a
    multiple: with few such groups, each one's effect is measured and the subset whose
    summed effects come closest is tried (then the next closest, up to three); with
    many, the first k in graph order, k bisected. Returns ``(ratio, keep)`` for
    :func:`make_pruner`, or None when no mix lands within ``tolerance``.
    """
    below = [t for t in tried if t.reduction < flops_reduction]
    above = [t for t in tried if t.reduction > flops_reduction]
    if not below or not above:
        return None
    lo = max(below, key=lambda t: t.reduction)
    hi = min(above, key=lambda t: t.reduction)
    moved = [n for n, k in hi.kept.items() if lo.kept.get(n, _WHOLE) != k]
    if len(moved) < 2:
        return None

    def keep_moving(names: Iterable[str]) -> dict[str, int]:  # ``names`` at hi's counts
        names = set(names)
        return {n: lo.kept.get(n, _WHOLE) for n in moved if n not in names}

    found: list[tuple[float, frozenset[str]]] = []
    if len(moved) <= _SUBSET_GROUPS:
        effect = {n: evaluate(hi.ratio, keep_moving([n])) - lo.reduction for n in moved}
        subsets = [frozenset(n for j, n in enumerate(moved) if mask >> j & 1)
                   for mask in range(1, 2 ** len(moved) - 1)]
        subsets.sort(key=lambda ns: abs(lo.reduction + sum(effect[n] for n in ns)
                                        - flops_reduction))
        for names in subsets[:3]:
            found.append((evaluate(hi.ratio, keep_moving(names)), names))
            if abs(found[-1][0] - flops_reduction) <= tolerance / 4:
                break
    else:
        a, b = 0, len(moved)
        while b - a > 1:
            k = (a + b) // 2
            names = frozenset(moved[:k])
            found.append((evaluate(hi.ratio, keep_moving(names)), names))
            a, b = (k, b) if found[-1][0] < flops_reduction else (a, k)
    if not found:
        return None
    reduction, names = min(found, key=lambda t: abs(t[0] - flops_reduction))
    if abs(reduction - flops_reduction) > tolerance:
        return None
    log.info("rounded channel counts: %d of %d groups moved one step further to reach %.2f%% "
             "fewer MACs", len(names), len(moved), 100 * reduction)
    return hi.ratio, keep_moving(names)


#: Up to this many groups to move, every subset is weighed (2^n sums, n+3 trials at most).
_SUBSET_GROUPS = 10
#: A kept count that keeps any group whole.
_WHOLE = 1 << 30


def _options(ignored: list[str], global_pruning: bool, round_to: int | None) -> dict:
    return {"ignored": ignored, "global_pruning": global_pruning, "round_to": round_to}

