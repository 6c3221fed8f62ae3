"""Partners that differ from the conv in structure: branches of other shapes, each with its own BN.

Two kinds, beyond the paper:

- ``"diverse"`` (Diverse Branch Block, Ding et al. 2021): a 1x1 conv, a 1x1 conv -> KxK
  conv, and a 1x1 conv -> KxK average pool, each ending in its own BN;
- ``"asymmetric"`` (ACNet, Ding et al. 2019): a 1xK and a Kx1 conv, each with its own BN.

Beside a conv->BN pair, ``y = bn(conv(x)) + sum of branches(x)``. Beside a conv without
BN the branches have no BN (nothing could hold their bias) and their sum goes through a
learnt per-channel scale, as for the paper's :class:`~bpl.partners.same.ConvPartner`.
Every branch is linear in ``x`` with BN running statistics, so the whole partner folds
exactly into one KxK kernel and bias: a 1x1 or 1xK kernel sits at the centre of the KxK
one, a 1x1 -> KxK chain is one KxK kernel, an average pool is a constant kernel. Inside
a chain, the middle BN's output is padded with what that BN gives for a zero input
(:class:`PadBatchNorm2d`), so the chain equals one conv on the zero-padded input at the
border too (DBB's BN-and-pad trick).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.modules.batchnorm import _BatchNorm

from .algebra import (
    average_kernel,
    bn_scale_shift,
    compose_pointwise,
    embed_kernel,
    fold_conv_bn,
    plain_batchnorm_like,
)
from .base import Partner, PartnerKind, check_init, register_kind
from .same import randomize_scale_
from .slot import NormSlot, is_plain_batchnorm

__all__ = ["BranchPartner", "ConvAvgPool2d", "PadBatchNorm2d", "BRANCH_INITS"]

#: The starts a structural partner supports (a "split" copy has no meaning across shapes).
BRANCH_INITS: tuple[str, ...] = ("preserve", "paper")


class PadBatchNorm2d(nn.BatchNorm2d):
    """A BatchNorm2d whose output is padded with its own value for a zero input (eval shift).

    In a 1x1 -> BN -> KxK chain the KxK conv's padding would otherwise see zeros where a
    single KxK conv on the zero-padded input sees ``bn(0)``; padding with the BN's shift
    makes the chain exactly one conv (the shift is detached, as in DBB).
    """

    def __init__(self, num_features: int, padding: tuple[int, int], **kwargs) -> None:
        super().__init__(num_features, **kwargs)
        self.padding = tuple(padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        if not any(self.padding):
            return y
        shift = bn_scale_shift(self)[1].detach().reshape(1, -1, 1, 1)
        ph, pw = self.padding
        return F.pad(y - shift, (pw, pw, ph, ph)) + shift

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, padding={self.padding}"


class ConvAvgPool2d(nn.AvgPool2d):
    """``nn.AvgPool2d`` (zero padding counted, no ceil mode) computed as a depthwise conv.

    The same numbers up to rounding, 3-5x faster forward and backward on CPU than
    ``avg_pool2d`` at the small maps of a pruned network (measured at 64 px, batch 64).
    """

    def __init__(self, kernel_size, stride=None, padding=0) -> None:
        super().__init__(kernel_size, stride=stride, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kh, kw = _pair(self.kernel_size)
        kernel = x.new_full((x.shape[1], 1, kh, kw), 1.0 / (kh * kw))
        return F.conv2d(x, kernel, stride=self.stride, padding=self.padding, groups=x.shape[1])


def centred_padding(conv: nn.Conv2d) -> tuple[int, int] | None:
    """The conv's padding if it centres its odd kernel (``dilation * (k - 1) / 2``), else None."""
    k, d = conv.kernel_size, conv.dilation
    if any(size % 2 == 0 for size in k):
        return None
    centred = tuple(di * (ki - 1) // 2 for ki, di in zip(k, d))
    padding = conv.padding
    if isinstance(padding, str):
        padding = centred if padding == "same" else (0, 0)
    return centred if tuple(padding) == centred else None


def _shape_problem(conv: nn.Conv2d) -> str | None:
    """Why no branch of another shape can be folded into ``conv`` (None if one can)."""
    if min(conv.kernel_size) < 2:
        return f"kernel {tuple(conv.kernel_size)} leaves no room for branches of another shape"
    if conv.padding_mode != "zeros":
        return f"padding mode {conv.padding_mode!r} (branches fold exactly only with zero padding)"
    if centred_padding(conv) is None:
        return (f"kernel {tuple(conv.kernel_size)} with padding {conv.padding} is not an odd kernel "
                "with centred padding")
    return None


def _diverse_problem(conv: nn.Conv2d) -> str | None:
    problem = _shape_problem(conv)
    if problem is None and tuple(conv.dilation) != (1, 1):
        problem = f"dilation {tuple(conv.dilation)} (the average-pool branch has none)"
    return problem


def _conv(conv: nn.Conv2d, cin: int, cout: int, kernel, **kwargs) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel, groups=conv.groups, bias=False,
                     device=conv.weight.device, dtype=conv.weight.dtype, **kwargs)


def _norm(conv: nn.Conv2d, like: _BatchNorm | None, n: int, padding=None) -> nn.BatchNorm2d:
    kwargs = dict(eps=like.eps, momentum=like.momentum) if like is not None else {}
    kwargs.update(device=conv.weight.device, dtype=conv.weight.dtype)
    if padding is not None:
        return PadBatchNorm2d(n, padding, **kwargs)
    return nn.BatchNorm2d(n, **kwargs)


@torch.no_grad()
def _identity_(conv: nn.Conv2d) -> None:
    """A 1x1 conv with as many outputs as inputs set to the identity (per group), as in DBB."""
    conv.weight.zero_()
    per_group = conv.weight.shape[1]
    for m in range(conv.out_channels):
        conv.weight[m, m % per_group, 0, 0] = 1.0


def diverse_branches(conv: nn.Conv2d, bn: _BatchNorm | None) -> dict[str, nn.Sequential]:
    """DBB's three branches beside ``conv``: 1x1, 1x1 -> KxK, 1x1 -> average pool."""
    cin, cout, k, s = conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride
    pad = centred_padding(conv)
    first = _conv(conv, cin, cin, 1)
    _identity_(first)
    if bn is None:  # no BNs: zero padding inside each chain is exact
        chain = [first, _conv(conv, cin, cout, k, stride=s, padding=pad, dilation=conv.dilation)]
        pool = [_conv(conv, cin, cout, 1), ConvAvgPool2d(k, stride=s, padding=pad)]
    else:  # the middle BN pads with its own shift, the next layer pads no more
        chain = [first, _norm(conv, bn, cin, pad),
                 _conv(conv, cin, cout, k, stride=s, dilation=conv.dilation)]
        pool = [_conv(conv, cin, cout, 1), _norm(conv, bn, cout, pad), ConvAvgPool2d(k, stride=s)]
    return _with_tails(conv, bn, {"pointwise": [_conv(conv, cin, cout, 1, stride=s)],
                                  "pointwise_kxk": chain, "pointwise_avg": pool})


def asymmetric_branches(conv: nn.Conv2d, bn: _BatchNorm | None) -> dict[str, nn.Sequential]:
    """ACNet's two branches beside ``conv``: a 1xK (row) and a Kx1 (column) conv."""
    (kh, kw), (ph, pw) = conv.kernel_size, centred_padding(conv)
    cin, cout, s, d = conv.in_channels, conv.out_channels, conv.stride, conv.dilation
    return _with_tails(conv, bn, {
        "row": [_conv(conv, cin, cout, (1, kw), stride=s, padding=(0, pw), dilation=d)],
        "column": [_conv(conv, cin, cout, (kh, 1), stride=s, padding=(ph, 0), dilation=d)],
    })


def _with_tails(conv: nn.Conv2d, bn: _BatchNorm | None, branches: dict[str, list[nn.Module]]
                ) -> dict[str, nn.Sequential]:
    """Each branch as an ``nn.Sequential``, ending in its own BN beside a conv->BN pair."""
    tail = [] if bn is None else [None]
    return {name: nn.Sequential(*layers, *[_norm(conv, bn, conv.out_channels) for _ in tail])
            for name, layers in branches.items()}


def fold_branch(branch: nn.Sequential, with_bn: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Kernel and bias of the one conv equal to ``branch`` in eval mode (BNs skipped unless ``with_bn``).

    Without BNs it is the branch's raw kernel, what the (raw) diversity loss compares.
    """
    layers = list(branch)
    first = layers[0]
    weight = first.weight
    bias = weight.new_zeros(first.out_channels)
    for layer in layers[1:]:
        if isinstance(layer, _BatchNorm):
            if with_bn:
                scale, shift = bn_scale_shift(layer)
                weight = weight * scale.reshape(-1, 1, 1, 1)
                bias = bias * scale + shift
        elif isinstance(layer, nn.AvgPool2d):
            weight = average_kernel(weight, _pair(layer.kernel_size))
        else:  # a conv after a 1x1 conv
            g = layer.groups
            summed = layer.weight.sum((2, 3)).reshape(g, layer.out_channels // g, -1)
            bias = torch.einsum("gom,gm->go", summed, bias.reshape(g, -1)).reshape(-1)
            weight = compose_pointwise(weight, layer.weight, g)
    return weight, bias


def _pair(k) -> tuple[int, int]:
    return (k, k) if isinstance(k, int) else tuple(k)


class BranchPartner(Partner):
    """A conv (with its BN) and partner branches of other shapes; the outputs are added.

    ``branches`` maps a branch name to an ``nn.Sequential`` that starts with a conv and
    ends with its own BN (beside a conv without BN: no BNs, and ``partner_scale``, a
    depthwise 1x1 conv, scales the branches' sum per channel).

    How the partner starts (``init``): ``"preserve"`` zeroes the scale and shift of each
    branch's last BN (or ``partner_scale``), so the model computes exactly what it did;
    ``"paper"`` halves the block's BN scale (or kernel) and gives the branches the other
    half, shared equally (the output changes).
    """

    def __init__(self, kind: str, conv: nn.Conv2d, bn: _BatchNorm | None, slot: NormSlot | None,
                 branches: dict[str, nn.Sequential], init: str = "preserve") -> None:
        super().__init__()
        self.kind = kind
        self.conv = conv
        if bn is not None:
            self.bn = bn if is_plain_batchnorm(bn) else plain_batchnorm_like(bn)
            self.slot_key = slot.key
        self.branches = nn.ModuleDict(branches)
        n = conv.out_channels
        if bn is None:
            self.partner_scale = nn.Conv2d(n, n, 1, groups=n, bias=False,
                                           device=conv.weight.device, dtype=conv.weight.dtype)
        with torch.no_grad():
            half = 0.5 if init == "paper" else 0.0
            if bn is None:
                self.partner_scale.weight.fill_(half)
                if init == "paper":
                    conv.weight.mul_(0.5)
                return
            if init == "paper":
                self.bn.weight.mul_(0.5)
            for branch in self.branches.values():
                branch[-1].weight.fill_(half / len(self.branches))
                branch[-1].bias.zero_()

    def _partner_sum(self, x: torch.Tensor) -> torch.Tensor:
        out = None
        for branch in self.branches.values():
            y = branch(x)
            out = y if out is None else out + y
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.slot_key is None:
            return self.conv(x) + self.partner_scale(self._partner_sum(x))
        return self.bn(self.conv(x)) + self._partner_sum(x)

    def _branch_kernel(self, with_bn: bool) -> tuple[torch.Tensor, torch.Tensor]:
        size = tuple(self.conv.kernel_size)
        weight = bias = None
        for branch in self.branches.values():
            w, b = fold_branch(branch, with_bn)
            w = embed_kernel(w, size)
            weight, bias = (w, b) if weight is None else (weight + w, bias + b)
        return weight, bias

    @torch.no_grad()
    def fold(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.slot_key is None:
            kernel = self._branch_kernel(with_bn=False)[0]
            return self.conv.weight + self.partner_scale.weight.reshape(-1, 1, 1, 1) * kernel, self.conv.bias
        w, b = fold_conv_bn(self.conv, self.bn)
        pw, pb = self._branch_kernel(with_bn=True)
        return w + pw, b + pb

    def kernels(self, functional: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        if self.slot_key is None:
            kernel = self._branch_kernel(with_bn=False)[0]
            if functional:
                kernel = self.partner_scale.weight.reshape(-1, 1, 1, 1) * kernel
            return self.conv.weight, kernel
        if functional:
            return fold_conv_bn(self.conv, self.bn)[0], self._branch_kernel(with_bn=True)[0]
        return self.conv.weight, self._branch_kernel(with_bn=False)[0]

    def randomize_(self, generator: torch.Generator) -> None:
        if self.slot_key is None:
            randomize_scale_(self.partner_scale.weight, generator)


def _builder(kind: str, make_branches):
    def build(conv: nn.Conv2d, bn: _BatchNorm | None, slot: NormSlot | None, *,
              init: str = "preserve", share: float = 1 / 3) -> BranchPartner:
        check_init(init, share, BRANCH_INITS, kind)
        return BranchPartner(kind, conv, bn, slot, make_branches(conv, bn), init=init)

    return build


register_kind(PartnerKind(
    name="diverse",
    summary="Diverse Branch Block: 1x1, 1x1->KxK and 1x1->average-pool branches, each with its BN",
    inits=BRANCH_INITS,
    build=_builder("diverse", diverse_branches),
    problem=_diverse_problem,
    step_cost="3.4-5.0x",
))
register_kind(PartnerKind(
    name="asymmetric",
    summary="ACNet: a 1xK and a Kx1 branch, each with its BN",
    inits=BRANCH_INITS,
    build=_builder("asymmetric", asymmetric_branches),
    problem=_shape_problem,
    step_cost="2.0-4.1x",
))
