"""Datasets larger than memory (issue 31): the decoded-image cache in memory against read from disk.

Synthetic 256 px JPEGs (10 classes, smooth random colour fields) are written once under
``--work`` (default ``/tmp/bpl_bench_data_cache``; deleted at the end unless ``--keep``);
each dataset size is a folder of hard links to the first images. Sections:

- ``memory``: ``load_dataset("imagefolder", root, image_size=224)`` in a fresh process per
  cell, for each number of images, each ``--modes`` (``memory``: the cache read into
  memory; ``mmap``: read from the cache file; ``old``: the code at ``--baseline-src``,
  bpl before issue 31) and each run (``first``: no cache yet; ``second``: the file from
  the first): peak resident memory (``ru_maxrss``, and above the process after its
  imports), load time and the time to the first training batch. The page cache is not
  dropped between runs (it would slow every other job on the machine): a second run
  reads what the kernel still holds. In-memory cells that would not fit are skipped.
- ``access``: every image of one cache file read once in a fresh process, through
  ``os.pread`` (bpl's default) and through ``np.memmap``: images/s and how much the
  process's resident memory grew (mapped pages count in it, copied-out ones do not).
- ``speed``: training images/s (and DataLoader-only images/s) from the cache in memory
  against the same file read from disk, for each ``--arms`` (arch:px) and ``--workers``,
  the two interleaved in rounds in one process.
- ``ddp``: two torchrun processes (gloo, CPU) load the data as ``bpl train`` does
  (:func:`bpl.pipeline.load_data`: rank 0 first) from one cache and train a few steps;
  each process's peak resident memory and whether it decoded.
- ``epoch``: one training epoch of a small model from the cache read from disk, the
  main process's and the workers' peak resident memory.

Results go to ``benchmarks/results/<name>.{json,md}`` after every cell; a rerun skips the
cells the file holds (``--fresh`` starts over). Timings taken while other jobs run are
labelled with the load average; ``--note`` adds a line.

    python benchmarks/bench_data_cache.py --quick                 # a minute: all sections, tiny
    python benchmarks/bench_data_cache.py --sections memory --sizes 1500 6000 30000 120000
    python benchmarks/bench_data_cache.py --baseline-src /tmp/bpl_old/src --modes old memory mmap
    python benchmarks/bench_data_cache.py --sections speed ddp epoch
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from common import RESULTS, load_average, machine, write_results

HERE = Path(__file__).resolve()
SRC = HERE.parents[1] / "src"
CLASSES = 10
GB = 1e9


# --------------------------------------------------------------------------- synthetic data


def _image(i: int, path: Path) -> None:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(i)
    small = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
    big = np.asarray(small.resize((256, 256), Image.BILINEAR), dtype=np.int16)
    big = np.clip(big + rng.integers(-12, 13, big.shape), 0, 255).astype(np.uint8)
    Image.fromarray(big).save(path, quality=90)


def make_pool(work: Path, n: int) -> Path:
    """``work/pool/c<k>/<i>.jpg``: at least ``n`` images, ``n / 10`` per class (kept)."""
    pool = work / "pool"
    per = -(-n // CLASSES)
    todo = [pool / f"c{k}" / f"{i:06d}.jpg" for k in range(CLASSES) for i in range(per)]
    todo = [p for p in todo if not p.exists()]
    for k in range(CLASSES):
        (pool / f"c{k}").mkdir(parents=True, exist_ok=True)
    if todo:
        print(f"writing {len(todo)} synthetic JPEGs to {pool}", flush=True)

        def write(p: Path) -> None:
            tmp = p.with_suffix(".tmp.jpg")
            _image(int(p.stem) * CLASSES + int(p.parent.name[1:]), tmp)
            tmp.rename(p)

        with ThreadPoolExecutor(2) as ex:
            list(ex.map(write, todo))
    return pool


def dataset_of(work: Path, n: int) -> Path:
    """A folder of ``n`` images (``n / 10`` per class): hard links into the pool."""
    root = work / f"ds{n}"
    per = n // CLASSES
    if (root / "done").exists():
        return root
    pool = make_pool(work, n)
    shutil.rmtree(root, ignore_errors=True)
    for k in range(CLASSES):
        (root / f"c{k}").mkdir(parents=True)
        for i in range(per):
            os.link(pool / f"c{k}" / f"{i:06d}.jpg", root / f"c{k}" / f"{i:06d}.jpg")
    (root / "done").touch()
    return root


# --------------------------------------------------------------------------- child processes


def _rss() -> int:
    """Peak resident memory of this process so far, bytes."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def child_load(spec: dict) -> dict:
    """One load in this fresh process: peak memory, time to loaded and to a first batch."""
    import torch
    from torch.utils.data import DataLoader

    from bpl.data import load_dataset

    torch.set_num_threads(1)
    after_imports = _rss()
    t0 = time.perf_counter()
    kw: dict[str, Any] = {"image_size": spec["image_size"], "progress": False}
    if spec["mode"] != "old":  # bpl before issue 31 knows neither cache= values nor budgets
        kw.update(cache=spec["mode"], cache_dir=spec["cache_dir"])
    data = load_dataset("imagefolder", spec["root"], **kw)
    loaded = time.perf_counter() - t0
    next(iter(DataLoader(data.train, batch_size=64, shuffle=True)))
    first = time.perf_counter() - t0
    return {"load_s": loaded, "first_batch_s": first, "peak_rss": _rss(),
            "rss_after_imports": after_imports, "mode": getattr(data, "cache_mode", "old"),
            "why": getattr(data, "cache_why", ""), "images": len(data.train.source),
            "cache_file": str(getattr(data, "cache_file", ""))}


def child_access(spec: dict) -> dict:
    """Read every image of a cache file once (``os.pread`` or ``np.memmap``): speed, memory."""
    from bpl.data import DiskImages
    from bpl.data.cachefile import DATA_START, read_index

    index = read_index(Path(spec["file"]))
    src = DiskImages(spec["file"], index.shapes, DATA_START, access=spec["access"])
    before = _rss()
    t0 = time.perf_counter()
    for i in range(len(src)):
        src[i].sum()  # every byte read
    seconds = time.perf_counter() - t0
    return {"access": spec["access"], "images_per_s": len(src) / seconds,
            "peak_rss": _rss(), "rss_before": before, "file_gb": src.nbytes / GB}


def _probe(classes: int):
    """``--epoch-arch probe``: one stride-8 conv and a linear layer, so cheap at 224 px that
    an epoch times the data path (tiny_resnet keeps 224 px through its first stage: about 4
    images/s on one thread, 8 hours for 120,000 images)."""
    from torch import nn

    return nn.Sequential(nn.Conv2d(3, 16, 8, stride=8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(16, classes))


def child_epoch(spec: dict) -> dict:
    """One epoch of a small model from the cache; peak memory of the main process and workers."""
    import torch
    from torch import nn

    from bpl.data import load_dataset
    from bpl.engine import make_loader
    from bpl.models import build_model

    torch.set_num_threads(spec.get("threads", 1))
    t0 = time.perf_counter()
    data = load_dataset("imagefolder", spec["root"], image_size=spec["image_size"],
                        cache=spec["mode"], cache_dir=spec["cache_dir"], progress=False)
    load_s = time.perf_counter() - t0
    model = (_probe(data.num_classes) if spec["arch"] == "probe"
             else build_model(spec["arch"], data.num_classes))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    loader = make_loader(data.train, batch_size=spec["batch"], train=True,
                         device=torch.device("cpu"), workers=spec["workers"])
    t1, n = time.perf_counter(), 0
    model.train()
    for x, y in loader:
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        n += len(y)
    epoch_s = time.perf_counter() - t1
    del loader  # stops the (persistent) workers, so their peak is counted below
    gc.collect()
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    return {"load_s": load_s, "epoch_s": epoch_s, "images": n, "images_per_s": n / epoch_s,
            "peak_rss": _rss(), "workers_peak_rss": children, "mode": data.cache_mode,
            "cache_gb": data.train.source.nbytes / GB}


def child_ddp(spec: dict) -> None:
    """A torchrun process: load as `bpl train` does, train a few DDP steps, write its numbers."""
    import torch
    from torch import nn

    import bpl.data.images as images
    from bpl import distributed
    from bpl.config import resolve_command
    from bpl.engine import make_loader
    from bpl.files import atomic_write_text
    from bpl.models import build_model
    from bpl.pipeline import load_data

    torch.set_num_threads(1)
    decoded = []
    real = images.read_image
    images.read_image = lambda p: decoded.append(p) or real(p)
    ctx = distributed.init("cpu")
    cfg = resolve_command("train", {"data": "imagefolder", "data_root": spec["root"],
                                    "image_size": spec["image_size"], "cache": spec["mode"],
                                    "cache_dir": spec["cache_dir"]})
    t0 = time.perf_counter()
    data = load_data(cfg, Path(spec["run_dir"]), progress=False)
    load_s = time.perf_counter() - t0
    model = distributed.wrap(build_model(spec["arch"], data.num_classes), torch.device("cpu"))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    loader = make_loader(data.train, batch_size=spec["batch"], train=True,
                         device=torch.device("cpu"), workers=0)
    t1, steps = time.perf_counter(), 0
    for x, y in loader:
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        steps += 1
        if steps == spec["steps"]:
            break
    out = {"rank": ctx.rank, "decoded": len(decoded), "load_s": load_s,
           "step_s": (time.perf_counter() - t1) / max(steps, 1), "peak_rss": _rss(),
           "mode": data.cache_mode, "why": data.cache_why, "cache_file": str(data.cache_file)}
    atomic_write_text(Path(spec["out"], f"rank{ctx.rank}.json"), json.dumps(out))
    distributed.shutdown()


def run_child(kind: str, spec: dict, src: Path = SRC, timeout: float = 7200) -> dict:
    """Run ``child_<kind>(spec)`` in a fresh interpreter (with bpl from ``src``)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(src), str(HERE.parent)])}
    proc = subprocess.run([sys.executable, str(HERE), "--child", kind, json.dumps(spec)],
                          capture_output=True, text=True, env=env, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{kind} child failed: {proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- sections


def _record(result: dict, key: str, value: dict, args) -> None:
    result["cells"][key] = {**value, "load_average": load_average()}
    _write(result, args)
    print(key, json.dumps({k: v for k, v in value.items() if k != "raw"}), flush=True)


def _cache_bytes(n: int, size: int) -> int:
    side = round(size / 0.875)
    return n * 3 * side * side


def section_memory(result: dict, args) -> None:
    for n in args.sizes:
        root = dataset_of(args.work, n)
        for mode in args.modes:
            fits = _cache_bytes(n, args.image_size) * (2 if mode == "old" else 1)
            if mode != "mmap" and fits > 0.85 * _available():
                for run in ("first", "second"):
                    key = f"memory/{n}/{mode}/{run}"
                    if key not in result["cells"]:
                        _record(result, key, {"skipped": f"needs ~{fits / GB:.1f} GB of memory, "
                                              f"{_available() / GB:.1f} GB available"}, args)
                continue
            cdir = args.work / f"cache{n}-{mode}"
            for run in ("first", "second"):
                key = f"memory/{n}/{mode}/{run}"
                if key in result["cells"]:
                    continue
                if run == "first":
                    shutil.rmtree(cdir, ignore_errors=True)
                if mode == "old" and run == "second":  # before issue 31: no cache across runs
                    _record(result, key, {"skipped": "no cache across runs without --cache-dir"},
                            args)
                    continue
                spec = {"root": str(root), "image_size": args.image_size, "mode": mode,
                        "cache_dir": str(cdir)}
                src = Path(args.baseline_src) if mode == "old" else SRC
                _record(result, key, {"n": n, **run_child("load", spec, src)}, args)
            if not args.keep_caches:
                shutil.rmtree(cdir, ignore_errors=True)


def _available() -> int:
    from bpl.data.cache import available_memory

    return available_memory()


class Endless:
    """The batches of a DataLoader without end: a new pass when one ends."""

    def __init__(self, loader) -> None:
        self.loader, self.it = loader, iter(loader)

    def __next__(self):
        try:
            return next(self.it)
        except StopIteration:
            self.it = iter(self.loader)
            return next(self.it)


def section_access(result: dict, args) -> None:
    """Every image read once through ``os.pread`` (bpl's default) and through ``np.memmap``."""
    for n in args.access_images:
        key = f"access/{n}"
        if key in result["cells"]:
            continue
        cdir = args.work / f"cache{n}-access"
        built = run_child("load", {"root": str(dataset_of(args.work, n)), "mode": "mmap",
                                   "image_size": args.image_size, "cache_dir": str(cdir)})
        raw: dict[str, list[dict]] = {"pread": [], "mmap": []}
        for r in range(args.rounds):
            for access in (["pread", "mmap"] if r % 2 == 0 else ["mmap", "pread"]):
                raw[access].append(run_child("access", {"file": built["cache_file"],
                                                        "access": access}))
        _record(result, key, {"n": n, "file_gb": raw["pread"][0]["file_gb"], **{
            a: {"images_per_s": statistics.median(c["images_per_s"] for c in cells),
                "rss_growth": max(c["peak_rss"] - c["rss_before"] for c in cells)}
            for a, cells in raw.items()}, "raw": raw}, args)
        if not args.keep_caches:
            shutil.rmtree(cdir, ignore_errors=True)


def section_speed(result: dict, args) -> None:
    import torch
    from torch import nn

    from bpl.data import DiskImages, load_dataset
    from bpl.engine import make_loader
    from bpl.models import build_model

    torch.set_num_threads(args.threads)
    root = dataset_of(args.work, args.speed_images)
    for arm in args.arms:
        arch, px = arm.split(":")
        size = int(px)
        cdir = args.work / "cache-speed"
        sets = {mode: load_dataset("imagefolder", root, image_size=size, cache=mode,
                                   cache_dir=cdir, progress=False).train
                for mode in ("memory", "mmap")}
        pread = sets["mmap"].source  # the same file through np.memmap
        sets["memmap"] = copy.copy(sets["mmap"])
        sets["memmap"].source = DiskImages(pread.path, pread.shapes, pread.start, access="mmap")
        for workers in args.workers:
            key = f"speed/{arch}/{size}/w{workers}"
            if key in result["cells"]:
                continue
            model = build_model(arch, CLASSES)
            opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
            loaders = {m: Endless(make_loader(d, batch_size=args.batch, train=True,
                                              device=torch.device("cpu"), workers=workers))
                       for m, d in sets.items()}
            raw: dict[str, dict[str, list[float]]] = {m: {"loader": [], "train": []}
                                                      for m in loaders}
            for m in loaders:  # warm up: workers started
                next(loaders[m])
            for r in range(args.rounds):
                for m in (list(loaders) if r % 2 == 0 else list(loaders)[::-1]):  # ABC, CBA
                    t0 = time.perf_counter()
                    for _ in range(args.steps):
                        next(loaders[m])
                    raw[m]["loader"].append(args.steps * args.batch / (time.perf_counter() - t0))
                    t0 = time.perf_counter()
                    for _ in range(args.steps):
                        x, y = next(loaders[m])
                        opt.zero_grad()
                        nn.functional.cross_entropy(model(x), y).backward()
                        opt.step()
                    raw[m]["train"].append(args.steps * args.batch / (time.perf_counter() - t0))
            med = {m: {k: statistics.median(v) for k, v in d.items()} for m, d in raw.items()}
            _record(result, key, {
                "arch": arch, "size": size, "workers": workers, "images_per_s": med,
                **{f"{m}_over_memory": {k: med[m][k] / med["memory"][k]
                                        for k in ("loader", "train")} for m in ("mmap", "memmap")},
                "raw": raw}, args)
            del loaders


def section_ddp(result: dict, args) -> None:
    for run in ("first", "second"):
        key = f"ddp/{run}"
        if key in result["cells"]:
            continue
        root = dataset_of(args.work, args.ddp_images)
        cdir, out = args.work / "cache-ddp", args.work / f"ddp-{run}"
        if run == "first":
            shutil.rmtree(cdir, ignore_errors=True)
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        spec = {"root": str(root), "image_size": args.image_size, "mode": args.ddp_mode,
                "cache_dir": str(cdir), "run_dir": str(out / "run"), "out": str(out),
                "arch": args.ddp_arch, "batch": 2 * 8, "steps": args.ddp_steps}
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        env = {**os.environ, "OMP_NUM_THREADS": "1",
               "PYTHONPATH": os.pathsep.join([str(SRC), str(HERE.parent)])}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               "--master_addr", "127.0.0.1", "--master_port", str(port), str(HERE),
               "--child", "ddp", json.dumps(spec)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=7200)
        if proc.returncode != 0:
            raise RuntimeError(f"torchrun failed: {proc.stderr[-3000:]}")
        ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
        _record(result, key, {"n": args.ddp_images, "ranks": ranks}, args)
        shutil.rmtree(out, ignore_errors=True)


def section_epoch(result: dict, args) -> None:
    for n in args.epoch_images:
        key = f"epoch/{n}/{args.epoch_arch}/w{args.epoch_workers}"
        if key in result["cells"]:
            continue
        root = dataset_of(args.work, n)
        spec = {"root": str(root), "image_size": args.image_size, "mode": "mmap",
                "cache_dir": str(args.work / f"cache{n}-epoch"), "arch": args.epoch_arch,
                "batch": args.batch, "workers": args.epoch_workers, "threads": args.threads}
        _record(result, key, {"n": n, **run_child("epoch", spec)}, args)


# --------------------------------------------------------------------------- results


def _gb(v: float | None) -> str:
    return "" if v is None else f"{v / GB:.2f}"


SECTIONS = {"memory": section_memory, "access": section_access, "speed": section_speed,
            "ddp": section_ddp, "epoch": section_epoch}


def _load(cell: dict) -> str:
    return str((cell.get("load_average") or ["?"])[0])


def _table(title: str, intro: str, header: list[str], rows: list[str]) -> list[str]:
    """A markdown section: title, a line of context, the table (nothing without rows)."""
    if not rows:
        return []
    return [f"## {title}", "", *([intro, ""] if intro else []), "| " + " | ".join(header) + " |",
            "|" + "---|" * len(header), *rows, ""]


def markdown(result: dict) -> str:
    cells = result["cells"]
    m = result["machine"]
    lines = ["# The decoded-image cache: in memory against read from disk (issue 31)", "",
             f"Machine: {m['cpu']}, {m['cpu_count']} cores, torch {m['torch']}; "
             f"image size {result['image_size']} px (cache at "
             f"{round(result['image_size'] / 0.875)} px). {result['note']}".rstrip(), "",
             "Timings carry the 1-minute load average when they were taken: above the core "
             "count, other jobs shared the CPU and the seconds are upper bounds; peak memory "
             "does not depend on it.", ""]
    rows = []
    for k, v in cells.items():
        if k.startswith("memory/"):
            _, n, mode, run = k.split("/")
            if "skipped" in v:
                rows.append(f"| {n} | | {mode} | {run} | skipped: {v['skipped']} | | | | |")
                continue
            rows.append(
                f"| {n} | {_cache_bytes(int(n), result['image_size']) / GB:.2f} | {mode} | {run} | "
                f"{v['load_s']:.1f} | {v['first_batch_s']:.1f} | {_gb(v['peak_rss'])} | "
                f"{_gb(v['peak_rss'] - v['rss_after_imports'])} | {_load(v)} |")
    lines += _table("Memory: `load_dataset` in a fresh process", "", [
        "images", "cache GB", "path", "run", "load s", "first batch s", "peak RSS GB",
        "above imports GB", "load avg"], rows)
    rows = [f"| {v['n']} | {v['file_gb']:.2f} | {v['pread']['images_per_s']:.0f} | "
            f"{v['mmap']['images_per_s']:.0f} | {_gb(v['pread']['rss_growth'])} | "
            f"{_gb(v['mmap']['rss_growth'])} | {_load(v)} |"
            for k, v in cells.items() if k.startswith("access/")]
    lines += _table(
        "Reading the cache file: `os.pread` (bpl's default) against `np.memmap`",
        "Every image read once in a fresh process; median of the rounds, largest growth of "
        "resident memory.", ["images", "file GB", "pread img/s", "memmap img/s",
                             "pread RSS growth GB", "memmap RSS growth GB", "load avg"], rows)
    rows = []
    for k, v in cells.items():
        if k.startswith("speed/"):
            s, r, q = v["images_per_s"], v["mmap_over_memory"], v.get("memmap_over_memory")
            q = q or {"loader": float("nan"), "train": float("nan")}
            rows.append(f"| {v['arch']} | {v['size']} | {v['workers']} | "
                        f"{s['memory']['loader']:.0f} | {r['loader']:.2f} | {q['loader']:.2f} | "
                        f"{s['memory']['train']:.1f} | {r['train']:.2f} | {q['train']:.2f} | "
                        f"{_load(v)} |")
    lines += _table(
        "Speed: images/s from the cache in memory, and from disk as a ratio of it",
        f"Batch {result['batch']}, {result['threads']} torch thread(s), median of "
        f"{result['rounds']} interleaved rounds of {result['steps']} steps; `mmap` is "
        "`--cache mmap` (bpl reads with `os.pread`), `memmap` the same file through "
        "`np.memmap`.",
        ["model", "px", "workers", "loader: memory img/s", "mmap / memory",
         "memmap / memory", "training: memory img/s", "mmap / memory", "memmap / memory",
         "load avg"], rows)
    rows = [f"| {k.split('/')[1]} | {r['rank']} | {r['decoded']} | {r['mode']} | "
            f"{r['load_s']:.1f} | {_gb(r['peak_rss'])} | {_load(v)} |"
            for k, v in cells.items() if k.startswith("ddp/") for r in v["ranks"]]
    lines += _table("Two torchrun processes, one cache", "", [
        "run", "rank", "decoded", "path", "load s", "peak RSS GB", "load avg"], rows)
    rows = []
    for k, v in cells.items():
        if k.startswith("epoch/"):
            _, n, arch, w = k.split("/")
            rows.append(f"| {n} | {arch} | {w[1:]} | {v['cache_gb']:.2f} | {v['load_s']:.1f} | "
                        f"{v['epoch_s']:.0f} | {v['images_per_s']:.0f} | {_gb(v['peak_rss'])} | "
                        f"{_gb(v['workers_peak_rss'])} | {_load(v)} |")
    lines += _table("One training epoch from the cache read from disk", "", [
        "images", "model", "workers", "cache GB", "load s", "epoch s", "images/s",
        "main peak RSS GB", "workers peak RSS GB", "load avg"], rows)
    return "\n".join(lines)


def _write(result: dict, args) -> None:
    write_results(args.name, result, markdown(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--work", type=Path, default=Path("/tmp/bpl_bench_data_cache"))
    parser.add_argument("--sizes", nargs="+", type=int, default=[1500, 6000, 30000, 120000])
    parser.add_argument("--modes", nargs="+", default=["memory", "mmap"],
                        choices=["old", "memory", "mmap"])
    parser.add_argument("--baseline-src", metavar="DIR",
                        help="the src/ of bpl before issue 31, for --modes old")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--arms", nargs="+", default=["resnet18:64", "resnet50:224"],
                        help="speed: arch:px")
    parser.add_argument("--workers", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--speed-images", type=int, default=6000)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the trainer")
    parser.add_argument("--ddp-images", type=int, default=6000)
    parser.add_argument("--ddp-mode", default="mmap", choices=["auto", "memory", "mmap"])
    parser.add_argument("--ddp-arch", default="resnet18")
    parser.add_argument("--ddp-steps", type=int, default=3)
    parser.add_argument("--epoch-images", nargs="+", type=int, default=[120000])
    parser.add_argument("--access-images", nargs="+", type=int, default=[30000])
    parser.add_argument("--epoch-arch", default="probe",
                        help="a bpl model name, or probe (a stride-8 conv + linear: times the "
                             "data path)")
    parser.add_argument("--epoch-workers", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run")
    parser.add_argument("--name", default=None,
                        help="results file name (default: data_cache[_quick])")
    parser.add_argument("--note", default="", help="a line about the conditions")
    parser.add_argument("--fresh", action="store_true", help="ignore the results file's cells")
    parser.add_argument("--keep", action="store_true", help="keep --work (images, caches)")
    parser.add_argument("--keep-caches", action="store_true", help="keep each size's cache")
    parser.add_argument("--child", nargs=2, metavar=("KIND", "SPEC"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, spec = args.child[0], json.loads(args.child[1])
        if kind == "ddp":
            child_ddp(spec)
        else:
            print(json.dumps({"load": child_load, "epoch": child_epoch,
                              "access": child_access}[kind](spec)))
        return
    if "old" in args.modes and not args.baseline_src:
        parser.error("--modes old needs --baseline-src")
    if args.quick:
        if args.sizes == parser.get_default("sizes"):
            args.sizes = [200, 400]
        args.image_size, args.arms = 32, ["resnet18:32"]
        args.workers, args.speed_images, args.ddp_images = [0, 1], 200, 200
        args.epoch_images, args.steps, args.rounds, args.batch = [200], 2, 2, 16
        args.access_images = [200]
    args.name = args.name or ("data_cache_quick" if args.quick else "data_cache")
    path = RESULTS / f"{args.name}.json"
    result = {"machine": machine(), "image_size": args.image_size, "note": args.note,
              "batch": args.batch, "steps": args.steps, "rounds": args.rounds,
              "threads": args.threads, "cells": {}}
    if path.exists() and not args.fresh:
        old = json.loads(path.read_text())
        if old.get("image_size") == args.image_size:
            result["cells"] = old.get("cells", {})
    args.work.mkdir(parents=True, exist_ok=True)
    try:
        for section in args.sections:
            SECTIONS[section](result, args)
    finally:
        if not args.keep:
            shutil.rmtree(args.work, ignore_errors=True)
    _write(result, args)
    print(markdown(result))
    print(f"written to {path}")


if __name__ == "__main__":
    main()
