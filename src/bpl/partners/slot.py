"""Where a partner's BatchNorm stood: :class:`NormSlot`, and which norm layers it can stand in for."""

from __future__ import annotations

import copy
import uuid

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..errors import InvalidArgumentError

__all__ = ["NormSlot", "norm_act_problem", "is_plain_batchnorm"]

_BN_PARAMETERS = ("weight", "bias")
_BN_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")
_TAIL = ("drop", "act")


def is_plain_batchnorm(bn: nn.Module) -> bool:
    """True for BatchNorm2d and subclasses that do not override forward."""
    return isinstance(bn, _BatchNorm) and type(bn).forward is _BatchNorm.forward


def norm_act_problem(bn: _BatchNorm) -> str | None:
    """Why a BN subclass that overrides forward cannot be split into BN + tail (None if it can).

    Accepted: timm's ``BatchNormAct2d`` shape: the BN's own parameters and buffers, and
    only ``drop`` / ``act`` children, applied after the normalisation in that order.
    """
    if is_plain_batchnorm(bn):
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
        ) if not is_plain_batchnorm(original) else ()
        self.tail = nn.Sequential(*[original._modules[n] for n in self._tail_names])
        self._skeleton: list[nn.Module] = []  # a list, so it is not registered as a child
        if not is_plain_batchnorm(original):
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
