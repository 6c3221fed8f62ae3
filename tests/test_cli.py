"""The main job through the real entry point: train -> compress -> evaluate / profile, resume, errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from bpl.cli import main

FAST = ["--data", "digits", "--image-size", "16", "--batch-size", "64", "--quiet", "--no-latency"]
ARCH = ["--arch", "tiny_resnet"]


def run_cli(*args: str) -> int:
    return main([str(a) for a in args])


def bpl_subprocess(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bpl", *map(str, args)], capture_output=True,
                          text=True, timeout=300, **kw)


@pytest.fixture(scope="module")
def baseline(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "base"
    assert run_cli("train", *FAST, *ARCH, "--epochs", "2", "--lr", "0.1", "--out", out) == 0
    return out


def test_train_writes_a_run_directory(baseline):
    for name in ("config.json", "split.json", "last.pt", "best.pt", "log.csv", "metrics.json",
                 "report.md", "curves.png"):
        assert (baseline / name).exists(), name
    metrics = json.loads((baseline / "metrics.json").read_text())
    assert len(metrics["history"]) == 2
    assert metrics["final"]["top1"] > 30  # digits learn fast; 10% is chance
    assert json.loads((baseline / "config.json").read_text())["epochs"] == 2


@pytest.fixture(scope="module")
def compressed(baseline, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "bpl"
    rc = run_cli("compress", *FAST, "--baseline", baseline / "last.pt", "--epochs", "1",
                 "--flops-reduction", "0.6", "--out", out)
    assert rc == 0
    return out


def test_compress_prunes_fuses_and_verifies(compressed, capsys):
    metrics = json.loads((compressed / "metrics.json").read_text())
    assert abs(metrics["macs_reduction"] - 0.6) <= 0.01
    assert metrics["fusion_error"] <= 1e-5
    assert metrics["models"]["compressed"]["params"] < metrics["models"]["baseline"]["params"]
    report = (compressed / "report.md").read_text()
    assert "| compressed |" in report and "accuracy_vs_macs.png" in report
    assert (compressed / "deploy.pt").exists()


def test_compress_with_distillation_split_partners_everywhere(baseline, tmp_path):
    out = tmp_path / "kd"
    assert run_cli("compress", *FAST, "--baseline", baseline / "last.pt", "--epochs", "2",
                   "--flops-reduction", "0.6", "--distill", "--distill-temperature", "2",
                   "--init", "split", "--placement", "all", "--out", out) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    row = metrics["history"][-1]
    assert row["train_distill"] > 0 and row["distill_ms_per_step"] > 0
    assert row["train_diversity"] > 0
    assert row["train_loss"] == pytest.approx(
        row["train_ce"] + row["train_distill"] + row["train_diversity"], rel=1e-6)
    last = torch.load(out / "last.pt", weights_only=False)["model"]
    # --placement all: the 1x1 shortcut convs and the stem got partners too
    assert {"layer2.0.downsample.0", "conv1"} <= {conv for conv, _ in last["extended"]}
    assert metrics["fusion_error"] <= 1e-5
    kept = metrics["selected"]
    assert kept["epoch"] in (1, 2) and kept["of"] == 2 and "validation" in kept["why"]
    tops = [h["val_top1"] for h in metrics["history"]]
    assert kept["val_top1"] == max(tops) and kept["epoch"] == tops.index(max(tops)) + 1
    assert f"kept epoch {kept['epoch']} of 2" in (out / "report.md").read_text()
    # distillation alone, without partners: no diversity term, and a different model
    assert run_cli("compress", *FAST, "--baseline", baseline / "last.pt", "--epochs", "1",
                   "--flops-reduction", "0.6", "--distill", "--no-partners",
                   "--out", tmp_path / "kd-only") == 0
    row = json.loads((tmp_path / "kd-only" / "metrics.json").read_text())["history"][-1]
    assert "train_diversity" not in row and row["train_distill"] > 0


def test_deploy_loads_in_a_fresh_process_and_reproduces_accuracy(compressed):
    metrics = json.loads((compressed / "metrics.json").read_text())
    proc = bpl_subprocess("evaluate", compressed / "deploy.pt", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["top1"] == pytest.approx(metrics["final"]["top1"], abs=1e-9)
    code = (
        "import torch, bpl.models as m\n"
        f"model, meta = m.load_model({str(compressed / 'deploy.pt')!r})\n"
        "print(sum(p.numel() for p in model.parameters()), meta['num_classes'])\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    params, classes = proc.stdout.split()
    assert int(params) == metrics["models"]["compressed"]["params"] and int(classes) == 10


def test_profile_compares_two_checkpoints(baseline, compressed, capsys):
    assert run_cli("profile", baseline / "last.pt", compressed / "deploy.pt", "--batch-size", "1",
                   "--repeats", "3", "--json") == 0
    result = json.loads(capsys.readouterr().out)
    assert result["ideal_speedup"] == pytest.approx(1 / (1 - 0.6), rel=0.05)
    assert set(result["speedup"]) == {"torch", "onnxruntime"}
    assert set(result["speedup"]["onnxruntime"]) == {"1"}
    assert all(v > 0 for v in result["speedup"]["torch"].values())


def test_soft_schedule_on_an_image_folder(tmp_path):
    root = tmp_path / "imgs"
    g = torch.Generator().manual_seed(0)
    for c, colour in enumerate([(200, 30, 30), (30, 200, 30), (30, 30, 200)]):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(10):
            noise = torch.randint(0, 40, (20, 20, 3), generator=g).numpy().astype("uint8")
            img = Image.fromarray((noise + torch.tensor(colour).numpy()).clip(0, 255).astype("uint8"))
            img.save(root / f"class{c}" / f"{i}.png")
    common = ["--data", "imagefolder", "--data-root", root, "--image-size", "16",
              "--batch-size", "8", "--quiet", "--no-latency"]
    assert run_cli("train", *common, *ARCH, "--epochs", "1", "--out", tmp_path / "base") == 0
    assert run_cli("compress", *common, "--soft", "--baseline", tmp_path / "base" / "last.pt",
                   "--epochs", "2", "--flops-reduction", "0.5", "--out", tmp_path / "soft") == 0
    metrics = json.loads((tmp_path / "soft" / "metrics.json").read_text())
    assert abs(metrics["macs_reduction"] - 0.5) <= 0.01
    assert metrics["removal_error"] <= 1e-5 and metrics["fusion_error"] <= 1e-5


def _wait_for_epoch(run_dir: Path, proc: subprocess.Popen, epoch: int) -> None:
    deadline = time.time() + 240
    while time.time() < deadline:
        log = run_dir / "log.csv"
        if log.exists() and len(log.read_text().strip().splitlines()) > epoch:
            return
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        time.sleep(0.05)
    raise AssertionError("training made no progress")


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT])
def test_resume_after_a_killed_run_matches_an_uninterrupted_one(tmp_path, sig):
    args = [*FAST, *ARCH, "--epochs", "3", "--lr", "0.1"]
    assert run_cli("train", *args, "--out", tmp_path / "straight") == 0
    cut = tmp_path / "cut"
    proc = subprocess.Popen([sys.executable, "-m", "bpl", "train", *args, "--out", str(cut)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_epoch(cut, proc, 1)
    os.kill(proc.pid, sig)
    _, err = proc.communicate(timeout=60)
    if sig == signal.SIGINT:
        assert proc.returncode == 130 and "--resume" in err
    assert not list(cut.glob("*.tmp"))
    assert run_cli("train", *args, "--out", cut, "--resume") == 0
    straight = json.loads((tmp_path / "straight" / "metrics.json").read_text())
    resumed = json.loads((cut / "metrics.json").read_text())
    assert [h["epoch"] for h in resumed["history"]] == [1, 2, 3]
    assert [h["val_top1"] for h in resumed["history"]] == [h["val_top1"] for h in straight["history"]]
    a = torch.load(tmp_path / "straight" / "last.pt", weights_only=False)["model"]["state_dict"]
    b = torch.load(cut / "last.pt", weights_only=False)["model"]["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_an_interrupted_checkpoint_write_keeps_the_previous_one(tmp_path, monkeypatch):
    from bpl import models

    path = tmp_path / "last.pt"
    models.atomic_save({"v": 1}, path)

    def broken_save(obj, f, *a, **k):
        Path(f).write_bytes(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError):
        models.atomic_save({"v": 2}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=False) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_config_file_with_flag_overrides(tmp_path, baseline):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("epochs: 1\nlr: 0.02\nflops-reduction: 0.5\n")
    out = tmp_path / "run"
    assert run_cli("compress", *FAST, "--config", cfg, "--baseline", baseline / "last.pt",
                   "--lr", "0.03", "--out", out, "--no-partners") == 0
    saved = json.loads((out / "config.json").read_text())
    assert (saved["epochs"], saved["lr"], saved["flops_reduction"], saved["partners"]) == (
        1, 0.03, 0.5, False)


@pytest.mark.parametrize(
    "args, message",
    [
        (["train", "--data", "imagefolder", "--data-root", "/nonexistent/x"], "/nonexistent/x"),
        (["compress", "--baseline", "/nonexistent/b.pt"], "/nonexistent/b.pt"),
        (["compress", "--flops-reduction", "1.5"], "between 0 and 1"),
        (["train", "--config", "/nonexistent/c.yaml"], "config file not found"),
    ],
)
def test_bad_input_gives_one_line_and_nonzero_exit(args, message, tmp_path, capsys):
    assert run_cli(*args, "--out", tmp_path / "r") != 0
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and err.startswith("bpl: error:")


def test_soft_with_an_unsupported_criterion_is_refused_before_loading_data(
    baseline, tmp_path, capsys, monkeypatch
):
    import bpl.pipeline

    def no_data(*args, **kwargs):
        raise AssertionError("data was loaded")

    monkeypatch.setattr(bpl.pipeline, "load_dataset", no_data)
    assert run_cli("compress", *FAST, "--baseline", baseline / "last.pt", "--soft",
                   "--importance", "fpgm", "--out", tmp_path / "r") == 1
    err = capsys.readouterr().err
    assert "--soft" in err and "fpgm" in err and "l2" in err
    assert not (tmp_path / "r").exists()


def test_importance_choices_are_the_library_criteria():
    from bpl.cli import build_parser
    from bpl.pruning import IMPORTANCES

    args = build_parser().parse_args(["compress", "--importance", IMPORTANCES[-1]])
    assert args.importance == IMPORTANCES[-1]


def test_corrupt_and_mismatched_checkpoints(tmp_path, baseline, capsys):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint at all")
    assert run_cli("compress", *FAST, "--baseline", bad, "--out", tmp_path / "a") == 1
    assert str(bad) in capsys.readouterr().err
    root = tmp_path / "three"
    for c in range(3):
        (root / f"c{c}").mkdir(parents=True)
        for i in range(4):
            Image.new("RGB", (12, 12), (c * 80, 0, 0)).save(root / f"c{c}" / f"{i}.png")
    assert run_cli("compress", "--data", "imagefolder", "--data-root", root, "--baseline",
                   baseline / "last.pt", "--out", tmp_path / "b", "--quiet") == 1
    assert "10 classes" in capsys.readouterr().err


def test_unreachable_target_is_an_error(baseline, tmp_path, capsys):
    assert run_cli("compress", *FAST, "--baseline", baseline / "last.pt", "--flops-reduction",
                   "0.9", "--round-to", "64", "--out", tmp_path / "r") == 1
    assert "reach" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()  # a failed run leaves nothing behind


def test_existing_run_directory_is_not_clobbered(baseline, capsys):
    assert run_cli("train", *FAST, "--out", baseline) == 1
    assert "--resume" in capsys.readouterr().err


def test_help_shows_an_example(capsys):
    with pytest.raises(SystemExit):
        run_cli("compress", "--help")
    assert "example:" in capsys.readouterr().out


def test_demo_tells_the_whole_story(tmp_path, capsys):
    out = tmp_path / "demo"
    assert run_cli("demo", "--epochs", "1", "--out", out, "--quiet") == 0
    printed = capsys.readouterr().out
    assert "| baseline |" in printed and "| compressed |" in printed and "fusion error" in printed
    metrics = json.loads((out / "compressed" / "metrics.json").read_text())
    assert abs(metrics["macs_reduction"] - 0.7) <= 0.01
    assert (out / "baseline" / "last.pt").exists() and (out / "compressed" / "deploy.pt").exists()
    assert run_cli("demo", "--epochs", "1", "--out", out, "--quiet") == 0  # re-run: resumes


def test_export_command_fuses_and_checks_parity(compressed, tmp_path, capsys):
    out = tmp_path / "student.torchscript.pt"
    assert run_cli("export", compressed / "last.pt", "--format", "torchscript", "--out", out) == 0
    assert "max relative error" in capsys.readouterr().out and out.exists()
    assert run_cli("export", compressed / "deploy.pt", "--out", tmp_path / "deploy.onnx") == 0
    assert (tmp_path / "deploy.onnx").exists()
