"""Data-parallel training on the CPU: 2 gloo processes on localhost, spawned by the tests."""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

import bpl
from bpl import distributed
from bpl.cli import main as bpl_main

STEPS, BATCH = 3, 16
# DDP (gloo) under bf16 autocast wherever the CPU has bf16 instructions; without them
# oneDNN emulates bf16 at up to 20x the time of fp32, too slow for two torchrun jobs
_CAPS = torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}
BF16 = "1" if _CAPS.get("avx512_bf16") or _CAPS.get("amx_bf16") else "0"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_student() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4),
    )
    student = bpl.extend(net)
    with torch.no_grad():  # let the partners matter from the first step
        for _, block in bpl.partner_blocks(student):
            block.partner_bn.weight.fill_(0.5)
    return student


def batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(BATCH, 3, 8, 8, generator=g), torch.randint(0, 4, (BATCH,), generator=g))
            for _ in range(STEPS)]


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world),
                      RANK=str(rank), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    distributed.init("cpu")
    model = make_student()
    net = distributed.wrap(model, torch.device("cpu"))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    shard = BATCH // world
    for x, y in batches():
        xs, ys = x[rank * shard:(rank + 1) * shard], y[rank * shard:(rank + 1) * shard]
        loss = nn.functional.cross_entropy(net(xs), ys) + bpl.diversity_loss(net, diversity_weight=0.5)
        opt.zero_grad()
        loss.backward()
        opt.step()
    if rank == 0:
        torch.save(distributed.unwrap(net).state_dict(), out)
    distributed.shutdown()


def test_two_processes_match_one_with_the_same_global_batch(tmp_path):
    out = tmp_path / "ddp.pt"
    mp.spawn(_worker, args=(2, free_port(), str(out)), nprocs=2, join=True)
    ddp = torch.load(out)
    # One process, the same global batch: each half normalised by its own BN statistics
    # (as each rank does), the gradients averaged, the diversity loss counted once.
    model = make_student()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    for x, y in batches():
        ce = sum(nn.functional.cross_entropy(model(xh), yh) for xh, yh in
                 zip(x.chunk(2), y.chunk(2))) / 2
        loss = ce + bpl.diversity_loss(model, diversity_weight=0.5)
        opt.zero_grad()
        loss.backward()
        opt.step()
    for name, param in model.named_parameters():
        assert torch.allclose(ddp[name], param.detach(), rtol=1e-5, atol=1e-6), name


def torchrun(*args: str, port: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
            f"--master_port={port}", "-m", "bpl", *map(str, args)]


FAST = ["--data", "digits", "--image-size", "16", "--batch-size", "64", "--quiet", "--no-latency"]


@pytest.fixture(scope="module")
def baseline(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ddp") / "base"
    assert bpl_main(["train", *FAST, "--arch", "tiny_resnet", "--epochs", "1",
                         "--out", str(out)]) == 0
    return out / "last.pt"


def _compress_args(baseline: Path, out: Path) -> list:
    return ["compress", *FAST, "--baseline", baseline, "--epochs", "3", "--flops-reduction",
            "0.5", "--out", out]


@pytest.fixture(scope="module")
def torchrun_run(tmp_path_factory, baseline) -> tuple[Path, str]:
    """An uninterrupted 3-epoch compress under torchrun: its run directory and stdout."""
    root = tmp_path_factory.mktemp("torchrun") / "runs"
    env = dict(os.environ, OMP_NUM_THREADS="1", BPL_CPU_BF16=BF16)
    proc = subprocess.run(torchrun(*_compress_args(baseline, root / "bpl"), port=free_port()),
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return root / "bpl", proc.stdout


def test_torchrun_compress_writes_one_run_and_evaluates_every_image_once(torchrun_run):
    out, stdout = torchrun_run
    assert stdout.count("| compressed |") == 1  # rank 0 alone prints and writes
    assert [p.name for p in out.parent.iterdir()] == ["bpl"]
    metrics = json.loads((out / "metrics.json").read_text())
    split = json.loads((out / "split.json").read_text())
    n_val, n_test = len(split["val"]), len(split["test"])
    assert [h["val_samples"] for h in metrics["history"]] == [n_val] * 3
    assert metrics["final"]["samples"] == n_test
    assert metrics["fusion_error"] <= 1e-5
    # every rank trained in the precision asked: bf16 + channels_last where the CPU has bf16
    assert metrics["precision"][0]["why"] == f"BPL_CPU_BF16={BF16}"
    assert metrics["precision"][0]["autocast"] == ("bfloat16" if BF16 == "1" else "float32")
    assert all(math.isfinite(h["train_loss"]) for h in metrics["history"])


def _children(pid: int) -> list[int]:
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def _alive(pid: int) -> bool:
    """Running, not a zombie waiting for its (killed) parent to be reaped."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux /proc")
def test_torchrun_resume_after_the_job_is_stopped(tmp_path, baseline, torchrun_run):
    env = dict(os.environ, OMP_NUM_THREADS="1", BPL_CPU_BF16=BF16)
    out = tmp_path / "run"
    args = _compress_args(baseline, out)
    proc = subprocess.Popen(torchrun(*args, port=free_port()), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=env, start_new_session=True)
    deadline = time.time() + 240
    while not ((out / "log.csv").exists() and
               len((out / "log.csv").read_text().splitlines()) >= 2):
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.05)
    # the workers (torchrun starts each in a session of its own), then the launcher, mid-run
    workers = _children(proc.pid)
    assert len(workers) == 2
    for pid in workers:
        os.kill(pid, signal.SIGKILL)
    os.killpg(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    deadline = time.time() + 30
    while any(_alive(pid) for pid in workers):
        assert time.time() < deadline, "a worker outlived the kill"
        time.sleep(0.05)
    # the kill landed mid-run: epoch 1 (or 2) saved, not the last, and the run not finished
    before = torch.load(out / "last.pt", weights_only=False)
    assert 1 <= before["epoch"] < 3 and not (out / "metrics.json").exists()
    done = subprocess.run(torchrun(*args, "--resume", port=free_port()), capture_output=True,
                          text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert [h["epoch"] for h in metrics["history"]] == [1, 2, 3]
    # it went on from the saved epochs, and ends where the uninterrupted job does
    assert metrics["history"][:before["epoch"]] == before["history"]
    assert metrics["segments"] == 2
    straight = json.loads((torchrun_run[0] / "metrics.json").read_text())
    for key in ("val_top1", "val_loss", "train_loss"):
        assert [h[key] for h in metrics["history"]] == [h[key] for h in straight["history"]]
    assert metrics["final"] == straight["final"]
    a = torch.load(torchrun_run[0] / "deploy.pt", weights_only=False)["state_dict"]
    b = torch.load(out / "deploy.pt", weights_only=False)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)
