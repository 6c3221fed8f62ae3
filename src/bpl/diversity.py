"""The diversity loss (step 3 of BPL): push each partner away from its block's kernels.

For a group of partners the term is ``cos(a, b) + 1`` where ``a`` and ``b`` are the
flattened original and partner kernels of the group laid end to end, as each partner
gives them (:meth:`~bpl.partners.Partner.kernels`): raw, the kernels before their BNs
(the paper's; a structural partner's branches composed into one kernel), or functional,
each BN-folded with its running statistics, so that a partner cannot meet the loss by
flipping its kernel's sign while its BN scale flips too. The cosine of
two concatenations only needs per-block dot products and squared norms, so nothing is
concatenated: three reductions per block, then one ``index_add`` per call, inside one
autograd function whose backward is written out (two passes over each kernel).
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from .deprecation import renamed_keywords
from .errors import InvalidArgumentError
from .extension import partner_blocks
from .modules import unwrap_parallel
from .partners import Partner

if TYPE_CHECKING:
    from .engine import Step

__all__ = ["Diversity", "diversity_loss", "partner_statistics", "GRANULARITIES", "COMPARISONS"]

GRANULARITIES = ("stage", "block", "global")
#: What the loss compares: the raw kernels (the paper) or the BN-folded ones.
COMPARISONS = ("raw", "functional")

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


def _flat_pair(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``a`` and ``b`` as 1-D tensors in the same element order, without copies when they can be.

    The order is ``a``'s memory order (a view for contiguous and channels_last kernels); a
    dot product does not care which order, as long as both use the same one.
    """
    if a.is_contiguous() and b.is_contiguous():
        return a.view(-1), b.view(-1)
    order = sorted(range(a.dim()), key=lambda d: -a.stride(d))
    return a.permute(order).reshape(-1), b.permute(order).reshape(-1)


class _GroupCosines(torch.autograd.Function):
    """``cos`` of each group's concatenated kernels, with the gradient written analytically.

    Forward: three BLAS dot products per block (``a.b``, ``a.a``, ``b.b``), summed per
    group. Backward: ``d cos / d a = (g / s) b - (g cos / A) a`` (and the same for
    ``b``), one fresh tensor and two passes per kernel, instead of the five or so
    temporaries autograd makes of the three dot products and their sums. (Reusing
    gradient buffers between steps was measured too: slower under ``zero_grad``'s
    default ``set_to_none=True``, where autograd keeps the tensor as ``.grad``.)
    """

    @staticmethod
    def forward(ctx, index: torch.Tensor, n_groups: int, eps: float,
                *kernels: torch.Tensor) -> torch.Tensor:  # kernels: a0, b0, a1, b1, ...
        pairs = [_flat_pair(kernels[i], kernels[i + 1]) for i in range(0, len(kernels), 2)]
        stats = torch.stack([torch.stack([torch.dot(a, b), torch.dot(a, a), torch.dot(b, b)])
                             for a, b in pairs])
        sums = stats.new_zeros(n_groups, 3).index_add_(0, index, stats)
        dot, sq_a, sq_b = sums.unbind(1)
        root = torch.sqrt(sq_a * sq_b)
        clamped = root < eps
        cos = dot / root.clamp_min(eps)
        ctx.save_for_backward(index, cos, root.clamp_min(eps), sq_a, sq_b, clamped, *kernels)
        return cos

    @staticmethod
    @once_differentiable  # no double backward: a clear error instead of a wrong one
    def backward(ctx, grad: torch.Tensor):
        index, cos, root, sq_a, sq_b, clamped, *kernels = ctx.saved_tensors
        # the coefficient of the other kernel, and of the kernel itself; none where the clamp
        # held the denominator: a zero kernel (a functional partner behind a zero BN scale,
        # `preserve`'s start) has no direction, and grad / eps would blow its scale up
        cross = torch.where(clamped, 0.0, grad / root)
        own_a = torch.where(clamped, 0.0, -grad * cos / sq_a.where(~clamped, 1.0))
        own_b = torch.where(clamped, 0.0, -grad * cos / sq_b.where(~clamped, 1.0))
        coef = torch.stack([cross, own_a, own_b], 1)[index].unbind(0)  # per block
        grads: list[torch.Tensor | None] = []
        for i, row in enumerate(coef):
            c_cross, c_a, c_b = row.unbind()
            a, b = kernels[2 * i], kernels[2 * i + 1]
            for j, (own, other, c_own) in enumerate(((a, b, c_a), (b, a, c_b))):
                if not ctx.needs_input_grad[3 + 2 * i + j]:
                    grads.append(None)
                    continue
                grads.append(torch.mul(own, c_own).addcmul_(other, c_cross))
        return None, None, None, *grads


def _check_options(granularity: str, diversity_compare: str) -> None:
    if granularity not in GRANULARITIES:
        raise InvalidArgumentError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    if diversity_compare not in COMPARISONS:
        raise InvalidArgumentError(
            f"diversity_compare must be one of {COMPARISONS}, got {diversity_compare!r}")


@renamed_keywords(weight="diversity_weight", compare="diversity_compare")
def diversity_loss(
    model: nn.Module, *, diversity_weight: float = 0.01, granularity: str = "stage",
    diversity_compare: str = "raw", eps: float = 1e-8,
) -> torch.Tensor:
    """``diversity_weight * sum over groups of (cos(original kernels, partner kernels) + 1)``:
    the weighted term, as :func:`~bpl.distillation_loss` gives its own.

    ``granularity`` is ``"stage"`` (one term per top-level child of the model, the
    reference code's one per ResNet stage), ``"block"`` (one per partner) or
    ``"global"`` (one for all). ``diversity_compare`` is ``"raw"`` (the kernels as
    trained, the paper's) or ``"functional"`` (BN-folded with running statistics: what
    each branch adds to the fused kernel). A model without partners gives a zero tensor.
    The keywords are the flags' names (``--diversity-weight``, ``--granularity``,
    ``--diversity-compare``); ``weight`` and ``compare`` go in bpl 0.3.
    """
    _check_options(granularity, diversity_compare)
    module = unwrap_parallel(model)
    blocks, groups, n_groups = _plan(module, granularity)
    if not blocks:
        p = next(module.parameters(), None)
        return torch.zeros((), device=p.device if p is not None else None,
                           dtype=p.dtype if p is not None else None)
    functional = diversity_compare == "functional"
    kernels = [w for b in blocks for w in b.kernels(functional)]
    index = torch.tensor(groups, device=kernels[0].device)
    cos = _GroupCosines.apply(index, n_groups, eps, *kernels)
    return diversity_weight * (cos + 1).sum()


class Diversity:
    """The diversity loss term of a training step (:func:`diversity_loss` of the step's
    model), as :class:`~bpl.Distillation` is the distillation term: ``bpl compress`` adds
    it to the cross-entropy of a model with partners."""

    def __init__(self, *, diversity_weight: float = 0.01, granularity: str = "stage",
                 diversity_compare: str = "raw") -> None:
        _check_options(granularity, diversity_compare)
        if not diversity_weight >= 0:
            raise InvalidArgumentError(f"diversity_weight must be 0 or more, got {diversity_weight}")
        self.diversity_weight, self.granularity = diversity_weight, granularity
        self.diversity_compare = diversity_compare

    def __call__(self, step: Step) -> torch.Tensor:
        return diversity_loss(step.model, diversity_weight=self.diversity_weight,
                              granularity=self.granularity,
                              diversity_compare=self.diversity_compare)


@torch.no_grad()
def partner_statistics(model: nn.Module) -> dict[str, float]:
    """What the partners of ``model`` learned, as means over its partners.

    ``norm_ratio``: ||partner kernel|| / ||block kernel||, both BN-folded (0: the partner
    adds nothing to the fused model); ``raw_cos``: cosine of the raw kernels (what the
    paper's loss pushes towards -1); ``functional_cos``: cosine of the BN-folded ones
    (what the fused model gets). Empty without partners.
    """
    rows = []
    for _, block in partner_blocks(unwrap_parallel(model)):
        own, partner = block.kernels(functional=True)
        raw_own, raw_partner = block.kernels(functional=False)
        rows.append((float(partner.norm() / own.norm().clamp_min(1e-12)),
                     float(torch.nn.functional.cosine_similarity(
                         raw_own.flatten(), raw_partner.flatten(), dim=0)),
                     float(torch.nn.functional.cosine_similarity(
                         own.flatten(), partner.flatten(), dim=0))))
    if not rows:
        return {}
    return {name: sum(col) / len(col)
            for name, col in zip(("norm_ratio", "raw_cos", "functional_cos"), zip(*rows))}

