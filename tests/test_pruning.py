"""Hard pruning to a MACs target, pruning of extended models, and the soft (masked) schedule."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import bpl
from bpl.errors import BPLError
from bpl.pruning import IMPORTANCES, SoftPruner, deploy_macs, find_output_layers
from bpl.pruning.graph import rounded_keep
from bpl.pruning.soft import _soft_remedies
from bpl.pruning.soft_groups import keep_count
from conftest import randomize_bn

X32 = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def _seeded(arch: str, **kw) -> nn.Module:
    torch.manual_seed(0)
    return bpl.build_model(arch, 10, **kw)


def _shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


# --------------------------------------------------------------------------- hard pruning


@pytest.mark.parametrize("arch", ["resnet18", "resnet50", "vgg16_bn", "mobilenet_v2"])
def test_flops_target_reached_on_torchvision_models(arch):
    model = _seeded(arch)
    base = bpl.count_macs(model, X32)
    for r in (0.5, 0.7397):
        pruned = bpl.prune(model, X32, flops_reduction=r)
        achieved = 1 - bpl.count_macs(pruned, X32) / base
        assert abs(achieved - r) <= 0.01, (arch, r, achieved)
        assert bpl.reports(pruned)["prune"].reduction == pytest.approx(achieved)
        pruned.train()
        out = pruned(X32)
        assert out.shape == (2, 10)
        out.square().mean().backward()
        assert all(p.grad is not None for p in pruned.parameters() if p.requires_grad)
    assert bpl.count_macs(model, X32) == base  # the input model is untouched (inplace=False)


def test_an_architecture_torch_pruning_cannot_trace_is_refused_in_words():
    """ShuffleNetV2's channel shuffle breaks Torch-Pruning's index mapping (a
    ZeroDivisionError deep inside it): the user gets one line naming the model and why."""
    import torchvision

    model = torchvision.models.shufflenet_v2_x0_5(num_classes=10).eval()
    for target in ({"flops_reduction": 0.5}, {"channel_ratio": 0.3}):
        with pytest.raises(BPLError, match="cannot trace the channel dependencies of "
                           "ShuffleNetV2 .*channel shuffle") as e:
            bpl.prune(model, torch.randn(1, 3, 32, 32), **target)
        assert len(str(e.value).splitlines()) == 1


def test_channel_ratio_importances_and_round_to():
    model = _seeded("tiny_resnet")
    for name in IMPORTANCES:
        pruned = bpl.prune(model, X32, channel_ratio=0.3, importance=name, round_to=1)
        assert pruned(X32).shape == (2, 10)
        assert pruned.layer3[0].conv1.out_channels == int(64 * 0.7)  # 44: no rounding
    assert _widths(bpl.prune(model, X32, channel_ratio=0.3, round_to=None)) == _widths(pruned)
    # the default rounds to the nearest multiple of 8 (44 -> 48), groups of 16 or more only
    pruned = bpl.prune(model, X32, channel_ratio=0.3)
    assert pruned.layer3[0].conv1.out_channels == 48
    assert bpl.reports(pruned)["prune"].round_to == 8
    pruned = bpl.prune(model, X32, channel_ratio=0.4, round_to=8)
    for m in pruned.modules():
        if isinstance(m, nn.Conv2d) and m.out_channels > 8:
            assert m.out_channels % 8 == 0
    glob = bpl.prune(model, X32, flops_reduction=0.5, global_pruning=True)
    assert abs(bpl.reports(glob)["prune"].reduction - 0.5) <= 0.01


def _widths(model: nn.Module) -> dict[str, int]:
    return {n: m.out_channels for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}


def test_rounded_keep_rule():
    # nearest multiple (halves up), at least round_to, a whole group stays whole
    assert [rounded_keep(64, k, 8) for k in (44, 43, 36, 35, 3, 0, 63, 64, 70)] == \
        [48, 40, 40, 32, 8, 8, 64, 64, 64]
    assert rounded_keep(20, 19, 8) == 16 and rounded_keep(20, 20, 8) == 20
    # narrower than 2 * round_to: not rounded, never below one channel
    assert [rounded_keep(12, k, 8) for k in (11, 5, 0)] == [11, 5, 1]
    assert rounded_keep(16, 11, 8) == 8  # 16 = 2 * 8: rounded
    for none in (None, 1):  # no rounding: round(keep), as before rounding existed
        assert [rounded_keep(64, k, none) for k in (44, 44.6, 0, 80)] == [44, 45, 1, 64]
    assert keep_count(64, 0.7, None) == 45 and keep_count(64, 0.7, 8) == 48


@pytest.mark.parametrize("reduction", [0.5, 0.74, 0.9])
def test_default_rounding_lands_on_the_target_resnet18_64px(reduction):
    model = _seeded("resnet18")
    x = torch.randn(1, 3, 64, 64)
    pruned = bpl.prune(model, x, flops_reduction=reduction)
    report = bpl.reports(pruned)["prune"]
    assert abs(report.reduction - reduction) <= 0.01 and report.round_to == 8
    assert all(w % 8 == 0 for w in _widths(pruned).values() if w != 3), _widths(pruned)


def test_rounding_degrades_on_tiny_networks(caplog):
    model = _seeded("tiny_resnet")  # stages of 16/32/64: 16-wide groups keep 8 or 16
    x = torch.randn(1, 3, 32, 32)
    with caplog.at_level("WARNING", logger="bpl.pruning.hard"):
        pruned = bpl.prune(model, x, flops_reduction=0.9)
    report = bpl.reports(pruned)["prune"]
    assert abs(report.reduction - 0.9) <= 0.01
    assert report.round_to == 4 and "cannot reach a 90.00% MAC reduction" in caplog.text
    assert all(w % 4 == 0 for w in _widths(pruned).values() if w >= 8)
    # the demo's setting lands with 8; narrow groups (< 16) stay unrounded, never emptied
    demo = bpl.prune(model, x, flops_reduction=0.7, global_pruning=True)
    assert abs(bpl.reports(demo)["prune"].reduction - 0.7) <= 0.01
    assert bpl.reports(demo)["prune"].round_to == 8
    assert all(w % 8 == 0 for w in _widths(demo).values() if w >= 16)
    for arch in ("tiny_vgg", "tiny_resnet"):
        for r in (0.5, 0.74):
            got = bpl.reports(bpl.prune(_seeded(arch), x, flops_reduction=r))["prune"]
            assert abs(got.reduction - r) <= 0.01 and got.round_to in (8, 4, 2), (arch, r)


def test_rounding_leaves_grouped_convs_whole_groups():
    from nets import ConvZoo

    torch.manual_seed(0)
    model = ConvZoo().eval()
    x = torch.randn(1, 3, 32, 32)
    pruned = bpl.prune(model, x, channel_ratio=0.5)  # 16-wide groups round to 8
    widths = _widths(pruned)
    assert widths["body.3"] == 8 and widths["stem.0"] == 4  # 8-wide: not rounded
    grouped = pruned.body[6]
    assert grouped.out_channels % grouped.groups == 0 and grouped.out_channels >= grouped.groups
    assert pruned(x).shape == (1, 5)


def test_soft_pruner_rounds_by_default():
    torch.manual_seed(0)
    student = bpl.extend(bpl.build_model("resnet18", 10))
    x = torch.randn(1, 3, 32, 32)
    pruner = SoftPruner(student, x, flops_reduction=0.74)
    assert pruner.round_to == 8 and pruner.state_dict()["round_to"] == 8
    pruner.update()
    kept = {g.deploy_name: int(g.keep.sum()) for g in pruner.groups}
    assert all(k % 8 == 0 for k in kept.values()), kept
    plain = SoftPruner(student, x, channel_ratio=pruner.channel_ratio, round_to=1)
    assert plain.round_to == 1
    pruner.remove_hooks()
    plain.remove_hooks()


def _known_answer_net() -> nn.Sequential:
    """conv1's eight filters are built so that L2, L1, BN scale and FPGM keep different halves:
    spikes (one large entry: large L2, small L1) and spreads (many small entries: the reverse)."""
    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                      nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                      nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))
    w = torch.zeros(8, 3, 3, 3)
    for i, v in {0: 3.0, 1: 2.5, 4: 1.5, 6: 0.1}.items():  # L2 = L1 = v
        w[i, i % 3, 1, 1] = v
    for i, v in {2: 0.2, 3: 0.15, 5: 0.12, 7: 0.01}.items():  # L2 = v * sqrt(27), L1 = 27 v
        w[i] = v
    with torch.no_grad():
        m[0].weight.copy_(w)
        m[1].weight.copy_(torch.tensor([0.1, 2, 0.2, 3, 0.3, 0.4, 4, 5]))
    return m


def test_each_criterion_keeps_the_channels_it_should():
    x = torch.randn(2, 3, 16, 16)
    filters = _known_answer_net()[0].weight.detach().flatten(1)
    # FPGM keeps the filters farthest from the others (sum of distances), computed directly
    far = sorted(torch.cdist(filters, filters).sum(1).argsort(descending=True)[:4].tolist())
    expected = {
        "l2": [0, 1, 2, 4],  # norms 3, 2.5, 1.04, 1.5 beat 0.78, 0.62, 0.1, 0.05
        "l1": [0, 2, 3, 5],  # sums 3, 5.4, 4.05, 3.24 beat 2.5, 1.5, 0.27, 0.1
        "bn-scale": [1, 3, 6, 7],  # |gamma| 2, 3, 4, 5
        "fpgm": far,
    }
    assert expected["fpgm"] == [0, 1, 2, 4] and len({tuple(v) for v in expected.values()}) == 3
    for name, keep in expected.items():
        model = _known_answer_net()
        pruned = bpl.prune(model, x, channel_ratio=0.5, importance=name)
        kept = pruned[0].weight.detach().flatten(1)
        found = sorted(int((filters - k).abs().sum(1).argmin()) for k in kept)
        assert found == keep, name


def test_fpgm_is_not_l2():
    """Four large filters bunched together and four small ones spread around the origin:
    L2 keeps the large, FPGM the spread (each far from the rest), so neither can stand in
    for the other."""
    x = torch.randn(2, 3, 16, 16)
    model = _known_answer_net()
    w = torch.zeros(8, 3, 3, 3)
    for i in range(4):  # the bunch: norm 10, within 0.03 of each other
        w[i, 0, 1, 1], w[i, 1, 1, 1] = 10.0, 0.01 * i
    for i, (a, b) in enumerate([(1, 0), (0, 1), (-1, 0), (0, -1)], start=4):  # the spread
        w[i, 0, 1, 1], w[i, 1, 1, 1] = a, b
    with torch.no_grad():
        model[0].weight.copy_(w)
    filters = w.flatten(1)
    far = sorted(torch.cdist(filters, filters).sum(1).argsort(descending=True)[:4].tolist())
    assert far == [4, 5, 6, 7]  # the sums of distances, computed directly
    for name, keep in (("l2", [0, 1, 2, 3]), ("fpgm", far)):
        pruned = bpl.prune(copy.deepcopy(model), x, channel_ratio=0.5, importance=name)
        kept = pruned[0].weight.detach().flatten(1)
        assert sorted(int((filters - k).abs().sum(1).argmin()) for k in kept) == keep, name


def test_l2_keeps_the_largest_filters():
    model = _seeded("tiny_vgg")
    conv = model.features[0]
    norms = conv.weight.detach().flatten(1).norm(dim=1)
    pruned = bpl.prune(model, X32, channel_ratio=0.5, importance="l2")
    kept = pruned.features[0].weight.detach().flatten(1).norm(dim=1)
    assert torch.allclose(kept.sort().values, norms.sort().values[-len(kept):])


def test_classifier_protected_and_model_state_untouched():
    model = _seeded("tiny_resnet").train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert find_output_layers(model, X32) == ["fc"]
    pruned = bpl.prune(model, X32, flops_reduction=0.6)
    assert pruned.fc.out_features == 10
    assert "fc" in bpl.reports(pruned)["prune"].ignored
    # Torch-Pruning traces in eval mode and leaves the model there; bpl restores the flags,
    # and tracing in eval mode keeps BatchNorm statistics as they were.
    assert model.training and all(m.training for m in model.modules())
    assert pruned.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_inplace_and_ignored_layers_by_module_and_name():
    model = _seeded("tiny_resnet")
    pruned = bpl.prune(model, X32, channel_ratio=0.5,
                       ignored_layers=[model.layer1[0].conv1, "layer2.0.conv1"], inplace=True)
    assert pruned is model
    assert model.layer1[0].conv1.out_channels == 16
    assert model.layer2[0].conv1.out_channels == 32
    assert model.layer3[0].conv1.out_channels == 32


def test_prune_extend_train_fuse_is_exact_and_keeps_widths():
    model = _seeded("resnet18")
    randomize_bn(model)
    pruned = bpl.prune(model, X32, flops_reduction=0.5).eval()
    student = bpl.extend(pruned, init="paper")
    opt = torch.optim.SGD(student.parameters(), lr=0.05, momentum=0.9)
    x = torch.randn(8, 3, 32, 32)
    y = torch.randint(0, 10, (8,))
    student.train()
    for _ in range(3):
        loss = F.cross_entropy(student(x), y) + bpl.diversity_loss(student)
        opt.zero_grad()
        loss.backward()
        opt.step()
    student.eval()
    deploy = bpl.fuse(student)
    assert bpl.relative_error(student, deploy, X32) <= 1e-5
    assert _shapes(deploy) == _shapes(pruned)
    assert type(deploy) is type(pruned)


def test_prune_extended_model_prunes_partners_with_their_blocks():
    model = _seeded("resnet18")
    randomize_bn(model)
    student = bpl.extend(model, init="paper")
    with torch.no_grad():  # make the partners matter
        for _, block in bpl.partner_blocks(student):
            block.partner_conv.weight.mul_(3.0)
    pruned = bpl.prune(student, X32, flops_reduction=0.5)
    blocks = bpl.partner_blocks(pruned)
    assert len(blocks) == len(bpl.partner_blocks(student))
    for name, block in blocks:
        assert block.conv.weight.shape == block.partner_conv.weight.shape, name
        assert block.bn.num_features == block.partner_bn.num_features == block.conv.out_channels
    assert any(b.conv.out_channels < 64 for _, b in blocks)
    # the reduction is measured on the deployed (fused) form
    assert abs(bpl.reports(pruned)["prune"].reduction - 0.5) <= 0.01
    pruned.eval()
    deploy = bpl.fuse(pruned)
    assert bpl.relative_error(pruned, deploy, X32) <= 1e-5
    base = bpl.count_macs(model, X32)
    assert abs(1 - bpl.count_macs(deploy, X32) / base - 0.5) <= 0.01
    assert deploy_macs(pruned, X32) == bpl.count_macs(deploy, X32)


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize("r", [0, 0.0, -0.2, 1, 1.0, 1.5])
def test_bad_reduction(r):
    with pytest.raises(BPLError, match="flops_reduction must be .* between 0 and 1"):
        bpl.prune(_seeded("tiny_vgg"), X32, flops_reduction=r)


def test_both_or_neither_target():
    model = _seeded("tiny_vgg")
    with pytest.raises(BPLError, match="exactly one of flops_reduction"):
        bpl.prune(model, X32)
    with pytest.raises(BPLError, match="exactly one of flops_reduction"):
        bpl.prune(model, X32, flops_reduction=0.5, channel_ratio=0.5)


def test_unreachable_target_says_what_was_reached():
    model = _seeded("tiny_resnet")
    keep = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and "layer3" not in n]
    with pytest.raises(BPLError, match=r"cannot be reached: the most this model allows is "
                       r"\d+\.\d+% \(the maximum channel ratio.*accept_closest=True"):
        bpl.prune(model, X32, flops_reduction=0.9, ignored_layers=keep)
    closest = bpl.prune(model, X32, flops_reduction=0.9, ignored_layers=keep, accept_closest=True)
    assert bpl.reports(closest)["prune"].reduction < 0.9


def test_ignored_layers_not_in_model():
    model = _seeded("tiny_vgg")
    with pytest.raises(BPLError, match="'features.99' is not a module"):
        bpl.prune(model, X32, flops_reduction=0.5, ignored_layers=["features.99"])
    with pytest.raises(BPLError, match="not part of TinyVGG"):
        bpl.prune(model, X32, flops_reduction=0.5, ignored_layers=[nn.Conv2d(3, 3, 3)])


def test_unknown_importance():
    with pytest.raises(BPLError, match="unknown importance 'l3'"):
        bpl.prune(_seeded("tiny_vgg"), X32, flops_reduction=0.5, importance="l3")
    with pytest.raises(BPLError, match="unknown importance 'l3'; choose one of l2, l1, fpgm"):
        SoftPruner(bpl.extend(_seeded("tiny_vgg")), X32, channel_ratio=0.5, importance="l3")


def test_the_soft_schedule_scores_with_hard_pruning_s_criteria():
    """One criterion protocol: the soft schedule ranks each group with the same Torch-Pruning
    importance as hard pruning (l2 as the filter norms it used to sum by hand; fpgm too)."""
    student = bpl.extend(_seeded("tiny_resnet"))
    l2 = SoftPruner(student, X32, channel_ratio=0.5)
    for group in l2.groups:  # the channel's filters in every coupled conv, as before
        total = torch.zeros(group.size)
        for sl in group.filters:
            total.index_add_(0, sl.root, sl.module.weight.detach()[sl.idxs].flatten(1).pow(2).sum(1))
        assert torch.equal(torch.argsort(l2.scores()[group.name], stable=True),
                           torch.argsort(total, stable=True))
    fpgm = SoftPruner(student, X32, channel_ratio=0.5, importance="fpgm")
    assert any(not torch.equal(torch.argsort(fpgm.scores()[g.name]), torch.argsort(l2.scores()[g.name]))
               for g in l2.groups)


def test_soft_pruning_a_plain_model_zeroes_what_it_would_with_partners_and_removes_it():
    """Soft Filter Pruning alone: the groups of the convs bpl.extend would extend, masks
    held through training, then an exact removal with nothing to fuse."""
    torch.manual_seed(0)
    model = _seeded("tiny_resnet")
    randomize_bn(model)
    pruner = SoftPruner(model, X32, channel_ratio=0.5)
    with_partners = SoftPruner(bpl.extend(copy.deepcopy(model)), X32, channel_ratio=0.5)
    # the same coupled channel groups (a group's root may be another of its convs)
    assert len(pruner.groups) == len(with_partners.groups) >= 4
    assert sorted(g.size for g in pruner.groups) == sorted(g.size for g in with_partners.groups)
    assert all(g.name == g.deploy_name for g in pruner.groups)  # no partner block in between
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    pruner.update()
    for _ in range(3):  # momentum and weight decay must not revive the zeroed filters
        model.train()
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        pruner.apply()
    group = next(g for g in pruner.groups if g.deploy_name == "layer1.0.conv1")
    conv = model.get_submodule(group.name)
    assert torch.equal(_dropped_rows(conv.weight, True), ~group.keep) and not group.keep.all()
    model.eval()
    deploy = pruner.finalize(model)
    report = bpl.reports(deploy)["soft"]
    assert report.fusion_error is None and report.soft_partners is None
    assert report.removal_error <= 1e-5 and report.reduction > 0.3
    assert bpl.relative_error(model, deploy, X32) <= 1e-5
    assert bpl.count_macs(deploy, X32) == report.macs_after < report.macs_before == (
        bpl.count_macs(model, X32))
    # 1x1 convs only: no group at the paper's placement; the message names placement='all'
    pointwise = nn.Sequential(nn.Conv2d(3, 16, 1), nn.BatchNorm2d(16), nn.ReLU(),
                              nn.Conv2d(16, 4, 1), nn.BatchNorm2d(4))
    with pytest.raises(BPLError, match="no prunable channel group of Sequential holds a conv "
                                       "that bpl.extend would give partners at "
                                       "placement='paper'; pass placement='all'"):
        SoftPruner(pointwise, X32, channel_ratio=0.5)
    pruner = SoftPruner(pointwise, X32, channel_ratio=0.5, placement="all")
    assert [g.name for g in pruner.groups] == ["0"]  # the last conv is the output: kept
    pruner.update()
    deploy = pruner.finalize(pointwise.eval())
    assert deploy[0].out_channels == 8 and bpl.relative_error(pointwise, deploy, X32) <= 1e-5


# --------------------------------------------------------------------------- soft pruning


def _dropped_rows(tensor: torch.Tensor, block: bool) -> torch.Tensor:
    return tensor.detach().flatten(1).abs().sum(1) == 0 if block else tensor.detach() == 0


def test_soft_schedule_masks_training_removal_and_state():
    torch.manual_seed(0)
    model = bpl.build_model("tiny_resnet", 10)
    randomize_bn(model)
    student = bpl.extend(model, init="paper")
    pruner = SoftPruner(student, X32, flops_reduction=0.5, soft_every=2, soft_partners="masked")
    assert {g.deploy_name for g in pruner.groups} >= {"layer1.0.conv1", "layer3.0.conv2"}
    opt = torch.optim.SGD(student.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))

    def train_steps(n: int) -> None:
        student.train()
        for _ in range(n):
            loss = F.cross_entropy(student(x), y) + bpl.diversity_loss(student)
            opt.zero_grad()
            loss.backward()
            opt.step()
            pruner.apply()

    train_steps(2)
    assert not pruner.epoch_end(0)  # soft_every=2: nothing yet
    assert all(bool(g.keep.all()) for g in pruner.groups)
    assert pruner.epoch_end(1)
    train_steps(3)  # momentum and weight decay must not revive the zeroed filters

    for _, block in bpl.partner_blocks(student):
        dead = _dropped_rows(block.conv.weight, True)
        # tied: the same channels are zero in the block and its partner, conv and both BNs
        assert torch.equal(dead, _dropped_rows(block.partner_conv.weight, True))
        for bn in (block.bn, block.partner_bn):
            assert torch.all(bn.weight.detach()[dead] == 0) and torch.all(bn.bias.detach()[dead] == 0)
            assert torch.all(bn.running_mean[dead] == 0)
    group = next(g for g in pruner.groups if g.deploy_name == "layer1.0.conv1")
    block = student.layer1[0].conv1
    assert torch.equal(_dropped_rows(block.conv.weight, True), ~group.keep)
    assert int((~group.keep).sum()) == 16 - keep_count(16, 1 - pruner.channel_ratio, pruner.round_to)
    # a gradient never reaches a masked row
    loss = F.cross_entropy(student(x), y)
    opt.zero_grad()
    loss.backward()
    assert torch.all(block.conv.weight.grad[~group.keep] == 0)

    state = pruner.state_dict()
    fresh = SoftPruner(student, X32, channel_ratio=0.1)
    fresh.load_state_dict(state)
    assert fresh.channel_ratio == pruner.channel_ratio
    assert all(torch.equal(fresh.masks[k], v) for k, v in pruner.masks.items())
    fresh.remove_hooks()
    with pytest.raises(BPLError, match="does not match this model"):
        fresh.load_state_dict({"masks": {"nope": torch.ones(3, dtype=torch.bool)}})

    student.eval()
    deploy = pruner.finalize(student)
    assert type(deploy) is type(model) and not bpl.partner_blocks(deploy)
    assert bpl.relative_error(student, deploy, X32) <= 1e-5
    report = bpl.reports(deploy)["soft"]
    assert max(report[k] for k in ("relative_error", "fusion_error", "removal_error")) <= 1e-5
    reduction = 1 - bpl.count_macs(deploy, X32) / bpl.count_macs(model, X32)
    assert abs(reduction - 0.5) <= 0.01
    assert deploy.layer1[0].conv1.out_channels == int(group.keep.sum())
    assert deploy.fc.out_features == 10


def test_an_unreachable_soft_target_names_what_soft_pruning_can_change():
    """Soft pruning takes neither accept_closest nor global pruning, so its refusal must not
    advise them; what reaches further is pruning every conv's channels (placement='all')."""
    # the 1x1 conv holds most of the channels; the paper's placement (3x3) leaves it whole
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                          nn.Conv2d(16, 64, 1), nn.BatchNorm2d(64), nn.ReLU(),
                          nn.Conv2d(64, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))
    for extended in (False, True):
        net = bpl.extend(copy.deepcopy(model)) if extended else model
        with pytest.raises(BPLError) as err:
            SoftPruner(net, X32, flops_reduction=0.97, round_to=1)
        message = str(err.value)
        assert "cannot be reached" in message and "placement='all'" in message, message
        assert "accept_closest" not in message and "global_pruning" not in message
    # every conv's channels: the target is within reach
    pruner = SoftPruner(model, X32, flops_reduction=0.97, round_to=1, placement="all")
    assert len(pruner.groups) == 3
    assert _soft_remedies(model, "all")[0] == ""  # nothing left to widen: ask for less
