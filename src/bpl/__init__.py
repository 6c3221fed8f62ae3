"""Block-wise Partner Learning: prune a CNN, train it with partners, fuse them away exactly.

Zhang et al., "Block-Wise Partner Learning for Model Compression", IEEE TNNLS 2023.
"""

from .diversity import diversity_loss
from .errors import BPLError, TraceError, VerificationError
from .extend import ExtendReport, extend, find_conv_bn_pairs, partner_blocks
from .fuse import fuse
from .partner import PartnerBlock
from .verify import relative_error, verify

__version__ = "0.1.0"

__all__ = [
    "BPLError",
    "ExtendReport",
    "PartnerBlock",
    "TraceError",
    "VerificationError",
    "diversity_loss",
    "extend",
    "find_conv_bn_pairs",
    "fuse",
    "partner_blocks",
    "relative_error",
    "verify",
]
