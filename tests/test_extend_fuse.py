"""extend / fuse: exactness on real architectures, structure, and the errors users hit."""

from __future__ import annotations

import copy
import pickle
import warnings

import pytest
import torch
import torchvision
from torch import nn

import bpl
from bpl.conformance import float_dtypes, randomize_partners
from bpl.errors import BPLError, InvalidArgumentError, TraceError
from bpl.models import model_from_payload, model_payload
from bpl.partners import ConvPartner, NormSlot, PartnerBlock
from conftest import randomize_bn
from nets import ConvZoo, NoBatchNorm, NormActNet, PreActNet, SharedOutput, Untraceable

ARCHS = {
    "resnet18": (lambda: torchvision.models.resnet18(num_classes=10), 32),
    "resnet50": (lambda: torchvision.models.resnet50(num_classes=10), 32),
    "vgg11_bn": (lambda: torchvision.models.vgg11_bn(num_classes=10), 32),
    "mobilenet_v2": (lambda: torchvision.models.mobilenet_v2(num_classes=10), 32),
    "convzoo": (ConvZoo, 24),
    "normact": (NormActNet, 16),
    "preact": (PreActNet, 16),
}


def _trained_like(student: nn.Module, seed: int = 1) -> nn.Module:
    """Make the partners contribute: random partner BNs and conv-partner scales."""
    return randomize_partners(student, seed)


@pytest.mark.parametrize("name", ARCHS)
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float64, 1e-9)])
def test_fuse_is_exact(name, dtype, tol):
    build, size = ARCHS[name]
    model = randomize_bn(build()).to(dtype).eval()
    x = torch.randn(2, 3, size, size, dtype=dtype)
    student = bpl.extend(model, placement="all")
    assert bpl.relative_error(model, student, x) == 0.0  # init="preserve" is exact
    _trained_like(student)
    assert bpl.relative_error(model, student, x) > 1e-3  # partners now matter
    deploy = bpl.fuse(student)
    assert bpl.relative_error(student, deploy, x) <= tol
    folded = bpl.fuse(student, fold_bn=True)
    assert bpl.relative_error(student, folded, x) <= tol


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2", "convzoo"])
def test_fused_model_loads_into_stock_architecture(name):
    build, size = ARCHS[name]
    model = build()
    student = _trained_like(bpl.extend(model, placement="all")).eval()
    deploy = bpl.fuse(student)
    assert not any(isinstance(m, (PartnerBlock, NormSlot)) for m in deploy.modules())
    assert type(deploy) is type(model)
    shapes = {k: v.shape for k, v in deploy.state_dict().items()}
    assert shapes == {k: v.shape for k, v in model.state_dict().items()}
    assert [n for n, _ in deploy.named_modules()] == [n for n, _ in model.named_modules()]
    fresh = build()
    fresh.load_state_dict(deploy.state_dict(), strict=True)
    x = torch.randn(2, 3, size, size)
    assert bpl.relative_error(deploy, fresh, x) == 0.0


def test_extend_and_fuse_leave_the_input_untouched():
    model = ConvZoo()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    student = bpl.extend(model, placement="all")
    assert not any(isinstance(m, PartnerBlock) for m in model.modules())
    bpl.fuse(_trained_like(student).eval())
    assert len(bpl.partner_blocks(student)) == len(bpl.reports(student)["extend"].extended)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_training_with_diversity_loss_then_fuse_is_exact():
    model = torchvision.models.resnet18(num_classes=4)
    student = bpl.extend(model)
    opt = torch.optim.SGD(student.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 4, (8,))
    student.train()
    partner_before = bpl.partner_blocks(student)[0][1].partner_conv.weight.clone()
    for _ in range(4):
        loss = nn.functional.cross_entropy(student(x), y) + bpl.diversity_loss(student)
        opt.zero_grad()
        loss.backward()
        opt.step()
    block = bpl.partner_blocks(student)[0][1]
    assert not torch.equal(partner_before, block.partner_conv.weight)
    assert block.partner_bn.weight.abs().sum() > 0  # the partner's BN left zero: it learns
    student.eval()
    deploy = bpl.fuse(student)
    assert bpl.relative_error(student, deploy, x) <= 1e-5


def test_paper_default_eligibility_on_resnet50():
    student = bpl.extend(torchvision.models.resnet50())
    report = bpl.reports(student)["extend"]
    assert len(report.extended) == 16  # the 3x3 conv of each bottleneck
    assert all(name.endswith("conv2") for name, _ in report.extended)
    assert "conv1" in report.skipped and "(7, 7)" in report.skipped["conv1"]
    assert "kernel (1, 1)" in report.skipped["layer1.0.conv1"]
    assert "downsample" in report.skipped["layer1.0.downsample.0"] or "kernel" in report.skipped[
        "layer1.0.downsample.0"
    ]
    assert "extended 16 conv->BN pairs" in str(report)


def test_kernel_sizes_parameter_forms():
    model = ConvZoo()
    assert len(bpl.find_conv_bn_pairs(model, placement=[5]).extended) == 1
    assert len(bpl.find_conv_bn_pairs(model, placement=[(1, 3), (3, 1)]).extended) == 2
    by_groups = bpl.find_conv_bn_pairs(model, placement=lambda c: c.groups > 1)
    assert len(by_groups.extended) == 2


def test_conv_feeding_something_else_gets_a_conv_partner_or_is_left_alone():
    student = bpl.extend(SharedOutput())
    assert bpl.reports(student)["extend"].sites == {"conv1": "conv", "conv2": "conv+bn"}
    assert "feeds bn1, add" in bpl.reports(student)["extend"].without_bn["conv1"]
    plain = bpl.extend(SharedOutput(), without_bn=False)
    assert [c for c, _ in bpl.reports(plain)["extend"].extended] == ["conv2"]
    assert "feeds" in bpl.reports(plain)["extend"].skipped["conv1"]


def test_norm_act_layers_count_as_batchnorm():
    model = randomize_bn(NormActNet()).eval()
    student = bpl.extend(model)
    assert len(bpl.reports(student)["extend"].extended) == 2
    deploy = bpl.fuse(_trained_like(student).eval())
    assert type(deploy.bn1) is type(model.bn1)
    x = torch.randn(2, 3, 12, 12)
    assert bpl.relative_error(student, deploy, x) <= 1e-5


def test_paper_init_halves_the_block():
    model = randomize_bn(ConvZoo())
    student = bpl.extend(model, init="paper", placement=[5])
    block = bpl.partner_blocks(student)[0][1]
    assert torch.allclose(block.partner_bn.weight, torch.full_like(block.partner_bn.weight, 0.5))
    assert torch.allclose(block.bn.weight, model.body[4].weight * 0.5)


def test_split_init_is_exact_and_trains_both_kernels_from_the_first_step():
    torch.manual_seed(0)
    model = randomize_bn(torchvision.models.resnet18(num_classes=5))
    x = torch.randn(4, 3, 32, 32)
    student = bpl.extend(model, init="split")
    blocks = bpl.partner_blocks(student)
    # exact in eval mode (split in float64: rounding only; in float32 the split scales and
    # the kernels round, 1.4e-6 on an AVX2-only AMD EPYC, under 1e-6 on a Xeon) and in
    # training mode (same batch statistics in both branches)
    wide = copy.deepcopy(model).double().eval()
    exact = bpl.relative_error(wide, bpl.extend(copy.deepcopy(wide), init="split"), x.double())
    assert exact <= 1e-9
    assert bpl.relative_error(model.eval(), student.eval(), x) <= 1e-5
    model.train(), student.train()
    assert torch.allclose(model(x), student(x), rtol=1e-4, atol=1e-5)
    b = blocks[0][1]
    assert torch.equal(b.partner_conv.weight, b.conv.weight)
    assert blocks[0][0] == "layer1.0.conv1"
    assert torch.allclose(b.bn.weight + b.partner_bn.weight, model.layer1[0].bn1.weight)
    assert torch.allclose(b.bn.bias + b.partner_bn.bias, model.layer1[0].bn1.bias)
    # one step: both kernels get a gradient, in the ratio of their shares
    student(x).logsumexp(1).mean().backward()
    g, gp = b.conv.weight.grad, b.partner_conv.weight.grad
    assert gp.abs().sum() > 0
    share = bpl.partners.DEFAULT_SHARE
    assert torch.allclose(gp * (1 - share), g * share, rtol=1e-3, atol=1e-7)
    # ten training steps: the unequal gradients pull the copies apart
    before = bpl.diversity_loss(student).item()
    opt = torch.optim.SGD(student.parameters(), lr=0.05, momentum=0.9)
    y = torch.arange(4) % 5
    for _ in range(10):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(student(x), y) + bpl.diversity_loss(student)
        loss.backward()
        opt.step()
    cos = [nn.functional.cosine_similarity(blk.conv.weight.flatten(),
                                           blk.partner_conv.weight.flatten(), 0).item()
           for _, blk in blocks]
    assert max(cos) < 0.9995 and bpl.diversity_loss(student).item() < before


def test_split_at_one_half_is_refused():
    with pytest.raises(BPLError, match="partner_share must be .*identical gradients") as err:
        bpl.extend(ConvZoo(), init="split", partner_share=0.5)
    assert err.value.param == "partner_share"


def test_untraceable_model_names_the_module():
    with pytest.raises(TraceError, match=r"module 'gate' stopped the trace"):
        bpl.extend(Untraceable())


def test_model_without_pairs_is_a_clear_error():
    with pytest.raises(BPLError, match="no eligible conv->BatchNorm2d pair"):
        bpl.extend(NoBatchNorm(), without_bn=False)
    with pytest.raises(BPLError, match="placement='all'"):
        bpl.extend(ConvZoo(), placement=[7])


def test_extending_twice_is_an_error():
    student = bpl.extend(ConvZoo())
    with pytest.raises(BPLError, match="already extended"):
        bpl.extend(student)


def test_fusing_without_partners_is_an_error():
    with pytest.raises(BPLError, match="no partner blocks"):
        bpl.fuse(ConvZoo())


def test_fuse_in_training_mode_warns():
    student = bpl.extend(ConvZoo()).train()
    with pytest.warns(UserWarning, match="running statistics"):
        bpl.fuse(student)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bpl.fuse(student.eval())


def test_bad_init_is_rejected():
    with pytest.raises(ValueError, match="init"):
        bpl.extend(ConvZoo(), init="zeros")


def test_verify_raises_on_mismatch():
    a, b = ConvZoo().eval(), ConvZoo().eval()
    x = torch.randn(2, 3, 16, 16)
    with pytest.raises(bpl.VerificationError, match="relative error"):
        bpl.verify(a, b, x)
    tiny = bpl.relative_error(a.double(), a.float().double(), x.double())  # fp32 rounding only
    assert bpl.verify(a.double(), b.double(), x.double(), verify_tol=10.0) > 1e-3 > tiny


def test_verify_refuses_nan_outputs():
    a = ConvZoo().eval()
    broken = copy.deepcopy(a)
    with torch.no_grad():
        next(broken.parameters()).fill_(float("nan"))
    x = torch.randn(2, 3, 16, 16)
    with pytest.raises(bpl.VerificationError, match="relative error nan"):
        bpl.verify(a, broken, x)
    with pytest.raises(bpl.VerificationError, match="relative error nan"):
        bpl.verify(broken, a, x)


# --------------------------------------------------------------------------- moving a partner model


def test_norm_act_model_moved_to_float64_after_extend_fuses_in_float64():
    model = randomize_bn(NormActNet()).eval()
    student = _trained_like(bpl.extend(model, placement="all")).double()
    assert float_dtypes(student) == {torch.float64}
    deploy = bpl.fuse(student)
    assert float_dtypes(deploy) == {torch.float64}
    assert type(deploy.bn1) is type(model.bn1) and isinstance(deploy.bn1.act, nn.ReLU)
    x = torch.randn(2, 3, 12, 12, dtype=torch.float64)
    assert bpl.relative_error(student, deploy, x) <= 1e-12
    fresh = NormActNet().double()
    fresh.load_state_dict(deploy.state_dict(), strict=True)


def test_norm_act_tail_with_parameters_travels_and_is_not_duplicated():
    model = NormActNet()
    model.bn1.act = nn.PReLU(8)  # an activation with a parameter
    student = bpl.extend(model)
    named = list(student.named_parameters(remove_duplicate=False))
    assert len({id(p) for _, p in named}) == len(named)  # an optimizer sees each once
    assert len(student.state_dict()) == len(dict(student.named_parameters())) + len(
        dict(student.named_buffers()))
    student = student.double()
    deploy = bpl.fuse(student.eval())
    assert float_dtypes(deploy) == {torch.float64}
    assert torch.equal(deploy.bn1.act.weight, student.bn1.tail[1].weight)
    again = bpl.extend(model).double()
    again.load_state_dict(student.state_dict(), strict=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_norm_act_model_moved_to_cuda_after_extend_fuses_on_cuda():
    student = _trained_like(bpl.extend(randomize_bn(NormActNet()), placement="all")).cuda()
    deploy = bpl.fuse(student.eval())
    assert {t.device.type for t in [*deploy.parameters(), *deploy.buffers()]} == {"cuda"}
    x = torch.randn(2, 3, 12, 12, device="cuda")
    assert bpl.relative_error(student, deploy, x) <= 1e-5


def test_fuse_finds_slots_in_copies_of_the_model():
    student = _trained_like(bpl.extend(randomize_bn(NormActNet()))).eval()
    x = torch.randn(2, 3, 12, 12)
    for clone in (copy.deepcopy(student), pickle.loads(pickle.dumps(student))):
        assert bpl.relative_error(student, bpl.fuse(clone), x) <= 1e-5
    student.bn1 = nn.Identity()  # the slot is gone: say so
    with pytest.raises(BPLError, match="lost its NormSlot"):
        bpl.fuse(student)


# --------------------------------------------------------------------------- convs without BN


def test_pre_activation_convs_get_conv_partners():
    student = bpl.extend(PreActNet(), placement="all")
    kinds = bpl.reports(student)["extend"].sites
    assert kinds == {"stem": "conv", "conv1": "conv+bn", "conv2": "conv", "conv3": "conv",
                     "trans": "conv+bn", "conv4": "conv"}
    assert "feeds cat" in bpl.reports(student)["extend"].without_bn["conv3"]
    assert isinstance(student.conv2, ConvPartner) and student.conv2.kind == "same"
    assert student.conv2.slot_key is None
    assert "4 convs without BN" in str(bpl.reports(student)["extend"])
    # the conv partner adds no bias the conv lacks: fused shapes are the stock ones
    assert student.conv2.partner_conv.bias is None
    deploy = bpl.fuse(_trained_like(student).eval())
    fresh = PreActNet()
    fresh.load_state_dict(deploy.state_dict(), strict=True)
    x = torch.randn(2, 3, 16, 16)
    assert bpl.relative_error(student, fresh, x) <= 1e-5


@pytest.mark.parametrize("init", ["preserve", "split", "paper"])
def test_conv_partner_inits(init):
    model = randomize_bn(PreActNet()).eval()
    x = torch.randn(4, 3, 16, 16)
    student = bpl.extend(model, init=init)
    block = student.conv2
    if init == "preserve":
        assert bpl.relative_error(model, student, x) == 0.0
        assert not block.partner_scale.weight.any()
    elif init == "split":
        assert bpl.relative_error(model, student, x) <= 1e-6
        model.train(), student.train()
        assert torch.allclose(model(x), student(x), rtol=1e-4, atol=1e-5)
        assert torch.allclose(block.partner_conv.weight * (1 - bpl.partners.DEFAULT_SHARE),
                              block.conv.weight)
    else:
        assert bpl.relative_error(model, student, x) > 1e-3
        assert torch.allclose(block.conv.weight, model.conv2.weight * 0.5)
    # training moves the partner (the scale first under "preserve"), and fusion stays exact
    opt = torch.optim.SGD(student.parameters(), lr=0.05, momentum=0.9)
    y = torch.arange(4) % 5
    student.train()
    for _ in range(3):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(student(x), y) + bpl.diversity_loss(student)
        loss.backward()
        opt.step()
    assert block.partner_scale.weight.abs().sum() > 0
    student.eval()
    assert bpl.relative_error(student, bpl.fuse(student), x) <= 1e-5
    assert bpl.relative_error(student, bpl.fuse(student, fold_bn=True), x) <= 1e-5


def test_conv_without_bias_or_bn_fuses_without_a_bias():
    student = _trained_like(bpl.extend(PreActNet())).eval()
    deploy = bpl.fuse(student, fold_bn=True)
    assert deploy.conv2.bias is None and deploy.conv4.bias is not None


def test_conv_partner_checkpoint_rebuilds_for_resuming(tmp_path):
    torch.manual_seed(0)
    model = torchvision.models.squeezenet1_1(num_classes=4)  # convs with a bias and no BN
    student = _trained_like(bpl.extend(model)).eval()
    assert set(bpl.reports(student)["extend"].sites.values()) == {"conv"}
    payload = model_payload(student, "squeezenet1_1", 4)
    assert all(bn is None and kind == "same" for _, bn, kind in payload["extended"])
    bpl.save_model(student, tmp_path / "last.pt", arch="squeezenet1_1", num_classes=4)
    loaded, _ = bpl.load_model(tmp_path / "last.pt")
    assert bpl.reports(loaded)["extend"].sites == bpl.reports(student)["extend"].sites
    again, _ = model_from_payload(payload)
    x = torch.randn(1, 3, 64, 64)
    assert bpl.relative_error(student, loaded.eval(), x) == 0.0
    assert bpl.relative_error(student, again.eval(), x) == 0.0
    assert bpl.relative_error(student, bpl.fuse(loaded.eval()), x) <= 1e-5


def test_torch_pruning_sees_through_conv_partners():
    student = bpl.extend(randomize_bn(PreActNet()), placement="all")
    pruned = bpl.prune(student, torch.randn(1, 3, 16, 16), channel_ratio=0.25)
    for _, block in bpl.partner_blocks(pruned):
        assert block.partner_conv.weight.shape == block.conv.weight.shape
        if isinstance(block, ConvPartner):
            assert block.partner_scale.out_channels == block.conv.out_channels
    assert pruned.conv2.conv.out_channels < 8
    x = torch.randn(2, 3, 16, 16)
    pruned = _trained_like(pruned).eval()
    assert bpl.relative_error(pruned, bpl.fuse(pruned), x) <= 1e-5


def test_soft_pruning_covers_conv_partners():
    student = bpl.extend(randomize_bn(PreActNet()), placement="all")
    pruner = bpl.SoftPruner(student, torch.randn(1, 3, 16, 16), channel_ratio=0.5)
    roots = {g.deploy_name for g in pruner.groups}
    assert roots & {"stem", "conv2", "conv3", "conv4"}  # conv partners are roots of groups
    deploy = pruner.finalize()
    assert not bpl.partner_blocks(deploy)
    assert bpl.reports(deploy)["soft"]["relative_error"] <= 1e-5


def test_bad_arguments_are_invalid_argument_errors():
    with pytest.raises(InvalidArgumentError, match="granularity"):
        bpl.diversity_loss(bpl.extend(ConvZoo()), granularity="layer")
    with pytest.raises(InvalidArgumentError, match="init"):
        bpl.extend(PreActNet(), init="zeros")


def _twin_students(net: nn.Module):
    """The same extended model twice, with trained-like partners: two-branch and one-conv."""
    two = randomize_partners(bpl.extend(net, placement="all", init="split"), 0).double()
    one = copy.deepcopy(two)
    blocks = [b for _, b in bpl.partner_blocks(one) if isinstance(b, PartnerBlock)]
    for b in blocks:
        b.one_conv = True
    return two, one, blocks


def test_one_conv_matches_two_convs_in_training_and_eval():
    """Outputs, gradients and both BNs' running statistics after a few SGD steps agree to
    fp64 rounding; the stacked path is taken in training for groups == 1 only."""
    torch.manual_seed(0)
    two, one, blocks = _twin_students(ConvZoo())
    taken = [b._can_stack() for b in blocks]
    assert any(taken) and not all(taken)  # ConvZoo has grouped and depthwise convs too
    assert not any(b._can_stack() for b in copy.deepcopy(one).eval().modules()
                   if isinstance(b, PartnerBlock))  # eval (and so Torch-Pruning's trace): two
    opts = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in (two, one)]
    for _ in range(3):
        x = torch.randn(4, 3, 20, 20, dtype=torch.float64)
        outs = []
        for model, opt in zip((two, one), opts):
            opt.zero_grad()
            out = model(x)
            (out.square().mean() + bpl.diversity_loss(model)).backward()
            opt.step()
            outs.append(out)
        torch.testing.assert_close(outs[1], outs[0], rtol=1e-12, atol=1e-12)
    for (name, a), (_, b) in zip(two.named_parameters(), one.named_parameters(), strict=True):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-10, atol=1e-12, msg=name)
    state_two, state_one = two.state_dict(), one.state_dict()
    assert list(state_one) == list(state_two)
    for key in state_two:  # running_mean, running_var, num_batches_tracked of both BNs
        torch.testing.assert_close(state_one[key], state_two[key], rtol=1e-10, atol=1e-12, msg=key)
    assert int(state_one["stem.0.partner_bn.num_batches_tracked"]) == 3
    x = torch.randn(2, 3, 20, 20, dtype=torch.float64)
    two.eval(), one.eval()
    torch.testing.assert_close(one(x), two(x), rtol=1e-12, atol=1e-12)
    deploy = bpl.fuse(one)  # the fold is the same algebra: exact
    assert bpl.relative_error(one, deploy, x) < 1e-12


def test_one_conv_with_cumulative_momentum_and_the_extend_option():
    torch.manual_seed(0)
    net = torchvision.models.resnet18(num_classes=3)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None  # a cumulative average: needs num_batches_tracked per BN
    two = bpl.extend(net, init="split").double()
    one = bpl.extend(net, init="split", one_conv=True).double()
    assert all(b.one_conv for _, b in bpl.partner_blocks(one))
    for _ in range(2):
        x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
        torch.testing.assert_close(one(x), two(x), rtol=1e-12, atol=1e-12)
    for key, value in two.state_dict().items():
        torch.testing.assert_close(one.state_dict()[key], value, rtol=1e-12, atol=1e-12)


def test_torch_pruning_sees_one_conv_partners_as_two():
    """Pruning traces in eval mode, where one-conv blocks run their two branches, so a
    partner's channels go with its block's, and the pruned one-conv model still trains."""
    student = bpl.extend(randomize_bn(NormActNet()), one_conv=True)
    pruned = bpl.prune(student, torch.randn(1, 3, 16, 16), channel_ratio=0.5)
    blocks = [b for _, b in bpl.partner_blocks(pruned)]
    assert blocks and all(b.one_conv for b in blocks)
    assert pruned.conv1.conv.out_channels < 8
    for b in blocks:
        assert b.partner_conv.weight.shape == b.conv.weight.shape
        assert b.partner_bn.num_features == b.bn.num_features == b.conv.out_channels
    pruned.train()(torch.randn(2, 3, 16, 16)).sum().backward()
    assert all(b._can_stack() for b in blocks)
