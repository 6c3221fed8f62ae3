"""The jobs on a finished model: evaluate it, profile its speed, export it."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..data import load_dataset
from ..data.cache import DEFAULT_BUDGET
from ..engine import (
    evaluate,
    make_loader,
    select_device,
)
from ..errors import BPLError, CorruptImageError
from ..exporting import CALIBRATION_IMAGES, INT8_MAX_DROP, MIN_CALIBRATION_IMAGES
from ..extension import partner_blocks
from ..fusion import fuse
from ..models import (
    load_model,
)

log = logging.getLogger(__name__)


def evaluate_checkpoint(
    path: str | Path,
    *,
    split: str | Path | None = None,
    batch_size: int = 64,
    device: str = "auto",
    overrides: dict[str, Any] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """`bpl evaluate`: accuracy of any checkpoint bpl wrote, on the test images of its run."""
    model, meta = load_model(path)
    data = _run_data(path, meta, split, overrides or {}, progress)
    dev = select_device(device)
    loader = make_loader(data.test, batch_size=batch_size, train=False, device=dev)
    metrics = evaluate(model.to(dev), loader, data.num_classes, device=dev)
    metrics["classes"] = list(data.classes)
    return metrics


def _run_data(path: str | Path, meta: dict[str, Any], split: str | Path | None,
              overrides: dict[str, Any], progress: bool, *, cache: bool = True):
    """The data of the run that wrote checkpoint ``path``, split as its split.json says
    (``split``, or the one beside the checkpoint); ``overrides`` replace the meta's
    dataset, root, image size, cache folder and skip_bad."""
    split_file = Path(split) if split else Path(path).parent / "split.json"
    if not split_file.exists():
        raise BPLError(f"no split file at {split_file}; pass --split with the run's split.json")
    o = overrides
    data = load_dataset(
        o.get("data", meta.get("data", "imagefolder")),
        o.get("data_root", meta.get("data_root")),
        image_size=o.get("image_size", meta.get("image_size", 224)),
        split_file=split_file,
        cache=o.get("cache", "auto" if cache else "off"),
        cache_dir=o.get("cache_dir"),
        cache_budget=o.get("cache_budget", DEFAULT_BUDGET),
        skip_bad=o.get("skip_bad", False),
        progress=progress,
    )
    if meta.get("classes") and list(data.classes) != list(meta["classes"]):
        raise BPLError(f"{path} was trained on other classes than {split_file} lists; "
                       "pass the split.json of the run that wrote the checkpoint")
    return data


def profile_checkpoints(
    paths: list[str | Path],
    *,
    image_size: int | None = None,
    batch_sizes: list[int] = (1, 16),
    threads: int | None = None,
    repeats: int = 20,
    onnx: bool = True,
) -> dict[str, Any]:
    """`bpl profile`: MACs, params and CPU latency (PyTorch, and onnxruntime if installed).

    All models and runtimes are timed interleaved in one run, so with two checkpoints
    (baseline, compressed) the speedups are fair ratios; they are shown next to the
    ideal speedup, the MACs ratio, as a fraction of it. PyTorch runs the form `bpl
    predict` uses (:func:`~bpl.exporting.deploy_form`: partners fused, BN folded,
    channels_last). An ``.onnx`` file from `bpl export` (fp32 or INT8) runs in
    onnxruntime alone, at the input size it was exported at, with the MACs and
    parameters its metadata records; fp32 against INT8 gets speedups but no fraction of
    the ideal (the MACs ratio does not count 8-bit arithmetic). When the last model's
    conv widths are not multiples of 8, or a runtime reaches under 0.6 of the ideal,
    ``note`` (also the table's last line) says so and suggests a fix
    (:func:`~bpl.profiling.speed_note`).
    """
    from ..exporting import OnnxModule, deploy_form, onnx_module
    from ..predict import load_predictor
    from ..profiling import compare_latency, conv_widths, count_macs, count_params, speed_note

    if not 1 <= len(paths) <= 2:
        raise BPLError("profile takes one checkpoint, or two (baseline and compressed)")
    models: dict[str, nn.Module] = {}
    files: dict[str, tuple[OnnxModule, dict[str, Any]]] = {}  # ONNX files: session, metadata
    sizes: dict[str, int] = {}
    for p in paths:
        name = str(p) if str(p) not in sizes else f"{p} (2)"
        if Path(p).suffix.lower() == ".onnx":
            if not onnx:
                raise BPLError(f"{p} is an ONNX file, which only onnxruntime runs: drop --no-onnx")
            files[name] = load_predictor(p, threads=threads)
            sizes[name] = files[name][1].get("image_size", 224)
            if image_size and image_size != sizes[name]:
                raise BPLError(f"{p} takes {sizes[name]} px images, as it was exported: drop "
                               f"--image-size, or export it again with --image-size {image_size}")
            continue
        model, meta = load_model(p)
        models[name] = fuse(model.eval()) if partner_blocks(model) else model.eval()
        sizes[name] = image_size or meta.get("image_size", 224)
    if len(set(sizes.values())) > 1:
        raise BPLError(f"the checkpoints use different image sizes {sorted(set(sizes.values()))}; "
                       "pass --image-size")
    size = next(iter(sizes.values()))
    x1 = torch.randn(1, 3, size, size)
    # PyTorch runs each model as `bpl predict` does: BN folded, channels_last
    runners = {(n, "torch"): deploy_form(m) for n, m in models.items()}
    if onnx:
        try:
            runners.update({(n, "onnxruntime"): onnx_module(m, x1, threads=threads)
                            for n, m in models.items()})
        except BPLError as exc:  # the optional extra is missing: say so, profile torch alone
            log.warning("onnxruntime latency skipped: %s", exc)
    runners.update({(n, "onnxruntime"): module for n, (module, _) in files.items()})
    runtimes = sorted({rt for _, rt in runners}, key=["torch", "onnxruntime"].index)
    rows: dict[str, dict[str, Any]] = {}
    for n in sizes:  # in the order given; an ONNX file's counts are in its metadata
        meta = files[n][1] if n in files else {}
        rows[n] = {"macs": count_macs(models[n], x1) if n in models else meta.get("macs"),
                   "params": count_params(models[n]) if n in models else meta.get("params"),
                   "precision": meta.get("precision", "fp32"),
                   "latency_ms": {rt: {} for rt in runtimes if (n, rt) in runners}}
    keyed = {f"{n} [{rt}]": r for (n, rt), r in runners.items()}
    for bs in batch_sizes:
        lat = compare_latency(keyed, torch.randn(bs, 3, size, size), threads=threads,
                              repeats=repeats)
        for n, rt in runners:
            rows[n]["latency_ms"][rt][bs] = lat[f"{n} [{rt}]"]
    lines = [f"input {size}x{size} px, median latency over {repeats} interleaved runs "
             f"({torch.get_num_threads() if threads is None else threads} threads)", "",
             "| model | runtime | precision | MACs | params | "
             + " | ".join(f"batch {b} (ms)" for b in batch_sizes) + " |",
             "|---|---|---|---:|---:|" + "---:|" * len(batch_sizes)]
    for n, r in rows.items():
        for rt, by_bs in r["latency_ms"].items():
            lines.append(f"| {n} | {rt} | {r['precision']} | {_millions(r['macs'], 1)} | "
                         f"{_millions(r['params'], 2)} | "
                         + " | ".join(f"{by_bs[b]:.2f}" for b in batch_sizes) + " |")
    result: dict[str, Any] = {"image_size": size, "threads": threads, "models": rows}
    if len(rows) == 2:
        a, b = rows.values()
        both = [rt for rt in runtimes if rt in a["latency_ms"] and rt in b["latency_ms"]]
        result["speedup"] = {
            rt: {bs: a["latency_ms"][rt][bs] / b["latency_ms"][rt][bs] for bs in batch_sizes}
            for rt in both
        }
        ideal = a["macs"] / b["macs"] if a["macs"] and b["macs"] else None
        same = a["precision"] == b["precision"]
        if ideal:
            result["ideal_speedup"] = ideal
            lines += ["", f"ideal speedup (MACs ratio): {ideal:.2f}x" + (
                "" if same else f" ({a['precision']} against {b['precision']}: the MACs ratio "
                                "does not count cheaper arithmetic)")]
        if ideal and same:
            result["fraction_of_ideal"] = {
                rt: {bs: sp / ideal for bs, sp in by_bs.items()}
                for rt, by_bs in result["speedup"].items()
            }
        for rt, by_bs in result["speedup"].items():
            for bs, sp in by_bs.items():
                lines.append(f"{rt}, batch {bs}: {sp:.2f}x faster"
                             + (f" = {sp / ideal:.2f} of ideal" if ideal and same else ""))
    last = list(rows)[-1]
    result["note"] = speed_note(conv_widths(models[last]) if last in models else {},
                                result.get("fraction_of_ideal"))
    if result["note"]:
        lines += ["", result["note"]]
    result["table"] = "\n".join(lines)
    return result


def _millions(n: int | None, digits: int) -> str:
    """``n`` in millions with an M, or a dash when unknown."""
    return "–" if n is None else f"{n / 1e6:.{digits}f}M"


def export_checkpoint(
    path: str | Path,
    *,
    format: str = "onnx",
    out: str | Path | None = None,
    image_size: int | None = None,
    verify_tol: float = 1e-4,
    int8: bool = False,
    calibration_data: str | Path | None = None,
    calibration_images: int = CALIBRATION_IMAGES,
    max_drop: float = INT8_MAX_DROP,
    force: bool = False,
    split: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
    progress: bool = True,
    int8_range: str = "auto",
) -> dict[str, Any]:
    """`bpl export`: a checkpoint to ONNX/TorchScript (fused, BN folded), parity-checked.

    ``int8=True``: a statically quantized ONNX model (:func:`~bpl.exporting.export`),
    calibrated on ``calibration_images`` images drawn at random (seed 0) from
    ``calibration_data`` (a folder) or else from the run's training split, each given the
    evaluation's preprocessing, and checked against fp32 on the run's validation split
    (refused beyond ``max_drop`` points unless ``force``). ``split`` and ``overrides``
    (data, data_root, cache_dir, skip_bad) find the run's data as `bpl evaluate` does.
    ``int8_range``: the weights' range (:func:`~bpl.exporting.choose_int8_range`).
    """
    from ..exporting import export
    from ..predict import onnx_metadata

    model, meta = load_model(path)
    size = image_size or meta.get("image_size", 224)
    suffix = ".int8.onnx" if int8 else ".onnx" if format == "onnx" else ".torchscript.pt"
    out = Path(out) if out else Path(path).with_suffix(suffix)
    metadata = onnx_metadata({**meta, "image_size": size}) if format == "onnx" else None
    extra = {}
    if int8:
        if format != "onnx":
            raise BPLError("--int8 writes an ONNX model: drop --format torchscript")
        extra = _int8_inputs(path, meta, size, calibration_data, calibration_images, split,
                             dict(overrides or {}, image_size=size), force, progress)
        extra["max_drop"] = None if force else max_drop
        extra["int8_range"] = int8_range
    return export(model, torch.randn(1, 3, size, size), out, format=format,
                  verify_tol=verify_tol,
                  metadata=metadata, int8=int8, **extra)


def _int8_inputs(path: str | Path, meta: dict[str, Any], size: int,
                 folder: str | Path | None, count: int, split: str | Path | None,
                 overrides: dict[str, Any], force: bool, progress: bool) -> dict[str, Any]:
    """:func:`~bpl.exporting.export`'s calibration and validation images for a checkpoint:
    ``count`` from ``folder`` or the run's training split, and the run's validation split."""
    from ..data import SceneDataset, eval_transform, resize_size
    from ..data.images import load_resized
    from ..predict import image_files

    if count < 1:
        raise BPLError(f"--calibration-images must be at least 1, got {count}")
    if meta.get("mean") is None or meta.get("std") is None:
        raise BPLError(f"{path} does not record its mean/std, so calibration images cannot be "
                       "preprocessed as in training; pass a checkpoint written by bpl")
    split_file = Path(split) if split else Path(path).parent / "split.json"
    data = (_run_data(path, meta, split_file, overrides, progress, cache=False)
            if split or split_file.exists() else None)
    pick = torch.Generator().manual_seed(0)
    transform = eval_transform(size, meta["mean"], meta["std"])
    if folder is not None:
        files = image_files([folder])
        chosen = sorted(torch.randperm(len(files), generator=pick)[:count].tolist())
        images = []
        for i in chosen:
            try:
                images.append(transform(load_resized(files[i], resize_size(size))))
            except CorruptImageError as exc:
                log.warning("calibration skips %s: %s", files[i], exc.reason)
        if not images:
            raise BPLError(f"none of the {len(chosen)} images chosen from {folder} could be "
                           "read; pass a folder of readable training images")
        calibration: Any = torch.stack(images)
        source = f"{len(images)} of the {len(files)} images in {Path(folder).resolve()}"
    elif data is not None:
        train = data.train
        chosen = sorted(torch.randperm(len(train), generator=pick)[:count].tolist())
        calibration = SceneDataset(train.source, [train.indices[i] for i in chosen],
                                   [train.targets[i] for i in chosen], transform, data.classes)
        source = (f"{len(chosen)} of the {len(train)} images of the training split of "
                  f"{data.name} ({data.root or 'bundled'}), as split in {split_file.resolve()}")
    else:
        raise BPLError(f"--int8 needs images to calibrate on and found no split.json beside "
                       f"{path}: pass --calibration-data DIR (a few hundred of your training "
                       "images), or --split with the run's split.json")
    validation = data.val if data is not None else None
    if validation is None and not force:
        why = "it has none" if data is not None else f"there is no split.json beside {path}"
        raise BPLError(f"--int8 checks INT8 against fp32 on the run's validation split and {why}: "
                       "pass --split with the run's split.json, or --force to write it unchecked")
    source += "; chosen at random (seed 0), preprocessed as for evaluation"
    return {"calibration": calibration, "calibration_source": source, "validation": validation,
            "min_calibration": min(count, MIN_CALIBRATION_IMAGES)}
