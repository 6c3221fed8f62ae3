"""What every partner is, and the registry of partner kinds.

A partner stands where a conv stood while training: the block's own ``conv`` (and, at a
conv->BN site, its ``bn``), plus the partner's branches, their outputs added. Each
*kind* (an entry of :data:`KINDS`) owns how it is built beside a conv (with or without a
following BN), how it starts, its exact fold into one kernel, what the diversity loss
compares, and how a checkpoint records it (its name per site; its widths follow from
the block's). The rest of bpl talks to partners only through :class:`Partner`'s methods.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import InvalidArgumentError, arg

__all__ = [
    "INITS",
    "DEFAULT_SHARE",
    "DEFAULT_KIND",
    "Partner",
    "PartnerKind",
    "KINDS",
    "register_kind",
    "partner_kind",
    "check_init",
]

#: How a partner can start (each kind says which of these it supports).
INITS: tuple[str, ...] = ("preserve", "split", "paper")
#: The partner's share of the block under ``init="split"`` (ACNet's branch scale, 1/3).
DEFAULT_SHARE = 1 / 3
#: The paper's partner: a parallel conv of the same shape (with its own BN at a conv->BN site).
DEFAULT_KIND = "same"


def check_init(init: str, share: float, inits: tuple[str, ...] = INITS, kind: str = DEFAULT_KIND) -> None:
    """Refuse a partner start or share that the partners (of ``kind``) do not know."""
    if init not in inits:
        raise InvalidArgumentError(
            f"{arg('init')} must be one of {', '.join(inits)} for {kind!r} partners; "
            f"got {init!r}", param="init")
    if not 0.0 < share < 1.0 or share == 0.5:
        raise InvalidArgumentError(
            f"{arg('partner_share')} must be between 0 and 1 and not 0.5, got {share} (at 0.5 "
            "the two copies get identical gradients and never become different)",
            param="partner_share")


class Partner(nn.Module):
    """Base of every partner: the block's ``conv`` (and ``bn``), the partner beside it, added.

    ``kind`` is the registry name; ``slot_key`` pairs a conv->BN partner with the
    :class:`NormSlot` that stands where its BN stood (``None`` at a conv without BN,
    where the fold is a kernel only and the conv keeps its bias).
    """

    kind: str = ""
    conv: nn.Conv2d  # and ``bn`` (a submodule) at a conv->BN site
    slot_key: str | None = None

    def fold(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Kernel and bias of the one conv that equals this block in eval mode (bias ``None``
        at a conv without BN: the conv's own bias is kept)."""
        raise NotImplementedError

    def kernels(self, functional: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """``(block kernel, partner kernel)`` of the same shape, for the diversity loss.

        Raw (``functional=False``): the kernels as trained, before their BNs (a structural
        partner's branches composed into one kernel). Functional: each BN-folded with its
        running statistics, so a sign flip that a BN undoes no longer looks like diversity.
        """
        raise NotImplementedError

    def partner_modules(self) -> list[nn.Module]:
        """The modules that belong to the partner (not the block's conv and BN)."""
        mine = {id(self.conv), id(getattr(self, "bn", None))}
        return [m for m in self.modules() if m is not self and id(m) not in mine
                and next(m.children(), None) is None]

    def randomize_(self, generator: torch.Generator) -> None:
        """Make a partner without BN contribute, as after training (its BNs are randomised elsewhere)."""


Builder = Callable[..., Partner]


@dataclass(frozen=True)
class PartnerKind:
    """One kind of partner: its name, what it is, the starts it supports, and how to build it.

    ``build(conv, bn, slot, init=..., share=...)`` returns the partner (``bn`` and
    ``slot`` are ``None`` beside a conv without BN); ``problem(conv)`` says why the kind
    cannot sit beside ``conv`` (``None`` if it can), where :func:`bpl.extend` gives that
    conv the default kind instead and says so in its report.
    """

    name: str
    summary: str
    inits: tuple[str, ...]
    build: Builder
    problem: Callable[[nn.Conv2d], str | None] = lambda conv: None
    #: A training step's cost over a plain one as measured on CPUs (resnet18 at 64 px,
    #: pruned and not: ``benchmarks/results/train_step_kinds.md``; ``same`` also resnet50 at
    #: 224 px: ``train_step.md``), for logs and docs.
    step_cost: str = ""


_REGISTRY: dict[str, PartnerKind] = {}
#: The registered partner kinds, by name (filled as the kinds' modules register).
KINDS: dict[str, PartnerKind] = _REGISTRY


def register_kind(kind: PartnerKind) -> PartnerKind:
    """Add ``kind`` to the registry (its name must be new)."""
    if kind.name in _REGISTRY:
        raise InvalidArgumentError(f"partner kind {kind.name!r} is already registered")
    _REGISTRY[kind.name] = kind
    return kind


def partner_kind(name: str) -> PartnerKind:
    """The registered kind called ``name``; an unknown name is refused with the choices."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise InvalidArgumentError(
            f"unknown partner kind {name!r}; choose one of {', '.join(_REGISTRY)}"
        ) from None

