"""Partner kinds: the registry, each kind's exact fold, what the diversity loss compares,
checkpoints, and the reference's soft recipe with partners that regrow."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from torch import nn

import bpl
from bpl.conformance import CHECKS, check_model, randomize_partners
from bpl.diversity import partner_statistics
from bpl.models import load_model, reinitialize, save_model
from bpl.partners import PARTNER_KINDS, BranchPartner, PadBatchNorm2d, partner_kind
from bpl.partners.branches import ConvAvgPool2d
from nets import ConvZoo, GroupedNet, NormActStack, PreActNet

HAS_ONNX = all(importlib.util.find_spec(m) for m in ("onnx", "onnxruntime"))
STRUCTURAL = ("diverse", "asymmetric")


def test_the_registry_names_its_kinds_and_refuses_others():
    assert PARTNER_KINDS == bpl.PARTNER_KINDS == ("same", "diverse", "asymmetric")
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    for name in PARTNER_KINDS:
        kind = partner_kind(name)
        assert kind.name == name and kind.summary and kind.step_cost
        # the README's table of kinds gives the cost the registry logs, from one source
        row = next(line for line in readme.splitlines() if line.startswith(f"| `{name}`"))
        assert row.rstrip().endswith(f"| {kind.step_cost} |")
    with pytest.raises(bpl.InvalidArgumentError, match="unknown partner kind 'dbb'; choose one of same, diverse"):
        bpl.extend(GroupedNet(), partner="dbb")
    with pytest.raises(bpl.InvalidArgumentError, match="init must be one of preserve, paper for 'diverse'"):
        bpl.extend(GroupedNet(), partner="diverse", init="split")


@pytest.mark.parametrize("kind", STRUCTURAL)
@pytest.mark.parametrize("net", [GroupedNet, PreActNet, NormActStack])
def test_each_kind_passes_every_conformance_check(kind, net):
    """Exact at start and at fusion (fp64 <= 1e-9, fold_bn too), strict load into the stock
    net, pruning, fusion after pruning, ONNX parity, a float64 move: as benchmarks/zoo.py."""
    result = check_model(net, torch.randn(2, 3, 16, 16), placement=(3, 5), partner=kind,
                         do_onnx=HAS_ONNX)
    failed = {k: (v["error"], v["note"]) for k, v in result["checks"].items() if not v["ok"]}
    assert not failed
    assert set(result["checks"]) == set(CHECKS) - (set() if HAS_ONNX else {"onnx"})


def _branch_blocks(model):
    return [b for _, b in bpl.partner_blocks(model) if isinstance(b, BranchPartner)]


@pytest.mark.parametrize("kind", STRUCTURAL)
def test_branches_have_their_own_shapes_and_bns_and_fold_exactly(kind):
    torch.manual_seed(0)
    net = ConvZoo().eval()
    student = randomize_partners(bpl.extend(net, partner=kind, placement="all").double().eval())
    blocks = _branch_blocks(student)
    assert blocks and all(b.kind == kind for b in blocks)
    shapes = {name: tuple(seq[0].kernel_size) for name, seq in blocks[0].branches.items()}
    assert shapes == ({"pointwise": (1, 1), "pointwise_kxk": (1, 1), "pointwise_avg": (1, 1)}
                      if kind == "diverse" else {"row": (1, 3), "column": (3, 1)})
    for seq in blocks[0].branches.values():
        assert isinstance(seq[-1], nn.BatchNorm2d)  # each branch ends in its own BN
    if kind == "diverse":  # the chains pad with their middle BN's shift
        assert isinstance(blocks[0].branches["pointwise_kxk"][1], PadBatchNorm2d)
    x = torch.randn(2, 3, 20, 20, dtype=torch.float64)
    for fold_bn in (False, True):
        assert bpl.relative_error(student, bpl.fuse(student, fold_bn=fold_bn), x) <= 1e-9
    # a conv the kind cannot sit beside gets the default kind, and the report says why
    fallback = bpl.reports(student)["extend"].fallback
    assert "body.15" in fallback and "kernel (3, 1)" in fallback["body.15"]
    assert "body.12" in fallback and "kernel (1, 3)" in fallback["body.12"]
    reflect = nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect")
    assert "padding mode 'reflect'" in partner_kind(kind).problem(reflect)
    assert "body.0" in fallback and "not an odd kernel with centred padding" in fallback["body.0"]
    if kind == "diverse":
        assert "dilation (2, 2)" in fallback["body.6"]
    else:
        assert "body.6" not in fallback  # ACNet's branches take the dilation
    assert {bpl.reports(student)["extend"].partners[name] for name in fallback} == {"same"}
    assert "same partner for body.15" in str(bpl.reports(student)["extend"])


@pytest.mark.parametrize("kernel, stride, padding", [(3, 1, 1), (3, 2, 1), (3, 2, 0), ((3, 5), 1, (1, 2)),
                                                     (5, (2, 1), 0)])
def test_the_average_pool_branch_is_a_depthwise_conv_with_the_pools_values(kernel, stride, padding):
    x = torch.randn(2, 5, 11, 12, dtype=torch.float64, requires_grad=True)
    pool, conv = nn.AvgPool2d(kernel, stride=stride, padding=padding), ConvAvgPool2d(kernel, stride, padding)
    y, z = pool(x), conv(x)
    assert y.shape == z.shape and torch.allclose(y, z, rtol=0, atol=1e-12)
    g = torch.randn_like(y)
    (gy,), (gz,) = torch.autograd.grad(y, x, g), torch.autograd.grad(z, x, g)
    assert torch.allclose(gy, gz, rtol=0, atol=1e-12)
    assert isinstance(conv, nn.AvgPool2d) and not list(conv.parameters()) and not conv.state_dict()


@pytest.mark.parametrize("kind", STRUCTURAL)
def test_preserve_is_exact_in_training_mode_and_paper_is_not(kind):
    torch.manual_seed(0)
    net = GroupedNet()
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        ref = net.train()(x)
        kept = bpl.extend(net, partner=kind, init="preserve").train()(x)
        moved = bpl.extend(net, partner=kind, init="paper").train()(x)
    assert torch.equal(ref, kept) or bpl.verification.max_relative_error(ref, kept) < 1e-6
    assert bpl.verification.max_relative_error(ref, moved) > 1e-3


def test_a_bare_conv_gets_branches_without_bn_behind_a_scale():
    student = randomize_partners(bpl.extend(PreActNet(), partner="diverse").double().eval())
    bare = [b for b in _branch_blocks(student) if b.slot_key is None]
    assert bare and all(hasattr(b, "partner_scale") for b in bare)
    assert not any(isinstance(m, nn.BatchNorm2d) for b in bare for m in b.branches.modules())
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    assert bpl.relative_error(student, bpl.fuse(student), x) <= 1e-9


def test_the_default_kind_keeps_its_modules_and_fold():
    """Today's partners under the default name: the same state_dict keys and the same fold."""
    net = GroupedNet()
    default, same = bpl.extend(net), bpl.extend(net, partner="same")
    assert list(default.state_dict()) == list(same.state_dict())
    assert any(k.endswith("grouped.0.partner_conv.weight") for k in same.state_dict())
    assert any(k.endswith("grouped.0.partner_bn.running_var") for k in same.state_dict())
    block = same.grouped[0]
    w1, b1 = bpl.partners.fold_conv_bn(block.conv, block.bn)
    w2, b2 = bpl.partners.fold_conv_bn(block.partner_conv, block.partner_bn)
    weight, bias = block.fold()
    assert torch.equal(weight, w1 + w2) and torch.equal(bias, b1 + b2)


@pytest.mark.parametrize("kind", PARTNER_KINDS)
def test_checkpoints_record_each_kind_and_rebuild_it(tmp_path, kind):
    torch.manual_seed(0)
    model = bpl.build_model("tiny_resnet", num_classes=5)
    student = randomize_partners(bpl.extend(model, partner=kind).eval())
    save_model(student, tmp_path / "m.pt", arch="tiny_resnet", num_classes=5)
    loaded, _ = load_model(tmp_path / "m.pt")
    x = torch.randn(2, 3, 32, 32)
    assert bpl.relative_error(student, loaded.eval(), x) == 0.0
    assert bpl.reports(loaded)["extend"].partners == bpl.reports(student)["extend"].partners
    assert {type(b).__name__ for _, b in bpl.partner_blocks(loaded)} == (
        {"PartnerBlock"} if kind == "same" else {"BranchPartner"})


def test_a_checkpoint_from_before_kinds_loads_as_the_default_kind(tmp_path):
    student = bpl.extend(bpl.build_model("tiny_resnet", num_classes=5))
    payload = bpl.models.model_payload(student, "tiny_resnet", 5)
    payload["extended"] = [site[:2] for site in payload["extended"]]  # [conv, bn], as in 0.1
    loaded, _ = bpl.models.model_from_payload(payload)
    assert set(bpl.reports(loaded)["extend"].partners.values()) == {"same"}
    payload["extended"] = [[*site[:2], "hexagonal"] for site in payload["extended"]]
    with pytest.raises(bpl.CheckpointError, match="partners of kind 'hexagonal'.*upgrade bpl"):
        bpl.models.model_from_payload(payload)


def test_the_functional_comparison_sees_through_a_sign_flip_its_bn_undoes():
    """The paper's loss compares raw kernels: flipping a partner's kernel and its BN scale
    changes nothing the network computes but moves the raw cosine to its opposite."""
    torch.manual_seed(0)
    student = randomize_partners(bpl.extend(GroupedNet(), init="split").eval())
    x = torch.randn(2, 3, 16, 16)
    before_out = student(x)
    raw = bpl.diversity_loss(student, granularity="global", diversity_weight=1.0)
    functional = bpl.diversity_loss(student, granularity="global", diversity_weight=1.0,
                                    diversity_compare="functional")
    with torch.no_grad():
        for _, b in bpl.partner_blocks(student):
            b.partner_conv.weight.neg_()  # the batch mean flips with it: so does the running one
            b.partner_bn.weight.neg_()
            b.partner_bn.running_mean.neg_()
    assert torch.allclose(student(x), before_out, atol=1e-5)
    flipped_raw = bpl.diversity_loss(student, granularity="global", diversity_weight=1.0)
    flipped_functional = bpl.diversity_loss(student, granularity="global", diversity_weight=1.0,
                                            diversity_compare="functional")
    assert raw.item() > 1.5 and flipped_raw.item() < 0.5  # split starts as a copy: cos near 1
    assert torch.allclose(functional, flipped_functional, atol=1e-6)
    with pytest.raises(bpl.InvalidArgumentError, match="compare must be one of"):
        bpl.diversity_loss(student, diversity_compare="folded")


@pytest.mark.parametrize("kind", STRUCTURAL)
def test_the_diversity_loss_reaches_every_branch(kind):
    torch.manual_seed(0)
    student = bpl.extend(GroupedNet(), partner=kind, init="paper")
    for compare in ("raw", "functional"):
        student.zero_grad()
        bpl.diversity_loss(student, diversity_compare=compare).backward()
        for b in _branch_blocks(student):
            for name, seq in b.branches.items():
                grad = seq[0].weight.grad
                assert grad is not None and grad.abs().sum() > 0, (compare, name)
    stats = partner_statistics(student.eval())
    assert set(stats) == {"norm_ratio", "raw_cos", "functional_cos"}
    assert stats["norm_ratio"] > 0



def test_partner_statistics_read_what_the_partners_hold():
    """A split start is a copy of the block at half its BN scale (1/3 against 2/3): raw and
    functional kernels point the same way, the partner's folded kernel is half the block's.
    Flipping the partner's kernel and its BN scale together changes the raw cosine to -1
    and nothing the fused model computes."""
    from conftest import randomize_bn

    student = bpl.extend(randomize_bn(GroupedNet()), init="split").eval()
    stats = partner_statistics(student)
    assert stats["raw_cos"] == pytest.approx(1.0, abs=1e-5)
    assert stats["functional_cos"] == pytest.approx(1.0, abs=1e-5)
    assert stats["norm_ratio"] == pytest.approx(0.5, rel=1e-4)
    with torch.no_grad():
        for _, b in bpl.partner_blocks(student):
            b.partner_conv.weight.neg_()
            b.partner_bn.weight.neg_()
    flipped = partner_statistics(student)
    assert flipped["raw_cos"] == pytest.approx(-1.0, abs=1e-5)
    assert flipped["functional_cos"] == pytest.approx(1.0, abs=1e-5)
    assert flipped["norm_ratio"] == pytest.approx(0.5, rel=1e-4)
    assert partner_statistics(GroupedNet()) == {}  # no partners, nothing to say

def _train_steps(model, pruner, x, steps):
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    for _ in range(steps):
        loss = model(x).logsumexp(1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        pruner.after_step()


def _masked_norms(pruner):
    """Norm of the masked rows of partner and of non-partner filters, over all groups."""
    partner = held = 0.0
    for group in pruner.groups:
        dropped = ~group.keep
        for sl in group.filters:
            rows = sl.module.weight.detach()[sl.idxs[dropped[sl.root]]]
            if sl.partner:
                partner += float(rows.norm())
            else:
                held += float(rows.norm())
    return partner, held


@pytest.mark.parametrize("kind", ["same", "diverse"])
def test_soft_partners_regrow_between_updates_as_in_the_reference(kind):
    torch.manual_seed(0)
    x = torch.randn(8, 3, 16, 16)
    for mode in ("regrow", "masked"):
        torch.manual_seed(0)
        student = bpl.extend(GroupedNet(), partner=kind, init="paper")
        pruner = bpl.SoftPruner(student, x, channel_ratio=0.5, round_to=None, soft_partners=mode)
        _train_steps(student, pruner, x, 3)  # trained a little before the first re-mask
        pruner.update()
        assert _masked_norms(pruner) == (0.0, 0.0)  # a re-mask zeroes partners too
        _train_steps(student, pruner, x, 3)
        partner, held = _masked_norms(pruner)
        assert held == 0.0
        assert (partner > 0.0) == (mode == "regrow"), (mode, partner)
        assert pruner.state_dict()["partners"] == mode
        deploy = pruner.finalize(verify_tol=1e-4)  # the last update zeroes everything: exact removal
        report = bpl.reports(deploy)["soft"]
        assert report.removal_error <= 1e-5
        assert report.updates == 2 and report.soft_partners == mode  # one above, the final one
        assert _masked_norms(pruner) == (0.0, 0.0)
        assert not bpl.partner_blocks(deploy)
        assert report.macs_after < 0.9 * report.macs_before


def test_soft_state_from_before_regrow_resumes_with_partners_held():
    x = torch.randn(4, 3, 16, 16)
    student = bpl.extend(GroupedNet())
    pruner = bpl.SoftPruner(student, x, channel_ratio=0.5, round_to=None)
    assert pruner.soft_partners == "regrow"
    state = pruner.state_dict()
    del state["partners"]  # written by bpl 0.1, whose masks held the partners
    pruner.load_state_dict(state)
    assert pruner.soft_partners == "masked"
    with pytest.raises(bpl.PruningError, match="partners must be one of regrow, masked"):
        bpl.SoftPruner(student, x, channel_ratio=0.5, soft_partners="never")


def test_reinitialize_gives_fresh_weights_at_the_same_widths():
    torch.manual_seed(0)
    pruned = bpl.prune(GroupedNet(), torch.randn(1, 3, 16, 16), flops_reduction=0.5, round_to=None)
    before = {k: v.clone() for k, v in pruned.state_dict().items()}
    reinitialize(pruned)
    after = pruned.state_dict()
    assert {k: v.shape for k, v in before.items()} == {k: v.shape for k, v in after.items()}
    conv = pruned.grouped[0].weight
    assert not torch.equal(before["grouped.0.weight"], conv)
    fan_out = conv.shape[0] * conv.shape[2] * conv.shape[3]
    assert abs(conv.detach().std().item() - (2 / fan_out) ** 0.5) < 0.3 * (2 / fan_out) ** 0.5
    assert torch.equal(after["grouped.1.weight"], torch.ones_like(after["grouped.1.weight"]))
    assert torch.equal(after["grouped.1.running_mean"], torch.zeros_like(after["grouped.1.running_mean"]))
