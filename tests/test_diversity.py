"""The diversity loss against a direct reference computation."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch.nn import functional as F

import bpl
from bpl.errors import InvalidArgumentError
from bpl.partners import ConvPartner
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
    loss = bpl.diversity_loss(student, diversity_weight=0.3, granularity=granularity)
    ref = reference_loss(student, 0.3, granularity)
    assert torch.allclose(loss, ref, rtol=1e-5, atol=1e-7)
    assert 0 <= loss.item() <= 0.3 * 2 * n_terms


def test_identical_kernels_give_the_maximum():
    student = bpl.extend(ConvZoo(), placement="all")
    with torch.no_grad():
        for _, b in bpl.partner_blocks(student):
            b.partner_conv.weight.copy_(b.conv.weight)
    loss = bpl.diversity_loss(student, diversity_weight=1.0, granularity="block")
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
    student = bpl.extend(ConvZoo(), placement="all")
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
        bpl.diversity_loss(student, diversity_weight=1.0, granularity="block").backward()
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
    student = bpl.extend(ConvZoo(), placement="all")
    bpl.diversity_loss(student, granularity="block")
    deploy = bpl.fuse(student.eval(), inplace=True)
    assert bpl.diversity_loss(deploy, granularity="block").item() == 0.0


def test_unknown_granularity():
    with pytest.raises(InvalidArgumentError, match="granularity"):  # also a ValueError
        bpl.diversity_loss(ConvZoo(), granularity="layer")


@pytest.mark.parametrize("granularity", ["stage", "block", "global"])
def test_conv_partners_are_covered(granularity):
    student = bpl.extend(PreActNet(), placement="all")
    conv_partners = [b for _, b in bpl.partner_blocks(student) if isinstance(b, ConvPartner)]
    assert len(conv_partners) == 4
    loss = bpl.diversity_loss(student, diversity_weight=0.5, granularity=granularity)
    assert torch.allclose(loss, reference_loss(student, 0.5, granularity), rtol=1e-5, atol=1e-7)
    loss.backward()
    for b in conv_partners:  # the kernel before the scale: it has a gradient at scale 0
        assert b.partner_conv.weight.grad.abs().sum() > 0 and b.conv.weight.grad.abs().sum() > 0


def formula_loss(student, weight, granularity, eps=1e-8):
    """The formula as it stood before the custom backward: three dot products per block,
    summed per group, differentiated by autograd (the reference for value and gradient)."""
    blocks = [b for _, b in bpl.partner_blocks(student)]
    if granularity == "block":
        groups = list(range(len(blocks)))
    elif granularity == "global":
        groups = [0] * len(blocks)
    else:
        names = [n.split(".")[0] for n, _ in bpl.partner_blocks(student)]
        groups = [sorted(set(names), key=names.index).index(n) for n in names]
    rows = []
    for b in blocks:
        a, p = b.conv.weight.reshape(-1), b.partner_conv.weight.reshape(-1)
        rows.append(torch.stack([torch.dot(a, p), torch.dot(a, a), torch.dot(p, p)]))
    sums = torch.zeros(max(groups) + 1, 3, dtype=rows[0].dtype).index_add(
        0, torch.tensor(groups), torch.stack(rows))
    cos = sums[:, 0] / torch.sqrt(sums[:, 1] * sums[:, 2]).clamp_min(eps)
    return weight * (cos + 1).sum()


def kernel_grads(student, loss_fn):
    kernels = [w for _, b in bpl.partner_blocks(student) for w in (b.conv.weight, b.partner_conv.weight)]
    loss = loss_fn()
    return loss, torch.autograd.grad(loss, kernels)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("net, granularity", [  # preact: both kinds of partner
    ("preact", "stage"), ("preact", "block"), ("preact", "global"), ("resnet18", "stage")])
def test_value_and_gradient_match_the_formula_in_fp64(granularity, layout, net):
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=3) if net == "resnet18" else PreActNet()
    student = bpl.extend(model, placement="all" if net == "preact" else (3, 5)).double()
    if layout == "channels_last":
        student = student.to(memory_format=torch.channels_last)
    with torch.no_grad():  # partners that differ from their blocks, and a negative cosine
        for i, (_, b) in enumerate(bpl.partner_blocks(student)):
            b.partner_conv.weight.copy_(torch.randn_like(b.conv.weight) * (-1) ** i
                                        + 0.5 * b.conv.weight)
    loss, grads = kernel_grads(student, lambda: bpl.diversity_loss(
        student, diversity_weight=0.7, granularity=granularity))
    ref, ref_grads = kernel_grads(student, lambda: formula_loss(student, 0.7, granularity))
    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-14)
    for g, r in zip(grads, ref_grads, strict=True):
        assert g.shape == r.shape
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-14)


def test_no_gradient_where_the_denominator_is_clamped():
    """Below ``eps`` the cosine has no direction: its value is the clamped formula's and its
    gradient zero (grad / eps would be 1e8 times the other kernel)."""
    student = bpl.extend(ConvZoo(), placement="all").double()
    with torch.no_grad():
        for _, b in bpl.partner_blocks(student):
            b.conv.weight.mul_(1e-6)
            b.partner_conv.weight.mul_(1e-6)
    loss, grads = kernel_grads(student, lambda: bpl.diversity_loss(student, granularity="block"))
    ref, _ = kernel_grads(student, lambda: formula_loss(student, 0.01, "block"))
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-14)
    assert all(torch.count_nonzero(g) == 0 for g in grads)


@pytest.mark.parametrize("kind", ["same", "diverse"])
def test_the_functional_loss_at_a_preserve_start_does_not_blow_up_the_partners(kind):
    """`preserve` starts a partner behind a zero BN scale, so its BN-folded kernel is zero:
    the functional cosine gives it no gradient (it was 1e5 on the BN scales, and a
    EuroSAT run's loss reached 1e6 in its first epoch), and once CE has moved the scale,
    a bounded one."""
    torch.manual_seed(0)
    student = bpl.extend(torchvision.models.resnet18(num_classes=3), partner=kind)
    loss = bpl.diversity_loss(student, diversity_compare="functional")
    loss.backward()
    grads = [p.grad for p in student.parameters() if p.grad is not None]
    assert grads and all(torch.count_nonzero(g) == 0 for g in grads)
    student.zero_grad()
    with torch.no_grad():  # a first CE step's worth of partner scale
        for _, block in bpl.partner_blocks(student):
            for m in block.partner_modules():
                if isinstance(m, torch.nn.BatchNorm2d):
                    m.weight.fill_(1e-3)
    bpl.diversity_loss(student, diversity_compare="functional").backward()
    largest = max(p.grad.abs().max().item() for p in student.parameters() if p.grad is not None)
    assert 0 < largest < 1.0
    # and a few SGD steps with it stay finite and near where they started
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 3, (8,))
    opt = torch.optim.SGD(student.parameters(), lr=0.05, momentum=0.9)
    for _ in range(3):
        opt.zero_grad()
        total = F.cross_entropy(student(x), y) + bpl.diversity_loss(
            student, diversity_compare="functional")
        total.backward()
        opt.step()
    assert torch.isfinite(total) and total.item() < 20


def test_gradients_handed_out_are_never_overwritten():
    """A gradient once handed out stays as it was; repeated training steps agree with autograd."""
    student = bpl.extend(ConvZoo(), placement="all")
    _, first = kernel_grads(student, lambda: bpl.diversity_loss(student, diversity_weight=1.0))
    kept = [g.clone() for g in first]
    with torch.no_grad():
        for _, b in bpl.partner_blocks(student):
            b.partner_conv.weight.mul_(-2.0)
    _, second = kernel_grads(student, lambda: bpl.diversity_loss(student, diversity_weight=1.0))
    for g, k, s in zip(first, kept, second, strict=True):
        assert torch.equal(g, k) and not torch.equal(s, k)
    # and in a training loop (grads accumulated into .grad), repeated steps agree with autograd
    for _ in range(3):
        student.zero_grad(set_to_none=True)
        bpl.diversity_loss(student, diversity_weight=1.0).backward()
        got = [w.grad.clone() for _, b in bpl.partner_blocks(student)
               for w in (b.conv.weight, b.partner_conv.weight)]
        _, want = kernel_grads(student, lambda: formula_loss(student, 1.0, "stage"))
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w)
