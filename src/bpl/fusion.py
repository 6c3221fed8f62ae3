"""Fold every partner back into its block (step 4 of BPL): same architecture, no partner cost."""

from __future__ import annotations

import copy
import math
import warnings

import torch
from torch import nn

from .errors import BPLError
from .extension import find_conv_bn_pairs, partner_blocks, partner_sites
from .modules import record_report
from .partners import NormSlot, Partner, fold_conv_bn

__all__ = ["fuse", "fold_batchnorm"]


@torch.no_grad()
def _write_back(
    block: Partner, slot: NormSlot | None, fold_bn: bool
) -> tuple[nn.Module, nn.Module | None]:
    """The conv and the module for the BN's slot (None without BN) that equal ``block``."""
    weight, bias = block.fold()
    conv = block.conv
    if block.slot_key is None:  # a partner without BN: kernel addition, bias untouched
        conv.weight.copy_(weight)
        return conv, None
    if fold_bn:
        if conv.bias is None:
            conv.bias = nn.Parameter(torch.empty_like(bias))
        conv.weight.copy_(weight)
        conv.bias.copy_(bias)
        return conv, (slot.tail if len(slot.tail) else nn.Identity())
    # Keep the BN, made exact by construction: running mean 0, scale 1/sqrt(var + eps) == 1.
    bn = block.bn
    conv.weight.copy_(weight)
    if conv.bias is not None:
        conv.bias.zero_()
    bn.running_mean.zero_()
    bn.running_var.fill_(1.0)
    bn.weight.fill_(math.sqrt(1.0 + bn.eps))
    bn.bias.copy_(bias)
    return conv, slot.restore(bn)  # rebuilt from tensors that moved with the model


def fuse(model: nn.Module, *, fold_bn: bool = False, inplace: bool = False) -> nn.Module:
    """Fold each partner exactly into its conv (and BN), using BN running statistics.

    The result has the module names and parameter shapes of the model that
    :func:`bpl.extend` received, so its ``state_dict`` loads with ``strict=True`` into
    that architecture, on the device and in the dtype the extended model had. With
    ``fold_bn=True`` each BN of a conv->BN pair is folded into its conv's bias instead
    (a deployment form: the BN modules become ``nn.Identity``).
    """
    if not partner_blocks(model):
        raise BPLError(
            "model has no partner blocks to fuse; call bpl.extend(model) before training, "
            "or use the model as it is"
        )
    if model.training:
        warnings.warn(
            "bpl.fuse uses BatchNorm running statistics, but the model is in training mode; "
            "call model.eval() first to make that explicit",
            stacklevel=2,
        )
    if not inplace:
        model = copy.deepcopy(model)
    for block_name, block, slot_name in partner_sites(model):
        slot = model.get_submodule(slot_name) if slot_name is not None else None
        conv, norm = _write_back(block, slot, fold_bn)
        model.set_submodule(block_name, conv)
        if norm is not None:
            model.set_submodule(slot_name, norm)
    record_report(model, "extend", None)  # it described partners that are gone
    return model


@torch.no_grad()
def fold_batchnorm(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """Fold every BatchNorm that directly follows a conv into that conv's weight and bias.

    For deployment (export): fewer layers, same function in eval mode. A model with
    partners is fused first with ``fuse(model, fold_bn=True)``.
    """
    if partner_blocks(model):  # then the BNs of convs without partners (1x1 shortcuts, ...)
        model = fuse(model, fold_bn=True, inplace=inplace)
    elif not inplace:
        model = copy.deepcopy(model)
    for conv_name, bn_name in find_conv_bn_pairs(
        model, placement=None, without_bn=False
    ).extended:
        conv, bn = model.get_submodule(conv_name), model.get_submodule(bn_name)
        weight, bias = fold_conv_bn(conv, bn)
        if conv.bias is None:
            conv.bias = nn.Parameter(torch.empty_like(bias))
        conv.weight.copy_(weight)
        conv.bias.copy_(bias)
        tail = NormSlot(bn).tail
        model.set_submodule(bn_name, tail if len(tail) else nn.Identity())
    return model
