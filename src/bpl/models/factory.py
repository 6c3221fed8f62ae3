"""Building a classification model by name, from scratch, published weights or a weights file."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
import torchvision
from torch import nn

from ..errors import BPLError, CheckpointError, arg
from ..modules import find_output_layers
from .checkpoints import read_state_dict
from .zoo import TINY, stock_model

log = logging.getLogger(__name__)


def replace_classifier(model: nn.Module, old_classes: int, num_classes: int) -> nn.Module:
    """Swap every classifier layer with ``old_classes`` outputs for a fresh one with ``num_classes``."""
    layers = [(n, model.get_submodule(n))
              for n in find_output_layers(model, num_classes=old_classes)]
    if not layers:
        raise BPLError(
            f"cannot find the classifier of {type(model).__name__} (no Linear or conv with "
            f"{old_classes} outputs); replace it by hand"
        )
    for name, layer in layers:
        if isinstance(layer, nn.Linear):
            new: nn.Module = nn.Linear(layer.in_features, num_classes, bias=layer.bias is not None)
        else:
            new = nn.Conv2d(layer.in_channels, num_classes, layer.kernel_size, layer.stride,
                            layer.padding, layer.dilation, layer.groups, layer.bias is not None)
        model.set_submodule(name, new)
    return model



def _load_weights(model: nn.Module, path: Path, num_classes: int) -> None:
    """Load a stock state_dict; a classifier of another size is kept freshly initialised."""
    state = read_state_dict(path, bpl_files=True)  # a bpl train run's best.pt, say
    own = model.state_dict()
    heads = set(find_output_layers(model, num_classes=num_classes))
    resized = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    skipped = [k for k in resized if k.rsplit(".", 1)[0] in heads]
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
             for k in resized if k not in skipped]
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if wrong or missing or unexpected:
        raise CheckpointError(
            f"weights in {path} do not fit {type(model).__name__}: shapes {wrong[:3]}, missing "
            f"{missing[:3]}, unexpected {unexpected[:3]}; pass weights of the same architecture "
            "(a pruned bpl model cannot start a stock one: compress it further with bpl "
            "compress --baseline, or load it with bpl.load_model)"
        )
    for key in skipped:
        del state[key]
    model.load_state_dict(state, strict=False)
    if skipped:
        log.info("kept a fresh %d-class classifier (%s) instead of the one in %s",
                 num_classes, ", ".join(skipped), path)


def baseline_from_weights(arch: str, num_classes: int, path: str | os.PathLike) -> nn.Module:
    """A stock ``arch`` holding every tensor of a weights file, classifier included.

    For compressing a model bpl did not train: a plain state_dict or a whole torchvision /
    timm model file. Unlike ``build_model(weights=...)`` nothing may be left fresh: a
    classifier of another size means the weights were trained for other classes.
    """
    model = stock_model(arch, num_classes)
    state = read_state_dict(Path(path))
    own = model.state_dict()
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
             for k, v in own.items() if k in state and state[k].shape != v.shape]
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if wrong or missing or unexpected:
        detail = "; ".join(f"{what} {items[:2]}" for what, items in
                           (("shapes", wrong), ("missing", missing), ("unexpected", unexpected))
                           if items)
        raise CheckpointError(
            f"{path} does not fit --arch {arch} with {num_classes} classes ({detail}); pass the "
            "--arch the weights belong to, and the data its classifier was trained on"
        )
    model.load_state_dict(state)
    return model


def build_model(
    arch: str,
    num_classes: int,
    *,
    pretrained: bool = False,
    weights: str | os.PathLike | None = None,
) -> nn.Module:
    """A classification model by name: a torchvision architecture or a tiny built-in CNN.

    ``pretrained=True`` downloads torchvision's published weights (needs internet) and
    then replaces the classifier for ``num_classes``. ``weights=PATH`` loads a stock
    state_dict from a file instead (no download; a classifier of another size in the
    file is skipped and stays freshly initialised).
    """
    if not isinstance(num_classes, int) or num_classes < 1:
        raise BPLError(f"{arg('num_classes')} must be a positive int, got {num_classes!r}",
                       param="num_classes")
    if weights is not None:
        model = stock_model(arch, num_classes)
        _load_weights(model, Path(weights), num_classes)
        return model
    if not pretrained:
        return stock_model(arch, num_classes)
    if arch in TINY:
        raise BPLError(f"{arch} has no published weights; use pretrained=False or --weights PATH")
    try:
        published = torchvision.models.get_model_weights(arch).DEFAULT
    except ValueError:
        stock_model(arch, num_classes)  # raises the unknown-architecture error
        raise
    try:
        model = torchvision.models.get_model(arch, weights=published)
    except Exception as exc:  # no network, bad cache, ...: one actionable message
        raise BPLError(
            f"could not get torchvision's pretrained weights for {arch} ({type(exc).__name__}: "
            f"{exc}); download {published.url} elsewhere and pass it with --weights PATH"
        ) from exc
    classes = len(published.meta["categories"])
    if classes != num_classes:
        replace_classifier(model, classes, num_classes)
    return model


@torch.no_grad()
def reinitialize(model: nn.Module) -> nn.Module:
    """Fresh weights for ``model`` as it is (pruned widths kept), in place: to train a pruned
    architecture from scratch.

    torchvision's CNN initialisation: convs He-normal over their fan-out (biases zero),
    norm layers scale 1 and shift 0 with fresh running statistics, Linear layers PyTorch's
    default. Draws from the global RNG: seed it first for a reproducible start.
    """
    for m in model.modules():
        if isinstance(m, nn.modules.conv._ConvNd):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.modules.batchnorm._NormBase | nn.GroupNorm):
            if getattr(m, "weight", None) is not None:
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            if getattr(m, "track_running_stats", False):
                m.reset_running_stats()
        elif isinstance(m, nn.Linear):
            m.reset_parameters()
    return model

