"""The main job through the real entry point: train -> compress -> evaluate / profile, resume, errors."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import nn

import bpl
from bpl.cli import main
from bpl.models import load_model

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
    assert metrics["images"] == {"mode": "bundled", "why": "the digits ship decoded with bpl"}
    assert metrics["final"]["top1"] > 30  # digits learn fast; 10% is chance
    assert json.loads((baseline / "config.json").read_text())["epochs"] == 2


@pytest.fixture(scope="module")
def compressed(baseline, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "bpl"
    rc = run_cli("compress", *FAST, "--baseline", baseline / "last.pt", "--epochs", "1",
                 "--flops-reduction", "0.6", "--out", out)
    assert rc == 0
    return out


def test_compress_prunes_fuses_and_verifies(compressed, baseline, capsys):
    metrics = json.loads((compressed / "metrics.json").read_text())
    assert abs(metrics["macs_reduction"] - 0.6) <= 0.01
    assert metrics["fusion_error"] <= 1e-5
    assert metrics["images"]["mode"] == "bundled"  # the digits ship decoded
    assert metrics["models"]["compressed"]["params"] < metrics["models"]["baseline"]["params"]
    # checked here too, not only by the tool: the kept student (partners) against the
    # deployed model (fused), and the MACs of both ends counted afresh
    from bpl import count_macs, partner_blocks
    from bpl.verification import relative_error

    student = load_model(compressed / "best.pt")[0].eval()
    deploy = load_model(compressed / "deploy.pt")[0].eval()
    base = load_model(baseline / "best.pt")[0].eval()
    assert partner_blocks(student) and not partner_blocks(deploy)
    x = torch.randn(4, 3, 16, 16)
    assert relative_error(student, deploy, x) <= 1e-5
    assert 1 - count_macs(deploy, x[:1]) / count_macs(base, x[:1]) == pytest.approx(
        metrics["macs_reduction"], abs=1e-6)
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
    assert {"layer2.0.downsample.0", "conv1"} <= {site[0] for site in last["extended"]}
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
    report = (tmp_path / "kd-only" / "report.md").read_text()
    assert "| after fine-tuning (plain fine-tuning + distillation) |" in report
    assert "isolate distillation's effect" in report and "without `--distill`" in report


def test_compress_with_structural_partners_and_the_functional_loss(baseline, tmp_path):
    """--partner diverse with --diversity-compare functional: the branches train, the loss is
    logged, the checkpoint records the kind, and the fused model is exact and stock-shaped."""
    out = tmp_path / "dbb"
    assert run_cli("compress", *FAST, "--baseline", baseline / "last.pt", "--epochs", "1",
                   "--flops-reduction", "0.5", "--partner", "diverse", "--diversity-compare",
                   "functional", "--out", out) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["config"]["partner"] == "diverse"
    assert metrics["config"]["diversity_compare"] == "functional"
    assert metrics["history"][-1]["train_diversity"] > 0 and metrics["fusion_error"] <= 1e-5
    last = torch.load(out / "last.pt", weights_only=False)["model"]
    assert {kind for *_, kind in last["extended"]} == {"diverse"}
    student, _ = load_model(out / "last.pt")
    block = next(b for _, b in bpl.partner_blocks(student))
    assert set(block.branches) == {"pointwise", "pointwise_kxk", "pointwise_avg"}
    deploy, _ = load_model(out / "deploy.pt")
    assert not bpl.partner_blocks(deploy)


def test_soft_from_scratch_with_regrowing_asymmetric_partners(baseline, tmp_path):
    """The reference's recipe from fresh weights: soft masks with partners that regrow,
    then a physically smaller model; the config records both choices."""
    out = tmp_path / "soft"
    assert run_cli("compress", *FAST, "--baseline", baseline / "last.pt", "--epochs", "2",
                   "--flops-reduction", "0.5", "--soft", "--from-scratch", "--partner",
                   "asymmetric", "--out", out) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["config"]["soft_partners"] == "regrow" and metrics["config"]["from_scratch"]
    assert 0.45 <= metrics["macs_reduction"] <= 0.55 and metrics["removal_error"] <= 1e-5
    state = torch.load(out / "last.pt", weights_only=False)
    assert state["hooks"][0]["partners"] == "regrow"
    # a re-mask after each of the 2 epochs (the state saved after the last), then the final one
    assert state["hooks"][0]["updates"] == 2 and metrics["soft_updates"] == 3


def test_soft_filter_pruning_without_partners(baseline, compressed, tmp_path):
    """--soft --no-partners: the reference's soft schedule on the plain model (Soft Filter
    Pruning alone), ending in a physically smaller model with nothing fused."""
    out = tmp_path / "sfp"
    assert run_cli("compress", *FAST, "--baseline", baseline / "last.pt", "--epochs", "2",
                   "--flops-reduction", "0.5", "--soft", "--no-partners", "--out", out) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["config"]["partners"] is False and metrics["fusion_error"] is None
    # the deployed model's validation top-1 (the soft schedule re-picks after the last epoch)
    assert 0 <= metrics["selected"]["val_top1"] <= 100 and metrics["selected"]["epoch"] == 2
    assert 0.45 <= metrics["macs_reduction"] <= 0.55 and metrics["removal_error"] <= 1e-5
    assert metrics["soft_updates"] == 3
    state = torch.load(out / "last.pt", weights_only=False)
    assert not any("partner" in key for key in state["model"]["state_dict"])
    report = (out / "report.md").read_text()
    assert "fusion check" not in report
    # it says what trained, and offers no "--no-partners" control to a run without partners
    assert "| after training (soft pruning while training) | +2 |" in report
    assert "isolate" not in report and "--no-partners" not in report
    # the baseline is scored as given, as the hard run scores it: until 2026-12-07 a soft run
    # without partners trained the baseline module itself and then reported it as the baseline
    hard = json.loads((compressed / "metrics.json").read_text())
    assert metrics["baseline"]["top1"] == pytest.approx(hard["baseline"]["top1"], abs=1e-9)
    assert metrics["baseline"]["val_top1"] == pytest.approx(hard["baseline"]["val_top1"], abs=1e-9)


def test_soft_filter_pruning_takes_the_placement(baseline, tmp_path, monkeypatch):
    """--placement reaches the soft schedule of a run without partners (which convs' groups
    it prunes), as it reaches bpl.extend in a run with them."""
    from bpl.pipeline import compression

    seen = []

    class Recording(compression.SoftPruner):
        def __init__(self, *args, **kwargs):
            seen.append(kwargs["placement"])
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(compression, "SoftPruner", Recording)
    assert run_cli("compress", *FAST, "--baseline", baseline / "last.pt", "--epochs", "1",
                   "--flops-reduction", "0.5", "--soft", "--no-partners", "--placement", "all",
                   "--out", tmp_path / "all") == 0
    assert seen == ["all"]


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


def _flop_counter_macs(model: torch.nn.Module, size: int) -> int:
    """MACs of one image by torch's own FLOP counter (FLOPs / 2), not bpl's count."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model.eval()(torch.randn(1, 3, size, size))
    return counter.get_total_flops() // 2


def test_profile_compares_two_checkpoints(baseline, compressed, capsys):
    base, comp = baseline / "last.pt", compressed / "deploy.pt"
    assert run_cli("profile", base, comp, "--batch-size", "1", "3", "--repeats", "3",
                   "--json") == 0
    result = json.loads(capsys.readouterr().out)
    assert result["ideal_speedup"] == pytest.approx(1 / (1 - 0.6), rel=0.05)
    assert "note" in result and set(result["fraction_of_ideal"]) == {"torch", "onnxruntime"}
    rows = result["models"]
    assert list(rows) == [str(base), str(comp)]
    for path, row in rows.items():
        model = load_model(path)[0]
        assert row["macs"] == _flop_counter_macs(model, 16)
        assert row["params"] == sum(p.numel() for p in model.parameters())
        assert set(row["latency_ms"]) == {"torch", "onnxruntime"}
        for by_batch in row["latency_ms"].values():
            assert set(by_batch) == {"1", "3"} and min(by_batch.values()) > 0
    run = json.loads((compressed / "metrics.json").read_text())["models"]
    assert (rows[str(comp)]["macs"], rows[str(comp)]["params"]) == (
        run["compressed"]["macs"], run["compressed"]["params"])
    a, b = rows.values()
    assert result["ideal_speedup"] == pytest.approx(a["macs"] / b["macs"], rel=1e-12)
    assert set(result["speedup"]) == {"torch", "onnxruntime"}
    for runtime, by_batch in result["speedup"].items():
        assert set(by_batch) == {"1", "3"}
        for bs, speedup in by_batch.items():
            assert speedup == pytest.approx(
                a["latency_ms"][runtime][bs] / b["latency_ms"][runtime][bs], rel=1e-12)


def test_profile_one_checkpoint_without_onnx_on_the_threads_asked(compressed, capsys,
                                                                   monkeypatch):
    import bpl.exporting
    import bpl.pipeline.deploy

    def no_export(*args, **kwargs):
        raise AssertionError("--no-onnx still exported to ONNX")

    monkeypatch.setattr(bpl.exporting, "onnx_module", no_export)
    threads_seen = []
    real_load = bpl.pipeline.deploy.load_model

    def load_and_watch(path):
        model, meta = real_load(path)
        model.register_forward_pre_hook(lambda m, a: threads_seen.append(torch.get_num_threads()))
        return model, meta

    monkeypatch.setattr(bpl.pipeline.deploy, "load_model", load_and_watch)
    before = torch.get_num_threads()
    want = 3 if before == 2 else 2
    assert run_cli("profile", compressed / "deploy.pt", "--batch-size", "2", "--repeats", "4",
                   "--no-onnx", "--threads", want, "--json") == 0
    result = json.loads(capsys.readouterr().out)
    assert "speedup" not in result and "ideal_speedup" not in result
    (row,) = result["models"].values()
    assert set(row["latency_ms"]) == {"torch"} and set(row["latency_ms"]["torch"]) == {"2"}
    assert result["threads"] == want and f"({want} threads)" in result["table"]
    # the MAC count runs first, then 5 warm-up and 4 timed passes on the threads asked
    assert threads_seen == [before] + [want] * (5 + 4)
    assert torch.get_num_threads() == before


def test_profile_without_onnxruntime_warns_and_times_pytorch_alone(compressed, capsys, caplog,
                                                                   without_onnx):
    import logging

    with caplog.at_level(logging.WARNING):
        assert run_cli("profile", compressed / "deploy.pt", "--batch-size", "1", "--repeats",
                       "2", "--json") == 0
    (row,) = json.loads(capsys.readouterr().out)["models"].values()
    assert set(row["latency_ms"]) == {"torch"} and row["latency_ms"]["torch"]["1"] > 0
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("onnxruntime latency skipped" in m and "bpl[onnx]" in m for m in warned), warned


def test_profile_refuses_checkpoints_of_different_image_sizes(compressed, tmp_path, capsys):
    payload = torch.load(compressed / "deploy.pt", weights_only=True)
    payload["meta"]["image_size"] = 24
    other = tmp_path / "at24.pt"
    torch.save(payload, other)
    both = [compressed / "deploy.pt", other, "--no-onnx", "--batch-size", "1", "--repeats", "1"]
    assert run_cli("profile", *both) == 1
    err = capsys.readouterr().err
    assert "different image sizes [16, 24]" in err and "--image-size" in err
    assert run_cli("profile", *both, "--image-size", "20", "--json") == 0
    result = json.loads(capsys.readouterr().out)
    assert result["image_size"] == 20
    model = load_model(other)[0]
    assert all(r["macs"] == _flop_counter_macs(model, 20) for r in result["models"].values())


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
    updates = {}
    for every in (1, 2):
        out = tmp_path / f"soft{every}"
        assert run_cli("compress", *common, "--soft", "--baseline", tmp_path / "base" / "last.pt",
                       "--epochs", "3", "--soft-every", every, "--flops-reduction", "0.5",
                       "--out", out) == 0
        metrics = json.loads((out / "metrics.json").read_text())
        assert abs(metrics["macs_reduction"] - 0.5) <= 0.01
        assert metrics["removal_error"] <= 1e-5 and metrics["fusion_error"] <= 1e-5
        updates[every] = torch.load(out / "last.pt", weights_only=False)["hooks"][0]["updates"]
    # the masks were re-picked after every epoch (1), or every second one (2)
    assert updates == {1: 3, 2: 1}


def _wait_for_epoch(run_dir: Path, proc: subprocess.Popen, epoch: int) -> None:
    deadline = time.time() + 240
    while time.time() < deadline:
        log = run_dir / "log.csv"
        if log.exists() and len(log.read_text().strip().splitlines()) > epoch:
            return
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        time.sleep(0.05)
    raise AssertionError("training made no progress")


def _default_sigint() -> None:
    """A shell runs background jobs with SIGINT ignored, and children inherit that; the run
    under test must see Ctrl-C as a user's terminal would deliver it."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT])
def test_resume_after_a_killed_run_matches_an_uninterrupted_one(tmp_path, sig):
    # small batches: epochs long enough (many steps) for the signal to land mid-run
    args = [*FAST, *ARCH, "--batch-size", "16", "--epochs", "3", "--lr", "0.1"]
    assert run_cli("train", *args, "--out", tmp_path / "straight") == 0
    for attempt in range(3):  # on a loaded machine the run may finish before the signal
        cut = tmp_path / f"cut{attempt}"
        proc = subprocess.Popen([sys.executable, "-m", "bpl", "train", *args, "--out", str(cut)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                preexec_fn=_default_sigint)
        _wait_for_epoch(cut, proc, 1)
        os.kill(proc.pid, sig)
        _, err = proc.communicate(timeout=60)
        if proc.returncode != 0:
            break
    if sig == signal.SIGINT:
        assert proc.returncode == 130 and "--resume" in err
    else:
        assert proc.returncode == -signal.SIGKILL
    # the signal landed mid-run: not every epoch was done, and the run was not finished
    before = torch.load(cut / "last.pt", weights_only=False)
    assert 1 <= before["epoch"] < 3 and not (cut / "metrics.json").exists()
    assert not list(cut.glob("*.tmp"))
    assert run_cli("train", *args, "--out", cut, "--resume") == 0
    straight = json.loads((tmp_path / "straight" / "metrics.json").read_text())
    resumed = json.loads((cut / "metrics.json").read_text())
    assert [h["epoch"] for h in resumed["history"]] == [1, 2, 3]
    # it went on from the saved epochs (their rows, timings included, are the cut run's)
    assert resumed["history"][:before["epoch"]] == before["history"]
    assert resumed["segments"] == 2
    assert [h["val_top1"] for h in resumed["history"]] == [h["val_top1"] for h in straight["history"]]
    a = torch.load(tmp_path / "straight" / "last.pt", weights_only=False)["model"]["state_dict"]
    b = torch.load(cut / "last.pt", weights_only=False)["model"]["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)


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
        (["train", "--lr", "nan"], "--lr must be a finite number, got nan"),
        (["train", "--lr", "inf"], "--lr must be a finite number, got inf"),
        (["compress", "--max-drop", "nan"], "--max-drop must be a finite number"),
        (["compress", "--flops-reduction", "0.5", "--partner", "diverse", "--init", "split"],
         "--init split is for --partner same"),
        (["compress", "--max-drop", "1", "--from-scratch"],
         "--from-scratch trains the pruned architecture once"),
        (["train", "--image-size", "7"], "--image-size must be a whole number of pixels, at "
                                         "least 16, got 7"),
    ],
)
def test_bad_input_gives_one_line_and_nonzero_exit(args, message, tmp_path, capsys):
    assert run_cli(*args, "--out", tmp_path / "r") != 0
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and err.startswith("bpl: error:")


@pytest.mark.parametrize("extra, words", [
    (["--no-partners", "--soft-partners", "masked"], ["--soft-partners", "--no-partners"]),
    (["--global-pruning"], ["--global-pruning"]),  # was ignored
    (["--accept-closest"], ["--accept-closest"]),  # was ignored
])
def test_what_soft_cannot_honour_is_refused_before_loading_data(
    extra, words, baseline, tmp_path, capsys, monkeypatch
):
    import bpl.pipeline.fitting

    def no_data(*args, **kwargs):
        raise AssertionError("data was loaded")

    monkeypatch.setattr(bpl.pipeline.fitting, "load_dataset", no_data)
    assert run_cli("compress", *FAST, "--baseline", baseline / "last.pt", "--soft",
                   "--flops-reduction", "0.5", *extra, "--out", tmp_path / "r") == 1
    err = capsys.readouterr().err.strip()
    assert "--soft" in err and all(w in err for w in words) and len(err.splitlines()) == 1
    assert not (tmp_path / "r").exists()


def test_a_criterion_registered_in_one_place_serves_hard_and_soft_pruning(
    baseline, tmp_path, monkeypatch
):
    """A new criterion is one entry (bpl.pruning.register_importance): --importance takes it,
    hard pruning and the soft schedule both rank channels with it."""
    import torch_pruning as tp

    from bpl.pruning import importance as imp

    calls = []

    class Reversed(tp.importance.Importance):  # a throwaway: the last channels count most
        def __call__(self, group):
            calls.append(group)
            n = len(group[0].idxs)
            return torch.arange(n, dtype=torch.float32)

    monkeypatch.setitem(imp._CRITERIA, "reversed", Reversed)
    for extra in ([], ["--soft"]):
        out = tmp_path / ("soft" if extra else "hard")
        calls.clear()
        assert run_cli("compress", *FAST, "--baseline", baseline / "last.pt", "--epochs", "1",
                       "--flops-reduction", "0.5", "--importance", "reversed", *extra,
                       "--out", out) == 0
        assert calls, extra  # the criterion was asked
        assert json.loads((out / "config.json").read_text())["importance"] == "reversed"
    # and its ranking decided: the first channels go, the last stay
    seen = _start_of_training(monkeypatch, baseline, tmp_path, "--importance", "reversed",
                              "--no-partners", "--round-to", "1")
    monkeypatch.setitem(imp._CRITERIA, "reversed", Reversed)
    base = dict(load_model(baseline / "last.pt")[0].named_modules())
    convs = [(base[n].weight, m.weight) for n, m in seen["pruned"].named_modules()
             if isinstance(m, nn.Conv2d) and m.groups == 1]
    assert convs and any(b.shape[0] > p.shape[0] for b, p in convs)
    # every conv kept its last filters, over the last channels of its input
    assert all(torch.equal(p, b[b.shape[0] - p.shape[0]:, b.shape[1] - p.shape[1]:])
               for b, p in convs)
    soft = _start_of_training(monkeypatch, baseline, tmp_path, "--importance", "reversed",
                              "--soft")["hooks"][0]
    soft.update()  # the first pick (at the end of the first epoch)
    masks = soft.masks
    assert any(not keep.all() for keep in masks.values())
    for keep in masks.values():
        dropped = int((~keep).sum())
        assert not keep[:dropped].any() and keep[dropped:].all()


def test_a_bad_granularity_in_a_config_file_is_refused_before_loading_data(
    baseline, tmp_path, capsys, monkeypatch
):
    import bpl.pipeline.fitting

    monkeypatch.setattr(bpl.pipeline.fitting, "load_dataset", lambda *a, **k: 1 / 0)
    cfg = tmp_path / "c.yaml"
    cfg.write_text("granularity: stages\n")
    assert run_cli("compress", *FAST, "--baseline", baseline / "last.pt", "--config", cfg,
                   "--flops-reduction", "0.5", "--out", tmp_path / "r") == 1
    err = capsys.readouterr().err.strip()
    assert "--granularity must be one of stage, block, global, got 'stages'" in err


def test_importance_choices_are_the_library_criteria():
    from bpl.cli import build_parser
    from bpl.pruning import IMPORTANCES

    parser = build_parser()
    for name in IMPORTANCES:  # every library criterion is a choice of the flag
        assert parser.parse_args(["compress", "--importance", name]).importance == name
    with pytest.raises(SystemExit):
        parser.parse_args(["compress", "--importance", "no-such-criterion"])


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
                   baseline / "last.pt", "--flops-reduction", "0.5", "--out", tmp_path / "b",
                   "--quiet") == 1
    assert "10 classes" in capsys.readouterr().err


def test_unreachable_target_is_an_error(baseline, tmp_path, capsys):
    assert run_cli("compress", *FAST, "--baseline", baseline / "last.pt", "--flops-reduction",
                   "0.9999", "--out", tmp_path / "r") == 1
    assert "reach" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()  # a failed run leaves nothing behind
    assert run_cli("compress", *FAST, "--baseline", baseline / "last.pt", "--round-to", "0",
                   "--out", tmp_path / "r") == 1
    assert "--round-to must be a positive whole number (1 or None: no rounding)" in capsys.readouterr().err


def test_existing_run_directory_is_not_clobbered(baseline, capsys):
    before = {p.name: p.read_bytes() for p in baseline.iterdir() if p.is_file() and p.name[0] != "."}
    assert run_cli("train", *FAST, "--out", baseline) == 1
    assert "--resume" in capsys.readouterr().err
    after = {p.name: p.read_bytes() for p in baseline.iterdir() if p.is_file() and p.name[0] != "."}
    assert after == before  # refused before anything was written, config.json included


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
    logs = {p: (out / p / "log.csv").read_text() for p in ("baseline", "compressed")}
    assert run_cli("demo", "--epochs", "1", "--out", out, "--quiet") == 0  # re-run: resumes
    # nothing was trained again: each log keeps its one epoch and that epoch's own timing
    assert {p: (out / p / "log.csv").read_text() for p in logs} == logs


def _close(reference: torch.Tensor, out: torch.Tensor, tol: float = 1e-4) -> bool:
    return bool((out - reference).abs().max() <= tol * reference.abs().max())


def _onnx_output(path: Path, x: torch.Tensor) -> torch.Tensor:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])


def test_export_command_fuses_and_checks_parity(compressed, tmp_path, capsys):
    out = tmp_path / "student.torchscript.pt"
    assert run_cli("export", compressed / "last.pt", "--format", "torchscript", "--out", out) == 0
    assert "max relative error" in capsys.readouterr().out and out.exists()
    assert run_cli("export", compressed / "deploy.pt", "--out", tmp_path / "deploy.onnx") == 0
    assert (tmp_path / "deploy.onnx").exists()
    # the files themselves, run outside bpl, against the checkpoints' models in PyTorch
    student = load_model(compressed / "last.pt")[0].eval()
    assert bpl.partner_blocks(student)  # there were partners to fuse
    deploy = load_model(compressed / "deploy.pt")[0].eval()
    scripted = torch.jit.load(str(out), map_location="cpu")
    names = {m.original_name for m in scripted.modules()}
    assert not any("BatchNorm" in n or "Partner" in n for n in names), names
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        assert _close(student(x), scripted(x))
        assert _close(deploy(x), _onnx_output(tmp_path / "deploy.onnx", x))


def test_export_default_path_and_tolerance(compressed, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(compressed / "last.pt", run / "last.pt")
    student = load_model(run / "last.pt")[0].eval()
    x = torch.randn(2, 3, 16, 16)
    assert run_cli("export", run / "last.pt") == 0
    assert run_cli("export", run / "last.pt", "--format", "torchscript") == 0
    assert sorted(p.name for p in run.iterdir()) == [
        "last.onnx", "last.pt", "last.torchscript.pt"]
    with torch.no_grad():
        assert _close(student(x), _onnx_output(run / "last.onnx", x))
        assert _close(student(x), torch.jit.load(str(run / "last.torchscript.pt"))(x))
    capsys.readouterr()
    # fusing and exporting change float rounding: a tolerance that small cannot be met
    for fmt in ("onnx", "torchscript"):
        out = tmp_path / f"strict.{fmt}"
        assert run_cli("export", run / "last.pt", "--format", fmt, "--verify-tol", "1e-12",
                       "--out", out) == 1
        err = capsys.readouterr().err
        assert "nothing was written" in err and "1e-12" in err
        assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    assert run_cli("export", run / "last.pt", "--tol", "1e-3", "--out", tmp_path / "ok.onnx") == 0


def _props(path: Path) -> dict:
    import onnx

    return {p.key: json.loads(p.value) for p in onnx.load(str(path)).metadata_props}


def test_export_int8_from_the_runs_own_split_then_predict_and_profile(compressed, tmp_path,
                                                                       capsys):
    pytest.importorskip("onnxruntime")
    run = tmp_path / "run"
    run.mkdir()
    for name in ("deploy.pt", "split.json"):
        shutil.copy(compressed / name, run / name)
    assert run_cli("export", run / "deploy.pt", "--int8", "--calibration-images", "60",
                   "--quiet") == 0
    out = capsys.readouterr().out
    path = run / "deploy.int8.onnx"
    assert path.exists() and f"wrote {path} (onnx, int8)" in out
    split = json.loads((run / "split.json").read_text())
    props = _props(path)
    assert props["precision"] == "int8" and props["image_size"] == 16
    assert props["calibration"]["images"] == 60
    source = props["calibration"]["source"]
    assert f"60 of the {len(split['train'])} images of the training split of digits" in source
    assert str((run / "split.json").resolve()) in source and source in out
    check = props["int8_check"]
    assert check["images"] == len(split["val"]) and check["max_drop"] == 1.0
    assert f"validation top-1 on {len(split['val'])} images" in out
    assert check["drop"] <= 1.0 and check["fp32_top1"] > 30
    # predict reads it as any bpl ONNX file: the fp32 checkpoint's answers, mostly
    images = tmp_path / "images"
    images.mkdir()
    g = torch.Generator().manual_seed(0)
    for i in range(6):
        pixels = torch.randint(0, 255, (12, 12, 3), generator=g, dtype=torch.uint8)
        Image.fromarray(pixels.numpy()).save(images / f"{i}.png")
    answers = {}
    for model in (run / "deploy.pt", path):
        assert run_cli("predict", model, images, "--top-k", "1", "--json", "--quiet") == 0
        answers[model.name] = json.loads(capsys.readouterr().out)
    assert [r["image"] for r in answers["deploy.pt"]] == [r["image"] for r in answers[path.name]]
    same = sum(a["top"][0]["class"] == b["top"][0]["class"]
               for a, b in zip(answers["deploy.pt"], answers[path.name]))
    assert same >= 4, answers
    # profile times the checkpoint against the INT8 file, in onnxruntime
    assert run_cli("profile", run / "deploy.pt", path, "--batch-size", "2", "--repeats", "2",
                   "--json") == 0
    result = json.loads(capsys.readouterr().out)
    fp32, int8 = result["models"].values()
    assert (fp32["precision"], int8["precision"]) == ("fp32", "int8")
    assert set(fp32["latency_ms"]) == {"torch", "onnxruntime"}
    assert set(int8["latency_ms"]) == {"onnxruntime"} and int8["latency_ms"]["onnxruntime"]["2"] > 0
    assert (int8["macs"], int8["params"]) == (fp32["macs"], fp32["params"])
    assert set(result["speedup"]) == {"onnxruntime"} and result["ideal_speedup"] == 1.0
    assert "fraction_of_ideal" not in result and "| int8 |" in result["table"]
    assert run_cli("profile", path, "--batch-size", "1", "--repeats", "1") == 0
    assert "onnxruntime | int8" in capsys.readouterr().out
    for flags, said in ((["--no-onnx"], "drop --no-onnx"), (["--image-size", "24"], "16 px")):
        assert run_cli("profile", path, *flags) == 1
        assert said in capsys.readouterr().err


def test_export_int8_refusals_and_overrides(compressed, tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(compressed / "deploy.pt", run / "deploy.pt")
    out = tmp_path / "m.int8.onnx"
    base = ["export", run / "deploy.pt", "--int8", "--out", out, "--quiet"]

    def error(*flags) -> str:
        assert run_cli(*base, *flags) == 1
        err = capsys.readouterr().err.strip()
        assert err.startswith("bpl: error:") and len(err.splitlines()) == 1, err
        assert not out.exists() and not list(tmp_path.glob(".*")), "a file was written"
        return err

    # nothing to calibrate on: no split.json beside the checkpoint, no folder
    assert "--calibration-data DIR" in error()
    base.remove("--int8")
    assert "--force is an option of INT8 export: add --int8" in error("--force")
    base.insert(2, "--int8")
    assert "--format torchscript" in error("--format", "torchscript")
    # with the run's split: a threshold no model can meet is refused, and --force overrides
    split = ["--split", compressed / "split.json", "--calibration-images", "50"]
    err = error(*split, "--max-drop", "-101")
    assert "more than --max-drop -101; nothing was written" in err and "--force" in err
    assert run_cli(*base, *split, "--max-drop", "-101", "--force") == 0
    assert "not enforced: --force" in capsys.readouterr().out
    assert _props(out)["int8_check"]["max_drop"] is None
    out.unlink()
    # a folder of images instead of the training split
    images = tmp_path / "images"
    images.mkdir()
    for i in range(5):
        Image.new("RGB", (10, 10), (40 * i, 0, 0)).save(images / f"{i}.png")
    folder = ["--calibration-data", images]
    assert "--split with the run's split.json, or --force" in error(*folder)
    assert "only 5 calibration images, fewer than 50" in error(*folder, "--force")
    assert "--calibration-images 5 to accept so few" in error(*folder, "--force")
    assert run_cli(*base, *folder, "--force", "--calibration-images", "5") == 0
    said = capsys.readouterr().out
    assert f"calibrated on 5 of the 5 images in {images.resolve()}" in said
    assert "not checked against fp32" in said
    props = _props(out)
    assert props["int8_check"] is None and props["calibration"]["images"] == 5


def test_export_int8_without_onnxruntime_is_a_one_line_error(compressed, tmp_path, capsys,
                                                             without_onnx):
    out = tmp_path / "m.onnx"
    assert run_cli("export", compressed / "deploy.pt", "--int8", "--out", out, "--quiet") == 1
    err = capsys.readouterr().err.strip()
    assert "pip install 'bpl[onnx]'" in err and len(err.splitlines()) == 1
    assert not out.exists()


def test_bench_deploy_measures_int8_against_fp32_on_a_runs_splits(compressed):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("scipy")
    from benchmark_scripts import load_benchmark

    bench = load_benchmark("bench_deploy")
    record = bench.int8_accuracy(str(compressed / "deploy.pt"), images=40)
    split = json.loads((compressed / "split.json").read_text())
    assert record["calibration"]["images"] == 40 and record["data"] == "digits"
    assert record["val"]["images"] == len(split["val"]) and record["val"]["max_drop"] is None
    assert record["test"]["images"] == len(split["test"])
    # fp32 in onnxruntime on the test split: the run's own test top-1, measured in PyTorch
    final = json.loads((compressed / "metrics.json").read_text())["final"]["top1"]
    assert record["test"]["fp32_top1"] == pytest.approx(final, abs=100 / len(split["test"]))
    table = bench.accuracy_markdown([record], {"machine": {"cpu": "a CPU"}}, "the command")
    assert table.count(str(compressed / "deploy.pt")) == 2 and "| test |" in table


def test_evaluate_with_a_split_file_and_its_errors(compressed, tmp_path, capsys):
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(compressed / "deploy.pt", alone / "deploy.pt")
    assert run_cli("evaluate", alone / "deploy.pt", "--quiet") == 1
    err = capsys.readouterr().err
    assert str(alone / "split.json") in err and "--split" in err
    final = json.loads((compressed / "metrics.json").read_text())["final"]
    assert run_cli("evaluate", alone / "deploy.pt", "--split", compressed / "split.json",
                   "--json", "--quiet") == 0
    got = json.loads(capsys.readouterr().out)
    assert got["top1"] == pytest.approx(final["top1"], abs=1e-9)
    assert got["samples"] == final["samples"]
    # a split file of its own: only the first 40 test images of the run's split
    split = json.loads((compressed / "split.json").read_text())
    split["test"] = split["test"][:40]
    (tmp_path / "forty.json").write_text(json.dumps(split))
    assert run_cli("evaluate", alone / "deploy.pt", "--split", tmp_path / "forty.json",
                   "--json", "--quiet") == 0
    assert json.loads(capsys.readouterr().out)["samples"] == 40
    # a checkpoint of other classes than the split lists
    payload = torch.load(alone / "deploy.pt", weights_only=True)
    payload["meta"]["classes"] = [f"c{i}" for i in range(10)]
    torch.save(payload, alone / "other.pt")
    assert run_cli("evaluate", alone / "other.pt", "--split", compressed / "split.json",
                   "--quiet") == 1
    err = capsys.readouterr().err
    assert "other classes" in err and str(alone / "other.pt") in err


def test_json_config_file_and_config_file_errors(tmp_path, capsys):
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"epochs": 1, "lr": 0.02, "arch": "tiny_resnet", "val-ratio": 0.2,
                               "image_size": 12}))
    out = tmp_path / "run"
    assert run_cli("train", *FAST, "--config", cfg, "--lr", "0.03", "--out", out) == 0
    saved = json.loads((out / "config.json").read_text())
    assert (saved["epochs"], saved["lr"], saved["arch"], saved["val_ratio"]) == (
        1, 0.03, "tiny_resnet", 0.2)
    assert saved["image_size"] == 16  # the flag in FAST wins over the file
    metrics = json.loads((out / "metrics.json").read_text())
    split = json.loads((out / "split.json").read_text())
    assert len(metrics["history"]) == 1
    assert metrics["history"][0]["val_samples"] == len(split["val"])
    assert len(split["val"]) == pytest.approx(0.2 * (len(split["val"]) + len(split["train"])),
                                              abs=10)
    capsys.readouterr()
    bad = {"unknown.json": ('{"epochs": 1, "learning_rate": 0.1}', "unknown option(s)"),
           "broken.json": ('{"epochs": 1,', "cannot parse config file"),
           "list.json": ("[1, 2]", "must hold a mapping"),
           "missing.json": (None, "config file not found")}
    for name, (text, message) in bad.items():
        if text is not None:
            (tmp_path / name).write_text(text)
        assert run_cli("train", *FAST, "--config", tmp_path / name,
                       "--out", tmp_path / "never") == 1, name
        err = capsys.readouterr().err.strip()
        assert message in err and str(tmp_path / name) in err, err
        assert len(err.splitlines()) == 1 and err.startswith("bpl: error:")
    assert not (tmp_path / "never").exists()


class _Stop(Exception):
    """Ends a compress run where training would begin."""


def _start_of_training(monkeypatch, baseline: Path, tmp_path: Path, *flags) -> dict:
    """Run `bpl compress` up to its first training step: the pruned model, the student
    that training would start from, its loss terms and hooks."""
    import copy

    import bpl.pipeline.compression as pipeline

    seen: dict = {}
    real_prune = pipeline.prune

    def prune(*args, **kwargs):
        pruned = real_prune(*args, **kwargs)
        seen["pruned"] = copy.deepcopy(pruned).eval()
        return pruned

    def fit(cfg, model, data, run_dir, meta, **kwargs):
        seen.update(student=copy.deepcopy(model).eval(), terms=kwargs["loss_terms"],
                    hooks=kwargs["hooks"], cfg=cfg)
        raise _Stop

    monkeypatch.setattr(pipeline, "prune", prune)
    monkeypatch.setattr(pipeline, "fit_run", fit)
    with pytest.raises(_Stop):
        run_cli("compress", *FAST, "--baseline", baseline / "last.pt", "--flops-reduction",
                "0.6", "--out", tmp_path / "never", *flags)
    monkeypatch.undo()
    return seen


def test_compress_trains_30_epochs_by_default_and_says_so(baseline, tmp_path, monkeypatch, capsys):
    assert _start_of_training(monkeypatch, baseline, tmp_path)["cfg"].epochs == 30
    for command, epochs in (("compress", 30), ("train", 10)):
        with pytest.raises(SystemExit):
            run_cli(command, "--help")
        help_text = " ".join(capsys.readouterr().out.split())
        assert f"at most --max-epochs) (default: {epochs})" in help_text, command


X16 = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(5))


def _rel(a: torch.nn.Module, b: torch.nn.Module) -> float:
    with torch.no_grad():
        ya, yb = a(X16), b(X16)
    return float((ya - yb).abs().max() / ya.abs().max())



def _own(model: nn.Module) -> dict[str, nn.Module]:
    """The model's own modules, its partners' left out."""
    return {n: m for n, m in model.named_modules() if "partner" not in n and "branches" not in n}


def _fresh(model: nn.Module) -> bool:
    """Whether every BN of ``model`` (not of its partners) is as torchvision initialises it
    (scale 1, shift 0, running mean 0 and variance 1): a trained baseline's never are."""
    bns = [m for m in _own(model).values() if isinstance(m, nn.BatchNorm2d)]
    return bool(bns) and all(
        torch.all(m.weight == 1) and torch.all(m.bias == 0) and torch.all(m.running_mean == 0)
        and torch.all(m.running_var == 1) for m in bns)


@pytest.mark.parametrize("soft", [False, True])
def test_from_scratch_trains_the_same_architecture_from_fresh_weights(baseline, tmp_path,
                                                                      monkeypatch, soft):
    flags = ["--soft"] if soft else ["--no-partners"]  # the soft recipe always has partners
    kept = _start_of_training(monkeypatch, baseline, tmp_path, *flags)
    fresh = _start_of_training(monkeypatch, baseline, tmp_path, *flags, "--from-scratch")
    kept, fresh, pruned = kept["student"], fresh["student"], kept.get("pruned")
    # the same architecture (the pruned one, or the full width the soft recipe masks) ...
    assert {k: v.shape for k, v in kept.state_dict().items()} == {
        k: v.shape for k, v in fresh.state_dict().items()}
    # ... which without the flag starts from the trained weights ...
    if not soft:
        assert all(torch.equal(v, pruned.state_dict()[k]) for k, v in kept.state_dict().items())
    assert not _fresh(kept)
    # ... and with it from fresh ones: new conv kernels, BNs as initialised
    assert _fresh(fresh)
    convs = [n for n, m in _own(kept).items() if isinstance(m, nn.Conv2d)]
    assert convs and all(not torch.equal(_own(kept)[n].weight, _own(fresh)[n].weight)
                         for n in convs)

@pytest.mark.parametrize("init, exact", [("preserve", True), ("split", True), ("paper", False)])
def test_init_sets_where_the_partners_start(baseline, tmp_path, monkeypatch, init, exact):
    seen = _start_of_training(monkeypatch, baseline, tmp_path, "--init", init)
    blocks = [b for _, b in bpl.partner_blocks(seen["student"])]
    assert blocks
    # preserve and split start from the pruned model's output; the paper's init changes it
    assert (_rel(seen["pruned"], seen["student"]) <= 1e-5) == exact
    # and each leaves its own mark, so none can stand in for another: preserve's partner
    # starts silent (BN scale 0), split's is a copy of the block at share 1/3 of the scale,
    # the paper's starts at scale 0.5 with the block's halved
    for b in blocks:
        scale = b.partner_bn.weight
        if init == "preserve":
            assert torch.all(scale == 0)
        elif init == "split":
            assert torch.equal(b.partner_conv.weight, b.conv.weight)
            assert torch.allclose(scale * 2, b.bn.weight)  # 1/3 against 2/3
        else:
            assert torch.all(scale == 0.5)
            assert not torch.equal(b.partner_conv.weight, b.conv.weight)



@pytest.mark.parametrize("compare", ["raw", "functional"])
def test_diversity_compare_sets_what_the_term_compares(baseline, tmp_path, monkeypatch, compare):
    import types

    seen = _start_of_training(monkeypatch, baseline, tmp_path, "--partner", "diverse",
                              "--init", "paper", "--diversity-compare", compare)
    student = seen["student"]
    term = float(seen["terms"]["diversity"](types.SimpleNamespace(model=student)).detach())
    want = {c: float(bpl.diversity_loss(student, diversity_compare=c).detach())
            for c in ("raw", "functional")}
    assert term == pytest.approx(want[compare], rel=1e-5)
    assert abs(want["raw"] - want["functional"]) > 1e-4  # so the flag, not the default, chose

def test_granularity_and_weight_set_the_diversity_term(baseline, tmp_path, monkeypatch):
    import types

    import torch.nn.functional as F

    seen = _start_of_training(monkeypatch, baseline, tmp_path, "--granularity", "block",
                              "--diversity-weight", "0.5")
    student = seen["student"]
    # by hand: 0.5 x the sum over partner blocks of (cosine of the two kernels + 1)
    with torch.no_grad():
        want = 0.5 * sum(
            float(F.cosine_similarity(b.conv.weight.flatten(), b.partner_conv.weight.flatten(),
                                      dim=0)) + 1 for _, b in bpl.partner_blocks(student))
    term = seen["terms"]["diversity"](types.SimpleNamespace(model=student)).detach()
    assert term.item() == pytest.approx(want, rel=1e-5)
    per_stage = bpl.diversity_loss(student, diversity_weight=0.5, granularity="stage").detach()
    assert abs(float(per_stage) - want) > 1e-3  # so the flag, not the default, made it
    assert "diversity" not in _start_of_training(monkeypatch, baseline, tmp_path,
                                                 "--diversity-weight", "0")["terms"]


@pytest.mark.parametrize("flags, kwargs", [(["--importance", "fpgm"], {"importance": "fpgm"}),
                                           (["--global-pruning"], {"global_pruning": True})])
def test_pruning_flags_pick_the_channels(baseline, tmp_path, monkeypatch, flags, kwargs):
    base = load_model(baseline / "last.pt")[0]
    example = torch.randn(1, 3, 16, 16)
    # unrounded (--round-to 1): rounding alone spreads the layers' shares on this tiny net
    pruned = _start_of_training(monkeypatch, baseline, tmp_path, *flags, "--round-to", "1")["pruned"]
    default = bpl.prune(base, example, flops_reduction=0.6, round_to=1)
    wanted = bpl.prune(base, example, flops_reduction=0.6, round_to=1, **kwargs)
    state, other, want = pruned.state_dict(), default.state_dict(), wanted.state_dict()
    assert all(torch.equal(state[k], want[k]) for k in want)
    assert set(state) == set(want)
    assert any(state[k].shape != other[k].shape or not torch.equal(state[k], other[k])
               for k in other)
    if "global_pruning" in kwargs:  # layers lose different shares of their channels
        ratios = {name: m.out_channels / base.get_submodule(name).out_channels
                  for name, m in pruned.named_modules() if isinstance(m, torch.nn.Conv2d)}
        uniform = {name: m.out_channels / base.get_submodule(name).out_channels
                   for name, m in default.named_modules() if isinstance(m, torch.nn.Conv2d)}
        assert max(ratios.values()) - min(ratios.values()) > \
            max(uniform.values()) - min(uniform.values()) + 0.1, (ratios, uniform)


def test_diversity_weight_zero_and_no_partners_train_other_models(baseline, compressed,
                                                                  tmp_path):
    common = [*FAST, "--baseline", baseline / "last.pt", "--epochs", "1",
              "--flops-reduction", "0.6"]
    with_partners = torch.load(compressed / "last.pt", weights_only=False)["model"]
    assert with_partners["extended"]
    for flag in ("--diversity-weight=0", "--no-partners"):
        out = tmp_path / flag.strip("-").split("=")[0]
        assert run_cli("compress", *common, flag, "--out", out) == 0
        row = json.loads((out / "metrics.json").read_text())["history"][-1]
        assert "train_diversity" not in row
        assert row["train_loss"] == pytest.approx(row["train_ce"], rel=1e-6)
        last = torch.load(out / "last.pt", weights_only=False)["model"]
        if flag == "--no-partners":
            assert last["extended"] == []
            assert not any("partner" in k for k in last["state_dict"])
            assert any("partner" in k for k in with_partners["state_dict"])
            assert not bpl.partner_blocks(load_model(out / "deploy.pt")[0])
        else:  # the same partners, trained without the diversity term
            assert last["extended"] == with_partners["extended"]
            a, b = last["state_dict"], with_partners["state_dict"]
            assert set(a) == set(b) and not all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("soft", [False, True], ids=["prune-first", "soft"])
def test_compress_resume_matches_an_uninterrupted_run(baseline, tmp_path, monkeypatch, soft):
    import bpl.engine
    from bpl.pruning import SoftPruner

    epochs = 4 if soft else 3
    args = ["compress", *FAST, "--baseline", baseline / "last.pt", "--epochs", epochs,
            "--flops-reduction", "0.6", *(["--soft", "--soft-every", "2"] if soft else [])]
    picked: list[int] = []  # the epochs (0-based) after which the soft masks were re-picked
    real_end = SoftPruner.epoch_end

    def epoch_end(self, epoch):
        if real_end(self, epoch):
            picked.append(epoch)
        return picked[-1:] == [epoch]

    monkeypatch.setattr(SoftPruner, "epoch_end", epoch_end)
    assert run_cli(*args, "--out", tmp_path / "straight") == 0
    if soft:
        assert picked == [1, 3]  # --soft-every 2: after the 2nd and the 4th epoch
    real_epoch = bpl.engine._Trainer.train_epoch

    def stop_at_epoch_3(self, loader, epoch):
        if epoch == 2:
            raise KeyboardInterrupt
        return real_epoch(self, loader, epoch)

    cut = tmp_path / "cut"
    with monkeypatch.context() as m:
        m.setattr(bpl.engine._Trainer, "train_epoch", stop_at_epoch_3)
        assert run_cli(*args, "--out", cut) == 130
    before = torch.load(cut / "last.pt", weights_only=False)
    assert before["epoch"] == 2 and not (cut / "metrics.json").exists()
    picked.clear()
    assert run_cli(*args, "--out", cut, "--resume") == 0
    if soft:
        assert picked == [3]
    straight = json.loads((tmp_path / "straight" / "metrics.json").read_text())
    resumed = json.loads((cut / "metrics.json").read_text())
    assert resumed["history"][:2] == before["history"] and resumed["segments"] == 2
    for key in ("val_top1", "val_loss", "train_loss"):
        assert [h[key] for h in resumed["history"]] == [h[key] for h in straight["history"]]
    assert resumed["final"] == straight["final"]
    for name in ("last.pt", "deploy.pt"):
        a = torch.load(tmp_path / "straight" / name, weights_only=False)
        b = torch.load(cut / name, weights_only=False)
        a, b = a.get("model", a), b.get("model", b)
        assert set(a["state_dict"]) == set(b["state_dict"])
        assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    if soft:  # the pruner's masks and schedule went on where they were
        a = torch.load(tmp_path / "straight" / "last.pt", weights_only=False)["hooks"][0]
        b = torch.load(cut / "last.pt", weights_only=False)["hooks"][0]
        assert a["updates"] == b["updates"] == 2 and a["masks"].keys() == b["masks"].keys()
        assert all(torch.equal(a["masks"][k], b["masks"][k]) for k in a["masks"])


@pytest.mark.skipif(not shutil.which("g++") and not shutil.which("c++"),
                    reason="torch.compile on the CPU needs a C++ compiler")
def test_compress_with_compile_trains_like_eager(baseline, compressed, tmp_path):
    """--compile: one epoch of a tiny model under torch.compile (the diversity loss on the
    compiled model's partners), the same losses as the eager run, a checkpoint with the
    model's own keys and an exact fusion."""
    out = tmp_path / "compiled"
    rc = run_cli("compress", *FAST, "--baseline", baseline / "last.pt", "--epochs", "1",
                 "--flops-reduction", "0.6", "--out", out, "--compile")
    assert rc == 0
    assert json.loads((out / "config.json").read_text())["compile"] is True
    eager = json.loads((compressed / "metrics.json").read_text())["history"][0]
    got = json.loads((out / "metrics.json").read_text())
    row = got["history"][0]
    assert row["train_diversity"] == pytest.approx(eager["train_diversity"], rel=1e-3)
    assert row["train_loss"] == pytest.approx(eager["train_loss"], rel=1e-3)
    assert got["fusion_error"] < 1e-4
    keys = torch.load(out / "last.pt", weights_only=False)["model"]["state_dict"]
    assert not any("_orig_mod" in k for k in keys)
