"""Accuracy at equal measured speed (issue 30): latency-aware against MACs-uniform pruning.

For every architecture and seed the study

1. trains a baseline (``bpl train``, the recovery study's 40-epoch cosine);
2. prunes it to a measured speedup with ``bpl compress --speedup S --runtime R
   --latency-batch B`` (the latency-aware allocation) and recovers it;
3. finds the MACs-uniform reduction (``--flops-reduction``: the same fraction of every
   channel group) whose model runs as fast as step 2's, measured on the same runtime
   (``bench_deploy.uniform_at_speed``), and compresses to it with the same recovery;
4. times both deployed models again, each against the baseline in its own interleaved
   pair as bpl's search does, in three runs (the median ratio decides).

Both arms are real ``bpl compress`` commands with the same seed, split, baseline and
recovery; each evaluates the test split once, at its end. The report gives the paired test
differences (latency-aware minus uniform) with 95% intervals, and the validation ones.

    python benchmarks/speed_accuracy.py              # runs what is missing, one at a time
    python benchmarks/speed_accuracy.py --report     # the tables from what finished

Run directories go to ``--out``; results to ``benchmarks/results/speed_accuracy.{json,md}``.
Finished runs are skipped and cut-off ones resume (``bpl ... --resume``). Run it while
nothing else runs: the speed arm's pruning and step 4 time the models.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from common import ci95, load_average, machine, write_results

REPO = Path(__file__).resolve().parents[1]
NAME = "speed_accuracy"

#: Flags of every run (the recovery study's protocol: docs/results.md), less the data's.
COMMON = ["--data", "eurosat", "--train-subset", "0.1",
          "--batch-size", "64", "--momentum", "0.9", "--nesterov", "--weight-decay", "5e-4",
          "--val-ratio", "0.1", "--select", "best", "--workers", "0", "--no-latency",
          "--device", "cpu", "--quiet"]


def run_bpl(args: argparse.Namespace, command: str, flags: list[str], out: Path) -> dict:
    """``bpl COMMAND FLAGS --out OUT`` to its end (resumed if cut off); its metrics.json."""
    metrics = out / "metrics.json"
    if metrics.exists():
        return json.loads(metrics.read_text())
    cmd = [sys.executable, "-m", "bpl", command, *COMMON, "--data-root", args.data_root,
           "--image-size", str(args.image_size), *flags, "--out", str(out)]
    if (out / "last.pt").exists():
        cmd.append("--resume")
    elif out.exists():  # cut off before its first epoch: nothing to keep
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads),
           "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    print(f"{time.strftime('%H:%M:%S')} {command} -> {out}", flush=True)
    with open(out.parent / f"{out.name}.log", "a") as log:
        rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO).returncode
    if rc != 0:
        raise SystemExit(f"bpl {command} failed (rc {rc}); see {out.parent / (out.name + '.log')}")
    return json.loads(metrics.read_text())


def uniform_reduction(args: argparse.Namespace, baseline: Path, speed: float) -> dict:
    """The MACs-uniform reduction whose pruned baseline runs ``speed`` times faster than the
    baseline on the study's runtime, measured (kept in uniform.json beside the runs)."""
    import bpl
    from bench_deploy import uniform_at_speed
    from bpl.pruning.latency import RuntimeMeasure

    torch.set_num_threads(args.latency_threads)
    base = bpl.load_model(baseline)[0].eval()
    x1 = torch.randn(1, 3, args.image_size, args.image_size)
    xb = x1.expand(args.latency_batch, -1, -1, -1).contiguous()
    measure = RuntimeMeasure(args.runtime, args.latency_threads, repeats=20)
    measure.pin(base, xb)
    red, _, measured, trials = uniform_at_speed(base, x1, xb, speed, measure)
    return {"flops_reduction": red, "measured": measured, "trials": trials, "asked": speed}


def time_models(args: argparse.Namespace, paths: dict[str, Path]) -> dict[str, Any]:
    """Each pruned model at ``paths`` timed against the baseline in its own interleaved pair,
    as bpl's search times it, in FRESH_RUNS runs on the study's runtime: the median ratio
    of each and every run's milliseconds."""
    import bpl
    from bench_deploy import FRESH_RUNS
    from bpl.pruning.latency import RuntimeMeasure
    from bpl.pruning.speed import timing_spread

    torch.set_num_threads(args.latency_threads)
    x = torch.randn(args.latency_batch, 3, args.image_size, args.image_size)
    models = {name: bpl.load_model(p)[0].eval() for name, p in paths.items()}
    measure = RuntimeMeasure(args.runtime, args.latency_threads, repeats=40)
    for model in models.values():
        measure.pin(model, x)
    load = load_average()
    arms = [name for name in models if name != "baseline"]
    runs = [{k: measure({"baseline": (models["baseline"], x), k: (models[k], x)}) for k in arms}
            for _ in range(FRESH_RUNS)]
    speedup = {k: statistics.median(r[k]["baseline"] / r[k][k] for r in runs) for k in arms}
    return {"speedup": speedup, "runs": runs, "load_average": load, "repeats": 40,
            "baseline_spread": timing_spread([r[k]["baseline"] for r in runs for k in arms]),
            "pairwise": True, "min_sample_ms": measure.min_sample_ms}


def run_seed(args: argparse.Namespace, arch: str, seed: int) -> dict[str, Any]:
    """Every step of one architecture and seed; the record of the cell."""
    folder = Path(args.out) / arch / f"seed{seed}"
    record_path = folder / "record.json"
    if record_path.exists():
        return json.loads(record_path.read_text())
    base = run_bpl(args, "train", ["--arch", arch, "--seed", str(seed), "--epochs",
                                   str(args.baseline_epochs), "--lr", "0.1",
                                   "--warmup-epochs", "2"], folder / "baseline")
    best = folder / "baseline" / "best.pt"
    recovery = ["--baseline", str(best), "--seed", str(seed), "--no-partners",
                "--recipe", "cosine", "--epochs", str(args.epochs), "--round-to", "8"]
    speed = run_bpl(args, "compress", [
        *recovery, "--speedup", str(args.speedup), "--runtime", args.runtime,
        "--latency-batch", str(args.latency_batch), "--latency-threads",
        str(args.latency_threads), "--accept-closest"], folder / "latency_aware")
    found = folder / "uniform.json"
    if not found.exists():
        uni = uniform_reduction(args, best, speed["speedup"]["measured"])
        found.write_text(json.dumps(uni, indent=1) + "\n")
    uni = json.loads(found.read_text())
    uniform = run_bpl(args, "compress", [
        *recovery, "--flops-reduction", f"{uni['flops_reduction']:.6f}", "--accept-closest"],
        folder / "uniform")
    timing = time_models(args, {"baseline": best,
                                "latency_aware": folder / "latency_aware" / "deploy.pt",
                                "uniform": folder / "uniform" / "deploy.pt"})
    record = {
        "arch": arch, "seed": seed,
        "baseline": {"val_top1": (base.get("selected") or {}).get("val_top1"),
                     "test_top1": base["final"]["top1"],
                     "epochs": base.get("epochs_trained", len(base.get("history", [])))},
        "arms": {name: {"val_top1": (m.get("selected") or {}).get("val_top1"),
                        "test_top1": m["final"]["top1"], "macs_reduction": m["macs_reduction"],
                        "speedup_fresh": timing["speedup"][name],
                        "wall_time_s": m.get("wall_time_s")}
                 for name, m in (("latency_aware", speed), ("uniform", uniform))},
        "allocation": speed["speedup"].get("allocation"),  # which walk bpl's guard kept
        "speed_search": speed["speedup"], "uniform_search": uni, "timing": timing,
        "protocol": {k: getattr(args, k) for k in ("speedup", "runtime", "latency_batch",
                                                   "latency_threads", "image_size", "epochs",
                                                   "baseline_epochs", "threads")},
        "machine": machine(),
    }
    record_path.write_text(json.dumps(record, indent=1) + "\n")
    a = record["arms"]
    print(f"{arch} seed {seed}: latency-aware {a['latency_aware']['test_top1']:.2f} "
          f"({100 * (1 - a['latency_aware']['macs_reduction']):.1f}% MACs kept, "
          f"{a['latency_aware']['speedup_fresh']:.2f}x) vs uniform {a['uniform']['test_top1']:.2f} "
          f"({100 * (1 - a['uniform']['macs_reduction']):.1f}%, "
          f"{a['uniform']['speedup_fresh']:.2f}x)", flush=True)
    if not equal_speed(record):
        print(f"{arch} seed {seed} is not at equal speed (a busy machine during a search?): "
              f"delete {folder}/{{latency_aware,uniform,uniform.json,record.json}} and run "
              "again", flush=True)
    return record


def equal_speed(record: dict[str, Any], within: float = 0.10) -> bool:
    """Whether the two arms of a cell ran equally fast in the fresh timing."""
    a = record["arms"]
    return abs(a["latency_aware"]["speedup_fresh"] / a["uniform"]["speedup_fresh"] - 1) <= within


def summarize(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Per architecture: mean top-1 and MACs kept of each arm, paired differences with CIs."""
    out: dict[str, Any] = {}
    for arch in sorted({r["arch"] for r in records}):
        rows = sorted((r for r in records if r["arch"] == arch), key=lambda r: r["seed"])
        arms = {}
        for name in ("latency_aware", "uniform"):
            arms[name] = {k: sum(r["arms"][name][k] for r in rows) / len(rows)
                          for k in ("val_top1", "test_top1", "macs_reduction", "speedup_fresh")}
        out[arch] = {
            "seeds": [r["seed"] for r in rows], "arms": arms,
            "test_diff": ci95([r["arms"]["latency_aware"]["test_top1"]
                               - r["arms"]["uniform"]["test_top1"] for r in rows]),
            "val_diff": ci95([r["arms"]["latency_aware"]["val_top1"]
                              - r["arms"]["uniform"]["val_top1"] for r in rows]),
            "baseline_test": sum(r["baseline"]["test_top1"] for r in rows) / len(rows),
        }
    return out


def _ci(st: dict[str, Any]) -> str:
    if st.get("mean") is None:
        return "-"
    half = st.get("ci95")
    return f"{st['mean']:+.2f}" + (f" ± {half:.2f}" if half is not None else "") + f" (n={st['n']})"


def markdown(records: list[dict[str, Any]], summary: dict[str, Any], args: argparse.Namespace
             ) -> str:
    p = records[0]["protocol"] if records else {}
    lines = [
        "# Accuracy at equal measured speed: latency-aware against MACs-uniform pruning (issue 30)",
        "",
        "- `python benchmarks/speed_accuracy.py`",
        f"- EuroSAT, the recovery study's 10% training subset, the full 5,400-image test split, "
        f"{p.get('image_size')} px; baselines: {p.get('baseline_epochs')}-epoch cosine "
        f"(`bpl train`); each arm: `bpl compress --no-partners --recipe cosine --epochs "
        f"{p.get('epochs')}` from the same baseline and seed",
        f"- latency-aware: `--speedup {p.get('speedup')} --runtime {p.get('runtime')} "
        f"--latency-batch {p.get('latency_batch')} --latency-threads "
        f"{p.get('latency_threads')}`; uniform: the `--flops-reduction` whose model measured as "
        "fast (a secant search on measured speed); **fresh**: each deployed model timed again "
        "after training against the baseline in its own interleaved pair, medians of three "
        "runs; a cell whose arms' fresh speedups differ by more than 10% is not at equal "
        "speed (the machine was busy during a search) and is run again",
        f"- CPU: {machine()['cpu']}; differences are latency-aware minus uniform, paired by "
        "seed, with 95% t-intervals",
        "",
        "| model | seeds | baseline test | latency-aware: MACs kept | fresh speedup | val | test "
        "| uniform: MACs kept | fresh speedup | val | test | val diff | test diff |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for arch, s in summary.items():
        la, un = s["arms"]["latency_aware"], s["arms"]["uniform"]
        lines.append(
            f"| {arch} | {', '.join(map(str, s['seeds']))} | {s['baseline_test']:.2f} | "
            f"{100 * (1 - la['macs_reduction']):.1f}% | {la['speedup_fresh']:.2f}x | "
            f"{la['val_top1']:.2f} | {la['test_top1']:.2f} | "
            f"{100 * (1 - un['macs_reduction']):.1f}% | {un['speedup_fresh']:.2f}x | "
            f"{un['val_top1']:.2f} | {un['test_top1']:.2f} | {_ci(s['val_diff'])} | "
            f"{_ci(s['test_diff'])} |")
    lines += ["", "Seed by seed:", "",
              "| model | seed | latency-aware test | uniform test | diff | MACs kept (aware / "
              "uniform) | fresh speedup (aware / uniform) | equal speed | allocation bpl kept |",
              "|---|---:|---:|---:|---:|---|---|---|---|"]
    for r in sorted(records, key=lambda r: (r["arch"], r["seed"])):
        la, un = r["arms"]["latency_aware"], r["arms"]["uniform"]
        lines.append(
            f"| {r['arch']} | {r['seed']} | {la['test_top1']:.2f} | {un['test_top1']:.2f} | "
            f"{la['test_top1'] - un['test_top1']:+.2f} | {100 * (1 - la['macs_reduction']):.1f}% / "
            f"{100 * (1 - un['macs_reduction']):.1f}% | {la['speedup_fresh']:.2f}x / "
            f"{un['speedup_fresh']:.2f}x | {'yes' if equal_speed(r) else '**no**'} | "
            f"{r.get('allocation') or '-'} |")
    lines += ["", "`--speedup` searches the latency table's allocation and MACs-uniform cuts and "
              "keeps, of those that land within 5% of the target, the one with more MACs "
              "(`allocation bpl kept`); where it kept the uniform cuts, both arms prune alike "
              "and differ only by where the search stopped."]
    return "\n".join(lines) + "\n"


def report(args: argparse.Namespace) -> None:
    records = [json.loads(p.read_text()) for p in sorted(Path(args.out).glob("*/seed*/record.json"))]
    summary = summarize(records)
    write_results(args.name, {"summary": summary, "records": records},
                  markdown(records, summary, args))
    print(f"wrote benchmarks/results/{args.name}.json and .md ({len(records)} cells)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--archs", nargs="+", default=["resnet18", "mobilenet_v2"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--data-root", default=str(REPO.parent / "shared/data/eurosat"))
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--speedup", type=float, default=2.0)
    ap.add_argument("--runtime", choices=["onnxruntime", "torch"], default="onnxruntime")
    ap.add_argument("--latency-batch", type=int, default=1)
    ap.add_argument("--latency-threads", type=int, default=1)
    ap.add_argument("--baseline-epochs", type=int, default=40)
    ap.add_argument("--epochs", type=int, default=40, help="recovery epochs of both arms")
    ap.add_argument("--threads", type=int, default=2, help="torch threads of the training runs")
    ap.add_argument("--out", default=str(REPO / "runs" / NAME))
    ap.add_argument("--name", default=NAME, help="results file name")
    ap.add_argument("--report", action="store_true", help="only write the tables")
    args = ap.parse_args()
    if not args.report:
        for seed in args.seeds:  # seed by seed: a study cut short still pairs whole seeds
            for arch in args.archs:
                run_seed(args, arch, seed)
                report(args)
    report(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
