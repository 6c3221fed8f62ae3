"""Training-step cost of BPL: partners (two-conv and one-conv) + diversity loss vs plain training.

For each model (resnet50, resnet18), unpruned and pruned to 74% fewer MACs, at batch 8
and 64 (224 px, CPU by default), the arms are measured interleaved in one run (plain,
two-conv, one-conv, ... in alternating order) so drifting clocks and background load
hit all of them:

- plain: the model alone, SGD step with cross-entropy;
- BPL two-conv: ``bpl.extend`` (conv->BN and partner conv->BN) + the diversity loss;
- BPL one-conv: the same with ``one_conv=True`` (one conv over the stacked kernels);
- the diversity loss alone, forward and backward;
- with ``--compile``: plain and BPL two-conv under ``torch.compile`` as well.

With ``--kinds`` it times instead each partner kind (``bpl.PARTNER_KINDS``: same, diverse,
asymmetric) with the diversity loss against plain training, interleaved (results:
``train_step_kinds``):

    python benchmarks/bench_train_step.py --kinds --archs resnet18 --size 64 --batches 64

Beside the measured ratios: the MACs ratio of the extended model to the plain one (the
floor of exact per-block partners) and the peak resident memory of one training step of
each arm, counted in a fresh process from before the model is loaded (weights,
gradients, momentum and activations).

    python benchmarks/bench_train_step.py            # full: every config above
    python benchmarks/bench_train_step.py --quick    # batch 8 only, 3 steps

With ``--precision`` (issue 25) it times instead every arm (plain, BPL two-conv, BPL
one-conv, distillation from the unpruned model) in fp32 and bf16 autocast, each NCHW and
channels_last, interleaved, on resnet18 at 64 px (batch 64) and resnet50 at 224 px
(batch 16), unpruned and pruned to 74%: the step exactly as ``bpl.engine`` runs it
(:class:`bpl.precision.Precision`). ``--command-data DIR`` adds whole ``bpl train`` runs
of resnet50 at 128 and 224 px with the defaults against ``--no-amp`` (images/s of the
last epoch), alternated, and the defaults with oneDNN held below AMX
(``ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16``), which must fall back to fp32.

    python benchmarks/bench_train_step.py --precision --command-data ../shared/data/ucmerced
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torchvision
from torch import nn

import bpl
from bpl.distill import Distillation
from bpl.engine import Step, check_compile
from bpl.precision import Precision, cpu_bf16
from common import load_average, machine, write_results

R = 0.7397  # the paper's ResNet-50 reduction on UC Merced ("74%")
NUM_CLASSES = 21


def make_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, diversity: bool) -> Callable[[], None]:
    """One SGD training step of ``model`` on ``(x, y)``, with the diversity loss if asked."""
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=1e-4)
    model.train()

    def step() -> None:
        loss = nn.functional.cross_entropy(model(x), y)
        if diversity:
            loss = loss + bpl.diversity_loss(model)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def timed(fn: Callable[[], None]) -> float:
    """Wall time of one call, in seconds."""
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def interleaved(arms: dict[str, Callable[[], None]], steps: int,
                warmup: int) -> dict[str, list[float]]:
    """Seconds of each call of every arm: ``warmup`` untimed rounds, then ``steps`` rounds in
    alternating order (A, B, ..., then ..., B, A), so drift and background load hit all."""
    for _ in range(warmup):
        for fn in arms.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in arms}
    names = list(arms)
    for i in range(steps):
        for name in names if i % 2 == 0 else names[::-1]:
            times[name].append(timed(arms[name]))
    return times


def student(plain: nn.Module, one_conv: bool) -> nn.Module:
    """``plain`` extended with the paper's partners, two-conv or one-conv."""
    return bpl.extend(plain, one_conv=one_conv)


# One training step in a fresh process: the peak resident set (VmHWM) above the RSS
# before the model is loaded. argv: model file, size, batch, arm (plain|two|one).
PEAK = """
import sys, torch, bpl
from pathlib import Path

def kib(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1])

path, size, batch, arm = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
x, y = torch.randn(batch, 3, size, size), torch.randint(0, 2, (batch,))
Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
before = kib("VmRSS:")  # before the model: its weights, gradients and momentum count too
model = torch.load(path, weights_only=False)
if arm != "plain":
    model = bpl.extend(model, one_conv=arm == "one", inplace=True)
opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
loss = torch.nn.functional.cross_entropy(model(x), y)
if arm != "plain":
    loss = loss + bpl.diversity_loss(model)
loss.backward(); opt.step()
print((kib("VmHWM:") - before) / 1024)
"""


def peak_memory(model: nn.Module, size: int, batch: int,
                arms: tuple[str, ...] = ("plain", "two", "one")) -> dict[str, float]:
    """Peak MiB of one training step of each arm of ``model`` (plain, not yet extended),
    each in a fresh subprocess; ``ratio_<arm>`` is that arm's peak over the plain one."""
    out: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.pt"
        torch.save(model, path)
        for arm in arms:
            proc = subprocess.run([sys.executable, "-c", PEAK, str(path), str(size), str(batch), arm],
                                  capture_output=True, text=True, check=True)
            out[arm] = float(proc.stdout.split()[-1])
    for arm in arms:
        if arm != "plain" and "plain" in out:
            out[f"ratio_{arm}"] = out[arm] / out["plain"]
    return out


def plain_model(arch: str, reduction: float, size: int) -> nn.Module:
    """torchvision ``arch`` (21 classes), pruned to ``reduction`` fewer MACs when non-zero."""
    torch.manual_seed(0)
    model = torchvision.models.get_model(arch, num_classes=NUM_CLASSES)
    if reduction:
        model = bpl.prune(model, torch.randn(1, 3, size, size), flops_reduction=reduction,
                          round_to=8)
    return model


def measure(arch: str, reduction: float, batch: int, size: int, steps: int, warmup: int,
            compiled: bool, memory: bool) -> dict:
    """Median step time of every arm of one config, interleaved, with MACs and peak memory."""
    plain = plain_model(arch, reduction, size)
    torch.manual_seed(0)
    x = torch.randn(batch, 3, size, size)
    y = torch.randint(0, NUM_CLASSES, (batch,))
    two, one = student(plain, False), student(plain, True)
    base = copy.deepcopy(plain)  # `plain` is trained below; memory and MACs use the untrained copy
    arms = {"plain": make_step(plain, x, y, False), "bpl_two_conv": make_step(two, x, y, True),
            "bpl_one_conv": make_step(one, x, y, True)}
    if compiled:
        arms["plain_compiled"] = make_step(torch.compile(copy.deepcopy(base)), x, y, False)
        arms["bpl_two_conv_compiled"] = make_step(torch.compile(student(base, False)), x, y, True)
    loss_model = student(base, False)
    for p in loss_model.parameters():  # as in a step: the CE gradients are already there
        p.grad = torch.zeros_like(p)

    def loss_only() -> None:
        bpl.diversity_loss(loss_model).backward()

    arms["diversity_loss"] = loss_only
    times = interleaved(arms, steps, warmup)
    med = {k: statistics.median(v) for k, v in times.items()}
    x1 = x[:1]
    result = {
        "arch": arch,
        "flops_reduction": reduction,
        "batch": batch,
        "size": size,
        "partners": len(bpl.reports(two)["extend"].extended),
        "median_step_s": med,
        "over_plain": {k: v / med["plain"] for k, v in med.items()
                       if k not in ("plain", "diversity_loss")},
        "one_over_two_conv": med["bpl_one_conv"] / med["bpl_two_conv"],
        "diversity_share_of_bpl_step": med["diversity_loss"] / med["bpl_two_conv"],
        "macs_ratio": bpl.count_macs(two, x1) / bpl.count_macs(base, x1),
        "raw_s": times,
    }
    if compiled:
        result["compiled_over_eager"] = {
            "plain": med["plain_compiled"] / med["plain"],
            "bpl_two_conv": med["bpl_two_conv_compiled"] / med["bpl_two_conv"]}
    if memory:
        result["peak_memory_mib"] = peak_memory(base, size, batch)
    return result


def markdown(result: dict) -> str:
    """The results as a Markdown page."""
    m = result["machine"]
    lines = [
        "# Training step: BPL vs plain" + (" (quick)" if result["quick"] else ""), "",
        f"Machine: {m['cpu']}, {m['torch_threads']} torch threads, torch {m['torch']}; "
        f"{result['steps']} timed steps per arm, medians. {result['note']}", "",
        "| model | MACs cut | batch | plain (s) | two-conv (s) | one-conv (s) | two-conv / plain "
        "| one-conv / plain | MACs ratio (floor) | diversity loss (ms, % of step) "
        "| peak MiB plain / two / one |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["configs"]:
        med, over = r["median_step_s"], r["over_plain"]
        peak = r.get("peak_memory_mib")
        peak_text = (f"{peak['plain']:.0f} / {peak['two']:.0f} ({peak['ratio_two']:.2f}x) / "
                     f"{peak['one']:.0f} ({peak['ratio_one']:.2f}x)") if peak else "-"
        lines.append(
            f"| {r['arch']} | {100 * r['flops_reduction']:.0f}% | {r['batch']} | {med['plain']:.3f} "
            f"| {med['bpl_two_conv']:.3f} | {med['bpl_one_conv']:.3f} | {over['bpl_two_conv']:.2f}x "
            f"| {over['bpl_one_conv']:.2f}x | {r['macs_ratio']:.2f}x "
            f"| {1000 * med['diversity_loss']:.1f} ({100 * r['diversity_share_of_bpl_step']:.1f}%) "
            f"| {peak_text} |")
    compiled = [r for r in result["configs"] if "compiled_over_eager" in r]
    if compiled:
        lines += ["", "torch.compile (compiled step time / eager step time):", "",
                  "| model | MACs cut | batch | plain | BPL two-conv |", "|---|---:|---:|---:|---:|"]
        for r in compiled:
            c = r["compiled_over_eager"]
            lines.append(f"| {r['arch']} | {100 * r['flops_reduction']:.0f}% | {r['batch']} "
                         f"| {c['plain']:.2f}x | {c['bpl_two_conv']:.2f}x |")
    lines += ["", "MACs ratio: forward MACs of the extended model over the plain one; the "
              "backward scales the same way, so exact per-block partners with one BN per "
              "branch cannot train faster than about that ratio of convolution work. Peak "
              "memory: one training step in a fresh process, counted from before the model "
              "is loaded.", ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------- partner kinds

def measure_kinds(arch: str, reduction: float, batch: int, size: int, steps: int,
                  warmup: int) -> dict:
    """Step time of every partner kind (with the diversity loss) against plain training,
    interleaved, and each extended model's forward MACs over the plain one's."""
    plain = plain_model(arch, reduction, size)
    torch.manual_seed(0)
    x = torch.randn(batch, 3, size, size)
    y = torch.randint(0, NUM_CLASSES, (batch,))
    x1 = x[:1]
    base_macs = bpl.count_macs(plain, x1)
    students = {kind: bpl.extend(plain, partner=kind) for kind in bpl.PARTNER_KINDS}
    macs = {kind: bpl.count_macs(m, x1) / base_macs for kind, m in students.items()}
    arms = {"plain": make_step(plain, x, y, False)}
    arms.update({kind: make_step(m, x, y, True) for kind, m in students.items()})
    times = interleaved(arms, steps, warmup)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"arch": arch, "flops_reduction": reduction, "batch": batch, "size": size,
            "median_step_s": med,
            "over_plain": {k: v / med["plain"] for k, v in med.items() if k != "plain"},
            "macs_ratio": macs, "raw_s": times}


def kinds_markdown(result: dict) -> str:
    """The partner kinds' step cost as a Markdown page."""
    m, kinds = result["machine"], list(bpl.PARTNER_KINDS)
    lines = ["# Training step of each partner kind" + (" (quick)" if result["quick"] else ""), "",
             f"Machine: {m['cpu']}, {m['torch_threads']} torch threads, torch {m['torch']}; "
             f"{result['steps']} timed steps per arm, interleaved, medians. {result['note']}", "",
             "| model | MACs cut | batch | size | plain (s) | "
             + " | ".join(f"{k} / plain (MACs ratio)" for k in kinds) + " |",
             "|---|---:|---:|---:|---:|" + "---:|" * len(kinds)]
    for r in result["configs"]:
        cells = " | ".join(f"{r['over_plain'][k]:.2f}x ({r['macs_ratio'][k]:.2f}x)" for k in kinds)
        lines.append(f"| {r['arch']} | {100 * r['flops_reduction']:.0f}% | {r['batch']} | "
                     f"{r['size']} | {r['median_step_s']['plain']:.3f} | {cells} |")
    lines += ["", "Each kind trains with the diversity loss (raw kernels); the MACs ratio is the "
              "extended model's forward MACs over the plain one's.", ""]
    return "\n".join(lines)


def main_kinds(args: argparse.Namespace) -> None:
    """--kinds: the step cost of each partner kind (issue 27)."""
    result = {"quick": args.quick, "steps": args.steps, "note": args.note, "machine": machine(),
              "load_average": load_average(), "configs": []}
    for arch in args.archs:
        for reduction in args.reductions:
            for batch in args.batches:
                r = measure_kinds(arch, reduction, batch, args.size, args.steps, args.warmup)
                print({k: v for k, v in r.items() if k != "raw_s"}, flush=True)
                result["configs"].append(r)
    md = kinds_markdown(result)
    name = args.name or ("train_step_kinds_quick" if args.quick else "train_step_kinds")
    print(md)
    print(f"written to {write_results(name, result, md)}")


# --------------------------------------------------------------------------- precision

PRECISIONS = {  # name -> (autocast dtype, channels_last)
    "fp32": (None, False), "fp32_cl": (None, True),
    "bf16": (torch.bfloat16, False), "bf16_cl": (torch.bfloat16, True),
}
PRECISION_CONFIGS = [("resnet18", 64, 64), ("resnet50", 224, 16)]  # arch, size, batch


def engine_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, precision: Precision,
                terms: list) -> Callable[[], None]:
    """One training step as ``bpl.engine`` runs it: inputs in the run's memory format, the
    forward and cross-entropy under its autocast, the loss terms after, SGD."""
    if precision.channels_last:
        model.to(memory_format=torch.channels_last)
    x = precision.prepare(x)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=1e-4)
    model.train()

    def step() -> None:
        with precision.autocast():
            logits = model(x)
            loss = nn.functional.cross_entropy(logits, y)
        loss = loss.float()
        for term in terms:
            loss = loss + term(Step(model, x, y, logits, precision.autocast)).float()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def measure_precision(arch: str, reduction: float, batch: int, size: int, steps: int,
                      warmup: int) -> dict:
    """Median step time of every (arm, precision) of one config, all interleaved."""
    base = plain_model(arch, 0.0, size)
    pruned = plain_model(arch, reduction, size) if reduction else base
    torch.manual_seed(0)
    x = torch.randn(batch, 3, size, size)
    y = torch.randint(0, NUM_CLASSES, (batch,))

    def div(step: Step) -> torch.Tensor:
        return bpl.diversity_loss(step.model)

    arms: dict[str, Callable[[], None]] = {}
    for pname, (dtype, cl) in PRECISIONS.items():
        p = Precision(dtype, cl, "cpu", "benchmark")
        arms[f"plain/{pname}"] = engine_step(copy.deepcopy(pruned), x, y, p, [])
        arms[f"bpl_two_conv/{pname}"] = engine_step(student(pruned, False), x, y, p, [div])
        arms[f"bpl_one_conv/{pname}"] = engine_step(student(pruned, True), x, y, p, [div])
        arms[f"kd/{pname}"] = engine_step(copy.deepcopy(pruned), x, y, p, [Distillation(base)])
    times = interleaved(arms, steps, warmup)
    med = {k: statistics.median(v) for k, v in times.items()}
    speedup = {k: med[f"{k.split('/')[0]}/fp32"] / v for k, v in med.items()}
    return {"arch": arch, "flops_reduction": reduction, "batch": batch, "size": size,
            "median_step_s": med, "speedup_over_fp32": speedup,
            "images_per_s": {k: batch / v for k, v in med.items()}, "raw_s": times}


def run_command(data: str, size: int, epochs: int, subset: float, cache: str,
                extra: list[str], env: dict[str, str]) -> dict:
    """One `bpl train` of resnet50; images/s of its last epoch and the precision it used."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "bpl", "train", "--data-root", data, "--arch", "resnet50",
               "--image-size", str(size), "--epochs", str(epochs), "--train-subset", str(subset),
               "--no-latency", "--quiet", "--cache-dir", cache, "--out", f"{tmp}/run", *extra]
        subprocess.run(cmd, check=True, capture_output=True, env={**os.environ, **env})
        metrics = json.loads(Path(f"{tmp}/run/metrics.json").read_text())
    return {"images_per_s": metrics["history"][-1]["images_per_s"],
            "precision": metrics["precision"][-1]}


def measure_command(data: str, sizes: list[int], pairs: int, epochs: int, subset: float) -> list:
    """`bpl train` with the defaults against --no-amp (and the defaults on oneDNN held below
    AMX), alternated ``pairs`` times per size; medians of the last epoch's images/s."""
    arms = {"defaults": ([], {}), "no_amp": (["--no-amp"], {}),
            "defaults_no_amx": ([], {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16"})}
    out = []
    with tempfile.TemporaryDirectory() as cache:
        for size in sizes:
            runs: dict[str, list[dict]] = {k: [] for k in arms}
            for i in range(pairs):
                for name in list(arms) if i % 2 == 0 else list(arms)[::-1]:
                    runs[name].append(run_command(data, size, epochs, subset, cache, *arms[name]))
            med = {k: statistics.median(r["images_per_s"] for r in v) for k, v in runs.items()}
            out.append({"arch": "resnet50", "size": size, "images_per_s": med,
                        "precision": {k: v[0]["precision"] for k, v in runs.items()},
                        "defaults_over_no_amp": med["defaults"] / med["no_amp"],
                        "no_amx_over_no_amp": med["defaults_no_amx"] / med["no_amp"],
                        "raw": runs})
            print(out[-1], flush=True)
    return out


def precision_markdown(result: dict) -> str:
    m = result["machine"]
    lines = ["# Training step: bf16 and channels_last against fp32 NCHW", "",
             f"Machine: {m['cpu']}, {m['torch_threads']} torch threads, torch {m['torch']}; "
             f"bf16 detected: {result['bf16_detected']}. {result['steps']} timed steps per arm, "
             f"medians, every arm and precision interleaved. Load average before: "
             f"{result['load_average']}. {result['note']}", "",
             "Speed-up over the same arm in fp32 NCHW (step time in brackets):", "",
             "| model | MACs cut | batch | arm | fp32 | fp32 channels_last | bf16 "
             "| bf16 channels_last |", "|---|---:|---:|---|---:|---:|---:|---:|"]
    for r in result["configs"]:
        for arm in ("plain", "bpl_two_conv", "bpl_one_conv", "kd"):
            cells = [f"{r['speedup_over_fp32'][f'{arm}/{p}']:.2f}x "
                     f"({r['median_step_s'][f'{arm}/{p}']:.3f} s)" for p in PRECISIONS]
            lines.append(f"| {r['arch']} {r['size']} px | {100 * r['flops_reduction']:.0f}% "
                         f"| {r['batch']} | {arm} | {' | '.join(cells)} |")
    lines += ["", "BPL / plain step time in each precision (the partners' cost):", "",
              "| model | MACs cut | " + " | ".join(PRECISIONS) + " |",
              "|---|---:|" + "---:|" * len(PRECISIONS)]
    for r in result["configs"]:
        med = r["median_step_s"]
        lines.append(f"| {r['arch']} {r['size']} px | {100 * r['flops_reduction']:.0f}% | " + " | ".join(
            f"{med[f'bpl_two_conv/{p}'] / med[f'plain/{p}']:.2f}x" for p in PRECISIONS) + " |")
    if result.get("command"):
        lines += ["", "`bpl train` (resnet50, whole command, images/s of the last epoch, "
                  "median of the alternated runs):", "",
                  "| size | defaults | --no-amp | defaults / --no-amp | defaults, oneDNN below "
                  "AMX | that / --no-amp | precision the defaults chose |",
                  "|---:|---:|---:|---:|---:|---:|---|"]
        for c in result["command"]:
            ips, p = c["images_per_s"], c["precision"]
            lines.append(f"| {c['size']} | {ips['defaults']:.1f} | {ips['no_amp']:.1f} "
                         f"| {c['defaults_over_no_amp']:.2f}x | {ips['defaults_no_amx']:.1f} "
                         f"| {c['no_amx_over_no_amp']:.2f}x | {p['defaults']['autocast']} "
                         f"{p['defaults']['memory_format']}; below AMX: "
                         f"{p['defaults_no_amx']['autocast']} |")
    return "\n".join(lines) + "\n"


def main_precision(args: argparse.Namespace) -> None:
    native, why = cpu_bf16()
    result = {"steps": args.steps, "note": args.note, "machine": machine(),
              "bf16_detected": f"{native} ({why})", "load_average": load_average(),
              "capabilities": {k: v for k, v in torch.cpu.get_capabilities().items()
                               if "bf16" in k or "amx" in k or k == "avx512_f"},
              "configs": []}
    for arch, size, batch in PRECISION_CONFIGS:
        if arch not in args.archs:
            continue
        for reduction in args.reductions:
            r = measure_precision(arch, reduction, batch, size, args.steps, args.warmup)
            print({k: v for k, v in r.items() if k != "raw_s"}, flush=True)
            result["configs"].append(r)
    if args.command_data:
        result["command"] = measure_command(args.command_data, args.command_sizes,
                                            args.command_pairs, 2, args.command_subset)
    md = precision_markdown(result)
    path = write_results(args.name or "train_precision", result, md)
    print(md)
    print(f"written to {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", nargs="+", default=["resnet50", "resnet18"])
    parser.add_argument("--reductions", nargs="+", type=float, default=[0.0, R],
                        help="MACs reductions to prune to (0: unpruned)")
    parser.add_argument("--batches", nargs="+", type=int, default=[8, 64])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--compile", action="store_true",
                        help="also time plain and BPL two-conv under torch.compile")
    parser.add_argument("--no-memory", dest="memory", action="store_false",
                        help="skip the peak-memory subprocesses")
    parser.add_argument("--quick", action="store_true", help="batch 8 only and 3 steps")
    parser.add_argument("--note", default="", help="a line about the conditions, kept in the results")
    parser.add_argument("--name", default=None, help="results file name (default: train_step[_quick])")
    parser.add_argument("--precision", action="store_true",
                        help="fp32/bf16 x NCHW/channels_last instead (results: train_precision)")
    parser.add_argument("--command-data", metavar="DIR",
                        help="with --precision: also time `bpl train` on this image folder")
    parser.add_argument("--command-sizes", nargs="+", type=int, default=[128, 224])
    parser.add_argument("--command-pairs", type=int, default=2)
    parser.add_argument("--command-subset", type=float, default=0.2,
                        help="--train-subset of those runs")
    parser.add_argument("--kinds", action="store_true",
                        help="the step cost of each partner kind against plain training "
                             "(results: train_step_kinds)")
    args = parser.parse_args()
    if args.precision:
        main_precision(args)
        return
    if args.quick:
        args.batches, args.steps = [b for b in args.batches if b == 8] or args.batches[:1], 3
    if args.kinds:
        main_kinds(args)
        return
    if args.compile:
        check_compile(torch.device("cpu"))
    result = {"quick": args.quick, "steps": args.steps, "note": args.note, "machine": machine(),
              "configs": []}
    for arch in args.archs:
        for reduction in args.reductions:
            for batch in args.batches:
                r = measure(arch, reduction, batch, args.size, args.steps, args.warmup,
                            args.compile, args.memory)
                print({k: v for k, v in r.items() if k != "raw_s"}, flush=True)
                result["configs"].append(r)
    md = markdown(result)
    path = write_results(args.name or ("train_step_quick" if args.quick else "train_step"), result, md)
    print(md)
    print(f"written to {path}")


if __name__ == "__main__":
    main()
