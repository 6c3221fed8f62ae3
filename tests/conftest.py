"""Shared helpers for the fast test suite."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

# under pytest-xdist (`make test`) the workers share the cores: torch's own default (every
# core in each worker) would oversubscribe them, which slows CPU training many times over.
# The bpl processes a test starts get the same count (OMP_NUM_THREADS), so a run made in
# a subprocess sums in the same order as one made in the test, and matches it bitwise.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    _CORES = (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
              else os.cpu_count() or 1)
    _THREADS = max(1, _CORES // _WORKERS)
    torch.set_num_threads(_THREADS)
    os.environ["OMP_NUM_THREADS"] = str(_THREADS)


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm non-trivial affine parameters and running statistics."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, _BatchNorm) and m.affine and m.track_running_stats:
                n = m.num_features
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.randn(n, generator=g) * 0.2)
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
    return model


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _image_cache_in_tmp(tmp_path_factory, monkeypatch):
    """Decoded-image caches go to a folder of the test session, never ~/.cache/bpl."""
    monkeypatch.setenv("BPL_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "image-cache"))


@pytest.fixture
def without_onnx(monkeypatch):
    """Make every ``import onnx*`` fail, as on a machine without the ``bpl[onnx]`` extra."""
    import builtins

    real_import = builtins.__import__

    def no_onnx(name, *args, **kwargs):
        if name.startswith("onnx"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_onnx)
