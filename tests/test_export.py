"""Export to ONNX and TorchScript with parity checks through the dynamic batch axis."""

from __future__ import annotations

import importlib
import json
import logging

import numpy as np
import pytest
import torch
import torchvision
from torch.utils.data import DataLoader, TensorDataset

import bpl
from bpl.errors import BPLError, VerificationError
from bpl.exporting import export
from bpl.fusion import fold_batchnorm
from conftest import randomize_bn


@pytest.fixture(scope="module")
def pruned_student():
    model = randomize_bn(torchvision.models.resnet18(num_classes=7))
    pruned = bpl.prune(model, torch.randn(1, 3, 32, 32), flops_reduction=0.5)
    student = randomize_bn(bpl.extend(pruned), seed=3).eval()
    return student


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_export_pruned_and_fused_resnet18(pruned_student, tmp_path, fmt):
    deploy = bpl.fuse(pruned_student)
    result = export(deploy, torch.randn(1, 3, 32, 32), tmp_path / f"m.{fmt}", format=fmt)
    assert result["max_relative_error"] <= 1e-4
    assert set(result["errors_by_batch_size"]) == {1, 5}
    assert (tmp_path / f"m.{fmt}").exists()
    assert [p.name for p in tmp_path.iterdir()] == [f"m.{fmt}"]
    # the parity the exporter reports, measured again here on the file, at another batch
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = deploy.eval()(x)
    got = _run_file(tmp_path / f"m.{fmt}", fmt, x)
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()


def _run_file(path, fmt: str, x: torch.Tensor) -> torch.Tensor:
    """An exported file run outside bpl: torch.jit or onnxruntime."""
    if fmt == "torchscript":
        with torch.no_grad():
            return torch.jit.load(str(path), map_location="cpu")(x)
    ort = pytest.importorskip("onnxruntime")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {"images": x.numpy()})[0])


def test_exported_onnx_runs_at_any_batch_size(pruned_student, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    deploy = bpl.fuse(pruned_student)
    export(deploy, torch.randn(1, 3, 32, 32), tmp_path / "m.onnx")
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    x = torch.randn(3, 3, 32, 32)
    out = session.run(None, {"images": x.numpy()})[0]
    assert out.shape == (3, 7)
    assert torch.allclose(torch.from_numpy(out), deploy(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_unfused_model_is_fused_first(pruned_student, tmp_path, fmt):
    path = tmp_path / f"m.{fmt}"
    result = export(pruned_student, torch.randn(1, 3, 32, 32), path, format=fmt)
    assert result["fused_partners"] == len(bpl.partner_blocks(pruned_student)) > 0
    assert result["max_relative_error"] <= 1e-4
    # the file itself, loaded outside bpl, against the unfused student in PyTorch
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        want = pruned_student(x)
    if fmt == "torchscript":
        loaded = torch.jit.load(str(path), map_location="cpu")
        kinds = {m.original_name for m in loaded.modules()}
        got = loaded(x)
    else:
        onnx = pytest.importorskip("onnx")
        ort = pytest.importorskip("onnxruntime")
        kinds = {node.op_type for node in onnx.load(str(path)).graph.node}
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        got = torch.from_numpy(session.run(None, {"images": x.numpy()})[0])
    # every BN folded, the shortcuts' (which have no partners) too, and no partner left
    assert not {k for k in kinds if "BatchNorm" in k or "Partner" in k}, kinds
    assert got.shape == (3, 7)
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()


def test_fold_batchnorm_is_exact_and_removes_bn():
    model = randomize_bn(torchvision.models.mobilenet_v2(num_classes=4)).eval()
    folded = fold_batchnorm(model)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    assert bpl.relative_error(model, folded, torch.randn(2, 3, 32, 32)) <= 1e-5


def test_missing_onnx_extra_is_a_clear_error(without_onnx, tmp_path):
    with pytest.raises(BPLError, match=r"pip install 'bpl\[onnx\]'"):
        export(torch.nn.Conv2d(3, 3, 1), torch.randn(1, 3, 4, 4), tmp_path / "x.onnx")


def test_parity_failure_writes_nothing(tmp_path, monkeypatch):
    ex = importlib.import_module("bpl.exporting")  # the module, not the bpl.export function

    monkeypatch.setattr(ex, "_relative", lambda ref, out: 1.0)
    with pytest.raises(VerificationError, match="nothing was written"):
        export(torch.nn.Conv2d(3, 3, 1), torch.randn(1, 3, 4, 4), tmp_path / "x.pt",
               format="torchscript")
    assert list(tmp_path.iterdir()) == []


def test_unknown_format():
    with pytest.raises(BPLError, match="unknown export format"):
        export(torch.nn.Conv2d(3, 3, 1), torch.randn(1, 3, 4, 4), "x", format="tflite")


def test_deploy_form_is_exact_folded_and_channels_last(pruned_student, tmp_path):
    from bpl.exporting import ChannelsLast, deploy_form

    deploy = deploy_form(pruned_student)
    assert isinstance(deploy, ChannelsLast) and not deploy.training
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in deploy.modules())
    assert bpl.partner_blocks(pruned_student)  # the input is left as it was
    conv = deploy.model.conv1
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 32, 32)
    assert bpl.relative_error(pruned_student.eval(), deploy, x) <= 1e-5
    # the TorchScript file holds that form, frozen: no parameters left, weights inlined
    export(pruned_student, x[:1], tmp_path / "m.pt", format="torchscript")
    loaded = torch.jit.load(str(tmp_path / "m.pt"), map_location="cpu")
    assert not list(loaded.parameters())
    assert "channels_last" in str(loaded.graph) or "memory_format" in str(loaded.code)
    with torch.inference_mode():
        assert (loaded(x) - pruned_student(x)).abs().max() <= 1e-4 * pruned_student(x).abs().max()


# --------------------------------------------------------------------------- INT8


def _props(path) -> dict:
    """An ONNX file's metadata_props, JSON-decoded."""
    onnx = pytest.importorskip("onnx")
    return {p.key: json.loads(p.value) for p in onnx.load(str(path)).metadata_props}


def _labelled_by(model: torch.nn.Module, n: int, seed: int) -> TensorDataset:
    """``n`` random 32 px images labelled with ``model``'s own predictions: fp32 gets 100%."""
    x = torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return TensorDataset(x, model.eval()(x).argmax(1))


def test_fp32_onnx_metadata_says_fp32_with_macs_and_params(pruned_student, tmp_path):
    pytest.importorskip("onnxruntime")
    x = torch.randn(1, 3, 32, 32)
    result = export(pruned_student, x, tmp_path / "m.onnx", metadata={"arch": '"resnet18"'})
    props = _props(tmp_path / "m.onnx")
    deploy = bpl.fuse(pruned_student)
    assert result["precision"] == props["precision"] == "fp32" and props["arch"] == "resnet18"
    assert props["macs"] == bpl.count_macs(deploy, x) and props["params"] == bpl.count_params(deploy)
    assert "calibration" not in props and "quantization" not in props


def test_int8_export_is_quantized_on_the_calibration_images_and_checked(pruned_student, tmp_path):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from onnx import numpy_helper

    calibration = 2 * torch.randn(16, 3, 32, 32)
    validation = _labelled_by(bpl.fuse(pruned_student), 24, seed=1)
    path = tmp_path / "m.int8.onnx"
    result = export(pruned_student, calibration[:1], path, int8=True, calibration=calibration,
                    calibration_source="16 random images", validation=validation,
                    min_calibration=16, max_drop=50)
    assert [p.name for p in tmp_path.iterdir()] == ["m.int8.onnx"]  # no scratch files left
    assert result["precision"] == "int8" and result["fused_partners"] > 0
    assert result["max_relative_error"] <= 1e-4  # the fp32 model it quantized was checked
    proto = onnx.load(str(path))
    nodes = list(proto.graph.node)
    ops = {n.op_type for n in nodes}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= ops
    assert not {k for k in ops if "BatchNorm" in k}
    inits = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    # every conv weight is int8 with one scale per output channel
    weights = [n for n in nodes if n.op_type == "DequantizeLinear" and n.input[0] in inits
               and inits[n.input[0]].ndim == 4]
    convs = [m for m in bpl.fuse(pruned_student).modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(weights) == len(convs) == 20
    for n in weights:
        w, scale = inits[n.input[0]], inits[n.input[1]]
        assert w.dtype == np.int8 and scale.shape == (w.shape[0],)
    # activations are uint8, and the input's range is exactly the calibration images' min/max
    (q_in,) = [n for n in nodes if n.op_type == "QuantizeLinear" and n.input[0] == "images"]
    assert inits[q_in.input[2]].dtype == np.uint8
    low, high = min(0.0, calibration.min().item()), max(0.0, calibration.max().item())
    assert float(inits[q_in.input[1]]) == pytest.approx((high - low) / 255, rel=1e-5)
    props = _props(path)
    assert props["precision"] == "int8"
    assert props["calibration"] == {"images": 16, "source": "16 random images"}
    assert props["quantization"]["format"] == "QDQ"
    assert "per output channel" in props["quantization"]["weights"]
    # the check, recomputed here: fp32 (PyTorch) labelled the images, so its top-1 is 100%
    check = props["int8_check"]
    assert check == result["int8_check"] and check["images"] == 24 and check["max_drop"] == 50
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x, labels = validation.tensors
    int8 = torch.from_numpy(session.run(None, {"images": x.numpy()})[0])
    assert check["fp32_top1"] == 100.0
    assert check["int8_top1"] == check["agreement"] == pytest.approx(
        100 * (int8.argmax(1) == labels).float().mean().item())
    assert check["drop"] == pytest.approx(100 - check["int8_top1"])
    with torch.no_grad():
        want = bpl.fuse(pruned_student).eval()(x)
    # 8 bits, not noise (random weights and inputs: about 0.07 here; a broken range is ~1)
    assert (int8 - want).abs().max() < 0.3 * want.abs().max()


def test_int8_beyond_max_drop_writes_nothing_unless_told(pruned_student, tmp_path):
    pytest.importorskip("onnxruntime")
    data = _labelled_by(bpl.fuse(pruned_student), 12, seed=2)
    path = tmp_path / "m.int8.onnx"
    kw = {"int8": True, "calibration": data, "validation": data, "min_calibration": 12}
    # fp32 scores 100% on its own labels, so no INT8 model is 1 point better: refused
    with pytest.raises(VerificationError, match=r"more than max_drop=-1; nothing was written"
                                                r".*max_drop=None to write it anyway"):
        export(pruned_student, torch.randn(1, 3, 32, 32), path, max_drop=-1, **kw)
    assert list(tmp_path.iterdir()) == []
    result = export(pruned_student, torch.randn(1, 3, 32, 32), path, max_drop=None, **kw)
    assert path.exists() and result["int8_check"]["max_drop"] is None
    assert _props(path)["int8_check"] == result["int8_check"]


def test_int8_calibration_as_batches_and_without_validation(pruned_student, tmp_path, caplog):
    pytest.importorskip("onnxruntime")
    batches = DataLoader(_labelled_by(pruned_student, 10, seed=3), batch_size=4)  # 4, 4, 2
    with caplog.at_level(logging.WARNING):
        result = export(pruned_student, torch.randn(1, 3, 32, 32), tmp_path / "m.onnx",
                        int8=True, calibration=batches, min_calibration=10)
    assert result["calibration"] == {"images": 10} and result["int8_check"] is None
    assert "without an accuracy check" in caplog.text
    assert _props(tmp_path / "m.onnx")["calibration"] == {"images": 10}


@pytest.mark.parametrize(("kw", "message"), [
    ({}, r"needs calibration images: pass calibration="),
    ({"calibration": torch.randn(8, 3, 32, 32)},
     r"only 8 calibration images, fewer than 50: .*min_calibration=8 to accept so few"),
    ({"calibration": torch.randn(60, 3, 16, 16)},
     r"calibration images are 3x16x16, the model takes 3x32x32"),
    ({"calibration": torch.randn(8, 3, 32, 32), "min_calibration": 8,
      "validation": [torch.randn(4, 3, 32, 32)]}, r"must come as \(images, labels\)"),
    ({"format": "torchscript"}, r"int8=True writes ONNX, not torchscript"),
])
def test_int8_errors_write_nothing(pruned_student, tmp_path, kw, message):
    pytest.importorskip("onnxruntime")
    with pytest.raises(BPLError, match=message):
        export(pruned_student, torch.randn(1, 3, 32, 32), tmp_path / "m.onnx", int8=True, **kw)
    assert list(tmp_path.iterdir()) == []


def test_int8_without_the_onnx_extra_is_a_clear_error(without_onnx, tmp_path):
    with pytest.raises(BPLError, match=r"pip install 'bpl\[onnx\]'"):
        export(torch.nn.Conv2d(3, 3, 1), torch.randn(1, 3, 4, 4), tmp_path / "x.onnx",
               int8=True, calibration=torch.randn(60, 3, 4, 4))
    assert list(tmp_path.iterdir()) == []


def test_int8_weights_take_a_7_bit_range_where_8_bit_products_can_saturate(
        pruned_student, tmp_path, monkeypatch):
    """``int8_range="auto"`` reduces the weights to 7 bits on x86 CPUs without VNNI (whose
    u8 x s8 products can saturate), keeps 8 on others; "full" and "reduced" are asked."""
    pytest.importorskip("onnxruntime")
    import onnx
    from onnx import numpy_helper

    from bpl import exporting

    monkeypatch.setattr("platform.machine", lambda: "x86_64")
    monkeypatch.setattr(exporting, "cpu_has_vnni", lambda: False)
    assert exporting.choose_int8_range("auto")[0] is True
    assert "has no VNNI" in exporting.choose_int8_range("auto")[1]
    monkeypatch.setattr(exporting, "cpu_has_vnni", lambda: None)  # flags unreadable: safe side
    assert exporting.choose_int8_range("auto")[0] is True
    monkeypatch.setattr(exporting, "cpu_has_vnni", lambda: True)
    assert exporting.choose_int8_range("auto") == (
        False, "auto: this x86 CPU has VNNI, where full-range products do not saturate")
    assert exporting.choose_int8_range("reduced")[0] is True
    monkeypatch.setattr("platform.machine", lambda: "aarch64")
    assert exporting.choose_int8_range("auto")[0] is False
    assert exporting.choose_int8_range("full")[0] is False
    with pytest.raises(BPLError, match="int8_range must be one of auto, full, reduced"):
        export(pruned_student, torch.randn(1, 3, 32, 32), tmp_path / "x.onnx", int8=True,
               calibration=torch.randn(16, 3, 32, 32), min_calibration=16, int8_range="8bit")
    assert not list(tmp_path.iterdir())

    def widest_weight(int8_range: str) -> tuple[int, dict]:
        path = tmp_path / f"{int8_range}.int8.onnx"
        result = export(pruned_student, torch.randn(1, 3, 32, 32), path, int8=True,
                        calibration=torch.randn(16, 3, 32, 32), min_calibration=16,
                        int8_range=int8_range)
        proto = onnx.load(str(path))
        inits = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
        weights = [inits[n.input[0]] for n in proto.graph.node if n.op_type == "DequantizeLinear"
                   and n.input[0] in inits and inits[n.input[0]].ndim == 4]
        assert _props(path)["quantization"] == result["quantization"]
        return max(int(np.abs(w.astype(np.int32)).max()) for w in weights), result

    full, result = widest_weight("full")
    assert full == 127 and result["quantization"]["range"] == "full: 8-bit weights"
    reduced, result = widest_weight("reduced")
    assert reduced <= 64 and result["quantization"]["range"] == "reduced: 7-bit weights"
    assert "int8_range='reduced'" in result["quantization"]["range_why"]
