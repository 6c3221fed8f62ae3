"""The model factory and checkpoints that rebuild pruned / extended / fused models."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import urllib.error

import pytest
import torch
import torchvision
from torch import nn
from torch.nn import functional as F

import bpl
from bpl.errors import BPLError
from conftest import randomize_bn

X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def _train_a_little(student: nn.Module) -> None:
    opt = torch.optim.SGD(student.parameters(), lr=0.05, momentum=0.9)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    student.train()
    for _ in range(2):
        loss = F.cross_entropy(student(x), y) + bpl.diversity_loss(student)
        opt.zero_grad()
        loss.backward()
        opt.step()
    student.eval()


# --------------------------------------------------------------------------- factory


def test_tiny_models():
    tiny = bpl.build_model("tiny_resnet", 7)
    assert 80_000 <= bpl.count_params(tiny) <= 120_000
    assert tiny(torch.randn(2, 3, 64, 64)).shape == (2, 7)
    assert any(isinstance(m, nn.BatchNorm2d) for m in tiny.modules())
    assert bpl.build_model("tiny_vgg", 3)(X).shape == (2, 3)
    assert {"tiny_resnet", "tiny_vgg", "resnet18"} <= set(bpl.list_models())


def test_torchvision_model_by_name():
    model = bpl.build_model("resnet18", 10)
    assert isinstance(model, torchvision.models.ResNet) and model.fc.out_features == 10


def test_unknown_arch():
    with pytest.raises(BPLError, match="unknown architecture 'resnet9000'"):
        bpl.build_model("resnet9000", 10)


def test_pretrained_without_network_names_the_fix(monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torchvision.models, "get_model", offline)
    with pytest.raises(BPLError, match="--weights PATH"):
        bpl.build_model("resnet18", 10, pretrained=True)
    with pytest.raises(BPLError, match="no published weights"):
        bpl.build_model("tiny_resnet", 10, pretrained=True)


def test_weights_file_replaces_the_classifier(tmp_path):
    stock = torchvision.models.resnet18()  # 1000 classes, like torchvision's published file
    path = tmp_path / "resnet18-imagenet.pth"
    torch.save(stock.state_dict(), path)
    model = bpl.build_model("resnet18", 10, weights=path)
    assert model.fc.out_features == 10
    assert torch.equal(model.conv1.weight, stock.conv1.weight)
    assert torch.equal(model.layer4[1].bn2.running_var, stock.layer4[1].bn2.running_var)
    torch.save({"conv1.weight": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(BPLError, match="do not fit ResNet"):
        bpl.build_model("resnet18", 10, weights=tmp_path / "bad.pth")


# --------------------------------------------------------------------------- checkpoints


def test_checkpoints_load_in_a_fresh_process(tmp_path):
    """Pruned, pruned+extended+fused and pruned+extended (for resuming) resnet18."""
    torch.manual_seed(0)
    base = bpl.build_model("resnet18", 10)
    randomize_bn(base)
    pruned = bpl.prune(base, X, flops_reduction=0.5, round_to=4).eval()
    student = bpl.extend(pruned, init="paper")
    _train_a_little(student)
    fused = bpl.fuse(student)
    folded = bpl.fuse(student, fold_bn=True)
    cases = {"pruned": pruned, "fused": fused, "folded": folded, "extended": student}
    expected = {}
    for name, model in cases.items():
        bpl.save_model(model, tmp_path / f"{name}.pt", arch="resnet18", num_classes=10,
                       meta={"epoch": 3, "note": name})
        with torch.no_grad():
            expected[name] = model.eval()(X)
    torch.save({"x": X, "expected": expected}, tmp_path / "io.pt")
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]

    script = textwrap.dedent(f"""
        import sys, torch
        import bpl
        io = torch.load({str(tmp_path / "io.pt")!r}, weights_only=True)
        for name, want in io["expected"].items():
            model, meta = bpl.load_model({str(tmp_path)!r} + f"/{{name}}.pt")
            assert meta["note"] == name and meta["epoch"] == 3 and meta["arch"] == "resnet18"
            assert bool(bpl.partner_blocks(model)) == (name == "extended"), name
            with torch.no_grad():
                got = model.eval()(io["x"])
            err = ((got - want).abs().max() / want.abs().max()).item()
            assert err <= 1e-5, (name, err)
            print(name, err)
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.split()[::2] == list(cases)


def test_loaded_extended_checkpoint_resumes_training(tmp_path):
    torch.manual_seed(0)
    pruned = bpl.prune(bpl.build_model("tiny_resnet", 10), X, channel_ratio=0.4)
    student = bpl.extend(pruned, placement="all")  # partners on the 1x1 shortcut convs too
    _train_a_little(student)  # partners with trained, non-trivial weights
    bpl.save_model(student, tmp_path / "last.pt", arch="tiny_resnet", num_classes=10)
    loaded, _ = bpl.load_model(tmp_path / "last.pt")
    assert [n for n, _ in bpl.partner_blocks(loaded)] == [n for n, _ in bpl.partner_blocks(student)]
    saved = {k: v.clone() for k, v in student.state_dict().items()}
    restored = loaded.state_dict()
    assert saved.keys() == restored.keys()
    assert all(torch.equal(saved[k], restored[k]) for k in saved)
    # the same training step from both gives the same weights: nothing was lost or reset
    torch.manual_seed(1)
    _train_a_little(student)
    torch.manual_seed(1)
    _train_a_little(loaded)
    after, again = student.state_dict(), loaded.state_dict()
    assert all(torch.allclose(after[k].float(), again[k].float(), atol=1e-6) for k in after)
    assert not all(torch.equal(after[k], saved[k]) for k in after)  # the step did train
    assert bpl.relative_error(loaded, bpl.fuse(loaded), X) <= 1e-5


def test_save_overwrites_atomically(tmp_path):
    path = tmp_path / "sub" / "m.pt"
    bpl.save_model(bpl.build_model("tiny_vgg", 10), path, arch="tiny_vgg", num_classes=10)
    bpl.save_model(bpl.build_model("tiny_vgg", 4), path, arch="tiny_vgg", num_classes=4)
    model, meta = bpl.load_model(path)
    assert meta["num_classes"] == 4 and model.classifier.out_features == 4
    assert [p.name for p in path.parent.iterdir()] == ["m.pt"]


def test_bad_checkpoints_name_the_file_and_problem(tmp_path):
    missing = tmp_path / "missing.pt"
    with pytest.raises(BPLError, match="missing.pt does not exist"):
        bpl.load_model(missing)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a torch file at all")
    with pytest.raises(BPLError, match="garbage.pt is not a PyTorch checkpoint"):
        bpl.load_model(garbage)
    plain = tmp_path / "plain.pt"
    torch.save(bpl.build_model("tiny_vgg", 10).state_dict(), plain)
    with pytest.raises(BPLError, match="plain.pt is not a bpl checkpoint"):
        bpl.load_model(plain)

    pruned = bpl.prune(bpl.build_model("tiny_resnet", 10), X, channel_ratio=0.5)
    good = tmp_path / "good.pt"
    bpl.save_model(pruned, good, arch="tiny_resnet", num_classes=10)
    payload = torch.load(good, weights_only=True)
    for arch, match in [("tiny_vgg", "does not match architecture 'tiny_vgg'"),
                        ("resnet34", "do not fit the rebuilt 'resnet34'"),
                        ("nonsense", "unknown architecture 'nonsense'")]:
        wrong = tmp_path / f"wrong-{arch}.pt"
        torch.save({**payload, "arch": arch}, wrong)
        with pytest.raises(BPLError, match=f"wrong-{arch}.pt.*{match}|{match}.*wrong-{arch}.pt"):
            bpl.load_model(wrong)
    with pytest.raises(BPLError, match="a pruned bpl model cannot start a stock one"):
        bpl.build_model("tiny_resnet", 10, weights=good)
    # an unpruned bpl checkpoint (a train run's best.pt) starts a stock model exactly
    full = bpl.build_model("tiny_resnet", 10)
    bpl.save_model(full, tmp_path / "full.pt", arch="tiny_resnet", num_classes=10)
    again = bpl.build_model("tiny_resnet", 10, weights=tmp_path / "full.pt")
    assert all(torch.equal(a, b) for a, b in zip(full.state_dict().values(),
                                                 again.state_dict().values()))
    # one with partners is refused: its state holds the partners' tensors
    extended = tmp_path / "extended.pt"
    bpl.save_model(bpl.extend(bpl.build_model("tiny_resnet", 10)), extended, arch="tiny_resnet",
                   num_classes=10)
    with pytest.raises(BPLError, match="is a bpl checkpoint"):
        bpl.build_model("tiny_resnet", 10, weights=extended)


def test_training_checkpoint_with_numpy_rng_state(tmp_path):
    import random

    import numpy as np

    model = bpl.build_model("tiny_resnet", 10)
    payload = bpl.models.model_payload(model, "tiny_resnet", 10, {"epoch": 1})
    state = {"model": payload, "rng": {"numpy": np.random.get_state(), "python": random.getstate()}}
    bpl.models.atomic_save(state, tmp_path / "last.pt")
    expect_np, expect_py = np.random.random(3).tolist(), [random.random() for _ in range(3)]
    loaded = bpl.models.load_checkpoint(tmp_path / "last.pt")
    np.random.set_state(loaded["rng"]["numpy"])
    random.setstate(loaded["rng"]["python"])
    # the restored states draw what the saved ones drew next
    assert np.random.random(3).tolist() == expect_np
    assert [random.random() for _ in range(3)] == expect_py
    rebuilt, meta = bpl.load_model(tmp_path / "last.pt")  # the model inside a training checkpoint
    assert meta["epoch"] == 1
    assert torch.equal(rebuilt.fc.weight, model.fc.weight)


def test_failed_write_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "m.pt"
    bpl.save_model(bpl.build_model("tiny_vgg", 10), path, arch="tiny_vgg", num_classes=10)

    def broken(obj, f, *args, **kwargs):
        with open(f, "wb") as out:
            out.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken)
    with pytest.raises(OSError, match="disk full"):
        bpl.save_model(bpl.build_model("tiny_vgg", 3), path, arch="tiny_vgg", num_classes=3)
    monkeypatch.undo()
    assert bpl.load_model(path)[1]["num_classes"] == 10
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt"]


@pytest.mark.parametrize("arch, head", [("vgg11_bn", "classifier.6"),
                                        ("mobilenet_v2", "classifier.1")])
def test_replace_classifier_of_vgg_and_mobilenet(arch, head):
    model = getattr(torchvision.models, arch)(num_classes=1000)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    old = model.get_submodule(head)
    out = bpl.models.replace_classifier(model, 1000, 7)
    assert out is model
    new = model.get_submodule(head)
    assert isinstance(new, nn.Linear) and new is not old
    assert (new.in_features, new.out_features) == (old.in_features, 7)
    after = model.state_dict()
    assert set(after) == set(before)
    for key, value in after.items():
        if key.startswith(head + "."):
            assert value.shape[0] == 7, key
        else:
            assert torch.equal(value, before[key]), key
    assert model.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 7)


def test_compress_config_reads_the_baselines_meta_without_its_weights(tmp_path, monkeypatch):
    """resolve_command takes the baseline's data and image size from its meta; the weights
    are mapped, not read (compress reads the file once, for the model)."""
    from bpl.config import resolve_command
    from bpl.models import load_checkpoint, save_model
    from bpl.models.checkpoints import read_meta

    path = tmp_path / "b.pt"
    save_model(bpl.build_model("tiny_resnet", 10), path, arch="tiny_resnet", num_classes=10,
               meta={"data": "digits", "image_size": 24})
    assert read_meta(path) == load_checkpoint(path, model_only=True)["meta"]
    calls = []
    real = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: calls.append(k.get("mmap")) or real(*a, **k))
    cfg = resolve_command("compress", {"baseline": str(path), "flops_reduction": 0.5})
    assert (cfg.data, cfg.image_size) == ("digits", 24) and calls == [True]
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    assert read_meta(tmp_path / "junk.pt") == {}
