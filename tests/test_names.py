"""One word for one thing (issue 28): the new public names work without a warning, the old
ones still work for one release with a DeprecationWarning, and every report of a model is
found in one place, ``bpl.reports(model)``."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import bpl
from bpl.conformance import check_model
from bpl.deprecation import REMOVED_IN
from bpl.engine import Step
from bpl.errors import BPLError
from bpl.exporting import onnx_module
from conftest import randomize_bn
from nets import ConvZoo, PreActNet

X = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))


@pytest.fixture
def no_deprecation():
    """The test uses only the new names: none of bpl's deprecation warnings may come."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    ours = [str(w.message) for w in caught if f"goes in bpl {REMOVED_IN}" in str(w.message)]
    assert not ours


def _student() -> nn.Module:
    torch.manual_seed(0)
    return bpl.extend(randomize_bn(PreActNet()), placement="all").eval()


def test_soft_pruner_takes_the_fraction_removed_as_prune_does(no_deprecation):
    pruner = bpl.SoftPruner(_student(), X, channel_ratio=0.25, soft_every=2,
                            soft_partners="masked", round_to=None)
    assert pruner.channel_ratio == 0.25 and pruner.soft_every == 2
    assert pruner.soft_partners == "masked"
    assert not pruner.epoch_end(0) and pruner.epoch_end(1)  # every 2 epochs
    deploy = pruner.finalize(verify_tol=1e-4)
    report = bpl.reports(deploy)["soft"]
    assert isinstance(report, bpl.SoftReport) and report.channel_ratio == 0.25
    assert report["channel_ratio"] == 0.25 and report.relative_error <= 1e-4


def test_soft_pruner_old_keywords_warn_and_convert():
    with pytest.warns(DeprecationWarning, match=r"keep_ratio.*channel_ratio=1 - k"):
        old = bpl.SoftPruner(_student(), X, keep_ratio=0.75, round_to=None)
    new = bpl.SoftPruner(_student(), X, channel_ratio=0.25, round_to=None)
    assert old.channel_ratio == 0.25
    old.update(), new.update()
    assert {k: int(v.sum()) for k, v in old.masks.items()} == \
           {k: int(v.sum()) for k, v in new.masks.items()}
    assert old.state_dict()["keep_ratio"] == new.state_dict()["keep_ratio"] == 0.75  # format kept
    with pytest.warns(DeprecationWarning, match=r"SoftPruner\(every=\).*soft_every="):
        every = bpl.SoftPruner(_student(), X, channel_ratio=0.5, every=3)
    assert every.soft_every == 3
    with pytest.warns(DeprecationWarning, match=r"SoftPruner\(partners=\).*soft_partners="):
        masked = bpl.SoftPruner(_student(), X, channel_ratio=0.5, partners="masked")
    assert masked.soft_partners == "masked"
    for attribute, value in (("keep_ratio", 0.75), ("every", 1), ("partners", "regrow")):
        with pytest.warns(DeprecationWarning, match=f"SoftPruner.{attribute}"):
            assert getattr(old, attribute) == value
    with pytest.warns(DeprecationWarning, match=r"finalize\(tol=\).*verify_tol="):
        deploy = old.finalize(tol=1e-4)
    with pytest.warns(DeprecationWarning, match=r'SoftPruner.report.*bpl.reports\(deployed\)\["soft"\]'):
        report = old.report
    assert report is bpl.reports(deploy)["soft"]
    with pytest.warns(DeprecationWarning, match="SoftReport.keep_ratio"):
        assert report.keep_ratio == 0.75
    with pytest.warns(DeprecationWarning, match=r'SoftReport\["keep_ratio"\]'):
        assert report["keep_ratio"] == 0.75
    with pytest.raises(BPLError, match="give channel_ratio only"), \
            pytest.warns(DeprecationWarning):
        bpl.SoftPruner(_student(), X, channel_ratio=0.5, keep_ratio=0.5)
    with pytest.raises(BPLError, match="give soft_every= only"):
        bpl.SoftPruner(_student(), X, channel_ratio=0.5, every=2, soft_every=2)


def test_extend_takes_the_config_names(no_deprecation):
    paper = bpl.extend(ConvZoo(), placement="paper", init="split", partner_share=0.25)
    sizes = bpl.extend(ConvZoo(), placement=(3, 5))
    assert bpl.reports(paper)["extend"].extended == bpl.reports(sizes)["extend"].extended
    everywhere = bpl.extend(ConvZoo(), placement="all")
    assert len(bpl.reports(everywhere)["extend"].extended) > len(
        bpl.reports(paper)["extend"].extended)
    assert bpl.find_conv_bn_pairs(ConvZoo(), "all").extended == \
           bpl.reports(everywhere)["extend"].extended
    block = next(b for _, b in bpl.partner_blocks(paper) if hasattr(b, "partner_bn"))
    assert torch.allclose(block.partner_bn.weight, 0.25 * block.bn.weight / 0.75)
    with pytest.raises(bpl.InvalidArgumentError, match="placement must be one of paper, all"):
        bpl.extend(ConvZoo(), placement="papre")


def test_extend_old_keywords_warn_and_work():
    with pytest.warns(DeprecationWarning, match=r"extend\(kernel_sizes=\).*placement="):
        old = bpl.extend(ConvZoo(), kernel_sizes=None)
    assert bpl.reports(old)["extend"].extended == \
           bpl.reports(bpl.extend(ConvZoo(), placement="all"))["extend"].extended
    with pytest.warns(DeprecationWarning, match=r"extend\(share=\).*partner_share="):
        bpl.extend(ConvZoo(), init="split", share=0.25)
    with pytest.warns(DeprecationWarning, match=r"find_conv_bn_pairs\(kernel_sizes=\)"):
        assert len(bpl.find_conv_bn_pairs(ConvZoo(), kernel_sizes=[5]).extended) == 1
    with pytest.raises(bpl.InvalidArgumentError, match="give placement= only"):
        bpl.extend(ConvZoo(), kernel_sizes=None, placement="all")
    with pytest.warns(DeprecationWarning, match=r"check_model\(kernel_sizes=\)"):
        result = check_model(ConvZoo, X, kernel_sizes=(3, 5), do_prune=False, do_onnx=False)
    assert result["checks"]["fuse_fp64"]["ok"]


def test_loss_terms_both_take_their_weight(no_deprecation):
    student = bpl.extend(ConvZoo(), placement="all")
    one = bpl.diversity_loss(student, diversity_weight=1.0, diversity_compare="functional")
    half = bpl.diversity_loss(student, diversity_weight=0.5, diversity_compare="functional")
    assert half.item() == pytest.approx(0.5 * one.item())
    term = bpl.Diversity(diversity_weight=0.5, granularity="stage", diversity_compare="functional")
    assert term(Step(student, X, None, None, None)).item() == pytest.approx(half.item())
    s, t = torch.randn(4, 5), torch.randn(4, 5)
    plain = bpl.distillation_loss(s, t, 2.0)
    assert bpl.distillation_loss(s, t, distill_temperature=2.0, distill_weight=0.5).item() == \
           pytest.approx(0.5 * plain.item())
    kd = bpl.Distillation(nn.Identity(), distill_temperature=2.0, distill_weight=0.5)
    assert (kd.distill_temperature, kd.distill_weight) == (2.0, 0.5)
    with pytest.raises(bpl.InvalidArgumentError, match="diversity_compare must be one of"):
        bpl.Diversity(diversity_compare="folded")


def test_loss_old_keywords_warn_and_work():
    student = bpl.extend(ConvZoo(), placement="all")
    new = bpl.diversity_loss(student, diversity_weight=0.5, diversity_compare="functional")
    with pytest.warns(DeprecationWarning, match=r"diversity_loss\(weight=\)"), \
            pytest.warns(DeprecationWarning, match=r"diversity_loss\(compare=\)"):
        old = bpl.diversity_loss(student, weight=0.5, compare="functional")
    assert old.item() == new.item()
    s, t = torch.randn(4, 5), torch.randn(4, 5)
    with pytest.warns(DeprecationWarning, match=r"distillation_loss\(temperature=\)"):
        assert bpl.distillation_loss(s, t, temperature=3.0).item() == \
               bpl.distillation_loss(s, t, 3.0).item()
    with pytest.warns(DeprecationWarning, match=r"Distillation\(temperature=\)"), \
            pytest.warns(DeprecationWarning, match=r"Distillation\(weight=\)"):
        kd = bpl.Distillation(nn.Identity(), temperature=3.0, weight=0.25)
    assert (kd.distill_temperature, kd.distill_weight) == (3.0, 0.25)
    with pytest.warns(DeprecationWarning, match="Distillation.temperature"):
        assert kd.temperature == 3.0
    with pytest.warns(DeprecationWarning, match="Distillation.weight"):
        assert kd.weight == 0.25


def test_verify_and_export_take_verify_tol(tmp_path, no_deprecation):
    model = randomize_bn(PreActNet()).eval()
    assert bpl.verify(model, model, X, verify_tol=0.0) == 0.0
    with pytest.raises(bpl.VerificationError):
        bpl.verify(model, ConvZoo().eval(), X, verify_tol=1e-9)
    bpl.export(model, X[:1], tmp_path / "m.pt", format="torchscript", verify_tol=1e-4)
    assert (tmp_path / "m.pt").exists()


def test_verify_and_export_old_tol_warns(tmp_path):
    model = randomize_bn(PreActNet()).eval()
    with pytest.warns(DeprecationWarning, match=r"verify\(tol=\).*verify_tol="):
        assert bpl.verify(model, model, X, tol=0.0) == 0.0
    with pytest.warns(DeprecationWarning, match=r"export\(tol=\).*verify_tol="):
        bpl.export(model, X[:1], tmp_path / "m.pt", format="torchscript", tol=1e-4)
    assert (tmp_path / "m.pt").exists()
    pytest.importorskip("onnxruntime")
    with pytest.warns(DeprecationWarning, match=r"onnx_module\(tol=\)"):
        onnx_module(model, X[:1], tol=1e-4)


def test_save_model_takes_the_model_first(tmp_path, no_deprecation):
    model = bpl.build_model("tiny_vgg", 4)
    path = bpl.save_model(model, tmp_path / "m.pt", arch="tiny_vgg", num_classes=4)
    assert bpl.load_model(path)[1]["num_classes"] == 4


def test_save_model_old_order_warns_and_works(tmp_path):
    model = bpl.build_model("tiny_vgg", 4)
    with pytest.warns(DeprecationWarning, match=r"save_model\(path, model\)"):
        path = bpl.save_model(tmp_path / "m.pt", model, arch="tiny_vgg", num_classes=4)
    assert path == tmp_path / "m.pt"
    with pytest.warns(DeprecationWarning):
        bpl.save_model(str(tmp_path / "s.pt"), model, arch="tiny_vgg", num_classes=4)
    loaded, meta = bpl.load_model(tmp_path / "s.pt")
    assert meta["num_classes"] == 4
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                  loaded.state_dict().values(), strict=True))


def test_step_levels_takes_prune_steps():
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        new = bpl.step_levels(0.9, prune_steps=3)
    with pytest.warns(DeprecationWarning, match=r"step_levels\(steps=\).*prune_steps="):
        assert bpl.step_levels(0.9, steps=3) == new


def test_every_report_of_a_model_is_in_one_place(tmp_path, no_deprecation):
    torch.manual_seed(0)
    model = bpl.build_model("tiny_resnet", 10).eval()
    x = torch.randn(1, 3, 32, 32)
    assert bpl.reports(model) == {}
    pruned = bpl.prune(model, x, channel_ratio=0.5)
    assert list(bpl.reports(pruned)) == ["prune"] and bpl.reports(model) == {}
    student = bpl.extend(pruned)
    got = bpl.reports(student)
    assert list(got) == ["prune", "extend"]
    assert isinstance(got["prune"], bpl.PruneReport) and isinstance(got["extend"], bpl.ExtendReport)
    assert list(bpl.reports(pruned)) == ["prune"]  # the copy got its own, the original kept its
    # the attributes of 0.1 still hold the same reports (until 0.3)
    assert student.bpl_report is got["extend"] and student.bpl_prune_report is got["prune"]
    deploy = bpl.fuse(student)
    assert list(bpl.reports(deploy)) == ["prune"] and not hasattr(deploy, "bpl_report")
    bpl.save_model(student, tmp_path / "s.pt", arch="tiny_resnet", num_classes=10)
    loaded, _ = bpl.load_model(tmp_path / "s.pt")
    assert bpl.reports(loaded)["extend"].sites == got["extend"].sites
    # a data-parallel wrapper is looked through
    assert bpl.reports(nn.DataParallel(student)).keys() == got.keys()
    soft = bpl.SoftPruner(bpl.extend(model), x, channel_ratio=0.5).finalize()
    assert list(bpl.reports(soft)) == ["soft"]
