"""The train-time partners: a registry of kinds, each with its exact fold into the block's conv.

- ``"same"`` (:mod:`.same`, the paper's and the default): a parallel conv of the block's shape;
- ``"diverse"`` and ``"asymmetric"`` (:mod:`.branches`): branches of other shapes, each with a BN.

:data:`PARTNER_KINDS` names them; :func:`partner_kind` gives a kind's entry
(:class:`PartnerKind`: its summary, starts and builder).
"""

from .algebra import fold_conv_bn, plain_batchnorm_like, same_conv_like
from .base import (
    DEFAULT_KIND,
    DEFAULT_SHARE,
    INITS,
    KINDS,
    Partner,
    PartnerKind,
    check_init,
    partner_kind,
    register_kind,
)
from .branches import BranchPartner, PadBatchNorm2d
from .same import ConvPartner, PartnerBlock
from .slot import NormSlot, norm_act_problem

#: The names of the registered partner kinds, the default first.
PARTNER_KINDS: tuple[str, ...] = tuple(KINDS)

__all__ = [
    "BranchPartner",
    "ConvPartner",
    "DEFAULT_KIND",
    "DEFAULT_SHARE",
    "INITS",
    "KINDS",
    "NormSlot",
    "PARTNER_KINDS",
    "PadBatchNorm2d",
    "Partner",
    "PartnerBlock",
    "PartnerKind",
    "check_init",
    "fold_conv_bn",
    "norm_act_problem",
    "partner_kind",
    "plain_batchnorm_like",
    "register_kind",
    "same_conv_like",
]
