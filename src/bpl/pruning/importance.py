"""Channel importance: the criteria by name, the paper's filter norm, scores cached per group."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch_pruning as tp
from torch import nn

from ..errors import PruningError
from .graph import make_pruner

__all__ = [
    "IMPORTANCES",
    "SOFT_IMPORTANCES",
    "importance_names",
    "register_importance",
    "CachedImportance",
    "FilterNormImportance",
    "add_filter_norms",
    "make_importance",
    "score_groups",
]


_FILTER_FNS = (
    tp.prune_conv_out_channels,
    tp.prune_depthwise_conv_out_channels,
    tp.prune_linear_out_channels,
)


def add_filter_norms(
    total: torch.Tensor, weight: torch.Tensor, idxs: Any, root: torch.Tensor, p: int
) -> None:
    """Add ``sum |w|^p`` of the filters ``weight[idxs]`` into ``total`` at positions ``root``.

    The one filter-norm sum behind both the hard criterion (:class:`FilterNormImportance`)
    and the soft schedule's scores; ``total`` is a float32 CPU tensor over a group's channels.
    """
    w = weight.detach()[idxs].flatten(1)
    total.index_add_(0, root, w.abs().pow(p).sum(1).float().cpu())


class FilterNormImportance(tp.importance.Importance):
    """The L``p`` norm of each output channel's filters (the paper's criterion for ``p=2``).

    When the group couples several convs (a partner block's conv and partner conv, or
    the convs feeding one residual addition), the channel's filters in all of them are
    taken together: ``(sum over convs of sum |w|^p) ** (1/p)``. BatchNorm scales and the
    consumers' input weights are not part of the score. Scores are divided by the group's
    mean, which matters only for global pruning (ranking across groups).
    """

    def __init__(self, p: int = 2) -> None:
        self.p = p

    @torch.no_grad()
    def __call__(self, group: Any) -> torch.Tensor | None:
        total = None
        for item in group:
            layer, fn = item.dep.target.module, item.dep.handler
            if fn not in _FILTER_FNS or getattr(layer, "transposed", False):
                continue
            root = item.root_idxs
            if root is None or any(r is None for r in root):
                continue
            if total is None:
                total = torch.zeros(len(group[0].idxs))
            add_filter_norms(total, layer.weight, item.idxs,
                             torch.as_tensor(root, dtype=torch.long), self.p)
        if total is None:
            return None
        total = total.pow(1.0 / self.p)
        # Relative to the group's mean: ranks within a group are unchanged, and global
        # pruning compares groups with many coupled convs fairly with single convs.
        mean = total.mean()
        return total / mean if mean > 0 else total


#: The criteria by name: each makes a Torch-Pruning importance, which scores a group of
#: coupled channels. Hard pruning (:func:`~bpl.pruning.prune`), the soft schedule
#: (:class:`~bpl.pruning.SoftPruner`) and ``--importance`` all read this one table.
_CRITERIA: dict[str, Callable[[], tp.importance.Importance]] = {
    "l2": lambda: FilterNormImportance(2),
    "l1": lambda: FilterNormImportance(1),
    "fpgm": lambda: tp.importance.FPGMImportance(p=2),
    "bn-scale": tp.importance.BNScaleImportance,
    "random": tp.importance.RandomImportance,
    "group-l2": lambda: tp.importance.GroupMagnitudeImportance(p=2),
    "group-l1": lambda: tp.importance.GroupMagnitudeImportance(p=1),
    "lamp": tp.importance.LAMPImportance,
}
#: The built-in criteria (:func:`importance_names` also lists those registered since).
IMPORTANCES: tuple[str, ...] = tuple(_CRITERIA)
#: Deprecated: every criterion works with the soft schedule now (it was l2, l1, random).
SOFT_IMPORTANCES: tuple[str, ...] = IMPORTANCES


def importance_names() -> tuple[str, ...]:
    """Every criterion name :func:`make_importance` knows, built in or registered."""
    return tuple(_CRITERIA)


def register_importance(name: str, factory: Callable[[], tp.importance.Importance]) -> None:
    """Add a criterion: ``factory()`` returns a ``torch_pruning.importance.Importance``; from
    then on ``prune``, ``SoftPruner`` and ``bpl compress --importance NAME`` take it."""
    if name in _CRITERIA:
        raise PruningError(f"importance {name!r} is already registered")
    _CRITERIA[name] = factory


def make_importance(importance: str | tp.importance.Importance) -> tp.importance.Importance:
    """The Torch-Pruning importance object for a criterion name (see :func:`importance_names`)."""
    if isinstance(importance, tp.importance.Importance):
        return importance
    if not isinstance(importance, str) or importance not in _CRITERIA:
        raise PruningError(
            f"unknown importance {importance!r}; choose one of {', '.join(_CRITERIA)} "
            "or pass a torch_pruning.importance.Importance object"
        )
    return _CRITERIA[importance]()


class CachedImportance(tp.importance.Importance):
    """Scores computed once on the real model, looked up by the name of a group's root."""

    def __init__(self, scores: Mapping[str, torch.Tensor | None], model: nn.Module) -> None:
        self.scores = scores
        self.names = {m: n for n, m in model.named_modules()}

    def __call__(self, group: Any) -> torch.Tensor | None:
        name = self.names.get(group[0].dep.target.module)
        score = self.scores.get(name) if name is not None else None
        return None if score is None else score.clone()


def score_groups(
    model: nn.Module, args: tuple[torch.Tensor, ...], importance: tp.importance.Importance,
    options: dict[str, Any],
) -> tuple[dict[str, torch.Tensor | None], list[int]]:
    """Importance of every prunable group of ``model`` (keyed by root name) and group sizes."""
    pruner = make_pruner(model, args, importance, 0.0, **options)
    names = {m: n for n, m in model.named_modules()}
    scores: dict[str, torch.Tensor | None] = {}
    sizes = []
    for group in pruner.DG.get_all_groups(
        ignored_layers=pruner.ignored_layers, root_module_types=pruner.root_module_types
    ):
        imp = importance(group)
        scores[names[group[0].dep.target.module]] = imp
        if imp is not None:
            # Grouped convs rank one channel slot per group: Torch-Pruning's own bookkeeping.
            # BasePruner._get_channel_groups is private and has no public equivalent, so
            # pyproject.toml caps torch-pruning at the versions this is tested with.
            sizes.append(len(imp) // pruner._get_channel_groups(group))
    return scores, sizes
