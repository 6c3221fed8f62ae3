"""The training engine on tiny in-memory data: schedule, evaluation, divergence."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from bpl.config import RECIPES, Config, resolve_config
from bpl.engine import TrainingDiverged, _lr_lambda, evaluate, fit
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
    cfg = Config(epochs=3, batch_size=8, lr=0.1, device="cpu", label_smoothing=0.1)
    result = fit(model, tiny_data(), tiny_data(), cfg, tmp_path, num_classes=3, payload=payload,
                 progress=False)
    assert [h["epoch"] for h in result.history] == [1, 2, 3]
    assert result.final["top1"] > 60
    assert (tmp_path / "log.csv").read_text().count("\n") == 4
    assert torch.load(tmp_path / "last.pt", weights_only=False)["epoch"] == 3


def test_evaluate_counts_every_sample_once():
    data = tiny_data(10)
    loader = torch.utils.data.DataLoader(data, batch_size=4)
    metrics = evaluate(tiny_net(), loader, 3)
    assert metrics["samples"] == 10 and sum(map(sum, metrics["confusion"])) == 10
    assert len(metrics["per_class_top1"]) == 3 and metrics["top5"] == 100.0


def test_nan_loss_names_epoch_and_step(tmp_path):
    model = tiny_net()
    with torch.no_grad():
        model[5].weight.fill_(float("nan"))
    cfg = Config(epochs=1, batch_size=8, device="cpu")
    with pytest.raises(TrainingDiverged, match=r"epoch 1, step 1"):
        fit(model, tiny_data(), tiny_data(), cfg, tmp_path, num_classes=3, payload=payload,
            progress=False)


def test_bad_settings_are_clear_errors():
    with pytest.raises(BPLError, match="--epochs"):
        resolve_config(overrides={"epochs": 0})
    with pytest.raises(BPLError, match="unknown recipe"):
        resolve_config(overrides={"recipe": "fast"})
    with pytest.raises(BPLError, match="CUDA"):
        from bpl.engine import select_device

        if torch.cuda.is_available():
            raise BPLError("CUDA present: nothing to check")
        select_device("cuda")
