"""benchmarks/selection_check.py on the bundled digits: it watches real bpl runs as they
train, scores the pool, resumes, and replays the rules."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from benchmark_scripts import load_benchmark

FAST = ["--data", "digits", "--arch", "tiny_resnet", "--image-size", "16", "--batch-size", "64",
        "--device", "cpu", "--no-latency", "--train-subset", "0.5", "--seed", "0", "--quiet"]


def _start(*args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "bpl", *map(str, args)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def test_the_watcher_scores_the_runs_as_they_train_and_the_report_replays_the_rules(tmp_path):
    check = load_benchmark("selection_check")
    seed = tmp_path / "runs" / "digits" / "seed0"
    cache = str(tmp_path / "cache")
    base = _start("train", *FAST, "--epochs", "8", "--lr", "0.1", "--out", seed / "base")
    assert check.watch(seed, ["base"], size=150, cache_dir=cache, interval=0.02,
                       timeout=300) == 0
    assert base.wait(60) == 0, base.stderr.read()
    cut = _start("compress", *FAST, "--baseline", seed / "base" / "best.pt", "--epochs", "6",
                 "--flops-reduction", "0.5", "--no-partners", "--out", seed / "cut50")
    assert check.watch(seed, ["base", "cut50"], size=150, cache_dir=cache, interval=0.02,
                       timeout=300) == 0
    assert cut.wait(60) == 0, cut.stderr.read()

    # the pool: training images the subset left out, none of the run's train, val or test
    pool_split = json.loads((seed / "pool_check" / "pool_split.json").read_text())
    split = json.loads((seed / "base" / "split.json").read_text())
    pool = {r[0] for r in pool_split["test"]}
    assert 100 <= len(pool) <= 160
    assert not pool & {r[0] for r in split["train"] + split["val"] + split["test"]}
    # every annealed epoch was scored or is listed as missed; the last one always is, and
    # best.pt's score is that model's pool top-1
    scorer = check.Pool(seed, "base", 150, cache)
    from bpl import load_model

    for name in ("base", "cut50"):
        saved = json.loads((seed / "pool_check" / f"{name}.json").read_text())
        history = json.loads((seed / name / "metrics.json").read_text())["history"]
        peak = max(row["lr"] for row in history)
        wanted = check.needed(history, peak)
        assert len(wanted) == 2 and len(history) in wanted  # the last two epochs
        assert {int(e) for e in saved["pool"]} | set(saved["missed"]) == wanted
        assert str(len(history)) in saved["pool"]
        kept = json.loads((seed / name / "metrics.json").read_text())["selected"]["epoch"]
        assert saved["best"]["epoch"] == kept
        assert saved["best"]["pool_top1"] == scorer.top1(load_model(seed / name / "best.pt")[0])

    # a watcher started after the fact scores what is still on disk and lists the rest
    (seed / "pool_check" / "base.json").unlink()
    assert check.watch(seed, ["base", "cut50"], size=150, cache_dir=cache, interval=0.0,
                       timeout=60) == 0
    again = json.loads((seed / "pool_check" / "base.json").read_text())
    assert set(again["pool"]) == {"8"} and set(again["missed"]) == wanted_base(check, seed) - {8}

    out = tmp_path / "results"
    assert check.main(["--report", "--out-root", str(tmp_path / "runs"), "--results",
                       str(out)]) == 0
    text = (out / "summary.md").read_text()
    assert f"Seeds: digits seed0; pool {len(pool)} images" in text
    for rule in ("best", "last"):
        assert f"| base | {rule} | 1 |" in text and f"| cut50 | {rule} | 1 |" in text
    assert "| digits seed0 | cut50 | last |" in text
    # the seed's record is kept with the results: a new checkout without runs/ reports it still
    assert json.loads((out / "records" / "digits-seed0.json").read_text())["seed"] == "digits seed0"
    shutil.rmtree(tmp_path / "runs")
    (tmp_path / "runs").mkdir()
    assert check.main(["--report", "--out-root", str(tmp_path / "runs"), "--results",
                       str(out)]) == 0
    assert (out / "summary.md").read_text() == text
    with pytest.raises(SystemExit, match="holds no record"):
        check.report(tmp_path / "runs", tmp_path / "nothing")


def wanted_base(check, seed) -> set[int]:
    history = json.loads((seed / "base" / "metrics.json").read_text())["history"]
    return check.needed(history, max(row["lr"] for row in history))


def test_the_rules_replay_what_they_keep_and_say_what_was_not_scored():
    check = load_benchmark("selection_check")
    curves = {"lr": [0.1, 0.05, 0.005, 0.001], "val_top1": [70.0, 95.0, 88.0, 90.0],
              "pool": {2: 80.0, 3: 86.0, 4: 87.0}}
    assert check.choose(curves, "best") == (2, 95.0, 80.0)
    assert check.choose(curves, "annealed") == (4, 90.0, 87.0)
    assert check.choose(curves, "last") == (4, 90.0, 87.0)
    assert check.choose(curves, "tail mean") == (4, 89.0, 86.5)
    del curves["pool"][3]  # a missed epoch: the rules that need it have no pool score
    assert check.choose(curves, "tail mean") == (4, 89.0, None)
    assert check.choose(curves, "annealed") == (4, 90.0, 87.0)
    assert check.needed([{"lr": lr} for lr in curves["lr"]], 0.1) == {3, 4}
    # a cycle's last epoch records the next cycle's peak (the rate after its last step),
    # though it trained at the lowest rates: it is scored as well
    restart = [0.1, 0.05, 0.004, 0.0005, 0.1, 0.09]
    assert check.needed([{"lr": lr} for lr in restart], 0.1) == {3, 4, 5}
    # a short cycle whose last epoch began above the threshold: its last step's rate says
    short = [{"lr": 0.05, "lr_last": 0.06}, {"lr": 0.1, "lr_last": 0.002}]
    assert check.needed(short, 0.1) == {2}
    cycle = {"lr": restart[:5], "val_top1": [50.0, 60.0, 70.0, 80.0, 90.0],
             "pool": {3: 66.0, 4: 76.0, 5: 86.0}}
    assert check.choose(cycle, "tail mean") == (5, 80.0, 76.0)  # epochs 3-5, the cycle's end
    assert check.choose(cycle, "last") == (5, 90.0, 86.0)
    # with the rate each epoch's last step used (bpl 0.3 on) the engine's rule decides
    cycle["lr_last"] = [0.1, 0.06, 0.008, 0.0006, 0.0001]
    assert check.choose(cycle, "tail mean") == (5, 80.0, 76.0)  # epochs 3-5 again
    assert check.choose(cycle, "annealed") == (5, 90.0, 86.0)
    cycle["lr_last"][2] = 0.02  # epoch 3 ended above the threshold: the tail is 4-5
    assert check.choose(cycle, "tail mean") == (5, 85.0, 81.0)
    # bpl's --max-drop rule: the annealed stretch around the best (kept) epoch; two cycles,
    # the best epoch in the first one's tail: that stretch, not the run's last
    two = {"lr": [0.1, 0.005, 0.1, 0.05, 0.005], "lr_last": [0.1, 0.008, 0.0004, 0.06, 0.008],
           "val_top1": [50.0, 93.0, 91.0, 80.0, 85.0], "pool": {2: 88.0, 3: 90.0, 5: 89.0}}
    assert check.choose(two, "stretch") == (2, 92.0, 89.0)  # epochs 2-3
    assert check.choose(two, "tail mean") == (5, 85.0, 89.0)  # the run's last stretch
    del two["pool"][3]
    assert check.choose(two, "stretch") == (2, 92.0, None)


def test_a_watch_scores_each_annealed_epoch_it_sees_and_lists_those_it_missed(tmp_path):
    """Watch.poll on checkpoints written by hand, one epoch at a time (no timing involved)."""
    import torch

    from bpl import save_model
    from bpl.data import load_dataset
    from bpl.files import atomic_save
    from bpl.models import build_model, model_payload

    check = load_benchmark("selection_check")
    seed, run = tmp_path / "seed0", tmp_path / "seed0" / "r"
    run.mkdir(parents=True)
    data = load_dataset("digits", None, image_size=16, seed=0, train_subset=0.5)
    (run / "config.json").write_text(json.dumps(
        {"data": "digits", "data_root": None, "image_size": 16, "seed": 0, "lr": 0.1}))
    (run / "split.json").write_text(json.dumps(data.split))
    pool = check.Pool(seed, "r", 100, str(tmp_path / "cache"))
    lrs = [0.1] * 6 + [0.005] * 4  # epochs 7-10 annealed
    models = {}

    def write(epoch: int) -> None:
        torch.manual_seed(epoch)
        models[epoch] = build_model("tiny_resnet", 10).eval()
        atomic_save({"model": model_payload(models[epoch], "tiny_resnet", 10, {}), "epoch": epoch,
                     "history": [{"lr": lr} for lr in lrs[:epoch]], "config": {"lr": 0.1}},
                    run / "last.pt")

    watch = check.Watch(seed, "r")
    for epoch, scored in ((6, set()), (7, {7}), (8, {7, 8}), (10, {7, 8, 10})):
        write(epoch)
        assert watch.poll(pool)
        assert set(watch.pool) == scored and not watch.done
    assert watch.missed == {9} and watch.seen == 10  # last.pt went from epoch 8 to 10
    assert watch.pool[8] == pool.top1(models[8])
    assert not watch.poll(pool)  # nothing new
    again = check.Watch(seed, "r")  # a watcher started again goes on from its file
    assert (again.pool, again.missed, again.seen) == (watch.pool, {9}, 10)
    save_model(models[8], run / "best.pt", arch="tiny_resnet", num_classes=10)
    (run / "metrics.json").write_text(json.dumps({"selected": {"epoch": 8}}))
    assert again.poll(pool) and again.done
    assert again.best == {"epoch": 8, "pool_top1": watch.pool[8]}
    assert not again.poll(pool)


def test_the_watcher_needs_a_seed_folder_or_report(capsys):
    check = load_benchmark("selection_check")
    with pytest.raises(SystemExit):
        check.main([])
    assert "--watch SEED_DIR" in capsys.readouterr().err


def test_the_pool_split_records_what_it_leaves_out_so_loading_it_reports_nothing_added(
        tmp_path, caplog):
    import logging

    import numpy as np
    from PIL import Image

    from bpl.data import draw_split, load_dataset

    check = load_benchmark("selection_check")
    root = tmp_path / "images"
    rng = np.random.default_rng(0)
    for k in range(3):
        (root / f"c{k}").mkdir(parents=True)
        for i in range(30):
            Image.fromarray(rng.integers(0, 255, (20, 20, 3)).astype(np.uint8)).save(
                root / f"c{k}" / f"{i}.png")
    split = draw_split("imagefolder", root, seed=0, val_ratio=0.1, train_subset=0.3)
    made = check.pool_split(split, "imagefolder", str(root), 16, 0, 12)
    assert made["train"] == split["train"] and made["val"] == split["val"]
    pool = {rel for rel, _ in made["test"]}
    assert 9 <= len(pool) <= 15 and not pool & {rel for rel, _ in split["train"] + split["val"]}
    assert not pool & {rel for rel, _ in split["test"]}  # training images, not the test split
    listed = len(made["train"]) + len(made["val"]) + len(made["test"])
    assert made["left_out"]["count"] == 90 - listed

    def added_said(split_file_content) -> list[str]:
        path = tmp_path / "pool.json"
        path.write_text(json.dumps(split_file_content))
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="bpl"):
            data = load_dataset("imagefolder", root, image_size=16, split_file=path,
                                cache="off", progress=False)
        assert {rel for rel, _ in data.split["test"]} == pool
        return [r.getMessage() for r in caplog.records if "split file" in r.getMessage()]

    assert added_said(made) == []
    # the pool file as it was written before: the run's record of what its subset left out,
    # which no longer matches, so loading it said images had been added to the folder
    assert any("were added after" in m for m in added_said({**split, "test": made["test"]}))


def test_the_report_sums_up_each_rules_judgment_error_over_the_cuts(tmp_path):
    """judged drop minus pool drop, per rule: the number that decides a --max-drop reference."""
    check = load_benchmark("selection_check")
    folder = tmp_path / "results" / "records"
    folder.mkdir(parents=True)
    none = [None, None, None]
    for seed, (cut_a, cut_b) in enumerate((((90.0, 88.0), (91.0, 88.5)),
                                          ((89.0, 87.0), (90.0, 88.0)))):
        picks = {"base": {"best": [5, 93.0, 89.0], "annealed": [5, 92.0, 89.0],
                          "last": [8, 91.0, 89.5], "tail mean": none},
                 "cut": {"best": [3, cut_a[0], cut_a[1]], "annealed": [3, cut_b[0], cut_b[1]],
                         "last": [6, 90.0, 88.0], "tail mean": none}}
        (folder / f"d-seed{seed}.json").write_text(json.dumps(
            {"seed": f"d seed{seed}", "runs": ["base", "cut"], "picks": picks,
             "pool_images": 100}))
    text = check.report(tmp_path / "runs", tmp_path / "results")
    # best: judged 3.0 / 4.0 against pool 1.0 / 2.0 -> +2.00 both; annealed: 1.0 / 2.0
    # against 0.5 / 1.0 -> +0.50, +1.00; last: 1.0 / 1.0 against 1.5 / 1.5 -> -0.50 both
    assert "| best | 2 | +2.00 | +2.00 | +2.00 | 2.00 |" in text
    assert "| annealed | 2 | +0.75 | +0.50 | +1.00 | 0.75 |" in text
    assert "| last | 2 | -0.50 | -0.50 | -0.50 | 0.50 |" in text
    assert "| tail mean |" not in text.split("judgment error")[1]
