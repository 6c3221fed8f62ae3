"""The main jobs, as Python functions, one module per job: train a baseline
(:mod:`.train`), compress it (:mod:`.compression`), evaluate, profile and export a finished
model (:mod:`.deploy`), the demo (:mod:`.demo`); :mod:`.rundir` makes and guards the run
directory each writes, and :mod:`.fitting` trains inside it. The CLI is a thin layer over these.
"""

from ..config import run_dir_of
from .compression import compress
from .demo import demo
from .deploy import evaluate_checkpoint, export_checkpoint, profile_checkpoints
from .fitting import load_data
from .rundir import LOCK_FILE, prepare_run_dir
from .train import train_baseline

__all__ = [
    "LOCK_FILE",
    "compress",
    "demo",
    "evaluate_checkpoint",
    "export_checkpoint",
    "load_data",
    "prepare_run_dir",
    "profile_checkpoints",
    "run_dir_of",
    "train_baseline",
]
