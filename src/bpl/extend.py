"""Give every eligible conv->BN pair of a CNN a train-time partner (step 2 of BPL).

Pairs are found in the torch.fx graph, not from attribute names: a ``Conv2d`` call
whose output is used by exactly one ``BatchNorm2d`` call and by nothing else. The
conv's slot in the module tree gets a :class:`~bpl.partner.PartnerBlock`, the BN's
slot a :class:`~bpl.partner.NormSlot`; the model's own ``forward`` is untouched, so
the extended model is the same class as the input.
"""

from __future__ import annotations

import copy
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch.fx
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .errors import BPLError, TraceError
from .partner import DEFAULT_SHARE, NormSlot, PartnerBlock, _is_plain_batchnorm, check_init

__all__ = ["extend", "find_conv_bn_pairs", "partner_blocks", "ExtendReport", "PAPER_KERNEL_SIZES"]

#: The paper's choice: square kernels with 1 < k < 7.
PAPER_KERNEL_SIZES: tuple[int, ...] = (3, 5)

KernelSpec = Iterable[int | tuple[int, int]] | Callable[[nn.Conv2d], bool] | None


@dataclass
class ExtendReport:
    """What :func:`extend` did: the conv->BN pairs it extended and every conv it skipped, with why."""

    extended: list[tuple[str, str]] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        lines = [f"extended {len(self.extended)} conv->BN pairs, skipped {len(self.skipped)} convs"]
        lines += [f"  skipped {name}: {why}" for name, why in self.skipped.items()]
        return "\n".join(lines)


class _NamingTracer(torch.fx.Tracer):
    """An fx tracer that remembers the innermost module being traced when tracing fails."""

    def __init__(self) -> None:
        super().__init__()
        self.failed_in: str | None = None

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        leaf = (PartnerBlock, NormSlot, _BatchNorm)  # BN subclasses (norm+act) stay one node
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


def _kernel_filter(kernel_sizes: KernelSpec) -> Callable[[nn.Conv2d], bool]:
    if kernel_sizes is None:
        return lambda conv: True
    if callable(kernel_sizes):
        return kernel_sizes
    wanted = {(k, k) if isinstance(k, int) else tuple(k) for k in kernel_sizes}
    return lambda conv: tuple(conv.kernel_size) in wanted


def find_conv_bn_pairs(
    model: nn.Module, kernel_sizes: KernelSpec = PAPER_KERNEL_SIZES
) -> ExtendReport:
    """Find the conv->BN pairs of ``model`` that :func:`extend` would give partners.

    ``kernel_sizes`` is an iterable of ints (square) or (kh, kw) tuples, a predicate on
    the conv, or ``None`` for every kernel size.
    """
    graph = trace(model)
    modules = dict(model.named_modules())
    eligible = _kernel_filter(kernel_sizes)
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
        elif not isinstance(bn, _BatchNorm) or isinstance(bn, nn.BatchNorm1d | nn.BatchNorm3d):
            what = ", ".join(str(u.target) for u in users) or "nothing"
            reason = f"its output feeds {what}, not exactly one BatchNorm2d"
        elif calls[user.target] > 1:
            reason = f"BatchNorm '{user.target}' is called more than once"
        elif not (bn.affine and bn.track_running_stats):
            reason = f"BatchNorm '{user.target}' has no affine parameters or running statistics"
        elif not (_is_plain_batchnorm(bn) or hasattr(bn, "act")):
            reason = f"BatchNorm '{user.target}' ({type(bn).__name__}) overrides forward"
        elif not eligible(conv):
            reason = f"kernel {tuple(conv.kernel_size)} is not eligible"
        if reason is None:
            report.extended.append((name, user.target))
        else:
            report.skipped[name] = reason
    return report


def partner_blocks(model: nn.Module) -> list[tuple[str, PartnerBlock]]:
    """Every partner block of ``model`` with its qualified name, in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, PartnerBlock)]


def extend(
    model: nn.Module,
    *,
    kernel_sizes: KernelSpec = PAPER_KERNEL_SIZES,
    init: str = "preserve",
    share: float = DEFAULT_SHARE,
    inplace: bool = False,
) -> nn.Module:
    """Return ``model`` with a partner conv+BN beside every eligible conv->BN pair.

    ``kernel_sizes``: which convs get partners; the paper's 3x3 and 5x5 by default,
    ``None`` for every conv (1x1 included). ``init`` says how the partners start:
    ``"preserve"`` (partner BN scale 0) and ``"split"`` (a copy of the block, BN scales
    split ``1 - share`` / ``share``) leave the model's output exactly as it was;
    ``"paper"`` is the reference code's start and changes it. See
    :class:`~bpl.partner.PartnerBlock` for the details of each. The report of what was
    extended and skipped is ``result.bpl_report`` (an :class:`ExtendReport`).
    """
    if partner_blocks(model):
        raise BPLError(
            "model is already extended (it has partner blocks); call bpl.fuse(model) first "
            "or extend the original model"
        )
    check_init(init, share)
    report = find_conv_bn_pairs(model, kernel_sizes)
    if not report.extended:
        raise BPLError(
            f"{type(model).__name__} has no eligible conv->BatchNorm2d pair to extend "
            f"({len(report.skipped)} convs skipped); pass kernel_sizes=None to accept every "
            "kernel size, or check that each conv feeds exactly one BatchNorm2d"
        )
    if not inplace:
        model = copy.deepcopy(model)
    for conv_name, bn_name in report.extended:
        conv, bn = model.get_submodule(conv_name), model.get_submodule(bn_name)
        slot = NormSlot(bn)
        model.set_submodule(conv_name, PartnerBlock(conv, bn, slot, init=init, share=share))
        model.set_submodule(bn_name, slot)
    model.bpl_report = report
    return model
