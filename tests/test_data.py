"""Tests for bpl.data: tiny image trees written to tmp_path; real UC Merced only when present."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

import bpl.data as bd
import bpl.data.images
import bpl.data.load
import bpl.data.registry
import bpl.data.splits
from bpl.data import (
    DATASETS,
    ChecksumError,
    CorruptImageError,
    DataError,
    download_and_extract,
    load_dataset,
    read_image,
    stratified_split,
)
from bpl.errors import BPLError

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
UCM = SHARED / "ucmerced"
UCM_TIF = SHARED / "ucmerced-tif-sample"
EUROSAT = SHARED / "eurosat"
EUROSAT_CLASSES = {"AnnualCrop": 3000, "Forest": 3000, "HerbaceousVegetation": 3000,
                   "Highway": 2500, "Industrial": 2500, "Pasture": 2000, "PermanentCrop": 2500,
                   "Residential": 3000, "River": 2500, "SeaLake": 3000}


def _save(path: Path, size=(12, 10), color=(200, 30, 60), mode="RGB", fmt=None) -> Path:
    """Write one small image; ``mode`` picks the colour model, the suffix the file format."""
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.new("RGB", size, color)
    if mode == "RGBA":
        im = im.convert("RGBA")
    elif mode in ("L", "P"):
        im = im.convert(mode)
    im.save(path, format=fmt)
    return path


def _tree(root: Path, counts: dict[str, int], ext: str = ".png", size=(12, 10)) -> Path:
    """``root/<class>/<i><ext>``, each class a different solid colour."""
    for k, (cls, n) in enumerate(sorted(counts.items())):
        for i in range(n):
            _save(root / cls / f"{cls}{i:02d}{ext}", size=size, color=(40 * k, 100, 255 - 40 * k))
    return root


def _mixed_tree(root: Path) -> Path:
    """Three classes in every format and colour model the loader must accept."""
    _save(root / "forest" / "a.tif", size=(20, 16))
    _save(root / "forest" / "b.tiff", size=(9, 13))
    _save(root / "forest" / "c.JPG", size=(16, 16), mode="L")
    _save(root / "beach" / "a.jpeg", size=(15, 17))
    _save(root / "beach" / "b.png", mode="RGBA")
    _save(root / "beach" / "c.png", mode="P")
    _save(root / "airplane" / "a.gif", mode="P")
    _save(root / "airplane" / "nested" / "b.bmp", size=(31, 7))
    (root / "airplane" / "notes.txt").write_text("not an image")
    (root / ".hidden").mkdir()
    return root


def _count_reads(monkeypatch) -> list[str]:
    calls: list[str] = []
    real = bd.read_image

    def counting(path):
        calls.append(str(path))
        return real(path)

    monkeypatch.setattr(bpl.data.images, "read_image", counting)  # where decoding looks it up
    return calls


# --------------------------------------------------------------------------- decoding


@pytest.mark.parametrize(
    ("name", "mode", "expect"),
    [
        ("x.tif", "RGB", (200, 30, 60)),
        ("x.png", "RGBA", (200, 30, 60)),
        ("x.png", "L", None),
        ("x.png", "P", None),
        ("x.jpg", "RGB", None),
    ],
)
def test_read_image_converts_to_rgb_uint8(tmp_path, name, mode, expect):
    t = read_image(_save(tmp_path / name, size=(7, 5), mode=mode))
    assert t.shape == (3, 5, 7) and t.dtype == torch.uint8
    if expect is not None:
        assert t[:, 0, 0].tolist() == list(expect)
    if mode == "L":
        assert torch.equal(t[0], t[1]) and torch.equal(t[1], t[2])


def test_read_image_scales_16bit(tmp_path):
    """The full 16-bit range maps onto 0-255 (value * 255 / 65535, truncated); a plain
    uint8 cast would clip or wrap every value above 255 instead."""
    path = tmp_path / "deep.png"
    values = [0, 1000, 32768, 60000, 65535]
    Image.fromarray(np.array([values] * 2, dtype=np.uint16)).save(path)
    got = read_image(path)
    assert got[0, 0].tolist() == [int(v * 255 / 65535) for v in values] == [0, 3, 127, 233, 255]
    assert torch.equal(got[0], got[1]) and torch.equal(got[1], got[2])  # grey to RGB


def test_corrupt_image_raises_with_path(tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    with pytest.raises(CorruptImageError, match=r"cannot read image .*broken\.jpg.*skip_bad=True"):
        read_image(bad)


# --------------------------------------------------------------------------- folders and splits


def test_class_mapping_formats_and_shapes(tmp_path):
    root = _mixed_tree(tmp_path / "ds")
    data = load_dataset("imagefolder", root, image_size=16, train_ratio=0.5)
    assert data.classes == ["airplane", "beach", "forest"] and data.num_classes == 3
    rows = data.split["train"] + data.split["val"] + data.split["test"]
    assert len(rows) == 8  # the .txt and the hidden folder are ignored, nested/ is included
    for rel, label in rows:
        assert rel.split("/")[0] == data.classes[label]
    for ds in (data.train, data.test):
        for i in range(len(ds)):
            x, y = ds[i]
            assert x.shape == (3, 16, 16) and x.dtype == torch.float32
            assert isinstance(y, int) and 0 <= y < 3


def test_scan_order_is_os_walks_files_first_then_sorted_subfolders(tmp_path):
    """The order a split shuffles from (a changed order would change every seed's split)."""
    root = tmp_path / "ds"
    for rel in ("b/z.png", "b/A.png", "b/sub2/x.png", "b/sub1/deep/k.bmp", "b/sub1/y.tif",
                "b/sub1/.h.png", "b/.hid/q.png", "a/1.png"):
        _save(root / rel)
    (root / "b" / "n.txt").write_text("x")
    (root / "b" / "linkdir").symlink_to(root / "a")  # a link to a folder is not walked
    (root / "b" / "link.png").symlink_to(root / "a" / "1.png")  # a link to a file counts
    (root / "b" / "broken.png").symlink_to(root / "gone.png")
    classes, samples = bpl.data.splits._scan_classes(root, root)
    assert classes == ["a", "b"]
    assert [rel for rel, _ in samples] == [
        "a/1.png", "b/A.png", "b/link.png", "b/z.png", "b/sub1/y.tif", "b/sub1/deep/k.bmp",
        "b/sub2/x.png"]


def test_stratified_split_reproducible_and_per_class():
    samples = [(f"a/{i}", 0) for i in range(10)] + [(f"b/{i}", 1) for i in range(5)]
    tr1, te1 = stratified_split(samples, 0.8, seed=0)
    tr2, te2 = stratified_split(samples, 0.8, seed=0)
    tr3, _ = stratified_split(samples, 0.8, seed=1)
    assert (tr1, te1) == (tr2, te2) and tr1 != tr3
    assert sorted(tr1 + te1) == sorted(samples)
    assert [sum(y == c for _, y in tr1) for c in (0, 1)] == [8, 4]
    assert [sum(y == c for _, y in te1) for c in (0, 1)] == [2, 1]
    with pytest.raises(DataError, match="train_ratio must be between 0 and 1"):
        stratified_split(samples, 1.0, seed=0)


def test_load_dataset_split_seed_and_ratio(tmp_path):
    root = _tree(tmp_path / "ds", {"a": 10, "b": 10}, size=(4, 4))
    kw = {"image_size": 8, "cache": False, "val_ratio": 0.0}
    s0 = load_dataset("imagefolder", root, seed=0, **kw).split
    assert s0 == load_dataset("imagefolder", root, seed=0, **kw).split
    assert s0["train"] != load_dataset("imagefolder", root, seed=3, **kw).split["train"]
    assert [sum(y == c for _, y in s0["train"]) for c in (0, 1)] == [8, 8]
    half = load_dataset("imagefolder", root, train_ratio=0.5, **kw).split
    assert len(half["train"]) == len(half["test"]) == 10



@pytest.mark.parametrize("name", ["imagefolder", "digits"])
def test_draw_split_is_the_split_a_new_run_draws_and_decodes_nothing(tmp_path, monkeypatch,
                                                                     name):
    root = _tree(tmp_path / "ds", {"a": 10, "b": 12}, size=(4, 4)) if name != "digits" else None
    kw = {"seed": 3, "val_ratio": 0.2, "train_subset": 0.8}
    loaded = load_dataset(name, root, image_size=8, cache=False, **kw).split
    reads = _count_reads(monkeypatch)
    drawn = bd.draw_split(name, root, **kw)
    assert reads == []  # it lists the files; it opens none
    for part in ("classes", "train", "val", "test"):
        assert [list(r) for r in drawn[part]] == [list(r) for r in loaded[part]], part
    assert drawn["val"] and drawn["train"] != bd.draw_split(name, root, **{**kw, "seed": 4})["train"]
    if name != "digits":
        with pytest.raises(BPLError, match="nowhere"):
            bd.draw_split(name, tmp_path / "nowhere", **kw)

def test_presplit_train_val_tree(tmp_path):
    root = tmp_path / "ds"
    _tree(root / "train", {"x": 3, "y": 2}, size=(4, 4))
    _tree(root / "val", {"x": 1, "y": 1}, size=(4, 4))
    data = load_dataset("imagefolder", root, image_size=8, train_ratio=0.5)
    assert data.split["layout"] == "presplit" and data.classes == ["x", "y"]
    # validation is carved out of train/: every class keeps at least one image on each side
    assert (len(data.train), len(data.val), len(data.test)) == (3, 2, 2)
    assert all(r.startswith("train/") for r, _ in data.split["val"])
    assert all(r.startswith("val/") for r, _ in data.split["test"])
    _tree(root / "val", {"z": 1}, size=(4, 4))
    with pytest.raises(DataError, match=r"class folders not in the training set: z"):
        load_dataset("imagefolder", root, image_size=8)


def test_a_fixed_split_says_what_was_added_since(tmp_path, caplog):
    """--resume (and evaluate) keep the run's split: added images are said, added classes
    refused (the model has no output for them)."""
    for layout in ("split", "presplit"):
        base = tmp_path / layout
        root = _tree(base / "ds", {"a": 4, "b": 4}, size=(6, 6))
        if layout == "presplit":
            root = base / "pre"
            _tree(root / "train", {"a": 3, "b": 3}, size=(6, 6))
            _tree(root / "test", {"a": 2, "b": 2}, size=(6, 6))
        split_file = base / "split.json"
        load_dataset("imagefolder", root, image_size=8, split_file=split_file, cache=False)
        caplog.clear()
        load_dataset("imagefolder", root, image_size=8, split_file=split_file, cache=False)
        assert "added" not in caplog.text
        extra = root / ("a" if layout == "split" else "train/a") / "late.png"
        _save(extra)
        load_dataset("imagefolder", root, image_size=8, split_file=split_file, cache=False)
        assert "1 images under" in caplog.text and "late.png" in caplog.text
        _save(root / ("c" if layout == "split" else "test/c") / "x.png")
        with pytest.raises(DataError, match=r"class folders that split file .* does not know "
                                            r"\(c\); .*start a new run"):
            load_dataset("imagefolder", root, image_size=8, split_file=split_file, cache=False)
    # --train-subset leaves images out of the split: they are not "added" (EuroSAT's 10%
    # subset once warned of 19,440 added images); one added since still is, by count
    root = _tree(tmp_path / "sub", {"a": 10, "b": 10}, size=(6, 6))
    split_file = tmp_path / "sub-split.json"
    kw = dict(image_size=8, split_file=split_file, cache=False, train_subset=0.5)
    load_dataset("imagefolder", root, **kw)
    caplog.clear()
    load_dataset("imagefolder", root, **kw)
    assert "added" not in caplog.text
    _save(root / "a" / "late.png")
    load_dataset("imagefolder", root, **kw)
    assert "1 images under" in caplog.text
    # a subset split written before bpl recorded what it left out cannot tell left-out
    # images from added ones: no warning of "added" images, a note at info level
    legacy = json.loads(split_file.read_text())
    del legacy["left_out"]
    split_file.write_text(json.dumps(legacy))
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="bpl"):
        load_dataset("imagefolder", root, **kw)
    assert "were added" not in caplog.text
    assert "are not in split file" in caplog.text and "--train-subset 0.5" in caplog.text


def test_split_file_round_trip(tmp_path):
    root = _tree(tmp_path / "ds", {"a": 5, "b": 5}, size=(6, 6))
    split_file = tmp_path / "run" / "split.json"
    first = load_dataset("imagefolder", root, image_size=8, seed=0, split_file=split_file)
    assert split_file.is_file()  # written because it did not exist
    saved = json.loads(split_file.read_text())
    assert saved["train"] == first.split["train"] and saved["mean"] == list(first.mean)
    _save(root / "a" / "new.png")  # a later file and another seed must not change the split
    again = load_dataset("imagefolder", root, image_size=8, seed=5, split_file=split_file)
    assert again.split["train"] == first.split["train"]
    assert again.split["test"] == first.split["test"]
    assert again.mean == first.mean and again.classes == first.classes
    out = again.save_split(tmp_path / "copy.json")
    assert json.loads(out.read_text()) == saved


def test_split_file_for_another_dataset(tmp_path):
    root = _tree(tmp_path / "ds", {"a": 2, "b": 2}, size=(4, 4))
    split_file = tmp_path / "split.json"
    load_dataset("imagefolder", root, image_size=8, split_file=split_file)
    with pytest.raises(DataError, match=r"digits has 10 classes but .*split\.json has 2"):
        load_dataset("digits", image_size=8, split_file=split_file)
    split_file.write_text("{}")
    with pytest.raises(DataError, match=r"split\.json is not a bpl split .*delete it"):
        load_dataset("imagefolder", root, split_file=split_file)


def test_split_file_with_missing_image(tmp_path):
    root = _tree(tmp_path / "ds", {"a": 3, "b": 3}, size=(4, 4))
    split_file = tmp_path / "split.json"
    load_dataset("imagefolder", root, image_size=8, split_file=split_file)
    victim = json.loads(split_file.read_text())["test"][0][0]
    (root / victim).unlink()
    with pytest.raises(DataError, match=rf"{Path(victim).name} listed in split file .*split\.json"):
        load_dataset("imagefolder", root, image_size=8, split_file=split_file)


# --------------------------------------------------------------------------- transforms, stats, cache


def test_transforms_deterministic_eval_and_cache_equivalence(tmp_path):
    root = _mixed_tree(tmp_path / "ds")
    cached = load_dataset("imagefolder", root, image_size=24, train_ratio=0.5)
    plain = load_dataset("imagefolder", root, image_size=24, train_ratio=0.5, cache=False)
    for i in range(len(cached.test)):
        a, b = cached.test[i][0], plain.test[i][0]
        assert torch.equal(a, cached.test[i][0]) and torch.equal(a, b)
    x, _ = cached.train[0]
    assert x.shape == (3, 24, 24) and x.dtype == torch.float32


def test_stats_computed_when_unknown(tmp_path):
    root = tmp_path / "ds"  # class a solid (51, 102, 204), class b solid (153, 102, 0)
    for i in range(4):
        _save(root / "a" / f"{i}.png", size=(8, 8), color=(51, 102, 204))
        _save(root / "b" / f"{i}.png", size=(8, 8), color=(153, 102, 0))
    data = load_dataset("imagefolder", root, image_size=8, train_ratio=0.5)
    assert data.stats_source == "computed from the training split"
    assert data.mean == pytest.approx((0.4, 0.4, 0.4), abs=1e-5)
    assert data.std == pytest.approx((0.2, 0.0, 0.4), abs=1e-3)
    assert data.split["mean"] == list(data.mean)
    assert load_dataset("imagefolder", root, image_size=8, normalization="imagenet").mean == (
        bd.IMAGENET_MEAN
    )


def test_disk_cache_reused(tmp_path, monkeypatch):
    root = _tree(tmp_path / "ds", {"a": 4, "b": 4}, ext=".tif", size=(10, 9))
    calls = _count_reads(monkeypatch)
    first = load_dataset("imagefolder", root, image_size=16, cache_dir=tmp_path / "cache")
    assert len(calls) == 8 and first.cache_file is not None and first.cache_file.is_file()
    calls.clear()
    second = load_dataset("imagefolder", root, image_size=16, cache_dir=tmp_path / "cache")
    assert calls == [] and second.cache_file == first.cache_file
    for i in range(len(first.test)):
        assert torch.equal(first.test[i][0], second.test[i][0])
    clone = pickle.loads(pickle.dumps(second.test))
    assert torch.equal(clone[0][0], first.test[0][0])
    load_dataset("imagefolder", root, image_size=32, cache_dir=tmp_path / "cache")
    assert len(calls) == 8  # another size is another cache file
    assert len(list((tmp_path / "cache").glob("*.cache"))) == 2
    first.cache_file.write_bytes(b"garbage")  # a damaged cache is rebuilt, not fatal
    third = load_dataset("imagefolder", root, image_size=16, cache_dir=tmp_path / "cache")
    assert len(calls) == 16 and torch.equal(third.test[0][0], first.test[0][0])


def test_datasets_pickle_and_dataloader_workers(tmp_path):
    root = _tree(tmp_path / "ds", {"a": 4, "b": 4}, size=(9, 9))
    data = load_dataset("imagefolder", root, image_size=8, train_ratio=0.5)
    clone = pickle.loads(pickle.dumps(data.test))
    assert torch.equal(clone[0][0], data.test[0][0])
    xb, yb = next(iter(DataLoader(data.test, batch_size=4, num_workers=2)))
    assert xb.shape == (4, 3, 8, 8)
    assert torch.equal(xb, torch.stack([data.test[i][0] for i in range(4)]))
    assert yb.tolist() == data.test.targets[:4]


# --------------------------------------------------------------------------- errors


def test_error_missing_folder(tmp_path):
    with pytest.raises(DataError, match=r"dataset folder not found: .*nowhere; pass the folder "
                                        r"with one sub-folder per class as root") as err:
        load_dataset("imagefolder", tmp_path / "nowhere")
    assert err.value.param == "root"
    with pytest.raises(DataError, match="imagefolder needs the folder .* as root") as err:
        load_dataset("imagefolder")
    assert err.value.param == "root"
    with pytest.raises(DataError, match="unknown dataset 'mnist'; choose one of ucm"):
        load_dataset("mnist", tmp_path)


def test_error_empty_class_folder(tmp_path):
    root = _tree(tmp_path / "ds", {"a": 2, "b": 2})
    (root / "c").mkdir()
    with pytest.raises(DataError, match=r"class folder .*ds/c has no images.*remove the folder"):
        load_dataset("imagefolder", root)


def test_error_no_images(tmp_path):
    (tmp_path / "ds" / "a").mkdir(parents=True)
    with pytest.raises(DataError, match=r"no images found under .*ds \(1 class folders"):
        load_dataset("imagefolder", tmp_path / "ds")
    _save(tmp_path / "flat" / "x.png")
    with pytest.raises(DataError, match=r"no images found under .*flat \(1 images lie directly"):
        load_dataset("imagefolder", tmp_path / "flat")


def test_error_class_count_for_named_dataset(tmp_path):
    root = _tree(tmp_path / "ucm", {f"c{i:02d}": 1 for i in range(20)}, size=(4, 4))
    with pytest.raises(DataError, match=r"ucm has 21 classes but .*ucm has 20; point root at"):
        load_dataset("ucm", root)
    assert BPLError in DataError.__mro__


def test_corrupt_image_error_and_skip_bad(tmp_path):
    root = _tree(tmp_path / "ds", {"a": 5, "b": 5}, size=(6, 6))
    (root / "b" / "b03.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.raises(CorruptImageError, match=r"b03\.png .*skip_bad=True"):
        load_dataset("imagefolder", root, image_size=8)
    for cache in (True, False):
        data = load_dataset("imagefolder", root, image_size=8, skip_bad=True, cache=cache)
        assert data.num_bad == 1 and data.bad == ["b/b03.png"]
        assert len(data.train) + len(data.val) + len(data.test) == 9
        assert all(data.train[i][0].shape == (3, 8, 8) for i in range(len(data.train)))
    lazy = load_dataset("imagefolder", root, image_size=8, cache=False, normalization="imagenet")
    with pytest.raises(CorruptImageError, match="b03.png"):  # found when read, without cache
        for ds in (lazy.train, lazy.test):
            for i in range(len(ds)):
                ds[i]


def test_skip_bad_that_empties_a_class_is_refused(tmp_path):
    """A class whose every image is unreadable would leave an output no image trains."""
    root = _tree(tmp_path / "ds", {"a": 4, "b": 2}, size=(6, 6))
    for path in (root / "b").iterdir():
        path.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.raises(DataError, match=r"no training image is left in class 'b' after 2 "
                                        r"unreadable images were skipped; add readable"):
        load_dataset("imagefolder", root, image_size=8, skip_bad=True, cache=False)


def test_a_validation_split_larger_than_training_is_said(tmp_path, caplog):
    root = _tree(tmp_path / "ds", {"a": 10, "b": 10}, size=(6, 6))
    load_dataset("imagefolder", root, image_size=8, train_ratio=0.8, val_ratio=0.9, cache=False)
    assert "lower --val-ratio (now 0.9)" in caplog.text
    caplog.clear()
    load_dataset("imagefolder", root, image_size=8, train_ratio=0.8, val_ratio=0.2, cache=False)
    assert "val-ratio" not in caplog.text


# --------------------------------------------------------------------------- digits


def test_the_bundled_digits_are_the_uci_test_set():
    """The 45 kB file in the package holds exactly the 1,797 digits scikit-learn ships."""
    import hashlib
    from importlib import resources

    with (resources.files("bpl.data") / "digits.npz").open("rb") as f, np.load(f) as npz:
        images, labels = npz["images"], npz["labels"]
    assert images.shape == (1797, 8, 8) and images.dtype == np.uint8 and images.max() == 16
    assert hashlib.sha256(images.tobytes()).hexdigest() == (
        "8f26b2bd9d135c256808f68f14fdabddde6d9c7f869ae419704b051f0f14b3b3")
    assert np.bincount(labels).tolist() == [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]
    data = load_dataset("digits", image_size=16, val_ratio=0.0)
    assert data.num_classes == 10 and len(data.train) + len(data.test) == 1797


def test_validation_is_carved_from_train_per_class_and_fixed_by_the_seed(tmp_path):
    root = _tree(tmp_path / "ds", {"a": 20, "b": 10}, size=(4, 4))
    kw = {"image_size": 8, "cache": False}
    data = load_dataset("imagefolder", root, seed=0, val_ratio=0.25, **kw)
    split = data.split
    train, val, test = ({r for r, _ in split[p]} for p in ("train", "val", "test"))
    assert not (train & val or train & test or val & test)
    assert len(train | val | test) == 30 and len(test) == 6  # 80/20 first, as without val
    assert [sum(y == c for _, y in split["val"]) for c in (0, 1)] == [4, 2]  # 25% of 16 / 8
    assert len(data.val) == 6 and data.val.transform is not None
    # the test split does not depend on the validation ratio; validation on the seed
    no_val = load_dataset("imagefolder", root, seed=0, val_ratio=0.0, **kw).split
    assert no_val["test"] == split["test"] and no_val["val"] == []
    assert load_dataset("imagefolder", root, seed=0, val_ratio=0.0, **kw).val is None
    other = load_dataset("imagefolder", root, seed=1, val_ratio=0.25, **kw).split
    assert other["val"] != split["val"]
    # a subset of the training split, per class, then validation carved from it
    sub = load_dataset("imagefolder", root, seed=0, val_ratio=0.25, train_subset=0.5, **kw)
    assert sub.split["test"] == split["test"]
    assert len(sub.train) + len(sub.val) == 12 and len(sub.val) == 3
    assert {r for r, _ in sub.split["train"] + sub.split["val"]} <= train | val
    with pytest.raises(DataError, match="val_ratio"):
        load_dataset("imagefolder", root, val_ratio=1.0, **kw)
    with pytest.raises(DataError, match="train_subset"):
        load_dataset("imagefolder", root, train_subset=0.0, **kw)


def test_eurosat_layout_split_and_class_count(tmp_path):
    # EuroSAT's own layout: <Class>/<Class>_<n>.jpg, 64x64 RGB, as in the official zip's 2750/
    counts = {c: 5 + k for k, c in enumerate(EUROSAT_CLASSES)}
    root = tmp_path / "EuroSAT"
    for c, n in counts.items():
        for i in range(1, n + 1):
            _save(root / "2750" / c / f"{c}_{i}.jpg", size=(64, 64), fmt="JPEG")
    data = load_dataset("eurosat", root, image_size=32, seed=0)
    assert data.classes == sorted(EUROSAT_CLASSES) and data.num_classes == 10
    n_test = [sum(y == k for _, y in data.split["test"]) for k in range(10)]
    assert n_test == [n - round(0.8 * n) for n in counts.values()]  # stratified 80/20
    assert data.val is not None and data.test[0][0].shape == (3, 32, 32)
    assert data.stats_source == "computed from the training split"
    (root / "2750" / "Forest").rename(tmp_path / "Forest")
    with pytest.raises(DataError, match="eurosat has 10 classes but .* has 9"):
        load_dataset("eurosat", root, image_size=32)


@pytest.mark.skipif(not EUROSAT.is_dir(), reason="../shared/data/eurosat not present")
def test_real_eurosat_split():
    split = bpl.data.splits.make_split(DATASETS["eurosat"], EUROSAT, 0, None, 0.1, None)
    assert split["classes"] == sorted(EUROSAT_CLASSES)
    rows = split["train"] + split["val"] + split["test"]
    assert len(rows) == 27_000 and len({r for r, _ in rows}) == 27_000
    assert len(split["test"]) == 5_400  # the usual stratified 80/20: 21,600 / 5,400
    per_class = np.bincount([y for _, y in split["test"]], minlength=10).tolist()
    assert per_class == [EUROSAT_CLASSES[c] // 5 for c in split["classes"]]
    x = read_image(EUROSAT / split["test"][0][0])
    assert x.shape == (3, 64, 64) and x.dtype == torch.uint8


def test_digits_dataset():
    data = load_dataset("digits", image_size=16, seed=0)
    assert data.num_classes == 10 and data.classes == [str(d) for d in range(10)]
    assert len(data.train) + len(data.val) + len(data.test) == 1797
    assert len(data.train) + len(data.val) == pytest.approx(0.8 * 1797, abs=10)
    assert len(data.val) == pytest.approx(0.1 * 0.8 * 1797, abs=10)
    x, y = data.train[0]
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32 and 0 <= y < 10
    assert torch.equal(data.test[3][0], data.test[3][0])
    assert data.split == load_dataset("digits", image_size=16, seed=0).split


def test_registry_keys_aliases_and_class_counts_of_the_real_copies():
    assert {"ucm", "nwpu-resisc45", "rsd46-whu", "eurosat", "imagefolder", "digits"} <= set(DATASETS)
    assert all(spec.name == key for key, spec in DATASETS.items())
    for alias, name in (("UCMerced", "ucm"), ("uc-merced", "ucm"), ("NWPU", "nwpu-resisc45"),
                        ("rsd46", "rsd46-whu"), ("EuroSAT", "eurosat")):
        assert bpl.data.registry.get_spec(alias).name == name
    # the class counts the registry enforces are those of the datasets themselves
    assert DATASETS["digits"].num_classes == len(set(bpl.data.load._digits()[1]))
    for name, root in (("ucm", UCM / "Images"), ("eurosat", EUROSAT)):
        if root.is_dir():
            folders = [d for d in root.iterdir() if d.is_dir()]
            assert len(folders) == DATASETS[name].num_classes
    if EUROSAT.is_dir():
        assert sorted(d.name for d in EUROSAT.iterdir() if d.is_dir()) == sorted(EUROSAT_CLASSES)


# --------------------------------------------------------------------------- download


def _zip_ucm_like(path: Path, classes: int = 21) -> Path:
    src = path.parent / "zip-src"
    _tree(
        src / "UCMerced_LandUse" / "Images",
        {f"c{i:02d}": 2 for i in range(classes)},
        ".tif",
        (6, 6),
    )
    with zipfile.ZipFile(path, "w") as z:
        for f in sorted(src.rglob("*")):
            z.write(f, f.relative_to(src).as_posix())
    return path


def test_download_verifies_and_unpacks(tmp_path):
    archive = _zip_ucm_like(tmp_path / "ucm.zip")
    sha = hashlib.sha256(archive.read_bytes()).hexdigest()
    md5 = hashlib.md5(archive.read_bytes()).hexdigest()
    dest = tmp_path / "data" / "ucm"
    out = download_and_extract(
        archive.as_uri(), dest, sha256=sha, md5=md5, size=archive.stat().st_size
    )
    assert out == dest and (dest / "UCMerced_LandUse" / "Images" / "c00" / "c0000.tif").is_file()
    assert sorted(p.name for p in dest.parent.iterdir()) == ["ucm"]  # no temp leftovers


@pytest.mark.parametrize("kind", ["sha256", "md5", "size"])
def test_download_bad_checksum_leaves_nothing(tmp_path, kind):
    archive = _zip_ucm_like(tmp_path / "ucm.zip")
    parent = tmp_path / "data"
    parent.mkdir()
    bad = {"sha256": {"sha256": "0" * 64}, "md5": {"md5": "0" * 32}, "size": {"size": 1}}[kind]
    with pytest.raises(
        ChecksumError, match=r"download of file:.*ucm\.zip has .* expected; .*retry"
    ):
        download_and_extract(archive.as_uri(), parent / "ucm", **bad)
    assert list(parent.iterdir()) == []


def test_download_unreachable_leaves_nothing(tmp_path):
    parent = tmp_path / "data"
    parent.mkdir()
    with pytest.raises(DataError, match=r"cannot download file:.*missing\.zip .*by hand into"):
        download_and_extract((tmp_path / "missing.zip").as_uri(), parent / "ucm")
    assert list(parent.iterdir()) == []


def test_load_ucm_with_download(tmp_path, monkeypatch):
    archive = _zip_ucm_like(tmp_path / "ucm.zip")
    spec = dataclasses.replace(DATASETS["ucm"], url=archive.as_uri())
    monkeypatch.setitem(DATASETS, "ucm", spec)
    data = load_dataset("ucm", tmp_path / "data" / "ucm", image_size=8, download=True)
    assert data.num_classes == 21 and len(data.train) == 21 and len(data.test) == 21
    assert data.mean == bd.UCM_MEAN
    with pytest.raises(DataError, match="no download address is known for nwpu-resisc45"):
        load_dataset("nwpu-resisc45", tmp_path / "nwpu", download=True)


# --------------------------------------------------------------------------- real data


@pytest.mark.skipif(not UCM.is_dir(), reason="../shared/data/ucmerced not present")
def test_real_ucmerced_split_and_decode():
    data = load_dataset("ucm", UCM, image_size=32, seed=0)
    assert data.num_classes == 21 and len(data.test) == 420
    assert len(data.train) == 1512 and len(data.val) == 168  # 8 + 72 of the 80 per class
    per_class = np.bincount(data.test.targets, minlength=21)
    assert per_class.tolist() == [20] * 21
    x, y = data.test[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and y == 0
    assert data.stats_source.startswith("UC Merced")


@pytest.mark.skipif(not UCM_TIF.is_dir(), reason="../shared/data/ucmerced-tif-sample not present")
def test_real_ucmerced_tif_sample_as_imagefolder():
    data = load_dataset("imagefolder", UCM_TIF, image_size=32)
    assert data.num_classes == 21
    assert len(data.train) + len(data.val) + len(data.test) == 65
    sizes = {read_image(UCM_TIF / rel).shape for rel, _ in data.split["train"]}
    assert len(sizes) > 1  # odd sizes are really there
    assert all(data.train[i][0].shape == (3, 32, 32) for i in range(len(data.train)))
