"""Model factory and checkpoints that rebuild pruned (and extended) models without pickled code.

:func:`build_model` makes a torchvision classification model, or one of the tiny CNNs
defined here for tests and demos, by name. :func:`save_model` writes the state_dict
together with the architecture name and the width of every Conv2d / BatchNorm /
Linear, so :func:`load_model` can rebuild the stock architecture, swap in modules of
the recorded widths, re-extend the convs that had partners, and load the weights with
``strict=True`` from a ``torch.load(weights_only=True)`` file.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .errors import BPLError
from .extend import extend, partner_sites

__all__ = [
    "CHECKPOINT_FORMAT",
    "CheckpointError",
    "TinyResNet",
    "TinyVGG",
    "atomic_save",
    "build_model",
    "list_models",
    "load_checkpoint",
    "load_model",
    "model_from_payload",
    "model_payload",
    "replace_classifier",
    "save_model",
]

log = logging.getLogger(__name__)

#: Value of the ``format`` field of every checkpoint written by :func:`save_model`.
CHECKPOINT_FORMAT = "bpl-checkpoint"
_VERSION = 1


class CheckpointError(BPLError):
    """A checkpoint that cannot be read or does not fit the architecture it names."""


# --------------------------------------------------------------------------- tiny CNNs


def _conv_bn(cin: int, cout: int, k: int = 3, stride: int = 1) -> tuple[nn.Conv2d, nn.BatchNorm2d]:
    return nn.Conv2d(cin, cout, k, stride, k // 2, bias=False), nn.BatchNorm2d(cout)


class _BasicBlock(nn.Module):
    """Two 3x3 conv+BN with a residual addition (1x1 conv+BN on the shortcut when shapes change)."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1, self.bn1 = _conv_bn(cin, cout, 3, stride)
        self.conv2, self.bn2 = _conv_bn(cout, cout, 3)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(*_conv_bn(cin, cout, 1, stride))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


class TinyResNet(nn.Module):
    """A ~100k-parameter ResNet for 32-64 px inputs: 3x3 stem, stages of 16/32/64 channels."""

    def __init__(self, num_classes: int = 10, widths: tuple[int, ...] = (16, 32, 64),
                 blocks: tuple[int, ...] = (2, 2, 1)) -> None:
        super().__init__()
        self.conv1, self.bn1 = _conv_bn(3, widths[0])
        self.relu = nn.ReLU(inplace=True)
        cin = widths[0]
        for i, (w, n) in enumerate(zip(widths, blocks)):
            stage = [_BasicBlock(cin if j == 0 else w, w, 2 if i > 0 and j == 0 else 1)
                     for j in range(n)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*stage))
            cin = w
        self.num_stages = len(widths)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        for i in range(self.num_stages):
            x = getattr(self, f"layer{i + 1}")(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


class TinyVGG(nn.Module):
    """A plain conv+BN+ReLU stack (no residuals), ~60k parameters, for 32-64 px inputs."""

    def __init__(self, num_classes: int = 10, widths: tuple[int, ...] = (16, 32, 64, 64)) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin = 3
        for i, w in enumerate(widths):
            layers += [*_conv_bn(cin, w), nn.ReLU(inplace=True)]
            if i < len(widths) - 1:
                layers.append(nn.MaxPool2d(2))
            cin = w
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


_TINY: dict[str, Callable[[int], nn.Module]] = {
    "tiny_resnet": lambda n: TinyResNet(n),
    "tiny_vgg": lambda n: TinyVGG(n),
}


def list_models() -> list[str]:
    """Every architecture name :func:`build_model` accepts."""
    return sorted(_TINY) + sorted(torchvision.models.list_models(module=torchvision.models))


# --------------------------------------------------------------------------- factory


def _output_layers(model: nn.Module, classes: int) -> list[tuple[str, nn.Module]]:
    """The classifier layers: every Linear producing ``classes`` outputs (else the last such conv)."""
    linears = [(n, m) for n, m in model.named_modules()
               if isinstance(m, nn.Linear) and m.out_features == classes]
    if linears:
        return linears
    convs = [(n, m) for n, m in model.named_modules()
             if isinstance(m, nn.Conv2d) and m.out_channels == classes]
    return convs[-1:]


def replace_classifier(model: nn.Module, old_classes: int, num_classes: int) -> nn.Module:
    """Swap every classifier layer with ``old_classes`` outputs for a fresh one with ``num_classes``."""
    layers = _output_layers(model, old_classes)
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


def _stock(arch: str, num_classes: int) -> nn.Module:
    if arch in _TINY:
        return _TINY[arch](num_classes)
    try:
        return torchvision.models.get_model(arch, num_classes=num_classes)
    except ValueError:
        raise BPLError(
            f"unknown architecture {arch!r}; use a torchvision classification model name "
            f"(e.g. resnet18, resnet50, mobilenet_v2) or one of {', '.join(sorted(_TINY))}"
        ) from None


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    obj = _load_file(path)
    if isinstance(obj, Mapping) and not _is_payload(obj):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if _is_payload(obj):
        raise CheckpointError(
            f"{path} is a bpl checkpoint (it may hold a pruned model); load it with "
            "bpl.load_model, not as weights for a stock model"
        )
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} does not hold a state_dict (a mapping of names to tensors)")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def _load_weights(model: nn.Module, path: Path, num_classes: int) -> None:
    """Load a stock state_dict; a classifier of another size is kept freshly initialised."""
    state = _read_state_dict(path)
    own = model.state_dict()
    heads = {n for n, _ in _output_layers(model, num_classes)}
    resized = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    skipped = [k for k in resized if k.rsplit(".", 1)[0] in heads]
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
             for k in resized if k not in skipped]
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if wrong or missing or unexpected:
        raise CheckpointError(
            f"weights in {path} do not fit {type(model).__name__}: shapes {wrong[:3]}, missing "
            f"{missing[:3]}, unexpected {unexpected[:3]}; pass weights of the same architecture"
        )
    for key in skipped:
        del state[key]
    model.load_state_dict(state, strict=False)
    if skipped:
        log.info("kept a fresh %d-class classifier (%s) instead of the one in %s",
                 num_classes, ", ".join(skipped), path)


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
        raise BPLError(f"num_classes must be a positive int, got {num_classes!r}")
    if weights is not None:
        model = _stock(arch, num_classes)
        _load_weights(model, Path(weights), num_classes)
        return model
    if not pretrained:
        return _stock(arch, num_classes)
    if arch in _TINY:
        raise BPLError(f"{arch} has no published weights; use pretrained=False or --weights PATH")
    try:
        published = torchvision.models.get_model_weights(arch).DEFAULT
    except ValueError:
        _stock(arch, num_classes)  # raises the unknown-architecture error
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


# --------------------------------------------------------------------------- checkpoints


def _widths(module: nn.Module) -> dict[str, Any] | None:
    if isinstance(module, nn.Conv2d):
        return {"type": "conv", "in": module.in_channels, "out": module.out_channels,
                "groups": module.groups, "bias": module.bias is not None}
    if isinstance(module, _BatchNorm):
        return {"type": "bn", "num_features": module.num_features}
    if isinstance(module, nn.Linear):
        return {"type": "linear", "in": module.in_features, "out": module.out_features,
                "bias": module.bias is not None}
    return None


def _architecture(model: nn.Module) -> tuple[dict[str, dict], list[list[str]], list[str]]:
    """Widths by stock module name, the extended (conv, bn) pairs, and Identity-replaced names.

    Names are those of the un-extended model: a partner block at ``B`` stands for the
    conv ``B`` and its NormSlot at ``S`` for the BN ``S``; the partner's own widths
    follow from the block's, so they are not recorded.
    """
    widths: dict[str, dict] = {}
    pairs: list[list[str | None]] = []
    skip: set[str] = set()
    for block_name, block, slot_name in partner_sites(model):
        pairs.append([block_name, slot_name])  # slot None: a conv partner (no BN)
        widths[block_name] = _widths(block.conv)
        skip.add(block_name)
        if slot_name is not None:
            widths[slot_name] = _widths(block.bn)
            skip.add(slot_name)
    identities = []
    for name, module in model.named_modules():
        if any(name == s or name.startswith(s + ".") for s in skip):
            continue
        spec = _widths(module)
        if spec is not None:
            widths[name] = spec
        elif isinstance(module, nn.Identity) and name:
            identities.append(name)
    return widths, pairs, identities


def _rebuilt(module: nn.Module, spec: Mapping[str, Any]) -> nn.Module:
    """A fresh module like ``module`` (same hyper-parameters) with the widths in ``spec``."""
    if spec["type"] == "conv":
        return type(module)(
            spec["in"], spec["out"], module.kernel_size, stride=module.stride,
            padding=module.padding, dilation=module.dilation, groups=spec["groups"],
            bias=spec["bias"], padding_mode=module.padding_mode,
        )
    if spec["type"] == "bn":
        return type(module)(spec["num_features"], eps=module.eps, momentum=module.momentum,
                            affine=module.affine, track_running_stats=module.track_running_stats)
    return type(module)(spec["in"], spec["out"], bias=spec["bias"])


def model_payload(
    model: nn.Module,
    arch: str,
    num_classes: int,
    meta: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Everything :func:`model_from_payload` needs to rebuild ``model``, as plain data.

    The state_dict, ``arch``, ``num_classes``, the widths of every Conv2d / BatchNorm /
    Linear (by the name it has in the un-extended model), the conv->BN pairs that have
    partners, the modules replaced by ``nn.Identity`` (BN folded into conv), and
    ``meta`` (plain values: numbers, strings, lists, dicts, tensors).
    """
    if isinstance(model, nn.parallel.DistributedDataParallel | nn.DataParallel):
        model = model.module
    widths, pairs, identities = _architecture(model)
    return {
        "format": CHECKPOINT_FORMAT,
        "version": _VERSION,
        "arch": arch,
        "num_classes": int(num_classes),
        "widths": widths,
        "extended": pairs,
        "identity": identities,
        "meta": dict(meta or {}),
        "state_dict": model.state_dict(),
    }


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` to a temporary file in the same folder, then move it into place.

    A crash or a full disk never leaves half a file at ``path``: the previous file (if
    any) stays until the new one is complete and synced.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        torch.save(obj, tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def save_model(
    path: str | os.PathLike,
    model: nn.Module,
    *,
    arch: str,
    num_classes: int,
    meta: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``model`` (plain, pruned, extended or fused) so :func:`load_model` can rebuild it.

    The file holds :func:`model_payload` and is written atomically (:func:`atomic_save`).
    """
    return atomic_save(model_payload(model, arch, num_classes, meta), path)


def _numpy_safe_globals() -> list[Any]:
    """numpy arrays (training checkpoints keep numpy's RNG state) are data: allow them."""
    try:
        import numpy as np
    except ImportError:
        return []
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct
    kinds = (np.uint32, np.int64, np.int32, np.float64, np.float32, np.bool_)
    return [_reconstruct, np.ndarray, np.dtype, *{type(np.dtype(k)) for k in kinds}]


def _load_file(path: Path, map_location: Any = "cpu") -> Any:
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist (or is not a file)")
    try:
        with torch.serialization.safe_globals(_numpy_safe_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"cannot read {path} as a weights-only torch file ({first}); is it a checkpoint "
            "written by bpl.save_model or torch.save?"
        ) from None


def _is_payload(obj: Any) -> bool:
    return isinstance(obj, Mapping) and obj.get("format") == CHECKPOINT_FORMAT


def load_checkpoint(
    path: str | os.PathLike, *, model_only: bool = False, map_location: Any = "cpu"
) -> dict[str, Any]:
    """Read a checkpoint bpl wrote, without unpickling code.

    With ``model_only=True`` the model payload is returned, whether the file is a model
    checkpoint (:func:`save_model`) or a training checkpoint holding one under
    ``"model"``; otherwise the whole mapping.
    """
    path = Path(path)
    obj = _load_file(path, map_location)
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path} is not a bpl checkpoint (it holds a {type(obj).__name__})")
    if not model_only:
        return dict(obj)
    if _is_payload(obj):
        return dict(obj)
    if _is_payload(obj.get("model")):
        return dict(obj["model"])
    raise CheckpointError(
        f"{path} is not a bpl checkpoint (no format={CHECKPOINT_FORMAT!r} field); write it "
        "with bpl.save_model, or load plain weights with build_model(weights=PATH)"
    )


def model_from_payload(payload: Mapping[str, Any], *, source: str = "checkpoint") -> tuple[nn.Module, dict]:
    """Rebuild the model in a :func:`model_payload`; returns ``(model, meta)``.

    The stock ``arch`` is built, every module whose recorded width differs is replaced
    by a fresh one of that width (same hyper-parameters), convs that had partners are
    extended again (so training can resume), and the weights load with ``strict=True``.
    ``meta`` is the saved meta dict, with ``arch`` and ``num_classes`` added when it
    lacks them. ``source`` names the payload in error messages (e.g. the file).
    """
    if not _is_payload(payload):
        raise CheckpointError(
            f"{source} is not a bpl checkpoint (no format={CHECKPOINT_FORMAT!r} field); write it "
            "with bpl.save_model, or load plain weights with build_model(weights=PATH)"
        )
    if payload.get("version", 0) > _VERSION:
        raise CheckpointError(
            f"{source} was written by a newer bpl (checkpoint version {payload['version']}); "
            "upgrade bpl to load it"
        )
    try:
        arch, num_classes = payload["arch"], payload["num_classes"]
        widths, pairs = payload["widths"], payload.get("extended", [])
        state = payload["state_dict"]
    except KeyError as exc:
        raise CheckpointError(f"{source} is a damaged bpl checkpoint (no {exc.args[0]!r} field)") from None
    try:
        model = _stock(arch, num_classes)
    except BPLError as exc:
        raise CheckpointError(f"cannot rebuild {source}: {exc}") from None
    mismatch = f"{source} does not match architecture {arch!r}"
    for name, spec in widths.items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise CheckpointError(f"{mismatch}: it has no module {name!r}") from None
        if _widths(module) is None or _widths(module)["type"] != spec["type"]:
            raise CheckpointError(
                f"{mismatch}: {name!r} is a {type(module).__name__}, the checkpoint records a "
                f"{spec['type']}"
            )
        if _widths(module) != spec:
            model.set_submodule(name, _rebuilt(module, spec))
    for name in payload.get("identity", []):
        try:
            if not isinstance(model.get_submodule(name), nn.Identity):
                model.set_submodule(name, nn.Identity())
        except AttributeError:
            raise CheckpointError(f"{mismatch}: it has no module {name!r}") from None
    if pairs:
        chosen = {id(model.get_submodule(conv)) for conv, _ in pairs}
        extend(model, kernel_sizes=lambda conv: id(conv) in chosen, inplace=True)
        found = sorted(map(list, model.bpl_report.extended))
        if found != sorted(map(list, pairs)):
            raise CheckpointError(
                f"{mismatch}: re-extending gave other conv->BN pairs than were saved "
                f"({len(found)} vs {len(pairs)})"
            )
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        detail = " ".join(str(exc).split())[:300]
        raise CheckpointError(f"weights in {source} do not fit the rebuilt {arch!r}: {detail}") from None
    meta = dict(payload.get("meta") or {})
    meta.setdefault("arch", arch)
    meta.setdefault("num_classes", num_classes)
    return model, meta


def load_model(path: str | os.PathLike, map_location: Any = "cpu") -> tuple[nn.Module, dict]:
    """Rebuild the model saved by :func:`save_model` (or held by a training checkpoint).

    Returns ``(model, meta)``; see :func:`model_from_payload`. Errors name the file.
    """
    path = Path(path)
    payload = load_checkpoint(path, model_only=True, map_location=map_location)
    return model_from_payload(payload, source=str(path))
