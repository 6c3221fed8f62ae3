"""Holding soft-pruned channels at zero: the masked rows of every tensor, zeroed and kept so.

Gradient hooks zero the masked rows' gradients and :meth:`ChannelMasks.apply` re-zeroes
the rows themselves, because momentum and weight decay would otherwise revive them.
With ``regrow`` (the reference code's recipe) a partner's filter rows are zeroed only by
:meth:`ChannelMasks.zero_all` (at each re-mask) and train freely in between, so the
network trains with more channels than it deploys with. Its BNs are zeroed only at the
end (``final=True``): a zero BN scale over a zero filter has no gradient, and a zero
shift makes the channel exactly 0 before a ReLU, whose gradient at 0 is 0, so nothing
could regrow.
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

    def __init__(self, groups: list[SoftGroup], regrow: bool = False) -> None:
        self.groups = groups
        self._zero_idx: dict[Key, torch.Tensor | None] = {}
        self._on_device: dict[tuple[int, str, torch.device], torch.Tensor] = {}
        self._owners: dict[Key, tuple[nn.Module, str]] = {}  # held at zero
        self._regrowing: dict[Key, tuple[nn.Module, str]] = {}  # zeroed at re-masks only
        self._at_end: dict[Key, tuple[nn.Module, str]] = {}  # zeroed by the final re-mask only
        self._hooks = []
        for group in groups:
            for slices, attrs, later in ((group.filters, _FILTER_ATTRS, self._regrowing),
                                         (group.norms, _NORM_ATTRS, self._at_end)):
                for sl in slices:
                    owners = later if regrow and sl.partner else self._owners
                    for attr in attrs:
                        if getattr(sl.module, attr, None) is not None:
                            owners.setdefault((id(sl.module), attr), (sl.module, attr))
        for key, (module, attr) in self._owners.items():
            tensor = getattr(module, attr)
            if isinstance(tensor, nn.Parameter) and tensor.requires_grad:
                self._hooks.append(tensor.register_hook(self._grad_hook(key)))
        self.rebuild()

    def rebuild(self) -> None:
        """Per tensor, the channel indices to hold at zero (from every group's keep mask)."""
        zero: dict[Key, list[torch.Tensor]] = {
            key: [] for key in [*self._owners, *self._regrowing, *self._at_end]}
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
        """Re-zero every held channel (cheap; call it after each ``optimizer.step()``)."""
        self._zero(self._owners)

    @torch.no_grad()
    def zero_all(self, final: bool = False) -> None:
        """Zero every masked channel, regrowing partners' filters too (at a re-mask); with
        ``final`` their BNs as well, so every masked channel is exactly 0 (before removal)."""
        self._zero(self._owners)
        self._zero(self._regrowing)
        if final:
            self._zero(self._at_end)

    def _zero(self, owners: dict[Key, tuple[nn.Module, str]]) -> None:
        for key, (module, attr) in owners.items():
            tensor = getattr(module, attr)
            idx = self._idx_on(key, tensor.device)
            if idx is not None:
                tensor.index_fill_(0, idx, 0.0)

    def remove_hooks(self) -> None:
        """Detach the gradient hooks (the masks stay as they are)."""
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
