"""Numerical checks that a transformed model still computes what it replaced."""

from __future__ import annotations

import torch
from torch import nn

from .deprecation import renamed_keywords
from .errors import VerificationError
from .modules import eval_mode

__all__ = ["max_relative_error", "relative_error", "verify"]


def max_relative_error(reference: torch.Tensor, candidate: torch.Tensor) -> float:
    """``max |candidate - reference| / max |reference|``: the one error measure bpl reports."""
    scale = reference.abs().max().clamp_min(torch.finfo(reference.dtype).tiny)
    return ((candidate - reference).abs().max() / scale).item()


@torch.no_grad()
def relative_error(reference: nn.Module, candidate: nn.Module, *inputs: torch.Tensor) -> float:
    """``max |candidate(x) - reference(x)| / max |reference(x)|`` with both models in eval mode.

    The models' training flags are restored afterwards.
    """
    with eval_mode(reference, candidate):
        ref, out = reference(*inputs), candidate(*inputs)
    if ref.shape != out.shape:
        raise VerificationError(f"output shapes differ: {tuple(ref.shape)} vs {tuple(out.shape)}")
    return max_relative_error(ref, out)


@renamed_keywords(tol="verify_tol")
def verify(
    reference: nn.Module, candidate: nn.Module, *inputs: torch.Tensor, verify_tol: float = 1e-5
) -> float:
    """Relative error of ``candidate`` against ``reference``; raises if it exceeds ``verify_tol``."""
    err = relative_error(reference, candidate, *inputs)
    if not err <= verify_tol:  # also catches NaN
        raise VerificationError(
            f"models differ: relative error {err:.3g} > tolerance {verify_tol:g}; the transformation "
            "is not exact for this model (please report it with the model definition)"
        )
    return err
