"""CPU latency of ResNet-50 before and after pruning to 73.97% fewer MACs.

Prunes a torchvision ResNet-50 (random weights: latency does not depend on them) with
``bpl.prune(flops_reduction=0.7397)`` for each ``--round-to``, then times the baseline
and the pruned models interleaved in one run (``bpl.compare_latency``) at each batch
size: in eager mode, with BatchNorm folded into the convs (``torch.fx`` conv-BN
fusion) and in ``channels_last`` memory format (each applied to every model alike). The speedup is reported as a fraction of the
ideal one (the MACs ratio). Results go to ``benchmarks/results/prune_latency.{json,md}``.

    python benchmarks/bench_prune_latency.py [--batch-sizes 1 16] [--round-to 8 16]
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import platform
import time
from pathlib import Path

import torch
import torchvision
from torch.fx.experimental.optimization import fuse as fx_fuse_conv_bn

import bpl
from bpl.files import atomic_write_text
from bpl.pruning.latency import cpu_name
from common import load_average

RESULTS = Path(os.environ.get("BPL_BENCH_RESULTS") or Path(__file__).resolve().parent / "results")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", type=float, default=0.7397, help="fraction of MACs to remove")
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--size", type=int, default=224, help="input resolution")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--round-to", type=int, nargs="+", default=[8, 16])
    ap.add_argument("--threads", type=int, default=None, help="default: torch's default")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, nargs="+", default=[30, 12],
                    help="timed passes per model, one value per batch size (last one repeats)")
    ap.add_argument("--no-fold", action="store_true", help="skip the BN-folded comparison")
    ap.add_argument("--no-channels-last", action="store_true",
                    help="skip the channels_last comparison")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)

    torch.manual_seed(0)
    load_before = load_average()
    threads = args.threads or torch.get_num_threads()
    x = torch.randn(1, 3, args.size, args.size)
    base = torchvision.models.resnet50(num_classes=args.classes).eval()
    models = {"baseline": base}
    macs = {"baseline": bpl.count_macs(base, x)}
    prune_s = {}
    for r in args.round_to:
        start = time.perf_counter()
        pruned = bpl.prune(base, x, flops_reduction=args.target, round_to=r).eval()
        prune_s[f"round_to={r}"] = time.perf_counter() - start
        models[f"pruned round_to={r}"] = pruned
        macs[f"pruned round_to={r}"] = bpl.count_macs(pruned, x)
        print(f"pruned with round_to={r} in {prune_s[f'round_to={r}']:.1f}s: "
              f"{bpl.reports(pruned)['prune']}", flush=True)
    variants = {"eager": (models, x)}
    if not args.no_fold:
        variants["bn-folded"] = ({n: fx_fuse_conv_bn(m) for n, m in models.items()}, x)
    if not args.no_channels_last:
        cl = torch.channels_last
        variants["channels-last"] = (
            {n: copy.deepcopy(m).to(memory_format=cl) for n, m in models.items()},
            x.contiguous(memory_format=cl),
        )

    rows = []
    for i, bs in enumerate(args.batch_sizes):
        repeats = args.repeats[min(i, len(args.repeats) - 1)]
        for variant, (group, inputs) in variants.items():
            ms = bpl.compare_latency(group, inputs, batch_size=bs, threads=threads,
                                     warmup=args.warmup, repeats=repeats)
            for name, t in ms.items():
                ideal = macs["baseline"] / macs[name]
                speedup = ms["baseline"] / t
                rows.append({
                    "batch_size": bs, "variant": variant, "model": name, "latency_ms": t,
                    "macs": macs[name], "mac_reduction": 1 - macs[name] / macs["baseline"],
                    "speedup": speedup, "ideal_speedup": ideal,
                    "fraction_of_ideal": speedup / ideal, "repeats": repeats,
                })
                print(f"batch {bs:>3} {variant:>13} {name:<22} {t:9.1f} ms  speedup "
                      f"{speedup:5.2f}x of ideal {ideal:5.2f}x ({speedup / ideal:.2f})", flush=True)

    info = {
        "cpu": cpu_name(),
        "logical_cpus": os.cpu_count(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "threads": threads,
        "python": platform.python_version(),
        "input": [args.size, args.size],
        "classes": args.classes,
        "target_reduction": args.target,
        "prune_seconds": prune_s,
        "weights": "random (latency does not depend on values)",
        "load_average_before": load_before,
        "load_average_after": load_average(),
    }
    atomic_write_text(args.out / "prune_latency.json",
                      json.dumps({"machine": info, "results": rows}, indent=2) + "\n")
    lines = [
        f"# ResNet-50 pruned to {100 * args.target:.2f}% fewer MACs: CPU latency",
        "",
        f"- CPU: {info['cpu']} ({info['logical_cpus']} logical CPUs), torch {info['torch']}, "
        f"torchvision {info['torchvision']}, {threads} threads",
        f"- input {args.size}x{args.size}, {args.classes} classes, median of interleaved runs "
        f"after {args.warmup} warm-up passes; `bn-folded` = conv-BN folded with torch.fx, "
        "`channels-last` = models and input in torch.channels_last (each applied to every model)",
        "- speedup = baseline latency / model latency; ideal = MACs ratio",
        f"- load average (1/5/15 min) before {info['load_average_before']}, after "
        f"{info['load_average_after']} (after includes this run's own threads; a high 1-min "
        "value before means other processes competed)",
        "",
        "| batch | variant | model | MACs | latency (ms) | speedup | ideal | fraction of ideal |",
        "|---:|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['batch_size']} | {r['variant']} | {r['model']} | {r['macs'] / 1e9:.3f} G | "
            f"{r['latency_ms']:.1f} | {r['speedup']:.2f}x | {r['ideal_speedup']:.2f}x | "
            f"{r['fraction_of_ideal']:.2f} |"
        )
    atomic_write_text(args.out / "prune_latency.md", "\n".join(lines) + "\n")
    print(f"wrote {args.out / 'prune_latency.json'} and {args.out / 'prune_latency.md'}")


if __name__ == "__main__":
    main()
