"""The exact algebra of folding: BN into a kernel, small kernels into big ones, 1x1 -> KxK chains.

Everything here is eval-mode arithmetic on tensors (BN running statistics), differentiable
in the kernels and BN affine parameters so the diversity loss can use it too.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = [
    "bn_scale_shift",
    "fold_conv_bn",
    "embed_kernel",
    "compose_pointwise",
    "average_kernel",
    "same_conv_like",
    "plain_batchnorm_like",
]


def bn_scale_shift(bn: _BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel ``(scale, shift)`` with ``bn(z) == scale * z + shift`` under running statistics."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    return scale, bn.bias - bn.running_mean * scale


def fold_conv_bn(conv: nn.Conv2d, bn: _BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """Kernel and bias of the single conv equal to ``bn(conv(x))`` with running statistics."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    weight = conv.weight * scale.reshape(-1, 1, 1, 1)
    bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
    return weight, (bias - bn.running_mean) * scale + bn.bias


def embed_kernel(kernel: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``kernel`` (odd height and width) placed at the centre of a zero kernel of ``size``.

    A 1x1 or 1xK kernel with the padding that keeps it centred computes what this KxK
    kernel computes with the KxK conv's padding.
    """
    kh, kw = kernel.shape[-2:]
    top, left = (size[0] - kh) // 2, (size[1] - kw) // 2
    pad = (left, size[1] - kw - left, top, size[0] - kh - top)
    return torch.nn.functional.pad(kernel, pad)


def compose_pointwise(first: torch.Tensor, second: torch.Tensor, groups: int) -> torch.Tensor:
    """The kernel of a 1x1 conv ``first`` followed by conv ``second``, both with ``groups``.

    ``first`` is ``(mid, in/groups, 1, 1)``, ``second`` ``(out, mid/groups, kh, kw)``; the
    result is ``(out, in/groups, kh, kw)``: per group, ``sum_m second[o, m] * first[m, i]``.
    """
    mid, in_g = first.shape[:2]
    out, mid_g, kh, kw = second.shape
    a = first.reshape(groups, mid // groups, in_g)
    b = second.reshape(groups, out // groups, mid_g, kh, kw)
    return torch.einsum("gomhw,gmi->goihw", b, a).reshape(out, in_g, kh, kw)


def average_kernel(first: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The kernel of a 1x1 conv ``first`` followed by a ``size`` average pool (channel-wise)."""
    return first.expand(*first.shape[:2], *size) / (size[0] * size[1])


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
