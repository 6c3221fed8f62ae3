"""Structured channel pruning, built on Torch-Pruning's dependency graph.

Two ways to a physically smaller model:

* :func:`prune` (hard, :mod:`.hard`): remove the least important output channels of
  every prunable group now. With ``flops_reduction=r`` (the fraction of FLOPs to remove,
  counted as MACs) the channel pruning ratio is searched (:mod:`.search`) so that the
  MACs of the pruned model drop by ``r`` (within ``tolerance``, one point by default).
  With ``speedup=S`` (:mod:`.speed`) it prunes until the deployed model runs ``S``
  times faster, measured on the target runtime (onnxruntime or the torch deploy form),
  spending the cuts where a per-layer latency table (:mod:`.latency`, measured once and
  cached) says the time is.
* :func:`prune_within` (:mod:`.budget`): prune in steps, recovering and scoring each,
  and keep the smallest model within an accuracy budget; with no budget and
  :func:`step_levels`, iterative pruning to a fixed cut.
* :class:`SoftPruner` (the paper's reference code, :mod:`.soft`): during training of an
  extended model, zero the smallest-norm filters of each partner block and its partner
  every N epochs and keep them at zero; :meth:`SoftPruner.finalize` fuses the partners
  and then physically removes exactly the zeroed channels.

Torch-Pruning handles the coupling: channels joined by a residual addition or a
concatenation, depthwise convs, and a partner block (its conv and partner conv both feed
one addition, so they always lose the same channels). MACs are the FLOPs counted by
:class:`torch.utils.flop_counter.FlopCounterMode` divided by two, measured on the deployed
form of the model (an extended model is counted as if fused: partners cost nothing). The
name ``flops_reduction`` is the paper's ("FLOPs" reduction, FLOPs counted as MACs); a
fraction removed is the same whichever of the two is counted.

The ratio search prunes throw-away copies of the model on PyTorch's ``meta`` device
(shapes only, no memory, no arithmetic), scoring channels once on the real weights, so a
trial costs one graph trace instead of a copy of the weights.
"""

from ..errors import PruningError
from ..modules import find_output_layers
from .budget import LEVELS, BudgetResult, BudgetStep, prune_within, step_levels
from .graph import deploy_macs
from .hard import PruneReport, prune
from .importance import (
    IMPORTANCES,
    SOFT_IMPORTANCES,
    FilterNormImportance,
    importance_names,
    make_importance,
    register_importance,
)
from .latency import RUNTIMES, RuntimeMeasure, latency_cache_dir
from .soft import SOFT_PARTNERS, SoftPruner, SoftReport

__all__ = [
    "IMPORTANCES",
    "LEVELS",
    "BudgetResult",
    "BudgetStep",
    "SOFT_IMPORTANCES",
    "SOFT_PARTNERS",
    "FilterNormImportance",
    "PruneReport",
    "PruningError",
    "RUNTIMES",
    "RuntimeMeasure",
    "SoftPruner",
    "SoftReport",
    "deploy_macs",
    "find_output_layers",
    "importance_names",
    "latency_cache_dir",
    "make_importance",
    "register_importance",
    "prune",
    "prune_within",
    "step_levels",
]
