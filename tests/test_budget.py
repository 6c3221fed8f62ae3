"""The smallest model within an accuracy budget: bpl.prune_within and bpl compress --max-drop."""

from __future__ import annotations

import json
import math

import pytest
import torch

import bpl
from bpl.cli import main
from bpl.config import resolve_config
from bpl.errors import BPLError, InvalidArgumentError
from bpl.models import build_model, load_model
from bpl.pruning import BudgetStep, deploy_macs


def tiny_resnet():
    return build_model("tiny_resnet", 10)



FAST = ["--data", "digits", "--image-size", "16", "--batch-size", "64", "--quiet", "--no-latency"]


def _search(model, x, *, max_drop, done=(), calls=None, full=None, **kw):
    """A search whose 'recovery' does nothing and whose score falls 10 points per 10% of
    MACs removed: the outcome of every budget is known in advance."""
    full = full or deploy_macs(model, x)
    calls = [] if calls is None else calls

    def recover(pruned, step):
        calls.append(step)
        return pruned

    def score(m):
        return 100.0 - 100.0 * (1 - deploy_macs(m, x) / full)

    return bpl.prune_within(model, x, max_drop=max_drop, recover=recover, score=score,
                            done=done, round_to=None, **kw), calls


def test_prune_within_keeps_the_last_step_within_the_budget():
    torch.manual_seed(0)
    model, x = tiny_resnet(), torch.randn(1, 3, 16, 16)
    full = deploy_macs(model, x)
    seen = []
    result, calls = _search(model, x, max_drop=80.0, levels=(0.5, 0.74, 0.85),
                            on_step=lambda step, m: seen.append(step.step))
    # 50% costs ~50 points (within 80), 74% ~74 (within), 85% ~85 (beyond): step 2 is kept
    assert [s.within for s in result.steps] == [True, True, False] and calls == seen == [1, 2, 3]
    assert result.chosen.step == 2 and "beyond the budget" in result.stopped
    assert 1 - deploy_macs(result.model, x) / full == pytest.approx(result.steps[1].macs_reduction)
    assert result.steps[1].macs_reduction == pytest.approx(0.74, abs=0.02)
    # every level within the budget: the last one is kept
    wide, _ = _search(model, x, max_drop=99.0, levels=(0.5, 0.74))
    assert wide.chosen.step == 2 and "reached within the budget" in wide.stopped
    # not even the first step: no model
    tight, _ = _search(model, x, max_drop=1.0, levels=(0.5,))
    assert tight.model is None and tight.chosen is None


def test_step_levels_keep_the_same_share_of_the_macs_at_every_cut():
    levels = bpl.step_levels(0.9, 4)
    kept = [1 - v for v in levels]
    assert levels[-1] == pytest.approx(0.9)
    assert [b / a for a, b in zip([1.0, *kept], kept, strict=False)] == pytest.approx(
        [0.1 ** 0.25] * 4)
    assert bpl.step_levels(0.5, 1) == pytest.approx([0.5])
    for bad in ((0.9, 0), (0.9, 1.5), (1.0, 2), (0.0, 2)):
        with pytest.raises(InvalidArgumentError):
            bpl.step_levels(*bad)


def test_prune_within_without_a_budget_takes_every_step():
    """Iterative pruning to a fixed cut: max_drop inf keeps the last step, however it scores."""
    torch.manual_seed(0)
    model, x = tiny_resnet(), torch.randn(1, 3, 16, 16)
    full = deploy_macs(model, x)
    result, calls = _search(model, x, max_drop=math.inf, levels=bpl.step_levels(0.85, 3))
    assert calls == [1, 2, 3] and all(s.within for s in result.steps)
    assert result.chosen.step == 3 and "reached" in result.stopped
    assert "budget" not in result.stopped and result.to_dict()["max_drop"] is None
    assert 1 - deploy_macs(result.model, x) / full == pytest.approx(0.85, abs=0.02)
    # a NaN score (no validation split) does not end it either
    nan = bpl.prune_within(model, x, max_drop=math.inf, recover=lambda m, k: m,
                           score=lambda m: math.nan, levels=(0.5, 0.74), round_to=None)
    assert nan.chosen.step == 2


def test_prune_within_continues_a_search_from_its_finished_steps():
    torch.manual_seed(0)
    model, x = tiny_resnet(), torch.randn(1, 3, 16, 16)
    straight, _ = _search(model, x, max_drop=80.0, levels=(0.5, 0.74, 0.85))
    first, _ = _search(model, x, max_drop=80.0, levels=(0.5,))
    resumed, calls = _search(first.model, x, max_drop=80.0, levels=(0.5, 0.74, 0.85),
                             done=first.steps, reference=first.reference,
                             full=deploy_macs(model, x))
    assert calls == [2, 3]  # step 1 is not run again
    assert [s.within for s in resumed.steps] == [s.within for s in straight.steps]
    assert [s.macs_reduction for s in resumed.steps] == pytest.approx(
        [s.macs_reduction for s in straight.steps])
    # a finished search (its last step beyond the budget) runs nothing more
    over, calls = _search(straight.model, x, max_drop=80.0, levels=(0.5, 0.74, 0.85),
                          done=straight.steps, reference=straight.reference)
    assert calls == [] and over.model is straight.model and over.chosen.step == 2
    with pytest.raises(InvalidArgumentError, match="levels must rise"):
        _search(model, x, max_drop=1.0, levels=(0.7, 0.5))
    with pytest.raises(InvalidArgumentError, match="max_drop"):
        _search(model, x, max_drop=-1.0)
    with pytest.raises(InvalidArgumentError, match="reference"):
        _search(model, x, max_drop=1.0, done=[BudgetStep(1, 0.5, 0.5, 50.0, True)])


def test_max_drop_is_an_alternative_to_flops_reduction():
    assert resolve_config(overrides={"max_drop": 1.0}).flops_reduction is None
    with pytest.raises(BPLError, match="give one target"):
        resolve_config(overrides={"max_drop": 1.0, "flops_reduction": 0.5})
    with pytest.raises(BPLError, match="cannot run the soft schedule"):
        resolve_config(overrides={"max_drop": 1.0, "soft": True})
    with pytest.raises(BPLError, match="--val-ratio above 0"):
        resolve_config(overrides={"max_drop": 1.0, "val_ratio": 0.0})
    with pytest.raises(BPLError, match="from 0 to 100"):
        resolve_config(overrides={"max_drop": -2.0})


def test_prune_steps_is_for_a_fixed_cut():
    assert resolve_config(overrides={"flops_reduction": 0.9, "prune_steps": 3}).prune_steps == 3
    assert resolve_config().prune_steps == 1  # one-shot by default
    with pytest.raises(BPLError, match="only with a fixed --flops-reduction"):
        resolve_config(overrides={"max_drop": 1.0, "prune_steps": 3})
    with pytest.raises(BPLError, match="--prune-steps cuts in hard steps .* --soft"):
        resolve_config(overrides={"flops_reduction": 0.9, "prune_steps": 3, "soft": True})
    for bad in (0, 1.5, True):
        with pytest.raises(BPLError, match="--prune-steps must be a whole number"):
            resolve_config(overrides={"flops_reduction": 0.9, "prune_steps": bad})


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "base"
    assert main(["train", *FAST, "--arch", "tiny_resnet", "--epochs", "3", "--lr", "0.1",
                 "--out", str(out)]) == 0
    return out / "best.pt"


def test_compress_max_drop_keeps_every_step_and_resumes(baseline, tmp_path, capsys):
    out = tmp_path / "search"
    # a wide budget: the first step is within it whatever one epoch of recovery gives (the
    # library test above covers stopping at a miss deterministically)
    args = ["compress", *FAST, "--baseline", str(baseline), "--max-drop", "30", "--epochs", "2",
            "--out", str(out)]
    assert main(args) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    budget = metrics["budget"]
    steps = budget["steps"]
    kept = budget["chosen_step"]
    assert metrics["images"]["mode"] == "bundled"
    assert kept >= 1 and all(s["within"] for s in steps[:kept])
    assert len(steps) == kept or not steps[kept]["within"]  # it stopped at the first miss
    assert [s["step"] for s in steps] == list(range(1, len(steps) + 1))
    macs = [s["macs_reduction"] for s in steps]
    assert macs == sorted(macs) and macs[0] == pytest.approx(0.5, abs=0.02)
    for s in steps:  # every step is a deployable model, fused (partners by default) and checked
        assert (out / "steps" / str(s["step"]) / "deploy.pt").exists()
        assert s["fusion_error"] < 1e-4
    # the run's deploy.pt is the kept step's model; the test split was evaluated on it once
    a, _ = load_model(out / "deploy.pt")
    b, _ = load_model(out / "steps" / str(kept) / "deploy.pt")
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    assert metrics["macs_reduction"] == pytest.approx(steps[kept - 1]["macs_reduction"], abs=1e-3)
    assert metrics["epochs_trained"] == 2 * kept
    # each step keeps its best annealed epoch, and is judged as the baseline is: by the mean
    # validation top-1 of the annealed epochs around the kept one (here, its last)
    assert all("among the annealed epochs" in s["selected"]["why"] for s in steps)
    for s in steps:
        assert s["judged_on"]["first_epoch"] == s["judged_on"]["last_epoch"] == 2
        assert s["score"] == s["judged_on"]["val_top1"] == s["history"][-1]["val_top1"]
    ref = budget["reference_from"]
    assert ref["val_top1"] == budget["reference"] and ref["last_epoch"] == 3
    curve = load_model(baseline)[1]["curves"]["val_top1"]
    assert budget["reference"] == pytest.approx(
        sum(curve[ref["first_epoch"] - 1:]) / (4 - ref["first_epoch"]))
    csv_rows = (out / "budget_steps.csv").read_text().splitlines()
    assert len(csv_rows) == len(steps) + 1 and (out / "budget_curve.png").stat().st_size > 0
    report = (out / "report.md").read_text()
    assert "smallest model within 30 points" in report and f"| {kept} **(kept)** |" in report

    # cut off during the last step: its record and model gone, its training run kept
    last = out / "steps" / str(len(steps))
    (last / "step.json").unlink()
    (last / "deploy.pt").unlink()
    (out / "metrics.json").unlink()
    capsys.readouterr()
    assert main(args) == 1  # the run is there: a new search into it is refused
    assert "--resume" in capsys.readouterr().err
    assert main([*args, "--resume"]) == 0
    again = json.loads((out / "metrics.json").read_text())
    keys = ("step", "target", "score", "within", "epochs_trained", "history")
    assert [{k: s[k] for k in keys} for s in again["budget"]["steps"]] == [
        {k: s[k] for k in keys} for s in steps]
    # the MACs of a cut measured again (the last step was pruned anew) agree to rounding
    assert [s["macs_reduction"] for s in again["budget"]["steps"]] == pytest.approx(
        [s["macs_reduction"] for s in steps], abs=1e-12)
    assert again["final"]["top1"] == metrics["final"]["top1"]


def test_compress_prune_steps_reaches_the_cut_in_steps(baseline, tmp_path):
    out = tmp_path / "steps"
    assert main(["compress", *FAST, "--baseline", str(baseline), "--flops-reduction", "0.74",
                 "--prune-steps", "2", "--epochs", "1", "--no-partners", "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    steps = metrics["budget"]["steps"]
    assert metrics["budget"]["max_drop"] is None and metrics["budget"]["chosen_step"] == 2
    assert [s["target"] for s in steps] == pytest.approx(bpl.step_levels(0.74, 2))
    assert steps[0]["macs_reduction"] < steps[1]["macs_reduction"]
    assert metrics["macs_reduction"] == pytest.approx(0.74, abs=0.02)
    assert metrics["epochs_trained"] == 2  # one epoch per step
    a, _ = load_model(out / "deploy.pt")
    b, _ = load_model(out / "steps" / "2" / "deploy.pt")
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    report = (out / "report.md").read_text()
    assert "## The steps: 2 cuts" in report and "## The search:" not in report  # no budget
    assert "step 2 of 2: the last cut" in metrics["selected"]["why"]


def test_compress_needs_one_target(baseline, tmp_path, capsys):
    assert main(["compress", *FAST, "--baseline", str(baseline), "--out", str(tmp_path / "x")]) == 1
    err = capsys.readouterr().err
    assert "--flops-reduction" in err and "--max-drop" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()


def test_a_budget_inside_the_validation_noise_is_said(caplog):
    from bpl.pipeline.compression import _warn_if_budget_in_noise, budget_noise

    # 95% binomial half-width: 84% on UC Merced's 168 validation images is about ±5.5 points
    assert budget_noise(84.0, 168) == pytest.approx(196 * math.sqrt(0.84 * 0.16 / 168))
    assert budget_noise(100.0, 50) > 0  # a perfect score is not certainty
    _warn_if_budget_in_noise(1.0, 84.0, 168)
    assert "168 validation images" in caplog.text and "±5.5 points" in caplog.text
    assert "--val-ratio" in caplog.text
    caplog.clear()
    _warn_if_budget_in_noise(30.0, 84.0, 168)
    assert caplog.text == ""


def test_the_budget_is_measured_against_the_baselines_annealed_stretch(baseline, tmp_path):
    """A baseline kept mid-schedule (--select best) scores the maximum over every epoch:
    --max-drop measures against the mean of the annealed epochs around the kept one,
    read from the checkpoint's curves or the metrics.json of the run that wrote it."""
    from bpl.pipeline.compression import _budget_reference, baseline_history

    _, meta = load_model(baseline)
    curves = meta["curves"]  # bpl train records every epoch's rate and validation top-1
    assert len(curves["lr"]) == len(curves["val_top1"]) == meta["epochs"] == 3
    cfg = resolve_config(overrides={"baseline": str(baseline), "max_drop": 1.0})
    assert [r["val_top1"] for r in baseline_history(cfg, meta)] == curves["val_top1"]
    # without curves in the checkpoint: the metrics.json beside it, when it is that run's
    bare = {k: v for k, v in meta.items() if k != "curves"}
    history = baseline_history(cfg, bare)
    assert [r["val_top1"] for r in history] == curves["val_top1"]
    assert baseline_history(cfg, {**bare, "kept_epoch": 99}) is None  # another run's
    # a checkpoint kept mid-cycle at 94: the reference is the nearest annealed stretch, 89.5
    mid = {"kept_epoch": 2, "curves": {"lr": [0.1, 0.05, 0.005, 0.0],
                                       "val_top1": [80.0, 94.0, 90.0, 89.0]}}
    ref = _budget_reference(cfg, mid, measured=94.0)
    assert ref["val_top1"] == 89.5 and (ref["first_epoch"], ref["last_epoch"]) == (3, 4)
    assert ref["checkpoint_val_top1"] == 94.0 and ref["checkpoint_epoch"] == 2
    # kept in an earlier cycle's tail: that stretch, not the run's last (another model)
    cycles = {"kept_epoch": 3, "curves": {"lr": [0.1, 0.05, 0.005, 0.1, 0.05, 0.005],
                                          "lr_last": [0.1, 0.06, 0.008, 0.0004, 0.06, 0.008],
                                          "val_top1": [80.0, 85.0, 93.0, 91.0, 86.0, 87.0]}}
    ref = _budget_reference(cfg, cycles, measured=93.0)
    assert (ref["first_epoch"], ref["last_epoch"], ref["val_top1"]) == (3, 4, 92.0)
    ref = _budget_reference(cfg, mid, measured=94.0)
    # no annealed epoch (a constant rate) or no history: the checkpoint's own score
    flat = {"kept_epoch": 2, "curves": {"lr": [0.1, 0.1], "val_top1": [80.0, 94.0]}}
    assert _budget_reference(cfg, flat, measured=94.0)["val_top1"] == 94.0
    assert _budget_reference(cfg, {}, measured=91.5)["val_top1"] == 91.5
    # the report says where the reference came from, and how steps are scored
    from bpl.report import _budget_lines

    step = {"step": 1, "macs_reduction": 0.5, "score": 89.0, "within": True,
            "judged_on": {"first_epoch": 9, "last_epoch": 10, "val_top1": 89.0}}
    budget = {"reference": 89.5, "max_drop": 1.0, "stopped": "x", "chosen_step": 1,
              "steps": [step], "reference_from": ref}
    text = "\n".join(_budget_lines(budget))
    assert "89.50% (epochs 3-4: the mean validation top-1 of the baseline's annealed epochs " \
           "around its checkpoint's" in text
    assert "epoch 2, scores 94.00%" in text
    assert "Each step is scored by the mean validation top-1 of the annealed epochs around the " \
           "one it keeps, as the baseline is" in text
    # a run of an earlier bpl (judged on the best annealed epoch) still reads as it ran
    old = {"val_top1": 90.0, "epoch": 3, "checkpoint_val_top1": 94.0, "checkpoint_epoch": 2,
           "from": "the baseline's best validation top-1 at an annealed learning rate"}
    text = "\n".join(_budget_lines({**budget, "reference": 90.0, "reference_from": old,
                                    "steps": []}))
    assert "90.00% (epoch 3: the baseline's best validation top-1 at an annealed" in text
