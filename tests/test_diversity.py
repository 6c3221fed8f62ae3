"""The diversity loss against a direct reference computation."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch.nn import functional as F

import bpl
from bpl.errors import InvalidArgumentError
from bpl.partner import ConvPartner
from nets import ConvZoo, PreActNet


def reference_loss(student, weight, granularity):
    """Concatenate the kernels of each group and take cosine + 1: the definition, literally."""
    blocks = bpl.partner_blocks(student)
    if granularity == "block":
        groups = [[b] for _, b in blocks]
    elif granularity == "global":
        groups = [[b for _, b in blocks]]
    else:
        stages: dict[str, list] = {}
        for name, b in blocks:
            stages.setdefault(name.split(".")[0], []).append(b)
        groups = list(stages.values())
    total = 0.0
    for group in groups:
        a = torch.cat([b.conv.weight.flatten() for b in group])
        p = torch.cat([b.partner_conv.weight.flatten() for b in group])
        total = total + F.cosine_similarity(a, p, dim=0) + 1
    return weight * total


@pytest.mark.parametrize("granularity, n_terms", [("stage", 4), ("block", 8), ("global", 1)])
def test_matches_reference(granularity, n_terms):
    student = bpl.extend(torchvision.models.resnet18(num_classes=3))
    loss = bpl.diversity_loss(student, weight=0.3, granularity=granularity)
    ref = reference_loss(student, 0.3, granularity)
    assert torch.allclose(loss, ref, rtol=1e-5, atol=1e-7)
    assert 0 <= loss.item() <= 0.3 * 2 * n_terms


def test_identical_kernels_give_the_maximum():
    student = bpl.extend(ConvZoo(), kernel_sizes=None)
    with torch.no_grad():
        for _, b in bpl.partner_blocks(student):
            b.partner_conv.weight.copy_(b.conv.weight)
    loss = bpl.diversity_loss(student, weight=1.0, granularity="block")
    assert loss.item() == pytest.approx(2.0 * len(bpl.partner_blocks(student)), rel=1e-5)


def test_gradients_reach_both_kernels():
    student = bpl.extend(torchvision.models.resnet18(num_classes=3))
    bpl.diversity_loss(student).backward()
    for _, b in bpl.partner_blocks(student):
        assert b.conv.weight.grad is not None and b.conv.weight.grad.abs().sum() > 0
        assert b.partner_conv.weight.grad is not None and b.partner_conv.weight.grad.abs().sum() > 0


def test_descent_lowers_the_cosine_of_every_block_and_touches_only_kernels():
    """Descending the loss moves each block's partner kernel away from the block's own,
    measured independently with F.cosine_similarity, and trains nothing but the kernels."""
    student = bpl.extend(ConvZoo(), kernel_sizes=None)
    with torch.no_grad():
        for _, b in bpl.partner_blocks(student):
            b.partner_conv.weight.copy_(b.conv.weight + 0.1 * torch.randn_like(b.conv.weight))

    def cosines() -> list[float]:
        return [torch.nn.functional.cosine_similarity(b.conv.weight.flatten(),
                                                      b.partner_conv.weight.flatten(), 0).item()
                for _, b in bpl.partner_blocks(student)]

    before = cosines()
    others = {n: p.clone() for n, p in student.named_parameters() if "conv.weight" not in n}
    opt = torch.optim.SGD(student.parameters(), lr=0.5)
    for _ in range(5):
        opt.zero_grad()
        bpl.diversity_loss(student, weight=1.0, granularity="block").backward()
        opt.step()
    after = cosines()
    assert all(a < b - 1e-3 for a, b in zip(after, before)), (before, after)
    for n, p in student.named_parameters():
        if n in others:
            assert torch.equal(p, others[n]), n


def test_zero_without_partners():
    loss = bpl.diversity_loss(ConvZoo())
    assert loss.item() == 0.0 and loss.shape == ()


def test_plan_follows_model_changes():
    student = bpl.extend(ConvZoo(), kernel_sizes=None)
    bpl.diversity_loss(student, granularity="block")
    deploy = bpl.fuse(student.eval(), inplace=True)
    assert bpl.diversity_loss(deploy, granularity="block").item() == 0.0


def test_unknown_granularity():
    with pytest.raises(InvalidArgumentError, match="granularity"):  # also a ValueError
        bpl.diversity_loss(ConvZoo(), granularity="layer")


@pytest.mark.parametrize("granularity", ["stage", "block", "global"])
def test_conv_partners_are_covered(granularity):
    student = bpl.extend(PreActNet(), kernel_sizes=None)
    conv_partners = [b for _, b in bpl.partner_blocks(student) if isinstance(b, ConvPartner)]
    assert len(conv_partners) == 4
    loss = bpl.diversity_loss(student, weight=0.5, granularity=granularity)
    assert torch.allclose(loss, reference_loss(student, 0.5, granularity), rtol=1e-5, atol=1e-7)
    loss.backward()
    for b in conv_partners:  # the kernel before the scale: it has a gradient at scale 0
        assert b.partner_conv.weight.grad.abs().sum() > 0 and b.conv.weight.grad.abs().sum() > 0
