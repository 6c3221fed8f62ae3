"""bf16 + channels_last on the CPU: when it is chosen, what runs in it, and what stays exact.

Whether this machine's CPU has AMX or not, the tests choose the path with
``BPL_CPU_BF16`` or a simulated capability, so both paths are tested everywhere.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import bpl
from bpl import precision
from bpl.cli import main as bpl_main
from bpl.engine import TrainSettings, fit
from bpl.precision import choose_precision, cpu_bf16
from conftest import randomize_bn

CPU = torch.device("cpu")


@pytest.fixture
def amx(monkeypatch):
    """Simulate the CPU's capabilities: ``amx(True)`` one with AMX, ``amx(False)`` one without."""
    monkeypatch.delenv(precision.ENV, raising=False)
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)

    def set_caps(has: bool, avx512_bf16: bool = True) -> None:
        caps = {"amx_bf16": has, "amx_tile": has, "avx512_bf16": avx512_bf16}
        monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: caps)

    return set_caps


def test_bf16_is_chosen_only_where_asked_and_the_cpu_has_amx(amx, monkeypatch):
    amx(True)
    assert cpu_bf16()[0]
    # float32 is the default even with AMX (the paired accuracy check, docs/results.md)
    p = choose_precision(CPU)
    assert p.dtype is None and not p.channels_last and "--cpu-bf16" in p.why
    p = choose_precision(CPU, cpu_bf16_opt_in=True)
    assert p.dtype is torch.bfloat16 and p.channels_last and not p.scaled
    assert "AMX" in str(p)
    # AVX512-BF16 alone measured 0.86-1.03x fp32: no
    amx(False, avx512_bf16=True)
    native, why = cpu_bf16()
    assert not native and "AVX512-BF16 but no AMX" in why
    p = choose_precision(CPU, cpu_bf16_opt_in=True)
    assert p.dtype is None and not p.channels_last and "no AMX" in p.why  # fp32 NCHW
    # oneDNN held below AMX cannot use it
    amx(True)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")
    assert not cpu_bf16()[0] and "ONEDNN_MAX_CPU_ISA" in cpu_bf16()[1]
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_AMX")
    assert cpu_bf16()[0]
    # the override wins either way, and --no-amp keeps fp32
    monkeypatch.setenv(precision.ENV, "0")
    assert not cpu_bf16()[0]
    assert choose_precision(CPU, cpu_bf16_opt_in=True).why == "BPL_CPU_BF16=0"
    amx(False)
    monkeypatch.setenv(precision.ENV, "1")
    assert cpu_bf16() == (True, "BPL_CPU_BF16=1")
    assert choose_precision(CPU, amp=False).describe() == {
        "autocast": "float32", "memory_format": "contiguous", "why": "--no-amp"}
    assert not choose_precision(CPU, channels_last=False).channels_last
    cuda = choose_precision(torch.device("cuda"))
    assert cuda.dtype is torch.float16 and cuda.scaled


def tiny_data(n: int = 48, classes: int = 3) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    y = torch.arange(n) % classes
    return TensorDataset(torch.randn(n, 3, 8, 8, generator=g) + y[:, None, None, None], y)


def tiny_student() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))
    student = bpl.extend(randomize_bn(net), init="split")  # both kernels train at once
    return student


def _train(tmp_path, monkeypatch, bf16: str, epochs: int = 2, model: nn.Module | None = None,
           resume: dict | None = None):
    """fit() with bf16 forced on ("1") or off ("0"); records the dtypes and memory formats
    the convolutions saw in training (first step only) and in validation."""
    monkeypatch.setenv(precision.ENV, bf16)
    model = model if model is not None else tiny_student()
    seen = []

    def hook(module, args, out):
        if module.training:
            seen.append(("train", out.dtype, args[0].is_contiguous(
                memory_format=torch.channels_last), module.weight.dtype))
        else:
            seen.append(("eval", out.dtype, None, module.weight.dtype))

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.Conv2d)]
    settings = TrainSettings(epochs=epochs, batch_size=16, lr=0.05, device="cpu")
    result = fit(model, tiny_data(), tiny_data(24), settings, tmp_path, num_classes=3,
                 payload=lambda m: {"state_dict": m.state_dict()}, progress=False,
                 loss_terms={"diversity": lambda step: bpl.diversity_loss(step.model)},
                 resume_state=resume)
    for h in handles:
        h.remove()
    return model, result, seen


def test_bf16_training_runs_convolutions_in_bf16_and_keeps_everything_else_fp32(
        tmp_path, monkeypatch):
    model, result, seen = _train(tmp_path, monkeypatch, "1")
    train = [s for s in seen if s[0] == "train"]
    assert train and all(dtype is torch.bfloat16 and cl for _, dtype, cl, _ in train)
    # weights, BN statistics and the checkpoint stay float32; validation runs in float32
    assert all(w is torch.float32 for *_, w in seen)
    assert all(dtype is torch.float32 for kind, dtype, _, _ in seen if kind == "eval")
    assert all(t.dtype == torch.float32 for t in model.state_dict().values() if t.is_floating_point())
    last = torch.load(tmp_path / "last.pt", weights_only=False)
    assert all(t.dtype == torch.float32 for t in last["model"]["state_dict"].values()
               if t.is_floating_point())
    assert last["precision"] == result.precision == [
        {"autocast": "bfloat16", "memory_format": "channels_last", "why": "BPL_CPU_BF16=1"}]
    assert 0 < result.history[-1]["train_diversity"] < 1  # the loss term was computed
    # without AMX (or with --no-amp): float32 NCHW, as before
    _, result, seen = _train(tmp_path / "fp32", monkeypatch, "0")
    assert all(dtype is torch.float32 and not cl for kind, dtype, cl, _ in seen if kind == "train")
    assert result.precision[0]["autocast"] == "float32"


def _max_fusion_error_fp64(student: nn.Module) -> float:
    """The partner model fused in float64, against itself, on the same inputs."""
    student = copy.deepcopy(student).eval().double()
    deploy = bpl.fuse(student)
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    return bpl.verify(student, deploy, x, verify_tol=1e-9)


def test_fusion_after_a_bf16_run_is_as_exact_as_after_an_fp32_run(tmp_path, monkeypatch):
    student_bf16, _, _ = _train(tmp_path / "bf16", monkeypatch, "1", epochs=3)
    student_fp32, _, _ = _train(tmp_path / "fp32", monkeypatch, "0", epochs=3)
    # they trained: the partners moved away from their start, differently in each precision
    a = dict(student_bf16.named_parameters())
    b = dict(student_fp32.named_parameters())
    assert any(not torch.equal(a[k], b[k]) for k in a)
    err_bf16 = _max_fusion_error_fp64(student_bf16)
    err_fp32 = _max_fusion_error_fp64(student_fp32)
    assert err_bf16 <= 1e-9 and err_fp32 <= 1e-9
    # and the float32 fusion of the bf16-trained model meets the run-time check
    student_bf16.eval()
    assert bpl.verify(student_bf16, bpl.fuse(student_bf16),
                      torch.randn(4, 3, 8, 8)) <= 1e-5


@pytest.mark.parametrize("first, then", [("1", "0"), ("0", "1")])
def test_a_run_resumes_in_the_other_precision(tmp_path, monkeypatch, first, then):
    """A checkpoint of a bf16 run continues on a CPU without bf16, and the reverse."""
    _train(tmp_path, monkeypatch, first, epochs=2)
    state = torch.load(tmp_path / "last.pt", weights_only=False)
    model = tiny_student()
    model.load_state_dict(state["model"]["state_dict"])
    model, result, seen = _train(tmp_path, monkeypatch, then, epochs=3, model=model,
                                 resume=state)
    assert [h["epoch"] for h in result.history] == [1, 2, 3] and result.segments == 2
    want = torch.bfloat16 if then == "1" else torch.float32
    assert all(dtype is want for kind, dtype, *_ in seen if kind == "train")
    kinds = [p["autocast"] for p in result.precision]
    assert kinds == (["bfloat16", "float32"] if first == "1" else ["float32", "bfloat16"])
    assert torch.isfinite(torch.tensor(result.history[-1]["train_loss"]))


def test_the_command_says_what_it_trained_in(tmp_path, monkeypatch):
    fast = ["--data", "digits", "--image-size", "16", "--quiet", "--no-latency", "--epochs", "1",
            "--train-subset", "0.3"]  # small: bf16 is forced, emulated (slow) on some CPUs
    base = tmp_path / "base"
    monkeypatch.setenv(precision.ENV, "1")
    assert bpl_main(["train", *fast, "--arch", "tiny_resnet", "--no-amp", "--out", str(base)]) == 0
    metrics = json.loads((base / "metrics.json").read_text())
    assert metrics["precision"] == [{"autocast": "float32", "memory_format": "contiguous",
                                     "why": "--no-amp"}]
    assert "trained in float32, contiguous (--no-amp)" in (base / "report.md").read_text()
    out = tmp_path / "bpl"
    args = ["compress", *fast, "--baseline", str(base / "best.pt"), "--flops-reduction", "0.5",
            "--out", str(out)]
    assert bpl_main(args) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["precision"][0]["autocast"] == "bfloat16"
    assert metrics["fusion_error"] <= 1e-5
    # resumed on a machine without bf16: it goes on in float32 from the float32 weights
    monkeypatch.setenv(precision.ENV, "0")
    assert bpl_main([*args, "--epochs", "2", "--resume"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert [p["autocast"] for p in metrics["precision"]] == ["bfloat16", "float32"]
    assert metrics["fusion_error"] <= 1e-5
    assert "channels_last (BPL_CPU_BF16=1); then float32" in (out / "report.md").read_text()


def test_cpu_bf16_flag_reaches_the_engine(amx, tmp_path, monkeypatch):
    from bpl.cli import build_parser
    from bpl.config import resolve_config

    assert build_parser().parse_args(["train", "--cpu-bf16"]).cpu_bf16 is True
    assert resolve_config().cpu_bf16 is False
    monkeypatch.delenv(precision.ENV, raising=False)
    amx(True)
    settings = TrainSettings.from_object(resolve_config(overrides={"cpu_bf16": True}))
    settings.epochs, settings.batch_size, settings.device = 1, 16, "cpu"
    result = fit(tiny_student(), tiny_data(), None, settings, tmp_path, num_classes=3,
                 payload=lambda m: {"state_dict": m.state_dict()}, progress=False)
    assert result.precision[0]["autocast"] == "bfloat16"
    settings.cpu_bf16 = False
    result = fit(tiny_student(), tiny_data(), None, settings, tmp_path / "b", num_classes=3,
                 payload=lambda m: {"state_dict": m.state_dict()}, progress=False)
    assert result.precision[0]["autocast"] == "float32"
