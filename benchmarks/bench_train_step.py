"""Training-step cost of BPL: extend(resnet50) + diversity loss versus plain resnet50.

Same batch (8x3x224x224 on the CPU by default), the two arms measured interleaved
(plain, bpl, plain, bpl, ...) in one run so drifting clocks and background load hit
both. Also times the diversity loss alone (forward + backward) as a share of a step.

    python benchmarks/bench_train_step.py [--arch resnet50] [--batch 8] [--size 224] [--steps 10]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torchvision
from torch import nn

import bpl
from common import machine, write_results


def make_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, diversity: bool):
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


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()

    torch.manual_seed(0)
    x = torch.randn(args.batch, 3, args.size, args.size)
    y = torch.randint(0, 21, (args.batch,))
    plain = torchvision.models.get_model(args.arch, num_classes=21)
    student = bpl.extend(plain)
    steps = {"plain": make_step(plain, x, y, False), "bpl": make_step(student, x, y, True)}

    def loss_only() -> None:
        student.zero_grad(set_to_none=True)
        bpl.diversity_loss(student).backward()

    for _ in range(args.warmup):
        for fn in (*steps.values(), loss_only):
            fn()
    times: dict[str, list[float]] = {"plain": [], "bpl": [], "diversity_loss": []}
    for i in range(args.steps):
        order = ("plain", "bpl") if i % 2 == 0 else ("bpl", "plain")
        for name in order:
            times[name].append(timed(steps[name]))
        times["diversity_loss"].append(timed(loss_only))
    med = {k: statistics.median(v) for k, v in times.items()}
    x1 = x[:1]
    macs_ratio = bpl.count_macs(student, x1) / bpl.count_macs(plain, x1)
    result = {
        "arch": args.arch,
        "batch": [args.batch, 3, args.size, args.size],
        "steps": args.steps,
        "partners": len(student.bpl_report.extended),
        "median_step_s": med,
        "bpl_over_plain": med["bpl"] / med["plain"],
        "diversity_share_of_bpl_step": med["diversity_loss"] / med["bpl"],
        "train_macs_ratio": macs_ratio,
        "targets": {"bpl_over_plain": 1.20, "diversity_share_of_bpl_step": 0.03},
        "machine": machine(),
        "raw_s": times,
    }
    md = (
        f"# Training step: BPL vs plain ({args.arch}, batch {args.batch}x3x{args.size}x{args.size})\n\n"
        f"Machine: {result['machine']['cpu']}, {result['machine']['torch_threads']} threads, "
        f"torch {result['machine']['torch']}\n\n"
        "| arm | median step (s) |\n|---|---|\n"
        f"| plain | {med['plain']:.3f} |\n| BPL (partners + diversity loss) | {med['bpl']:.3f} |\n"
        f"| diversity loss alone (fwd+bwd) | {med['diversity_loss'] * 1000:.2f} ms |\n\n"
        f"BPL / plain = **{result['bpl_over_plain']:.3f}x** (target <= 1.20x); "
        f"diversity loss = **{100 * result['diversity_share_of_bpl_step']:.2f}%** of a BPL step "
        "(target <= 3%).\n\n"
        f"Compute floor: the partners make a forward pass {macs_ratio:.3f}x the MACs of the plain "
        "model (backward scales the same way), so no implementation of per-block partners on "
        "these convs can train faster than about that ratio of convolution work.\n"
    )
    path = write_results(f"train_step_{args.arch}", result, md)
    print(md)
    print(f"written to {path}")


if __name__ == "__main__":
    main()
