"""`bpl predict`: the top classes of images, from a deployed checkpoint or an exported ONNX file.

Images get exactly the evaluation preprocessing (decode to RGB, shorter side to
``round(size / 0.875)``, centre crop, normalise with the training run's mean/std), read
from the checkpoint's meta or the ONNX file's metadata (written by `bpl export`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from .data.images import IMAGE_EXTENSIONS, load_resized, resize_size
from .data.transforms import eval_transform
from .errors import BPLError, CorruptImageError

__all__ = ["ONNX_META_KEYS", "image_files", "load_predictor", "onnx_metadata", "predict"]

log = logging.getLogger(__name__)

#: What `bpl export` writes into an ONNX file's metadata_props (values are JSON): from the
#: checkpoint, then what :func:`bpl.export` adds (precision, MACs and parameters of one
#: image; for INT8 the quantization, its calibration images and the check against fp32).
ONNX_META_KEYS = ("classes", "mean", "std", "image_size", "preprocess", "bpl_version", "arch",
                  "precision", "macs", "params", "quantization", "calibration", "int8_check")


def preprocess_rule(image_size: int) -> dict[str, Any]:
    """How an image becomes the model's input, step by step, for a client without bpl:
    decode to RGB uint8, resize the shorter side (bilinear, antialiased, rounded back to
    uint8), centre-crop, scale to [0, 1], then normalise with ``mean``/``std``."""
    return {"decode": "RGB uint8", "resize_shorter_side": resize_size(image_size),
            "interpolation": "bilinear", "antialias": True, "round_to_uint8": True,
            "center_crop": image_size, "scale": 1 / 255, "normalize": "(x - mean) / std",
            "layout": "NCHW float32"}


def onnx_metadata(meta: dict[str, Any]) -> dict[str, str]:
    """The metadata_props of an exported model: class names, mean/std, input size and the
    whole preprocessing rule, version."""
    from . import __version__

    values = {**meta, "bpl_version": __version__}
    if values.get("image_size") is not None:
        values["preprocess"] = preprocess_rule(int(values["image_size"]))
    return {k: json.dumps(values[k]) for k in ONNX_META_KEYS if values.get(k) is not None}


def image_files(paths: Sequence[str | Path]) -> list[Path]:
    """The image files named, and those below each folder named (sorted)."""
    found: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found += sorted(f for f in p.rglob("*") if f.is_file()
                            and f.suffix.lower() in IMAGE_EXTENSIONS and not f.name.startswith("."))
        elif p.is_file():
            found.append(p)
        else:
            raise BPLError(f"{p} is neither an image file nor a folder; pass images or folders")
    if not found:
        raise BPLError(f"no images found in {', '.join(map(str, paths))}")
    return found


def load_predictor(
    path: str | Path, *, threads: int | None = None,
) -> tuple[Callable[[torch.Tensor], torch.Tensor], dict]:
    """A function from a normalised batch to logits, and the meta (classes, mean/std, size).

    A checkpoint runs in :func:`~bpl.exporting.deploy_form` (BN folded, channels_last)
    under :func:`torch.inference_mode`; an ``.onnx`` file (fp32 or INT8) in onnxruntime,
    on ``threads`` threads (default: all), as an :class:`~bpl.exporting.OnnxModule`.
    """
    path = Path(path)
    if path.suffix.lower() == ".onnx":
        from .exporting import OnnxModule

        if not path.is_file():
            raise BPLError(f"{path} does not exist; pass a file written by bpl export")
        module = OnnxModule(path, threads=threads)
        raw = module.session.get_modelmeta().custom_metadata_map
        meta = {k: json.loads(v) for k, v in raw.items() if k in ONNX_META_KEYS}
        if "classes" not in meta:
            raise BPLError(f"{path} has no bpl metadata (class names, mean/std); export it "
                           "again with bpl export")
        return module, meta
    from .exporting import deploy_form
    from .models import load_model

    model, meta = load_model(path)
    model = deploy_form(model)  # partners fused, BN folded, channels_last

    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return model(x)

    return run, meta


def predict(
    model_path: str | Path,
    inputs: Sequence[str | Path],
    *,
    top_k: int = 5,
    batch_size: int = 32,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Top-``top_k`` classes with probabilities for every image in ``inputs`` (files, folders).

    An image that cannot be decoded is skipped with a warning; its entry holds ``error``
    (why) instead of ``top``. If no image can be read at all, :class:`BPLError`.
    """
    run, meta = load_predictor(model_path)
    classes = list(meta.get("classes") or [str(i) for i in range(meta.get("num_classes", 0))])
    if not classes or meta.get("mean") is None:
        raise BPLError(f"{model_path} does not record its classes and mean/std; pass a "
                       "checkpoint written by bpl (deploy.pt) or an ONNX file from bpl export")
    size = int(meta.get("image_size", 224))
    transform = eval_transform(size, meta["mean"], meta["std"])
    files = image_files(inputs)
    k = min(top_k, len(classes))
    results: list[dict[str, Any]] = []
    bar = tqdm(total=len(files), desc="predict", unit="img", leave=False,
               disable=None if progress else True)
    for start in range(0, len(files), batch_size):
        chunk, images = [], []
        for f in files[start:start + batch_size]:
            try:  # the cache's decode + resize, then the evaluation transform: identical tensors
                images.append(transform(load_resized(f, resize_size(size))))
                chunk.append(f)
            except CorruptImageError as exc:  # one bad file must not cost the others' answers
                log.warning("skipped %s: %s", f, exc.reason)
                results.append({"image": str(f), "error": exc.reason})
        if images:
            probs = torch.softmax(run(torch.stack(images)).float(), dim=1)
            top = probs.topk(k, dim=1)
            for f, p, i in zip(chunk, top.values.tolist(), top.indices.tolist()):
                results.append({"image": str(f), "top": [
                    {"class": classes[j], "probability": q} for j, q in zip(i, p)]})
        bar.update(len(files[start:start + batch_size]))
    bar.close()
    order = {str(f): n for n, f in enumerate(files)}
    results.sort(key=lambda r: order[r["image"]])
    bad = [r for r in results if "error" in r]
    if len(bad) == len(files):
        raise BPLError(f"none of the {len(files)} images could be read (the first, "
                       f"{bad[0]['image']}: {bad[0]['error']}); pass image files")
    if bad:
        log.warning("%d of %d images could not be read and have no prediction", len(bad),
                    len(files))
    return results


def format_table(results: list[dict[str, Any]]) -> str:
    """One line per image: the image and its top classes with probabilities (or why not)."""
    width = max(len(r["image"]) for r in results)
    return "\n".join(
        f"{r['image']:<{width}}  " + (
            f"(unreadable: {r['error']})" if "error" in r else
            "  ".join(f"{t['class']} {100 * t['probability']:.1f}%" for t in r["top"]))
        for r in results
    )
