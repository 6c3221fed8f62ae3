"""Training to convergence (--epochs auto: the plateau and cycles schedules) and the recovery
recipes."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from bpl.cli import main
from bpl.config import RECIPES, resolve_config
from bpl.engine import Cycles, Plateau, TrainSettings, _lr_lambda, fit, replayed_curve
from bpl.errors import BPLError
from bpl.models import load_checkpoint
from test_engine import payload, tiny_data, tiny_net

FAST = ["--data", "digits", "--image-size", "16", "--batch-size", "64", "--quiet", "--no-latency",
        "--arch", "tiny_resnet"]


class Cut:
    """An epoch hook that stands in for kill -9 after ``at`` epochs: last.pt then holds those."""

    def __init__(self, at: int) -> None:
        self.at = at

    def after_step(self) -> None: ...
    def state_dict(self) -> dict: return {}
    def load_state_dict(self, state: dict) -> None: ...

    def epoch_end(self, epoch: int) -> None:
        if epoch + 1 > self.at:
            raise KeyboardInterrupt


def test_plateau_decays_after_patience_and_stops_after_the_last_decay():
    p = Plateau(patience=2, min_gain=0.5, decays=2, gamma=0.1)
    # 10 -> 12 gains; 12.4 is not a gain of more than 0.5; two epochs without one: decay
    assert [p.update(v) for v in (10, 12, 12.4, 12.3)] == [None, None, None, "decay"]
    assert p.factor == pytest.approx(0.1) and p.best == 12
    assert [p.update(v) for v in (13, 12, 12)] == [None, None, "decay"]  # 13 was a gain
    assert p.factor == pytest.approx(0.01) and not p.converged
    assert [p.update(v) for v in (13, 13)] == [None, "stop"]
    assert p.converged and "after 2 learning-rate decays" in p.describe()
    q = Plateau(2, 0.5, 2, 0.1)
    q.load_state_dict(p.state_dict())
    assert q.state_dict() == p.state_dict()


def test_cycles_stop_after_a_cycle_that_adds_too_little():
    c = Cycles(length=3, min_gain=0.5)
    # cycle 1 ends (nothing before it to beat): another; cycle 2 adds 2 points: another
    assert [c.update(v) for v in (50, 60, 58)] == [None, None, "restart"]
    assert [c.update(v) for v in (55, 62, 61)] == [None, None, "restart"]
    assert c.gain == pytest.approx(2) and c.cycles == 2 and not c.converged
    # cycle 3 adds 0.4, not more than 0.5: converged
    assert [c.update(v) for v in (62.4, 50, 40)] == [None, None, "stop"]
    assert c.converged and c.gain == pytest.approx(0.4)
    assert "cosine cycle 3 of 3 epochs added +0.40 points" in c.describe()
    d = Cycles(3, 0.5)
    d.load_state_dict(c.state_dict())
    assert d.state_dict() == c.state_dict()


def test_schedules_have_their_shapes():
    def lrs(**kw):
        f = _lr_lambda(TrainSettings(epochs=10, **kw), steps_per_epoch=10)
        return [f(s) for s in range(100)]

    one = lrs(schedule="onecycle")
    assert one[0] == pytest.approx(1 / 25, rel=0.01) and max(one) == pytest.approx(1, abs=1e-3)
    assert one.index(max(one)) in range(29, 32) and one[-1] < 1e-3  # up over 30%, then down
    assert set(lrs(schedule="constant")) == {1.0}
    # replay: the curve of a 4-epoch run (lr 0.1, 0.1, 0.01, 0.001) stretched over 10 epochs
    rep = lrs(schedule="replay", lr=0.1, replay=[0.1, 0.1, 0.01, 0.001])
    assert rep[0] == pytest.approx(1.0) and rep[-1] == pytest.approx(0.01)
    assert all(a >= b for a, b in zip(rep, rep[1:]))  # the curve's order is kept
    with pytest.raises(BPLError, match="learning rates to replay"):
        lrs(schedule="replay")
    # rewinding a cycles run replays its last complete cycle, not every cycle squeezed
    warm = [0.05, 0.1]
    cycle = [0.1 * (1 + math.cos(math.pi * e / 4)) / 2 for e in range(4)]  # 0.1 .. ~0.015
    assert replayed_curve(warm + cycle[2:]) == warm + cycle[2:]  # no restart: all of it
    run = warm + cycle[2:] + cycle + cycle  # warm-up ends cycle 1, then two whole cycles
    assert replayed_curve(run) == cycle
    assert replayed_curve(run + cycle[:2]) == cycle  # kept mid-cycle: the last whole one
    assert replayed_curve(warm + cycle[2:] + cycle[:2]) == warm + cycle[2:]  # only the first
    assert replayed_curve([0.1, 0.01, 0.001]) == [0.1, 0.01, 0.001]  # a step schedule
    # cycles of 4 epochs, the first after 1 epoch of warm-up: each anneals to ~0 and restarts
    cyc = lrs(schedule="cycles", cycle_epochs=4, warmup_epochs=1)
    assert cyc[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert cyc[10] == pytest.approx(1.0) and cyc[39] < 0.01
    assert cyc[40] == pytest.approx(1.0) and cyc[79] < 0.01 and cyc[80] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(cyc[40:80], cyc[41:80]))


def test_plateau_fit_stops_when_converged_and_resumes_exactly(tmp_path):
    """A run cut off mid-way (here: an exception after some epochs) and resumed from last.pt
    makes the same decisions, and ends with the same weights, as one straight run."""
    cfg = TrainSettings(epochs=30, batch_size=8, lr=0.2, device="cpu", schedule="plateau",
                        patience=1, decays=1, amp=False)
    torch.manual_seed(0)
    straight = fit(tiny_net(), tiny_data(48), tiny_data(24), cfg, tmp_path / "a", num_classes=3,
                   payload=payload, progress=False)
    assert "converged" in straight.stopped and straight.epochs < 30
    lrs = [row["lr"] for row in straight.history]
    assert sorted(set(lrs), reverse=True) == pytest.approx([0.2, 0.02])  # one decay of x0.1

    at = straight.epochs - 1  # after the decay: the plateau state must come back
    torch.manual_seed(0)
    net = tiny_net()
    with pytest.raises(KeyboardInterrupt):
        fit(net, tiny_data(48), tiny_data(24), cfg, tmp_path / "b", num_classes=3,
            payload=payload, hooks=[Cut(at)], progress=False)
    state = torch.load(tmp_path / "b" / "last.pt", weights_only=False)
    assert state["epoch"] == at and state["plateau"]["done"] == 1
    net = tiny_net()
    net.load_state_dict(state["model"]["state_dict"])
    resumed = fit(net, tiny_data(48), tiny_data(24), cfg, tmp_path / "b", num_classes=3,
                  payload=payload, hooks=[Cut(99)], resume_state=state, progress=False)
    assert [r["lr"] for r in resumed.history] == lrs
    assert [r["val_top1"] for r in resumed.history] == [r["val_top1"] for r in straight.history]
    assert resumed.stopped == straight.stopped
    a = torch.load(tmp_path / "a" / "last.pt", weights_only=False)["model"]["state_dict"]
    b = torch.load(tmp_path / "b" / "last.pt", weights_only=False)["model"]["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    # resuming a converged run trains no more
    again = fit(net, tiny_data(48), tiny_data(24), cfg, tmp_path / "b", num_classes=3,
                payload=payload, hooks=[Cut(99)], progress=False,
                resume_state=torch.load(tmp_path / "b" / "last.pt", weights_only=False))
    assert again.epochs == straight.epochs and again.stopped == straight.stopped


def test_a_number_of_epochs_trains_them_all_under_the_validated_schedules(tmp_path):
    """--epochs N is N epochs under cycles and plateau too: the rule steers the rate but
    only --epochs auto (until_converged) ends training early."""
    from bpl.config import resolve_config
    from bpl.pipeline.fitting import train_settings

    for schedule, extra in (("cycles", {"cycle_epochs": 2, "min_gain": 100.0}),
                            ("plateau", {"patience": 1, "decays": 0})):
        cfg = TrainSettings(epochs=6, batch_size=8, lr=0.2, device="cpu", schedule=schedule,
                            amp=False, until_converged=False, **extra)
        torch.manual_seed(0)
        run = fit(tiny_net(), tiny_data(48), tiny_data(24), cfg, tmp_path / schedule,
                  num_classes=3, payload=payload, progress=False)
        assert run.epochs == 6 and run.stopped == "reached the last of 6 epochs"
        lrs = [row["lr"] for row in run.history]
        if schedule == "cycles":  # every cycle restarted although none gained 100 points
            assert lrs[0::2] == pytest.approx([lrs[0]] * 3)
        stopped = fit(tiny_net(), tiny_data(48), tiny_data(24),
                      TrainSettings(**{**cfg.__dict__, "until_converged": True}),
                      tmp_path / f"{schedule}-auto", num_classes=3, payload=payload,
                      progress=False)
        assert stopped.epochs < 6 and "converged" in stopped.stopped
    fixed = resolve_config(overrides={"epochs": 240, "schedule": "cycles"})
    assert not train_settings(fixed).until_converged and train_settings(fixed).epochs == 240
    auto = resolve_config(overrides={"epochs": "auto", "max_epochs": 90})
    assert train_settings(auto).until_converged and train_settings(auto).epochs == 90


def test_cycles_fit_stops_when_a_cycle_does_not_pay_and_resumes_exactly(tmp_path):
    """Cut off mid-cycle, after a restart, and resumed: the same learning rates, decisions
    and weights as one straight run."""
    cfg = TrainSettings(epochs=40, batch_size=8, lr=0.2, device="cpu", schedule="cycles",
                        cycle_epochs=3, min_gain=1.0, amp=False)
    torch.manual_seed(0)
    straight = fit(tiny_net(), tiny_data(48), tiny_data(24), cfg, tmp_path / "a", num_classes=3,
                   payload=payload, progress=False)
    n = straight.epochs
    assert "converged: cosine cycle" in straight.stopped and n < 40 and n % 3 == 0 and n >= 6
    lrs = [row["lr"] for row in straight.history]
    # (each epoch logs the rate its last step left) the curve repeats: every cycle restarts
    assert lrs[:3] == pytest.approx(lrs[3:6]) and lrs[0] > lrs[1] and lrs[2] == pytest.approx(0.2)

    torch.manual_seed(0)
    net = tiny_net()
    with pytest.raises(KeyboardInterrupt):
        fit(net, tiny_data(48), tiny_data(24), cfg, tmp_path / "b", num_classes=3,
            payload=payload, hooks=[Cut(4)], progress=False)
    state = torch.load(tmp_path / "b" / "last.pt", weights_only=False)
    assert state["epoch"] == 4 and state["plateau"]["epochs"] == 4
    net = tiny_net()
    net.load_state_dict(state["model"]["state_dict"])
    resumed = fit(net, tiny_data(48), tiny_data(24), cfg, tmp_path / "b", num_classes=3,
                  payload=payload, hooks=[Cut(99)], resume_state=state, progress=False)
    assert [r["lr"] for r in resumed.history] == lrs and resumed.stopped == straight.stopped
    a = torch.load(tmp_path / "a" / "last.pt", weights_only=False)["model"]["state_dict"]
    b = torch.load(tmp_path / "b" / "last.pt", weights_only=False)["model"]["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_epochs_auto_is_the_cycles_schedule_and_refuses_what_it_cannot_honour():
    cfg = resolve_config(overrides={"epochs": "auto"})
    assert cfg.schedule == "cycles" and cfg.cycle_epochs == 40 and cfg.max_epochs == 300
    cyc = resolve_config(overrides={"epochs": "auto", "cycle_epochs": 20})
    assert cyc.schedule == "cycles" and cyc.cycle_epochs == 20
    plat = resolve_config(overrides={"epochs": "auto", "schedule": "plateau", "patience": 4})
    assert plat.schedule == "plateau" and plat.patience == 4
    # one rule's option under the other would be ignored: refused, naming the fix
    with pytest.raises(BPLError, match="--patience belongs to the plateau schedule.*add "
                                       "--schedule plateau"):
        resolve_config(overrides={"epochs": "auto", "patience": 4})
    with pytest.raises(BPLError, match="--cycle-epochs belongs to the cycles schedule"):
        resolve_config(overrides={"epochs": "auto", "schedule": "plateau", "cycle_epochs": 20})
    # a whole config written out (a run's config.json) holds every field at its value: the
    # other rule's defaults there are not a request
    dump = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "replay"}
    assert resolve_config(overrides=dump).schedule == "cycles"
    with pytest.raises(BPLError, match="--cycle-epochs must be at least 1"):
        resolve_config(overrides={"epochs": "auto", "schedule": "cycles", "cycle_epochs": 0})
    with pytest.raises(BPLError, match="--epochs auto stops when .*--schedule cosine"):
        resolve_config(overrides={"epochs": "auto", "schedule": "cosine"})
    with pytest.raises(BPLError, match=r"--schedule cycles or plateau, so it cannot take "
                                       r"--recipe onecycle \(a onecycle schedule\)"):
        resolve_config(overrides={"epochs": "auto", "recipe": "onecycle"})
    # the cosine recipe until it stops paying: cosine cycles at the recipe's learning rate
    cos = resolve_config(overrides={"epochs": "auto", "recipe": "cosine"})
    assert cos.schedule == "cycles" and cos.lr == RECIPES["cosine"]["lr"]
    with pytest.raises(BPLError, match="--val-ratio above 0"):
        resolve_config(overrides={"epochs": "auto", "val_ratio": 0.0})
    for bad in ("many", 0, 2.5, True):
        with pytest.raises(BPLError, match="--epochs must be a whole number"):
            resolve_config(overrides={"epochs": bad})
    with pytest.raises(BPLError, match="--patience"):
        resolve_config(overrides={"patience": 0})
    with pytest.raises(BPLError, match="cannot take --lr"):
        resolve_config(overrides={"recipe": "rewind", "lr": 0.1})
    for name in ("cosine", "rewind", "onecycle", "constant"):
        assert resolve_config(overrides={"recipe": name}).schedule == RECIPES[name]["schedule"]


def test_train_auto_then_compress_with_rewind(tmp_path, capsys):
    base = tmp_path / "base"
    assert main(["train", *FAST, "--epochs", "auto", "--schedule", "plateau", "--patience", "1",
                 "--decays", "1",
                 "--max-epochs", "6", "--lr", "0.1", "--out", str(base)]) == 0
    metrics = json.loads((base / "metrics.json").read_text())
    n = metrics["epochs_trained"]
    assert n == len(metrics["history"]) <= 6 and metrics["stopped"]
    assert f"- trained {n} epochs; training ended: {metrics['stopped']}" in (
        base / "report.md").read_text()
    meta = load_checkpoint(base / "best.pt", model_only=True)["meta"]
    kept = metrics["selected"]["epoch"]
    assert meta["epochs"] == n and meta["kept_epoch"] == kept
    assert meta["lr_curve"] == [row["lr"] for row in metrics["history"][:kept]]

    out = tmp_path / "rewind"
    assert main(["compress", *FAST, "--baseline", str(base / "best.pt"), "--recipe", "rewind",
                 "--epochs", "2", "--flops-reduction", "0.5", "--no-partners",
                 "--out", str(out)]) == 0
    rewound = json.loads((out / "metrics.json").read_text())
    assert rewound["config"]["schedule"] == "replay" and rewound["baseline_epochs"] == n
    curve = meta["lr_curve"]
    # two epochs replay the baseline's curve: the last lr is its last lr
    assert rewound["history"][-1]["lr"] == pytest.approx(curve[-1], rel=1e-6)
    assert "reached the last of 2 epochs" in rewound["stopped"]

    # a baseline that does not record its learning rates cannot be rewound
    capsys.readouterr()
    assert main(["compress", *FAST, "--baseline", str(base / "last.pt"), "--recipe", "rewind",
                 "--epochs", "1", "--flops-reduction", "0.5", "--out", str(tmp_path / "no")]) == 1
    assert "does not record them" in capsys.readouterr().err
    assert main(["train", *FAST, "--recipe", "rewind", "--out", str(tmp_path / "t")]) == 1
    assert "it is for bpl compress" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", *FAST, "--epochs", "lots"])
    assert "expected a whole number or auto" in capsys.readouterr().err


def test_one_resolver_reads_the_config_file_once(tmp_path, monkeypatch):
    """bpl compress's config: the file read once, the baseline's data and image size as
    defaults, flags over the file, and --resume from the run's own config.json."""
    import bpl.config as config

    base = tmp_path / "base"
    assert main(["train", *FAST, "--epochs", "1", "--image-size", "20", "--out", str(base)]) == 0
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(f"baseline: {base / 'best.pt'}\nflops_reduction: 0.5\nlr: 0.02\n")
    reads = []
    real = config.load_config_file
    monkeypatch.setattr(config, "load_config_file", lambda p: (reads.append(p), real(p))[1])
    cfg = config.resolve_command("compress", {"lr": 0.03}, cfg_file)
    assert len(reads) == 1
    assert (cfg.data, cfg.image_size, cfg.flops_reduction, cfg.lr) == ("digits", 20, 0.5, 0.03)
    assert config.resolve_command("compress", {"image_size": 24}, cfg_file).image_size == 24
    resumed = config.resolve_command("train", {"resume": True, "out": str(base), "epochs": 2})
    assert resumed.resume and resumed.image_size == 20 and resumed.epochs == 2


def test_train_auto_with_cycles_reports_why_it_stopped(tmp_path):
    out = tmp_path / "cycles"
    assert main(["train", *FAST, "--epochs", "auto", "--schedule", "cycles", "--cycle-epochs",
                 "2", "--min-gain", "50", "--max-epochs", "9", "--lr", "0.1",
                 "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    # no second cycle gains 50 points: two cycles, then converged
    assert metrics["epochs_trained"] == 4 and metrics["config"]["schedule"] == "cycles"
    assert metrics["stopped"].startswith("converged: cosine cycle 2 of 2 epochs added")
    assert metrics["stopped"] in (out / "report.md").read_text()
