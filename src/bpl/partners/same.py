"""The train-time partners and the exact algebra that folds them away.

Two kinds of partner, both ``nn.Module``s that stand where the block's conv stood:

- :class:`PartnerBlock` (kind ``"conv+bn"``) replaces one conv->BN pair while training:
  ``y = bn(conv(x)) + partner_bn(partner_conv(x))``;
- :class:`ConvPartner` (kind ``"conv"``) is for a conv whose output does not go to
  exactly one BatchNorm (pre-activation nets, DenseNet, convs with a bias and no norm):
  ``y = conv(x) + scale * partner_conv(x)`` with a learnt per-channel ``scale``.

Both are linear in ``x`` once the BNs use their running statistics, so each is one
convolution plus a per-channel bias: :meth:`Partner.fold` computes that kernel and bias
exactly, and :mod:`bpl.fuse` writes them back into the original conv (and BN).

Everything :mod:`bpl.fuse` needs is a registered parameter, buffer or submodule, so it
moves with the model (``.to()``, ``.double()``, ``.cuda()``, ``state_dict``); the only
unregistered state is plain Python data (a pairing key, the class and hyper-parameters
of a replaced norm+activation layer).
"""

from __future__ import annotations

import copy
import uuid

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.modules.batchnorm import _BatchNorm

from .errors import InvalidArgumentError

__all__ = [
    "INITS",
    "KINDS",
    "DEFAULT_SHARE",
    "Partner",
    "PartnerBlock",
    "ConvPartner",
    "NormSlot",
    "fold_conv_bn",
    "fold_block",
    "same_conv_like",
]

#: How a partner can start; see :class:`PartnerBlock` and :class:`ConvPartner`.
INITS: tuple[str, ...] = ("preserve", "split", "paper")
#: The kinds of partner (``Partner.kind``): beside a conv->BN pair, or beside a bare conv.
KINDS: tuple[str, ...] = ("conv+bn", "conv")
#: The partner's share of the block under ``init="split"`` (ACNet's branch scale, 1/3).
DEFAULT_SHARE = 1 / 3

_BN_PARAMETERS = ("weight", "bias")
_BN_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")
_TAIL = ("drop", "act")


def same_conv_like(conv: nn.Conv2d, *, bias: bool | None = None) -> nn.Conv2d:
    """A freshly initialised Conv2d with every hyper-parameter of ``conv`` (bias as ``conv``'s unless given)."""
    return nn.Conv2d(
        conv.in_channels,
        conv.out_channels,
        conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        groups=conv.groups,
        bias=conv.bias is not None if bias is None else bias,
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


def _is_plain_batchnorm(bn: nn.Module) -> bool:
    """True for BatchNorm2d and subclasses that do not override forward."""
    return isinstance(bn, _BatchNorm) and type(bn).forward is _BatchNorm.forward


def norm_act_problem(bn: _BatchNorm) -> str | None:
    """Why a BN subclass that overrides forward cannot be split into BN + tail (None if it can).

    Accepted: timm's ``BatchNormAct2d`` shape: the BN's own parameters and buffers, and
    only ``drop`` / ``act`` children, applied after the normalisation in that order.
    """
    if _is_plain_batchnorm(bn):
        return None
    name = type(bn).__name__
    if not hasattr(bn, "act"):
        return f"BatchNorm ({name}) overrides forward"
    extra = [n for n in bn._parameters if n not in _BN_PARAMETERS]
    extra += [n for n in bn._buffers if n not in _BN_BUFFERS]
    extra += [n for n in bn._modules if n not in _TAIL]
    if extra:
        return f"norm+activation layer {name} has state a BatchNorm2d lacks ({', '.join(extra)})"
    return None


class NormSlot(nn.Module):
    """Stands where the block's BatchNorm stood, so the model's own forward keeps working.

    For a plain BatchNorm it is the identity (the block already normalised). For a
    norm+activation layer (timm's ``BatchNormAct2d`` style: a BN subclass with ``drop``
    and ``act`` children) it applies the tail that came after the normalisation, and
    :meth:`restore` rebuilds the layer at fuse time from the block's (plain) BN and this
    tail: both are registered, so they moved with the model wherever it went. Only a
    tensorless skeleton of the layer (its class and hyper-parameters) is kept outside
    the module tree. ``key`` pairs the slot with its :class:`PartnerBlock`.
    """

    def __init__(self, original: _BatchNorm) -> None:
        super().__init__()
        problem = norm_act_problem(original)
        if problem is not None:
            raise InvalidArgumentError(f"cannot stand in for {type(original).__name__}: {problem}")
        self.key = uuid.uuid4().hex
        self._tail_names = tuple(
            n for n in original._modules if isinstance(original._modules[n], nn.Module)
        ) if not _is_plain_batchnorm(original) else ()
        self.tail = nn.Sequential(*[original._modules[n] for n in self._tail_names])
        self._skeleton: list[nn.Module] = []  # a list, so it is not registered as a child
        if not _is_plain_batchnorm(original):
            self._persistent = {n: n not in original._non_persistent_buffers_set
                                for n in original._buffers}
            skeleton = copy.copy(original)
            for store in ("_parameters", "_buffers", "_modules"):
                skeleton.__dict__[store] = {}
            self._skeleton.append(copy.deepcopy(skeleton))  # own hook dicts, no tensors

    def restore(self, bn: nn.BatchNorm2d) -> nn.Module:
        """The module that goes back into this slot at fuse time, built on ``bn``'s tensors.

        ``bn`` itself for a plain BatchNorm; for a norm+activation layer, a new layer of
        the original class holding ``bn``'s parameters and buffers and this slot's tail.
        """
        if not self._skeleton:
            return bn
        norm = copy.deepcopy(self._skeleton[0])
        for name in _BN_PARAMETERS:
            norm.register_parameter(name, bn._parameters[name])
        for name, persistent in self._persistent.items():
            norm.register_buffer(name, bn._buffers.get(name), persistent=persistent)
        for name, module in zip(self._tail_names, self.tail):
            norm.add_module(name, module)
        return norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tail(x) if len(self.tail) else x


def check_init(init: str, share: float) -> None:
    """Refuse a partner start or share that the partners do not know."""
    if init not in INITS:
        raise InvalidArgumentError(f"init must be one of {', '.join(INITS)}; got {init!r}")
    if not 0.0 < share < 1.0 or share == 0.5:
        raise InvalidArgumentError(
            f"share must be between 0 and 1 and not 0.5, got {share} (at 0.5 the two copies "
            "get identical gradients and never become different)"
        )


class Partner(nn.Module):
    """Base of the partners: ``conv`` (the block's own conv) and ``partner_conv`` (same shape).

    ``kind`` is one of :data:`KINDS`; :meth:`fold` gives the kernel and bias of the one
    conv that equals the partner in eval mode (bias ``None`` when the conv needs none).
    """

    kind: str = ""
    conv: nn.Conv2d
    partner_conv: nn.Conv2d

    def fold(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        raise NotImplementedError


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

    kind = "conv+bn"
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
        self.bn = bn if _is_plain_batchnorm(bn) else plain_batchnorm_like(bn)
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

    kind = "conv"

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


def fold_conv_bn(conv: nn.Conv2d, bn: _BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """Kernel and bias of the single conv equal to ``bn(conv(x))`` with running statistics."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    weight = conv.weight * scale.reshape(-1, 1, 1, 1)
    bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
    return weight, (bias - bn.running_mean) * scale + bn.bias


@torch.no_grad()
def fold_block(block: Partner) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Kernel and bias of the single conv equal to the whole partner in eval mode."""
    return block.fold()
