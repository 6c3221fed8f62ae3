"""Holding soft-pruned channels at exactly zero: the masked rows of every tensor, kept zeroed.

Gradient hooks zero the masked rows' gradients and :meth:`ChannelMasks.apply` re-zeroes
the rows themselves, because momentum and weight decay would otherwise revive them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .soft_groups import SoftGroup

__all__ = ["ChannelMasks"]

_FILTER_ATTRS = ("weight", "bias")
_NORM_ATTRS = ("weight", "bias", "running_mean")

Key = tuple[int, str]  # (id of the module, name of the tensor)


class ChannelMasks:
    """The channel indices to hold at zero in every tensor the soft groups control."""

    def __init__(self, groups: list[SoftGroup]) -> None:
        self.groups = groups
        self._zero_idx: dict[Key, torch.Tensor | None] = {}
        self._on_device: dict[tuple[int, str, torch.device], torch.Tensor] = {}
        self._owners: dict[Key, tuple[nn.Module, str]] = {}
        self._hooks = []
        for group in groups:
            for slices, attrs in ((group.filters, _FILTER_ATTRS), (group.norms, _NORM_ATTRS)):
                for sl in slices:
                    for attr in attrs:
                        if getattr(sl.module, attr, None) is not None:
                            self._owners.setdefault((id(sl.module), attr), (sl.module, attr))
        for key, (module, attr) in self._owners.items():
            tensor = getattr(module, attr)
            if isinstance(tensor, nn.Parameter) and tensor.requires_grad:
                self._hooks.append(tensor.register_hook(self._grad_hook(key)))
        self.rebuild()

    def rebuild(self) -> None:
        """Per tensor, the channel indices to hold at zero (from every group's keep mask)."""
        zero: dict[Key, list[torch.Tensor]] = {key: [] for key in self._owners}
        for group in self.groups:
            dropped = ~group.keep
            for sl in group.filters + group.norms:
                idxs = sl.idxs[dropped[sl.root]]
                for attr in _NORM_ATTRS:
                    if (id(sl.module), attr) in zero:
                        zero[(id(sl.module), attr)].append(idxs)
        self._zero_idx = {
            key: torch.unique(torch.cat(parts)) if parts and sum(map(len, parts)) else None
            for key, parts in zero.items()
        }
        self._on_device.clear()

    def _idx_on(self, key: Key, device: torch.device) -> torch.Tensor | None:
        idx = self._zero_idx.get(key)
        if idx is None:
            return None
        cached = self._on_device.get((*key, device))
        if cached is None:
            cached = self._on_device[(*key, device)] = idx.to(device)
        return cached

    def _grad_hook(self, key: Key) -> Callable[[torch.Tensor], torch.Tensor | None]:
        def hook(grad: torch.Tensor) -> torch.Tensor | None:
            idx = self._idx_on(key, grad.device)
            return None if idx is None else grad.index_fill(0, idx, 0.0)

        return hook

    @torch.no_grad()
    def apply(self) -> None:
        """Re-zero every masked channel (cheap; call it after each ``optimizer.step()``)."""
        for key, (module, attr) in self._owners.items():
            tensor = getattr(module, attr)
            idx = self._idx_on(key, tensor.device)
            if idx is not None:
                tensor.index_fill_(0, idx, 0.0)

    def remove_hooks(self) -> None:
        """Detach the gradient hooks (the masks stay as they are)."""
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
