"""The diversity loss (step 3 of BPL): push each partner away from its block's kernels.

For a group of partners the term is ``cos(a, b) + 1`` where ``a`` and ``b`` are the
flattened original and partner kernels of the group laid end to end; both kinds of
partner count (``conv.weight`` against ``partner_conv.weight``: for a conv->BN partner
the kernels before their BNs, for a conv partner the kernel before its scale). The cosine of
two concatenations only needs per-block dot products and squared norms, so nothing is
concatenated: three reductions per block, then one ``index_add`` per call.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

from .errors import InvalidArgumentError
from .extension import partner_blocks
from .modules import unwrap_parallel
from .partner import Partner

__all__ = ["diversity_loss", "GRANULARITIES"]

GRANULARITIES = ("stage", "block", "global")

# model -> (granularity -> (blocks, group index per block, number of groups))
_PLANS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _plan(model: nn.Module, granularity: str) -> tuple[list[Partner], list[int], int]:
    """Which group each partner block belongs to; cached per model and granularity."""
    blocks = partner_blocks(model)
    ids = tuple(id(b) for _, b in blocks)
    cache = _PLANS.setdefault(model, {})
    cached = cache.get(granularity)
    if cached is not None and cached[0] == ids:
        return cached[1]
    if granularity == "block":
        groups = list(range(len(blocks)))
    elif granularity == "global":
        groups = [0] * len(blocks)
    else:  # one group per top-level child of the model (a ResNet's layer1..layer4)
        stage_of: dict[str, int] = {}
        groups = [stage_of.setdefault(name.split(".", 1)[0], len(stage_of)) for name, _ in blocks]
    plan = ([b for _, b in blocks], groups, max(groups, default=-1) + 1)
    cache[granularity] = (ids, plan)
    return plan


def _dot_and_norms(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``[a.b, a.a, b.b]`` of two kernels, each one BLAS dot product without temporaries."""
    a, b = a.reshape(-1), b.reshape(-1)
    return torch.stack([torch.dot(a, b), torch.dot(a, a), torch.dot(b, b)])


def diversity_loss(
    model: nn.Module, *, weight: float = 0.01, granularity: str = "stage", eps: float = 1e-8
) -> torch.Tensor:
    """``weight * sum over groups of (cos(original kernels, partner kernels) + 1)``.

    ``granularity`` is ``"stage"`` (one term per top-level child of the model, the
    reference code's one per ResNet stage), ``"block"`` (one per partner) or
    ``"global"`` (one for all). A model without partners gives a zero tensor.
    """
    if granularity not in GRANULARITIES:
        raise InvalidArgumentError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    module = unwrap_parallel(model)
    blocks, groups, n_groups = _plan(module, granularity)
    if not blocks:
        p = next(module.parameters(), None)
        return torch.zeros((), device=p.device if p is not None else None,
                           dtype=p.dtype if p is not None else None)
    stats = torch.stack([_dot_and_norms(b.conv.weight, b.partner_conv.weight) for b in blocks])
    index = torch.tensor(groups, device=stats.device)
    sums = stats.new_zeros(n_groups, 3).index_add(0, index, stats)
    cos = sums[:, 0] / torch.sqrt(sums[:, 1] * sums[:, 2]).clamp_min(eps)
    return weight * (cos + 1).sum()
