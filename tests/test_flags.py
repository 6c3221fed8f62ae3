"""Flags whose effect no other test shows: --select last, --no-amp, --verify-tol, --debug,
--workers and --sync-bn (issue 29)."""

from __future__ import annotations

import json

import pytest
import torch

from bpl.cli import main
from bpl.errors import VerificationError

FAST = ["--data", "digits", "--image-size", "16", "--batch-size", "64", "--quiet", "--no-latency"]


def run_cli(*args) -> int:
    return main([str(a) for a in args])


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    out = tmp_path_factory.mktemp("flags") / "base"
    assert run_cli("train", *FAST, "--arch", "tiny_resnet", "--epochs", "3", "--lr", "0.1",
                   "--select", "last", "--out", out) == 0
    return out


def test_select_last_keeps_the_last_epoch_not_the_best(baseline):
    metrics = json.loads((baseline / "metrics.json").read_text())
    assert metrics["selected"]["epoch"] == 3 and metrics["selected"]["why"] == "--select last"
    # the kept model is the last epoch's, whatever validation said
    last = torch.load(baseline / "last.pt", weights_only=False)["model"]["state_dict"]
    best = torch.load(baseline / "best.pt", weights_only=False)["state_dict"]
    assert last.keys() == best.keys() and all(torch.equal(last[k], best[k]) for k in last)
    assert "kept epoch 3 of 3: --select last" in (baseline / "report.md").read_text()


def test_no_amp_is_recorded_as_the_reason_for_float32(baseline, tmp_path):
    out = tmp_path / "r"
    assert run_cli("train", *FAST, "--arch", "tiny_resnet", "--epochs", "1", "--no-amp",
                   "--out", out) == 0
    precision = json.loads((out / "metrics.json").read_text())["precision"]
    assert precision[0]["why"] == "--no-amp" and precision[0]["autocast"] == "float32"


def test_verify_tol_is_the_bound_fusion_is_held_to(baseline, tmp_path, capsys):
    common = ["compress", *FAST, "--baseline", baseline / "last.pt", "--epochs", "1",
              "--flops-reduction", "0.5"]
    assert run_cli(*common, "--verify-tol", "1e-4", "--out", tmp_path / "ok") == 0
    error = json.loads((tmp_path / "ok" / "metrics.json").read_text())["fusion_error"]
    assert 0 < error <= 1e-4
    capsys.readouterr()
    # a bound below the float32 rounding of the fold cannot be met: the run says so
    assert run_cli(*common, "--verify-tol", "1e-15", "--out", tmp_path / "strict") == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "1e-15" in err


def test_debug_shows_the_traceback_instead_of_one_line(baseline, tmp_path):
    common = ["compress", *FAST, "--baseline", baseline / "last.pt", "--epochs", "1",
              "--flops-reduction", "0.5", "--verify-tol", "1e-15"]
    with pytest.raises(VerificationError):
        run_cli(*common, "--debug", "--out", tmp_path / "d")


def test_workers_load_in_worker_processes(baseline, tmp_path, monkeypatch):
    import torch.utils.data

    seen = []
    real = torch.utils.data.DataLoader.__init__

    def spy(self, *args, **kwargs):
        seen.append(kwargs.get("num_workers", 0))
        real(self, *args, **kwargs)

    monkeypatch.setattr(torch.utils.data.DataLoader, "__init__", spy)
    assert run_cli("train", *FAST, "--arch", "tiny_resnet", "--epochs", "1", "--workers", "1",
                   "--out", tmp_path / "w") == 0
    assert seen and set(seen) == {1}  # training, validation and the test evaluation


def test_sync_bn_outside_torchrun_is_refused(baseline, tmp_path, capsys):
    assert run_cli("train", *FAST, "--arch", "tiny_resnet", "--sync-bn", "--out",
                   tmp_path / "s") == 1
    err = capsys.readouterr().err.strip()
    assert "--sync-bn" in err and "torchrun" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "s").exists()
