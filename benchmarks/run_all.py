"""The benchmark suite: writes results/suite.json and results/suite.md.

(a) training-step time of BPL (partners + diversity loss) vs plain training of the
    *pruned* resnet18 and resnet50, interleaved in one run;
(b) time to fuse an extended resnet101;
(c) deploy latency, baseline vs compressed (74% fewer MACs), PyTorch eager and
    onnxruntime, batch 1 and 16, with the fraction of the ideal speedup;
(d) peak memory of one training step with and without partners, the model included (fresh
    subprocesses).

    python benchmarks/run_all.py [--size 224] [--quick]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torchvision

import bpl
from bench_train_step import make_step, timed
from bench_train_step import peak_memory as bench_peak_memory
from bpl.conformance import randomize_partners
from bpl.profiling import compare_latency
from common import machine, write_results

R = 0.7397  # the paper's ResNet-50 reduction on UC Merced


def pruned(arch: str, size: int) -> torch.nn.Module:
    model = torchvision.models.get_model(arch, num_classes=21)
    return bpl.prune(model, torch.randn(1, 3, size, size), flops_reduction=R, round_to=8)


def train_steps(size: int, batch: int, steps: int) -> dict:
    out = {}
    for arch in ("resnet18", "resnet50"):
        torch.manual_seed(0)
        x, y = torch.randn(batch, 3, size, size), torch.randint(0, 21, (batch,))
        plain = pruned(arch, size)
        student = bpl.extend(plain)
        fns = {"plain": make_step(plain, x, y, False), "bpl": make_step(student, x, y, True)}
        for fn in fns.values():
            fn()
        times = {k: [] for k in fns}
        for i in range(steps):
            for name in (("plain", "bpl") if i % 2 == 0 else ("bpl", "plain")):
                times[name].append(timed(fns[name]))
        med = {k: statistics.median(v) for k, v in times.items()}
        out[arch] = {"plain_s": med["plain"], "bpl_s": med["bpl"], "ratio": med["bpl"] / med["plain"],
                     "partners": len(bpl.reports(student)["extend"].extended)}
        print(arch, out[arch], flush=True)
    return out


def fusion_time(size: int) -> dict:
    # partners as after training: non-zero BN scales, shifts and statistics (the partners'
    # included); at BN scale 0 they would add nothing and only the blocks' fold were checked
    student = randomize_partners(bpl.extend(torchvision.models.resnet101(num_classes=21)), 0)
    student.eval()
    t0 = time.perf_counter()
    deploy = bpl.fuse(student)
    seconds = time.perf_counter() - t0
    err = bpl.relative_error(student, deploy, torch.randn(2, 3, size, size))
    result = {"seconds": seconds, "partners": len(bpl.partner_blocks(student)), "fusion_error": err}
    print("fusion", result, flush=True)
    return result


def deploy_latency(size: int, repeats: int) -> dict:
    from bpl.exporting import onnx_module

    base = torchvision.models.resnet50(num_classes=21).eval()
    x1 = torch.randn(1, 3, size, size)
    small = bpl.fuse(bpl.extend(bpl.prune(base, x1, flops_reduction=R, round_to=8))).eval()
    ideal = bpl.count_macs(base, x1) / bpl.count_macs(small, x1)
    models = {"torch baseline": base, "torch compressed": small}
    try:
        models.update({"onnxruntime baseline": onnx_module(base, x1),
                       "onnxruntime compressed": onnx_module(small, x1)})
    except bpl.BPLError as exc:
        print("no onnxruntime:", exc)
    out = {"ideal_speedup": ideal, "latency_ms": {}}
    for bs in (1, 16):
        lat = compare_latency(models, torch.randn(bs, 3, size, size), repeats=repeats, warmup=3)
        out["latency_ms"][bs] = lat
        for runtime in ("torch", "onnxruntime"):
            if f"{runtime} baseline" in lat:
                s = lat[f"{runtime} baseline"] / lat[f"{runtime} compressed"]
                out.setdefault("speedup", {}).setdefault(runtime, {})[bs] = s
                out.setdefault("fraction_of_ideal", {}).setdefault(runtime, {})[bs] = s / ideal
        print("latency batch", bs, lat, flush=True)
    return out


def peak_memory(size: int, batch: int) -> dict:
    """Peak MiB of one resnet50 training step, plain and with partners (bench_train_step's)."""
    peaks = bench_peak_memory(torchvision.models.resnet50(num_classes=21), size, batch,
                              arms=("plain", "two"))
    out = {"plain": peaks["plain"], "bpl": peaks["two"], "ratio": peaks["ratio_two"]}
    print("peak memory MiB", out, flush=True)
    return out


def markdown(r: dict) -> str:
    m = r["machine"]
    lines = [f"# bpl benchmark suite ({r['size']} px)", "",
             f"Machine: {m['cpu']}, {m['torch_threads']} torch threads, torch {m['torch']}.", "",
             "## (a) training step, pruned models (74% fewer MACs), batch "
             f"{r['batch']}", "", "| model | plain (s) | BPL (s) | BPL / plain |", "|---|---:|---:|---:|"]
    for arch, a in r["train_step"].items():
        lines.append(f"| {arch} | {a['plain_s']:.3f} | {a['bpl_s']:.3f} | {a['ratio']:.2f}x |")
    f = r["fusion"]
    lines += ["", f"## (b) fusing resnet101: {f['seconds']:.3f} s for {f['partners']} partners "
              f"(max relative error {f['fusion_error']:.1e})", "",
              "## (c) deploy latency, resnet50 baseline vs compressed", "",
              f"Ideal speedup (MACs ratio): {r['latency']['ideal_speedup']:.2f}x", "",
              "| runtime | batch | baseline (ms) | compressed (ms) | speedup | of ideal |",
              "|---|---:|---:|---:|---:|---:|"]
    for runtime, by_bs in r["latency"].get("speedup", {}).items():
        for bs, s in by_bs.items():
            lat = r["latency"]["latency_ms"][bs]
            lines.append(f"| {runtime} | {bs} | {lat[f'{runtime} baseline']:.1f} | "
                         f"{lat[f'{runtime} compressed']:.1f} | {s:.2f}x | "
                         f"{r['latency']['fraction_of_ideal'][runtime][bs]:.2f} |")
    p = r["peak_memory"]
    lines += ["", f"## (d) peak memory of a resnet50 training step (batch {r['batch']})", "",
              f"plain {p['plain']:.0f} MiB, with partners {p['bpl']:.0f} MiB ({p['ratio']:.2f}x); "
              "counted from before the model was built: weights, gradients, momentum and "
              "activations", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, to check the script")
    args = parser.parse_args()
    if args.quick:
        args.size, args.batch, args.steps, args.repeats = 64, 2, 2, 2
    result = {"size": args.size, "batch": args.batch, "machine": machine()}
    result["train_step"] = train_steps(args.size, args.batch, args.steps)
    result["fusion"] = fusion_time(args.size)
    result["latency"] = deploy_latency(args.size, args.repeats)
    result["peak_memory"] = peak_memory(args.size, args.batch)
    md = markdown(result)
    path = write_results("suite" + ("_quick" if args.quick else ""),
                         json.loads(json.dumps(result, default=str)), md)
    print(md)
    print(f"written to {path}")


if __name__ == "__main__":
    main()
