"""`bpl demo`: train and compress a small model on the bundled digits in about two minutes."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from ..config import Config
from .compression import compress
from .train import train_baseline

log = logging.getLogger(__name__)


#: The demo's settings: small enough for about two minutes on two CPU cores.
DEMO = {
    "data": "digits",
    "image_size": 32,
    "arch": "tiny_resnet",
    "batch_size": 64,
    "lr": 0.1,
    "schedule": "cosine",
    "weight_decay": 5e-4,
    "workers": 0,
    "seed": 0,
}


def demo(out: str | Path = "runs/demo", *, epochs: int | None = None,
         progress: bool = True) -> dict[str, Any]:
    """`bpl demo`: train a small baseline on digits, compress ~70% of its MACs with BPL, verify.

    Re-running with the same ``out`` resumes (or simply re-reports) what is already there.
    """
    out = Path(out)
    base = dict(DEMO, epochs=epochs or 10, out=str(out / "baseline"))
    base["resume"] = (out / "baseline" / "last.pt").exists()
    log.info("demo 1/2: training a %s baseline on digits -> %s", base["arch"], base["out"])
    train_baseline(Config(**base), progress=progress)
    # global pruning: tiny_resnet's narrow stages make a uniform ratio move in coarse steps
    comp = dict(DEMO, epochs=epochs or 10, lr=0.05, out=str(out / "compressed"),
                baseline=str(out / "baseline" / "best.pt"), flops_reduction=0.7,
                global_pruning=True)
    comp["resume"] = (out / "compressed" / "last.pt").exists()
    log.info("demo 2/2: pruning 70%% of the MACs, training with partners, fusing -> %s", comp["out"])
    return compress(Config(**comp), progress=progress)
