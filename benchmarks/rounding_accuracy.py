"""Does rounding channel counts to multiples of 8 (the default since issue 19) cost accuracy?

A side arm of the recovery study (``recovery_study.py``, whose protocol keeps
``round_to: null``): the ``plain`` arm again, pruned with ``round_to=8``, from the same
baseline, seed, split and data order, compared with the study's own ``plain`` run of
the same seed and reduction. Only seeds whose baseline checkpoint is at hand are run;
records go beside the study's, so a rerun skips what is done and a later session resumes.
The report always aggregates every recorded pair of the study's seeds, whichever
``--seeds`` ran (a fresh checkout reports from the committed records alone).

    python benchmarks/rounding_accuracy.py [--seeds 0 1 2] [--reductions 0.74 0.9]
    python benchmarks/rounding_accuracy.py --report    # aggregate, run nothing

Writes ``benchmarks/results/recovery/rounding.{csv,md}``: one row per pair and the
paired difference (round_to=8 minus unrounded) with its t-based 95% interval.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch

import recovery_study as study
from bpl.files import atomic_write_text
from common import log_to, write_csv

ARM = "plain-r8"


def pairs(settings: dict, seeds: list[int], reductions: list[float], *, execute: bool,
          fmt: logging.Formatter) -> list[dict]:
    """Rows for every (dataset, seed, reduction) whose both runs are recorded; with
    ``execute``, the missing round_to=8 runs are run first where the baseline's checkpoint
    is at hand (the baselines are the study's to train)."""
    rows = []
    for dataset in settings["datasets"]:
        for seed in seeds:
            base_cfg = study.run_config(settings, dataset, seed)
            base = study.load_record(settings, base_cfg)
            if base is None:
                continue
            trained = (Path(base_cfg.out) / "best.pt").exists()
            for reduction in reductions:
                plain_cfg = study.run_config(settings, dataset, seed, reduction,
                                             {"partners": False, "distill": False}, "plain")
                plain = study.load_record(settings, plain_cfg)
                cfg = study.run_config(settings, dataset, seed, reduction,
                                       {"partners": False, "distill": False, "round_to": 8}, ARM)
                record = study.load_record(settings, cfg)
                if record is None and execute and trained:
                    record = study.run(settings, cfg, fmt=fmt, progress=False)
                if record is None or plain is None:
                    continue
                r8 = study.row(settings, cfg, ARM, record, base)
                ref = study.row(settings, plain_cfg, "plain", plain, base)
                rows.append({"dataset": dataset, "seed": seed, "flops_reduction": reduction,
                             "macs_plain": ref["macs"], "macs_r8": r8["macs"],
                             "test_top1_plain": ref["test_top1"], "test_top1_r8": r8["test_top1"],
                             "val_top1_plain": ref["val_top1"], "val_top1_r8": r8["val_top1"]})
    return rows


def report(settings: dict, rows: list[dict]) -> str:
    out = Path(settings["results"])
    if rows:
        write_csv(out / "rounding.csv", rows, list(rows[0]))
    lines = ["# Channel rounding (round_to=8) against none, plain pruning + fine-tuning", "",
             "Paired within a seed (same baseline, split, data order and fine-tuning); "
             "difference = round_to 8 minus unrounded, in points, mean ± half-width of the "
             "t-based 95% interval (n pairs). An interval that includes 0 is no measured "
             "difference.", "",
             "| dataset | MACs removed | MACs (M) unrounded / r8 | test top-1 diff | val top-1 diff |",
             "|---|---:|---:|---:|---:|"]
    for dataset in settings["datasets"]:
        for reduction in sorted({r["flops_reduction"] for r in rows}):
            sub = [r for r in rows if r["dataset"] == dataset and r["flops_reduction"] == reduction]
            if not sub:
                continue

            def cell(key: str, sub: list[dict] = sub) -> str:
                diffs = [r[f"{key}_r8"] - r[f"{key}_plain"] for r in sub]
                return study._fmt(dict(study.ci95(diffs), signed=True))

            macs = f"{sub[0]['macs_plain'] / 1e6:.1f} / {sub[0]['macs_r8'] / 1e6:.1f}"
            lines.append(f"| {dataset} | {100 * reduction:.0f}% | {macs} | {cell('test_top1')} "
                         f"| {cell('val_top1')} |")
    text = "\n".join(lines) + "\n"
    atomic_write_text(out / "rounding.md", text)
    return text


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=str(study.DEFAULT_CONFIG))
    ap.add_argument("--seeds", type=int, nargs="+",
                    help="run only these seeds (default: the study's); the report has them all")
    ap.add_argument("--reductions", type=float, nargs="+", default=[0.74, 0.9])
    ap.add_argument("--report", action="store_true", help="aggregate finished runs only")
    args = ap.parse_args(argv)
    settings = study.load_settings(args.config)
    if settings.get("threads"):
        torch.set_num_threads(int(settings["threads"]))
    study.apply_cpu_bf16(settings.get("cpu_bf16"))
    fmt = logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stdout)
    with log_to(Path(settings["out"]) / "rounding.log", fmt):
        if not args.report:
            pairs(settings, args.seeds or settings["seeds"], args.reductions, execute=True, fmt=fmt)
        rows = pairs(settings, settings["seeds"], args.reductions, execute=False, fmt=fmt)
    print(report(settings, rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
