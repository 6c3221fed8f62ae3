"""benchmarks/reproduce_ucm.py end to end on a tiny generated image folder (no ../shared)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from benchmark_scripts import load_benchmark

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "reproduce_ucm.py"


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: one thread is faster, and immune to other jobs on the same cores
    (two threads of a 16 px tiny_resnet measured 400x slower while the cores were busy)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _load_script():
    return load_benchmark("reproduce_ucm")


def _image_folder(root: Path, classes: int = 3, per_class: int = 8, size: int = 20) -> Path:
    """Class k: noisy images tinted towards colour k, so the classes are learnable."""
    rng = np.random.default_rng(0)
    for k in range(classes):
        folder = root / f"class{k}"
        folder.mkdir(parents=True)
        for i in range(per_class):
            img = rng.integers(0, 90, (size, size, 3))
            img[..., k % 3] += 160
            Image.fromarray(img.astype(np.uint8)).save(folder / f"{i}.png")
    return root


def test_reproduce_runs_aggregates_and_skips_finished_runs(tmp_path):
    reproduce = _load_script()
    data = _image_folder(tmp_path / "images")
    out = tmp_path / "out"
    config = tmp_path / "tiny.yaml"
    config.write_text(
        "arch: tiny_resnet\nimage_size: 16\nbaseline_epochs: 1\nfinetune_epochs: 1\n"
        "flops_reduction: 0.5\n"
        "common: {batch_size: 8, device: cpu, workers: 0, lr: 0.05}\n"
    )
    argv = ["--config", str(config), "--data", "imagefolder", "--data-root", str(data),
            "--out", str(out), "--seeds", "0", "--arms", "B", "C", "E", "F", "--quiet"]

    assert reproduce.main(argv) == 0

    results = json.loads((out / "results.json").read_text())
    # A is run as well: B, C and E start from the seed's baseline.
    assert [(r["seed"], r["arm"]) for r in results["runs"]] == [(0, "A"), (0, "B"), (0, "C"),
                                                               (0, "E"), (0, "F")]
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [r["arm"] for r in rows] == ["A", "B", "C", "E", "F"]
    for row in results["runs"]:
        assert 0.0 <= row["top1"] <= 100.0 and row["macs"] > 0 and row["params"] > 0
        assert row["epochs"] == 1 and row["wall_time_s"] > 0 and row["device"] == "cpu"
        assert row["test_images"] == 6  # 3 classes x 8 images, 20% held out per class
    by_arm = {r["arm"]: r for r in results["runs"]}
    assert by_arm["A"]["macs_reduction"] == 0.0
    # Latency: every deployed model re-timed in one interleaved pass; the run's own kept.
    for row in results["runs"]:
        assert row["latency_ms"] > 0 and row["latency_in_run_ms"] > 0
        assert row["speedup"] == pytest.approx(by_arm["A"]["latency_ms"] / row["latency_ms"])
    assert by_arm["A"]["speedup"] == 1.0
    for arm in "BCEF":
        assert by_arm[arm]["macs"] < by_arm["A"]["macs"]
        assert abs(by_arm[arm]["macs_reduction"] - 0.5) < 0.05
    # the exactness each run measured, carried over as it was (and within bpl's bound)
    for arm, key in (("C", "fusion_error"), ("F", "fusion_error"), ("E", "removal_error")):
        measured = json.loads((out / "seed0" / arm / "metrics.json").read_text())[key]
        assert by_arm[arm][key] == measured and 0 <= measured <= 1e-5, (arm, key)
    # Partner statistics from the unfused last.pt of every arm with partners, only those.
    for arm in "CEF":
        assert by_arm[arm]["partner_norm_ratio"] > 0 and -1 <= by_arm[arm]["partner_kernel_cos"] <= 1
    assert "partner_norm_ratio" not in by_arm["B"] and rows[1]["partner_norm_ratio"] == ""
    # ... kept beside each run, written when the run finished.
    for arm in "CEF":
        saved = json.loads((out / "seed0" / arm / "partner_stats.json").read_text())
        assert saved["partner_norm_ratio"] == by_arm[arm]["partner_norm_ratio"]
    assert not (out / "seed0" / "B" / "partner_stats.json").exists()
    inits = {arm: json.loads((out / "seed0" / arm / "config.json").read_text())["init"]
             for arm in "CF"}
    assert inits == {"C": "preserve", "F": "paper"}
    # Every compress arm evaluated on the baseline's test images.
    split_a = json.loads((out / "seed0" / "A" / "split.json").read_text())["test"]
    for arm in "BCEF":
        assert json.loads((out / "seed0" / arm / "split.json").read_text())["test"] == split_a
    summary = (out / "summary.md").read_text()
    for arm in "ABCEF":
        assert f"| {arm} |" in summary
    assert "| C-B |" in summary and "| F-C |" in summary
    assert "kernel cosine" in summary
    assert (out / "accuracy_vs_macs.png").stat().st_size > 0
    assert (out / "seed0" / "C" / "run.log").read_text().count("epoch 1/1") == 1

    # Re-running skips every finished run: their metrics.json files are not rewritten.
    mtimes = {p: p.stat().st_mtime_ns for p in out.glob("seed0/*/metrics.json")}
    assert len(mtimes) == 5
    assert reproduce.main(argv) == 0
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes
    again = json.loads((out / "results.json").read_text())
    assert [r["top1"] for r in again["runs"]] == [r["top1"] for r in results["runs"]]
    assert "finished earlier, skipped" in (out / "reproduce.log").read_text()

    # Checkpoints deleted to save space: the runs stay in the results, only their latency
    # (and, for partner arms, nothing else: the statistics were kept) goes missing.
    (out / "seed0" / "B" / "deploy.pt").unlink()
    for arm in "CEF":
        (out / "seed0" / arm / "last.pt").unlink()
    assert reproduce.main(argv) == 0
    pruned = {r["arm"]: r for r in json.loads((out / "results.json").read_text())["runs"]}
    assert pruned["B"]["latency_ms"] is None and pruned["B"]["speedup"] is None
    assert pruned["C"]["latency_ms"] > 0
    assert pruned["C"]["partner_norm_ratio"] == by_arm["C"]["partner_norm_ratio"]
    assert "seed 0 arm B is left out of the latency pass" in (out / "reproduce.log").read_text()


def test_cut_off_run_resumes_and_other_settings_are_refused(tmp_path):
    reproduce = _load_script()
    data = _image_folder(tmp_path / "images", classes=2, per_class=6)
    out = tmp_path / "out"
    base = ["--config", "none", "--data", "imagefolder", "--data-root", str(data),
            "--out", str(out), "--arch", "tiny_resnet", "--image-size", "16",
            "--seeds", "0", "--arms", "A", "--baseline-epochs", "1", "--quiet"]
    assert reproduce.main(base) == 0
    # Simulate a run cut off after its last epoch: last.pt is there, metrics.json is not.
    (out / "seed0" / "A" / "metrics.json").unlink()
    assert reproduce.main(base) == 0
    assert "resuming" in (out / "reproduce.log").read_text()
    assert (out / "seed0" / "A" / "metrics.json").exists()
    # A finished run made with other settings is never mixed into the results.
    assert reproduce.main([*base[:-3], "--baseline-epochs", "2", "--quiet"]) == 1


def test_shipped_configs_resolve_to_valid_runs(capsys):
    """The CPU protocol and the paper's GPU recipe resolve into bpl Configs (nothing runs)."""
    reproduce = _load_script()
    configs = SCRIPT.parent / "configs"
    assert reproduce.main(["--config", str(configs / "ucm_cpu.yaml"), "--dry-run"]) == 0
    cpu = json.loads(capsys.readouterr().out)
    assert len(cpu["runs"]) == 18  # 3 seeds x 6 arms
    # The same protocol on a GPU: only the execution settings change.
    assert reproduce.main(["--config", str(configs / "ucm_cpu.yaml"), "--seeds", "2",
                           "--device", "cuda", "--workers", "6", "--dry-run"]) == 0
    gpu = json.loads(capsys.readouterr().out)
    assert gpu["settings"]["common"]["device"] == "cuda" and len(gpu["runs"]) == 6
    assert {r["config"]["workers"] for r in gpu["runs"]} == {6}
    epochs = {r["arm"]: r["config"]["epochs"] for r in cpu["runs"]}
    assert len({epochs[a] for a in "BCDEF"}) == 1  # the same fine-tuning length in every arm
    assert reproduce.main(["--config", str(configs / "paper_gpu.yaml"), "--dry-run"]) == 0
    gpu = {r["arm"]: r["config"] for r in json.loads(capsys.readouterr().out)["runs"]}
    assert gpu["A"]["pretrained"] and gpu["A"]["arch"] == "resnet50"
    assert gpu["C"]["lr"] == 1e-3 and gpu["C"]["schedule"] == "step"
    assert gpu["D"]["diversity_weight"] == 0.0 and gpu["E"]["soft"]
    assert gpu["F"]["init"] == "paper" and gpu["C"]["init"] == "preserve"


def test_summary_names_the_devices_when_runs_come_from_several():
    reproduce = _load_script()
    rows = [{"seed": seed, "arm": arm, "top1": 80.0 + seed, "device": device}
            for seed, device in ((0, "cpu"), (1, "cuda")) for arm in "AB"]
    summary = reproduce.summarize(rows)
    assert summary["trained_on"] == {"cpu": ["0A", "0B"], "cuda": ["1A", "1B"]}
    settings = {"arch": "resnet18", "data": "ucm", "image_size": 96, "seeds": [0, 1],
                "baseline_epochs": 2, "finetune_epochs": 1, "flops_reduction": 0.5}
    text = reproduce.summary_markdown(settings, summary, 60.0, 60.0)
    assert "Trained on more than one device (runs as seed+arm): cpu: 0A, 0B; cuda: 1A, 1B." in text
    assert text.index("Trained on") < text.index("| arm |")
    single = reproduce.summarize([r for r in rows if r["device"] == "cpu"])
    assert "Trained on" not in reproduce.summary_markdown(settings, single, 60.0, 60.0)
