"""The channel groups soft pruning works on: Torch-Pruning groups that hold a partner block.

A group lists, for every conv/Linear and BatchNorm whose output channels Torch-Pruning
removes together with a partner block's conv, which of its channels those are and where
they sit in the block's conv (the group's root). In a model without partners (Soft Filter
Pruning alone) the roots are the convs :func:`bpl.extend` would give partners.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
import torch_pruning as tp
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..extension import Placement, find_conv_bn_pairs, partner_blocks
from .graph import make_pruner, rounded_keep
from .importance import FilterNormImportance

__all__ = ["Slice", "SoftGroup", "build_soft_groups", "keep_count"]

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Slice:
    """Output channels of one module that a soft group controls."""

    module: nn.Module
    idxs: torch.Tensor  # channel indices in the module
    root: torch.Tensor  # the same channels as positions in the group's root conv
    partner: bool = False  # the module belongs to a partner (not to the block or the network)


@dataclass(eq=False)
class SoftGroup:
    """One group of coupled channels, rooted at a partner block's conv, and its keep mask."""

    name: str  # root conv (a partner block's conv) in the extended model
    root: nn.Module  # that conv
    deploy_name: str  # the same conv in the fused model
    size: int
    filters: list[Slice]
    norms: list[Slice]
    keep: torch.Tensor  # bool over the root's channels


def keep_count(n: int, keep_ratio: float, round_to: int | None) -> int:
    """How many of ``n`` channels a group keeps at ``keep_ratio`` (see :func:`rounded_keep`)."""
    return rounded_keep(n, n * keep_ratio, round_to)


def build_soft_groups(
    model: nn.Module, args: tuple[torch.Tensor, ...], ignored: list[str],
    placement: Placement = "paper",
) -> tuple[list[SoftGroup], tp.DependencyGraph]:
    """Every prunable group of ``model`` that contains a partner block and can be zeroed
    exactly, and the dependency graph they come from (to score them with any criterion).
    A model without partner blocks gets the groups of the convs :func:`bpl.extend` would
    extend at ``placement``, so soft pruning with and without partners zeroes the same
    channels of the same network (a model with partners has its placement already)."""
    blocks = partner_blocks(model)
    if blocks:
        block_of_conv = {id(b.conv): name for name, b in blocks}
    else:
        block_of_conv = {id(model.get_submodule(name)): name
                         for name, _ in find_conv_bn_pairs(model, placement).extended}
    partner_ids = {id(m) for _, b in blocks for m in b.partner_modules()}
    names = {m: n for n, m in model.named_modules()}
    pruner = make_pruner(model, args, FilterNormImportance(2), 0.0, ignored=ignored)
    dg = pruner.DG
    groups = []
    for group in dg.get_all_groups(
        ignored_layers=pruner.ignored_layers, root_module_types=pruner.root_module_types
    ):
        outs = [it.dep.target.module for it in group if dg.is_out_channel_pruning_fn(it.dep.handler)]
        if not any(id(m) in block_of_conv for m in outs):  # a partner's inner channels, or none
            continue
        root = next(m for m in outs if id(m) in block_of_conv)
        why = _unsupported(group, dg)
        if why:
            log.info("soft pruning skips the group of %s: %s", names[root], why)
            continue
        full = dg.get_pruning_group(root, tp.prune_conv_out_channels, list(range(root.out_channels)))
        filters, norms = [], []
        for it in full:
            if not dg.is_out_channel_pruning_fn(it.dep.handler):
                continue
            module = it.dep.target.module
            if isinstance(module, _BatchNorm):
                bucket = norms
            elif isinstance(module, nn.modules.conv._ConvNd | nn.Linear):
                bucket = filters
            else:  # graph-only nodes (additions, concatenations): nothing to zero
                continue
            bucket.append(Slice(module, torch.as_tensor(it.idxs, dtype=torch.long),
                                torch.as_tensor(it.root_idxs, dtype=torch.long),
                                partner=id(module) in partner_ids))
        groups.append(SoftGroup(
            name=names[root], root=root, deploy_name=block_of_conv[id(root)],
            size=root.out_channels,
            filters=filters, norms=norms, keep=torch.ones(root.out_channels, dtype=torch.bool),
        ))
    return groups, dg


def _unsupported(group: Any, dg: tp.DependencyGraph) -> str | None:
    """Why a group's channels cannot be zeroed exactly and removed by index (None if they can)."""
    for it in group:
        module = it.dep.target.module
        if isinstance(module, nn.modules.conv._ConvNd):
            if getattr(module, "transposed", False):
                return f"transposed conv {type(module).__name__}"
            if module.groups > 1 and not module.groups == module.in_channels == module.out_channels:
                return f"grouped conv (groups={module.groups})"
        elif dg.is_out_channel_pruning_fn(it.dep.handler) and not isinstance(
            module, (nn.Linear, _BatchNorm)
        ) and isinstance(module, nn.Module) and any(True for _ in module.parameters()):
            return f"{type(module).__name__} cannot be zeroed exactly"
        if isinstance(module, _BatchNorm) and not (module.affine and module.track_running_stats):
            return "BatchNorm without affine parameters or running statistics"
    return None

