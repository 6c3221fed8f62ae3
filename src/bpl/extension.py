"""Give every eligible conv of a CNN a train-time partner (step 2 of BPL).

Sites are found in the torch.fx graph, not from attribute names. A ``Conv2d`` call
whose output is used by exactly one ``BatchNorm2d`` call and by nothing else is a
conv->BN pair: the conv's slot in the module tree gets a partner (of a kind from
:data:`~bpl.partners.PARTNER_KINDS`) built beside the conv and its BN, the BN's slot a
:class:`~bpl.partners.NormSlot`. Any other eligible conv (its output goes to an addition,
a concatenation, an activation: pre-activation nets, DenseNet, convs with a bias and no
norm) gets the kind's partner without BN unless ``without_bn=False``. The model's own
``forward`` is untouched, so the extended model is the same class as the input.
"""

from __future__ import annotations

import copy
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch.fx
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .deprecation import renamed_keywords
from .errors import BPLError, InvalidArgumentError, TraceError, arg
from .modules import record_report
from .partners import (
    DEFAULT_KIND,
    DEFAULT_SHARE,
    NormSlot,
    Partner,
    norm_act_problem,
    partner_kind,
)
from .partners.base import check_init

__all__ = [
    "extend",
    "find_conv_bn_pairs",
    "partner_blocks",
    "partner_sites",
    "ExtendReport",
    "PAPER_KERNEL_SIZES",
    "PLACEMENTS",
]

#: The paper's choice: square kernels with 1 < k < 7.
PAPER_KERNEL_SIZES: tuple[int, ...] = (3, 5)

#: Where partners go, by name (``--placement``): the paper's 3x3/5x5 convs, or every conv.
PLACEMENTS: dict[str, tuple[int, ...] | None] = {"paper": PAPER_KERNEL_SIZES, "all": None}

#: A placement: a name from :data:`PLACEMENTS`, kernel sizes (ints for square kernels,
#: ``(kh, kw)`` tuples), a predicate on the conv, or ``None`` (every conv).
Placement = str | Iterable[int | tuple[int, int]] | Callable[[nn.Conv2d], bool] | None


@dataclass
class ExtendReport:
    """What :func:`extend` did: the convs it gave partners, of which kind, and every conv skipped, with why
    (``bpl.reports(model)["extend"]``).

    ``extended`` holds ``(conv, bn)`` for a conv->BN pair and ``(conv, None)`` for a conv
    that got a partner without BN; ``without_bn`` says why each of the latter has no BN
    pair; ``skipped`` why each other conv got nothing. ``partners`` is the partner kind
    of each extended conv and ``fallback`` why a conv got the default kind instead of
    the one asked for.
    """

    extended: list[tuple[str, str | None]] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    without_bn: dict[str, str] = field(default_factory=dict)
    partners: dict[str, str] = field(default_factory=dict)
    fallback: dict[str, str] = field(default_factory=dict)

    @property
    def sites(self) -> dict[str, str]:
        """Where each partner sits: ``"conv+bn"`` (beside a conv->BN pair) or ``"conv"``."""
        return {conv: "conv" if bn is None else "conv+bn" for conv, bn in self.extended}

    def __str__(self) -> str:
        pairs = sum(bn is not None for _, bn in self.extended)
        kinds = ", ".join(f"{n} {k}" for k, n in Counter(self.partners.values()).items())
        lines = [f"extended {pairs} conv->BN pairs and {len(self.extended) - pairs} convs "
                 f"without BN" + (f" ({kinds} partners)" if kinds else "")
                 + f", skipped {len(self.skipped)} convs"]
        lines += [f"  conv partner for {name}: {why}" for name, why in self.without_bn.items()]
        lines += [f"  {self.partners[name]} partner for {name}: {why}"
                  for name, why in self.fallback.items()]
        lines += [f"  skipped {name}: {why}" for name, why in self.skipped.items()]
        return "\n".join(lines)


class _NamingTracer(torch.fx.Tracer):
    """An fx tracer that remembers the innermost module being traced when tracing fails."""

    def __init__(self) -> None:
        super().__init__()
        self.failed_in: str | None = None

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        # BN subclasses (norm+act) stay one node, and so do Conv2d subclasses: their own
        # forward (timm's dynamic "same" padding) may branch on shapes, and is never extended
        leaf = (Partner, NormSlot, _BatchNorm, nn.Conv2d)
        return isinstance(m, leaf) or super().is_leaf_module(m, qualname)

    def call_module(self, m, forward, args, kwargs):
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:
                self.failed_in = self.path_of_module(m) or type(m).__name__
            raise


def trace(model: nn.Module) -> torch.fx.Graph:
    """The fx graph of ``model``; a failure names the module that stopped the trace."""
    tracer = _NamingTracer()
    try:
        return tracer.trace(model)
    except Exception as exc:  # fx raises many kinds of errors: report them uniformly
        where = tracer.failed_in or f"{type(model).__name__}.forward"
        raise TraceError(
            f"cannot trace {type(model).__name__} with torch.fx: module '{where}' stopped the "
            f"trace ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}). "
            "Make its forward free of data-dependent Python control flow, or wrap it with "
            "torch.fx.wrap."
        ) from exc


def _kernel_filter(placement: Placement) -> Callable[[nn.Conv2d], bool]:
    if isinstance(placement, str):
        if placement not in PLACEMENTS:
            raise InvalidArgumentError(
                f"placement must be one of {', '.join(PLACEMENTS)} or kernel sizes, got "
                f"{placement!r}")
        placement = PLACEMENTS[placement]
    if placement is None:
        return lambda conv: True
    if callable(placement):
        return placement
    wanted = {(k, k) if isinstance(k, int) else tuple(k) for k in placement}
    return lambda conv: tuple(conv.kernel_size) in wanted


def _node_name(node: torch.fx.Node) -> str:
    """A short name for a graph node: a module's name, a function's or method's name."""
    if node.op == "call_module":
        return str(node.target)
    return getattr(node.target, "__name__", str(node.target))


def _bn_problem(user, bn: nn.Module | None, users: list, calls: Counter) -> str | None:
    """Why a conv's single user is not a BatchNorm2d it can be paired with (None if it is)."""
    if not isinstance(bn, _BatchNorm) or isinstance(bn, nn.BatchNorm1d | nn.BatchNorm3d):
        what = ", ".join(_node_name(u) for u in users) or "nothing"
        return f"its output feeds {what}, not exactly one BatchNorm2d"
    if calls[user.target] > 1:
        return f"BatchNorm '{user.target}' is called more than once"
    if not (bn.affine and bn.track_running_stats):
        return f"BatchNorm '{user.target}' has no affine parameters or running statistics"
    problem = norm_act_problem(bn)
    return None if problem is None else f"'{user.target}': {problem}"


@renamed_keywords(kernel_sizes="placement")
def find_conv_bn_pairs(
    model: nn.Module, placement: Placement = "paper", *, without_bn: bool = True
) -> ExtendReport:
    """Find the convs of ``model`` that :func:`extend` would give partners, and of which kind.

    ``placement`` is a name from :data:`PLACEMENTS` (``"paper"``: 3x3 and 5x5 kernels;
    ``"all"``), an iterable of kernel sizes (ints for square kernels, (kh, kw) tuples), a
    predicate on the conv, or ``None`` for every kernel size. With ``without_bn`` an eligible conv
    that is not in a conv->BN pair is listed as ``(conv, None)`` (a conv-only partner);
    without it, it is skipped.
    """
    graph = trace(model)
    modules = dict(model.named_modules())
    eligible = _kernel_filter(placement)
    calls = Counter(n.target for n in graph.nodes if n.op == "call_module")
    report = ExtendReport()
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules[node.target], nn.Conv2d):
            continue
        name, conv = node.target, modules[node.target]
        users = list(node.users)
        user = users[0] if len(users) == 1 else None
        bn = modules.get(user.target) if user is not None and user.op == "call_module" else None
        reason = None
        if calls[name] > 1:
            reason = "the conv module is called more than once"
        elif type(conv).forward is not nn.Conv2d.forward:
            reason = f"{type(conv).__name__} overrides Conv2d.forward"
        elif not eligible(conv):
            reason = f"kernel {tuple(conv.kernel_size)} is not eligible"
        problem = _bn_problem(user, bn, users, calls) if reason is None else None
        if reason is not None:
            report.skipped[name] = reason
        elif problem is None:
            report.extended.append((name, user.target))
        elif without_bn:
            report.extended.append((name, None))
            report.without_bn[name] = problem
        else:
            report.skipped[name] = problem
    return report


def partner_blocks(model: nn.Module) -> list[tuple[str, Partner]]:
    """Every partner (of any kind) of ``model`` with its qualified name, in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, Partner)]


def partner_sites(model: nn.Module) -> list[tuple[str, Partner, str | None]]:
    """``(partner name, partner, name of its NormSlot or None)`` for every partner of ``model``.

    A conv->BN partner is paired with its slot by key, not by reference, so the
    pairing holds in any copy of the model, on any device.
    """
    slots = {m.key: n for n, m in model.named_modules() if isinstance(m, NormSlot)}
    sites = []
    for name, block in partner_blocks(model):
        slot = None
        if block.slot_key is not None:
            slot = slots.get(block.slot_key)
            if slot is None:
                raise BPLError(
                    f"partner block '{name}' has lost its NormSlot (the module that stands "
                    "where its BatchNorm stood); extend the original model again"
                )
        sites.append((name, block, slot))
    return sites


@renamed_keywords(kernel_sizes="placement", share="partner_share")
def extend(
    model: nn.Module,
    *,
    partner: str = DEFAULT_KIND,
    placement: Placement = "paper",
    without_bn: bool = True,
    init: str = "preserve",
    partner_share: float = DEFAULT_SHARE,
    one_conv: bool = False,
    inplace: bool = False,
) -> nn.Module:
    """Return ``model`` with a partner of kind ``partner`` beside every eligible conv.

    ``partner``: a name from :data:`bpl.PARTNER_KINDS`: ``"same"`` (the paper's: a
    parallel conv of the block's shape with its own BN), ``"diverse"`` (Diverse Branch
    Block's 1x1, 1x1->KxK and 1x1->average-pool branches) or ``"asymmetric"`` (ACNet's
    1xK and Kx1 branches). A conv the kind cannot sit beside (a kernel without a centred
    padding, ...) gets ``"same"`` instead; the report's ``fallback`` says which and why.
    ``placement``: which convs get partners; ``"paper"`` (the default: 3x3 and 5x5),
    ``"all"`` for every conv (1x1 included), or kernel sizes or a predicate as
    :func:`find_conv_bn_pairs` takes them. A conv->BN pair gets a partner with BNs; any
    other eligible conv a partner without BN behind a per-channel scale, unless
    ``without_bn=False``. ``init`` says how the partners start: ``"preserve"`` (partner
    scale 0) and, for ``"same"``, ``"split"`` (a copy of the block, scales split
    ``1 - partner_share`` / ``partner_share``) leave the model's output exactly as it was; ``"paper"`` is
    the reference code's start and changes it. The defaults (3x3/5x5, ``"same"``,
    ``"preserve"``) are what bpl's recovery study chose on its validation split
    (docs/results.md), where no partner variant beat plain fine-tuning of the pruned model
    beyond its 95% interval. ``one_conv`` runs each ``"same"`` conv->BN partner as one conv
    over the stacked kernels and one BN over both halves
    (:attr:`~bpl.partners.PartnerBlock.one_conv`; the same function, parameters and fold;
    off by default: it was not faster on the CPU). The report of what was extended (and
    how) and skipped is ``bpl.reports(result)["extend"]`` (an :class:`ExtendReport`).
    """
    if partner_blocks(model):
        raise BPLError(
            "model is already extended (it has partner blocks); call bpl.fuse(model) first "
            "or extend the original model"
        )
    kind = partner_kind(partner)
    check_init(init, partner_share, kind.inits, kind.name)
    report = find_conv_bn_pairs(model, placement, without_bn=without_bn)
    if not report.extended:
        what = "conv" if without_bn else "conv->BatchNorm2d pair"
        raise BPLError(
            f"{type(model).__name__} has no eligible {what} to extend "
            f"({len(report.skipped)} convs skipped); pass {arg('placement', 'all')} to accept "
            "every kernel size" + ("" if without_bn else ", or without_bn=True for convs without BN")
        )
    if not inplace:
        model = copy.deepcopy(model)
    kinds = {}
    for conv_name, _ in report.extended:
        problem = kind.problem(model.get_submodule(conv_name))
        kinds[conv_name] = kind.name if problem is None else DEFAULT_KIND
        if problem is not None:
            report.fallback[conv_name] = problem
    put_partners(model, report.extended, kinds, init=init, share=partner_share,
                 one_conv=one_conv)
    report.partners = kinds
    record_report(model, "extend", report)
    return model


def put_partners(
    model: nn.Module,
    sites: Iterable[tuple[str, str | None]],
    kinds: dict[str, str],
    *,
    init: str = "preserve",
    share: float = DEFAULT_SHARE,
    one_conv: bool = False,
) -> None:
    """Put a partner of ``kinds[conv]`` at every ``(conv, bn or None)`` site of ``model``, in place."""
    for conv_name, bn_name in sites:
        build = partner_kind(kinds[conv_name]).build
        conv = model.get_submodule(conv_name)
        if bn_name is None:
            model.set_submodule(conv_name, build(conv, None, None, init=init, share=share))
            continue
        bn = model.get_submodule(bn_name)
        slot = NormSlot(bn)
        block = build(conv, bn, slot, init=init, share=share)
        if hasattr(type(block), "one_conv"):  # the kinds that can run as one stacked conv
            block.one_conv = one_conv
        model.set_submodule(conv_name, block)
        model.set_submodule(bn_name, slot)
