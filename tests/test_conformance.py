"""The zoo's checks (benchmarks/zoo.py) on hand-made nets, fast and without timm.

One pre-activation net (convs feeding additions and a concatenation: conv partners), one
norm+act net (timm's BatchNormAct2d shape) and one grouped/depthwise net go through every
check of :func:`bpl.conformance.check_model`; ONNX parity only when onnx is installed.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

import bpl
from bpl.conformance import CHECKS, check_model, float_dtypes
from nets import GroupedNet, NormActStack, PreActNet

HAS_ONNX = all(importlib.util.find_spec(m) for m in ("onnx", "onnxruntime"))
NETS = {
    "preact": (PreActNet, {"conv", "conv+bn"}),
    "normact": (NormActStack, {"conv+bn"}),
    "grouped": (GroupedNet, {"conv+bn"}),
}


@pytest.mark.parametrize("name", NETS)
def test_every_check_passes(name):
    build, kinds = NETS[name]
    result = check_model(build, torch.randn(2, 3, 16, 16), do_onnx=HAS_ONNX)
    failed = {k: (v["error"], v["note"]) for k, v in result["checks"].items() if not v["ok"]}
    assert not failed
    expected = set(CHECKS) - (set() if HAS_ONNX else {"onnx"})
    assert set(result["checks"]) == expected
    assert set(result["partners"]) == kinds


def test_a_broken_fusion_is_reported_not_raised(monkeypatch):
    monkeypatch.setattr(bpl.partners.ConvPartner, "fold",
                        lambda self: (self.conv.weight, self.conv.bias))  # drops the partner
    result = check_model(PreActNet, torch.randn(2, 3, 16, 16), do_prune=False, do_onnx=False)
    assert not result["checks"]["fuse_fp64"]["ok"] and not result["checks"]["fuse_fp32"]["ok"]


def test_timm_norm_act_model_moves_to_float64():
    timm = pytest.importorskip("timm")
    model = timm.create_model("regnety_002", pretrained=False, num_classes=4).eval()
    student = bpl.conformance.randomize_partners(bpl.extend(model)).eval().double()
    deploy = bpl.fuse(student)
    assert float_dtypes(deploy) == {torch.float64}
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    assert bpl.relative_error(student, deploy, x) <= 1e-9


def test_rounding_floor_measures_how_a_network_amplifies_rounding():
    from bpl.conformance import rounding_floor

    x = torch.randn(2, 8, dtype=torch.float64)
    calm = torch.nn.Linear(8, 4).double()
    assert rounding_floor(calm, x) <= 10 * torch.finfo(torch.float64).eps
    # subtracting a nearly equal constant cancels digits: input rounding is amplified ~1e10x
    class Cancel(torch.nn.Module):
        def __init__(self, near):
            super().__init__()
            self.register_buffer("near", near)

        def forward(self, t):
            return t - self.near

    assert rounding_floor(Cancel(x * (1 + 1e-10)), x) > 1e4 * torch.finfo(torch.float64).eps


def test_the_rounding_floor_does_not_excuse_a_broken_fusion(monkeypatch):
    # on a well-conditioned network the floor is far below the bar, so the bar stays tol
    monkeypatch.setattr(bpl.partners.ConvPartner, "fold",
                        lambda self: (self.conv.weight, self.conv.bias))
    result = check_model(PreActNet, torch.randn(2, 3, 16, 16), do_prune=False, do_onnx=False)
    check = result["checks"]["fuse_fp64"]
    assert not check["ok"] and check["floor"] < 1e-12 and "ill-conditioned" not in check["note"]


def test_a_check_no_error_could_fail_is_reported_as_not_judged(monkeypatch):
    import bpl.conformance as conformance

    monkeypatch.setattr(conformance, "rounding_floor", lambda model, x: 0.05)  # output = noise
    result = check_model(PreActNet, torch.randn(2, 3, 16, 16), do_prune=False, do_onnx=False)
    assert result["checks"]["fuse_fp32"].get("unjudged") and result["checks"]["fuse_fp64"].get("unjudged")
    monkeypatch.setattr(conformance, "rounding_floor", lambda model, x: 1e-20)
    result = check_model(PreActNet, torch.randn(2, 3, 16, 16), do_prune=False, do_onnx=False)
    assert not any(c.get("unjudged") for c in result["checks"].values())


def test_a_check_that_never_ends_is_stopped_and_the_others_still_run(monkeypatch):
    import time

    import bpl.conformance as conformance

    def forever(*args, **kwargs):
        while True:
            time.sleep(0.01)

    monkeypatch.setattr(conformance, "prune", forever)
    # a limit each real check meets even on a loaded machine (0.5 s did not, beside a study)
    result = check_model(PreActNet, torch.randn(2, 3, 16, 16), do_onnx=False, time_limit=3)
    checks = result["checks"]
    assert not checks["prune"]["ok"] and "longer than 3 s" in checks["prune"]["note"]
    assert checks["move_fp64"]["ok"] and "prune_fuse" not in checks
