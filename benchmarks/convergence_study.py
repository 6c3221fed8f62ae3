"""Recovery that converges (issue 26): how long to train, and how to fine-tune after pruning.

For every dataset and seed the study trains the baselines its config names (the recovery
study's 40-epoch cosine, ``--epochs auto`` under a few plateau rules, a long fixed cosine),
prunes one of them (``prune_from``) to ``flops_reduction`` fewer MACs, and fine-tunes the
pruned model with each recovery recipe at equal epochs (``bpl compress --recipe ...``).
Every run is a real ``bpl train`` / ``bpl compress`` command, so the study measures what a
user gets. Choices are read from the validation split; the test split is evaluated once per
run, at its end, and reported beside it.

    python benchmarks/convergence_study.py --config benchmarks/configs/convergence_cpu.yaml
    python benchmarks/convergence_study.py --config ... --jobs 12    # runs at a time (a GPU host)
    python benchmarks/convergence_study.py --config ... --jobs 2 --threads fill  # 2 cores: a lone
                                             # baseline gets both, its recoveries one each
    python benchmarks/convergence_study.py --config ... --report     # aggregate what finished
    python benchmarks/convergence_study.py --config ... --size       # hours left, before starting
    python benchmarks/convergence_study.py --config ... --step-tests # each kept step's test top-1
    python benchmarks/convergence_study.py --config ... --import F   # records written elsewhere
    python benchmarks/convergence_study.py --config ... --pack       # the data as lossless PNGs
                                                                     # at the decode size, to carry

Run directories go to ``out``; one small record per finished run to ``results/records``
(``--records FILE`` also appends each to one JSON-lines file), and ``--report`` writes
``summary.md``, ``results.json`` and ``results.csv`` there. Re-running skips recorded runs,
resumes cut-off ones (``--resume``) and starts over a run cut off before its first epoch.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from bpl.files import atomic_write_text
from common import ci95, machine, saved_partner_stats, split_counts, time_sgd_step, write_csv

REPO = Path(__file__).resolve().parents[1]

DEFAULTS: dict[str, Any] = {
    "out": "runs/convergence",
    "results": "benchmarks/results/convergence",
    "arch": "resnet18",
    # name -> bpl flags of that data (data, data_root, image_size, train_subset), and
    # pack_from: where --pack reads the images it writes to data_root; seeds: the study's
    # seeds that this dataset runs (default all)
    "datasets": {},
    "seeds": [0, 1, 2, 3, 4],
    # torch threads of each run, or "fill": the --jobs cores go to the runs that can start,
    # so a run that starts alone (a seed's baseline, which its recoveries wait for) gets all
    "threads": 1,
    "common": {},  # bpl flags of every run
    "baselines": {},  # name -> bpl train flags
    "prune_from": None,  # the baseline every recovery starts from
    "flops_reduction": 0.9,
    "recoveries": {},  # name -> bpl compress flags
    # name -> the seeds a recovery runs on, where not every seed (an arm added late, or one
    # that a pooled study records on the other seeds)
    "seeds_of": {},
    # name -> {"options": bpl compress flags, "why": ...}: an arm the study stopped running
    # (a pilot ruled it out); not run any more, but its records stay in the report, marked
    "dropped": {},
    # name -> bpl train flags of a control: the unpruned prune_from baseline trained on
    # (--weights its best.pt) with a recovery's recipe, so a recovery's gain can be split
    # into pruning and more training; "unpruned-<recovery>" pairs with that recovery
    "controls": {},
    # what the paired differences are against; "of" (optional) pairs a recovery with its
    # own plain arm instead of "recovery" (a regime's partnered arms with its plain one)
    "reference": {"baseline": None, "recovery": None},
    # name -> a record of another study that is this study's run by another name (same
    # protocol, seed and split), e.g. the recovery study's 40-epoch baselines:
    # benchmarks/results/recovery/records/{dataset}__seed{seed}__baseline.json
    "imported": {},
    # the issue's goals for a recovery, checked in the report: test top-1 at most
    # `mean_drop` points below its own baseline on average, the 95% interval's lower end
    # above -`lower_end`, at no more than `compute` times the epochs of `compute_of`;
    # `pooled`: records folders of studies that ran the same arms from baselines trained
    # again, each record against its own baseline (None: no goals section)
    "goals": None,
    # issue 26's goal for a --max-drop arm, checked in the report under its seed-by-seed
    # table: {arm, test_drop, seeds, of, beyond: {dataset: MACs reduction to beat on
    # average}, pooled: [records folders of studies that ran the same arm from a baseline
    # trained again]} (None: no such line)
    "max_drop_goal": None,
    # the rule that picks bpl compress's defaults, fixed before the last seeds ran
    # (docs/results.md), applied to the validation columns by the report (None: no section):
    #   recipe: {cosine arm: [rival arms at its epochs]}: a rival replaces cosine if it beats
    #     it beyond the 95% interval on every dataset;
    #   length: {shorter, default, longer}: longer if it beats default beyond the interval on a
    #     dataset; shorter only if neither default nor longer beats it on any;
    #   iterative: {one_shot, stepped}: stepped if it beats one_shot on every dataset;
    #   partners: {primary, secondary, arms: {arm: its plain arm}}: a partner arm becomes
    #     the default if it beats its plain arm beyond the interval on primary and is not
    #     below it beyond the interval on secondary (issue 27's rule);
    #   min_seeds: paired seeds for a final verdict (min_seeds_of: {arm: n} lowers it for an
    #     arm that runs on fewer seeds); below it the section says "provisional". Every
    #     clause is optional.
    "decision": None,
    # the report's heading, and what its recoveries are (the line under the heading)
    "title": "Recovery that converges (issue 26)",
    "about": "plain fine-tuning",
}


def load_settings(path: str | Path) -> dict[str, Any]:
    raw = yaml.safe_load(Path(path).read_text()) or {}
    unknown = sorted(set(raw) - set(DEFAULTS))
    if unknown:
        raise SystemExit(f"unknown keys in {path}: {', '.join(unknown)}")
    strays = sorted(set(raw.get("seeds_of") or {}) - set(raw.get("recoveries") or {}))
    if strays:
        raise SystemExit(f"{path}: seeds_of names {strays[0]}, which is not a recovery")
    for name, arm in (raw.get("dropped") or {}).items():
        if not isinstance(arm, dict) or set(arm) != {"options", "why"}:
            raise SystemExit(f"{path}: dropped arm {name} needs exactly `options` (its bpl "
                             "compress flags, as it ran) and `why` (the reason it stopped)")
    return {**DEFAULTS, **raw, "threads": threads_setting(raw.get("threads", DEFAULTS["threads"]),
                                                         f"{path}: threads")}


def threads_setting(value: Any, name: str) -> int | str:
    """``value`` as the study's threads setting: a number of at least 1, or "fill"."""
    if value == "fill":
        return value
    try:
        threads = int(value)
    except (TypeError, ValueError):
        threads = 0
    if threads < 1 or isinstance(value, float | bool):
        raise SystemExit(f"{name} must be a number of at least 1 or 'fill', got {value}")
    return threads


def _in_repo(path: str) -> Path:
    p = Path(path)
    return p if p.is_absolute() else REPO / p


def flags(options: dict[str, Any]) -> list[str]:
    """``{"epochs": 40, "nesterov": True, "partners": False}`` -> bpl command-line flags."""
    out: list[str] = []
    for key, value in options.items():
        name = "--" + key.replace("_", "-")
        if value is True:
            out.append(name)
        elif value is False:
            out.append("--no-" + key.replace("_", "-"))
        elif value is None:
            continue
        elif isinstance(value, list | tuple):
            out += [name, *map(str, value)]
        else:
            out += [name, str(value)]
    return out


@dataclass
class Job:
    dataset: str
    seed: int
    name: str
    command: str  # train or compress
    options: dict[str, Any]
    after: str | None = None  # the baseline job this one starts from
    proc: subprocess.Popen | None = field(default=None, repr=False)
    started: float = 0.0
    threads: int = 0  # the torch threads it was started with (0: not started here)

    @property
    def key(self) -> str:
        return f"{self.dataset}-seed{self.seed}-{self.name}"


def _data_flags(data: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in data.items() if k not in ("pack_from", "seeds")}


def _runs_seed(settings: dict[str, Any], data: dict[str, Any], seed: int) -> bool:
    """Whether a dataset runs ``seed``: a dataset's own ``seeds`` narrows the study's."""
    return seed in settings["seeds"] and seed in data.get("seeds", settings["seeds"])


def _train_flags(options: dict[str, Any]) -> dict[str, Any]:
    """``options`` less what only `bpl compress` takes (``common`` holds both kinds)."""
    from bpl.config import COMPRESS_ONLY

    return {k: v for k, v in options.items() if k not in COMPRESS_ONLY}


def plan(settings: dict[str, Any]) -> list[Job]:
    """Every run of the study, baselines first, seed by seed."""
    names = [*settings["recoveries"], *settings["baselines"], *settings["imported"],
             *settings["controls"], *settings["dropped"]]
    same = sorted({n for n in names if names.count(n) > 1})
    if same:  # one run directory and one record per name: a recovery would meet a baseline's
        raise SystemExit(f"two runs of the config (baselines, recoveries, controls, imported "
                         f"or dropped) share the name {', '.join(same)}: rename one of them")
    jobs = []
    for seed in settings["seeds"]:
        for dataset, data in settings["datasets"].items():
            if not _runs_seed(settings, data, seed):
                continue
            base = {"arch": settings["arch"], **_data_flags(data), **settings["common"],
                    "seed": seed}
            for name, opts in settings["baselines"].items():
                jobs.append(Job(dataset, seed, name, "train", _train_flags({**base, **opts})))
    for seed in settings["seeds"]:
        for dataset, data in settings["datasets"].items():
            if not _runs_seed(settings, data, seed):
                continue
            base = {**_data_flags(data), **settings["common"], "seed": seed,
                    "flops_reduction": settings["flops_reduction"]}
            for name, opts in settings["recoveries"].items():
                if seed not in settings["seeds_of"].get(name, [seed]):
                    continue
                jobs.append(Job(dataset, seed, name, "compress", {**base, **opts},
                                after=settings["prune_from"]))
            for name, opts in settings["controls"].items():
                jobs.append(Job(dataset, seed, name, "train",
                                _train_flags({"arch": settings["arch"], **base, **opts}),
                                after=settings["prune_from"]))
    # seed by seed (a study cut short still pairs whole seeds): the baseline the recoveries
    # start from, then the recoveries as they become ready, then the other baselines
    rank = {"train": 2, "compress": 1}
    return sorted(jobs, key=lambda j: (j.seed, 0 if j.command == "train" and j.name == settings[
        "prune_from"] else 1 if j.after else rank[j.command]))


def run_dir(settings: dict[str, Any], job: Job) -> Path:
    return _in_repo(settings["out"]) / job.dataset / f"seed{job.seed}" / job.name


def record_path(settings: dict[str, Any], job: Job) -> Path:
    return _in_repo(settings["results"]) / "records" / f"{job.key}.json"


def make_record(settings: dict[str, Any], job: Job) -> dict[str, Any]:
    """The few numbers of a finished run that the report needs, from its metrics.json, and
    what its partners learned (a one-shot compress run with partners)."""
    folder = run_dir(settings, job)
    metrics = json.loads((folder / "metrics.json").read_text())
    rec = {**record_of(metrics, job.dataset, job.seed, job.name), "options": job.options,
           "threads": _threads_of(settings, job), "machine": machine(),
           "device": _device_name(job.options.get("device", "auto"))}
    if with_partners(job):
        rec.update(saved_partner_stats(folder))
    problem = baseline_mismatch(settings, job, rec)
    if problem:
        raise MixedUp(problem)
    return rec


class MixedUp(SystemExit):
    """A finished run that did not score the baseline its study gave it: not recorded."""


def baseline_mismatch(settings: dict[str, Any], job: Job, rec: dict[str, Any]) -> str | None:
    """Why a recovery's record cannot be of its study's baseline, or None: the run scored
    its baseline on test differently from the study's record of that baseline (a baseline
    trained again after its folder was lost, on this or another machine), or from the
    baseline's own run (a mixed-up checkpoint, or a trained model reported as the baseline,
    as ``--soft --no-partners`` did until 2026-12-07). The second is checked where
    ``best.pt``, which recoveries start from, is the kept model."""
    if job.command != "compress" or not job.after or rec.get("baseline_test_top1") is None:
        return None
    recorded = record_path(settings, Job(job.dataset, job.seed, job.after, "train", {}))
    if recorded.exists():  # the study's record of the baseline, which the report pairs it with
        test = json.loads(recorded.read_text())["test_top1"]
        if test is not None and abs(test - rec["baseline_test_top1"]) > 1e-6:
            return (f"{run_dir(settings, job)} scored its baseline {rec['baseline_test_top1']:.2f}"
                    f" on test, but the study's record of that baseline ({recorded}) says "
                    f"{test:.2f}: its run folder holds another training of it (retrained, or "
                    "another machine's); delete the run to rerun it from the recorded baseline")
    base = start_weights(settings, job).parent  # the baseline's run folder
    if not (base / "metrics.json").exists():
        return None
    metrics = json.loads((base / "metrics.json").read_text())
    if "val_top1" not in (metrics.get("selected") or {}):  # it kept the last epoch, not best.pt
        return None
    if abs(metrics["final"]["top1"] - rec["baseline_test_top1"]) <= 1e-6:
        return None
    return (f"{run_dir(settings, job)} scored its baseline {rec['baseline_test_top1']:.2f} on "
            f"test, but the baseline's run {base} scored {metrics['final']['top1']:.2f}: it did "
            "not start from (or did not score) that baseline; delete the run to rerun it")


def with_partners(job: Job) -> bool:
    """Whether ``job`` is a one-shot ``bpl compress`` run that trains with partners (its
    default), so its ``last.pt`` holds them unfused. A stepwise run keeps one per step."""
    return (job.command == "compress" and job.options.get("partners", True) is not False
            and job.options.get("max_drop") is None and (job.options.get("prune_steps") or 1) == 1)


def record_of(metrics: dict[str, Any], dataset: str, seed: int, name: str) -> dict[str, Any]:
    """A run's record from its metrics.json: what it kept, scored and cost."""
    kept = metrics.get("selected") or {}
    history = metrics["history"]
    rec = {
        "dataset": dataset, "seed": seed, "name": name, "command": metrics["command"],
        "epochs_trained": metrics.get("epochs_trained", len(history)),
        "stopped": metrics.get("stopped"),
        "kept_epoch": kept.get("epoch"),
        "val_top1": kept.get("val_top1"),
        "test_top1": metrics["final"]["top1"],
        "wall_time_s": metrics.get("wall_time_s"),
        "precision": metrics.get("precision"),
        "lr": [row["lr"] for row in history],
        "val_curve": [row.get("val_top1") for row in history],
    }
    if metrics["command"] == "compress":
        rec.update(baseline_val_top1=(metrics.get("baseline") or {}).get("val_top1"),
                   baseline_test_top1=(metrics.get("baseline") or {}).get("top1"),
                   macs_reduction=metrics.get("macs_reduction"))
    rec.update(compute(metrics))
    return rec


def no_step_within(settings: dict[str, Any], job: Job) -> dict[str, Any] | None:
    """The record of a --max-drop run whose first step already missed the budget (bpl exits
    1 and keeps the steps): no model is within it, so the user keeps the baseline (0% of
    the MACs removed, its own top-1). None if the run failed for another reason."""
    out = run_dir(settings, job)
    steps = [json.loads(p.read_text()) for p in sorted(out.glob("steps/*/step.json"))]
    if (out / "metrics.json").exists() or not steps or any(st["within"] for st in steps):
        return None
    return {"dataset": job.dataset, "seed": job.seed, "name": job.name, "command": job.command,
            "no_step_within": True, "epochs_trained": 0, "stopped": "no step within the budget",
            "kept_epoch": None, "val_top1": None, "test_top1": None, "macs_reduction": 0.0,
            "wall_time_s": None,
            "baseline_val_top1": None, "baseline_test_top1": None, "steps": steps,
            "epochs_all": sum(st.get("epochs_trained", 0) for st in steps),
            "train_time_s": sum(st.get("train_time_s", 0.0) for st in steps),
            "options": job.options, "threads": _threads_of(settings, job), "machine": machine(),
            "device": _device_name(job.options.get("device", "auto"))}


def compute(metrics: dict[str, Any]) -> dict[str, Any]:
    """What a run cost: epochs and seconds of training over every step it took (a stepwise
    run's steps beyond the kept one included), whatever sessions it was resumed across."""
    steps = (metrics.get("budget") or {}).get("steps")
    if steps:
        return {"epochs_all": sum(st.get("epochs_trained", 0) for st in steps),
                "train_time_s": sum(st.get("train_time_s", 0.0) for st in steps)}
    history = metrics.get("history") or []
    return {"epochs_all": len(history),
            "train_time_s": sum(row.get("epoch_time_s", 0.0) for row in history)}


def _device_name(device: str) -> str:
    """The accelerator a run of ``--device device`` ran on (runs do not record it)."""
    import torch

    if device != "cpu" and torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return machine()["cpu"]


def _threads_of(settings: dict[str, Any], job: Job) -> int | None:
    """The torch threads ``job`` ran with: as started here, else the config's (None under
    "fill" for a run this process did not start)."""
    return job.threads or (settings["threads"] if settings["threads"] != "fill" else None)


def fill_threads(cores: int, running: Sequence[Job], ready: int) -> int:
    """Threads for the next of ``ready`` runs that can start now under ``--threads fill``:
    the cores the running ones leave, shared among the ready ones (0: wait)."""
    free = cores - sum(j.threads for j in running)
    return 0 if free < 1 else max(1, free // max(1, ready))


def _run_env(settings: dict[str, Any], threads: int | None = None) -> dict[str, str]:
    """The environment of a bpl command the study runs: its threads, this checkout's bpl."""
    return {**os.environ, "OMP_NUM_THREADS": str(threads or settings["threads"]),
            "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}


def start_weights(settings: dict[str, Any], job: Job) -> Path:
    """The checkpoint a recovery or control starts from: its baseline run's best.pt."""
    return run_dir(settings, Job(job.dataset, job.seed, job.after, "train", {})) / "best.pt"


def _start(settings: dict[str, Any], job: Job, python: str, threads: int | None = None) -> None:
    out = run_dir(settings, job)
    args = [python, "-m", "bpl", job.command, *flags(job.options), "--quiet", "--out", str(out)]
    if job.after:
        args += ["--weights" if job.command == "train" else "--baseline",
                 str(start_weights(settings, job))]
    if (out / "last.pt").exists() or any(out.glob("steps/*/last.pt")):  # --max-drop's steps
        args.append("--resume")
    elif out.exists():  # cut off before its first epoch: nothing to keep
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    job.threads = threads or int(settings["threads"])
    env = _run_env(settings, job.threads)
    log = open(out.parent / f"{job.name}.log", "a")  # noqa: SIM115 (closed with the process)
    job.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    job.proc.log = log  # type: ignore[attr-defined]
    job.started = time.time()


def finished_record(settings: dict[str, Any], job: Job) -> dict[str, Any] | None:
    """The record of ``job`` if its run directory holds a finished run (another study's with
    the same name and options, or one whose record was lost), else None. A finished run
    whose config disagrees with the job's options is refused, never mixed in."""
    folder = run_dir(settings, job)
    if not (folder / "metrics.json").exists():
        return None
    config = json.loads((folder / "config.json").read_text())
    for key, value in job.options.items():
        if key in config and config[key] != value:
            raise SystemExit(f"{folder} holds a finished run with {key}={config[key]!r}, but "
                             f"this study's {job.name} asks {value!r}: rename the run in the "
                             "config or give the study its own out folder")
    return make_record(settings, job)


def _base_key(job: Job) -> str:
    return f"{job.dataset}-seed{job.seed}-{job.after}"


def execute(settings: dict[str, Any], *, jobs: int, records: Path | None,
            deadline: float | None, python: str = sys.executable) -> int:
    """Run every unrecorded job, ``jobs`` at a time (under ``threads: fill``, on ``jobs``
    cores shared among the runs that can start), each recovery after its baseline."""
    todo = [j for j in plan(settings) if not record_path(settings, j).exists()]
    done = {j.key for j in plan(settings)} - {j.key for j in todo}
    failed: set[str] = set()
    lost: set[str] = set()
    running: list[Job] = []
    t0 = time.time()
    fill = settings["threads"] == "fill"
    print(f"{len(todo)} runs to do, {len(done)} recorded", flush=True)
    with _stopping_children(running):
        while todo or running:
            for job in running[:]:
                if job.proc.poll() is None:
                    continue
                running.remove(job)
                job.proc.log.close()  # type: ignore[attr-defined]
                took = time.time() - job.started
                rec = None
                if job.proc.returncode == 0:
                    try:
                        rec = make_record(settings, job)
                    except MixedUp as problem:
                        print(f"{time.time() - t0:6.0f}s NOT RECORDED: {problem}", flush=True)
                elif job.options.get("max_drop") is not None:
                    rec = no_step_within(settings, job)  # an outcome of the search, not a failure
                if rec is not None:
                    atomic_write_text(record_path(settings, job), json.dumps(rec, indent=1) + "\n")
                    if records is not None:
                        with open(records, "a") as f:
                            f.write(json.dumps(rec) + "\n")
                    done.add(job.key)
                    test = "-" if rec["test_top1"] is None else f"{rec['test_top1']:.2f}"
                    print(f"{time.time() - t0:6.0f}s done {job.key}: {rec['epochs_trained']} epochs, "
                          f"val {rec['val_top1']}, test {test} ({took:.0f}s)", flush=True)
                else:
                    failed.add(job.key)
                    print(f"{time.time() - t0:6.0f}s FAILED {job.key} (rc {job.proc.returncode}); "
                          f"see {run_dir(settings, job).parent / (job.name + '.log')}", flush=True)
            late = deadline is not None and time.time() - t0 > deadline
            ready = sum(1 for j in todo if not j.after or _base_key(j) in done)
            for job in todo[:]:
                base = _base_key(job) if job.after else None
                if base in failed:
                    todo.remove(job)
                    failed.add(job.key)
                    continue
                rec = finished_record(settings, job)
                if rec is not None:  # finished already (shared out folder): recorded, not rerun
                    todo.remove(job)
                    atomic_write_text(record_path(settings, job), json.dumps(rec, indent=1) + "\n")
                    done.add(job.key)
                    print(f"{time.time() - t0:6.0f}s recorded {job.key}, finished earlier", flush=True)
                    continue
                threads = fill_threads(jobs, running, ready) if fill else None
                if (fill and not threads) or (not fill and len(running) >= jobs) or late or (
                        base and base not in done):
                    continue
                if base and not start_weights(settings, job).exists():
                    todo.remove(job)  # recorded in an earlier checkout whose run folders are gone
                    lost.add(job.key)
                    print(f"{time.time() - t0:6.0f}s not started {job.key}: its baseline is recorded "
                          f"but {start_weights(settings, job)} is gone; delete "
                          f"{record_path(settings, Job(job.dataset, job.seed, job.after, 'train', {}))}"
                          " to train it again", flush=True)
                    continue
                todo.remove(job)
                _start(settings, job, python, threads)
                running.append(job)
                ready -= 1
            if late and not running:
                break
            time.sleep(0.5)
    print(f"finished in {time.time() - t0:.0f}s: {len(done)} recorded, {len(failed)} failed, "
          f"{len(todo) + len(lost)} not started", flush=True)
    return 1 if failed else 0


@contextlib.contextmanager
def _stopping_children(running: list[Job]) -> Iterator[None]:
    """Stop the bpl runs still going when the study stops (SIGTERM, Ctrl-C, an error): each
    gets SIGTERM, which bpl ends as Ctrl-C (its last.pt kept, its lock freed), so the next
    study resumes them instead of finding their folders held by orphans."""
    def stop(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    main = threading.current_thread() is threading.main_thread()  # only it takes signals
    previous = signal.signal(signal.SIGTERM, stop) if main else None
    try:
        yield
    finally:
        if main:
            signal.signal(signal.SIGTERM, previous)
        alive = [j for j in running if j.proc is not None and j.proc.poll() is None]
        for job in alive:
            job.proc.terminate()
        for job in alive:
            try:
                job.proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                job.proc.kill()
                job.proc.wait()
            print(f"stopped {job.key} (its run resumes next time)", flush=True)


# ---------------------------------------------------------------------------- sizing


def job_phases(settings: dict[str, Any], job: Job) -> list[tuple[float | None, str | None]]:
    """What each phase of ``job`` trains: (MACs cut of the model or None for the full one,
    partner kind or None). One phase, or one per cut of ``--prune-steps`` and ``--max-drop``
    (every rung of the ladder: the most it can cost)."""
    import bpl

    opts = job.options
    if job.command == "train":
        return [(None, None)]
    kind = opts.get("partner", "same") if opts.get("partners", True) else None
    if opts.get("soft"):
        return [(None, kind)]  # soft pruning trains the full width with its partners
    if opts.get("max_drop") is not None:
        return [(level, kind) for level in bpl.LEVELS]
    cut = float(opts.get("flops_reduction") or settings["flops_reduction"])
    steps = int(opts.get("prune_steps", 1))
    return [(level, kind) for level in (bpl.step_levels(cut, steps) if steps > 1 else [cut])]


def job_epochs(settings: dict[str, Any], job: Job, records: list[dict[str, Any]]
               ) -> tuple[float, bool]:
    """Epochs per phase of ``job`` and whether that is an assumption: the number asked, the
    mean of the finished runs of the same name (``--epochs auto``), or, with none, the least
    the rule trains (two cycles; a plateau run's two patience-long decays and its end)."""
    opts = job.options
    if opts.get("epochs", 10) != "auto":
        return float(opts.get("epochs", 10)), False
    done = [r["epochs_all"] / len(job_phases(settings, job))
            for r in records if r["name"] == job.name and r.get("epochs_all")]
    if done:
        return statistics.fmean(done), False
    if opts.get("schedule", "cycles") == "cycles":
        return 2.0 * float(opts.get("cycle_epochs", 40)), True
    return 3.0 * float(opts.get("patience", 10)), True


def ran(settings: dict[str, Any], job: Job) -> int:
    """Epochs a cut-off run has already trained (its log.csv rows, every step's)."""
    out = run_dir(settings, job)
    logs = [out / "log.csv", *sorted(out.glob("steps/*/log.csv"))]
    return sum(max(0, len(p.read_text().splitlines()) - 1) for p in logs if p.exists())


def size(settings: dict[str, Any], jobs: int, steps: int = 3) -> dict[str, Any]:
    """Estimate what the runs not yet recorded cost, before starting them.

    Each run's seconds per epoch come from timed SGD steps of the model it trains (pruned,
    extended with its partner kind, or full width for the soft recipe), times its steps
    per epoch plus a third of a step per validation batch; they are scaled, per dataset, by
    the median ratio of recorded runs' real seconds per epoch to the same estimate, so the
    machine's speed, data loading and the study's own concurrency are in the estimate
    (without records the scale is 1: one run alone). Epochs: :func:`job_epochs`."""
    import torch

    import bpl
    from bpl.models import build_model

    records = load_records(settings)
    done = {(r["dataset"], r["seed"], r["name"]) for r in records}
    for job in plan(settings):  # finished in a shared run folder: the runner records it as is
        rec = None if (job.dataset, job.seed, job.name) in done else finished_record(settings, job)
        if rec is not None:
            records.append(rec)
            done.add((job.dataset, job.seed, job.name))
    batch = int(settings["common"].get("batch_size", 64))
    round_to = settings["common"].get("round_to", 8)
    out: dict[str, Any] = {"jobs": jobs, "machine": machine(), "datasets": {}}
    for dataset, data in settings["datasets"].items():
        root = _in_repo(data["data_root"]) if data.get("data_root") else None
        counts = split_counts(data["data"], root, 0,
                              settings["common"].get("train_ratio"),
                              float(settings["common"].get("val_ratio", 0.1)),
                              data.get("train_subset"))
        side = int(data["image_size"])
        x = torch.randn(batch, 3, side, side)
        y = torch.randint(0, counts["classes"], (batch,))
        full = build_model(settings["arch"], counts["classes"])
        step_s: dict[tuple[float | None, str | None], float] = {}

        def epoch_s(phase, _full=full, _x=x, _y=y, _step_s=step_s, _counts=counts):
            if phase not in _step_s:
                cut, kind = phase
                model = (_full if cut is None else
                         bpl.prune(_full, _x[:1], flops_reduction=cut, round_to=round_to))
                if kind is not None:
                    model = bpl.extend(model, partner=kind)
                _step_s[phase] = time_sgd_step(model, _x, _y, [], steps)
            one = _step_s[phase]
            return one * math.ceil(_counts["train"] / batch) + one / 3 * math.ceil(
                _counts["val"] / batch)

        mine = [j for j in plan(settings) if j.dataset == dataset]
        ratios = []
        for rec in records:
            job = next((j for j in mine if (j.seed, j.name) == (rec["seed"], rec["name"])
                        and rec["dataset"] == dataset), None)
            if job is None or not rec.get("epochs_all") or not rec.get("train_time_s"):
                continue
            phases = job_phases(settings, job)
            if len(phases) == 1:
                ratios.append(rec["train_time_s"] / rec["epochs_all"] / epoch_s(phases[0]))
        scale = statistics.median(ratios) if ratios else 1.0
        rows: dict[str, dict[str, Any]] = {}
        for job in mine:
            if (dataset, job.seed, job.name) in done:
                continue
            epochs, assumed = job_epochs(settings, job, records)
            phases = job_phases(settings, job)
            left = epochs * len(phases) - ran(settings, job)
            if job.options.get("epochs", 10) == "auto":  # past the estimate: one more cycle
                left = max(left, float(job.options.get("cycle_epochs", 40)) / 2)
            seconds = statistics.fmean(epoch_s(ph) for ph in phases) * scale * max(left, 0.0)
            row = rows.setdefault(job.name, {"runs": 0, "epochs": epochs, "assumed": assumed,
                                             "seconds": 0.0})
            row["runs"] += 1
            row["seconds"] += seconds
        out["datasets"][dataset] = {"counts": counts, "scale": scale, "calibrated_on": len(ratios),
                                    "step_s": {f"{c}/{k}": v for (c, k), v in step_s.items()},
                                    "runs": rows,
                                    "seconds": sum(r["seconds"] for r in rows.values())}
    out["seconds"] = sum(d["seconds"] for d in out["datasets"].values())
    out["wall_s"] = out["seconds"] / max(1, jobs)
    return out


def size_markdown(sized: dict[str, Any]) -> str:
    lines = ["| dataset | run | runs left | epochs each | hours |", "|---|---|---:|---:|---:|"]
    for dataset, d in sized["datasets"].items():
        for name, r in d["runs"].items():
            epochs = f"{r['epochs']:.0f}" + (" (at least)" if r["assumed"] else "")
            lines.append(f"| {dataset} | {name} | {r['runs']} | {epochs} | "
                         f"{r['seconds'] / 3600:.2f} |")
    lines.append("")
    for dataset, d in sized["datasets"].items():
        lines.append(f"- {dataset}: {d['seconds'] / 3600:.1f} h of runs; scale {d['scale']:.2f} "
                     f"from {d['calibrated_on']} recorded runs")
    lines.append(f"- all: {sized['seconds'] / 3600:.1f} h of runs, about "
                 f"{sized['wall_s'] / 3600:.1f} h at {sized['jobs']} at a time")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------- report


def load_records(settings: dict[str, Any]) -> list[dict[str, Any]]:
    folder = _in_repo(settings["results"]) / "records"
    records = [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))]
    for name, template in settings["imported"].items():
        for seed in settings["seeds"]:
            for dataset in settings["datasets"]:
                path = _in_repo(template.format(dataset=dataset, seed=seed))
                if path.exists():
                    source = template.format(dataset=dataset, seed=seed)
                    records.append(imported_record(json.loads(path.read_text()), dataset, seed,
                                                   name, source))
    return records


def imported_record(raw: dict[str, Any], dataset: str, seed: int, name: str, source: str
                    ) -> dict[str, Any]:
    """A ``bpl train`` run recorded by another study as a record of this one: the recovery
    study's records hold the run's whole metrics.json, this study's are records already."""
    own = record_of(raw["metrics"], dataset, seed, name) if "metrics" in raw else {
        **raw, "dataset": dataset, "seed": seed, "name": name}
    return {**own, "imported_from": source,
            "device": f"recorded by {source.split('/records/')[0]}"}


def _paired(records: list[dict[str, Any]], name: str, ref: str, key: str) -> list[float]:
    by = {(r["dataset"], r["seed"], r["name"]): r.get(key) for r in records}
    return [v - by[(d, s, ref)] for (d, s, n), v in by.items()
            if n == name and by.get((d, s, ref)) is not None and v is not None]


def _cell(st: dict[str, Any]) -> str:
    if st["mean"] is None:
        return "-"
    half = f" ± {st['ci95']:.2f}" if st.get("ci95") is not None else ""
    return f"{st['mean']:+.2f}{half} (n={st['n']})"


def _num(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _mean(values: Sequence[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.fmean(vals) if vals else None


def _total_epochs(options: dict[str, Any]) -> int | None:
    """The epochs a recovery trains in all, when that is fixed (not --epochs auto or
    --max-drop): --epochs, times --prune-steps."""
    epochs = options.get("epochs", 10)
    if epochs == "auto" or options.get("max_drop") is not None:
        return None
    return int(epochs) * int(options.get("prune_steps", 1))


def _cosine_at_equal_epochs(settings: dict[str, Any], name: str) -> str | None:
    """The one-shot plain cosine recovery (pruned first, from the baseline's weights) that
    trains as many epochs in all as ``name`` to the same cut (so 4 cuts of 10 epochs pair
    with cosine for 40), or None."""
    recoveries = settings["recoveries"]
    if name not in recoveries:  # a baseline
        return None
    total = _total_epochs(recoveries[name])
    if total is None or other_cut(settings, recoveries[name]):
        return None
    return next((n for n, o in recoveries.items()
                 if n != name and o.get("recipe") == "cosine" and o.get("partners") is False
                 and not o.get("soft") and not o.get("from_scratch")
                 and int(o.get("prune_steps", 1)) == 1 and _total_epochs(o) == total
                 and not other_cut(settings, o)), None)


def other_cut(settings: dict[str, Any], options: dict[str, Any]) -> bool:
    """Whether a recovery prunes to its own ``flops_reduction``, not the study's: it is on
    the accuracy-vs-MACs curve, not paired with the study's recoveries or its goals."""
    return ("flops_reduction" in options and options["flops_reduction"] is not None
            and options["flops_reduction"] != settings["flops_reduction"])


#: What a partner learned, as :func:`common.partner_stats` reads it from a run's last.pt.
PARTNER_STATS = ("partner_norm_ratio", "partner_kernel_cos", "partner_functional_cos")


def every_arm(settings: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Name -> options of every recovery the report shows: those run and those dropped."""
    return {**settings["recoveries"],
            **{n: d["options"] for n, d in settings["dropped"].items()}}


def summarize(settings: dict[str, Any], records: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for dataset in settings["datasets"]:
        rows = [r for r in records if r["dataset"] == dataset]
        table = {}
        baselines = [*settings["imported"], *settings["baselines"], *settings["controls"]]
        arms = every_arm(settings)
        for kind, names in (("train", baselines), ("compress", arms)):
            for name in names:
                ref = settings["reference"]["baseline" if kind == "train" else "recovery"]
                ref = (settings["reference"].get("of") or {}).get(name, ref)
                if kind == "compress" and other_cut(settings, arms[name]):
                    ref = None  # another cut: its own baseline is its only reference
                mine = [r for r in rows if r["name"] == name]
                if not mine:
                    continue
                epochs = [r["epochs_trained"] for r in mine]
                entry = {
                    "kind": kind, "runs": len(mine),
                    "epochs_mean": statistics.fmean(epochs), "epochs_min": min(epochs),
                    "epochs_max": max(epochs),
                    "val_top1": _mean([r["val_top1"] for r in mine]),
                    "test_top1": _mean([r["test_top1"] for r in mine]),
                    "no_step_within": sum(bool(r.get("no_step_within")) for r in mine),
                    "wall_time_s": _mean([r.get("wall_time_s") for r in mine]),
                    "epochs_all": _mean([r.get("epochs_all") for r in mine]),
                    "train_time_s": _mean([r.get("train_time_s") for r in mine]),
                    "ref": ref,
                    "dropped": (settings["dropped"].get(name) or {}).get("why"),
                    **{key: _mean([r.get(key) for r in mine]) for key in PARTNER_STATS},
                    "val_vs_ref": ci95(_paired(rows, name, ref, "val_top1")) if ref else None,
                    "test_vs_ref": ci95(_paired(rows, name, ref, "test_top1")) if ref else None,
                }
                control = f"unpruned-{name}"
                if kind == "compress" and control in settings["controls"]:
                    entry["control"] = control
                    entry["val_vs_control"] = ci95(_paired(rows, name, control, "val_top1"))
                    entry["test_vs_control"] = ci95(_paired(rows, name, control, "test_top1"))
                same = _cosine_at_equal_epochs(settings, name)
                if kind == "compress" and same in names and same not in (name, ref):
                    entry["equal"] = same
                    entry["val_vs_equal"] = ci95(_paired(rows, name, same, "val_top1"))
                    entry["test_vs_equal"] = ci95(_paired(rows, name, same, "test_top1"))
                if kind == "compress":
                    ref_base = settings["reference"]["baseline"]
                    base = {r["seed"]: r for r in rows if r["name"] == ref_base}
                    entry["test_vs_ref_baseline"] = ci95([
                        r["test_top1"] - base[r["seed"]]["test_top1"] for r in mine
                        if r["seed"] in base and r["test_top1"] is not None])
                    entry["ref_baseline"] = ref_base
                    entry["macs_reduction"] = _mean([r.get("macs_reduction") for r in mine])
                    entry["macs_reduction_per_seed"] = {r["seed"]: r.get("macs_reduction")
                                                        for r in mine}
                    entry["test_drop"] = ci95([r["test_top1"] - r["baseline_test_top1"]
                                               for r in mine if r.get("baseline_test_top1")
                                               and r["test_top1"] is not None])
                    entry["val_drop"] = ci95([r["val_top1"] - r["baseline_val_top1"] for r in mine
                                              if r.get("baseline_val_top1") is not None
                                              and r["val_top1"] is not None])
                table[name] = entry
        out[dataset] = table
    return out


def markdown(settings: dict[str, Any], summary: dict[str, Any], records: list[dict[str, Any]],
             verdict: dict[str, Any] | None = None) -> str:
    devices = sorted({str(r.get("device", "?")) for r in records})
    lines = [f"# {settings['title']}", "",
             f"{settings['arch']}; seeds {settings['seeds']}; recoveries prune the "
             f"`{settings['prune_from']}` baseline to {100 * settings['flops_reduction']:.0f}% "
             f"fewer MACs ({settings['about']}). Paired differences (same seed, split and pruned "
             f"model) with 95% t-intervals; choices rest on the validation columns. "
             f"Ran on: {', '.join(devices)}.", ""]
    for dataset, table in summary.items():
        lines += [f"## {dataset}", "",
                  "| run | kind | runs | epochs (mean, min-max) | MACs removed (%) | val top-1 | "
                  "test top-1 | val vs ref | test vs ref | test minus its baseline | "
                  "test minus the reference baseline | epochs, all steps | train s |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for name, e in table.items():
            ref = f" vs {e['ref']}" if e["ref"] and e["ref"] != name else ""
            shown = f"{name} (dropped)" if e.get("dropped") else name
            drop = _cell(e["test_drop"]) if e.get("test_drop") else "-"
            vs_base = (f"{_cell(e['test_vs_ref_baseline'])} vs {e['ref_baseline']}"
                       if e.get("test_vs_ref_baseline") else "-")
            macs = f"{100 * e['macs_reduction']:.1f}" if e.get("macs_reduction") else "-"
            lines.append(
                f"| {shown} | {e['kind']} | {e['runs']} | {e['epochs_mean']:.1f} "
                f"({e['epochs_min']}-{e['epochs_max']}) | {macs} | {_num(e['val_top1'], '.2f')} | "
                f"{_num(e['test_top1'], '.2f')} | {_cell(e['val_vs_ref']) if ref else '-'}{ref} | "
                f"{_cell(e['test_vs_ref']) if ref else '-'} | {drop} | {vs_base} | "
                f"{_num(e['epochs_all'], '.1f')} | {_num(e['train_time_s'], '.0f')} |")
        lines.append("")
        if settings["dropped"]:
            lines += ["Dropped arms (no longer run; their records stay above):", ""]
            for n, d in settings["dropped"].items():
                runs = table[n]["runs"] if n in table else 0
                lines.append(f"- `{n}` ({runs} run{'' if runs == 1 else 's'} recorded): "
                             f"{d['why']}")
            lines.append("")
        every = every_arm(settings)
        budgeted = [n for n, o in every.items() if o.get("max_drop") is not None]
        ref_base = settings["reference"]["baseline"]
        base = {r["seed"]: r for r in records if r["dataset"] == dataset and r["name"] == ref_base}
        for name in budgeted:
            mine = budget_records(settings, records, dataset, name)
            if not mine:
                continue
            shown = f"{name} (dropped)" if name in settings["dropped"] else name
            lines += [f"{shown}, seed by seed:", "",
                      f"| seed | MACs removed (%) | epochs | test top-1 | minus its baseline | "
                      f"minus {ref_base} |", "|---:|---:|---:|---:|---:|---:|"]
            notes = []
            for r in mine:
                other = None if r.get("pooled_from") else base.get(r["seed"])
                seed = f"{r['seed']}{'*' if r.get('pooled_from') else ''}"
                if r.get("no_step_within"):
                    lines.append(f"| {seed} | 0 (no step within the budget: the baseline "
                                 f"stays) | {r['epochs_all']} | - | - | - |")
                    continue
                lines.append(
                    f"| {seed} | {100 * r['macs_reduction']:.1f} | {r['epochs_trained']} | "
                    f"{r['test_top1']:.2f} | {r['test_top1'] - r['baseline_test_top1']:+.2f} | "
                    f"{'-' if other is None else format(r['test_top1'] - other['test_top1'], '+.2f')} |")
            pooled = sorted({r["pooled_from"] for r in mine if r.get("pooled_from")})
            if pooled:
                notes.append(f"\\* from {', '.join(pooled)}: the same arm from a baseline of the "
                             "same flags and split trained again (its run folder was gone), so "
                             f"paired with that baseline only, not with {ref_base}'s record.")
            lines += ["", *notes] if notes else []
            lines.append("")
            goal = settings.get("max_drop_goal")
            if goal and goal["arm"] == name:
                lines += max_drop_goal_lines(goal, dataset, mine)
        for name in every:
            stepped = sorted((r for r in records if r["dataset"] == dataset
                              and r["name"] == name and r.get("step_tests")),
                             key=lambda r: r["seed"])
            if not stepped:
                continue
            lines += [f"{name}, step by step (judged on validation; the test column only "
                      "shows how those judgments held, `--step-tests`):", "",
                      "| seed | step | MACs removed (%) | val top-1 | within | test top-1 "
                      "| test minus its baseline |", "|---:|---:|---:|---:|---|---:|---:|"]
            for r in stepped:
                base_test = r.get("baseline_test_top1")
                for st in r["step_tests"]:
                    drop = "-" if base_test is None else format(st["test_top1"] - base_test, "+.2f")
                    lines.append(f"| {r['seed']} | {st['step']} | "
                                 f"{100 * st['macs_reduction']:.1f} | {st['val_top1']:.2f} | "
                                 f"{'yes' if st['within'] else 'no'} | {st['test_top1']:.2f} | "
                                 f"{drop} |")
            lines.append("")
        controlled = {n: e for n, e in table.items() if e.get("control")}
        if controlled:
            lines += ["Against the unpruned baseline given the same training (its control):",
                      "", "| run | control | val difference | test difference |",
                      "|---|---|---:|---:|"]
            lines += [f"| {n} | {e['control']} | {_cell(e['val_vs_control'])} | "
                      f"{_cell(e['test_vs_control'])} |" for n, e in controlled.items()]
            lines.append("")
        learned = {n: e for n, e in table.items() if e.get("partner_norm_ratio") is not None}
        if learned:
            lines += ["What the partners learned (mean over seeds, read from each run's unfused "
                      "last.pt): the BN-folded partner kernel's norm over the block's, and the "
                      "cosine of raw and of BN-folded kernels (a partner that idles has a norm "
                      "ratio near 0):", "",
                      "| run | norm ratio | raw cosine | functional cosine |", "|---|---:|---:|---:|"]
            lines += [f"| {n} | {e['partner_norm_ratio']:.3f} | "
                      f"{_num(e['partner_kernel_cos'], '+.3f')} | "
                      f"{_num(e['partner_functional_cos'], '+.3f')} |" for n, e in learned.items()]
            lines.append("")
        equal = {n: e for n, e in table.items() if e.get("equal")}
        if equal:
            lines += ["At equal epochs in all, against one-shot plain cosine:", "",
                      "| run | against | val difference | test difference |", "|---|---|---:|---:|"]
            lines += [f"| {n} | {e['equal']} | {_cell(e['val_vs_equal'])} | "
                      f"{_cell(e['test_vs_equal'])} |" for n, e in equal.items()]
            lines.append("")
        if settings.get("goals"):
            lines += goals_markdown(settings, records, dataset)
    if settings.get("decision"):
        lines += decision_markdown(settings, verdict or decide(settings, records))
    return "\n".join(lines) + "\n"


def budget_records(settings: dict[str, Any], records: list[dict[str, Any]], dataset: str,
                   name: str) -> list[dict[str, Any]]:
    """The records of the ``--max-drop`` arm ``name`` on ``dataset``, seed by seed: this
    study's, and those ``max_drop_goal.pooled`` adds from studies that trained its
    baseline again (each paired with its own baseline only; marked ``pooled_from``)."""
    mine = [r for r in records if r["dataset"] == dataset and r["name"] == name]
    goal = settings.get("max_drop_goal") or {}
    return with_pooled(mine, goal.get("pooled") if goal.get("arm") == name else None,
                       dataset, name)


def with_pooled(mine: list[dict[str, Any]], folders: list[str] | None, dataset: str,
                name: str) -> list[dict[str, Any]]:
    """``mine`` (this study's records of arm ``name`` on ``dataset``) and the same arm's
    records in ``folders``, from studies that trained its baseline again: each pairs with
    its own baseline only (marked ``pooled_from``); a seed recorded twice is an error."""
    mine = list(mine)
    for folder in folders or []:
        for path in sorted((_in_repo(folder)).glob(f"{dataset}-seed*-{name}.json")):
            rec = json.loads(path.read_text())
            if rec["name"] != name or rec["dataset"] != dataset:
                continue
            if any(r["seed"] == rec["seed"] for r in mine):
                raise SystemExit(f"{path}: seed {rec['seed']} of {name} on {dataset} is "
                                 "recorded twice (this study and a pooled one); keep one")
            mine.append({**rec, "pooled_from": folder})
    return sorted(mine, key=lambda r: r["seed"])


def max_drop_goal_lines(goal: dict[str, Any], dataset: str, mine: list[dict[str, Any]]
                        ) -> list[str]:
    """Issue 26's goal for ``--max-drop``, on ``mine`` (one record per seed): a test drop of
    at most ``test_drop`` points against the run's own baseline in at least ``seeds`` of
    ``of`` seeds, and a larger MACs reduction on average than ``beyond[dataset]``. A seed
    that kept no step keeps its baseline: no drop, no reduction."""
    diffs = {r["seed"]: (0.0 if r.get("no_step_within")
                         else r["test_top1"] - r["baseline_test_top1"]) for r in mine}
    cuts = {r["seed"]: float(r.get("macs_reduction") or 0.0) for r in mine}
    ok = [s for s, d in diffs.items() if d >= -goal["test_drop"]]
    beyond = (goal.get("beyond") or {}).get(dataset)
    mean_cut = statistics.fmean(cuts.values())
    verdict = (f"not yet: {len(mine)} of {goal['of']} seeds" if len(mine) < goal["of"] else
               "met" if len(ok) >= goal["seeds"] and (beyond is None or mean_cut > beyond)
               else "missed")
    line = (f"Against the goal (a test drop of at most {goal['test_drop']:g} points in at least "
            f"{goal['seeds']} of {goal['of']} seeds"
            + (f", and more than {100 * beyond:.0f}% fewer MACs on average" if beyond else "")
            + f"): {len(ok)} of {len(mine)} seeds within {goal['test_drop']:g} "
            f"(test minus baseline: {', '.join(f'{d:+.2f}' for d in diffs.values())}); "
            f"{100 * mean_cut:.1f}% fewer MACs on average "
            f"({', '.join(f'{100 * c:.1f}' for c in cuts.values())}). **{verdict}**.")
    return [line, ""]


def mac_epochs(record: dict[str, Any]) -> float | None:
    """A recovery's training compute in epochs of the unpruned model: each step's epochs
    times the fraction of the MACs its model kept (training costs about 3x a forward pass
    whatever the model, so ratios of this are ratios of training compute). One cut: its
    epochs x (1 - MACs removed); 4 cuts of 10 epochs cost more than 40 epochs after one
    cut, since the first steps train larger models."""
    steps = record.get("steps") or []
    if steps and all(st.get("epochs_trained") is not None for st in steps):
        return sum(st["epochs_trained"] * (1 - st["macs_reduction"]) for st in steps)
    options = record.get("options") or {}
    stepped = record.get("step_tests") or []
    if stepped and isinstance(options.get("epochs"), int):  # --prune-steps: epochs per step
        return sum(options["epochs"] * (1 - st["macs_reduction"]) for st in stepped)
    if int(options.get("prune_steps", 1)) > 1 or record.get("macs_reduction") is None:
        return None  # a stepwise run without its steps' sizes (run --step-tests)
    return record["epochs_all"] * (1 - record["macs_reduction"])


def goal_rows(settings: dict[str, Any], records: list[dict[str, Any]], dataset: str
              ) -> list[dict[str, Any]]:
    """Each fixed-target recovery against the config's goals on one dataset: its test (and,
    to choose by, validation) top-1 minus its own baseline, and its training compute
    (:func:`mac_epochs`) over ``goals["compute_of"]``'s, paired by seed. Seconds are not
    compared: the runs of one seed shared the cores with other jobs to different degrees."""
    goals = settings["goals"]
    rows = [r for r in records if r["dataset"] == dataset]
    of = {r["seed"]: r for r in rows if r["name"] == goals["compute_of"]}
    out = []
    for name, options in settings["recoveries"].items():
        mine = [r for r in with_pooled([r for r in rows if r["name"] == name],
                                       goals.get("pooled"), dataset, name)
                if r.get("test_top1") is not None and r.get("baseline_test_top1") is not None]
        if not mine or options.get("max_drop") is not None or other_cut(settings, options):
            continue
        test = ci95([r["test_top1"] - r["baseline_test_top1"] for r in mine])
        val = ci95([r["val_top1"] - r["baseline_val_top1"] for r in mine
                    if r.get("val_top1") is not None and r.get("baseline_val_top1") is not None])
        pairs = [(mac_epochs(r), mac_epochs(of[r["seed"]])) for r in mine if r["seed"] in of]
        cost = [mine_ / theirs for mine_, theirs in pairs if mine_ and theirs]
        lower = None if test["ci95"] is None else float(test["mean"] - test["ci95"])
        accuracy = bool(test["mean"] >= -goals["mean_drop"] and lower is not None
                        and lower > -goals["lower_end"])
        ratio = statistics.fmean(cost) if cost else None
        out.append({"name": name, "runs": len(mine), "test": test, "test_lower": lower,
                    "pooled": sum(1 for r in mine if r.get("pooled_from")),
                    "val": val, "compute_ratio": ratio, "accuracy_goal": accuracy,
                    "compute_goal": None if ratio is None else ratio <= goals["compute"]})
    return out


def goals_markdown(settings: dict[str, Any], records: list[dict[str, Any]], dataset: str
                   ) -> list[str]:
    goals = settings["goals"]
    rows = goal_rows(settings, records, dataset)
    if not rows:
        return []
    lines = [f"Against the goals: test top-1 at most {goals['mean_drop']:g} point(s) below "
             f"the run's own baseline on average with the 95% interval's lower end above "
             f"-{goals['lower_end']:g}, at no more than {goals['compute']:g}x the training "
             f"compute of `{goals['compute_of']}` (more only where the extra epochs bought "
             "accuracy). Compute is each step's epochs times the MACs its model kept. "
             "Validation is the column to choose by; test checks the goal once."
             + (" Pooled seeds come from " + ", ".join(goals["pooled"]) + ": the same arm "
                "from a baseline trained again, each against its own baseline."
                if goals.get("pooled") else ""), "",
             "| run | seeds | val minus baseline | test minus baseline | test lower end | "
             "accuracy goal | compute / " + goals["compute_of"] + "'s |",
             "|---|---:|---:|---:|---:|---|---:|"]
    for row in rows:
        met = ("too few seeds" if row["test_lower"] is None
               else "met" if row["accuracy_goal"] else "missed")
        seeds = f"{row['runs']} ({row['pooled']} pooled)" if row.get("pooled") else row["runs"]
        lines.append(
            f"| {row['name']} | {seeds} | {_cell(row['val'])} | {_cell(row['test'])} | "
            f"{_num(row['test_lower'], '+.2f')} | {met} | {_num(row['compute_ratio'], '.1f')} |")
    return [*lines, ""]


def _beyond(st: dict[str, Any]) -> bool:
    """Whether a paired difference is positive beyond its 95% interval."""
    return st["ci95"] is not None and st["mean"] - st["ci95"] > 0


def decide(settings: dict[str, Any], records: list[dict[str, Any]]) -> dict[str, Any]:
    """The config's ``decision`` rule applied to the validation top-1 of ``records``: each
    comparison it names as a paired difference per dataset, and the defaults it picks.
    ``final`` is False while any comparison has fewer paired seeds than the rule needs."""
    rule = settings["decision"]
    datasets = list(settings["datasets"])
    need = dict(rule.get("min_seeds_of") or {})
    comparisons: list[dict[str, Any]] = []

    def compare(clause: str, name: str, ref: str) -> dict[str, Any]:
        per = {d: ci95(_paired([r for r in records if r["dataset"] == d], name, ref, "val_top1"))
               for d in datasets}
        wanted = min(need.get(name, rule["min_seeds"]), need.get(ref, rule["min_seeds"]))
        row = {"clause": clause, "name": name, "ref": ref, "per_dataset": per,
               "beats_on": [d for d in datasets if _beyond(per[d])],
               "enough_seeds": all(per[d]["n"] >= wanted for d in datasets), "min_seeds": wanted}
        comparisons.append(row)
        return row

    verdict: dict[str, Any] = {"comparisons": comparisons}
    if "recipe" in rule:
        recipe_of = {n: o.get("recipe", "cosine") for n, o in settings["recoveries"].items()}
        winners = [row for ref, rivals in rule["recipe"].items() for rival in rivals
                   if len((row := compare("recipe", rival, ref))["beats_on"]) == len(datasets)]
        best = max(winners, key=lambda row: min(st["mean"] for st in row["per_dataset"].values()),
                   default=None)
        verdict["recipe"] = (recipe_of[best["name"]] if best
                             else recipe_of[next(iter(rule["recipe"]))])
    if "length" in rule:
        length = rule["length"]
        longer = compare("length", length["longer"], length["default"])
        over_short = [compare("length", length[arm], length["shorter"])
                      for arm in ("default", "longer")]
        epochs_of = {arm: _total_epochs(settings["recoveries"][length[arm]])
                     for arm in ("shorter", "default", "longer")}
        verdict["epochs"] = (epochs_of["longer"] if longer["beats_on"] else epochs_of["default"]
                             if any(row["beats_on"] for row in over_short)
                             else epochs_of["shorter"])
    if "iterative" in rule:
        it = rule["iterative"]
        stepped = compare("iterative", it["stepped"], it["one_shot"])
        verdict["one_shot"] = len(stepped["beats_on"]) < len(datasets)
    if "partners" in rule:
        spec = rule["partners"]
        primary, secondary = spec["primary"], spec.get("secondary")
        winners, pending = [], []
        for arm, ref in spec["arms"].items():
            row = compare("partners", arm, ref)
            if primary not in row["beats_on"]:
                continue
            other = row["per_dataset"].get(secondary) if secondary else None
            if secondary and (other is None or other["ci95"] is None):
                pending.append(arm)  # ahead on the primary, not yet measured on the other
            elif other is None or other["mean"] + other["ci95"] >= 0:  # not below there
                winners.append(row)
        best = max(winners, key=lambda row: row["per_dataset"][primary]["mean"], default=None)
        verdict["partner"] = best["name"] if best else None
        verdict["partner_pending"] = pending
    verdict["final"] = all(row["enough_seeds"] for row in comparisons)
    return verdict


def decision_markdown(settings: dict[str, Any], verdict: dict[str, Any]) -> list[str]:
    """The report's Decision section for :func:`decide`'s ``verdict``."""
    datasets = list(settings["datasets"])
    state = ("final: every comparison has its seeds" if verdict["final"] else
             "provisional: some comparisons have fewer paired seeds than the rule needs")
    lines = ["## Decision", "",
             "The rule the config states (fixed before the deciding seeds ran; docs/results.md), applied to the "
             f"validation columns ({state}). A difference counts where its 95% interval "
             "excludes zero.", "",
             f"| clause | run | against | {' | '.join(datasets)} | beats it on | seeds needed |",
             f"|---|---|---|{'---:|' * len(datasets)}---|---:|"]
    for row in verdict["comparisons"]:
        cells = " | ".join(_cell(row["per_dataset"][d]) for d in datasets)
        lines.append(f"| {row['clause']} | {row['name']} | {row['ref']} | {cells} | "
                     f"{', '.join(row['beats_on']) or 'none'} | {row['min_seeds']} |")
    said = []
    if "recipe" in verdict:
        said.append(f"`bpl compress` recovers with `--recipe {verdict['recipe']}`")
    if "epochs" in verdict:
        said.append(f"for {verdict['epochs']} epochs")
    if "one_shot" in verdict:
        said.append("one-shot" if verdict["one_shot"] else "in steps (--prune-steps)")
    if "partner" in verdict:
        spec = settings["decision"]["partners"]
        said.append(f"partner default: `{verdict['partner']}`" if verdict["partner"] else
                    "no partner arm beats its plain arm on "
                    f"{spec['primary']} without falling below it on "
                    f"{spec.get('secondary') or 'the other datasets'}: plain (`--no-partners`), "
                    "the cheapest no worse, is the default")
        if verdict["partner_pending"]:
            said.append(f"ahead on {spec['primary']}, not yet measured on "
                        f"{spec['secondary']}: {', '.join(verdict['partner_pending'])}")
    lines += ["", f"So {', '.join(said)}{'' if verdict['final'] else ' (provisional)'}.", ""]
    return lines


def step_tests(settings: dict[str, Any], python: str = sys.executable) -> int:
    """Test top-1 of every step a finished ``--max-drop`` or ``--prune-steps`` run kept
    (``bpl evaluate`` of ``steps/K/deploy.pt`` on the run's split), written into its record
    for the report's step-by-step table. The steps were judged on validation; the test
    split is read here only to show how those judgments held. Returns the runs done."""
    done = 0
    for job in plan(settings):
        path, out = record_path(settings, job), run_dir(settings, job)
        if not path.exists():
            continue
        rec = json.loads(path.read_text())
        if rec.get("step_tests") or not (out / "steps").is_dir():
            continue
        metrics = out / "metrics.json"
        steps = (json.loads(metrics.read_text()).get("budget") or {}).get("steps") if (
            metrics.exists()) else rec.get("steps")
        rows = []
        for st in steps or []:
            ckpt = out / "steps" / str(st["step"]) / "deploy.pt"
            if not ckpt.exists():
                continue
            cache = settings["common"].get("cache_dir")
            args = [python, "-m", "bpl", "evaluate", str(ckpt), "--split", str(out / "split.json"),
                    "--json", "--quiet", *(["--cache-dir", str(cache)] if cache else [])]
            result = subprocess.run(args, capture_output=True, text=True, env=_run_env(settings),
                                    cwd=REPO)
            if result.returncode:
                raise SystemExit(f"bpl evaluate {ckpt} failed: {result.stderr.strip()[-300:]}")
            rows.append({"step": st["step"], "macs_reduction": st["macs_reduction"],
                         "val_top1": st["score"], "within": st["within"],
                         "test_top1": json.loads(result.stdout)["top1"]})
        if rows:
            rec["step_tests"] = rows
            atomic_write_text(path, json.dumps(rec, indent=1) + "\n")
            done += 1
            print(f"{job.key}: {len(rows)} steps evaluated on the test split", flush=True)
    return done


def report(settings: dict[str, Any]) -> Path:
    records = load_records(settings)
    summary = summarize(settings, records)
    folder = _in_repo(settings["results"])
    verdict = decide(settings, records) if settings.get("decision") else None
    atomic_write_text(folder / "results.json", json.dumps(
        {"summary": summary, "decision": verdict, "settings": settings}, indent=1) + "\n")
    keys = ["dataset", "seed", "name", "command", "epochs_trained", "kept_epoch", "val_top1",
            "test_top1", "baseline_val_top1", "baseline_test_top1", "macs_reduction",
            "wall_time_s", "stopped"]
    write_csv(folder / "results.csv", records, keys, extrasaction="ignore")
    return atomic_write_text(folder / "summary.md", markdown(settings, summary, records, verdict))


def pack(settings: dict[str, Any]) -> None:
    """Each dataset's ``pack_from`` images decoded at the size its runs read (the shorter side
    resized once, as bpl's cache does) and written as lossless PNGs to its ``data_root``,
    with the same relative paths: a copy small enough to carry to a machine without
    ../shared, that decodes to the same pixels."""
    from torchvision.io import write_png

    from bpl.data.images import IMAGE_EXTENSIONS, load_resized, resize_size

    for dataset, data in settings["datasets"].items():
        root = _in_repo(data["pack_from"])
        size = resize_size(int(data["image_size"]))
        files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
        for path in files:
            target = _in_repo(data["data_root"]) / path.relative_to(root).with_suffix(".png")
            target.parent.mkdir(parents=True, exist_ok=True)
            write_png(load_resized(path, size), str(target), compression_level=9)
        print(f"{dataset}: {len(files)} images at {size} px in {_in_repo(data['data_root'])}")


def only(settings: dict[str, Any], seeds: Sequence[int] | None,
         datasets: Sequence[str] | None, arms: Sequence[str] | None = None) -> dict[str, Any]:
    """``settings`` restricted to some of its seeds, datasets and recoveries (others are an
    error); the baselines stay, so a recovery still waits for (or finds) its own."""
    for asked, known, what in ((seeds, settings["seeds"], "seed"),
                               (datasets, list(settings["datasets"]), "dataset"),
                               (arms, list(settings["recoveries"]), "recovery")):
        unknown = [a for a in asked or () if a not in known]
        if unknown:
            raise SystemExit(f"{what} {unknown[0]} is not in the config (it has "
                             f"{', '.join(map(str, known))})")
    return {**settings,
            "seeds": [s for s in settings["seeds"] if not seeds or s in seeds],
            "datasets": {k: v for k, v in settings["datasets"].items()
                         if not datasets or k in datasets},
            "recoveries": {k: v for k, v in settings["recoveries"].items()
                           if not arms or k in arms}}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True)
    p.add_argument("--jobs", type=int, default=1, help="runs at a time (default 1)")
    p.add_argument("--records", type=Path, help="also append each record to this JSON-lines file")
    p.add_argument("--deadline", type=float, help="start no run after this many seconds")
    p.add_argument("--report", action="store_true", help="aggregate the recorded runs")
    p.add_argument("--step-tests", action="store_true",
                   help="evaluate every kept step of finished --max-drop / --prune-steps runs "
                        "on the test split, for the report (nothing is chosen from it)")
    p.add_argument("--size", action="store_true",
                   help="estimate the hours of the runs not yet recorded (at --jobs at a time)")
    p.add_argument("--import", dest="import_", type=Path, metavar="FILE",
                   help="record the runs of a --records file written elsewhere (a GPU host)")
    p.add_argument("--refresh", action="store_true",
                   help="re-read every recorded run's metrics.json into its record (new fields)")
    p.add_argument("--pack", action="store_true",
                   help="write each dataset's pack_from images as PNGs to its data_root")
    p.add_argument("--seeds", type=int, nargs="+",
                   help="run (or size) only these of the config's seeds")
    p.add_argument("--datasets", nargs="+", help="run (or size) only these of its datasets")
    p.add_argument("--arms", nargs="+",
                   help="run (or size) only these of its recoveries (their baselines too)")
    p.add_argument("--threads",
                   help="torch threads of each run, over the config's (a run's record keeps "
                        "it), or 'fill': --jobs is then a number of cores, shared among the "
                        "runs that can start (a seed's baseline, which its recoveries wait "
                        "for, gets them all; then one run per core)")
    args = p.parse_args(argv)
    settings = load_settings(args.config)
    if args.threads is not None:  # one job on both cores: a seed's chain fits one session
        settings = {**settings, "threads": threads_setting(args.threads, "--threads")}
    if args.seeds or args.datasets or args.arms:  # a part of the study (a session's share)
        settings = only(settings, args.seeds, args.datasets, args.arms)
    if args.pack:
        pack(settings)
        return 0
    if args.import_:
        for line in args.import_.read_text().splitlines():
            rec = json.loads(line)
            job = Job(rec["dataset"], rec["seed"], rec["name"], rec["command"], rec["options"])
            atomic_write_text(record_path(settings, job), json.dumps(rec, indent=1) + "\n")
        return 0
    if args.refresh:
        for job in plan(settings):
            if record_path(settings, job).exists() and (run_dir(settings, job) /
                                                        "metrics.json").exists():
                old = json.loads(record_path(settings, job).read_text())
                rec = {**old, **make_record(settings, job), "machine": old.get("machine"),
                       "threads": old.get("threads"),
                       "device": old.get("device")}
                atomic_write_text(record_path(settings, job), json.dumps(rec, indent=1) + "\n")
        return 0
    if args.report:
        print(report(settings).read_text())
        return 0
    if args.step_tests:
        step_tests(settings)
        return 0
    if args.size:
        quiet, level = logging.getLogger("bpl"), logging.getLogger("bpl").level
        quiet.setLevel(logging.ERROR)  # not every cut's "closest reachable" note
        try:
            sized = size(settings, args.jobs)
        finally:
            quiet.setLevel(level)
        folder = _in_repo(settings["results"])
        atomic_write_text(folder / "size.json", json.dumps(sized, indent=1) + "\n")
        print(size_markdown(sized), end="")
        return 0
    return execute(settings, jobs=args.jobs, records=args.records, deadline=args.deadline)


if __name__ == "__main__":
    sys.exit(main())
