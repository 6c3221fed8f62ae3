"""Run directories: made for a run, locked while it lasts, removed if it fails before its first epoch.

A run directory holds ``config.json``, ``split.json``, ``last.pt`` (resumable),
``best.pt``, ``log.csv``, ``metrics.json``, ``report.md`` with plots and, for
``compress``, ``deploy.pt`` (the fused, physically smaller model).
"""

from __future__ import annotations

import contextlib
import logging
import shutil
from collections.abc import Iterator
from pathlib import Path

from .. import distributed
from ..config import Config, run_dir_of
from ..errors import BPLError
from ..files import BusyError, exclusive_lock
from ..report import write_json

log = logging.getLogger(__name__)


def has_progress(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds training worth resuming: a last.pt, or a budgeted search's steps."""
    return (run_dir / "last.pt").exists() or any((run_dir / "steps").glob("*/last.pt"))


#: What a run that ended before its first epoch may have left; a new run into its
#: directory starts without them (its split.json would otherwise be reused silently).
_STALE = ("split.json", "log.csv", "after_pruning.json", "metrics.json", "report.md")
#: The lock a run holds on its directory while it runs (see :func:`bpl.files.exclusive_lock`).
LOCK_FILE = ".bpl.lock"


def prepare_run_dir(cfg: Config, command: str) -> Path:
    """Create the run directory and save the resolved config; refuses to clobber a run."""
    run_dir = run_dir_of(cfg, command)
    if has_progress(run_dir) and not cfg.resume:
        raise BPLError(
            f"{run_dir} already holds a run; pass --resume to continue it or --out DIR for a new one"
        )
    if cfg.resume and not has_progress(run_dir):
        raise BPLError(f"--resume: no last.pt in {run_dir}; run without --resume to start")
    run_dir.mkdir(parents=True, exist_ok=True)
    if not cfg.resume:
        for name in _STALE:
            if (run_dir / name).exists():
                log.info("%s: removing %s of an earlier run that ended before its first epoch",
                         run_dir, name)
                (run_dir / name).unlink()
    write_json(run_dir / "config.json", {"command": command, **cfg.to_dict(command)})
    return run_dir


@contextlib.contextmanager
def _locked(run_dir: Path) -> Iterator[None]:
    """Hold the run directory's lock, or refuse: one run at a time writes a directory."""
    try:
        with exclusive_lock(run_dir / LOCK_FILE):
            yield
    except BusyError as busy:
        raise BPLError(f"{run_dir} is in use by another bpl run ({busy.holder}); wait for it "
                       "to end, or pass --out DIR for a new run") from None


@contextlib.contextmanager
def open_run(cfg: Config, command: str) -> Iterator[Path]:
    """A run directory, locked while the run lasts, and removed again (with any parent
    folder made for it) if the run fails before its first epoch ends.

    Under torchrun rank 0 prepares it (and loads the data first, see :func:`load_data`).
    """
    main = distributed.current().is_main
    run_dir = run_dir_of(cfg, command)
    made = [p for p in (run_dir, *run_dir.parents) if not p.exists()]  # innermost first
    with _locked(run_dir) if main else contextlib.nullcontext():
        try:
            with distributed.main_first():
                if main:
                    prepare_run_dir(cfg, command)
            yield run_dir
        except BaseException:
            if main and made and not has_progress(run_dir):
                shutil.rmtree(run_dir, ignore_errors=True)
                for parent in made[1:]:
                    with contextlib.suppress(OSError):  # only if empty: another run may be there
                        parent.rmdir()
            raise
