"""Export a deployable model to ONNX or TorchScript, and prove the export computes the same."""

from __future__ import annotations

import logging
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import BPLError, VerificationError
from .extension import partner_blocks
from .files import atomic_path
from .fusion import fold_batchnorm
from .verification import max_relative_error as _relative

__all__ = ["FORMATS", "ChannelsLast", "OnnxModule", "deploy_form", "export", "onnx_module"]

log = logging.getLogger(__name__)
FORMATS = ("onnx", "torchscript")


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


def _onnx_runner(path: str):
    onnx, ort = _require_onnx()
    onnx.checker.check_model(path)
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda x: torch.from_numpy(session.run(None, {name: x.numpy()})[0])


def _torchscript_runner(path: str):
    scripted = torch.jit.load(path, map_location="cpu")
    return lambda x: scripted(x)


def export(
    model: nn.Module,
    example_inputs: torch.Tensor,
    path: str | Path,
    *,
    format: str = "onnx",
    tol: float = 1e-4,
    check_batch_sizes: tuple[int, ...] = (1, 5),
    opset: int = 17,
    metadata: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Fold BN (fusing partners first), export with a dynamic batch axis, check parity.

    TorchScript gets :func:`deploy_form` (BN folded, channels_last), traced and frozen
    with :func:`torch.jit.freeze`; ONNX gets the BN-folded model (onnxruntime picks its
    own layouts).

    The exported file is run (onnxruntime, or the loaded TorchScript module) on random
    inputs of each batch size in ``check_batch_sizes`` and compared with ``model`` in
    PyTorch; above ``tol`` max relative error nothing is written and
    :class:`~bpl.errors.VerificationError` is raised. ``metadata`` (ONNX only) goes into
    the file's ``metadata_props`` (`bpl export` writes class names, mean/std, input size
    and the bpl version there, and `bpl predict` reads them back).
    """
    if format not in FORMATS:
        raise BPLError(f"unknown export format {format!r}; choose one of {', '.join(FORMATS)}")
    if format == "onnx":
        _require_onnx()  # fail before the work when the extra is missing
    reference = model.cpu().eval()
    fused = partner_blocks(reference)
    if fused:
        log.info("the model still has %d partner blocks: fusing them before export", len(fused))
    path = Path(path)
    x = example_inputs.cpu()
    with atomic_path(path) as tmp:  # nothing is written unless the parity check passes
        if format == "onnx":
            _write_onnx(fold_batchnorm(reference), x, str(tmp), opset)
            if metadata:
                _set_onnx_metadata(str(tmp), metadata)
            run = _onnx_runner(str(tmp))
        else:
            _write_torchscript(reference, x, str(tmp))
            run = _torchscript_runner(str(tmp))
        errors = {}
        with torch.inference_mode():
            for bs in check_batch_sizes:
                xb = torch.randn(bs, *x.shape[1:])
                errors[bs] = _relative(reference(xb), run(xb))
        worst = max(errors.values())
        if not worst <= tol:
            raise VerificationError(
                f"{format} export differs from PyTorch: max relative error {worst:.3g} > {tol:g}; "
                "nothing was written"
            )
    log.debug("exported %s to %s (max relative error %.2e)", format, path, worst)
    return {"path": str(path), "format": format, "max_relative_error": worst,
            "errors_by_batch_size": errors, "fused_partners": len(fused)}


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


def onnx_module(
    model: nn.Module, example_inputs: torch.Tensor, *, threads: int | None = None,
    tol: float = 1e-4,
) -> OnnxModule:
    """Export ``model`` to a temporary ONNX file (parity-checked) and load it in onnxruntime."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        export(model, example_inputs, path, format="onnx", tol=tol)
        return OnnxModule(path, threads=threads)  # the session holds the model in memory
