"""benchmarks/selection_check.py end to end on the bundled digits: curves, resume, report."""

from __future__ import annotations

import json

from benchmark_scripts import load_benchmark


def test_selection_check_records_pool_curves_resumes_and_replays_the_rules(tmp_path):
    check = load_benchmark("selection_check")
    root = tmp_path / "runs"
    args = ["--data", "digits", "--arch", "tiny_resnet", "--image-size", "16", "--seed", "0",
            "--out-root", str(root), "--cache-dir", str(tmp_path / "cache"), "--pool", "200",
            "--cycle-epochs", "2", "--max-epochs", "4", "--recovery-epochs", "2",
            "--levels", "0.5"]
    assert check.main(args) == 0
    seed = root / "seed0"
    result = json.loads((seed / "result.json").read_text())
    assert result["pool_images"] >= 150 and result["val_images"] > 0
    pool = {r[0] for r in json.loads((seed / "pool_split.json").read_text())["test"]}
    split = json.loads((seed / "split.json").read_text())
    assert not pool & {r[0] for r in split["train"] + split["val"] + split["test"]}
    for name in ("baseline", "cut50"):
        curves = result["curves"][name]
        assert len(curves["pool_top1"]) == len(curves["val_top1"]) == len(curves["lr"]) > 0
    assert len(result["curves"]["cut50"]["lr"]) == 2
    # cut off after its last epoch, before its curves were written: resumed, not retrained
    (seed / "cut50" / "curves.json").unlink()
    assert check.main(args) == 0
    again = json.loads((seed / "result.json").read_text())
    assert again["curves"]["cut50"] == result["curves"]["cut50"]
    out = tmp_path / "results"
    assert check.main(["--report", "--out-root", str(root), "--results", str(out)]) == 0
    text = (out / "summary.md").read_text()
    for rule in check.RULES:
        assert f"| baseline | {rule} |" in text or rule == "tail mean"
    assert "| 0 | cut50 | annealed |" in text


def test_the_rules_replay_what_they_keep():
    check = load_benchmark("selection_check")
    curves = {"lr": [0.1, 0.05, 0.005, 0.001], "val_top1": [70.0, 95.0, 88.0, 90.0],
              "pool_top1": [60.0, 80.0, 86.0, 87.0]}
    assert check.choose(curves, "best") == (2, 95.0, 80.0)
    assert check.choose(curves, "annealed") == (4, 90.0, 87.0)
    assert check.choose(curves, "last") == (4, 90.0, 87.0)
    assert check.choose(curves, "tail mean") == (4, 89.0, 86.5)
