"""A newcomer's first hour: their own image folder through the `bpl` command, and bad inputs.

Each test is one trap from issue 15, on a small generated image tree.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

import bpl
from bpl.cli import main

COLOURS = [(200, 30, 30), (30, 200, 30), (30, 30, 200)]
QUICK = ["--image-size", "16", "--batch-size", "8", "--quiet", "--no-latency"]
TINY = ["--arch", "tiny_resnet", "--epochs", "1"]


def run_cli(*args) -> int:
    return main([str(a) for a in args])


def make_tree(root: Path, classes: int = 3, per_class: int = 10, size: int = 20,
              names: list[str] | None = None) -> Path:
    """``root/<class>/<i>.png``: noisy solid colours, one colour per class."""
    g = torch.Generator().manual_seed(0)
    names = names or [f"class{c}" for c in range(classes)]
    for c, name in enumerate(names):
        (root / name).mkdir(parents=True)
        colour = torch.tensor(COLOURS[c % len(COLOURS)]) // (1 + c // len(COLOURS))
        for i in range(per_class):
            noise = torch.randint(0, 40, (size, size, 3), generator=g)
            pixels = (noise + colour).clamp(0, 255).to(torch.uint8).numpy()
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    return make_tree(tmp_path_factory.mktemp("data") / "scenes")


@pytest.fixture(scope="module")
def trained(tree, tmp_path_factory) -> Path:
    """A baseline trained on the folder given with --data-root alone."""
    out = tmp_path_factory.mktemp("runs") / "base"
    assert run_cli("train", "--data-root", tree, *QUICK, *TINY, "--out", out) == 0
    return out


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("bpl: error:") and len(err.splitlines()) == 1, err
    return err


def test_a_data_root_alone_means_that_folder(trained):
    config = json.loads((trained / "config.json").read_text())
    split = json.loads((trained / "split.json").read_text())
    assert config["data"] == "imagefolder"
    assert split["classes"] == ["class0", "class1", "class2"]


def test_resume_reads_the_runs_own_config(trained, tmp_path, capsys):
    out = tmp_path / "run"
    root = json.loads((trained / "config.json").read_text())["data_root"]
    assert run_cli("train", "--data-root", root, *QUICK, *TINY, "--out", out) == 0
    # more epochs, nothing else: the run's own settings (folder, size, arch) are used
    assert run_cli("train", "--out", out, "--resume", "--epochs", "2", "--quiet") == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert [h["epoch"] for h in metrics["history"]] == [1, 2]
    assert metrics["config"]["data"] == "imagefolder" and metrics["segments"] == 2
    assert metrics["wall_time_s"] >= sum(h["epoch_time_s"] for h in metrics["history"])
    assert json.loads((out / "config.json").read_text())["epochs"] == 2
    # a setting the run was computed with cannot change under --resume
    assert run_cli("train", "--out", out, "--resume", "--epochs", "3", "--lr", "0.5",
                   "--quiet") == 1
    err = one_line_error(capsys)
    assert "--lr" in err and "--resume" in err and "--epochs" in err
    # the saved config.json is a valid --config for a new run
    assert run_cli("train", "--config", out / "config.json", "--out", tmp_path / "again",
                   "--quiet", "--epochs", "1") == 0


def test_train_config_has_no_compress_only_fields(trained):
    config = json.loads((trained / "config.json").read_text())
    assert config["command"] == "train"
    assert not {"flops_reduction", "diversity_weight", "baseline", "partners"} & set(config)


def test_errors_name_the_commands_flags(tmp_path, capsys):
    assert run_cli("train", "--data", "imagefolder", *QUICK, "--out", tmp_path / "a") == 1
    err = one_line_error(capsys)
    assert "--data-root" in err and "root=" not in err
    seven = make_tree(tmp_path / "seven", classes=7, per_class=3)
    assert run_cli("train", "--data", "ucm", "--data-root", seven, *QUICK,
                   "--out", tmp_path / "b") == 1
    err = one_line_error(capsys)
    assert "--data imagefolder" in err and "name=" not in err and "--data-root" in err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_every_bad_image_is_named_and_skip_bad_does_not_advise_itself(tmp_path, capsys,
                                                                      caplog):
    root = make_tree(tmp_path / "imgs", per_class=4)
    for c in range(3):
        (root / f"class{c}" / "broken.jpg").write_bytes(b"not an image")
    assert run_cli("train", "--data-root", root, *QUICK, *TINY, "--out", tmp_path / "a") == 1
    err = one_line_error(capsys)
    assert "3 unreadable" in err and "--skip-bad" in err and "skip_bad" not in err
    assert all(f"class{c}/broken.jpg" in err for c in range(3))
    assert run_cli("train", "--data-root", root, *QUICK, *TINY, "--skip-bad",
                   "--out", tmp_path / "b") == 0
    logged = caplog.text
    assert "class2/broken.jpg" in logged and "skip_bad" not in logged
    assert "--skip-bad" not in logged


def test_a_one_class_folder_is_refused(tmp_path, capsys):
    root = make_tree(tmp_path / "one", classes=1)
    assert run_cli("train", "--data-root", root, *QUICK, *TINY, "--out", tmp_path / "r") == 1
    assert "at least 2" in one_line_error(capsys)
    assert not (tmp_path / "r").exists()


class _OwnNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(2, 3)


def test_a_file_that_is_not_a_checkpoint_gets_no_unsafe_advice(trained, tmp_path, capsys):
    pickled = tmp_path / "whole_model.pt"  # a class of the user's own: not unpickled
    torch.save(_OwnNet(), pickled)
    text = tmp_path / "notes.pt"
    text.write_text("not a checkpoint")
    for path, what in ((pickled, "pickled Python objects"), (text, "not a PyTorch checkpoint")):
        for args in (["evaluate", path], ["compress", "--baseline", path, *QUICK,
                                          "--out", tmp_path / "c"]):
            assert run_cli(*args) == 1
            err = one_line_error(capsys)
            assert what in err and "weights_only" not in err and "best.pt" in err
    assert not (tmp_path / "c").exists()


def test_an_unreachable_macs_target_is_an_error_unless_accepted(trained, tmp_path, capsys):
    args = ["compress", "--baseline", trained / "best.pt", *QUICK, "--epochs", "1",
            "--flops-reduction", "0.999"]
    assert run_cli(*args, "--out", tmp_path / "a") == 1
    err = one_line_error(capsys)
    assert "99.90%" in err and "--accept-closest" in err and "accept_closest" not in err
    assert not (tmp_path / "a").exists()
    assert run_cli(*args, "--accept-closest", "--out", tmp_path / "b") == 0
    metrics = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert 0.98 < metrics["macs_reduction"] < 0.999


def test_a_baseline_of_other_classes_is_refused(trained, tmp_path, capsys):
    other = make_tree(tmp_path / "other", names=["cat", "dog", "eel"])
    assert run_cli("compress", "--baseline", trained / "best.pt", "--data-root", other, *QUICK,
                   "--epochs", "1", "--flops-reduction", "0.5", "--out", tmp_path / "r") == 1
    err = one_line_error(capsys)
    assert "class0" in err and "cat" in err
    assert not (tmp_path / "r").exists()


def test_compress_takes_the_baselines_data_and_size_and_says_when_they_differ(
        trained, tmp_path, caplog):
    assert run_cli("compress", "--baseline", trained / "best.pt", "--epochs", "1", "--quiet",
                   "--no-latency", "--flops-reduction", "0.5", "--out", tmp_path / "a") == 0
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    assert config["image_size"] == 16 and config["data"] == "imagefolder"
    assert "trained at" not in caplog.text
    assert run_cli("compress", "--baseline", trained / "best.pt", "--epochs", "1", "--quiet",
                   "--no-latency", "--flops-reduction", "0.5", "--image-size", "24",
                   "--out", tmp_path / "b") == 0
    assert "trained at 16 px" in caplog.text and "--image-size 24" in caplog.text


def test_help_shows_defaults_version_and_off_switches(capsys):
    from bpl import __version__
    from bpl.cli import build_parser

    with pytest.raises(SystemExit):
        run_cli("compress", "--help")
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: 300)" in text and "(default: 0.01)" in text and "--no-global-pruning" in text
    with pytest.raises(SystemExit) as exit_:
        run_cli("--version")
    assert exit_.value.code == 0 and __version__ in capsys.readouterr().out
    args = build_parser().parse_args(["compress", "--global-pruning", "--no-global-pruning"])
    assert args.global_pruning is False


def test_written_files_follow_the_umask(trained):
    import os

    umask = os.umask(0o022)
    os.umask(umask)
    for name in ("best.pt", "last.pt", "config.json", "metrics.json", "split.json", "report.md"):
        assert (trained / name).stat().st_mode & 0o777 == 0o666 & ~umask, name


def test_the_compress_report_can_be_trusted(trained, tmp_path, monkeypatch, caplog):
    import logging

    from matplotlib.figure import Figure

    caplog.set_level(logging.INFO, logger="bpl.pipeline")

    figures: dict[str, Figure] = {}
    save = Figure.savefig

    def keep(fig, path, *args, **kwargs):
        name = Path(path).name  # written atomically: to .<name>.<random>.tmp, then renamed
        figures[name[1:].rsplit(".", 2)[0] if name.endswith(".tmp") else name] = fig
        return save(fig, path, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", keep)
    out = tmp_path / "bpl"
    assert run_cli("compress", "--baseline", trained / "best.pt", *QUICK, "--epochs", "2",
                   "--flops-reduction", "0.5", "--out", out) == 0
    report = (out / "report.md").read_text()
    metrics = json.loads((out / "metrics.json").read_text())
    pruned = metrics["after_pruning"]
    assert 0 <= pruned["test_top1"] <= 100 and 0 <= pruned["val_top1"] <= 100
    assert "| right after pruning | +0 |" in report and "| baseline | 1 |" in report
    assert "--no-partners" in report
    # the tool says what bpl's study measured: partners cost time and did not beat plain
    assert "docs/results.md" in report and "length of the fine-tuning" in report
    assert any("recovery study" in r.getMessage() and "--no-partners" in r.getMessage()
               for r in caplog.records if r.name.startswith("bpl.pipeline"))
    assert "| class1 |" in report and "confusion.png" in report and (out / "confusion.png").exists()
    # every number of the report is metrics.json's, as written there
    rows = {}
    for line in report.splitlines():
        if line.startswith("| ") and not line.startswith("|---"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows.setdefault(cells[0], cells[1:])
    models, final, base = metrics["models"], metrics["final"], metrics["baseline"]
    assert rows["baseline"][0] == f"{models['baseline']['top1']:.2f}"
    assert rows["compressed"][0] == f"{models['compressed']['top1']:.2f}" == f"{final['top1']:.2f}"
    assert f"({100 * metrics['macs_reduction']:.1f}% fewer)" in rows["compressed"][1]
    phases = {k: v for k, v in rows.items() if k in ("right after pruning",)}
    assert phases["right after pruning"][1:] == [f"{pruned['val_top1']:.2f}",
                                                 f"{pruned['test_top1']:.2f}"]
    tuned = next(v for k, v in rows.items() if k.startswith("after fine-tuning"))
    assert tuned[1:] == [f"{metrics['selected']['val_top1']:.2f}", f"{final['top1']:.2f}"]
    assert f"- MACs reduction: {100 * metrics['macs_reduction']:.2f}%" in report
    for i, name in enumerate(metrics["classes"]):
        assert rows[name] == [str(sum(final["confusion"][i])), f"{final['per_class_top1'][i]:.2f}"]
    assert base["top1"] == models["baseline"]["top1"]
    assert set(figures) == {"curves.png", "accuracy_vs_macs.png", "confusion.png"}
    for name, fig in figures.items():
        for ax in fig.axes:
            if ax.get_label() == "<colorbar>":
                continue
            assert ax.get_title(), f"{name}: an axis without a title"
            if "%" in ax.get_ylabel():
                assert ax.get_ylim()[1] <= 100, name
    curves = figures["curves.png"].axes
    # the curves are the history's numbers, not an empty frame
    top1 = [line for line in curves[-1].get_lines() if "val" in line.get_label()]
    assert top1 and list(top1[0].get_ydata()) == [h["val_top1"] for h in metrics["history"]]
    ce_lines = [line.get_label() for line in curves[0].get_lines()]
    assert not any("diversity" in label for label in ce_lines)
    assert any("diversity" in line.get_label() for line in curves[1].get_lines())
    assert any("baseline" in line.get_label() for line in curves[-1].get_lines())


def test_predict_with_a_checkpoint_and_an_onnx_file(trained, tree, tmp_path, capsys, caplog):
    pytest.importorskip("onnxruntime")
    import onnx

    from bpl import __version__

    out = tmp_path / "bpl"
    assert run_cli("compress", "--baseline", trained / "best.pt", *QUICK, "--epochs", "1",
                   "--flops-reduction", "0.5", "--out", out) == 0
    onnx_file = tmp_path / "model.onnx"
    assert run_cli("export", out / "deploy.pt", "--out", onnx_file) == 0
    props = {p.key: json.loads(p.value) for p in onnx.load(onnx_file).metadata_props}
    assert props["classes"] == ["class0", "class1", "class2"] and props["image_size"] == 16
    assert props["bpl_version"] == __version__ and len(props["mean"]) == len(props["std"]) == 3
    # the metadata alone rebuilds predict's input exactly (a client without bpl)
    rule = props["preprocess"]
    from torchvision.transforms.v2 import functional as F

    from bpl.data.images import load_resized, resize_size
    from bpl.data.transforms import eval_transform

    img = F.pil_to_tensor(Image.open(tree / "class1" / "0.png").convert("RGB"))
    x = F.resize(img, [rule["resize_shorter_side"]], antialias=rule["antialias"])
    x = F.center_crop(x, [rule["center_crop"]]).float() * rule["scale"]
    x = (x - torch.tensor(props["mean"])[:, None, None]) / torch.tensor(props["std"])[:, None, None]
    ours = eval_transform(16, props["mean"], props["std"])(load_resized(
        tree / "class1" / "0.png", resize_size(16)))
    assert rule["round_to_uint8"] and torch.allclose(x, ours, atol=1e-6)
    capsys.readouterr()
    images = [tree / "class0" / "0.png", tree / "class2"]
    answers = {}
    for model in (out / "deploy.pt", onnx_file):
        assert run_cli("predict", model, *images, "--top-k", "2", "--json", "--quiet") == 0
        answers[model.suffix] = json.loads(capsys.readouterr().out)
    pt, ox = answers[".pt"], answers[".onnx"]
    assert len(pt) == 11 and [r["image"] for r in pt] == [r["image"] for r in ox]
    for a, b in zip(pt, ox):
        assert [t["class"] for t in a["top"]] == [t["class"] for t in b["top"]]
        assert len(a["top"]) == 2 and a["top"][0]["probability"] >= a["top"][1]["probability"]
        assert a["top"][0]["probability"] == pytest.approx(b["top"][0]["probability"], abs=1e-4)
    assert run_cli("predict", out / "deploy.pt", images[0], "--quiet") == 0
    table = capsys.readouterr().out
    assert "0.png" in table and "class0" in table and "%" in table
    assert run_cli("predict", out / "deploy.pt", tmp_path / "nothing-here") == 1

    # an unreadable image among good ones: skipped with a warning, the others answered
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    shutil.copy(tree / "class0" / "0.png", mixed / "a.png")
    (mixed / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    shutil.copy(tree / "class2" / "0.png", mixed / "c.png")
    capsys.readouterr()
    assert run_cli("predict", out / "deploy.pt", mixed, "--json", "--top-k", "2") == 0
    captured = capsys.readouterr()
    got = json.loads(captured.out)
    assert [Path(r["image"]).name for r in got] == ["a.png", "b.png", "c.png"]
    assert "top" in got[0] and "top" in got[2] and "error" in got[1] and "top" not in got[1]
    assert [t["class"] for t in got[0]["top"]] == [t["class"] for t in pt[0]["top"]]
    assert got[0]["top"][0]["probability"] == pytest.approx(pt[0]["top"][0]["probability"],
                                                            abs=1e-5)  # as when read before
    assert "skipped" in caplog.text and "b.png" in caplog.text
    assert run_cli("predict", out / "deploy.pt", mixed, "--quiet") == 0
    assert "b.png  (unreadable:" in capsys.readouterr().out
    assert run_cli("predict", out / "deploy.pt", mixed / "b.png") == 1  # nothing readable
    assert "none of the 1 images could be read" in capsys.readouterr().err


def test_compress_a_model_bpl_did_not_train(tree, tmp_path, capsys):
    """Bring your own model: a plain state_dict or a whole torchvision model file, with --arch."""
    import torchvision

    torch.manual_seed(0)
    theirs = torchvision.models.resnet18(num_classes=3)
    with torch.no_grad():  # weights no freshly seeded resnet18 has (bpl seeds 0 too)
        for p in theirs.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(7)))
    torch.save(theirs.state_dict(), tmp_path / "weights.pt")
    torch.save(theirs, tmp_path / "whole.pt")
    common = ["--data-root", tree, *QUICK, "--epochs", "1", "--flops-reduction", "0.5",
              "--arch", "resnet18"]
    for name in ("weights.pt", "whole.pt"):
        out = tmp_path / f"c-{name}"
        assert run_cli("compress", "--baseline", tmp_path / name, *common, "--out", out) == 0
        metrics = json.loads((out / "metrics.json").read_text())
        assert abs(metrics["macs_reduction"] - 0.5) <= 0.01
        model, meta = bpl.load_model(out / "deploy.pt")
        assert meta["arch"] == "resnet18" and meta["classes"] == ["class0", "class1", "class2"]
    # the baseline evaluated is the weights given, not a fresh model: its test loss is the
    # one their model gives on the run's test split, computed here by hand
    from bpl.data import load_dataset

    theirs.eval()
    for name in ("weights.pt", "whole.pt"):
        run = tmp_path / f"c-{name}"
        metrics = json.loads((run / "metrics.json").read_text())
        data = load_dataset("imagefolder", tree, image_size=16, split_file=run / "split.json",
                            cache=False)
        xs = torch.stack([data.test[i][0] for i in range(len(data.test))])
        ys = torch.tensor([data.test[i][1] for i in range(len(data.test))])
        with torch.no_grad():
            loss = torch.nn.functional.cross_entropy(theirs(xs), ys).item()
        assert metrics["baseline"]["loss"] == pytest.approx(loss, rel=1e-4)
    # weights of another architecture, or trained for other classes: one clear line
    assert run_cli("compress", "--baseline", tmp_path / "weights.pt", *common[:-1], "resnet34",
                   "--out", tmp_path / "x") == 1
    err = one_line_error(capsys)
    assert "does not fit --arch resnet34" in err and "weights.pt" in err
    torch.save(torchvision.models.resnet18(num_classes=5).state_dict(), tmp_path / "five.pt")
    assert run_cli("compress", "--baseline", tmp_path / "five.pt", *common,
                   "--out", tmp_path / "y") == 1
    assert "does not fit --arch resnet18 with 3 classes" in one_line_error(capsys)
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_timm_architectures_by_name(tree, tmp_path):
    timm = pytest.importorskip("timm")
    model = bpl.build_model("timm/resnet10t", 3)
    assert isinstance(model, timm.models.ResNet) and model.get_classifier().out_features == 3
    torch.save(model.state_dict(), tmp_path / "t.pt")
    out = tmp_path / "c"
    assert run_cli("compress", "--baseline", tmp_path / "t.pt", "--data-root", tree, *QUICK,
                   "--epochs", "1", "--flops-reduction", "0.5", "--arch", "timm/resnet10t",
                   "--out", out) == 0
    deployed, meta = bpl.load_model(out / "deploy.pt")  # rebuilt from timm at pruned widths
    assert meta["arch"] == "timm/resnet10t"
    assert deployed.eval()(torch.randn(1, 3, 16, 16)).shape == (1, 3)


@pytest.mark.parametrize("epochs", [3, 40])
def test_curves_are_drawn_for_short_and_long_runs(tmp_path, epochs, monkeypatch):
    from matplotlib.figure import Figure

    from bpl.report import write_report

    drawn = []
    save = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **k: (drawn.append(fig),
                                                                  save(fig, *a, **k))[1])
    history = [{"epoch": e, "train_loss": 1.0 / e, "train_top1": 50.0 + e, "val_loss": 1.1 / e,
                "val_top1": 48.0 + e} for e in range(1, epochs + 1)]
    write_report(tmp_path, {"command": "train", "history": history})
    assert (tmp_path / "curves.png").stat().st_size > 0 and (tmp_path / "report.md").exists()
    # not a blank frame: every curve is the history's, epoch by epoch
    lines = {line.get_label(): line for ax in drawn[0].axes for line in ax.get_lines()}
    for label, key in (("train cross-entropy", "train_loss"), ("validation loss", "val_loss"),
                       ("train top-1", "train_top1"), ("validation top-1", "val_top1")):
        assert list(lines[label].get_xdata()) == list(range(1, epochs + 1))
        assert list(lines[label].get_ydata()) == [h[key] for h in history]


def test_class_names_no_font_draws_are_said(tmp_path, caplog, monkeypatch):
    """Plots fall back to an installed CJK font; where there is none, the run says which
    characters show as boxes and how to fix it."""
    import bpl.report

    history = [{"epoch": 1, "train_loss": 1.0, "train_top1": 50.0}]
    metrics = {"command": "train", "history": history, "classes": ["机场", "airport"],
               "final": {"top1": 50.0, "confusion": [[1, 0], [0, 1]]}}
    monkeypatch.setattr(bpl.report, "WIDE_FONTS", ())  # as on a machine without one
    bpl.report.write_report(tmp_path, metrics)
    assert (tmp_path / "confusion.png").stat().st_size > 0
    assert "(机场)" in caplog.text and "fonts-noto-cjk" in caplog.text
    caplog.clear()
    metrics["classes"] = ["airfield", "airport"]
    bpl.report.write_report(tmp_path, metrics)
    assert "no installed font" not in caplog.text


def test_a_figure_that_fails_costs_the_figure_not_the_run(tmp_path, monkeypatch, caplog):
    import bpl.report

    def broken(*args):
        raise ValueError("Supported markers are [string, int]")

    monkeypatch.setattr(bpl.report, "_curves", broken)
    history = [{"epoch": 1, "train_loss": 1.0, "train_top1": 50.0}]
    bpl.report.write_report(tmp_path, {"command": "train", "history": history})
    assert (tmp_path / "metrics.json").exists() and (tmp_path / "report.md").exists()
    assert not (tmp_path / "curves.png").exists() and "plots skipped" in caplog.text


def test_a_compress_report_below_the_baseline_says_what_measurably_helped(tmp_path):
    from bpl.report import write_report

    def report(base_val: float, kept_val: float, epochs: int | str = 10) -> str:
        write_report(tmp_path, {
            "command": "compress", "config": {"arch": "resnet18", "epochs": epochs},
            "baseline": {"val_top1": base_val, "top1": 80.0}, "baseline_epochs": 40,
            "final": {"top1": 75.0},
            "selected": {"epoch": 8, "of": 10, "why": "best validation", "val_top1": kept_val}})
        return (tmp_path / "report.md").read_text()

    low = report(84.0, 79.5)
    assert "4.5 points below the baseline on validation" in low
    assert "`--epochs 30`, the default" in low and "smaller `--flops-reduction`" in low
    for enough in (30, 40, "auto"):  # past the study's length, only a smaller cut helped
        text = report(84.0, 79.5, enough)
        assert "`--epochs 30`" not in text and "past 30 epochs" in text
        assert "smaller `--flops-reduction`" in text and "`--max-drop P`" in text
    assert "below the baseline on validation" not in report(84.0, 83.5)  # within a point


def test_library_errors_carry_their_parameter_and_python_words():
    """Outside the command, messages name Python keywords; ``error.param`` names the one at
    fault; under the command's wording the same message names its flags, from its parser."""
    from bpl.cli import build_parser, flag_words
    from bpl.errors import BPLError, arg, wording
    from bpl.pruning import step_levels

    with pytest.raises(BPLError, match=r"^flops_reduction must be between 0 and 1") as err:
        step_levels(1.5, 2)
    assert err.value.param == "flops_reduction"
    assert arg("accept_closest", True) == "accept_closest=True" and arg("round_to") == "round_to"
    with wording(flag_words(build_parser())):
        with pytest.raises(BPLError, match=r"^--flops-reduction must be between 0 and 1"):
            step_levels(1.5, 2)
        said = [arg("accept_closest", True), arg("round_to", 4), arg("root"),
                arg("skip_bad", False), arg("cache", "off"), arg("placement", "all"),
                arg("partners", False), arg("no_such_parameter", 3)]
    assert said == ["--accept-closest", "--round-to 4", "--data-root", "--no-skip-bad",
                    "--cache off", "--placement all", "--no-partners", "no_such_parameter=3"]
    assert arg("root") == "root"  # the command's wording ends with its block


def test_compress_tests_on_the_baselines_own_split_whatever_its_seed(trained, tmp_path, capsys,
                                                                      caplog):
    """Another --seed seeds compress's training, not a new split: the baseline's split.json
    is reused, so no image it trained on is scored as a test image. A baseline moved away
    from its split is checked by the split it records, and refused when its test split
    differs; a validation split that differs is said."""
    import shutil

    from bpl.config import resolve_command

    args = ["--epochs", "1", "--quiet", "--no-latency", "--flops-reduction", "0.5"]
    assert run_cli("compress", "--baseline", trained / "best.pt", *args, "--seed", "1",
                   "--out", tmp_path / "s1") == 0
    ours = json.loads((tmp_path / "s1" / "split.json").read_text())
    theirs = json.loads((trained / "split.json").read_text())
    assert ours == theirs and ours["seed"] == 0
    assert json.loads((tmp_path / "s1" / "config.json").read_text())["seed"] == 1
    # the baseline alone (no split.json beside it): its recorded split decides
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(trained / "best.pt", alone / "best.pt")
    assert run_cli("compress", "--baseline", alone / "best.pt", *args, "--seed", "1",
                   "--out", tmp_path / "r") == 1
    err = one_line_error(capsys)
    assert "trained on another split" in err and "--seed 0" in err
    assert not (tmp_path / "r").exists()
    caplog.clear()
    assert run_cli("compress", "--baseline", alone / "best.pt", *args, "--val-ratio", "0.3",
                   "--out", tmp_path / "v") == 0
    assert "validation may score images it trained on" in caplog.text
    # compress takes the baseline's split ratios as it takes its data and size
    cfg = resolve_command("compress", {"baseline": str(trained / "best.pt")})
    assert cfg.val_ratio == 0.1 and cfg.train_subset is None and cfg.image_size == 16
