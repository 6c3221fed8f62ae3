"""The paper's partner (kind ``"same"``): a parallel conv of the block's own shape.

- :class:`PartnerBlock` replaces one conv->BN pair while training:
  ``y = bn(conv(x)) + partner_bn(partner_conv(x))``;
- :class:`ConvPartner` is for a conv whose output does not go to exactly one BatchNorm
  (pre-activation nets, DenseNet, convs with a bias and no norm):
  ``y = conv(x) + scale * partner_conv(x)`` with a learnt per-channel ``scale``.

Both are linear in ``x`` once the BNs use their running statistics, so each is one
convolution plus a per-channel bias: :meth:`fold` computes that kernel and bias exactly.
Everything :mod:`bpl.fusion` needs is a registered parameter, buffer or submodule, so it
moves with the model (``.to()``, ``.double()``, ``state_dict``).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.modules.batchnorm import _BatchNorm

from .algebra import fold_conv_bn, plain_batchnorm_like, same_conv_like
from .base import (
    DEFAULT_KIND,
    DEFAULT_SHARE,
    INITS,
    Partner,
    PartnerKind,
    check_init,
    register_kind,
)
from .slot import NormSlot, is_plain_batchnorm

__all__ = ["PartnerBlock", "ConvPartner", "randomize_scale_"]


class PartnerBlock(Partner):
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

    kind = DEFAULT_KIND
    #: Run both branches as one convolution over the stacked kernels (2C outputs) and one
    #: batch norm over 2C channels: the same function, parameters, statistics and fold.
    #: Used in training mode where the block allows it (groups == 1, both BNs plain
    #: BatchNorm2d with the same eps and momentum; not SyncBatchNorm), else the two-branch
    #: form. Eval mode (inference, Torch-Pruning's trace, export) always uses two branches.
    one_conv: bool = False

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
        self.bn = bn if is_plain_batchnorm(bn) else plain_batchnorm_like(bn)
        self.partner_conv = same_conv_like(conv)
        self.partner_bn = nn.BatchNorm2d(
            bn.num_features,
            eps=bn.eps,
            momentum=bn.momentum,
            device=conv.weight.device,
            dtype=conv.weight.dtype,
        )
        self.slot_key = slot.key  # plain data: fuse finds the slot by it, wherever it went
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.one_conv and self._can_stack():
            return self._stacked_forward(x)
        return self.bn(self.conv(x)) + self.partner_bn(self.partner_conv(x))

    def _can_stack(self) -> bool:
        """Whether the two branches can run as one conv and one BN (see :attr:`one_conv`)."""
        bn, pbn = self.bn, self.partner_bn
        return (bn.training and pbn.training and self.conv.groups == 1
                and type(bn) is type(pbn) is nn.BatchNorm2d
                and bn.eps == pbn.eps and bn.momentum == pbn.momentum
                and bn.track_running_stats and pbn.track_running_stats
                and (bn.momentum is not None or bool(bn.num_batches_tracked
                                                     == pbn.num_batches_tracked)))

    def _stacked_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Both branches as one conv over the kernels stacked to 2C outputs, one batch norm over
        the 2C channels (training mode), then the halves added: the same numbers as the
        two-branch form, running statistics included (written back into each BN)."""
        conv, pconv, bn, pbn = self.conv, self.partner_conv, self.bn, self.partner_bn
        weight = torch.cat([conv.weight, pconv.weight])
        bias = None if conv.bias is None else torch.cat([conv.bias, pconv.bias])
        z = conv._conv_forward(x, weight, bias)
        bn.num_batches_tracked.add_(1)
        pbn.num_batches_tracked.add_(1)
        factor = bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked)
        mean = torch.cat([bn.running_mean, pbn.running_mean])
        var = torch.cat([bn.running_var, pbn.running_var])
        z = F.batch_norm(z, mean, var, torch.cat([bn.weight, pbn.weight]),
                         torch.cat([bn.bias, pbn.bias]), True, factor, bn.eps)
        with torch.no_grad():  # F.batch_norm updated the concatenated copies
            for i, norm in enumerate((bn, pbn)):
                norm.running_mean.copy_(mean.chunk(2)[i])
                norm.running_var.copy_(var.chunk(2)[i])
        own, partner = z.chunk(2, dim=1)
        return own + partner

    @torch.no_grad()
    def fold(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Kernel and bias of the single conv equal to the whole block in eval mode."""
        w1, b1 = fold_conv_bn(self.conv, self.bn)
        w2, b2 = fold_conv_bn(self.partner_conv, self.partner_bn)
        return w1 + w2, b1 + b2

    def kernels(self, functional: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        if functional:
            return (fold_conv_bn(self.conv, self.bn)[0],
                    fold_conv_bn(self.partner_conv, self.partner_bn)[0])
        return self.conv.weight, self.partner_conv.weight


class ConvPartner(Partner):
    """A conv with a parallel partner conv of the same shape behind a per-channel scale.

    ``y = conv(x) + scale * partner_conv(x)``, for convs whose output does not go to
    exactly one BatchNorm. The partner has no bias and no BN (nothing to fold into a
    bias the conv may lack); ``partner_scale`` plays the partner BN's scale: a
    depthwise 1x1 conv, so Torch-Pruning removes its channels with the conv's. There
    are no statistics, so the block is linear in training mode too and fusion is
    ``conv.weight += scale * partner_conv.weight`` (the conv's bias is kept).

    How the partner starts (``init``), as for :class:`PartnerBlock`:

    - ``"preserve"``: a random partner kernel behind scale 0: exact (the partner adds
      zeros); the scale trains at once, the partner kernel once the scale is non-zero.
    - ``"split"``: the partner kernel is a copy of the conv's, its scale ``share``, and
      the conv's kernel is scaled by ``1 - share`` (its bias is kept). Exact up to
      rounding, in training mode too; the conv's kernel gets the full gradient and the
      partner's ``share`` of it, so the copies drift apart.
    - ``"paper"``: a random partner kernel with scale 0.5 and the conv's kernel halved
      (its bias kept). Not exact: the model's output changes.
    """

    kind = DEFAULT_KIND

    def __init__(self, conv: nn.Conv2d, init: str = "preserve", share: float = DEFAULT_SHARE):
        super().__init__()
        check_init(init, share)
        self.conv = conv
        self.partner_conv = same_conv_like(conv, bias=False)
        n = conv.out_channels
        self.partner_scale = nn.Conv2d(n, n, 1, groups=n, bias=False,
                                       device=conv.weight.device, dtype=conv.weight.dtype)
        with torch.no_grad():
            if init == "preserve":
                self.partner_scale.weight.zero_()
            elif init == "split":
                self.partner_conv.weight.copy_(conv.weight)
                self.partner_scale.weight.fill_(share)
                conv.weight.mul_(1.0 - share)
            else:
                self.partner_scale.weight.fill_(0.5)
                conv.weight.mul_(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) + self.partner_scale(self.partner_conv(x))

    @torch.no_grad()
    def fold(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Kernel and bias of the single conv equal to the block (bias ``None`` if it has none)."""
        scale = self.partner_scale.weight.reshape(-1, 1, 1, 1)
        return self.conv.weight + scale * self.partner_conv.weight, self.conv.bias

    def kernels(self, functional: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        if functional:
            return self.conv.weight, self.partner_scale.weight.reshape(-1, 1, 1, 1) * self.partner_conv.weight
        return self.conv.weight, self.partner_conv.weight

    def randomize_(self, generator: torch.Generator) -> None:
        randomize_scale_(self.partner_scale.weight, generator)


@torch.no_grad()
def randomize_scale_(scale: torch.Tensor, generator: torch.Generator) -> None:
    """Give a partner's per-channel scale values in [0.25, 0.75), as a trained one might have."""
    scale.copy_((torch.rand(scale.shape, generator=generator) * 0.5 + 0.25).to(scale.dtype))


def _build(conv: nn.Conv2d, bn: _BatchNorm | None, slot: NormSlot | None, *, init: str = "preserve",
           share: float = DEFAULT_SHARE) -> Partner:
    """A :class:`PartnerBlock` beside a conv->BN pair, a :class:`ConvPartner` beside a bare conv."""
    if bn is None:
        return ConvPartner(conv, init=init, share=share)
    return PartnerBlock(conv, bn, slot, init=init, share=share)


register_kind(PartnerKind(
    name=DEFAULT_KIND,
    summary="the paper's: a parallel conv of the block's shape, with its own BN",
    inits=INITS,
    build=_build,
    step_cost="1.1-1.9x",
))
