"""Which epoch to keep, and what a ``--max-drop`` budget is measured against, checked on
images no choice has seen (issue 26).

bpl chooses on a validation split of a few hundred images: the epoch it keeps
(``--select best`` or ``annealed``) and, under ``--max-drop``, whether a pruned step is
within P points of its baseline. This script measures how far those validation
judgments are from the truth. On EuroSAT with the studies' 10% training subset, the
training images the subset leaves out (19,440) are a held-out *pool* no run trains or
chooses on.

It trains nothing itself: it watches the convergence study's own runs of one seed (the
converged baseline and its one-shot cuts, ``convergence_cpu.yaml``) while they train, and
scores on a sample of the pool every epoch a rule could keep: each epoch trained at an
annealed rate (at most a tenth of the peak: ``annealed``, ``last`` and the annealed tail's
mean pick among them), read from the run's ``last.pt`` as it is written, and the run's
``best.pt`` when it finishes (``best``). The report then replays each rule on the recorded
validation curves: the pool top-1 of the epoch it keeps, how far its validation score is
above that (its optimism), and, for each cut, the drop it would judge against the pool's.
The test split is not used.

    # beside the study's chain of one seed (start it first; it waits for the runs)
    python benchmarks/selection_check.py --watch runs/convergence_cycles/eurosat/seed3 \\
        --runs cycles cut74-40 cosine-40 cut95-40
    python benchmarks/selection_check.py --report   # the rules, from every watched seed

A watched run's pool scores are kept in ``<seed>/pool_check/<run>.json`` as they come, so
a watcher started again goes on; an epoch it missed (it was not running, or scoring took
longer than the epoch) is listed there, and a rule whose pick was missed is left out of the
report, which says how many. One thread: it shares the machine with the run it watches.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from bpl.data import load_dataset
from bpl.data.splits import _digest as digest  # the fingerprint split files record
from bpl.engine import (
    ANNEALED,
    annealed_best,
    annealed_epochs,
    annealed_stretch,
    evaluate,
    make_loader,
)
from bpl.files import atomic_write_text
from bpl.models import load_checkpoint, load_model, model_from_payload
from common import console_logging, machine

log = logging.getLogger("selection_check")

RULES = ("best", "annealed", "last", "tail mean", "stretch")
#: The watcher's folder inside a seed's run folder.
FOLDER = "pool_check"


def pool_split(split: dict[str, Any], data: str, data_root: str | None, image_size: int,
               seed: int, size: int) -> dict[str, Any]:
    """The run's split with the pool (:func:`pool_rows`) as its test rows, and a record of
    the images it leaves out (the subset's other images and the real test split), so that
    loading it does not report those images as added to the folder since."""
    full = load_dataset(data, data_root, image_size=image_size, seed=seed, val_ratio=0.0,
                        cache="off", progress=False)  # the rows, not pixels
    rows = pool_rows(split, full.split, seed, size)
    listed = {row[0] for row in split["train"] + split["val"] + rows}
    out = [rel for rel, _ in full.split["train"] + full.split["test"] if rel not in listed]
    return {**split, "test": rows, "left_out": {"count": len(out), "sha1": digest(out)}}


def pool_rows(split: dict[str, Any], full: dict[str, Any], seed: int, size: int
              ) -> list[list[Any]]:
    """``size`` images (stratified, fixed by the seed) of the training split the subset left
    out: ``full``, the full training split of the same seed, less the subset's train and val."""
    used = {row[0] for row in split["train"] + split["val"]}
    by_class: dict[int, list[list[Any]]] = {}
    for rel, label in full["train"]:
        if rel not in used:
            by_class.setdefault(int(label), []).append([rel, label])
    rng = random.Random(f"{seed}:pool")
    total = sum(len(v) for v in by_class.values())
    rows = []
    for _, items in sorted(by_class.items()):
        rows += rng.sample(sorted(items), min(len(items), max(1, round(
            size * len(items) / total))))
    return rows


def needed(history: list[dict[str, Any]], peak: float) -> set[int]:
    """The epochs (1-based) a rule could keep but ``best`` (read from best.pt): those that
    began or ended at an annealed rate, at most :data:`~bpl.engine.ANNEALED` of ``peak``.
    An epoch's recorded ``lr`` is the rate after its last step, so the last epoch of a
    cosine cycle records the next cycle's peak although it trained at the lowest rates:
    it is scored too (the run's last epoch, which ``last`` keeps, is one). This covers the
    annealed epochs of :func:`bpl.engine.annealed_epochs` with or without ``lr_last``."""
    limit = ANNEALED * peak
    low = [float(row["lr"]) <= limit for row in history]
    ended_low = [float(row.get("lr_last", limit + 1)) <= limit for row in history]
    return {i for i in range(1, len(low) + 1)
            if low[i - 1] or ended_low[i - 1] or (i > 1 and low[i - 2])}


class Pool:
    """The pool's images and a model's top-1 on them (in float32, one batch at a time)."""

    def __init__(self, seed_dir: Path, baseline: str, size: int, cache_dir: str | None) -> None:
        folder = seed_dir / FOLDER
        pool_file = folder / "pool_split.json"
        config = json.loads((seed_dir / baseline / "config.json").read_text())
        split = json.loads((seed_dir / baseline / "split.json").read_text())
        made = pool_split(split, config["data"], config.get("data_root"),
                          config["image_size"], config["seed"], size)
        saved = json.loads(pool_file.read_text()) if pool_file.exists() else None
        if saved is not None and saved["test"] != made["test"]:
            raise SystemExit(f"{pool_file}: its pool differs from the one seed "
                             f"{config['seed']} draws; delete it to draw it again")
        if saved is None or saved.get("left_out") != made["left_out"]:
            # new, or written before the pool recorded what it leaves out: same rows
            folder.mkdir(parents=True, exist_ok=True)
            atomic_write_text(pool_file, json.dumps(made) + "\n")
        data = load_dataset(config["data"], config.get("data_root"),
                            image_size=config["image_size"], split_file=pool_file,
                            cache_dir=cache_dir, progress=False)
        self.images, self.num_classes = data.test, data.num_classes
        self.loader = make_loader(data.test, batch_size=256, train=False,
                                  device=torch.device("cpu"))

    def __len__(self) -> int:
        return len(self.images)

    def top1(self, model: torch.nn.Module) -> float:
        return evaluate(model.eval(), self.loader, self.num_classes)["top1"]


class Watch:
    """The pool scores of one run: every annealed epoch as its ``last.pt`` appears, and
    ``best.pt`` once the run has finished (its ``metrics.json``)."""

    def __init__(self, seed_dir: Path, name: str) -> None:
        self.run = seed_dir / name
        self.file = seed_dir / FOLDER / f"{name}.json"
        saved = json.loads(self.file.read_text()) if self.file.exists() else {}
        self.pool = {int(k): v for k, v in saved.get("pool", {}).items()}
        self.missed = set(saved.get("missed", []))
        self.best = saved.get("best")  # {"epoch": k, "pool_top1": x}
        self.seen = saved.get("seen", 0)  # the last epoch whose last.pt was read
        self.stamp = None

    @property
    def done(self) -> bool:
        return self.best is not None

    def _save(self) -> None:
        self.file.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.file, json.dumps({
            "run": self.run.name, "pool": self.pool, "missed": sorted(self.missed),
            "best": self.best, "seen": self.seen}) + "\n")

    def poll(self, pool: Pool) -> bool:
        """Score what is new in the run folder; True if anything was."""
        if self.done:
            return False
        last = self.run / "last.pt"
        finished = (self.run / "metrics.json").exists()
        changed = False
        try:
            stamp = last.stat().st_mtime_ns
        except FileNotFoundError:
            stamp = None
        if stamp is not None and stamp != self.stamp:
            self.stamp = stamp
            state = load_checkpoint(last)
            epoch, history = int(state["epoch"]), state["history"]
            peak = max([float(state.get("config", {}).get("lr") or 0.0)]
                       + [float(row["lr"]) for row in history])
            wanted = needed(history, peak)
            if epoch in wanted and epoch not in self.pool:
                self.pool[epoch] = pool.top1(model_from_payload(state["model"])[0])
                log.info("%s epoch %d: pool top-1 %.2f", self.run.name, epoch, self.pool[epoch])
            self.missed |= {e for e in wanted if e < epoch and e > self.seen and e not in self.pool}
            self.seen = max(self.seen, epoch)
            changed = True
        if finished:
            metrics = json.loads((self.run / "metrics.json").read_text())
            kept = int(metrics["selected"]["epoch"])
            score = self.pool.get(kept)  # best.pt holds that epoch's weights: scored already
            if score is None:
                score = pool.top1(load_model(self.run / "best.pt")[0])
            self.best = {"epoch": kept, "pool_top1": score}
            log.info("%s finished: kept epoch %d, pool top-1 %.2f", self.run.name, kept,
                     self.best["pool_top1"])
            changed = True
        if changed:
            self._save()
        return changed


def watch(seed_dir: Path, names: list[str], *, size: int, cache_dir: str | None,
          interval: float = 2.0, timeout: float | None = None) -> int:
    """Watch ``names`` (the baseline first) in ``seed_dir`` until each has finished."""
    (seed_dir / FOLDER).mkdir(parents=True, exist_ok=True)
    atomic_write_text(seed_dir / FOLDER / "watch.json", json.dumps(
        {"runs": names, "baseline": names[0], "machine": machine()}) + "\n")
    watches = [Watch(seed_dir, n) for n in names]
    pool = None
    t0 = time.time()
    while not all(w.done for w in watches):
        if pool is None and (seed_dir / names[0] / "split.json").exists():
            pool = Pool(seed_dir, names[0], size, cache_dir)
            log.info("%s: %d pool images", seed_dir, len(pool))
        if pool is not None:
            for w in watches:
                w.poll(pool)
        if timeout is not None and time.time() - t0 > timeout:
            return 1
        time.sleep(interval)
    return 0


def curves_of(seed_dir: Path, name: str) -> dict[str, Any] | None:
    """A finished watched run's validation curve, rates and pool scores; None if unfinished."""
    metrics_file, scores = seed_dir / name / "metrics.json", seed_dir / FOLDER / f"{name}.json"
    if not metrics_file.exists() or not scores.exists():
        return None
    saved = json.loads(scores.read_text())
    if saved.get("best") is None:
        return None
    history = json.loads(metrics_file.read_text())["history"]
    pool = {int(k): v for k, v in saved["pool"].items()}
    pool[saved["best"]["epoch"]] = saved["best"]["pool_top1"]
    curves = {"lr": [row["lr"] for row in history],
              "val_top1": [row["val_top1"] for row in history], "pool": pool}
    if all("lr_last" in row for row in history):  # bpl 0.3 on: each epoch's last step's rate
        curves["lr_last"] = [row["lr_last"] for row in history]
    return curves


def choose(curves: dict[str, Any], rule: str) -> tuple[int | None, float | None, float | None]:
    """(epoch, validation score, pool top-1) of what ``rule`` keeps of one run; the pool
    top-1 is None where that epoch was not scored. ``stretch`` (``bpl compress --max-drop``'s
    rule): the best epoch (the kept one), scored by the mean of the annealed stretch around
    it (:func:`bpl.engine.annealed_stretch`; its pool top-1: the same epochs' mean, None if
    one was not scored). ``tail mean``: the last epoch, scored by
    the mean validation top-1 of its last annealed stretch, the run's last epoch included
    when it ends a cycle (its pool top-1: the same epochs' mean)."""
    val, pool, lrs = curves["val_top1"], curves["pool"], curves["lr"]
    history = [{"lr": lr, "val_top1": v} for lr, v in zip(lrs, val, strict=True)]
    for row, end in zip(history, curves.get("lr_last") or [], strict=False):
        row["lr_last"] = end
    if rule == "stretch":  # bpl's --max-drop: the annealed stretch around the kept (best) epoch
        best = max(range(len(val)), key=lambda i: (val[i], -i)) + 1
        found = annealed_stretch(history, best)
        if found is None:
            return None, None, None
        first, last, mean = found
        epochs = range(first, last + 1)
        scored = None if any(e not in pool for e in epochs) else statistics.fmean(
            pool[e] for e in epochs)
        return best, mean, scored
    if rule == "best":
        epoch = max(range(len(val)), key=lambda i: (val[i], -i)) + 1
    elif rule == "annealed":
        found = annealed_best(history)
        epoch = found[0] if found else len(val)
    elif rule == "last":
        epoch = len(val)
    else:
        flags = annealed_epochs(history)
        low = ANNEALED * max(lrs)
        if "lr_last" not in curves and len(lrs) > 1 and lrs[-1] > low >= lrs[-2]:
            flags[-1] = True  # a cycle's end, recorded at the restart's rate (bpl before 0.3)
        tail, epoch = [], len(lrs)
        while epoch >= 1 and flags[epoch - 1]:
            tail.append(epoch)
            epoch -= 1
        if not tail:
            return None, None, None
        scored = None if any(e not in pool for e in tail) else statistics.fmean(
            pool[e] for e in tail)
        return len(val), statistics.fmean(val[e - 1] for e in tail), scored
    return epoch, val[epoch - 1], pool.get(epoch)


def seed_record(seed_dir: Path, names: list[str], curves: dict[str, Any]) -> dict[str, Any]:
    """What the report needs of one watched seed, kept in the results so that it outlives
    the run folders (a new checkout starts without ``runs/``): each run's curves and what
    each rule keeps of it, as (epoch, validation score, pool top-1)."""
    split = json.loads((seed_dir / FOLDER / "pool_split.json").read_text())
    return {"seed": f"{seed_dir.parent.name} {seed_dir.name}", "runs": names,
            "pool_images": len(split["test"]), "curves": curves,
            "picks": {n: {rule: list(choose(c, rule)) for rule in RULES}
                      for n, c in curves.items()}}


def report(out_root: Path, results: Path) -> str:
    """The rules replayed on every watched seed: optimism and budget judgments. Each seed
    still on disk under ``out_root`` (re)writes its record in ``results/records``; the
    report covers every record there, so seeds whose runs are gone stay in it."""
    folder = results / "records"
    records = {p.stem: json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))}
    for spec in sorted(out_root.glob(f"*/seed*/{FOLDER}/watch.json")):
        seed_dir = spec.parent.parent
        names = json.loads(spec.read_text())["runs"]
        curves = {n: c for n in names if (c := curves_of(seed_dir, n)) is not None}
        if names[0] not in curves:
            continue
        rec = seed_record(seed_dir, names, curves)
        key = f"{seed_dir.parent.name}-{seed_dir.name}"
        records[key] = rec
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(folder / f"{key}.json", json.dumps(rec, indent=1) + "\n")
    seeds = [records[k] for k in sorted(records)]
    if not seeds:
        raise SystemExit(f"no watched seed under {out_root} has a finished baseline, and "
                         f"{folder} holds no record")
    sizes = sorted({r["pool_images"] for r in seeds})
    lines = ["# Selection rules checked on held-out images", "",
             f"Seeds: {', '.join(r['seed'] for r in seeds)}; pool "
             f"{'/'.join(map(str, sizes))} images (training images outside the 10% subset). "
             "Optimism: validation score minus pool top-1 of what the rule keeps.", "",
             "| run | rule | seeds | pool top-1 (mean) | optimism (mean) | optimism (max) | "
             "unscored |", "|---|---|---:|---:|---:|---:|---:|"]
    names = list(dict.fromkeys(n for r in seeds for n in r["runs"]))
    for name in names:
        for rule in RULES:
            picks = [r["picks"][name].get(rule, [None] * 3) for r in seeds if name in r["picks"]]
            unscored = sum(p[0] is not None and p[2] is None for p in picks)
            picks = [p for p in picks if p[0] is not None and p[2] is not None]
            if not picks:
                if unscored:  # the rule kept epochs the watcher did not see
                    lines.append(f"| {name} | {rule} | 0 | - | - | - | {unscored} |")
                continue
            opt = [v - q for _, v, q in picks]
            lines.append(f"| {name} | {rule} | {len(picks)} | "
                         f"{statistics.fmean(q for *_, q in picks):.2f} | "
                         f"{statistics.fmean(opt):+.2f} | {max(opt):+.2f} | {unscored} |")
    lines += ["", "Drops against the baseline (points): judged on validation by each rule "
              "(baseline and cut scored alike), and true on the pool for the models it keeps.",
              "", "| seed | cut | rule | judged drop | pool drop |", "|---|---|---|---:|---:|"]
    errors: dict[str, list[float]] = {rule: [] for rule in RULES}
    for r in seeds:
        base_name = r["runs"][0]
        for name in r["runs"][1:]:
            if name not in r["picks"]:
                continue
            for rule in RULES:
                b = r["picks"][base_name].get(rule, [None] * 3)
                c = r["picks"][name].get(rule, [None] * 3)
                if None in (b[0], c[0], b[2], c[2]):
                    continue
                errors[rule].append((b[1] - c[1]) - (b[2] - c[2]))
                lines.append(f"| {r['seed']} | {name} | {rule} | "
                             f"{b[1] - c[1]:+.2f} | {b[2] - c[2]:+.2f} |")
    lines += ["", "Each rule's judgment error over the cuts above (judged drop minus pool drop; "
              "above 0: the rule judges a cut worse than it is, and a budget stops early; "
              "below 0: it lets through a cut the pool finds worse):", "",
              "| rule | cuts | mean | min | max | mean absolute |", "|---|---:|---:|---:|---:|---:|"]
    for rule, errs in errors.items():
        if errs:
            lines.append(f"| {rule} | {len(errs)} | {statistics.fmean(errs):+.2f} | "
                         f"{min(errs):+.2f} | {max(errs):+.2f} | "
                         f"{statistics.fmean(abs(e) for e in errs):.2f} |")
    notes = [f"- {r['seed']}: {r['source']}" for r in seeds if r.get("source")]
    if notes:
        lines += ["", "Records rebuilt from an earlier report (their run folders are gone):",
                  "", *notes]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--watch", type=Path, metavar="SEED_DIR",
                   help="a seed's folder of the convergence study (runs/.../eurosat/seed3)")
    p.add_argument("--runs", nargs="+", default=["cycles", "cut74-40", "cosine-40", "cut95-40"],
                   help="the runs to watch in it, the baseline first")
    p.add_argument("--pool", type=int, default=2000, help="pool images scored per epoch")
    p.add_argument("--cache-dir", default="runs/convergence/cache")
    p.add_argument("--interval", type=float, default=2.0, help="seconds between looks")
    p.add_argument("--report", action="store_true",
                   help="write the report of what finished (every seed recorded in --results, "
                        "and those still on disk)")
    p.add_argument("--out-root", default="runs/convergence_cycles",
                   help="where --report looks for watched seeds")
    p.add_argument("--results", default="benchmarks/results/selection_check")
    args = p.parse_args(argv)
    if args.report:
        text = report(Path(args.out_root), Path(args.results))
        Path(args.results).mkdir(parents=True, exist_ok=True)
        atomic_write_text(Path(args.results) / "summary.md", text)
        print(text)
        return 0
    if args.watch is None:
        p.error("give --watch SEED_DIR, or --report")
    torch.set_num_threads(1)
    with console_logging():
        return watch(args.watch, args.runs, size=args.pool, cache_dir=args.cache_dir,
                     interval=args.interval)


if __name__ == "__main__":
    sys.exit(main())
