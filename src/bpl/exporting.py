"""Export a deployable model to ONNX or TorchScript, and prove the export computes the same."""

from __future__ import annotations

import json
import logging
import tempfile
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset

from .deprecation import renamed_keywords
from .errors import BPLError, InvalidArgumentError, VerificationError, arg
from .extension import partner_blocks
from .files import atomic_path
from .fusion import fold_batchnorm, fuse
from .profiling import count_macs, count_params
from .verification import max_relative_error as _relative

__all__ = [
    "CALIBRATION_IMAGES",
    "FORMATS",
    "INT8_MAX_DROP",
    "MIN_CALIBRATION_IMAGES",
    "ChannelsLast",
    "OnnxModule",
    "compare_top1",
    "deploy_form",
    "export",
    "onnx_module",
]

log = logging.getLogger(__name__)
FORMATS = ("onnx", "torchscript")
#: Images `bpl export --int8` calibrates on by default ("a few hundred"), and the fewest
#: :func:`export` accepts unless told otherwise (``min_calibration``).
CALIBRATION_IMAGES = 300
MIN_CALIBRATION_IMAGES = 50
#: Validation top-1 points an INT8 model may lose against fp32 before :func:`export`
#: refuses to write it. One point, not less: on a small validation split one image is
#: worth more than half a point (UC Merced's 168 validation images: 0.6 each).
INT8_MAX_DROP = 1.0

#: Images (a tensor), a map-style dataset of ``(image, label)``, or batches of either.
Images = torch.Tensor | Dataset | Iterable[Any]


class ChannelsLast(nn.Module):
    """``model`` with its weights and inputs in ``torch.channels_last`` memory format.

    oneDNN's convolutions run NHWC without reordering every activation; on pruned models
    at small inputs this measured up to 3x faster than the default NCHW at batch 1
    (resnet18, 64 px, 1 thread; benchmarks/bench_deploy.py).
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model.to(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.model(x)


def deploy_form(model: nn.Module) -> nn.Module:
    """The form PyTorch runs a model fastest on CPU, the one `bpl predict` runs and
    `bpl export --format torchscript` writes: partners fused, BatchNorm folded into the
    convs, channels_last (:class:`ChannelsLast`), eval mode. ``model`` is not changed."""
    return ChannelsLast(fold_batchnorm(model.cpu().eval())).eval()


def _write_torchscript(model: nn.Module, x: torch.Tensor, path: str) -> None:
    """Trace :func:`deploy_form` and freeze it (weights inlined as constants)."""
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(deploy_form(model), x)
        torch.jit.save(torch.jit.freeze(traced.eval()), path)


def _write_onnx(model: nn.Module, x: torch.Tensor, path: str, opset: int) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, (x,), path,
            input_names=["images"], output_names=["logits"],
            dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}},
            opset_version=opset, dynamo=False,
        )


def _set_onnx_metadata(path: str, metadata: dict[str, str]) -> None:
    onnx, _ = _require_onnx()
    proto = onnx.load(path)
    onnx.helper.set_model_props(proto, {str(k): str(v) for k, v in metadata.items()})
    onnx.save(proto, path)


def _require_onnx():
    """The onnx and onnxruntime modules, or a clear error naming the extra to install."""
    try:
        import onnx
        import onnxruntime
    except ImportError as exc:
        raise BPLError("ONNX export needs onnx and onnxruntime: pip install 'bpl[onnx]'") from exc
    return onnx, onnxruntime


def _require_quantization():
    """onnxruntime's quantization tools, or a clear error naming the extra to install."""
    _require_onnx()
    try:
        from onnxruntime import quantization
    except ImportError as exc:
        raise BPLError("INT8 export needs onnxruntime's quantization tools: "
                       "pip install 'bpl[onnx]'") from exc
    return quantization


def _onnx_runner(path: str):
    onnx, ort = _require_onnx()
    onnx.checker.check_model(path)
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda x: torch.from_numpy(session.run(None, {name: x.numpy()})[0])


def _torchscript_runner(path: str):
    scripted = torch.jit.load(path, map_location="cpu")
    return lambda x: scripted(x)


def _batches(source: Images, batch_size: int = 32) -> Iterator[tuple[torch.Tensor, Any]]:
    """``(images, labels or None)`` batches of ``source``: a tensor of images, a map-style
    dataset of ``(image, label)``, or an iterable of batches (tensors or pairs)."""
    if isinstance(source, torch.Tensor):
        for start in range(0, len(source), batch_size):
            yield source[start:start + batch_size].float(), None
        return
    if isinstance(source, Dataset) and not isinstance(source, IterableDataset):
        source = DataLoader(source, batch_size=batch_size)
    for item in source:
        x, y = (item[0], item[1] if len(item) > 1 else None) if isinstance(item, tuple | list) \
            else (item, None)
        if x.dim() == 3:  # one image
            x, y = x[None], None if y is None else [y]
        yield x.float(), None if y is None else torch.as_tensor(y)


def _calibration_arrays(calibration: Images | None, shape: torch.Size, fewest: int) -> list:
    """The calibration images as float32 arrays of batches, checked for count and shape."""
    if calibration is None:
        raise InvalidArgumentError(
            "INT8 export needs calibration images: pass calibration= a few hundred training "
            "images, preprocessed as the model's evaluation (a tensor, a dataset or batches)")
    arrays = []
    for x, _ in _batches(calibration):
        if tuple(x.shape[1:]) != tuple(shape):
            raise InvalidArgumentError(
                f"calibration images are {'x'.join(map(str, x.shape[1:]))}, the model takes "
                f"{'x'.join(map(str, shape))}: preprocess them as the model's evaluation does")
        arrays.append(x.cpu().numpy().astype(np.float32))
    count = sum(len(a) for a in arrays)
    if count < fewest:
        raise InvalidArgumentError(
            f"only {count} calibration images, fewer than {fewest}: pass a few hundred of the "
            f"training images, or {arg('min_calibration', count)} to accept so few",
            param="calibration")
    return arrays


#: ``int8_range``: "full" int8 weights, "reduced" to 7 bits, or "auto" (by this CPU).
INT8_RANGES: tuple[str, ...] = ("auto", "full", "reduced")


def cpu_has_vnni() -> bool | None:
    """Whether this CPU multiplies 8-bit integers with VNNI (AVX512-VNNI, AVX-VNNI or AMX):
    read from /proc/cpuinfo; None where that cannot be read."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    flags = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[1].split())
    return bool(flags & {"avx512_vnni", "avx_vnni", "amx_int8"})


def choose_int8_range(int8_range: str = "auto") -> tuple[bool, str]:
    """(reduce_range, why) for onnxruntime's quantizer. On x86 CPUs without VNNI, products of
    uint8 activations and full-range int8 weights can saturate their 16-bit intermediate
    sums (onnxruntime's and OpenVINO's documentation), so ``"auto"`` reduces the weights to
    7 bits there (PyTorch's x86 default, fbgemm, reduces its activations for the same
    reason); elsewhere it keeps the full range."""
    if int8_range not in INT8_RANGES:
        raise InvalidArgumentError(f"{arg('int8_range')} must be one of "
                                   f"{', '.join(INT8_RANGES)}, got {int8_range!r}",
                                   param="int8_range")
    if int8_range != "auto":
        return int8_range == "reduced", f"asked for ({arg('int8_range', int8_range)})"
    import platform

    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686", "x86"):
        return False, f"auto: a {platform.machine()} CPU, where 8-bit products do not saturate"
    vnni = cpu_has_vnni()
    if vnni:
        return False, "auto: this x86 CPU has VNNI, where full-range products do not saturate"
    return True, ("auto: this x86 CPU " + ("has no VNNI" if vnni is False else
                                           "may lack VNNI (its flags cannot be read)")
                  + ", where full-range 8-bit products can saturate")


def _quantize(fp32: Path, out: Path, calibration: list, int8_range: str = "auto"
              ) -> dict[str, Any]:
    """Statically quantize ``fp32`` into ``out`` (QDQ, per-channel int8 weights, full or
    7-bit range (:func:`choose_int8_range`), uint8 activations calibrated by min/max;
    scratch files beside ``fp32``); returns what the metadata records of it."""
    reduce_range, why = choose_int8_range(int8_range)
    q = _require_quantization()
    from onnxruntime import __version__ as ort_version
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(q.CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter(calibration)

        def get_next(self) -> dict | None:
            batch = next(self.batches, None)
            return None if batch is None else {"images": batch}

    ready = fp32.with_name("ready.onnx")
    chatty = logging.getLogger("onnxruntime.quantization")  # its progress lines at INFO
    level = chatty.level
    chatty.setLevel(max(level, logging.WARNING))
    try:  # shape inference and graph optimisation first, as onnxruntime recommends
        quant_pre_process(str(fp32), str(ready))
        q.quantize_static(
            str(ready), str(out), Reader(), quant_format=q.QuantFormat.QDQ, per_channel=True,
            activation_type=q.QuantType.QUInt8, weight_type=q.QuantType.QInt8,
            calibrate_method=q.CalibrationMethod.MinMax, reduce_range=reduce_range)
    finally:
        chatty.setLevel(level)
    return {"tool": f"onnxruntime {ort_version} quantize_static", "format": "QDQ",
            "weights": "int8, symmetric, per output channel",
            "range": ("reduced: 7-bit weights" if reduce_range else "full: 8-bit weights"),
            "range_why": why,
            "activations": "uint8, per tensor, min/max calibration"}


def compare_top1(a: nn.Module, b: nn.Module, labelled: Images) -> dict[str, Any]:
    """Top-1 of two models (e.g. fp32 and INT8 :class:`OnnxModule`) on ``labelled`` images
    (a dataset of ``(image, label)`` or batches of pairs) and how often they agree."""
    images = agree = right_a = right_b = 0
    with torch.inference_mode():
        for x, y in _batches(labelled):
            if y is None:
                raise InvalidArgumentError(f"labelled images ({arg('validation')}) must come as "
                                           "(images, labels): top-1 needs the labels",
                                           param="validation")
            pa, pb = a(x).argmax(1), b(x).argmax(1)
            images += len(y)
            agree += int((pa == pb).sum())
            right_a += int((pa == y).sum())
            right_b += int((pb == y).sum())
    if not images:
        raise InvalidArgumentError(f"no labelled images ({arg('validation')}) to compare the "
                                   "models on", param="validation")
    return {"images": images, "top1_a": 100 * right_a / images, "top1_b": 100 * right_b / images,
            "agreement": 100 * agree / images, "lost": right_a - right_b}


def _int8_check(fp32: Path, int8: Path, validation: Images, max_drop: float | None) -> dict:
    """Top-1 of the fp32 and INT8 files on ``validation`` and how often they agree;
    :class:`VerificationError` when INT8 loses more than ``max_drop`` points."""
    seen = compare_top1(OnnxModule(fp32), OnnxModule(int8), validation)
    images, fp32_top1, int8_top1 = seen["images"], seen["top1_a"], seen["top1_b"]
    check = {"images": images, "fp32_top1": fp32_top1, "int8_top1": int8_top1,
             "drop": fp32_top1 - int8_top1, "agreement": seen["agreement"],
             "max_drop": max_drop}
    log.info("INT8 against fp32 on %d validation images: top-1 %.2f%% -> %.2f%%, %.2f%% same "
             "predictions", images, fp32_top1, int8_top1, check["agreement"])
    if max_drop is not None and not check["drop"] <= max_drop:
        raise VerificationError(
            f"the INT8 model loses {check['drop']:.2f} points of validation top-1 against fp32 "
            f"({fp32_top1:.2f}% -> {int8_top1:.2f}%, {seen['lost']} of {images} images), "
            f"more than {arg('max_drop', max_drop)}; nothing was written: calibrate on more, or "
            f"more typical, training images, or pass {arg('max_drop', None)} to write it anyway",
            param="max_drop")
    return check


@renamed_keywords(tol="verify_tol")
def export(
    model: nn.Module,
    example_inputs: torch.Tensor,
    path: str | Path,
    *,
    format: str = "onnx",
    verify_tol: float = 1e-4,
    check_batch_sizes: tuple[int, ...] = (1, 5),
    opset: int = 17,
    metadata: dict[str, str] | None = None,
    int8: bool = False,
    calibration: Images | None = None,
    calibration_source: str | None = None,
    validation: Images | None = None,
    max_drop: float | None = INT8_MAX_DROP,
    min_calibration: int = MIN_CALIBRATION_IMAGES,
    int8_range: str = "auto",
) -> dict[str, Any]:
    """Fold BN (fusing partners first), export with a dynamic batch axis, check parity.

    TorchScript gets :func:`deploy_form` (BN folded, channels_last), traced and frozen
    with :func:`torch.jit.freeze`; ONNX gets the BN-folded model (onnxruntime picks its
    own layouts).

    The exported file is run (onnxruntime, or the loaded TorchScript module) on random
    inputs of each batch size in ``check_batch_sizes`` and compared with ``model`` in
    PyTorch; above ``verify_tol`` max relative error nothing is written and
    :class:`~bpl.errors.VerificationError` is raised. ``metadata`` (ONNX only) goes into
    the file's ``metadata_props`` (`bpl export` writes class names, mean/std, input size
    and the bpl version there, and `bpl predict` reads them back); bpl adds ``precision``
    (``"fp32"`` or ``"int8"``) and the ``macs`` and ``params`` of one image, as JSON.

    ``int8=True`` (ONNX only) writes that parity-checked fp32 model statically quantized
    with onnxruntime's tools: QDQ format, int8 weights per output channel, uint8
    activations whose ranges are the min/max seen on ``calibration`` (at least
    ``min_calibration`` images, preprocessed exactly as the model's evaluation: a tensor,
    a dataset of ``(image, label)``, or batches). With ``validation`` (labelled images
    or batches, never the test split) both models are run in onnxruntime and compared;
    if INT8's top-1 is more than ``max_drop`` points below fp32's (None: no limit),
    :class:`~bpl.errors.VerificationError` and nothing is written. The metadata records
    the quantization, ``calibration`` (image count and ``calibration_source``, your words
    for what the images are) and ``int8_check`` (the comparison), as does the result.
    ``int8_range``: the weights' range, ``"full"``, ``"reduced"`` (7 bits, for x86 CPUs
    without VNNI) or ``"auto"``: reduced when this is such a CPU (:func:`choose_int8_range`).
    """
    if format not in FORMATS:
        raise BPLError(f"unknown export format {format!r}; choose one of {', '.join(FORMATS)}")
    if int8 and format != "onnx":
        raise InvalidArgumentError(f"int8=True writes ONNX, not {format}: use format='onnx'")
    if int8:
        _require_quantization()  # fail before the work when the extra is missing
        choose_int8_range(int8_range)  # and before it on a bad value
    elif format == "onnx":
        _require_onnx()
    reference = model.cpu().eval()
    fused = partner_blocks(reference)
    if fused:
        log.info("the model still has %d partner blocks: fusing them before export", len(fused))
    path = Path(path)
    x = example_inputs.cpu()
    arrays = _calibration_arrays(calibration, x.shape[1:], min_calibration) if int8 else []
    result: dict[str, Any] = {"path": str(path), "format": format,
                              "precision": "int8" if int8 else "fp32"}
    with atomic_path(path) as tmp, tempfile.TemporaryDirectory() as scratch:
        # nothing is written unless every check passes
        fp32 = Path(scratch) / "fp32.onnx" if int8 else tmp
        if format == "onnx":
            _write_onnx(fold_batchnorm(reference), x, str(fp32), opset)
            run = _onnx_runner(str(fp32))
        else:
            _write_torchscript(reference, x, str(tmp))
            run = _torchscript_runner(str(tmp))
        errors = {}
        with torch.inference_mode():
            for bs in check_batch_sizes:
                xb = torch.randn(bs, *x.shape[1:])
                errors[bs] = _relative(reference(xb), run(xb))
        worst = max(errors.values())
        if not worst <= verify_tol:
            raise VerificationError(
                f"{format} export differs from PyTorch: max relative error {worst:.3g} > "
                f"{verify_tol:g}; nothing was written"
            )
        if int8:
            result["quantization"] = _quantize(fp32, tmp, arrays, int8_range)
            result["calibration"] = {"images": sum(len(a) for a in arrays),
                                     **({"source": calibration_source} if calibration_source
                                        else {})}
            result["int8_check"] = (None if validation is None
                                    else _int8_check(fp32, tmp, validation, max_drop))
            if validation is None:
                log.warning("INT8 model written without an accuracy check: pass labelled "
                            "images as %s to compare it with fp32", arg("validation"))
        if format == "onnx":
            deployed = fuse(reference) if fused else reference
            facts = {"precision": result["precision"], "macs": count_macs(deployed, x[:1]),
                     "params": count_params(deployed),
                     **{k: result[k] for k in ("quantization", "calibration", "int8_check")
                        if k in result}}
            _set_onnx_metadata(str(tmp), {**(metadata or {}),
                                          **{k: json.dumps(v) for k, v in facts.items()}})
    log.debug("exported %s to %s (max relative error %.2e)", format, path, worst)
    return {**result, "max_relative_error": worst, "errors_by_batch_size": errors,
            "fused_partners": len(fused)}


class OnnxModule(nn.Module):
    """An onnxruntime session behind an ``nn.Module`` face, so it can be timed like one."""

    def __init__(self, path: str | Path, threads: int | None = None) -> None:
        super().__init__()
        _, ort = _require_onnx()
        options = ort.SessionOptions()
        # no busy-waiting threads after a run: they would steal the cores from whatever
        # runs next (PyTorch, when the two are timed interleaved)
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.session.run(None, {self.input_name: x.cpu().numpy()})[0])


@renamed_keywords(tol="verify_tol")
def onnx_module(
    model: nn.Module, example_inputs: torch.Tensor, *, threads: int | None = None,
    verify_tol: float = 1e-4, **options: Any,
) -> OnnxModule:
    """Export ``model`` to a temporary ONNX file (parity-checked) and load it in onnxruntime;
    ``options`` are more of :func:`export`'s keywords (``int8=True, calibration=...``)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        export(model, example_inputs, path, format="onnx", verify_tol=verify_tol, **options)
        return OnnxModule(path, threads=threads)  # the session holds the model in memory
