"""The train-time partner block and the exact algebra that folds it away.

A :class:`PartnerBlock` replaces one conv->BN pair while training:

    y = bn(conv(x)) + partner_bn(partner_conv(x))

Both branches are linear in ``x`` once the BNs use their running statistics, so
the sum is one convolution plus a per-channel bias: :func:`fold_block` computes
that kernel and bias exactly, and :mod:`bpl.fuse` writes them back into the
original conv (and BN) of the model.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .errors import InvalidArgumentError

__all__ = [
    "INITS",
    "DEFAULT_SHARE",
    "PartnerBlock",
    "NormSlot",
    "fold_conv_bn",
    "fold_block",
    "same_conv_like",
]

#: How a partner can start; see :class:`PartnerBlock`.
INITS: tuple[str, ...] = ("preserve", "split", "paper")
#: The partner's share of the block under ``init="split"`` (ACNet's branch scale, 1/3).
DEFAULT_SHARE = 1 / 3


def same_conv_like(conv: nn.Conv2d) -> nn.Conv2d:
    """A freshly initialised Conv2d with every hyper-parameter of ``conv``."""
    return nn.Conv2d(
        conv.in_channels,
        conv.out_channels,
        conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        groups=conv.groups,
        bias=conv.bias is not None,
        padding_mode=conv.padding_mode,
        device=conv.weight.device,
        dtype=conv.weight.dtype,
    )


def plain_batchnorm_like(bn: _BatchNorm) -> nn.BatchNorm2d:
    """A plain ``nn.BatchNorm2d`` holding a copy of ``bn``'s parameters and statistics."""
    out = nn.BatchNorm2d(
        bn.num_features,
        eps=bn.eps,
        momentum=bn.momentum,
        affine=True,
        track_running_stats=True,
        device=bn.weight.device,
        dtype=bn.weight.dtype,
    )
    out.load_state_dict(bn.state_dict(), strict=False)
    return out


class NormSlot(nn.Module):
    """Stands where the block's BatchNorm stood, so the model's own forward keeps working.

    For a plain BatchNorm it is the identity (the block already normalised). For a
    norm+activation layer (timm's ``BatchNormAct2d`` style: a BN subclass with ``drop``
    and ``act`` children) it applies the tail that came after the normalisation.
    ``original`` keeps the replaced module (unregistered) so ``fuse`` can put it back.
    """

    def __init__(self, original: _BatchNorm) -> None:
        super().__init__()
        self._original = [original]  # a list so it is not registered as a child
        drop, act = getattr(original, "drop", None), getattr(original, "act", None)
        self.tail = nn.Sequential(*[m for m in (drop, act) if isinstance(m, nn.Module)])

    @property
    def original(self) -> _BatchNorm:
        return self._original[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tail(x) if len(self.tail) else x


def check_init(init: str, share: float) -> None:
    """Refuse a partner start or share that :class:`PartnerBlock` does not know."""
    if init not in INITS:
        raise InvalidArgumentError(f"init must be one of {', '.join(INITS)}; got {init!r}")
    if not 0.0 < share < 1.0 or share == 0.5:
        raise InvalidArgumentError(
            f"share must be between 0 and 1 and not 0.5, got {share} (at 0.5 the two copies "
            "get identical gradients and never become different)"
        )


class PartnerBlock(nn.Module):
    """conv->BN with a parallel partner conv->BN of the same shape; the outputs are added.

    How the partner starts (``init``):

    - ``"preserve"``: a random partner kernel behind a BN of scale 0 and shift 0. The
      block computes exactly what the conv->BN pair computed, but the partner's kernel
      gets no gradient until its BN scale has moved away from 0.
    - ``"split"``: the partner is a copy of the block (kernel, BN statistics), and the
      BN scales and shifts are split ``1 - share`` / ``share``. Exact, in training mode
      too, and both kernels train from the first step; the unequal shares give them
      unequal gradients, so the copies drift apart and the diversity loss takes over.
      (At ``share=0.5`` they would stay identical forever: the cosine is at its maximum,
      where its gradient is zero, and every other gradient is the same for both.)
    - ``"paper"``: the reference code's start: a random partner with BN scale 0.5 and the
      block's BN scale halved. Not exact: the model's output changes.
    """

    def __init__(
        self,
        conv: nn.Conv2d,
        bn: _BatchNorm,
        slot: NormSlot,
        init: str = "preserve",
        share: float = DEFAULT_SHARE,
    ):
        super().__init__()
        check_init(init, share)
        self.conv = conv
        self.bn = bn if _is_plain_batchnorm(bn) else plain_batchnorm_like(bn)
        self.partner_conv = same_conv_like(conv)
        self.partner_bn = nn.BatchNorm2d(
            bn.num_features,
            eps=bn.eps,
            momentum=bn.momentum,
            device=conv.weight.device,
            dtype=conv.weight.dtype,
        )
        self._slot = [slot]  # unregistered back-reference to where the BN stood
        with torch.no_grad():
            if init == "preserve":
                self.partner_bn.weight.zero_()
                self.partner_bn.bias.zero_()
            elif init == "split":
                self.partner_conv.load_state_dict(conv.state_dict())
                self.partner_bn.load_state_dict(self.bn.state_dict())
                for norm, part in ((self.bn, 1.0 - share), (self.partner_bn, share)):
                    norm.weight.mul_(part)
                    norm.bias.mul_(part)
            else:
                self.bn.weight.mul_(0.5)
                self.partner_bn.weight.fill_(0.5)
                self.partner_bn.bias.zero_()

    @property
    def slot(self) -> NormSlot:
        return self._slot[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x)) + self.partner_bn(self.partner_conv(x))


def _is_plain_batchnorm(bn: nn.Module) -> bool:
    """True for BatchNorm2d and subclasses that do not override forward."""
    return isinstance(bn, _BatchNorm) and type(bn).forward is _BatchNorm.forward


def fold_conv_bn(conv: nn.Conv2d, bn: _BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """Kernel and bias of the single conv equal to ``bn(conv(x))`` with running statistics."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    weight = conv.weight * scale.reshape(-1, 1, 1, 1)
    bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
    return weight, (bias - bn.running_mean) * scale + bn.bias


@torch.no_grad()
def fold_block(block: PartnerBlock) -> tuple[torch.Tensor, torch.Tensor]:
    """Kernel and bias of the single conv equal to the whole block in eval mode."""
    w1, b1 = fold_conv_bn(block.conv, block.bn)
    w2, b2 = fold_conv_bn(block.partner_conv, block.partner_bn)
    return w1 + w2, b1 + b2
