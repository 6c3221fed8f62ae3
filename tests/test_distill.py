"""Distillation from the unpruned baseline: the loss against its formula, the frozen teacher."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import bpl
from bpl.engine import Step


def _reference_kd(student: torch.Tensor, teacher: torch.Tensor, t: float) -> float:
    """Hinton's loss written out with plain Python floats, sample by sample."""
    total = 0.0
    for s_row, t_row in zip(student.tolist(), teacher.tolist()):
        zs = [v / t for v in s_row]
        zt = [v / t for v in t_row]
        ls = math.log(sum(math.exp(v) for v in zs))
        lt = math.log(sum(math.exp(v) for v in zt))
        total += sum(math.exp(b - lt) * ((b - lt) - (a - ls)) for a, b in zip(zs, zt))
    return t * t * total / len(student)


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_loss_matches_the_formula_and_vanishes_on_agreement(temperature):
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g) * 3
    got = bpl.distillation_loss(s, t, temperature).item()
    assert got == pytest.approx(_reference_kd(s, t, temperature), rel=1e-5)
    assert bpl.distillation_loss(t, t, temperature).item() == pytest.approx(0.0, abs=1e-6)
    s.requires_grad_(True)
    bpl.distillation_loss(s, t, temperature).backward()
    assert s.grad.abs().sum() > 0
    # descending the loss moves the student's probabilities towards the teacher's
    with torch.no_grad():
        moved = s - 5.0 * s.grad
    assert bpl.distillation_loss(moved, t, temperature) < got
    assert bpl.distillation_loss(s.half(), t.half(), temperature).dtype == torch.float32
    with pytest.raises(bpl.InvalidArgumentError, match="temperature"):
        bpl.distillation_loss(s, t, 0.0)


def _net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))


def test_teacher_is_a_frozen_copy_in_eval_mode():
    teacher = _net().train()
    with torch.no_grad():
        teacher[1].running_mean.fill_(0.3)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    kd = bpl.Distillation(teacher, distill_temperature=2.0, distill_weight=0.5)
    student = _net()
    x = torch.randn(6, 3, 8, 8)
    logits = student(x)

    def bf16():
        return torch.autocast("cpu", dtype=torch.bfloat16)

    loss = kd(Step(student, x, torch.zeros(6, dtype=torch.long), logits, bf16))
    assert loss.dtype == torch.float32 and loss.item() > 0
    loss.backward()
    assert all(p.grad is None for p in kd.teacher.parameters())
    assert not kd.teacher.training and teacher.training  # the caller's module is untouched
    expected = 0.5 * bpl.distillation_loss(logits, kd.teacher_logits(x), 2.0)
    assert loss.item() == pytest.approx(expected.item(), rel=2e-2)  # bf16 teacher vs fp32
    for _ in range(3):  # training steps of the student never touch the teacher
        kd(Step(student, x, None, student(x), bf16)).backward()
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    assert torch.equal(kd.teacher[1].running_mean, torch.full((4,), 0.3))
    with pytest.raises(bpl.InvalidArgumentError, match="weight"):
        bpl.Distillation(teacher, distill_weight=-1.0)
