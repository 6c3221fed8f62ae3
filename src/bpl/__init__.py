"""Block-wise Partner Learning: prune a CNN, train it with partners, fuse them away exactly.

Zhang et al., "Block-Wise Partner Learning for Model Compression", IEEE TNNLS 2023.
"""

from .distill import Distillation, distillation_loss
from .diversity import Diversity, diversity_loss
from .engine import Cycles, Plateau
from .errors import (
    BPLError,
    CheckpointError,
    ChecksumError,
    CorruptImageError,
    DataError,
    InvalidArgumentError,
    PruningError,
    TraceError,
    TrainingDiverged,
    VerificationError,
)
from .exporting import export
from .extension import ExtendReport, extend, find_conv_bn_pairs, partner_blocks
from .fusion import fold_batchnorm, fuse
from .models import build_model, list_models, load_model, save_model
from .modules import reports
from .partners import INITS, PARTNER_KINDS, BranchPartner, ConvPartner, Partner, PartnerBlock
from .profiling import compare_latency, count_macs, count_params, profile
from .pruning import (
    IMPORTANCES,
    LEVELS,
    BudgetResult,
    BudgetStep,
    PruneReport,
    SoftPruner,
    SoftReport,
    prune,
    prune_within,
    step_levels,
)
from .verification import relative_error, verify

__version__ = "0.1.0"

__all__ = [
    "BPLError",
    "BranchPartner",
    "BudgetResult",
    "BudgetStep",
    "LEVELS",
    "Cycles",
    "Plateau",
    "CheckpointError",
    "ChecksumError",
    "ConvPartner",
    "CorruptImageError",
    "DataError",
    "Distillation",
    "Diversity",
    "ExtendReport",
    "IMPORTANCES",
    "INITS",
    "InvalidArgumentError",
    "PARTNER_KINDS",
    "Partner",
    "PartnerBlock",
    "PruneReport",
    "PruningError",
    "SoftPruner",
    "SoftReport",
    "TraceError",
    "TrainingDiverged",
    "VerificationError",
    "build_model",
    "compare_latency",
    "count_macs",
    "count_params",
    "distillation_loss",
    "diversity_loss",
    "export",
    "extend",
    "find_conv_bn_pairs",
    "fold_batchnorm",
    "fuse",
    "list_models",
    "load_model",
    "partner_blocks",
    "profile",
    "prune",
    "prune_within",
    "relative_error",
    "reports",
    "save_model",
    "step_levels",
    "verify",
]
