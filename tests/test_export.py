"""Export to ONNX and TorchScript with parity checks through the dynamic batch axis."""

from __future__ import annotations

import importlib

import pytest
import torch
import torchvision

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
