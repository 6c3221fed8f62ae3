"""Small utilities on ``nn.Module``s that several parts of bpl share.

Example inputs as call arguments, eval mode that restores every flag, the model inside a
data-parallel wrapper, throw-away copies on the meta device, the one finder of a
model's output layers (its classifier), and the one place a model keeps the reports of
the bpl steps that made it (:func:`reports`).
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

__all__ = [
    "Inputs",
    "Scratch",
    "as_args",
    "eval_mode",
    "find_output_layers",
    "flat_tensors",
    "meta_copy",
    "record_report",
    "reports",
    "unwrap_parallel",
]

log = logging.getLogger(__name__)

#: Example inputs of a forward call: one tensor or a sequence of positional tensors.
Inputs = torch.Tensor | Sequence[torch.Tensor]


def as_args(example_inputs: Inputs) -> tuple[torch.Tensor, ...]:
    """The positional arguments of the forward call: a tensor becomes a 1-tuple."""
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    return tuple(example_inputs)


@contextlib.contextmanager
def eval_mode(*models: nn.Module) -> Iterator[None]:
    """Put ``models`` in eval mode and restore every module's own training flag afterwards."""
    flags = [[(m, m.training) for m in model.modules()] for model in models]
    for model in models:
        model.eval()
    try:
        yield
    finally:
        for per_model in flags:
            for module, training in per_model:
                module.training = training


def unwrap_parallel(model: nn.Module) -> nn.Module:
    """The model inside a DistributedDataParallel / DataParallel wrapper and a torch.compile
    wrapper (in either order); others as they are."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel | nn.DataParallel):
            model = model.module
        elif type(model).__name__ == "OptimizedModule" and hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


#: The attribute each step's report had before :func:`reports` (still set, until bpl 0.3).
LEGACY_REPORT_ATTRIBUTES = {"extend": "bpl_report", "prune": "bpl_prune_report"}


def reports(model: nn.Module) -> dict[str, Any]:
    """Every report of the bpl steps that made ``model``, keyed by step.

    ``"prune"``: a :class:`~bpl.PruneReport` (:func:`bpl.prune`); ``"extend"``: an
    :class:`~bpl.ExtendReport` (:func:`bpl.extend`, or a checkpoint with partners loaded;
    gone once :func:`bpl.fuse` has removed the partners); ``"soft"``: a
    :class:`~bpl.SoftReport` (on the model :meth:`bpl.SoftPruner.finalize` returns). A
    copy of a model keeps them; a model bpl did not make has none (``{}``).
    """
    return dict(getattr(unwrap_parallel(model), "bpl_reports", None) or {})


def record_report(model: nn.Module, step: str, report: Any | None) -> None:
    """Keep ``report`` as ``model``'s report of ``step`` (``None``: forget it), also under the
    step's old attribute where it had one. A new dict each time: a shallow copy of the
    model keeps its own reports."""
    held = {k: v for k, v in (getattr(model, "bpl_reports", None) or {}).items() if k != step}
    model.bpl_reports = held if report is None else {**held, step: report}
    legacy = LEGACY_REPORT_ATTRIBUTES.get(step)
    if legacy is None:
        return
    if report is not None:
        setattr(model, legacy, report)
    elif legacy in vars(model):
        delattr(model, legacy)


def meta_copy(model: nn.Module) -> nn.Module:
    """A structural copy of ``model`` whose parameters and buffers live on the meta device."""
    memo: dict[int, Any] = {}
    for p in model.parameters():
        memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
    for b in model.buffers():
        memo[id(b)] = torch.empty_like(b, device="meta")
    return copy.deepcopy(model, memo)


class Scratch:
    """Throw-away copies of a model for trials: on the meta device whenever the model runs there.

    ``args`` are the example inputs to run the copies with (on the meta device too when
    ``meta`` is true); a model with data-dependent ops falls back to real copies.
    """

    def __init__(self, model: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        meta_args = tuple(a.to("meta") for a in args)
        try:
            with torch.no_grad():
                trial = meta_copy(model).eval()
                trial(*meta_args)
            self.meta, self.args = True, meta_args
        except Exception as exc:  # a model with data-dependent ops: fall back to real copies
            log.info("model does not run on the meta device (%s); trials copy the weights", exc)
            self.meta, self.args = False, args

    def copy(self, model: nn.Module) -> nn.Module:
        """A copy of ``model`` to change freely (meta or real, as decided at construction)."""
        return meta_copy(model) if self.meta else copy.deepcopy(model)


def flat_tensors(out: Any) -> list[torch.Tensor]:
    """Every tensor in a model's output (a tensor, or nested tuples, lists and dicts)."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, Mapping):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in flat_tensors(o)]
    return []


def _out_width(module: nn.Module) -> int | None:
    if isinstance(module, nn.Linear):
        return module.out_features
    if isinstance(module, nn.modules.conv._ConvNd):
        return module.out_channels
    return None


def find_output_layers(
    model: nn.Module, example_inputs: Inputs | None = None, *, num_classes: int | None = None
) -> list[str]:
    """Qualified names of the layers that produce the model's outputs (the classifier).

    With ``example_inputs`` the model is run (on a scratch copy): a Linear/conv whose
    output tensor is returned as is; failing that (e.g. a conv classifier followed by
    pooling), the last Linear/conv executed whose output width equals the output's size
    in dim 1. Without inputs (e.g. before weights are loaded), by width alone: every
    Linear with ``num_classes`` outputs, else the last Conv2d with that many.
    """
    if example_inputs is None:
        if num_classes is None:
            raise TypeError("find_output_layers needs example_inputs or num_classes")
        return _layers_of_width(model, num_classes)
    args = as_args(example_inputs)
    scratch = Scratch(model, args)
    trial = scratch.copy(model)
    records: list[tuple[str, nn.Module, torch.Tensor]] = []
    hooks = []
    for name, module in trial.named_modules():
        if _out_width(module) is not None:
            hook = module.register_forward_hook(
                lambda m, i, o, name=name: records.append((name, m, o))
            )
            hooks.append(hook)
    try:
        with eval_mode(trial), torch.no_grad():
            outputs = flat_tensors(trial(*scratch.args))
    finally:
        for hook in hooks:
            hook.remove()
    names = [name for name, _, o in records if any(o is t for t in outputs)]
    if not names:
        for t in outputs:
            if t.dim() >= 2:
                same = [name for name, m, _ in records if _out_width(m) == t.shape[1]]
                names += same[-1:]
    if not names:
        log.warning("found no layer that produces the model output; no layer is protected")
    return list(dict.fromkeys(names))


def _layers_of_width(model: nn.Module, classes: int) -> list[str]:
    """Every Linear producing ``classes`` outputs, else the last Conv2d that does."""
    linears = [n for n, m in model.named_modules()
               if isinstance(m, nn.Linear) and m.out_features == classes]
    if linears:
        return linears
    convs = [n for n, m in model.named_modules()
             if isinstance(m, nn.Conv2d) and m.out_channels == classes]
    return convs[-1:]
