"""The decoded-image cache file (issue 31): built a few images at a time, resumable,
shared by later runs, DataLoader workers and processes; in memory or read from disk."""

from __future__ import annotations

import json
import logging
import os
import pickle
import shutil
import subprocess
import sys
import time
import weakref
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

import bpl.data.cache as cache_mod
import bpl.data.cachefile as cachefile
import bpl.data.images
from bpl.cli import main as bpl_main
from bpl.config import resolve_command
from bpl.data import (
    CorruptImageError,
    DataError,
    DiskImages,
    PackedImages,
    clear_caches,
    list_caches,
    load_dataset,
)
from bpl.errors import BPLError
from bpl.files import exclusive_lock

ROOT = Path(__file__).resolve().parents[1]


def _tree(root: Path, n_per_class: int = 6, classes: int = 2, size=(20, 14)) -> Path:
    """``root/<class>/<i>.png`` with a different colour per image (so images differ)."""
    g = torch.Generator().manual_seed(0)
    for k in range(classes):
        for i in range(n_per_class):
            path = root / f"c{k}" / f"{i:03d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            px = torch.randint(0, 256, (size[1], size[0], 3), generator=g, dtype=torch.uint8)
            Image.fromarray(px.numpy()).save(path)
    return root


def _count_decodes(monkeypatch) -> list[str]:
    calls: list[str] = []
    real = bpl.data.images.read_image

    def counting(path):
        calls.append(str(path))
        return real(path)

    monkeypatch.setattr(bpl.data.images, "read_image", counting)
    return calls


def _no_decoding(monkeypatch) -> None:
    def refuse(path):
        raise AssertionError(f"decoded {path} again")

    monkeypatch.setattr(bpl.data.images, "read_image", refuse)


def _images(data) -> list[torch.Tensor]:
    src = data.train.source
    return [src[i] for i in range(len(src))]


# --------------------------------------------------------------------------- building


def test_a_build_holds_a_few_decoded_images_never_the_dataset(tmp_path, monkeypatch):
    root = _tree(tmp_path / "ds", n_per_class=30)
    alive: weakref.WeakSet = weakref.WeakSet()
    most = [0]
    real = cache_mod.load_resized

    def tracked(path, size):
        img = real(path, size)
        alive.add(img)
        most[0] = max(most[0], len(alive))
        return img

    monkeypatch.setattr(cache_mod, "load_resized", tracked)
    monkeypatch.setattr(PackedImages, "from_images", None)  # the old whole-list packing
    data = load_dataset("imagefolder", root, image_size=16, cache_dir=tmp_path / "c",
                        cache="mmap")
    window = min(8, os.cpu_count() or 1) * cache_mod.WINDOW_PER_THREAD
    assert len(data.train) + len(data.test) + len(data.val) == 60
    assert most[0] <= window + 2 < 60  # decoded images alive at once: the window, not 60


def test_second_load_reads_the_file_and_its_sums_not_the_images(tmp_path, monkeypatch):
    root = _tree(tmp_path / "ds")
    first = load_dataset("imagefolder", root, image_size=16, cache_dir=tmp_path / "c")
    assert first.cache_mode == "memory" and first.cache_file.suffix == ".cache"
    plain = load_dataset("imagefolder", root, image_size=16, cache="off")
    plain_test = [plain.test[i][0] for i in range(len(plain.test))]
    _no_decoding(monkeypatch)
    read = []
    real = DiskImages.__getitem__
    monkeypatch.setattr(DiskImages, "__getitem__", lambda self, i: read.append(i) or real(self, i))
    second = load_dataset("imagefolder", root, image_size=16, cache_dir=tmp_path / "c",
                          cache="mmap")
    assert isinstance(second.train.source, DiskImages) and second.cache_file == first.cache_file
    # mean/std computed from the training split: from the sums the cache recorded
    assert second.stats_source == "computed from the training split" and read == []
    assert second.mean == plain.mean == first.mean and second.std == plain.std
    for a, b in zip(_images(first), _images(second)):
        assert torch.equal(a, b)
    for i, x in enumerate(plain_test):
        assert torch.equal(second.test[i][0], x)


def test_a_changed_file_builds_another_cache(tmp_path, monkeypatch):
    root = _tree(tmp_path / "ds")
    first = load_dataset("imagefolder", root, image_size=16, cache_dir=tmp_path / "c")
    img = root / "c0" / "000.png"
    Image.new("RGB", (20, 14), (1, 2, 3)).save(img)
    os.utime(img, ns=(time.time_ns(), time.time_ns() + 10**9))
    calls = _count_decodes(monkeypatch)
    second = load_dataset("imagefolder", root, image_size=16, cache_dir=tmp_path / "c")
    assert second.cache_file != first.cache_file and len(calls) == 12


def test_a_cut_off_build_is_never_read_and_continues_where_it_stopped(tmp_path, monkeypatch):
    root = _tree(tmp_path / "ds", n_per_class=10)
    monkeypatch.setattr(cachefile, "CHECKPOINT_SECONDS", 0.0)  # record after every image
    real = bpl.data.images.read_image
    calls: list[str] = []
    stop = [True]

    def dies_at_12(path):
        calls.append(str(path))
        if len(calls) == 12 and stop[0]:
            stop[0] = False
            raise KeyboardInterrupt
        return real(path)

    monkeypatch.setattr(bpl.data.images, "read_image", dies_at_12)
    cdir = tmp_path / "c"
    with pytest.raises(KeyboardInterrupt):
        load_dataset("imagefolder", root, image_size=16, cache_dir=cdir, cache="mmap")
    assert not list(cdir.glob("*.cache"))  # nothing a reader would take for complete
    [entry] = list_caches(cdir)
    assert entry.state == "partial" and 0 < entry.images < 12
    done = entry.images
    calls.clear()
    data = load_dataset("imagefolder", root, image_size=16, cache_dir=cdir, cache="mmap")
    assert len(calls) == 20 - done  # the rest only
    assert [e.state for e in list_caches(cdir)] == ["complete"]
    fresh = load_dataset("imagefolder", root, image_size=16, cache_dir=tmp_path / "fresh",
                         cache="mmap")
    for a, b in zip(_images(data), _images(fresh)):
        assert torch.equal(a, b)
    assert data.mean == fresh.mean and data.std == fresh.std


def test_a_damaged_progress_record_or_cache_file_is_rebuilt(tmp_path, monkeypatch, caplog):
    root = _tree(tmp_path / "ds")
    cdir = tmp_path / "c"
    first = load_dataset("imagefolder", root, image_size=16, cache_dir=cdir, cache="mmap")
    expected = _images(first)
    del first
    path = next(cdir.glob("*.cache"))
    with open(path, "r+b") as f:  # cut: the size no longer matches the index
        f.truncate(path.stat().st_size - 10)
    calls = _count_decodes(monkeypatch)
    with caplog.at_level(logging.WARNING):
        again = load_dataset("imagefolder", root, image_size=16, cache_dir=cdir, cache="mmap")
    assert "ignoring damaged image cache" in caplog.text and len(calls) == 12
    assert all(torch.equal(a, b) for a, b in zip(_images(again), expected))
    # a progress record of another build is not continued
    partial = cachefile.partial_path(path)
    partial.write_bytes(b"x" * 5000)
    cachefile.progress_path(path).write_text(json.dumps({"key": "other", "bytes": 4096}))
    path.unlink()
    calls.clear()
    third = load_dataset("imagefolder", root, image_size=16, cache_dir=cdir, cache="mmap")
    assert len(calls) == 12 and all(torch.equal(a, b) for a, b in zip(_images(third), expected))
    assert not partial.exists() and not cachefile.progress_path(path).exists()


def test_unreadable_files_are_recorded_once(tmp_path, monkeypatch):
    root = _tree(tmp_path / "ds")
    (root / "c1" / "bad.png").write_bytes(b"not a png")
    cdir = tmp_path / "c"
    with pytest.raises(CorruptImageError, match="bad.png"):
        load_dataset("imagefolder", root, image_size=16, cache_dir=cdir)
    _no_decoding(monkeypatch)  # the cache was written all the same, with what failed
    data = load_dataset("imagefolder", root, image_size=16, cache_dir=cdir, skip_bad=True)
    assert data.bad == ["c1/bad.png"] and len(_images(data)) == 12
    with pytest.raises(CorruptImageError, match=r"1 unreadable image\(s\).*bad.png"):
        load_dataset("imagefolder", root, image_size=16, cache_dir=cdir)


# --------------------------------------------------------------------------- choosing the path


def test_auto_keeps_the_cache_in_memory_within_the_budget_and_says_why(
        tmp_path, monkeypatch, caplog):
    root = _tree(tmp_path / "ds")
    nbytes = 12 * 3 * 18 * 25  # 12 images of 25 x 18 px (resized from 20 x 14 to 18 px)
    monkeypatch.setattr(cache_mod, "available_memory", lambda: 4 * nbytes)
    kw = {"image_size": 16, "cache_dir": tmp_path / "c"}
    with caplog.at_level(logging.INFO):
        data = load_dataset("imagefolder", root, **kw)
    assert data.cache_mode == "memory" and isinstance(data.train.source, PackedImages)
    assert "fits the memory budget" in data.cache_why and "cache_budget=0.5" in data.cache_why
    assert "image cache: in memory" in caplog.text
    data = load_dataset("imagefolder", root, cache_budget=0.2, **kw)
    assert data.cache_mode == "mmap" and "is over the memory budget" in data.cache_why
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "3")  # one copy per torchrun process
    data = load_dataset("imagefolder", root, **kw)
    assert data.cache_mode == "mmap" and "x 3 processes" in data.cache_why
    data = load_dataset("imagefolder", root, cache="memory", cache_budget=0.0, **kw)
    assert data.cache_mode == "memory" and data.cache_why == "asked for (cache='memory')"
    with pytest.raises(DataError, match="cache must be one of auto, memory, mmap, off"):
        load_dataset("imagefolder", root, cache="ram", **kw)
    with pytest.raises(DataError, match="cache_budget"):
        load_dataset("imagefolder", root, cache_budget=1.5, **kw)


def test_cache_off_decodes_on_the_fly_and_writes_nothing(tmp_path, monkeypatch, caplog):
    root = _tree(tmp_path / "ds")
    monkeypatch.setenv("BPL_CACHE_DIR", str(tmp_path / "default"))
    with caplog.at_level(logging.INFO):
        data = load_dataset("imagefolder", root, image_size=16, cache="off")
    assert data.cache_mode == "off" and data.cache_file is None
    assert "image cache: off" in caplog.text and not (tmp_path / "default").exists()
    calls = _count_decodes(monkeypatch)
    data.test[0]
    assert len(calls) == 1
    load_dataset("imagefolder", root, image_size=16)  # the default folder otherwise
    assert len(list((tmp_path / "default").glob("imagefolder-18px-*.cache"))) == 1


def test_an_unwritable_or_full_cache_folder_is_one_clear_error(tmp_path, monkeypatch):
    root = _tree(tmp_path / "ds")
    blocker = tmp_path / "file"
    blocker.write_text("a file, not a folder")
    with pytest.raises(DataError, match=r"cannot write the image cache in .*as cache_dir.*"
                                        r"cache='off'") as err:
        load_dataset("imagefolder", root, image_size=16, cache_dir=blocker / "sub")
    assert "\n" not in str(err.value) and err.value.param == "cache_dir"
    monkeypatch.setattr(cache_mod.shutil, "disk_usage",
                        lambda p: shutil._ntuple_diskusage(10**12, 10**12, 1000))
    with pytest.raises(DataError, match=r"needs about .* which has 0.0 MB free.*cache='off'"):
        load_dataset("imagefolder", root, image_size=16, cache_dir=tmp_path / "c")


# --------------------------------------------------------------------------- sharing


def test_dataloader_workers_read_the_same_file(tmp_path, monkeypatch):
    root = _tree(tmp_path / "ds")
    data = load_dataset("imagefolder", root, image_size=16, cache_dir=tmp_path / "c",
                        cache="mmap", normalization="imagenet")
    src = data.test.source
    assert os.path.samestat(os.fstat(src._fd), os.stat(data.cache_file))
    _no_decoding(monkeypatch)  # forked workers inherit this: none may decode
    direct = torch.stack([data.test[i][0] for i in range(len(data.test))])
    loader = DataLoader(data.test, batch_size=2, num_workers=2,
                        multiprocessing_context="fork")
    assert torch.equal(torch.cat([x for x, _ in loader]), direct)
    clone = pickle.loads(pickle.dumps(data.test))  # a spawned worker reopens it by path
    assert clone.source._fd != src._fd and torch.equal(clone[0][0], direct[0])
    mapped = DiskImages(data.cache_file, src.shapes, src.start, access="mmap")
    assert all(torch.equal(mapped[i], src[i]) for i in range(len(src)))


_WRITER = """
import json, logging, os, sys, time
import bpl.data.images as images
from bpl.data import load_dataset
real = images.read_image
count = []
def held(path):  # the first decode waits for the test's go-ahead: the lock is held till then
    count.append(path)
    while not os.path.exists(sys.argv[3]):
        time.sleep(0.05)
    return real(path)
images.read_image = held
while not os.path.exists(sys.argv[4]):  # imported; the test says when to load
    time.sleep(0.05)
logging.basicConfig(level=logging.INFO, format="%(message)s")
data = load_dataset("imagefolder", sys.argv[1], image_size=16, cache_dir=sys.argv[2],
                    cache="mmap", progress=False)
print(json.dumps({"decoded": len(count), "file": str(data.cache_file)}))
"""


def test_one_process_builds_the_cache_while_another_waits_then_reads_it(tmp_path):
    root = _tree(tmp_path / "ds")
    cdir, go, load2 = tmp_path / "c", tmp_path / "go", tmp_path / "load2"
    script = tmp_path / "writer.py"
    script.write_text(_WRITER)
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    logs = [tmp_path / "first.log", tmp_path / "second.log"]

    def start(log: Path, when: Path) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, str(script), str(root), str(cdir), str(go),
                                 str(when)], stdout=subprocess.PIPE, stderr=log.open("w"),
                                text=True, env=env)

    def wait_for(what, proc: subprocess.Popen) -> None:
        deadline = time.monotonic() + 90
        while not what():
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.05)

    first, second = start(logs[0], script), start(logs[1], load2)  # both import at once
    wait_for(lambda: list(cdir.glob("*.cache.partial")), first)  # building, lock held
    load2.touch()
    wait_for(lambda: "waiting for" in logs[1].read_text(), second)
    go.touch()
    outs = [p.communicate(timeout=120)[0] for p in (first, second)]
    assert first.returncode == 0 and second.returncode == 0, [log.read_text() for log in logs]
    a, b = (json.loads(out.strip().splitlines()[-1]) for out in outs)
    assert a["decoded"] == 12 and b["decoded"] == 0 and a["file"] == b["file"]
    second_log = logs[1].read_text()
    assert f"waiting for pid {first.pid} to finish the image cache" in second_log
    assert "found the decoded images" in second_log and "decoding" not in second_log


# --------------------------------------------------------------------------- bpl cache, flags


def test_bpl_cache_ls_and_clear(tmp_path, capsys):
    cdir = tmp_path / "c"
    for name in ("a", "b"):
        load_dataset("imagefolder", _tree(tmp_path / name), image_size=16, cache_dir=cdir)
    load_dataset("imagefolder", tmp_path / "a", image_size=24, cache_dir=cdir)
    (cdir / "ucm-110px-0123456789abcdef.pt").write_bytes(b"old")  # bpl's earlier format
    capsys.readouterr()
    assert bpl_main(["cache", "ls", "--cache-dir", str(cdir)]) == 0
    out = capsys.readouterr().out
    assert out.count("complete") == 3 and "old format" in out and "4 cache(s)" in out
    assert bpl_main(["cache", "ls", "--cache-dir", str(cdir), "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert sorted((e["dataset"], e["size"], e["images"]) for e in listed) == [
        ("imagefolder", 18, 12), ("imagefolder", 18, 12), ("imagefolder", 27, 12), ("ucm", 110, None)]
    assert bpl_main(["cache", "clear", "--cache-dir", str(cdir), "--data", "ucm"]) == 0
    assert "deleted 1 cache(s)" in capsys.readouterr().out
    busy = next(cdir.glob("*-27px-*.cache"))
    with exclusive_lock(cachefile.lock_path(busy)):  # a build in progress is left alone
        removed, left = clear_caches(cdir)
    assert len(removed) == 2 and [e.path for e in left] == [busy] and busy.exists()
    assert bpl_main(["cache", "clear", "--cache-dir", str(cdir)]) == 0
    assert "deleted 1 cache(s)" in capsys.readouterr().out
    assert list(cdir.iterdir()) == []  # lock files too
    assert bpl_main(["cache", "ls", "--cache-dir", str(cdir)]) == 0
    assert "no image caches" in capsys.readouterr().out


def test_cache_flags_resolve_and_are_checked():
    cfg = resolve_command("train", {"cache": "mmap", "cache_budget": 0.25, "cache_dir": "/x"})
    assert (cfg.cache, cfg.cache_budget, cfg.cache_dir) == ("mmap", 0.25, "/x")
    assert resolve_command("train", {}).cache == "auto"
    with pytest.raises(BPLError, match="--cache-budget is a share"):
        resolve_command("train", {"cache_budget": 2.0})
    with pytest.raises(BPLError, match="--cache must be one of"):
        resolve_command("train", {"cache": "ram"})


def test_bpl_train_reads_from_disk_with_cache_mmap(tmp_path, monkeypatch):
    import bpl.pipeline.fitting

    root = _tree(tmp_path / "ds", n_per_class=8)
    loaded = []
    real = bpl.pipeline.fitting.load_dataset

    def spy(*args, **kwargs):  # the data the run trained on
        loaded.append(real(*args, **kwargs))
        return loaded[-1]

    monkeypatch.setattr(bpl.pipeline.fitting, "load_dataset", spy)
    for cache in ("mmap", "auto"):
        out = tmp_path / cache
        assert bpl_main(["train", "--data-root", str(root), "--arch", "tiny_resnet",
                         "--image-size", "16", "--epochs", "1", "--batch-size", "8", "--cache",
                         cache, "--cache-dir", str(tmp_path / "c"), "--quiet", "--no-latency",
                         "--out", str(out)]) == 0
        saved = json.loads((out / "config.json").read_text())
        assert saved["cache"] == cache and saved["cache_dir"] == str(tmp_path / "c")
    # mmap read the one cache file from disk; auto held the same 16 images in memory
    assert [d.cache_mode for d in loaded] == ["mmap", "memory"]
    assert loaded[0].cache_file == loaded[1].cache_file
    # and the run's own record says so, with the reason
    for cache, data in zip(("mmap", "auto"), loaded, strict=True):
        images = json.loads((tmp_path / cache / "metrics.json").read_text())["images"]
        assert images == {"mode": data.cache_mode, "why": data.cache_why} and images["why"]
        assert f"- images read: {data.cache_mode} (" in (tmp_path / cache / "report.md").read_text()
    assert len(list((tmp_path / "c").glob("*.cache"))) == 1
