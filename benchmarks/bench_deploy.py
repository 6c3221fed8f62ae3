"""Deployed CPU speed of pruned models: the fraction of the ideal speedup each runtime reaches.

For each model and input size, a torchvision model (random weights: latency does not
depend on them) is pruned with ``bpl.prune(flops_reduction=r)`` and bpl's defaults
(channel counts rounded to 8) for each reduction ``r``. The baseline and the pruned
models then run, interleaved in one ``bpl.compare_latency`` call per batch size, in

- ``eager``: the model as it is, NCHW, BatchNorm unfolded (``model(x)``);
- ``deploy``: :func:`bpl.exporting.deploy_form` (BN folded, channels_last), what
  `bpl predict` runs and `bpl export --format torchscript` writes;
- ``onnxruntime``: the parity-checked ONNX export (BN folded) in onnxruntime;
- ``deploy_bf16`` (asked with ``--forms``): the deploy form under bfloat16 autocast,
  timed beside ``deploy`` to see whether bf16 inference pays (issue 25);
- ``onnxruntime_int8`` (``--int8``): the same ONNX export statically quantized by
  ``bpl.export(int8=True)`` (QDQ, per-channel int8 weights, uint8 activations calibrated
  on random images: latency does not depend on the values), timed beside ``onnxruntime``
  so that INT8 / fp32 is a fair ratio (issue 30).

The fraction of ideal is (baseline latency / pruned latency) / (baseline MACs / pruned
MACs), each runtime against the baseline in the same runtime. Results go to
``benchmarks/results/deploy.{json,md}`` (``deploy_quick.*`` with ``--quick``), written
after every model and size, and a rerun skips what the file already holds (``--fresh``
starts over). On a machine shared with other jobs the medians are noisy; compare the
fractions, not the milliseconds, and say so.

    python benchmarks/bench_deploy.py --quick          # resnet18, 64 px, 74%: minutes
    python benchmarks/bench_deploy.py                  # the full table: hours on 2 cores
    python benchmarks/bench_deploy.py --models resnet50 --sizes 224 --reductions 0.74
    python benchmarks/bench_deploy.py --forms deploy deploy_bf16 --name deploy_bf16 \
        --agreement runs/precision_fp32/ucm/seed0/r90/plain ...   # bf16 inference: speed, top-1

``--speed-target`` prunes to a measured speedup (``bpl.prune(speedup=S, runtime=...)``,
issue 30) on resnet18, resnet50, mobilenet_v2 and resnext50_32x4d at 64 and 224 px, batch
1 and 16, in onnxruntime and the torch deploy form, for 2x and 3x; then times, in a fresh
interleaved run, the unpruned model, the speed-pruned one and a MACs-uniform
(``flops_reduction``) pruning searched to the same measured speed, so that the MACs each
keeps at equal speed compare (files ``deploy_speed.*``, one row per cell written as it is
done, so a rerun resumes; ``--quick``: resnet18, 64 px, batch 1, onnxruntime, 2x only):

    python benchmarks/bench_deploy.py --speed-target --quick               # minutes
    python benchmarks/bench_deploy.py --speed-target --threads 1           # idle machine, hours

``--agreement RUN_DIR...`` evaluates each run's ``deploy.pt`` on its validation split in the
deploy form, fp32 and bf16, and counts the predictions that agree.

``--int8`` times fp32 against INT8 in onnxruntime on resnet18, resnet50, mobilenet_v2 and
a grouped-conv net (resnext50_32x4d) at 64 and 224 px, 74% fewer MACs (files
``deploy_int8.*``; with ``--quick`` resnet18 at 64 px only, ``deploy_int8_quick.*``), and
``--int8-accuracy CHECKPOINT[,SPLIT_JSON]...`` exports trained checkpoints as `bpl export
--int8` does (calibrated on 300 training images, checked on the validation split) and
compares INT8 with fp32 top-1, both in onnxruntime, on the test split too:

    python benchmarks/bench_deploy.py --int8 --quick                     # minutes
    python benchmarks/bench_deploy.py --int8 --threads 1 --fresh         # idle machine only
    python benchmarks/bench_deploy.py --int8-accuracy \
        runs/ucm/steps/2/deploy.pt,runs/ucm/split.json ...    # accuracy alone: int8_accuracy.*
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torchvision

import bpl
from bpl.errors import BPLError
from bpl.exporting import CALIBRATION_IMAGES, OnnxModule, compare_top1, deploy_form, onnx_module
from bpl.profiling import FAST_MULTIPLE, conv_widths
from bpl.pruning.speed import BUSY_SPREAD, SPEED_TOLERANCE, timing_spread
from common import RESULTS, load_average, machine, write_results

FORMS = ("eager", "deploy", "onnxruntime", "deploy_bf16", "onnxruntime_int8")
#: The INT8 study's cases (issue 30): two ResNets, a depthwise and a grouped-conv net.
INT8_MODELS = ["resnet18", "resnet50", "mobilenet_v2", "resnext50_32x4d"]
#: Random images the latency study's INT8 models are calibrated on.
INT8_CALIBRATION = 32


class Bf16(torch.nn.Module):
    """``model`` under bfloat16 autocast, float32 out: the deploy form in bf16."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return self.model(x).float()


def _key(row: dict) -> tuple:
    return (row["model"], row["size"], row["batch_size"], row["reduction"], row["form"])


def conv_kind(conv: torch.nn.Conv2d) -> str:
    """depthwise, pointwise (1x1), or full (any other kernel) convolution."""
    if conv.groups > 1 and conv.groups == conv.in_channels:
        return "depthwise"
    return "pointwise" if conv.kernel_size == (1, 1) else "full"


@torch.inference_mode()
def layer_split(model: torch.nn.Module, x: torch.Tensor, repeats: int = 10) -> dict[str, dict]:
    """Eager time and MACs per conv kind (the rest: "other"), medians of ``repeats`` passes.

    Forward hooks time each conv (on one CPU thread a layer's work is done when its call
    returns) and note its output size for the MACs. Shows where the time goes that the
    MACs ratio does not predict.
    """
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    spans: dict[str, float] = {}
    outputs: dict[int, int] = {}  # conv -> output elements
    start: dict[int, float] = {}

    def before(mod, inp):
        start[id(mod)] = time.perf_counter()

    def after(mod, inp, out):
        kind = conv_kind(mod)
        spans[kind] = spans.get(kind, 0.0) + time.perf_counter() - start[id(mod)]
        outputs[id(mod)] = out.numel()

    handles = [h for m in convs for h in (m.register_forward_pre_hook(before),
                                          m.register_forward_hook(after))]
    totals: dict[str, list[float]] = {}
    try:
        model(x)  # warm-up
        for _ in range(repeats):
            spans.clear()
            t0 = time.perf_counter()
            model(x)
            per = dict(spans, other=time.perf_counter() - t0 - sum(spans.values()))
            for k, v in per.items():
                totals.setdefault(k, []).append(v)
    finally:
        for h in handles:
            h.remove()
    macs: dict[str, int] = {}
    for m in convs:
        kh, kw = m.kernel_size
        per_output = (m.in_channels // m.groups) * kh * kw
        macs[conv_kind(m)] = macs.get(conv_kind(m), 0) + outputs[id(m)] * per_output
    return {k: {"ms": 1e3 * statistics.median(v), "macs": macs.get(k, 0)}
            for k, v in totals.items()}


def explain(arch: str, size: int, batch: int, reduction: float, round_to: int) -> str:
    """Per conv kind: time and MACs of the baseline and the pruned model, as a table."""
    torch.manual_seed(0)
    x = torch.randn(batch, 3, size, size)
    base = getattr(torchvision.models, arch)(num_classes=1000).eval()
    pruned = bpl.prune(base, x[:1], flops_reduction=reduction, round_to=round_to).eval()
    b, p = layer_split(base, x), layer_split(pruned, x)
    lines = [f"{arch}, {size} px, batch {batch}, {100 * reduction:.0f}% fewer MACs, eager, "
             "1 thread (conv kinds timed by forward hooks)", "",
             "| kind | baseline ms | share | pruned ms | time ratio | MACs ratio |",
             "|---|---:|---:|---:|---:|---:|"]
    total_b = sum(v["ms"] for v in b.values())
    for kind in ("full", "pointwise", "depthwise", "other"):
        if kind not in b:
            continue
        mr = (b[kind]["macs"] / p[kind]["macs"]) if p[kind]["macs"] else float("nan")
        lines.append(f"| {kind} | {b[kind]['ms']:.1f} | {100 * b[kind]['ms'] / total_b:.0f}% | "
                     f"{p[kind]['ms']:.1f} | {b[kind]['ms'] / p[kind]['ms']:.2f}x | "
                     + ("–" if kind == "other" else f"{mr:.2f}x") + " |")
    return "\n".join(lines)


def measure(arch: str, size: int, args: argparse.Namespace, done: set[tuple]) -> list[dict]:
    """Rows for one model at one input size (every reduction, form and batch size)."""
    todo = [(bs, r) for bs in args.batch_sizes for r in args.reductions
            if any((arch, size, bs, r, f) not in done for f in args.forms)]
    if not todo:
        return []
    torch.manual_seed(0)
    x = torch.randn(1, 3, size, size)
    base = getattr(torchvision.models, arch)(num_classes=args.classes).eval()
    models = {"baseline": base}
    info: dict[str, dict] = {"baseline": {"macs": bpl.count_macs(base, x)}}
    for r in sorted({r for _, r in todo}):
        start = time.perf_counter()
        pruned = bpl.prune(base, x, flops_reduction=r, round_to=args.round_to).eval()
        report = bpl.reports(pruned)["prune"]
        widths = conv_widths(pruned)
        name = f"{r:g}"
        models[name] = pruned
        info[name] = {
            "macs": report.macs_after, "achieved": report.reduction,
            "round_to": report.round_to, "prune_s": time.perf_counter() - start,
            "odd_widths": sum(1 for w in widths.values() if w % FAST_MULTIPLE and w >= 16),
        }
        print(f"{arch} {size}px: {report}", flush=True)
    runners = {}
    for name, model in models.items():
        if "eager" in args.forms:
            runners[(name, "eager")] = model
        if "deploy" in args.forms:
            runners[(name, "deploy")] = deploy_form(model)
        if "deploy_bf16" in args.forms:
            runners[(name, "deploy_bf16")] = Bf16(deploy_form(model))
        if "onnxruntime" in args.forms:
            try:
                runners[(name, "onnxruntime")] = onnx_module(model, x, threads=args.threads)
            except BPLError as exc:
                logging.warning("onnxruntime skipped: %s", exc)
        if "onnxruntime_int8" in args.forms:
            calibration = torch.randn(INT8_CALIBRATION, *x.shape[1:],
                                      generator=torch.Generator().manual_seed(1))
            try:
                runners[(name, "onnxruntime_int8")] = onnx_module(
                    model, x, threads=args.threads, int8=True, calibration=calibration,
                    min_calibration=INT8_CALIBRATION)
            except BPLError as exc:
                logging.warning("onnxruntime INT8 skipped: %s", exc)
    forms = [f for f in args.forms if any(form == f for _, form in runners)]
    rows = []
    for bs in sorted({bs for bs, _ in todo}):
        repeats = args.repeats[0] if bs == 1 else args.repeats[-1]
        keyed = {f"{n}|{f}": m for (n, f), m in runners.items()}
        load = load_average()
        ms = bpl.compare_latency(keyed, x, batch_size=bs, threads=args.threads,
                                 warmup=args.warmup, repeats=repeats)
        for name in models:
            if name == "baseline":
                continue
            ideal = info["baseline"]["macs"] / info[name]["macs"]
            for form in forms:
                speedup = ms[f"baseline|{form}"] / ms[f"{name}|{form}"]
                rows.append({
                    "model": arch, "size": size, "batch_size": bs, "reduction": float(name),
                    "form": form, "achieved_reduction": info[name]["achieved"],
                    "round_to": info[name]["round_to"], "odd_widths": info[name]["odd_widths"],
                    "baseline_ms": ms[f"baseline|{form}"], "pruned_ms": ms[f"{name}|{form}"],
                    "speedup": speedup, "ideal_speedup": ideal,
                    "fraction_of_ideal": speedup / ideal, "repeats": repeats,
                    "load_average_before": load,
                })
                print(f"{arch:>12} {size:>3}px batch {bs:>2} {100 * float(name):>4.0f}% "
                      f"{form:>11}: {ms[f'baseline|{form}']:8.2f} -> {ms[f'{name}|{form}']:8.2f} ms "
                      f"{speedup:5.2f}x of {ideal:5.2f}x = {speedup / ideal:.2f}", flush=True)
    return rows


def markdown(rows: list[dict], meta: dict, command: str) -> str:
    """The results as a table: one line per model, size, reduction and batch size."""
    forms = [f for f in FORMS if any(r["form"] == f for r in rows)]
    lines = [
        "# Deployed CPU speed of pruned models: fraction of the ideal speedup",
        "",
        f"- `{command}`",
        f"- CPU: {meta['machine']['cpu']} ({meta['machine']['cpu_count']} logical CPUs), torch "
        f"{meta['machine']['torch']}, onnxruntime {meta.get('onnxruntime')}, "
        f"{meta['threads']} thread(s); median of interleaved runs",
        f"- load average (1/5/15 min) at the start {meta['load_average_start']}, at the end "
        f"{meta['load_average_end']} (a 1-minute average above the thread count means other "
        "jobs may have shared the cores)",
        *([f"- conditions: {meta['note']}"] if meta.get("note") else []),
        "- cell: speedup / ideal speedup (ideal = baseline MACs / pruned MACs), each runtime "
        "against the baseline in the same runtime; `eager` = the model as is (NCHW, BN), "
        "`deploy` = BN folded + channels_last (`bpl predict`, TorchScript export), "
        "`onnxruntime` = the ONNX export"
        + ("; `onnxruntime_int8` = that export statically quantized to INT8 (`bpl export --int8`)"
           if "onnxruntime_int8" in forms else ""),
        "",
        "| model | px | MACs removed | round_to | batch | " + " | ".join(forms) + " |",
        "|---|---:|---:|---:|---:|" + "---:|" * len(forms),
    ]
    by = {_key(r): r for r in rows}
    seen = sorted({(r["model"], r["size"], r["reduction"], r["batch_size"]) for r in rows})
    for arch, size, red, bs in seen:
        cells = []
        for f in forms:
            r = by.get((arch, size, bs, red, f))
            cells.append(f"{r['fraction_of_ideal']:.2f}" if r else "")
        first = next(r for r in rows if (r["model"], r["size"], r["reduction"]) == (arch, size, red))
        lines.append(f"| {arch} | {size} | {100 * first['achieved_reduction']:.1f}% | "
                     f"{first['round_to'] or 1} | {bs} | " + " | ".join(cells) + " |")
    if "deploy" in forms and "deploy_bf16" in forms:
        lines += ["", "bf16 inference: deploy-form time in fp32 / in bf16 (above 1: bf16 faster)",
                  "", "| model | px | MACs removed | batch | unpruned | pruned |",
                  "|---|---:|---:|---:|---:|---:|"]
        for arch, size, red, bs in seen:
            a, b = by.get((arch, size, bs, red, "deploy")), by.get((arch, size, bs, red, "deploy_bf16"))
            if a and b:
                lines.append(f"| {arch} | {size} | {100 * a['achieved_reduction']:.1f}% | {bs} | "
                             f"{a['baseline_ms'] / b['baseline_ms']:.2f}x | "
                             f"{a['pruned_ms'] / b['pruned_ms']:.2f}x |")
    if "onnxruntime" in forms and "onnxruntime_int8" in forms:
        lines += ["", "INT8 in onnxruntime: fp32 time / INT8 time, timed interleaved (above 1: "
                  "INT8 faster); goal (issue 30): at least 1.8x on the pruned ResNets at batch 16",
                  "", "| model | px | MACs removed | batch | pruned fp32 ms | pruned INT8 ms | "
                  "INT8 speedup, pruned | INT8 speedup, unpruned | pruned INT8 vs unpruned fp32 |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for arch, size, red, bs in seen:
            a = by.get((arch, size, bs, red, "onnxruntime"))
            b = by.get((arch, size, bs, red, "onnxruntime_int8"))
            if a and b:
                lines.append(f"| {arch} | {size} | {100 * a['achieved_reduction']:.1f}% | {bs} | "
                             f"{a['pruned_ms']:.2f} | {b['pruned_ms']:.2f} | "
                             f"{a['pruned_ms'] / b['pruned_ms']:.2f}x | "
                             f"{a['baseline_ms'] / b['baseline_ms']:.2f}x | "
                             f"{a['baseline_ms'] / b['pruned_ms']:.2f}x |")
    if meta.get("agreement"):
        lines += ["", "bf16 against fp32 on the validation split (deploy form):", "",
                  "| run | images | fp32 top-1 | bf16 top-1 | same prediction |",
                  "|---|---:|---:|---:|---:|"]
        for r in meta["agreement"]:
            lines.append(f"| {r['run']} | {r['images']} | {r['fp32_top1']:.2f} | "
                         f"{r['bf16_top1']:.2f} | {r['agree']:.2f}% |")
    return "\n".join(lines) + "\n"


def accuracy_markdown(records: list[dict], meta: dict, command: str) -> str:
    """INT8 against fp32 top-1 of trained checkpoints, per split, as a table."""
    lines = ["# INT8 against fp32 top-1, both in onnxruntime (trained checkpoints)", "",
             f"- `{command}`",
             f"- onnxruntime {meta.get('onnxruntime')}, {meta['machine']['cpu']}; accuracy does "
             "not depend on machine load",
             "- each INT8 model made as `bpl export --int8` makes it: calibrated on random "
             "training images of the run's split, checked on its validation split (here with "
             "--force, to measure rather than refuse); the test split is evaluated only here", "",
             "| checkpoint | data | px | MACs | calibration images | split | images | "
             "fp32 top-1 | INT8 top-1 | change (points) | same prediction |",
             "|---|---|---:|---:|---:|---|---:|---:|---:|---:|---:|"]
    for r in records:
        for part in ("val", "test"):
            c = r[part]
            lines.append(f"| {r['checkpoint']} | {r['data']} | {r['image_size']} | "
                         f"{r['macs'] / 1e6:.1f}M | {r['calibration']['images']} | {part} | "
                         f"{c['images']} | {c['fp32_top1']:.2f} | {c['int8_top1']:.2f} | "
                         f"{c['int8_top1'] - c['fp32_top1']:+.2f} | {c['agreement']:.2f}% |")
    return "\n".join(lines) + "\n"


@torch.inference_mode()
def agreement(run_dir: str) -> dict:
    """Top-1 of a run's deploy.pt on its validation split in the deploy form, fp32 and bf16,
    and the share of images both predict alike."""
    from bpl.data import load_dataset
    from bpl.models import load_model

    model, meta = load_model(f"{run_dir}/deploy.pt")
    data = load_dataset(meta.get("data", "imagefolder"), meta.get("data_root"),
                        image_size=meta["image_size"], split_file=f"{run_dir}/split.json",
                        progress=False)
    fp32 = deploy_form(model)
    bf16 = Bf16(fp32)
    labels, preds = [], {"fp32": [], "bf16": []}
    for x, y in torch.utils.data.DataLoader(data.val, batch_size=64):
        labels.append(y)
        preds["fp32"].append(fp32(x).argmax(1))
        preds["bf16"].append(bf16(x).argmax(1))
    y = torch.cat(labels)
    a, b = torch.cat(preds["fp32"]), torch.cat(preds["bf16"])
    return {"run": run_dir, "images": len(y), "fp32_top1": 100 * (a == y).float().mean().item(),
            "bf16_top1": 100 * (b == y).float().mean().item(),
            "agree": 100 * (a == b).float().mean().item()}


def int8_accuracy(spec: str, images: int = CALIBRATION_IMAGES) -> dict:
    """INT8 against fp32 top-1, both in onnxruntime, of a trained checkpoint on its run's
    validation and test splits: ``CHECKPOINT[,SPLIT_JSON]`` (default: split.json beside it).
    The INT8 model is made as `bpl export --int8` makes it (``images`` training images)."""
    from bpl.data import load_dataset
    from bpl.models import load_model
    from bpl.pipeline import export_checkpoint

    checkpoint, _, split = spec.partition(",")
    split = split or str(Path(checkpoint).parent / "split.json")
    model, meta = load_model(checkpoint)
    with tempfile.TemporaryDirectory() as tmp:
        fp32, int8 = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        export_checkpoint(checkpoint, out=fp32)
        made = export_checkpoint(checkpoint, out=int8, int8=True, split=split,
                                 calibration_images=images, force=True, progress=False)
        data = load_dataset(meta.get("data", "imagefolder"), meta.get("data_root"),
                            image_size=meta["image_size"], split_file=split, cache=False,
                            progress=False)
        test = compare_top1(OnnxModule(fp32), OnnxModule(int8), data.test)
    size = meta["image_size"]
    return {"checkpoint": checkpoint, "split": split, "data": data.name, "image_size": size,
            "arch": meta.get("arch"), "macs": bpl.count_macs(model, torch.randn(1, 3, size, size)),
            "calibration": made["calibration"], "val": made["int8_check"],
            "test": {"images": test["images"], "fp32_top1": test["top1_a"],
                     "int8_top1": test["top1_b"], "agreement": test["agreement"]}}


def _runtime_pair(measure, base, pruned, x) -> float:
    """Measured speedup of ``pruned`` over ``base`` (one interleaved call of ``measure``)."""
    ms = measure({"base": (base, x), "pruned": (pruned, x)})
    return ms["base"] / ms["pruned"]


def uniform_at_speed(base, x1, xb, speed: float, measure, trials: int = 6):
    """MACs-uniform pruning (``flops_reduction``, the same ratio in every group) searched on
    the measured speedup until it runs as fast as ``speed``: a secant on log(MACs kept)
    against log(speedup), starting from the ideal (speedup = MACs ratio). Returns the
    closest trial: (reduction, model, measured speedup, trials)."""
    import math

    tried = []
    kept = 1 / speed
    for _ in range(trials):
        r = min(0.95, max(0.02, 1 - kept))
        model = bpl.prune(base, x1, flops_reduction=r, accept_closest=True).eval()
        s = _runtime_pair(measure, base, model, xb)
        tried.append((bpl.reports(model)["prune"].reduction, model, s))
        if abs(s / speed - 1) <= 0.03:
            break
        pts = sorted(((math.log(1 - red), math.log(sp)) for red, _, sp in tried), reverse=True)
        pts = [(0.0, 0.0)] + pts  # unpruned: all MACs, speedup 1
        lo = max((p for p in pts if p[1] < math.log(speed)), key=lambda p: p[1])
        hi = [p for p in pts if p[1] > math.log(speed)]
        if hi:
            h = min(hi, key=lambda p: p[1])
            u = lo[0] + (math.log(speed) - lo[1]) * (h[0] - lo[0]) / (h[1] - lo[1])
        else:  # slope of the last two points (MACs ratio = speedup at first)
            u = math.log(1 - tried[-1][0]) - (math.log(speed) - math.log(s))
        kept = math.exp(u)
    best = min(tried, key=lambda t: abs(math.log(t[2] / speed)))
    return best[0], best[1], best[2], len(tried)


#: Fresh interleaved runs that judge a speed-target cell (the median of their ratios).
FRESH_RUNS = 3
#: Sets of fresh runs at most, when the baseline's time spreads like a busy host's, and the
#: pause before each new set.
FRESH_ATTEMPTS = 3
BUSY_PAUSE_S = 30


def _speed_key(row: dict) -> tuple:
    return (row["model"], row["size"], row["batch_size"], row["runtime"], row["target"])


def speed_cell(arch: str, size: int, bs: int, runtime: str, target: float,
               args: argparse.Namespace) -> dict:
    """One cell of the speed-target study (see the module docstring)."""
    from bpl.pruning.latency import RuntimeMeasure

    torch.manual_seed(0)
    x1 = torch.randn(1, 3, size, size)
    xb = x1.expand(bs, -1, -1, -1).contiguous()
    base = getattr(torchvision.models, arch)(num_classes=args.classes).eval()
    repeats = args.repeats[0] if bs == 1 else args.repeats[-1]
    start = time.perf_counter()
    measure = RuntimeMeasure(runtime, args.threads, warmup=args.warmup, repeats=repeats)
    fast = bpl.prune(base, x1, speedup=target, runtime=runtime, batch_size=bs,
                     threads=args.threads, measure=measure, accept_closest=True).eval()
    report = bpl.reports(fast)["prune"]
    prune_s = time.perf_counter() - start
    search = RuntimeMeasure(runtime, args.threads, warmup=args.warmup, repeats=repeats)
    search.pin(base, xb)
    red, uniform, uniform_search, uniform_trials = uniform_at_speed(
        base, x1, xb, report.speedup, search)
    # the fresh measurement that judges the cell: FRESH_RUNS runs, each timing every pruned
    # model against the baseline in its own interleaved pair, as the search does (three
    # memory-heavy models interleaved evict one another: mobilenet_v2 at 224 px batch 16);
    # the median of the runs' ratios, their spread kept beside it
    fresh = RuntimeMeasure(runtime, args.threads, warmup=args.warmup, repeats=repeats)
    cases = {"baseline": (base, xb), "speed": (fast, xb), "uniform": (uniform, xb)}
    for model, x in cases.values():
        fresh.pin(model, x)
    # a busy host slows the large unpruned model more than the pruned ones (docs/
    # benchmarks.md): when the baseline's own time spreads by more than bpl's BUSY_SPREAD
    # across the runs, the cell is timed again after a pause, at most FRESH_ATTEMPTS times
    for attempt in range(1, FRESH_ATTEMPTS + 1):
        load = load_average()
        runs = [{k: fresh({"baseline": cases["baseline"], k: cases[k]})
                 for k in ("speed", "uniform")} for _ in range(FRESH_RUNS)]
        spread = timing_spread([r[k]["baseline"] for r in runs for k in r])
        if spread <= BUSY_SPREAD or attempt == FRESH_ATTEMPTS:
            break
        time.sleep(BUSY_PAUSE_S)
    ratios = {k: [r[k]["baseline"] / r[k][k] for r in runs] for k in ("speed", "uniform")}
    ms = {k: statistics.median(r[k][k] for r in runs) for k in ("speed", "uniform")}
    ms["baseline"] = statistics.median(r[k]["baseline"] for r in runs for k in r)
    row = {
        "model": arch, "size": size, "batch_size": bs, "runtime": runtime, "target": target,
        "speedup_search": report.speedup, "speedup_fresh": statistics.median(ratios["speed"]),
        "speedup_fresh_runs": ratios["speed"], "uniform_speedup_fresh_runs": ratios["uniform"],
        "macs_reduction": report.reduction, "predicted": report.predicted_speedup,
        "trials": len(report.speed_trials), "table": report.latency_table,
        "uniform_reduction": red, "uniform_speedup_search": uniform_search,
        "uniform_speedup_fresh": statistics.median(ratios["uniform"]),
        "uniform_trials": uniform_trials, "baseline_ms": ms["baseline"],
        "speed_ms": ms["speed"], "uniform_ms": ms["uniform"], "prune_s": prune_s,
        "repeats": repeats, "fresh_repeats": fresh.repeats, "fresh_runs": FRESH_RUNS,
        "fresh_pairwise": True, "fresh_attempts": attempt, "baseline_spread": spread,
        "search_spread": report.latency_spread,
        "min_sample_ms": fresh.min_sample_ms, "load_average_before": load,
    }
    row["within_10"] = abs(row["speedup_fresh"] / target - 1) <= 0.10
    # what bpl.prune says without accept_closest: the narrowest allocation measured short of
    # the target (and no trial within its tolerance) is refused, naming that fastest speedup
    narrowest = [t["measured"] for t in report.speed_trials if t.get("narrowest")]
    row["fastest"] = narrowest[0] if narrowest else None
    row["refused"] = bool(narrowest and narrowest[0] < target
                          and abs(report.speedup / target - 1) > SPEED_TOLERANCE)
    print(f"{arch:>16} {size:>3}px batch {bs:>2} {runtime:>11} {target:.1f}x: measured "
          f"{row['speedup_fresh']:.2f}x fresh ({report.speedup:.2f}x in the search), MACs "
          f"kept {100 * (1 - report.reduction):.1f}% vs {100 * (1 - red):.1f}% uniform at "
          f"{row['uniform_speedup_fresh']:.2f}x", flush=True)
    return row


def _verdict(row: dict) -> str:
    """yes / **no** / refused (bpl.prune's error without accept_closest, naming the fastest)."""
    if row.get("refused"):
        return f"refused: fastest {row['fastest']:.2f}x"
    busy = [f"{what} {100 * row[key]:.0f}%" for what, key in
            (("search", "search_spread"), ("fresh", "baseline_spread"))
            if (row.get(key) or 0.0) > BUSY_SPREAD]
    return ("yes" if row["within_10"] else "**no**") + (
        f" (busy host: baseline spread {', '.join(busy)})" if busy else "")


def _samples(row: dict) -> str:
    """How the fresh run timed the cell (rows from before min_sample_ms: single passes)."""
    n = row.get("fresh_repeats", row["repeats"])
    if not row.get("min_sample_ms"):
        return f"1 run: {n} x 1 pass"
    how = "paired" if row.get("fresh_pairwise") else "three together"
    return f"{row.get('fresh_runs', 1)} runs, {how}: {n} x >= {row['min_sample_ms']:g} ms"


def _fresh(row: dict, key: str = "speedup_fresh") -> str:
    """The fresh speedup, and the range of its runs where there were several."""
    runs = row.get(key + "_runs") or []
    spread = f" ({min(runs):.2f}-{max(runs):.2f})" if len(runs) > 1 else ""
    return f"{row[key]:.2f}x{spread}"


def speed_markdown(rows: list[dict], meta: dict, command: str) -> str:
    """The speed-target study as a table, one line per cell."""
    lines = [
        "# Pruning to a measured speedup (issue 30)", "",
        f"- `{command}`",
        f"- CPU: {meta['machine']['cpu']} ({meta['machine']['cpu_count']} logical CPUs), torch "
        f"{meta['machine']['torch']}, onnxruntime {meta.get('onnxruntime')}, "
        f"{meta['threads']} thread(s); medians of interleaved runs",
        f"- load average (1/5/15 min) at the start {meta['load_average_start']}, at the end "
        f"{meta.get('load_average_end')}",
        *([f"- conditions: {meta['note']}"] if meta.get("note") else []),
        "- `bpl.prune(speedup=S, runtime=R)` against the unpruned model; **fresh**: the "
        "speed-pruned and the MACs-uniform models timed again against the unpruned one after "
        "pruning, in several interleaved runs, the median of their ratios (their range in "
        "brackets); the last column says how: the three together, or each pruned model paired "
        "with the unpruned one as the search times them; **uniform**: `flops_reduction` (the "
        "same ratio in every group) searched on "
        "the measured speed to match the speed-pruned model's; MACs kept: share of the "
        "unpruned model's",
        "",
        "| model | px | batch | runtime | target | fresh | in search | within ±10% | "
        "MACs kept | uniform: MACs kept | uniform: fresh | trials | fresh samples |",
        "|---|---:|---:|---|---:|---:|---:|---|---:|---:|---:|---:|---|",
    ]
    for r in sorted(rows, key=_speed_key):
        lines.append(
            f"| {r['model']} | {r['size']} | {r['batch_size']} | {r['runtime']} | "
            f"{r['target']:.1f}x | {_fresh(r)} | {r['speedup_search']:.2f}x | "
            f"{_verdict(r)} | {100 * (1 - r['macs_reduction']):.1f}% | "
            f"{100 * (1 - r['uniform_reduction']):.1f}% | {_fresh(r, 'uniform_speedup_fresh')} | "
            f"{r['trials']} | {_samples(r)} |")
    return "\n".join(lines) + "\n"


def speed_study(args: argparse.Namespace, meta: dict) -> None:
    """Every cell of the speed-target study not yet in the results file."""
    name = args.name or ("deploy_speed" + ("_quick" if args.quick else ""))
    path = RESULTS / f"{name}.json"
    old = json.loads(path.read_text()) if path.exists() and not args.fresh else {}
    rows: list[dict] = old.get("results", [])
    done = {_speed_key(r) for r in rows}
    command = "python benchmarks/bench_deploy.py --speed-target" + (" --quick" if args.quick else "")
    for arch in args.models:
        for size in args.sizes:
            for bs in args.batch_sizes:
                for runtime in args.runtimes:
                    for target in args.targets:
                        if (arch, size, bs, runtime, target) in done:
                            continue
                        rows.append(speed_cell(arch, size, bs, runtime, target, args))
                        meta["load_average_end"] = load_average()
                        write_results(name, {"meta": meta, "results": rows},
                                      speed_markdown(rows, meta, command))
    if not path.exists():  # nothing to do, nothing written yet
        write_results(name, {"meta": meta, "results": rows}, speed_markdown(rows, meta, command))
    print(f"wrote {path} and {path.with_suffix('.md')}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true",
                    help="resnet18 at 64 px, 74%%, fewer repeats (files deploy_quick.*); flags given still hold")
    ap.add_argument("--models", nargs="+",
                    help="torchvision names (default: resnet18 resnet50 mobilenet_v2, and "
                         "resnext50_32x4d with --int8 or --speed-target)")
    ap.add_argument("--sizes", type=int, nargs="+",
                    help="input sizes (default: 64 128 224; 64 224 with --int8)")
    ap.add_argument("--reductions", type=float, nargs="+",
                    help="MACs reductions (default: 0.5 0.74 0.9; 0.74 with --int8)")
    ap.add_argument("--batch-sizes", type=int, nargs="+", help="default: 1 16")
    ap.add_argument("--forms", nargs="+", choices=FORMS,
                    help="runtimes (default: eager deploy onnxruntime; onnxruntime "
                         "onnxruntime_int8 with --int8)")
    ap.add_argument("--int8", action="store_true",
                    help="INT8 against fp32 in onnxruntime (issue 30; files deploy_int8.*)")
    ap.add_argument("--speed-target", action="store_true",
                    help="prune to a measured speedup and compare with MACs-uniform pruning "
                         "at the same speed (issue 30; files deploy_speed.*)")
    ap.add_argument("--targets", type=float, nargs="+",
                    help="--speed-target: speedups asked (default: 2 3)")
    ap.add_argument("--runtimes", nargs="+", choices=["onnxruntime", "torch"],
                    help="--speed-target: runtimes (default: both)")
    ap.add_argument("--int8-accuracy", nargs="+", metavar="CHECKPOINT[,SPLIT]",
                    help="only INT8 against fp32 top-1 of these trained checkpoints on their "
                         "validation and test splits (files int8_accuracy.*; no timing)")
    ap.add_argument("--agreement", nargs="+", metavar="RUN_DIR",
                    help="bf16 against fp32 top-1 of these runs' deploy.pt on their validation split")
    ap.add_argument("--round-to", type=int, default=8, help="as bpl.prune (1: no rounding)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, nargs="+", default=[20, 8],
                    help="timed passes at batch 1, and at larger batches")
    ap.add_argument("--name", default=None, help="results file name (default: deploy)")
    ap.add_argument("--fresh", action="store_true", help="ignore the results already written")
    ap.add_argument("--note", default="", help="a line about the conditions, kept in the results")
    ap.add_argument("--table", action="store_true", help="only rewrite the .md from the .json")
    ap.add_argument("--explain", nargs=4, metavar=("ARCH", "PX", "BATCH", "REDUCTION"),
                    help="time per conv kind, baseline vs pruned (where the ideal is lost)")
    args = ap.parse_args()
    defaults = ((INT8_MODELS, [64, 224], [0.74], ["onnxruntime", "onnxruntime_int8"])
                if args.int8 or args.speed_target else (["resnet18", "resnet50", "mobilenet_v2"], [64, 128, 224], [0.5, 0.74, 0.9],
                      list(FORMS[:3])))
    defaults = dict(zip(("models", "sizes", "reductions", "forms"), defaults),
                    batch_sizes=[1, 16], runtimes=["onnxruntime", "torch"], targets=[2.0, 3.0])
    if args.quick:  # smaller defaults; what was given on the command line still holds
        defaults.update(models=["resnet18"], sizes=[64], reductions=[0.74])
        args.repeats = [10, 5]
        if args.speed_target:
            defaults.update(batch_sizes=[1], runtimes=["onnxruntime"], targets=[2.0])
            args.warmup, args.repeats = 1, [5, 3]
    for field, value in defaults.items():
        if getattr(args, field) is None:
            setattr(args, field, value)
    logging.getLogger("bpl.exporting").setLevel(logging.ERROR)  # INT8 of random models: unchecked
    name = args.name or ("deploy" + ("_int8" if args.int8 else "") + ("_quick" if args.quick else ""))
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    path = RESULTS / f"{name}.json"
    old = json.loads(path.read_text()) if path.exists() and not args.fresh else {}
    rows: list[dict] = old.get("results", [])
    try:
        import onnxruntime
        ort_version = onnxruntime.__version__
    except ImportError:
        ort_version = None
    meta = {"machine": machine(), "onnxruntime": ort_version, "threads": args.threads,
            "load_average_start": old.get("meta", {}).get("load_average_start", load_average()),
            "weights": "random (latency does not depend on values)"}
    meta["note"] = args.note or old.get("meta", {}).get("note", "")
    command = ("python benchmarks/bench_deploy.py" + (" --int8" if args.int8 else "")
               + (" --quick" if args.quick else ""))
    if args.speed_target:
        speed_study(args, meta)
        return
    if args.explain:
        arch, size, batch, reduction = args.explain
        torch.set_num_threads(1)
        table = explain(arch, int(size), int(batch), float(reduction), args.round_to)
        print(table)
        name = f"explain_{arch}_{size}px_b{batch}_r{round(100 * float(reduction))}"
        cmd = f"{command} --explain {arch} {size} {batch} {reduction}"
        write_results(name, {"meta": meta, "command": cmd, "table": table},
                      f"# `{cmd}`\n\n{meta['machine']}\n\n```\n{table}\n```\n")
        print(f"wrote {RESULTS / name}.json and .md")
        return
    if args.agreement:
        torch.set_num_threads(args.threads)
        meta["agreement"] = [agreement(run) for run in args.agreement]
        for r in meta["agreement"]:
            print(r, flush=True)
    if args.int8_accuracy:
        records = []
        for spec in args.int8_accuracy:
            records.append(int8_accuracy(spec))
            print({k: records[-1][k] for k in ("checkpoint", "val", "test")}, flush=True)
        cmd = "python benchmarks/bench_deploy.py --int8-accuracy " + " ".join(args.int8_accuracy)
        out = args.name or "int8_accuracy"
        write_results(out, {"meta": meta, "command": cmd, "results": records},
                      accuracy_markdown(records, meta, cmd))
        print(f"wrote {RESULTS / out}.json and .md")
        return
    if args.table:
        write_results(name, old, markdown(rows, old["meta"], command))
        return
    for arch in args.models:
        for size in args.sizes:
            rows += measure(arch, size, args, {_key(r) for r in rows})
            meta["load_average_end"] = load_average()
            write_results(name, {"meta": meta, "results": rows}, markdown(rows, meta, command))
    print(f"wrote {path} and {path.with_suffix('.md')}")


if __name__ == "__main__":
    main()
