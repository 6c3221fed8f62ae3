"""Small helpers shared by the benchmarks: machine description and result files."""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import platform
import statistics
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from scipy.stats import t as t_dist  # scipy: in bpl's dev extra (pip install -e .[dev])

from bpl.errors import BPLError
from bpl.files import atomic_write_text
from bpl.models import load_model
from bpl.report import write_json

#: Where results go; BPL_BENCH_RESULTS moves them (the smoke tests write to a temporary folder).
RESULTS = Path(os.environ.get("BPL_BENCH_RESULTS") or Path(__file__).resolve().parent / "results")
#: Config fields that may differ between a finished run and a later call (paths, execution).
NOT_PROTOCOL = frozenset({"data_root", "cache", "cache_dir", "cache_budget", "out", "baseline",
                          "resume", "device", "workers"})


def ci95(values: Sequence[float | None]) -> dict[str, Any]:
    """Mean, sample std and the half-width of the t-based 95% confidence interval of the mean."""
    vals = [float(v) for v in values if v is not None]
    n = len(vals)
    if n == 0:
        return {"mean": None, "std": None, "ci95": None, "n": 0}
    mean = statistics.fmean(vals)
    std = statistics.stdev(vals) if n > 1 else 0.0
    half = t_dist.ppf(0.975, n - 1) * std / math.sqrt(n) if n > 1 else None
    return {"mean": mean, "std": std, "ci95": half, "n": n}


def machine() -> dict:
    """CPU model, core count and library versions, so a figure says where it came from."""
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


def apply_cpu_bf16(setting: bool | None) -> None:
    """A study's ``cpu_bf16`` setting: False trains in fp32 on every CPU (the studies recorded
    before issue 25 ran so, and their runs must pair), True forces bf16 autocast, None
    leaves the choice to ``bpl.precision`` (bf16 where the CPU has AMX). Not a Config field,
    so it is not part of a run's protocol."""
    from bpl.precision import ENV

    if setting is not None:
        os.environ[ENV] = "1" if setting else "0"


def load_average() -> list[float] | None:
    """1, 5 and 15 minute load averages: other processes on the machine skew the timings."""
    try:
        return [float(v) for v in Path("/proc/loadavg").read_text().split()[:3]]
    except (OSError, ValueError):
        return None


def write_results(name: str, data: dict, markdown: str) -> Path:
    """Write ``results/<name>.json`` and ``results/<name>.md`` (atomically, as every file a
    benchmark writes); returns the JSON path."""
    path = RESULTS / f"{name}.json"
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")
    atomic_write_text(RESULTS / f"{name}.md", markdown)
    return path


def write_csv(path: Path, rows: Sequence[dict], fieldnames: Sequence[str] | None = None,
              **options: Any) -> Path:
    """``rows`` as CSV with a header (every key of any row, in order of appearance, unless
    ``fieldnames``), written atomically; ``options`` go to :class:`csv.DictWriter`."""
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=list(fieldnames or dict.fromkeys(
        k for r in rows for k in r)), **options)
    writer.writeheader()
    writer.writerows(rows)
    return atomic_write_text(path, text.getvalue())


@contextmanager
def log_to(path: Path, fmt: logging.Formatter) -> Iterator[None]:
    """Copy every log record (bpl's epoch lines included) into ``path`` while inside."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, mode="a")
    handler.setFormatter(fmt)
    handler.setLevel(logging.INFO)
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield
    finally:
        root.removeHandler(handler)
        handler.close()


def saved_partner_stats(run_dir: Path) -> dict[str, float]:
    """`partner_stats` of a finished run, kept in ``partner_stats.json`` beside its checkpoints
    so the aggregation reads it instead of loading the large unfused checkpoint every time."""
    path = run_dir / "partner_stats.json"
    if path.is_file():
        return json.loads(path.read_text())
    stats = partner_stats(run_dir)
    write_json(path, stats)
    return stats


def partner_stats(run_dir: Path) -> dict[str, float]:
    """How much the partners of a run learned, read from its trained, unfused ``last.pt``
    (:func:`bpl.diversity.partner_statistics`): ``partner_norm_ratio`` (BN-folded partner
    over block kernel norm), ``partner_kernel_cos`` (raw kernels, what the paper's loss
    pushes towards -1) and ``partner_functional_cos`` (BN-folded kernels)."""
    model, _ = load_model(run_dir / "last.pt")
    from bpl.diversity import partner_statistics  # here: old-bpl children import this file

    stats = partner_statistics(model)
    if not stats:
        raise BPLError(f"{run_dir / 'last.pt'} has no partner blocks")
    return {"partner_norm_ratio": stats["norm_ratio"], "partner_kernel_cos": stats["raw_cos"],
            "partner_functional_cos": stats["functional_cos"]}


def check_same_protocol(run_dir: Path, cfg) -> None:
    """Refuse to mix a run made with other settings (its config.json) into a study."""
    saved_path = run_dir / "config.json"
    if not saved_path.exists():
        return
    from bpl.config import unused_options  # here: old-bpl children import this file

    saved = json.loads(saved_path.read_text())
    new = cfg.to_dict()
    unused = unused_options(cfg)  # options the run's strategy never read
    diff = sorted(k for k in new if k not in NOT_PROTOCOL | unused and k in saved
                  and saved[k] != new[k])
    if diff:
        detail = ", ".join(f"{k}: {saved[k]!r} -> {new[k]!r}" for k in diff[:5])
        raise BPLError(f"{run_dir} was run with other settings ({detail}); pass another output "
                       "folder or delete that run directory")


@contextmanager
def console_logging(quiet: bool = False) -> Iterator[None]:
    """Log records (bpl's epoch lines included) to stderr with a time stamp while inside;
    warnings only when ``quiet``. The root logger is put back as it was afterwards."""
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    console.setLevel(logging.WARNING if quiet else logging.INFO)
    root = logging.getLogger()
    old_level = root.level
    root.setLevel(logging.INFO)
    root.addHandler(console)
    try:
        yield
    finally:
        root.removeHandler(console)
        root.setLevel(old_level)


def time_sgd_step(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, terms: list,
                  steps: int) -> float:
    """Median seconds of one SGD step (forward, loss terms, backward, update) of ``model``
    on the batch ``x``; the first step warms up and is not counted."""
    import contextlib
    import time

    from bpl.engine import Step

    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    model.train()
    times = []
    for i in range(steps + 1):
        t0 = time.perf_counter()
        logits = model(x)
        loss = torch.nn.functional.cross_entropy(logits, y)
        for term in terms:
            loss = loss + term(Step(model, x, y, logits, contextlib.nullcontext))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if i:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def split_counts(dataset: str, data_root: str | Path | None, seed: int,
                 train_ratio: float | None, val_ratio: float, train_subset: float | None
                 ) -> dict[str, int]:
    """Image counts of one seed's split of a registered dataset (scans the folder; decodes
    nothing). The bundled digits need no folder."""
    from bpl.data import draw_split

    split = draw_split(dataset, data_root, seed=seed, train_ratio=train_ratio,
                       val_ratio=val_ratio, train_subset=train_subset)
    return {"classes": len(split["classes"]), "train": len(split["train"]),
            "val": len(split["val"]), "test": len(split["test"])}
