"""Which epoch to keep, and what a ``--max-drop`` budget is measured against, checked on
images no choice has seen (issue 26).

bpl chooses on a validation split of a few hundred images: the epoch it keeps
(``--select best`` or ``annealed``) and, under ``--max-drop``, whether a pruned step is
within P points of its baseline. This script measures how far those validation
judgments are from the truth. On EuroSAT with the studies' 10% training subset, the
training images the subset leaves out (19,440) are a held-out *pool* no run trains or
chooses on. It trains the convergence study's baseline (``--epochs auto``, cycles) and
recovers its copies pruned one-shot to each ``levels`` cut (cosine, 40 epochs), scoring
every epoch on validation and on a sample of the pool. The report then replays each
selection rule on the recorded curves: the pool top-1 of the epoch it keeps, how far its
validation score is above that (its optimism), and, for each cut, the drop it would
judge against the pool's. The test split is not used.

    python benchmarks/selection_check.py --data-root ../shared/data/eurosat --seed 0
    python benchmarks/selection_check.py ... --report      # the rules, from what finished

Resumable: every run continues from its ``last.pt``, the pool's curve rides in its
checkpoint, and a finished run is not trained again. One thread, as the studies.
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

import bpl
from bpl.config import resolve_config
from bpl.data import load_dataset
from bpl.engine import ANNEALED, annealed_best, evaluate, make_loader
from bpl.files import atomic_write_text
from bpl.models import build_model, model_from_payload
from bpl.pipeline.fitting import fit_run, resume_state, run_meta, select_epoch
from common import console_logging, machine

log = logging.getLogger("selection_check")

BASELINE = {"epochs": "auto", "schedule": "cycles", "cycle_epochs": 40, "lr": 0.1,
            "warmup_epochs": 2}
RECOVERY = {"recipe": "cosine", "epochs": 40}
COMMON = {"arch": "resnet18", "data": "eurosat", "image_size": 64, "train_subset": 0.1,
          "val_ratio": 0.1, "batch_size": 64, "momentum": 0.9, "nesterov": True,
          "weight_decay": 5.0e-4, "device": "cpu", "workers": 0, "select": "best",
          "round_to": 8, "latency": False}
RULES = ("best", "annealed", "last", "tail mean")


class PoolMonitor:
    """An epoch hook: the model's top-1 on the held-out pool after every epoch (kept in
    the checkpoint, so a resumed run keeps its curve)."""

    def __init__(self, model: torch.nn.Module, pool, num_classes: int) -> None:
        self.model, self.num_classes, self.curve = model, num_classes, []
        self.loader = make_loader(pool, batch_size=256, train=False, device=torch.device("cpu"))

    def after_step(self) -> None:
        pass

    def epoch_end(self, epoch: int) -> None:
        top1 = evaluate(self.model, self.loader, self.num_classes)["top1"]
        self.model.train()
        self.curve.append(top1)

    def state_dict(self) -> dict:
        return {"curve": list(self.curve)}

    def load_state_dict(self, state: dict) -> None:
        self.curve = list(state["curve"])


def pool_rows(args: argparse.Namespace, split: dict[str, Any]) -> list[list[Any]]:
    """``args.pool`` images (stratified, fixed by the seed) of the training split that the
    subset left out: the full training split of the same seed, less the subset's train and
    val."""
    full = load_dataset(args.data, args.data_root, image_size=args.image_size, seed=args.seed,
                        val_ratio=0.0, cache="off", progress=False)  # the rows, not pixels
    used = {row[0] for row in split["train"] + split["val"]}
    by_class: dict[int, list[list[Any]]] = {}
    for rel, label in full.split["train"]:
        if rel not in used:
            by_class.setdefault(int(label), []).append([rel, label])
    rng = random.Random(f"{args.seed}:pool")
    total = sum(len(v) for v in by_class.values())
    rows = []
    for _, items in sorted(by_class.items()):
        rows += rng.sample(sorted(items), min(len(items), max(1, round(
            args.pool * len(items) / total))))
    return rows


def train_one(cfg, model, data, pool, run_dir: Path, command: str) -> dict[str, Any]:
    """Train (or resume) one run with the pool monitored; its per-epoch curves."""
    done = run_dir / "curves.json"
    if done.exists():
        return json.loads(done.read_text())
    run_dir.mkdir(parents=True, exist_ok=True)
    state = resume_state(run_dir, cfg)
    if state is not None:
        model = model_from_payload(state["model"])[0]
    monitor = PoolMonitor(model, pool, data.num_classes)
    result = fit_run(cfg, model, data, run_dir, run_meta(cfg, data), command=command,
                     state=state, progress=False, started=time.perf_counter(), hooks=[monitor])
    selected = select_epoch(cfg, model, run_dir, result)
    curves = {"lr": [row["lr"] for row in result.history],
              "val_top1": [row["val_top1"] for row in result.history],
              "pool_top1": monitor.curve, "kept_epoch": selected["epoch"],
              "stopped": result.stopped}
    atomic_write_text(done, json.dumps(curves) + "\n")
    return curves


def run(args: argparse.Namespace) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    common = {**COMMON, "arch": args.arch, "data": args.data, "data_root": args.data_root,
              "image_size": args.image_size, "seed": args.seed}
    base_cfg = resolve_config(overrides={**common, **BASELINE, "cycle_epochs": args.cycle_epochs,
                                         "max_epochs": args.max_epochs})
    data = load_dataset(args.data, args.data_root, image_size=args.image_size,
                        seed=args.seed, val_ratio=COMMON["val_ratio"],
                        train_subset=COMMON["train_subset"], split_file=out / "split.json",
                        cache_dir=args.cache_dir, progress=False)
    pool_file = out / "pool_split.json"
    if not pool_file.exists():
        atomic_write_text(pool_file, json.dumps({**data.split, "test": pool_rows(
            args, data.split)}) + "\n")
    pool = load_dataset(args.data, args.data_root, image_size=args.image_size,
                        split_file=pool_file, cache_dir=args.cache_dir, progress=False).test
    log.info("seed %d: %d training, %d validation, %d pool images", args.seed,
             len(data.train), len(data.val), len(pool))
    base = build_model(args.arch, data.num_classes)
    curves = {"baseline": train_one(base_cfg, base, data, pool, out / "baseline", "train")}
    kept = bpl.load_model(out / "baseline" / "best.pt")[0]  # --select best, as the study
    example = torch.randn(1, 3, args.image_size, args.image_size)
    for level in args.levels:
        name = f"cut{round(100 * level)}"
        torch.manual_seed(args.seed)
        pruned = bpl.prune(kept, example, flops_reduction=level, round_to=COMMON["round_to"])
        cfg = resolve_config(overrides={**common, **RECOVERY, "epochs": args.recovery_epochs,
                                        "flops_reduction": level, "partners": False})
        curves[name] = train_one(cfg, pruned, data, pool, out / name, "compress")
        log.info("%s done", name)
    atomic_write_text(out / "result.json", json.dumps(
        {"seed": args.seed, "pool_images": len(pool), "val_images": len(data.val),
         "machine": machine(), "curves": curves}, indent=1) + "\n")


def choose(curves: dict[str, Any], rule: str) -> tuple[int | None, float | None, float | None]:
    """(epoch, validation score, pool top-1) of what ``rule`` keeps of one run. ``tail
    mean``: the last epoch, scored by the mean validation top-1 of the annealed epochs of
    its last annealed stretch (its pool top-1: the same epochs' mean)."""
    val, pool, lrs = curves["val_top1"], curves["pool_top1"], curves["lr"]
    history = [{"lr": lr, "val_top1": v} for lr, v in zip(lrs, val, strict=True)]
    if rule == "best":
        epoch = max(range(len(val)), key=lambda i: (val[i], -i)) + 1
    elif rule == "annealed":
        found = annealed_best(history)
        epoch = found[0] if found else len(val)
    elif rule == "last":
        epoch = len(val)
    else:
        peak = max(lrs)
        tail = []
        for i in range(len(lrs) - 1, -1, -1):
            if lrs[i] > ANNEALED * peak:
                break
            tail.append(i)
        if not tail:
            return None, None, None
        return (len(val), statistics.fmean(val[i] for i in tail),
                statistics.fmean(pool[i] for i in tail))
    return epoch, val[epoch - 1], pool[epoch - 1]


def report(out_root: Path) -> str:
    """The rules replayed on every finished seed: optimism and budget judgments."""
    results = [json.loads(p.read_text()) for p in sorted(out_root.glob("seed*/result.json"))]
    if not results:
        raise SystemExit(f"no finished seed under {out_root}")
    lines = ["# Selection rules checked on held-out images", "",
             f"Seeds: {[r['seed'] for r in results]}; validation {results[0]['val_images']} "
             f"images, pool {results[0]['pool_images']} (EuroSAT training images outside the "
             "10% subset). Optimism: validation score minus pool top-1 of what the rule keeps.",
             "", "| run | rule | pool top-1 (mean) | optimism (mean) | optimism (max) |",
             "|---|---|---:|---:|---:|"]
    names = list(results[0]["curves"])
    for name in names:
        for rule in RULES:
            picks = [choose(r["curves"][name], rule) for r in results]
            picks = [p for p in picks if p[0] is not None]
            if not picks:
                continue
            opt = [v - q for _, v, q in picks]
            lines.append(f"| {name} | {rule} | {statistics.fmean(q for *_, q in picks):.2f} | "
                         f"{statistics.fmean(opt):+.2f} | {max(opt):+.2f} |")
    lines += ["", "Drops against the baseline (points): judged on validation by each rule "
              "(baseline and cut scored alike), and true on the pool for the models it keeps.",
              "", "| seed | cut | rule | judged drop | pool drop |", "|---:|---|---|---:|---:|"]
    for r in results:
        for name in names[1:]:
            for rule in RULES:
                b, c = choose(r["curves"]["baseline"], rule), choose(r["curves"][name], rule)
                if b[0] is None or c[0] is None:
                    continue
                lines.append(f"| {r['seed']} | {name} | {rule} | {b[1] - c[1]:+.2f} | "
                             f"{b[2] - c[2]:+.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="eurosat")
    p.add_argument("--data-root", default="../shared/data/eurosat")
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--cycle-epochs", type=int, default=40, help="the baseline's cycles")
    p.add_argument("--max-epochs", type=int, default=300, help="the baseline's cap")
    p.add_argument("--recovery-epochs", type=int, default=RECOVERY["epochs"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-root", default="runs/selection_check")
    p.add_argument("--cache-dir", default="runs/convergence/cache")
    p.add_argument("--pool", type=int, default=2000, help="pool images scored every epoch")
    p.add_argument("--levels", type=float, nargs="+", default=[0.74, 0.9, 0.95])
    p.add_argument("--report", action="store_true", help="write the report of what finished")
    p.add_argument("--results", default="benchmarks/results/selection_check")
    args = p.parse_args(argv)
    if args.report:
        text = report(Path(args.out_root))
        Path(args.results).mkdir(parents=True, exist_ok=True)
        atomic_write_text(Path(args.results) / "summary.md", text)
        print(text)
        return 0
    torch.set_num_threads(1)
    args.out = str(Path(args.out_root) / f"seed{args.seed}")
    with console_logging():
        run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
