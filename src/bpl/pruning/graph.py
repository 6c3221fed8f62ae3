"""Torch-Pruning plumbing shared by hard and soft pruning.

The pruner factory and dependency graph (traced in eval mode), MACs of a model as
deployed, the checks of the common arguments, and resolving ignored layers to names.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch_pruning as tp
from torch import nn

from ..errors import PruningError
from ..extension import partner_blocks
from ..fusion import fuse
from ..modules import Inputs, Scratch, as_args, eval_mode
from ..profiling import count_macs

__all__ = [
    "LayerRef",
    "check_fraction",
    "check_round_to",
    "dependency_graph",
    "deploy_macs",
    "make_pruner",
    "resolve_layers",
]

#: A layer to leave alone: one of the model's modules, or its qualified name.
LayerRef = nn.Module | str


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
) -> tp.pruner.BasePruner:
    """A Torch-Pruning pruner on ``model``, traced in eval mode (training flags restored)."""
    with eval_mode(model), torch.enable_grad():
        return tp.pruner.BasePruner(
            model,
            list(args),
            importance=importance,
            pruning_ratio=ratio,
            global_pruning=global_pruning,
            round_to=round_to,
            ignored_layers=[model.get_submodule(n) for n in ignored],
            forward_fn=_forward,
        )


def dependency_graph(model: nn.Module, args: tuple[torch.Tensor, ...]) -> tp.DependencyGraph:
    """Torch-Pruning's dependency graph of ``model``, traced in eval mode."""
    with eval_mode(model), torch.enable_grad():
        return tp.DependencyGraph().build_dependency(
            model, example_inputs=list(args), forward_fn=_forward
        )


def check_fraction(value: float, what: str, example: str) -> float:
    """``value`` as a float strictly between 0 and 1, else a PruningError naming ``what``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value < 1.0:
        raise PruningError(f"{what} must be a number strictly between 0 and 1, got {value!r}; {example}")
    return float(value)


def check_round_to(round_to: int | None) -> None:
    """Refuse a ``round_to`` that is neither None nor a positive int."""
    if round_to is not None and (not isinstance(round_to, int) or round_to < 1):
        raise PruningError(f"round_to must be None or a positive int, got {round_to!r}")
