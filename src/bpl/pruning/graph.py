"""Torch-Pruning plumbing shared by hard and soft pruning.

The pruner factory and dependency graph (traced in eval mode), MACs of a model as
deployed, the checks of the common arguments, resolving ignored layers to names, and
the channel rounding rule (:func:`rounded_keep`) that hard and soft pruning share.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
import torch_pruning as tp
from torch import nn

from ..errors import PruningError, arg
from ..extension import partner_blocks
from ..fusion import fuse
from ..modules import Inputs, Scratch, as_args, eval_mode
from ..profiling import count_macs

__all__ = [
    "DEFAULT_ROUND_TO",
    "LayerRef",
    "check_fraction",
    "check_round_to",
    "dependency_graph",
    "deploy_macs",
    "make_pruner",
    "prune_to_widths",
    "resolve_layers",
    "round_to_fallbacks",
    "rounded_keep",
    "rounds",
]

#: A layer to leave alone: one of the model's modules, or its qualified name.
LayerRef = nn.Module | str
#: Pruned channel counts are kept multiples of this by default: CPU kernels (oneDNN in
#: PyTorch, MLAS in onnxruntime) work on blocks of 8 (AVX2) or 16 channels, and odd
#: counts leave them running partly empty blocks (issue 19 measured 0.40 of the ideal
#: speedup in onnxruntime without rounding against 0.91 with it, resnet18 at 64 px).
DEFAULT_ROUND_TO = 8


def rounds(round_to: int | None) -> bool:
    """Whether ``round_to`` asks for rounding at all (``None`` and ``1`` do not)."""
    return round_to is not None and round_to > 1


def rounded_keep(n: int, keep: float, round_to: int | None) -> int:
    """How many of a group's ``n`` channels to keep when the ratio alone keeps ``keep``.

    With rounding, the nearest multiple of ``round_to`` (halves up), at least
    ``round_to`` and at most ``n`` (a group kept whole stays whole). A group narrower
    than ``2 * round_to`` is not rounded: it could only keep ``round_to`` channels or all
    of them, too coarse a step for a small network, and too narrow to matter for speed.
    Without rounding, ``round(keep)``. Never fewer than one channel.
    """
    if not rounds(round_to) or n < 2 * round_to:
        return min(n, max(1, round(keep)))
    if keep >= n:
        return n
    return min(n, max(round_to, round_to * int(keep / round_to + 0.5)))


def round_to_fallbacks(round_to: int | None) -> list[int | None]:
    """``round_to``, then halved down to 1: what a MACs-target search tries in turn."""
    out = [round_to]
    while rounds(out[-1]):
        out.append(out[-1] // 2)
    return out


class _RoundingPruner(tp.pruner.BasePruner):
    """Torch-Pruning's pruner with :func:`rounded_keep` as its ``round_to`` rule.

    Torch-Pruning's own rule floors the kept count to a multiple of ``round_to`` and,
    when that leaves none (any group narrower than ``round_to``), skips the group
    entirely, so small networks stopped pruning and the reduction jumped. Groups with
    grouped (non-depthwise) convs are left unrounded: their width is already a multiple
    of the number of conv groups, and Torch-Pruning counts their pruned channels per
    conv group. With rounding, ``keep`` (root module name -> channels) overrides the
    count of those groups (a count above a group's width keeps it whole), and ``kept`` records the count of every rounded group.
    With ``exact``, ``keep`` is the whole allocation: it sets the count of every group it
    names, grouped ones included (a multiple of their conv groups), and every group it
    does not name stays whole (:func:`prune_to_widths`).
    """

    def __init__(self, *args: Any, keep: Mapping[str, int] | None = None, exact: bool = False,
                 **kwargs: Any) -> None:
        self._conv_groups: dict[nn.Module, int] = {}
        self._counted: Any = None
        self.keep = dict(keep or {})
        self.exact = exact
        self.kept: dict[str, int] = {}
        super().__init__(*args, **kwargs)
        self._names = {m: n for n, m in self.model.named_modules()}

    def _get_channel_groups(self, group: Any) -> int:
        n = super()._get_channel_groups(group)
        self._conv_groups[group[0].dep.target.module] = n
        return n

    def _prune(self) -> Any:
        # _round_to is told the channel count, not whose it is: note the module whose
        # channels were counted last (Torch-Pruning counts the root's just before).
        dg = self.DG

        def noting(get: Any) -> Any:
            def counted(module_or_node: Any) -> Any:
                self._counted = getattr(module_or_node, "module", module_or_node)
                return get(module_or_node)
            return counted

        dg.get_out_channels = noting(type(dg).get_out_channels.__get__(dg))
        dg.get_in_channels = noting(type(dg).get_in_channels.__get__(dg))
        try:
            yield from super()._prune()
        finally:
            del dg.get_out_channels, dg.get_in_channels

    def _round_to(self, n_pruned: int, current_channels: int, round_to: int) -> int:
        conv_groups = self._conv_groups.get(self._counted, 1)
        name = self._names.get(self._counted)
        if self.exact and name not in self.keep:
            return 0
        if conv_groups > 1:  # counted per conv group: keep at least one channel in each
            per_group = current_channels // conv_groups
            if self.exact:
                self.kept[name] = conv_groups * max(1, min(per_group, self.keep[name] // conv_groups))
                return per_group - self.kept[name] // conv_groups
            return min(n_pruned, per_group - 1)
        keep = self.keep.get(name)
        if keep is None:
            keep = rounded_keep(current_channels, current_channels - n_pruned, round_to)
        keep = min(keep, current_channels)
        self.kept[name] = keep
        return current_channels - keep


def _forward(model: nn.Module, args: Sequence[torch.Tensor]) -> Any:
    return model(*args)


def deploy_macs(model: nn.Module, example_inputs: Inputs) -> int:
    """MACs of ``model`` as deployed: an extended model is counted as if fused (no partners)."""
    args = as_args(example_inputs)
    if not partner_blocks(model):
        return count_macs(model, args)
    scratch = Scratch(model, args)
    folded = scratch.copy(model).eval()
    fuse(folded, inplace=True)
    return count_macs(folded, scratch.args)


def resolve_layers(model: nn.Module, layers: Iterable[LayerRef] | LayerRef | None) -> list[str]:
    """Qualified names of ``layers`` (modules of ``model`` or names); unknown ones raise."""
    if layers is None:
        return []
    if isinstance(layers, (nn.Module, str)):
        layers = [layers]
    names = {id(m): n for n, m in model.named_modules()}
    out = []
    for layer in layers:
        if isinstance(layer, str):
            try:
                model.get_submodule(layer)
            except AttributeError:
                raise PruningError(
                    f"ignored layer {layer!r} is not a module of {type(model).__name__}; pass "
                    "qualified names from model.named_modules() (e.g. 'layer1.0.conv1') or the "
                    "model's own modules"
                ) from None
            out.append(layer)
        elif isinstance(layer, nn.Module):
            if id(layer) not in names:
                raise PruningError(
                    f"ignored layer {type(layer).__name__} is not part of {type(model).__name__}; "
                    "pass the model's own modules (not modules of a copy) or qualified names"
                )
            out.append(names[id(layer)])
        else:
            raise PruningError(
                f"ignored layers must be modules or qualified names, got {type(layer).__name__}"
            )
    return out


def make_pruner(
    model: nn.Module,
    args: tuple[torch.Tensor, ...],
    importance: tp.importance.Importance,
    ratio: float,
    *,
    ignored: Iterable[str],
    global_pruning: bool = False,
    round_to: int | None = None,
    keep: Mapping[str, int] | None = None,
) -> tp.pruner.BasePruner:
    """A Torch-Pruning pruner on ``model``, traced in eval mode (training flags restored).

    ``round_to`` above 1 keeps channel counts multiples of it (:func:`rounded_keep`),
    except where ``keep`` (root module name -> channels) says otherwise; ``None`` or 1
    leaves Torch-Pruning's plain ratio rule as it is. After ``step()``, the pruner's
    ``kept`` holds the count of every group it rounded.
    """
    with eval_mode(model), torch.enable_grad():
        try:
            return _RoundingPruner(
                model,
                list(args),
                importance=importance,
                pruning_ratio=ratio,
                global_pruning=global_pruning,
                round_to=round_to if rounds(round_to) else None,
                keep=keep,
                ignored_layers=[model.get_submodule(n) for n in ignored],
                forward_fn=_forward,
            )
        except (ZeroDivisionError, IndexError) as exc:  # its index mapping, on reshapes
            # ShuffleNetV2's channel shuffle (a view that splits the channels into groups,
            # a transpose, a view back) is one: Torch-Pruning 1.6 cannot map channels
            # through it, so no channel of the model can be traced to its consumers
            raise PruningError(
                f"Torch-Pruning cannot trace the channel dependencies of "
                f"{type(model).__name__} ({type(exc).__name__} in its dependency graph; "
                "reshapes that mix channels, such as a channel shuffle, cause this): "
                "structured pruning is not available for this architecture: choose another "
                "(benchmarks/zoo.py checks an architecture in a minute)"
            ) from exc


def prune_to_widths(
    model: nn.Module,
    args: tuple[torch.Tensor, ...],
    importance: tp.importance.Importance,
    keep: Mapping[str, int],
    *,
    ignored: Iterable[str],
) -> dict[str, int]:
    """Prune ``model`` in place so that each group whose root ``keep`` names keeps exactly
    that many channels (the most important ones; for a group of grouped convs, a multiple
    of their conv groups, at least one per conv group); groups it does not name stay whole.
    Returns the count each named group kept."""
    with eval_mode(model), torch.enable_grad():
        pruner = _RoundingPruner(
            model,
            list(args),
            importance=importance,
            pruning_ratio=0.999,  # every group reaches the rounding rule, which sets its count
            round_to=1,
            keep=keep,
            exact=True,
            ignored_layers=[model.get_submodule(n) for n in ignored],
            forward_fn=_forward,
        )
        pruner.step()
    return dict(pruner.kept)


def dependency_graph(model: nn.Module, args: tuple[torch.Tensor, ...]) -> tp.DependencyGraph:
    """Torch-Pruning's dependency graph of ``model``, traced in eval mode."""
    with eval_mode(model), torch.enable_grad():
        return tp.DependencyGraph().build_dependency(
            model, example_inputs=list(args), forward_fn=_forward
        )


def check_fraction(value: float, what: str, example: str) -> float:
    """``value`` as a float strictly between 0 and 1, else a PruningError naming ``what``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value < 1.0:
        raise PruningError(f"{arg(what)} must be a number strictly between 0 and 1, got {value!r}; "
                           f"{example}", param=what)
    return float(value)


def check_speedup(speedup: float) -> float:
    """``speedup`` as a float above 1 (how many times faster), else a PruningError."""
    if (isinstance(speedup, bool) or not isinstance(speedup, (int, float))
            or not math.isfinite(speedup) or speedup <= 1.0):
        raise PruningError(f"{arg('speedup')} must be a number above 1 (how many times faster), "
                           f"got {speedup!r}; pass e.g. {arg('speedup', 2.0)}", param="speedup")
    return float(speedup)


def check_round_to(round_to: int | None) -> None:
    """Refuse a ``round_to`` that is neither None nor a positive int."""
    if round_to is not None and (
        isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1
    ):
        raise PruningError(
            f"{arg('round_to')} must be a positive whole number (1 or None: no rounding), got "
            f"{round_to!r}", param="round_to")
