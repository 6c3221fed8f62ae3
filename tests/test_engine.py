"""The training engine on tiny in-memory data: schedule, evaluation, divergence."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from bpl.config import RECIPES, Config, resolve_config
from bpl.engine import (
    ANNEALED,
    Step,
    TrainingDiverged,
    TrainSettings,
    _lr_lambda,
    annealed_best,
    annealed_epochs,
    annealed_stretch,
    evaluate,
    fit,
)
from bpl.errors import BPLError


def tiny_data(n: int = 32, classes: int = 3):
    g = torch.Generator().manual_seed(0)
    y = torch.arange(n) % classes
    x = torch.randn(n, 3, 8, 8, generator=g) + y[:, None, None, None].float()
    return TensorDataset(x, y)


def tiny_net(classes: int = 3) -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, classes))


def payload(model: nn.Module) -> dict:
    return {"state_dict": model.state_dict()}


def test_reference_recipe_steps_at_half_and_three_quarters():
    cfg = resolve_config(overrides={"recipe": "reference", "epochs": 8})
    assert cfg.lr == RECIPES["reference"]["lr"] == 1e-3 and cfg.batch_size == 64
    f = _lr_lambda(cfg, steps_per_epoch=10)
    assert [f(s) for s in (0, 39, 40, 59, 60, 79)] == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])


def test_cosine_with_warmup():
    f = _lr_lambda(Config(epochs=4, warmup_epochs=1, schedule="cosine"), steps_per_epoch=10)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0) and f(39) < 0.01


def test_fit_learns_and_logs(tmp_path):
    model = tiny_net()
    cfg = TrainSettings(epochs=3, batch_size=8, lr=0.1, device="cpu", label_smoothing=0.1)
    result = fit(model, tiny_data(), tiny_data(), cfg, tmp_path, num_classes=3, payload=payload,
                 progress=False)
    assert [h["epoch"] for h in result.history] == [1, 2, 3]
    assert result.history[-1]["val_top1"] > 60
    assert (tmp_path / "log.csv").read_text().count("\n") == 4
    assert torch.load(tmp_path / "last.pt", weights_only=False)["epoch"] == 3


def test_evaluate_counts_every_sample_once_against_known_predictions():
    """The 'model' passes its inputs through as logits, so every figure is known in advance."""
    g = torch.Generator().manual_seed(0)
    n, classes = 23, 7
    logits = torch.randn(n, classes, generator=g)
    labels = torch.randint(0, classes, (n,), generator=g)
    loader = torch.utils.data.DataLoader(TensorDataset(logits, labels), batch_size=4)  # 4+...+3
    passthrough = nn.Sequential(nn.Identity())
    metrics = evaluate(passthrough, loader, classes, device=torch.device("cpu"))
    rows = logits.tolist()
    pred = [max(range(classes), key=r.__getitem__) for r in rows]
    top5 = [sorted(range(classes), key=lambda c, r=r: -r[c])[:5] for r in rows]
    y = labels.tolist()
    assert metrics["samples"] == n and sum(map(sum, metrics["confusion"])) == n
    assert metrics["top1"] == pytest.approx(100 * sum(p == t for p, t in zip(pred, y)) / n)
    assert metrics["top5"] == pytest.approx(100 * sum(t in k for k, t in zip(top5, y)) / n)
    assert metrics["top5"] < 100.0  # 7 classes: top-5 can miss
    for c in range(classes):
        assert metrics["confusion"][c] == [sum(1 for p, t in zip(pred, y) if t == c and p == k)
                                           for k in range(classes)]
        mine = [p for p, t in zip(pred, y) if t == c]
        expected = 100 * sum(p == c for p in mine) / len(mine) if mine else 0.0
        assert metrics["per_class_top1"][c] == pytest.approx(expected)
    loss = sum(-torch.log_softmax(logits[i], 0)[y[i]].item() for i in range(n)) / n
    assert metrics["loss"] == pytest.approx(loss, rel=1e-5)


def test_nan_loss_names_epoch_and_step(tmp_path):
    model = tiny_net()
    with torch.no_grad():
        model[5].weight.fill_(float("nan"))
    cfg = TrainSettings(epochs=1, batch_size=8, device="cpu")
    with pytest.raises(TrainingDiverged, match=r"epoch 1, step 1"):
        fit(model, tiny_data(), tiny_data(), cfg, tmp_path, num_classes=3, payload=payload,
            progress=False)


def test_bad_settings_are_clear_errors(monkeypatch):
    with pytest.raises(BPLError, match="--epochs"):
        resolve_config(overrides={"epochs": 0})
    with pytest.raises(BPLError, match="unknown recipe"):
        resolve_config(overrides={"recipe": "fast"})
    from bpl.engine import select_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the same on a GPU host
    with pytest.raises(BPLError, match="no GPU is visible; use --device cpu"):
        select_device("cuda")
    assert select_device("auto") == torch.device("cpu")


def test_train_settings_take_the_matching_fields_of_a_config():
    cfg = resolve_config(overrides={"epochs": 4, "lr": 0.3, "diversity_weight": 0.5})
    settings = TrainSettings.from_object(cfg)
    assert (settings.epochs, settings.lr, settings.seed) == (4, 0.3, cfg.seed)
    assert not hasattr(settings, "diversity_weight")
    with pytest.raises(BPLError, match="--diversity-weight"):
        resolve_config(overrides={"diversity_weight": -1})


def test_loss_terms_are_added_logged_and_timed(tmp_path):
    calls = []

    def term(step: Step) -> torch.Tensor:
        calls.append(step.inputs.shape[0])
        assert step.logits.shape == (step.inputs.shape[0], 3) and step.targets.dtype == torch.long
        return 0.5 * step.model[0].weight.pow(2).sum()  # a weight penalty: changes training

    cfg = TrainSettings(epochs=2, batch_size=8, lr=0.1, device="cpu")
    torch.manual_seed(0)
    plain = fit(tiny_net(), tiny_data(), None, cfg, tmp_path / "a", num_classes=3,
                payload=payload, progress=False)
    torch.manual_seed(0)
    net = tiny_net()
    extra = fit(net, tiny_data(), None, cfg, tmp_path / "b", num_classes=3, payload=payload,
                loss_terms={"penalty": term}, progress=False)
    assert calls == [8] * 8  # 4 steps an epoch, 2 epochs
    row = extra.history[-1]
    assert row["train_loss"] == pytest.approx(row["train_ce"] + row["train_penalty"], rel=1e-6)
    assert row["penalty_ms_per_step"] > 0
    assert "train_penalty" not in plain.history[-1]
    assert row["train_ce"] != plain.history[-1]["train_ce"]
    header = (tmp_path / "b" / "log.csv").read_text().splitlines()[0]
    assert "train_penalty" in header and "penalty_ms_per_step" in header


def test_best_checkpoint_is_the_best_validation_epoch(tmp_path):
    """best.pt holds the epoch of best validation top-1, which need not be the last."""
    train = tiny_data(48)
    # validation labels shifted by one class: the better the model learns the training
    # data, the worse it scores, so the best validation epoch comes before the last
    x, y = tiny_data(30).tensors
    val = TensorDataset(x, (y + 1) % 3)
    cfg = TrainSettings(epochs=6, batch_size=8, lr=0.2, device="cpu")
    result = fit(tiny_net(), train, val, cfg, tmp_path, num_classes=3, payload=payload,
                 progress=False)
    tops = [h["val_top1"] for h in result.history]
    assert result.best_epoch == tops.index(max(tops)) + 1 and result.best_val_top1 == max(tops)
    assert result.best_epoch < 6 and max(tops) > tops[-1]
    best = torch.load(tmp_path / "best.pt", weights_only=False)["state_dict"]
    model = tiny_net()
    model.load_state_dict(best)
    loader = torch.utils.data.DataLoader(val, batch_size=64)
    assert evaluate(model, loader, 3)["top1"] == pytest.approx(max(tops))
    # without a validation set every epoch is "best": best.pt is the last epoch
    none = fit(tiny_net(), train, None, cfg, tmp_path / "noval", num_classes=3,
               payload=payload, progress=False)
    assert none.best_epoch == 6 and none.best_val_top1 is None
    assert "val_top1" not in none.history[-1]


def _val_of(path, val) -> float:
    model = tiny_net()
    model.load_state_dict(torch.load(path, weights_only=False)["state_dict"])
    return evaluate(model, torch.utils.data.DataLoader(val, batch_size=64), 3)["top1"]


def test_select_annealed_keeps_the_best_epoch_at_an_annealed_rate(tmp_path):
    """--select annealed: best.pt is the best validation epoch among those whose rate has
    fallen to ANNEALED of the peak (a cosine's tail); "last": best.pt is the last epoch."""
    train = tiny_data(48)
    x, y = tiny_data(30).tensors
    val = TensorDataset(x, (y + 1) % 3)  # the best validation epoch comes early (above)
    cfg = TrainSettings(epochs=10, batch_size=8, lr=0.2, device="cpu", select="annealed")
    result = fit(tiny_net(), train, val, cfg, tmp_path / "a", num_classes=3, payload=payload,
                 progress=False)
    rates = [h["lr"] for h in result.history]
    tops = [h["val_top1"] for h in result.history]
    # each epoch records the rate its last step used: on a falling cosine, between the
    # rate it began at (the epoch before's lr) and the rate after it (its lr)
    ends = [h["lr_last"] for h in result.history]
    assert all(a <= b <= c for a, b, c in zip(rates, ends, [0.2, *rates[:-1]], strict=True))
    assert ends[-1] > rates[-1]  # the schedule's last step still trained, at its lowest rate
    tail = [e for e, end in enumerate(ends, 1) if end <= ANNEALED * 0.2]
    assert tail and tail == list(range(tail[0], 11)) and tail[0] > 5  # the cosine's tail
    best = max(tail, key=lambda e: (tops[e - 1], -e))
    assert result.best_epoch == best and result.best_val_top1 == tops[best - 1]
    assert annealed_best(result.history, peak=0.2) == (best, tops[best - 1])
    assert _val_of(tmp_path / "a" / "best.pt", val) == pytest.approx(tops[best - 1])
    # the same run under "best" keeps an earlier, unannealed epoch (the point of the option)
    plain = fit(tiny_net(), train, val, TrainSettings(**{**cfg.__dict__, "select": "best"}),
                tmp_path / "b", num_classes=3, payload=payload, progress=False)
    assert plain.best_epoch < tail[0]
    # a constant rate never anneals: every epoch is a candidate, as under "best"
    flat = fit(tiny_net(), train, val, TrainSettings(**{**cfg.__dict__, "schedule": "constant"}),
               tmp_path / "c", num_classes=3, payload=payload, progress=False)
    flat_tops = [h["val_top1"] for h in flat.history]
    assert flat.best_val_top1 == max(flat_tops)
    # "last": best.pt is the last epoch, the model the run keeps
    last = fit(tiny_net(), train, val, TrainSettings(**{**cfg.__dict__, "select": "last"}),
               tmp_path / "d", num_classes=3, payload=payload, progress=False)
    assert last.best_epoch == 10
    assert _val_of(tmp_path / "d" / "best.pt", val) == pytest.approx(last.history[-1]["val_top1"])


def test_annealed_best_reads_cycles_and_warm_ups():
    """Each cycle's tail counts; a mid-cycle maximum and a warm-up's low, rising first rates
    do not (the first epoch, whose start rate a history lacks, is never counted)."""
    lrs = [0.005, 0.05, 0.1, 0.05, 0.005, 0.1, 0.05, 0.008, 0.0]
    tops = [99.0, 50, 60, 70, 85, 95, 90, 84, 83]
    history = [{"lr": lr, "val_top1": t} for lr, t in zip(lrs, tops, strict=True)]
    assert annealed_best(history) == (5, 85)
    assert annealed_best(history, peak=0.04) == (9, 83)  # only rates <= 0.004 count
    history[4]["val_top1"] = None  # an epoch without validation is no candidate
    assert annealed_best(history) == (8, 84)
    assert annealed_best([{"lr": 0.1, "val_top1": 50.0}, {"lr": 0.05, "val_top1": 60.0}]) is None
    assert annealed_best([]) is None


def test_annealed_epochs_judge_the_rate_an_epoch_ended_at():
    """With ``lr_last`` (the rate an epoch's last step used) a cycle's last epoch, which
    records the next cycle's peak as its ``lr``, counts; a 1-cycle's low, rising first
    rates do not; a history without it is judged by ``lr``, as before (cycle ends missed)."""
    lrs = [0.09, 0.05, 0.006, 0.1, 0.09, 0.05, 0.006, 0.1]  # two cycles, each restarting
    ends = [0.1, 0.06, 0.008, 0.0004, 0.1, 0.06, 0.008, 0.0004]
    tops = [50.0, 60, 70, 99, 80, 85, 88, 87]
    old = [{"lr": lr, "val_top1": t} for lr, t in zip(lrs, tops, strict=True)]
    assert annealed_epochs(old) == [False, False, True, False, False, False, True, False]
    assert annealed_best(old) == (7, 88.0)  # the best, 99 at a cycle's end, was missed
    new = [{**row, "lr_last": end} for row, end in zip(old, ends, strict=True)]
    assert annealed_epochs(new) == [False, False, True, True, False, False, True, True]
    assert annealed_best(new) == (4, 99.0)
    assert annealed_epochs(new, start=0.1)[0] is False  # epoch 1 ended at the peak
    # a 1-cycle starts low and rises: its first epochs end below the threshold, but rising
    rising = [{"lr": lr, "lr_last": end} for lr, end in
              ((0.005, 0.0049), (0.01, 0.0099), (0.1, 0.099), (0.04, 0.041), (0.0005, 0.0006))]
    assert annealed_epochs(rising, start=0.004) == [False, False, False, False, True]
    assert annealed_epochs([]) == []


def test_the_global_batch_must_divide_among_the_processes(monkeypatch):
    from bpl import distributed
    from bpl.engine import make_loader

    data = tiny_data(48)
    cpu = torch.device("cpu")
    monkeypatch.setattr(distributed, "current", lambda: distributed.Context(rank=1, world_size=3))
    with pytest.raises(BPLError, match="--batch-size 16 must be divisible by the 3 processes"):
        make_loader(data, batch_size=16, train=True, device=cpu)
    # divisible: each process takes its third of the global batch, in its own share
    loader = make_loader(data, batch_size=12, train=True, device=cpu)
    assert loader.batch_size == 4 and len(loader.sampler) == 16
    assert [len(x) for x, _ in loader] == [4] * 4
    # evaluation batches are at least 64 globally, rounded up to share out evenly (22 x 3),
    # and rank 1 evaluates samples 1, 4, 7, ...: every sample once over the 3 processes
    loader = make_loader(data, batch_size=12, train=False, device=cpu)
    assert loader.batch_size == 22
    assert list(loader.dataset.indices) == list(range(1, 48, 3))
    # shard=False: this process alone, whatever the world size
    assert make_loader(data, batch_size=16, train=True, device=cpu, shard=False).batch_size == 16


def test_compile_without_a_cpu_compiler_is_a_one_line_error(monkeypatch):
    from bpl import engine

    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setattr(engine.shutil, "which", lambda name: None)
    with pytest.raises(BPLError, match=r"C\+\+ compiler .*apt-get install g\+\+") as info:
        engine.check_compile(torch.device("cpu"))
    assert "\n" not in str(info.value)
    monkeypatch.setattr(engine.shutil, "which", lambda name: "/usr/bin/g++" if name == "g++" else None)
    engine.check_compile(torch.device("cpu"))  # a compiler on the PATH: no error


def test_annealed_stretch_is_the_mean_of_the_annealed_epochs_around_one():
    """The level a model settled at: the stretch of consecutive annealed, validated epochs
    that holds an epoch (default the last), averaged; for an epoch in none (kept mid-cycle),
    the nearest stretch, the later on a tie; None where the run never annealed."""
    lrs = [0.09, 0.05, 0.006, 0.1, 0.09, 0.05, 0.006, 0.1]  # two cycles, each restarting
    ends = [0.1, 0.06, 0.008, 0.0004, 0.1, 0.06, 0.008, 0.0004]
    tops = [50.0, 60, 70, 99, 80, 85, 88, 87]
    history = [{"lr": lr, "lr_last": e, "val_top1": t}
               for lr, e, t in zip(lrs, ends, tops, strict=True)]
    assert annealed_stretch(history) == (7, 8, 87.5)  # the last stretch
    assert annealed_stretch(history, 4) == (3, 4, 84.5)  # the first cycle's, holding epoch 4
    assert annealed_stretch(history, 5) == (3, 4, 84.5)  # mid-cycle: the nearest (1 epoch off)
    assert annealed_stretch(history, 6) == (7, 8, 87.5)
    assert annealed_stretch(history[:6], 6) == (3, 4, 84.5)  # the only one
    history[6]["val_top1"] = None  # a stretch stops at an epoch without validation
    assert annealed_stretch(history) == (8, 8, 87.0)
    assert annealed_stretch(history, 6) == (8, 8, 87.0)  # 5-6 from 4 and from 8: the later
    assert annealed_stretch(history[:2]) is None
    assert annealed_stretch([]) is None
