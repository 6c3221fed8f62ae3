"""Numerical checks that a transformed model still computes what it replaced."""

from __future__ import annotations

import torch
from torch import nn

from .errors import VerificationError

__all__ = ["relative_error", "verify"]


@torch.no_grad()
def relative_error(reference: nn.Module, candidate: nn.Module, *inputs: torch.Tensor) -> float:
    """``max |candidate(x) - reference(x)| / max |reference(x)|`` with both models in eval mode.

    The models' training flags are restored afterwards.
    """
    modes = reference.training, candidate.training
    reference.eval()
    candidate.eval()
    try:
        ref, out = reference(*inputs), candidate(*inputs)
    finally:
        reference.train(modes[0])
        candidate.train(modes[1])
    if ref.shape != out.shape:
        raise VerificationError(f"output shapes differ: {tuple(ref.shape)} vs {tuple(out.shape)}")
    scale = ref.abs().max().clamp_min(torch.finfo(ref.dtype).tiny)
    return ((out - ref).abs().max() / scale).item()


def verify(
    reference: nn.Module, candidate: nn.Module, *inputs: torch.Tensor, tol: float = 1e-5
) -> float:
    """Relative error of ``candidate`` against ``reference``; raises if it exceeds ``tol``."""
    err = relative_error(reference, candidate, *inputs)
    if not err <= tol:  # also catches NaN
        raise VerificationError(
            f"models differ: relative error {err:.3g} > tolerance {tol:g}; the transformation "
            "is not exact for this model (please report it with the model definition)"
        )
    return err
