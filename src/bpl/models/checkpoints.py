"""Checkpoints that rebuild pruned (and extended) models from widths, without pickled code."""

from __future__ import annotations

import os
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..deprecation import warn_deprecated
from ..errors import BPLError, CheckpointError
from ..extension import find_conv_bn_pairs, partner_sites, put_partners
from ..files import atomic_save
from ..modules import record_report, unwrap_parallel
from ..partners import DEFAULT_KIND, PARTNER_KINDS
from .zoo import stock_model

#: Value of the ``format`` field of every checkpoint written by :func:`save_model`.
CHECKPOINT_FORMAT = "bpl-checkpoint"
_VERSION = 1


#: Where the classes of a whole-model file may come from: modules and layers, no other code.
_MODEL_FILE_PACKAGES = ("torch.nn.", "torchvision.", "timm.")


def _model_file_classes(path: Path) -> list[type] | None:
    """The classes a whole-model file (``torch.save(model)``) needs, when every one of them is
    a torch.nn / torchvision / timm module class; None when it needs anything else."""
    import importlib

    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:
        return None
    classes = []
    for name in names:
        module_name, _, attr = name.rpartition(".")
        if not name.startswith(_MODEL_FILE_PACKAGES):
            return None
        try:
            cls = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError):
            return None
        if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
            return None
        classes.append(cls)
    return classes


def read_state_dict(path: Path, *, bpl_files: bool = False) -> dict[str, torch.Tensor]:
    """The stock state_dict in a weights file (unwrapped from ``state_dict``/``model``, no ``module.``).

    A whole model saved with ``torch.save(model)`` is accepted too when it is made of
    torch.nn, torchvision and timm modules only: those classes are allowed to load, nothing
    else is unpickled, and its ``state_dict()`` is returned. ``bpl_files``: a bpl
    checkpoint without partners gives its state_dict too (whether its widths fit a stock
    model is the caller's check); otherwise a bpl checkpoint is refused.
    """
    try:
        obj = _load_file(path)
    except CheckpointError:
        classes = _model_file_classes(path) if path.is_file() else None
        if not classes:
            raise
        with torch.serialization.safe_globals([*_numpy_safe_globals(), *classes]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, nn.Module):
        obj = obj.state_dict()
    if isinstance(obj, Mapping) and not _is_payload(obj):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if _is_payload(obj) and bpl_files and not obj.get("extended"):
        obj = obj["state_dict"]
    elif _is_payload(obj):
        raise CheckpointError(
            f"{path} is a bpl checkpoint (it may hold a pruned model); load it with "
            "bpl.load_model, not as weights for a stock model"
        )
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} does not hold a state_dict (a mapping of names to tensors)")
    return {k.removeprefix("module."): v for k, v in obj.items()}



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
        pairs.append([block_name, slot_name, block.kind])  # slot None: a partner without BN
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
    model = unwrap_parallel(model)
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


def save_model(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    arch: str,
    num_classes: int,
    meta: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``model`` (plain, pruned, extended or fused) to ``path`` so :func:`load_model`
    can rebuild it; returns the path.

    The file holds :func:`model_payload` and is written atomically (:func:`atomic_save`).
    The model comes first, as in every bpl function; the order of 0.1, ``(path, model)``,
    still works until bpl 0.3, with a ``DeprecationWarning``.
    """
    if isinstance(model, str | os.PathLike) and isinstance(path, nn.Module):
        warn_deprecated("save_model(path, model)", "save_model(model, path)")
        model, path = path, model
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


def _load_file(path: Path, map_location: Any = "cpu", mmap: bool = False) -> Any:
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist (or is not a file)")
    try:
        with torch.serialization.safe_globals(_numpy_safe_globals()):
            if mmap and zipfile.is_zipfile(path):  # tensors mapped, their bytes left unread
                return torch.load(path, map_location=map_location, weights_only=True, mmap=True)
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        raise CheckpointError(_unreadable(path, exc)) from None


def _unreadable(path: Path, exc: Exception) -> str:
    """What ``path`` is not, and what to pass instead (never "load it with weights_only=False":
    unpickling a file that is not a checkpoint can run any code in it)."""
    text = str(exc)
    if zipfile.is_zipfile(path) and "weights_only" in text.replace("Weights only", "weights_only"):
        return (
            f"{path} is not a bpl checkpoint or a state_dict: it holds pickled Python objects "
            "(beyond torch.nn, torchvision and timm modules), which bpl does not unpickle; pass "
            "a checkpoint bpl wrote (best.pt, deploy.pt), or save model.state_dict() and pass "
            "it with --arch NAME"
        )
    return (
        f"{path} is not a PyTorch checkpoint (torch.load cannot read it); pass a .pt file bpl wrote "
        "(best.pt, deploy.pt) or one saved with torch.save(model.state_dict())"
    )


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


def read_meta(path: str | os.PathLike) -> dict[str, Any]:
    """The ``meta`` of the model in a checkpoint bpl wrote, without reading its weights
    (they are memory-mapped, not read); ``{}`` for any other file."""
    path = Path(path)
    try:
        obj = _load_file(path, "cpu", mmap=True)
    except CheckpointError:
        return {}
    payload = obj if _is_payload(obj) else obj.get("model") if isinstance(obj, Mapping) else None
    return dict(payload.get("meta") or {}) if _is_payload(payload) else {}


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
        model = stock_model(arch, num_classes)
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
        _re_extend(model, pairs, mismatch)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        detail = " ".join(str(exc).split())[:300]
        raise CheckpointError(f"weights in {source} do not fit the rebuilt {arch!r}: {detail}") from None
    meta = dict(payload.get("meta") or {})
    meta.setdefault("arch", arch)
    meta.setdefault("num_classes", num_classes)
    return model, meta


def _re_extend(model: nn.Module, pairs: list[list], mismatch: str) -> None:
    """Put back the partners a checkpoint records: ``[conv, bn or None, kind]`` per site
    (checkpoints before partner kinds have ``[conv, bn]``: the default kind)."""
    chosen = {id(model.get_submodule(site[0])) for site in pairs}
    report = find_conv_bn_pairs(model, lambda conv: id(conv) in chosen)
    sites = report.extended
    if sorted(map(list, sites)) != sorted([site[0], site[1]] for site in pairs):
        raise CheckpointError(
            f"{mismatch}: re-extending gave other conv->BN pairs than were saved "
            f"({len(sites)} vs {len(pairs)})"
        )
    kinds = {site[0]: site[2] if len(site) > 2 else DEFAULT_KIND for site in pairs}
    unknown = sorted(set(kinds.values()) - set(PARTNER_KINDS))
    if unknown:
        raise CheckpointError(f"{mismatch}: it has partners of kind {unknown[0]!r}, which this bpl "
                              f"does not know ({', '.join(PARTNER_KINDS)}); upgrade bpl")
    put_partners(model, sites, kinds)
    report.partners = kinds
    record_report(model, "extend", report)


def load_model(path: str | os.PathLike, map_location: Any = "cpu") -> tuple[nn.Module, dict]:
    """Rebuild the model saved by :func:`save_model` (or held by a training checkpoint).

    Returns ``(model, meta)``; see :func:`model_from_payload`. Errors name the file.
    """
    path = Path(path)
    payload = load_checkpoint(path, model_only=True, map_location=map_location)
    return model_from_payload(payload, source=str(path))
