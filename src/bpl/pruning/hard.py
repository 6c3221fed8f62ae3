"""Hard pruning: remove the least important channels now, to a channel ratio or a MACs target."""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
import torch_pruning as tp
from torch import nn

from ..errors import PruningError
from ..modules import Inputs, Scratch, as_args, eval_mode, find_output_layers, flat_tensors
from ..profiling import count_params
from .graph import (
    LayerRef,
    check_fraction,
    check_round_to,
    deploy_macs,
    make_pruner,
    resolve_layers,
)
from .importance import CachedImportance, make_importance, score_groups
from .search import max_local_ratio, search_ratio

__all__ = ["PruneReport", "prune"]

log = logging.getLogger(__name__)


@dataclass
class PruneReport:
    """What :func:`prune` did (``pruned.bpl_prune_report``)."""

    channel_ratio: float
    macs_before: int
    macs_after: int
    params_before: int
    params_after: int
    target: float | None = None
    trials: int = 0
    ignored: list[str] = field(default_factory=list)

    @property
    def reduction(self) -> float:
        """Achieved fraction of MACs removed."""
        return 1.0 - self.macs_after / self.macs_before

    def __str__(self) -> str:
        return (
            f"channel ratio {self.channel_ratio:.4f}: MACs {self.macs_before:,} -> "
            f"{self.macs_after:,} ({100 * self.reduction:.2f}% fewer), params "
            f"{self.params_before:,} -> {self.params_after:,}"
        )


def prune(
    model: nn.Module,
    example_inputs: Inputs,
    *,
    flops_reduction: float | None = None,
    channel_ratio: float | None = None,
    importance: str | tp.importance.Importance = "l2",
    global_pruning: bool = False,
    round_to: int | None = None,
    ignored_layers: Iterable[LayerRef] | LayerRef | None = None,
    inplace: bool = False,
    tolerance: float = 0.01,
    accept_closest: bool = False,
) -> nn.Module:
    """Physically remove channels from ``model`` (plain or extended) and return it.

    Give exactly one of ``flops_reduction`` (fraction of MACs to remove; the channel
    ratio is searched until the reduction is within ``tolerance``) or ``channel_ratio``
    (fraction of each group's channels to remove). ``importance`` names the criterion
    (see :data:`IMPORTANCES`; ``"l2"`` is the paper's filter norm). The layers producing
    the model's outputs are never pruned, so the output shape is unchanged;
    ``ignored_layers`` (modules or qualified names) protects more. ``round_to`` keeps
    channel counts multiples of that number (faster kernels). A ``flops_reduction`` beyond
    what the model allows, or missed by more than ``tolerance``, raises
    :class:`PruningError` naming the closest reachable value; ``accept_closest=True``
    prunes to that value instead. The result carries a
    :class:`PruneReport` as ``bpl_prune_report``.
    """
    if (flops_reduction is None) == (channel_ratio is None):
        raise PruningError(
            "give exactly one of flops_reduction (e.g. 0.74 for 74% fewer MACs) or "
            "channel_ratio (fraction of channels to remove per layer)"
        )
    if flops_reduction is not None:
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
    options = {"ignored": ignored, "global_pruning": global_pruning, "round_to": round_to}
    trials = 0
    if channel_ratio is not None:
        ratio = channel_ratio
        make_pruner(target, args, imp, ratio, **options).step()
    else:
        scores, sizes = score_groups(target, args, imp, options)
        # Global ranking can empty a group, which Torch-Pruning then skips entirely; keep
        # the global search below the ratios where that becomes likely.
        p_max = 0.95 if global_pruning else max_local_ratio(sizes, round_to)

        def reduction_at(p: float) -> float:
            trial = scratch.copy(target)
            cached = CachedImportance(scores, trial)
            make_pruner(trial, scratch.args, cached, p, **options).step()
            return 1.0 - deploy_macs(trial, scratch.args) / macs_before

        ratio, _, trials = search_ratio(
            reduction_at, flops_reduction, p_max, tolerance, knob="channel ratio",
            accept_closest=accept_closest,
        )
        make_pruner(target, args, CachedImportance(scores, target), ratio, **options).step()
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
    )
    log.info("pruned %s: %s", type(model).__name__, report)
    target.bpl_prune_report = report
    return target
