"""benchmarks/convergence_study.py end to end on the bundled digits (real bpl commands)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import yaml

from benchmark_scripts import load_benchmark

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "convergence_study.py"


def _load_script():
    return load_benchmark("convergence_study")


def test_flags_spell_options_as_the_command_line_does():
    study = _load_script()
    assert study.flags({"epochs": "auto", "nesterov": True, "partners": False, "round_to": None,
                        "milestones": [0.5, 0.75]}) == [
        "--epochs", "auto", "--nesterov", "--no-partners", "--milestones", "0.5", "0.75"]


def test_study_runs_baselines_then_recoveries_resumes_and_reports(tmp_path, capsys):
    study = _load_script()
    config = tmp_path / "study.yaml"
    config.write_text(yaml.safe_dump({
        "out": str(tmp_path / "runs"),
        "results": str(tmp_path / "results"),
        "arch": "tiny_resnet",
        "datasets": {"digits": {"data": "digits", "image_size": 16}},
        "seeds": [0, 1],
        "common": {"batch_size": 64, "device": "cpu", "latency": False, "amp": False},
        "baselines": {"fixed": {"epochs": 2, "lr": 0.1},
                      "auto": {"epochs": "auto", "schedule": "plateau", "max_epochs": 3,
                               "patience": 1, "lr": 0.1}},
        "prune_from": "auto",
        "flops_reduction": 0.5,
        "recoveries": {"cosine-1": {"recipe": "cosine", "epochs": 1, "partners": False},
                       "rewind-1": {"recipe": "rewind", "epochs": 1, "partners": False}},
        "controls": {"unpruned-cosine-1": {"recipe": "cosine", "epochs": 1}},
        "reference": {"baseline": "fixed", "recovery": "cosine-1"},
    }))
    lines = tmp_path / "records.jsonl"
    assert study.main(["--config", str(config), "--jobs", "2", "--records", str(lines)]) == 0
    records = [json.loads(line) for line in lines.read_text().splitlines()]
    assert len(records) == 10 and len(list((tmp_path / "results" / "records").glob("*.json"))) == 10
    assert {r["threads"] for r in records} == {1}  # each record says how many threads ran it
    by = {(r["seed"], r["name"], r["command"]): r for r in records}
    auto = by[(0, "auto", "train")]
    assert auto["epochs_trained"] <= 3 and auto["stopped"] and len(auto["lr"]) == auto["epochs_trained"]
    rewind = by[(0, "rewind-1", "compress")]
    assert rewind["macs_reduction"] > 0.4 and rewind["baseline_test_top1"] == by[
        (0, "cosine-1", "compress")]["baseline_test_top1"]  # the same baseline, pruned the same
    # every run recorded: a second call starts none
    capsys.readouterr()
    assert study.main(["--config", str(config)]) == 0
    assert "0 runs to do, 10 recorded" in capsys.readouterr().out
    assert study.main(["--config", str(config), "--report"]) == 0
    summary = (tmp_path / "results" / "summary.md").read_text()
    assert "| rewind-1 | compress | 2 |" in summary and "vs cosine-1" in summary
    result = json.loads((tmp_path / "results" / "results.json").read_text())
    assert result["summary"]["digits"]["rewind-1"]["test_vs_ref"]["n"] == 2
    # the control: the unpruned auto baseline trained on from its best.pt, one more epoch
    control = by[(0, "unpruned-cosine-1", "train")]
    saved = json.loads((tmp_path / "runs" / "digits" / "seed0" / "unpruned-cosine-1" /
                        "config.json").read_text())
    assert saved["weights"].endswith("seed0/auto/best.pt") and control["epochs_trained"] == 1
    assert result["summary"]["digits"]["cosine-1"]["test_vs_control"]["n"] == 2
    assert "| cosine-1 | unpruned-cosine-1 |" in summary

    # a run another study recorded (its record holds the run's metrics.json) joins the report
    # as a baseline of this one, by name, paired by dataset and seed
    settings = study.load_settings(config)
    for seed in (0, 1):
        metrics = json.loads((tmp_path / "runs" / "digits" / f"seed{seed}" / "fixed" /
                              "metrics.json").read_text())
        old = tmp_path / "old" / f"digits__seed{seed}.json"
        old.parent.mkdir(exist_ok=True)
        old.write_text(json.dumps({"config": {}, "metrics": metrics}))
    settings["imported"] = {"old": str(tmp_path / "old" / "{dataset}__seed{seed}.json")}
    mine = {(r["seed"], r["name"]): r for r in study.load_records(settings)}
    for seed in (0, 1):
        assert mine[(seed, "old")]["test_top1"] == mine[(seed, "fixed")]["test_top1"]
        assert mine[(seed, "old")]["val_top1"] == mine[(seed, "fixed")]["val_top1"]
    table = study.summarize(settings, study.load_records(settings))["digits"]
    assert table["old"]["runs"] == 2 and table["old"]["kind"] == "train"
    assert table["old"]["test_vs_ref"]["mean"] == 0.0  # the same runs as the reference's

    # --size: nothing left to run; with a third seed, its runs are priced from timed steps
    # scaled by what the recorded runs really took, auto baselines at their recorded epochs
    capsys.readouterr()
    level = logging.getLogger("bpl").level
    assert study.main(["--config", str(config), "--size"]) == 0
    assert logging.getLogger("bpl").level == level  # quietened for --size only, then restored
    assert "all: 0.0 h of runs" in capsys.readouterr().out
    sized = json.loads((tmp_path / "results" / "size.json").read_text())
    assert sized["datasets"]["digits"]["runs"] == {}
    settings["seeds"] = [0, 1, 2]
    more = study.size(settings, jobs=2, steps=1)["datasets"]["digits"]
    assert more["calibrated_on"] >= 4 and more["scale"] > 0
    assert set(more["runs"]) == {"fixed", "auto", "cosine-1", "rewind-1", "unpruned-cosine-1"}
    assert all(r["runs"] == 1 and r["seconds"] > 0 for r in more["runs"].values())
    recorded = [by[(s, "auto", "train")]["epochs_trained"] for s in (0, 1)]
    assert more["runs"]["auto"]["epochs"] == sum(recorded) / 2
    assert not more["runs"]["auto"]["assumed"] and more["runs"]["cosine-1"]["epochs"] == 1
    # the models timed: the full one (baselines, the control) and the 50% cut (recoveries)
    assert set(more["step_s"]) == {"None/None", "0.5/None"}


def test_a_recovery_may_not_share_a_baselines_name(tmp_path):
    """Their runs would share one directory and one record (the recovery meets the train run)."""
    study = _load_script()
    settings = {**study.DEFAULTS, "datasets": {"digits": {"data": "digits"}},
                "baselines": {"auto": {"epochs": "auto"}}, "prune_from": "auto",
                "recoveries": {"auto": {"epochs": "auto"}}}
    with pytest.raises(SystemExit, match="share the name auto"):
        study.plan(settings)


def test_a_cut_off_run_resumes_and_one_that_never_trained_starts_over(tmp_path, monkeypatch):
    study = _load_script()
    started = []

    class Proc:  # stands in for the bpl command
        def __init__(self, args, **kw):
            started.append(args)

    monkeypatch.setattr(study.subprocess, "Popen", Proc)
    settings = {**study.DEFAULTS, "out": str(tmp_path / "runs"), "threads": 1}
    job = study.Job("digits", 0, "maxdrop", "compress", {"max_drop": 1.0})
    out = study.run_dir(settings, job)
    (out / "steps" / "2").mkdir(parents=True)
    (out / "steps" / "2" / "last.pt").write_bytes(b"")  # a --max-drop run cut off in step 2
    study._start(settings, job, "python")
    assert "--resume" in started[-1] and (out / "steps" / "2" / "last.pt").exists()
    (out / "steps" / "2" / "last.pt").unlink()  # cut off before any epoch: begun again
    study._start(settings, job, "python")
    assert "--resume" not in started[-1] and not (out / "steps").exists()


def test_a_finished_run_in_a_shared_folder_is_recorded_not_rerun(tmp_path, monkeypatch):
    """Two studies sharing an out folder share their runs of the same name and options; a
    folder whose run was made with other options is refused, not mixed in."""
    study = _load_script()
    monkeypatch.setattr(study, "make_record", lambda settings, job: {
        "test_top1": json.loads((study.run_dir(settings, job) / "metrics.json").read_text())[
            "final"]["top1"], "options": job.options})
    settings = {**study.DEFAULTS, "out": str(tmp_path / "runs"), "results": str(tmp_path / "r")}
    job = study.Job("digits", 0, "auto-p10", "compress", {"epochs": "auto", "patience": 10})
    assert study.finished_record(settings, job) is None  # nothing there
    out = study.run_dir(settings, job)
    out.mkdir(parents=True)
    (out / "config.json").write_text(json.dumps({"epochs": "auto", "patience": 10}))
    (out / "metrics.json").write_text(json.dumps({"final": {"top1": 80.0}}))
    rec = study.finished_record(settings, job)
    assert rec["test_top1"] == 80.0 and rec["options"] == job.options
    (out / "config.json").write_text(json.dumps({"epochs": "auto", "patience": 5}))
    with pytest.raises(SystemExit, match="patience=5.*asks 10"):
        study.finished_record(settings, job)


def test_a_recovery_whose_recorded_baseline_lost_its_checkpoint_is_skipped(tmp_path, monkeypatch,
                                                                         capsys):
    """A new checkout keeps the records but not runs/: a recovery of a recorded baseline whose
    best.pt is gone is not started (it would fail), and the message says how to retrain it."""
    study = _load_script()
    started = []
    monkeypatch.setattr(study, "_start", lambda settings, job, python: started.append(job.key))
    settings = {**study.DEFAULTS, "out": str(tmp_path / "runs"), "results": str(tmp_path / "r"),
                "arch": "tiny", "datasets": {"digits": {"data": "digits"}}, "seeds": [0],
                "common": {}, "baselines": {"base": {"epochs": 1}}, "imported": {},
                "controls": {}, "prune_from": "base", "flops_reduction": 0.5,
                "recoveries": {"ft": {"epochs": 1}}}
    base = study.Job("digits", 0, "base", "train", {})
    study.record_path(settings, base).parent.mkdir(parents=True)
    study.record_path(settings, base).write_text("{}")
    assert study.execute(settings, jobs=1, records=None, deadline=None) == 0
    out = capsys.readouterr().out
    assert started == [] and "not started digits-seed0-ft" in out and "base.json" in out
    assert "1 not started" in out


def test_compute_counts_every_step_of_a_stepwise_run():
    study = _load_script()
    plain = {"history": [{"epoch_time_s": 2.0}, {"epoch_time_s": 3.0}]}
    assert study.compute(plain) == {"epochs_all": 2, "train_time_s": 5.0}
    steps = {"history": [{"epoch_time_s": 1.0}],  # the kept step's history only
             "budget": {"steps": [{"epochs_trained": 10, "train_time_s": 50.0},
                                  {"epochs_trained": 12, "train_time_s": 40.0},
                                  {"epochs_trained": 9, "train_time_s": 20.0}]}}  # beyond
    assert study.compute(steps) == {"epochs_all": 31, "train_time_s": 110.0}


def test_a_search_with_no_step_within_its_budget_is_recorded_as_such(tmp_path):
    study = _load_script()
    settings = {**study.DEFAULTS, "out": str(tmp_path / "runs")}
    job = study.Job("digits", 0, "maxdrop", "compress", {"max_drop": 1.0, "device": "cpu"})
    out = study.run_dir(settings, job)
    (out / "steps" / "1").mkdir(parents=True)
    step = {"step": 1, "target": 0.5, "macs_reduction": 0.5, "score": 70.0, "within": False,
            "epochs_trained": 10, "train_time_s": 30.0}
    (out / "steps" / "1" / "step.json").write_text(json.dumps(step))
    rec = study.no_step_within(settings, job)
    assert rec["no_step_within"] and rec["macs_reduction"] == 0.0 and rec["test_top1"] is None
    assert rec["epochs_all"] == 10 and rec["train_time_s"] == 30.0
    step["within"] = True  # a step within it and no metrics.json: a failure, not an outcome
    (out / "steps" / "1" / "step.json").write_text(json.dumps(step))
    assert study.no_step_within(settings, job) is None


@pytest.mark.parametrize("name", ["convergence_cpu", "convergence_gpu",
                                  "convergence_cpu_pilot_p5", "partners_cpu", "maxdrop_cpu"])
def test_every_run_of_the_shipped_configs_is_a_valid_bpl_command(name):
    """A typo or an impossible combination in a study config fails here, not hours into it."""
    from bpl.config import resolve_config

    study = _load_script()
    settings = study.load_settings(SCRIPT.parent / "configs" / f"{name}.yaml")
    jobs = study.plan(settings)
    assert jobs
    from bpl.cli import build_parser

    for job in jobs:
        options = {k: v for k, v in job.options.items() if v is not None}
        cfg = resolve_config(overrides=options)
        assert job.command == "train" or (cfg.round_to == 8 and (
            cfg.flops_reduction or cfg.max_drop is not None))
        # the command line the study runs parses (bpl train takes no compress-only flag)
        build_parser().parse_args([job.command, *study.flags(job.options)])


def test_recoveries_pair_with_the_plain_cosine_of_as_many_epochs_in_all():
    """Equal epochs in all: 4 cuts of 10 against cosine-40; --max-drop and auto have none."""
    study = _load_script()
    settings = {"recoveries": {
        "cosine-10": {"recipe": "cosine", "epochs": 10, "partners": False},
        "cosine-40": {"recipe": "cosine", "epochs": 40, "partners": False},
        "rewind-10": {"recipe": "rewind", "epochs": 10, "partners": False},
        "same-40": {"recipe": "cosine", "epochs": 40, "partner": "same"},
        "steps4-10": {"recipe": "cosine", "epochs": 10, "prune_steps": 4, "partners": False},
        "maxdrop1-40": {"max_drop": 1, "recipe": "cosine", "epochs": 40, "partners": False},
        "auto-cycles": {"epochs": "auto", "schedule": "cycles", "partners": False},
        # another cut: on the accuracy-vs-MACs curve, paired with nothing at 90%
        "cut74-40": {"recipe": "cosine", "epochs": 40, "partners": False, "flops_reduction": 0.74},
        "rewind-74": {"recipe": "rewind", "epochs": 40, "partners": False, "flops_reduction": 0.74},
        # other regimes' plain arms are not the one-shot cosine anything pairs with
        "soft-plain": {"soft": True, "recipe": "cosine", "epochs": 40, "partners": False},
        "scratch-40": {"from_scratch": True, "recipe": "cosine", "epochs": 40, "partners": False}},
        "flops_reduction": 0.9}
    pairs = {n: study._cosine_at_equal_epochs(settings, n) for n in settings["recoveries"]}
    assert pairs == {"cosine-10": None, "cosine-40": None, "rewind-10": "cosine-10",
                     "same-40": "cosine-40", "steps4-10": "cosine-40", "maxdrop1-40": None,
                     "auto-cycles": None, "cut74-40": None, "rewind-74": None,
                     "soft-plain": "cosine-40", "scratch-40": "cosine-40"}
    assert study.other_cut(settings, settings["recoveries"]["cut74-40"])
    assert not study.other_cut(settings, {"epochs": 40, "flops_reduction": 0.9})  # the study's


def test_step_tests_score_every_kept_step_on_the_test_split(tmp_path, capsys):
    """--step-tests: each step of a stepwise run is evaluated on test; the last step is the
    run's own model, so its test top-1 is the run's."""
    study = _load_script()
    config = tmp_path / "study.yaml"
    config.write_text(yaml.safe_dump({
        "out": str(tmp_path / "runs"), "results": str(tmp_path / "results"),
        "arch": "tiny_resnet", "datasets": {"digits": {"data": "digits", "image_size": 16}},
        "seeds": [0], "common": {"batch_size": 64, "device": "cpu", "latency": False,
                                 "amp": False},
        "baselines": {"fixed": {"epochs": 1, "lr": 0.1}}, "prune_from": "fixed",
        "flops_reduction": 0.5,
        "recoveries": {"steps2-1": {"recipe": "cosine", "epochs": 1, "prune_steps": 2,
                                    "partners": False}},
        "reference": {"baseline": "fixed", "recovery": "steps2-1"},
    }))
    assert study.main(["--config", str(config), "--jobs", "2"]) == 0
    assert study.main(["--config", str(config), "--step-tests"]) == 0
    rec = json.loads((tmp_path / "results" / "records" / "digits-seed0-steps2-1.json").read_text())
    steps = rec["step_tests"]
    assert [st["step"] for st in steps] == [1, 2]
    assert steps[0]["macs_reduction"] < steps[1]["macs_reduction"]
    assert steps[-1]["test_top1"] == pytest.approx(rec["test_top1"])
    capsys.readouterr()
    assert study.main(["--config", str(config), "--step-tests"]) == 0  # done once
    assert "evaluated" not in capsys.readouterr().out
    assert study.main(["--config", str(config), "--report"]) == 0
    assert "steps2-1, step by step" in (tmp_path / "results" / "summary.md").read_text()


def test_a_session_can_run_part_of_the_study(tmp_path):
    study = _load_script()
    settings = {**study.DEFAULTS, "seeds": [0, 1, 2], "datasets": {"ucm": {}, "eurosat": {}}}
    part = study.only(settings, [2], ["ucm"])
    assert part["seeds"] == [2] and list(part["datasets"]) == ["ucm"]
    assert study.only(settings, None, ["eurosat"])["seeds"] == [0, 1, 2]
    with pytest.raises(SystemExit, match="seed 7 is not in the config"):
        study.only(settings, [7], None)
    with pytest.raises(SystemExit, match="dataset nwpu is not in the config"):
        study.only(settings, None, ["nwpu"])
    arms = {**settings, "recoveries": {"a": {}, "b": {}}}
    assert list(study.only(arms, None, None, ["b"])["recoveries"]) == ["b"]
    with pytest.raises(SystemExit, match="recovery c is not in the config"):
        study.only(arms, None, None, ["c"])
    # a dataset's own seeds narrow the study's (seeds another study runs are left out)
    settings = {**settings, "baselines": {"base": {}}, "prune_from": "base",
                "datasets": {"ucm": {"seeds": [0, 2]}, "eurosat": {}}}
    runs = {(j.dataset, j.seed) for j in study.plan(settings)}
    assert runs == {("ucm", 0), ("ucm", 2), ("eurosat", 0), ("eurosat", 1), ("eurosat", 2)}
    assert all("seeds" not in j.options for j in study.plan(settings))
    assert {j.seed for j in study.plan(study.only(settings, [1], None))} == {1}
    # and a recovery's own seeds narrow them again (the baselines still run on every seed)
    arms = {**settings, "recoveries": {"all": {}, "late": {}}, "seeds_of": {"late": [1, 2]}}
    late = {(j.dataset, j.seed) for j in study.plan(arms) if j.name == "late"}
    assert late == {("ucm", 2), ("eurosat", 1), ("eurosat", 2)}
    assert len([j for j in study.plan(arms) if j.name == "all"]) == 5
    assert len([j for j in study.plan(arms) if j.command == "train"]) == 5
    bad = tmp_path / "bad.yaml"
    bad.write_text("recoveries: {a: {epochs: 1}}\nseeds_of: {b: [0]}\n")
    with pytest.raises(SystemExit, match="seeds_of names b, which is not a recovery"):
        study.load_settings(bad)


def test_threads_override_the_configs_for_every_run_it_starts(tmp_path, monkeypatch):
    study = _load_script()
    config = tmp_path / "study.yaml"
    config.write_text(yaml.safe_dump({"datasets": {"digits": {"data": "digits"}}, "threads": 1}))
    seen = []
    monkeypatch.setattr(study, "execute", lambda settings, **kw: seen.append(settings) or 0)
    assert study.main(["--config", str(config), "--threads", "2"]) == 0
    assert seen[-1]["threads"] == 2 and study._run_env(seen[-1])["OMP_NUM_THREADS"] == "2"
    assert study.main(["--config", str(config)]) == 0 and seen[-1]["threads"] == 1
    with pytest.raises(SystemExit, match="--threads must be a number of at least 1 or 'fill'"):
        study.main(["--config", str(config), "--threads", "0"])
    with pytest.raises(SystemExit, match="got two"):
        study.main(["--config", str(config), "--threads", "two"])
    assert study.main(["--config", str(config), "--threads", "fill"]) == 0
    assert seen[-1]["threads"] == "fill"


def test_fill_gives_a_lone_baseline_every_core_then_one_per_recovery(tmp_path, monkeypatch):
    """``--threads fill``: the baseline, which every recovery waits for, starts alone on all
    the cores; its recoveries then share them one thread each, never more threads than
    cores; each record keeps the threads its run had."""
    study = _load_script()
    started: list[tuple[str, int]] = []
    live: list[tuple[int, list[int]]] = []  # (threads, [polls left]) of the running fakes

    class Proc:  # a bpl command that finishes after two polls
        returncode = 0

        def __init__(self, threads):
            self.polls = [2]
            live.append((threads, self.polls))

        def poll(self):
            self.polls[0] -= 1
            return 0 if self.polls[0] < 0 else None

    class Log:
        def close(self):
            pass

    def start(settings, job, python, threads=None):
        job.threads = threads
        assert sum(t for t, left in live if left[0] >= 0) + threads <= 2  # within the cores
        job.proc = Proc(threads)
        job.proc.log = Log()
        job.started = study.time.time()
        started.append((job.name, threads))
        if job.command == "train":  # the checkpoint its recoveries start from
            study.run_dir(settings, job).mkdir(parents=True)
            (study.run_dir(settings, job) / "best.pt").write_bytes(b"")

    monkeypatch.setattr(study, "_start", start)
    monkeypatch.setattr(study.time, "sleep", lambda s: None)
    monkeypatch.setattr(study, "make_record", lambda settings, job: {
        "test_top1": 1.0, "epochs_trained": 1, "val_top1": 1.0,
        "threads": study._threads_of(settings, job)})
    settings = {**study.DEFAULTS, "out": str(tmp_path / "runs"), "results": str(tmp_path / "r"),
                "arch": "tiny", "datasets": {"digits": {"data": "digits"}}, "seeds": [0],
                "threads": "fill", "baselines": {"base": {"epochs": 1}}, "prune_from": "base",
                "recoveries": {f"ft{i}": {"epochs": 1} for i in range(3)}}
    assert study.execute(settings, jobs=2, records=None, deadline=None) == 0
    assert started[0] == ("base", 2) and sorted(started[1:]) == [("ft0", 1), ("ft1", 1),
                                                                 ("ft2", 2)]
    recorded = {p.stem: json.loads(p.read_text())["threads"]
                for p in (tmp_path / "r" / "records").glob("*.json")}
    assert recorded == {"digits-seed0-base": 2, "digits-seed0-ft0": 1, "digits-seed0-ft1": 1,
                        "digits-seed0-ft2": 2}
    assert study.fill_threads(4, [], 3) == 1 and study.fill_threads(4, [], 1) == 4
    assert study.fill_threads(2, [study.Job("d", 0, "a", "train", {}, threads=2)], 5) == 0


def test_goals_pair_each_recovery_with_its_baseline_and_count_compute_in_mac_epochs():
    study = _load_script()
    settings = {**study.DEFAULTS, "datasets": {"d": {}},
                "recoveries": {"c10": {"epochs": 10}, "c40": {"epochs": 40},
                               "s4": {"epochs": 10, "prune_steps": 4},
                               "md": {"epochs": 40, "max_drop": 1.0},
                               "cut74": {"epochs": 40, "flops_reduction": 0.74}},
                "goals": {"mean_drop": 1.0, "lower_end": 2.0, "compute": 3.0,
                          "compute_of": "c10"}}

    def rec(name, seed, test, **extra):
        return {"dataset": "d", "seed": seed, "name": name, "test_top1": test,
                "val_top1": test, "baseline_test_top1": 90.0, "baseline_val_top1": 90.0,
                "macs_reduction": 0.9, "options": settings["recoveries"][name],
                "epochs_all": settings["recoveries"][name]["epochs"], **extra}

    steps = [{"macs_reduction": m} for m in (0.5, 0.7, 0.8, 0.9)]
    records = [*(rec("c10", s, 86.0 + s) for s in range(3)),
               *(rec("c40", s, t) for s, t in enumerate((89.5, 90.0, 90.5))),
               *(rec("s4", s, 89.0, step_tests=steps, epochs_all=40) for s in range(3)),
               rec("md", 0, 89.0), rec("cut74", 0, 90.0)]
    assert study.mac_epochs(records[0]) == pytest.approx(1.0)  # 10 epochs at a tenth
    # 4 cuts of 10 epochs: 10 x (0.5 + 0.3 + 0.2 + 0.1) = 11 unpruned epochs, 11x c10's
    assert study.mac_epochs(records[6]) == pytest.approx(11.0)
    assert study.mac_epochs({**records[6], "step_tests": None}) is None  # sizes unknown
    rows = {r["name"]: r for r in study.goal_rows(settings, records, "d")}
    # a budgeted run has no fixed cut to judge, and another cut is not the goals' 90%
    assert set(rows) == {"c10", "c40", "s4"}
    c40 = rows["c40"]
    assert c40["test"]["mean"] == pytest.approx(0.0) and c40["accuracy_goal"]
    assert c40["test_lower"] == pytest.approx(-c40["test"]["ci95"])
    assert c40["compute_ratio"] == pytest.approx(4.0) and c40["compute_goal"] is False
    assert not rows["c10"]["accuracy_goal"] and rows["c10"]["compute_goal"]  # -3 on average
    assert rows["s4"]["compute_ratio"] == pytest.approx(11.0)
    # a mean within a point but an interval reaching below -2 misses the goal
    wide = [rec("c40", s, t) for s, t in enumerate((86.0, 90.0, 92.0))]
    assert study.goal_rows(settings, [*records[:3], *wide], "d")[1]["accuracy_goal"] is False
    md = "\n".join(study.goals_markdown(settings, records, "d"))
    assert "| c40 | 3 |" in md and "| met | 4.0 |" in md


def test_the_goals_pool_seeds_whose_baselines_were_trained_again(tmp_path):
    """The default's goal counts a pooled study's seeds of the same arm, each against its
    own baseline; compute pairs only seeds that have both arms; a seed twice is an error."""
    study = _load_script()
    pooled = tmp_path / "records"
    pooled.mkdir()
    settings = {**study.DEFAULTS, "datasets": {"d": {}},
                "recoveries": {"c10": {"epochs": 10}, "c30": {"epochs": 30}},
                "goals": {"mean_drop": 1.0, "lower_end": 2.0, "compute": 3.0,
                          "compute_of": "c10", "pooled": [str(pooled)]}}

    def rec(name, seed, test, baseline=90.0):
        return {"dataset": "d", "seed": seed, "name": name, "test_top1": test,
                "val_top1": test, "baseline_test_top1": baseline, "baseline_val_top1": baseline,
                "macs_reduction": 0.9, "options": settings["recoveries"][name],
                "epochs_all": settings["recoveries"][name]["epochs"]}

    records = [rec("c10", s, 87.0) for s in (2, 3, 4)] + [rec("c30", s, 89.0) for s in (2, 3, 4)]
    for seed, test, baseline in ((0, 85.0, 86.0), (1, 91.0, 92.0)):  # its own baseline
        (pooled / f"d-seed{seed}-c30.json").write_text(json.dumps(rec("c30", seed, test, baseline)))
    rows = {r["name"]: r for r in study.goal_rows(settings, records, "d")}
    assert rows["c30"]["runs"] == 5 and rows["c30"]["test"]["mean"] == pytest.approx(-1.0)
    assert rows["c30"]["compute_ratio"] == pytest.approx(3.0) and rows["c10"]["runs"] == 3
    md = "\n".join(study.goals_markdown(settings, records, "d"))
    assert "| c30 | 5 (2 pooled) |" in md and "| c10 | 3 |" in md and str(pooled) in md
    (pooled / "d-seed3-c30.json").write_text(json.dumps(rec("c30", 3, 80.0)))
    with pytest.raises(SystemExit, match="seed 3 of c30 on d is recorded twice"):
        study.goal_rows(settings, records, "d")


def test_a_regimes_arms_pair_with_its_own_plain_arm():
    study = _load_script()
    settings = {**study.DEFAULTS, "datasets": {"d": {}}, "baselines": {"base": {}},
                "recoveries": {n: {"epochs": 40} for n in ("plain", "same", "scratch-plain",
                                                            "scratch-same")},
                "reference": {"baseline": "base", "recovery": "plain",
                              "of": {"scratch-same": "scratch-plain"}}}
    records = [{"dataset": "d", "seed": s, "name": n, "val_top1": v + s, "test_top1": v + s,
                "epochs_trained": 40}
               for s in range(2) for n, v in (("base", 90), ("plain", 88), ("same", 89),
                                              ("scratch-plain", 85), ("scratch-same", 87))]
    table = study.summarize(settings, records)["d"]
    assert table["same"]["ref"] == "plain" and table["same"]["val_vs_ref"]["mean"] == 1.0
    assert table["scratch-same"]["ref"] == "scratch-plain"
    assert table["scratch-same"]["val_vs_ref"]["mean"] == 2.0
    assert table["scratch-plain"]["ref"] == "plain"


def test_a_dropped_arm_is_not_run_but_its_records_stay_in_the_report(tmp_path):
    """A pilot may rule an arm out (the issue: "drop the arms ... saying so"): it leaves the
    plan, and the report still shows what it scored, marked, with the reason."""
    study = _load_script()
    config = tmp_path / "study.yaml"
    config.write_text(yaml.safe_dump({
        "datasets": {"d": {}}, "seeds": [0, 1], "baselines": {"base": {}},
        "prune_from": "base", "recoveries": {"plain": {"epochs": 40}},
        "dropped": {"costly": {"options": {"epochs": 40, "partner": "diverse"},
                               "why": "5x plain's step, no validation lead"}},
        "reference": {"baseline": "base", "recovery": "plain"}}))
    settings = study.load_settings(config)
    assert {j.name for j in study.plan(settings)} == {"base", "plain"}
    records = [{"dataset": "d", "seed": s, "name": n, "val_top1": v + s, "test_top1": v,
                "epochs_trained": 40}
               for s in range(2) for n, v in (("base", 90), ("plain", 88), ("costly", 87))]
    summary = study.summarize(settings, records)
    entry = summary["d"]["costly"]
    assert entry["dropped"] == "5x plain's step, no validation lead"
    assert entry["runs"] == 2 and entry["val_vs_ref"]["mean"] == -1.0
    text = study.markdown({**settings, "title": "t", "about": "a"}, summary, records)
    assert "| costly (dropped) |" in text
    assert "- `costly` (2 runs recorded): 5x plain's step, no validation lead" in text
    config.write_text(yaml.safe_dump({"dropped": {"costly": {"epochs": 40}}}))
    with pytest.raises(SystemExit, match="dropped arm costly needs exactly `options`"):
        study.load_settings(config)


def test_the_decision_rule_picks_defaults_from_validation_only():
    study = _load_script()
    recoveries = {n: {"recipe": r, "epochs": e} for n, r, e in (
        ("c10", "cosine", 10), ("c30", "cosine", 30), ("c40", "cosine", 40),
        ("r10", "rewind", 10), ("o40", "onecycle", 40))}
    recoveries["s4"] = {"recipe": "cosine", "epochs": 10, "prune_steps": 4}
    settings = {**study.DEFAULTS, "datasets": {"a": {}, "b": {}}, "recoveries": recoveries,
                "decision": {"recipe": {"c10": ["r10"], "c40": ["o40"]},
                             "length": {"shorter": "c10", "default": "c30", "longer": "c40"},
                             "iterative": {"one_shot": "c40", "stepped": "s4"},
                             "min_seeds": 3, "min_seeds_of": {"c30": 2}}}

    def runs(name, vals, test=50.0, datasets=("a", "b")):
        return [{"dataset": d, "seed": s, "name": name, "val_top1": v, "test_top1": test}
                for d in datasets for s, v in enumerate(vals)]

    base = [*runs("c10", (80, 81, 82)), *runs("c40", (85, 85, 86)),
            *runs("r10", (80, 82, 81)), *runs("s4", (84, 86, 85))]
    # c30 ties c40 and beats c10: 30 epochs; one-shot; cosine; final at 3 (c30: 2) seeds
    tied = [*base, *runs("c30", (85, 86, 85)), *runs("o40", (85, 86, 86))]
    verdict = study.decide(settings, tied)
    assert (verdict["recipe"], verdict["epochs"], verdict["one_shot"], verdict["final"]) == (
        "cosine", 30, True, True)
    # a test split that says otherwise changes nothing: the rule reads validation only
    assert study.decide(settings, [{**r, "test_top1": 99.0 if r["name"] == "o40" else 1.0}
                                   for r in tied]) == verdict
    # c40 beyond c30 on one dataset: 40 epochs; a rival beyond cosine on both: its recipe
    longer = [*base, *runs("c30", (83, 83, 84), datasets=("a",)), *runs("c30", (85, 86, 85),
              datasets=("b",)), *runs("o40", (88, 88, 90))]
    verdict = study.decide(settings, longer)
    assert verdict["epochs"] == 40 and verdict["recipe"] == "onecycle"
    # ahead on one dataset only: cosine stays, and the steps must win on both datasets
    one = [*base, *runs("c30", (85, 86, 85)), *runs("o40", (88, 88, 90), datasets=("a",)),
           *runs("o40", (85, 85, 86), datasets=("b",))]
    one = [r for r in one if r["name"] != "s4"] + runs("s4", (90, 90, 91), datasets=("a",)) + (
        runs("s4", (84, 86, 85), datasets=("b",)))
    verdict = study.decide(settings, one)
    assert verdict["recipe"] == "cosine" and verdict["one_shot"]
    # neither longer arm beats 10 epochs: 10 stays; two seeds are not final
    flat = [r for r in tied if r["seed"] < 2 and r["name"] not in ("c30", "c40")]
    flat += runs("c30", (80, 81)) + runs("c40", (80, 81))
    verdict = study.decide(settings, flat)
    assert verdict["epochs"] == 10 and not verdict["final"]
    md = "\n".join(study.decision_markdown(settings, study.decide(settings, flat)))
    assert "(provisional)" in md and "| length | c40 | c30 |" in md


def test_a_partner_becomes_the_default_only_ahead_on_one_dataset_and_not_behind_on_the_other():
    study = _load_script()
    recoveries = {n: {"epochs": 40} for n in ("plain", "same", "asym")}
    settings = {**study.DEFAULTS, "datasets": {"eurosat": {}, "ucm": {}}, "recoveries": recoveries,
                "decision": {"partners": {"primary": "eurosat", "secondary": "ucm",
                                          "arms": {"same": "plain", "asym": "plain"}},
                             "min_seeds": 3}}

    def runs(name, vals, dataset):
        return [{"dataset": dataset, "seed": s, "name": name, "val_top1": v, "test_top1": 0.0}
                for s, v in enumerate(vals)]

    plain = runs("plain", (80, 81, 82), "eurosat") + runs("plain", (80, 81, 82), "ucm")
    ahead = runs("same", (82, 83, 85), "eurosat")  # +2, +2, +3: beyond the interval
    # ahead on EuroSAT, level on UC Merced: the default; asym level everywhere: not
    level = runs("same", (80, 82, 81), "ucm") + runs("asym", (80, 81, 82), "eurosat") + runs(
        "asym", (80, 81, 82), "ucm")
    verdict = study.decide(settings, plain + ahead + level)
    assert verdict["partner"] == "same" and verdict["final"] and "recipe" not in verdict
    # ahead on EuroSAT but below beyond the interval on UC Merced: plain stays
    behind = runs("same", (77, 78, 80), "ucm") + runs("asym", (80, 81, 82), "eurosat")
    verdict = study.decide(settings, plain + ahead + behind)
    assert verdict["partner"] is None and verdict["partner_pending"] == []
    md = "\n".join(study.decision_markdown(settings, study.decide(settings, plain + ahead + behind)))
    assert "plain (`--no-partners`), the cheapest no worse, is the default" in md
    # not yet run on UC Merced: pending, not a default
    verdict = study.decide(settings, plain + ahead)
    assert verdict["partner"] is None and verdict["partner_pending"] == ["same"]
    assert not verdict["final"]


def test_a_partnered_recovery_records_what_its_partners_learned(tmp_path, capsys):
    """Issue 27's study reads partner norm and cosines from each run's unfused last.pt; the
    report carries the config's own title."""
    from bpl.diversity import partner_statistics
    from bpl.models import load_model

    study = _load_script()
    config = tmp_path / "study.yaml"
    config.write_text(yaml.safe_dump({
        "title": "Partners at convergence (issue 27)", "about": "plain and with partners",
        "out": str(tmp_path / "runs"), "results": str(tmp_path / "results"),
        "arch": "tiny_resnet", "datasets": {"digits": {"data": "digits", "image_size": 16}},
        "seeds": [0], "common": {"batch_size": 64, "device": "cpu", "latency": False},
        "baselines": {"base": {"epochs": 1, "lr": 0.1}}, "prune_from": "base",
        "flops_reduction": 0.5,
        "recoveries": {"plain-1": {"epochs": 1, "partners": False},
                       "same-1": {"epochs": 1, "partner": "same", "init": "paper"}},
        "reference": {"baseline": "base", "recovery": "plain-1"},
    }))
    assert study.main(["--config", str(config)]) == 0
    records = {r["name"]: r for r in study.load_records(study.load_settings(config))}
    run = tmp_path / "runs" / "digits" / "seed0" / "same-1"
    stats = partner_statistics(load_model(run / "last.pt")[0])
    assert records["same-1"]["partner_norm_ratio"] == stats["norm_ratio"] > 0
    assert records["same-1"]["partner_functional_cos"] == stats["functional_cos"]
    assert records["same-1"]["partner_kernel_cos"] == stats["raw_cos"]
    assert "partner_norm_ratio" not in records["plain-1"]  # no partners, nothing to read
    assert (run / "partner_stats.json").is_file()  # read once, kept beside the checkpoints
    capsys.readouterr()
    assert study.main(["--config", str(config), "--report"]) == 0
    summary = (tmp_path / "results" / "summary.md").read_text()
    assert summary.startswith("# Partners at convergence (issue 27)")
    assert "fewer MACs (plain and with partners)" in summary
    assert f"| same-1 | {stats['norm_ratio']:.3f} | {stats['raw_cos']:+.3f} |" in summary
    assert "| plain-1 |" not in summary.split("What the partners learned")[1]


def test_with_partners_is_one_shot_compress_with_partners_on():
    study = _load_script()
    job = lambda command, **o: study.Job("d", 0, "x", command, o)  # noqa: E731
    assert study.with_partners(job("compress", epochs=40))  # bpl compress's default: partners
    assert study.with_partners(job("compress", partner="diverse", prune_steps=1))
    assert not study.with_partners(job("compress", partners=False))
    assert not study.with_partners(job("compress", max_drop=1.0))
    assert not study.with_partners(job("compress", prune_steps=4))
    assert not study.with_partners(job("train", epochs=40))


def test_a_run_that_scored_another_baseline_is_refused_not_recorded(tmp_path):
    """A recovery must score, as its baseline, what the baseline's own run scored on test:
    ``--soft --no-partners`` once reported its trained model as the baseline, and such a
    record would have read as no drop at all."""
    study = _load_script()
    settings = {**study.DEFAULTS, "out": str(tmp_path / "runs"), "results": str(tmp_path / "r")}
    base = study.run_dir(settings, study.Job("digits", 0, "base", "train", {}))
    base.mkdir(parents=True)
    base_metrics = {"selected": {"epoch": 3, "of": 5, "val_top1": 90.0}, "final": {"top1": 80.0}}
    (base / "metrics.json").write_text(json.dumps(base_metrics))
    job = study.Job("digits", 0, "soft-plain", "compress", {"soft": True, "partners": False},
                    after="base")
    out = study.run_dir(settings, job)
    out.mkdir(parents=True)
    (out / "config.json").write_text(json.dumps(job.options))
    history = [{"lr": 0.01, "val_top1": 85.0, "epoch_time_s": 1.0}]
    metrics = {"command": "compress", "history": history, "final": {"top1": 78.0},
               "selected": {"epoch": 1, "of": 1, "val_top1": 85.0}, "macs_reduction": 0.9,
               "baseline": {"top1": 78.0, "val_top1": 85.0}}
    (out / "metrics.json").write_text(json.dumps(metrics))
    with pytest.raises(SystemExit, match="scored its baseline 78.00 on test.*scored 80.00"):
        study.finished_record(settings, job)
    metrics["baseline"] = {"top1": 80.0, "val_top1": 90.0}
    (out / "metrics.json").write_text(json.dumps(metrics))
    rec = study.finished_record(settings, job)
    assert rec["baseline_test_top1"] == 80.0 and rec["test_top1"] == 78.0
    # a baseline that kept its last epoch: best.pt is not what it scored, nothing to compare
    base_metrics["selected"] = {"epoch": 5, "of": 5, "why": "--select last"}
    (base / "metrics.json").write_text(json.dumps(base_metrics))
    assert study.baseline_mismatch(settings, job, {"baseline_test_top1": 1.0}) is None


def test_a_run_from_a_retrained_baseline_is_refused_against_the_baselines_record(tmp_path):
    """A baseline whose run folder was lost and trained again (here, or on another machine)
    scores differently; recoveries from it must not be paired with the study's record of
    the first training, which the report pairs them with."""
    study = _load_script()
    settings = {**study.DEFAULTS, "out": str(tmp_path / "runs"), "results": str(tmp_path / "r")}
    base_job = study.Job("digits", 0, "base", "train", {})
    base = study.run_dir(settings, base_job)
    base.mkdir(parents=True)
    (base / "metrics.json").write_text(json.dumps(
        {"selected": {"epoch": 3, "of": 5, "val_top1": 90.0}, "final": {"top1": 81.0}}))
    job = study.Job("digits", 0, "cosine-40", "compress", {}, after="base")
    assert study.baseline_mismatch(settings, job, {"baseline_test_top1": 81.0}) is None
    study.record_path(settings, base_job).parent.mkdir(parents=True)
    study.record_path(settings, base_job).write_text(json.dumps({"test_top1": 80.0}))
    problem = study.baseline_mismatch(settings, job, {"baseline_test_top1": 81.0})
    assert "scored its baseline 81.00" in problem and "record of that baseline" in problem
    assert "80.00" in problem
    study.record_path(settings, base_job).write_text(json.dumps({"test_top1": 81.0}))
    assert study.baseline_mismatch(settings, job, {"baseline_test_top1": 81.0}) is None


def _budget_settings(tmp_path, **extra):
    study = _load_script()
    arm = {"max_drop": 1, "recipe": "cosine", "epochs": 40}
    return study, {**study.DEFAULTS, "out": str(tmp_path / "runs"),
                   "results": str(tmp_path / "results"), "datasets": {"d": {}}, "seeds": [0, 1],
                   "baselines": {"base": {}}, "prune_from": "base",
                   "recoveries": {"new": dict(arm)},
                   "dropped": {"old": {"options": dict(arm), "why": "an earlier rule"}},
                   "reference": {"baseline": "base", "recovery": None}, **extra}


def test_the_max_drop_goal_pools_seeds_whose_baselines_were_trained_again(tmp_path):
    """Issue 26's goal for --max-drop counts seeds within the test drop and the mean MACs
    reduction, over this study's records and those of a study that trained the baselines
    again; a pooled seed pairs with its own baseline only, and a seed twice is an error."""
    pooled = tmp_path / "other" / "records"
    goal = {"arm": "new", "test_drop": 1.5, "seeds": 2, "of": 3, "beyond": {"d": 0.6},
            "pooled": [str(pooled)]}
    study, settings = _budget_settings(tmp_path, max_drop_goal=goal)
    settings["seeds"] = [0, 1, 2]
    base = {"dataset": "d", "name": "base", "epochs_trained": 40}
    records = [{**base, "seed": 0, "test_top1": 88.0, "val_top1": 90.0},
               {"dataset": "d", "seed": 0, "name": "new", "epochs_trained": 80,
                "test_top1": 87.0, "val_top1": 89.0, "baseline_test_top1": 88.0,
                "baseline_val_top1": 90.0, "macs_reduction": 0.74, "epochs_all": 120},
               {"dataset": "d", "seed": 1, "name": "new", "no_step_within": True,
                "epochs_trained": 0, "test_top1": None, "val_top1": None,
                "macs_reduction": 0.0, "epochs_all": 40}]
    pooled.mkdir(parents=True)
    (pooled / "d-seed2-new.json").write_text(json.dumps(
        {"dataset": "d", "seed": 2, "name": "new", "epochs_trained": 120, "test_top1": 85.0,
         "val_top1": 88.0, "baseline_test_top1": 87.0, "baseline_val_top1": 89.0,
         "macs_reduction": 0.9, "epochs_all": 160}))
    text = study.markdown({**settings, "title": "t", "about": "a"},
                          study.summarize(settings, records), records)
    assert "| 2* | 90.0 | 120 | 85.00 | -2.00 | - |" in text  # not paired with base's record
    assert "| 0 | 74.0 | 80 | 87.00 | -1.00 | -1.00 |" in text
    assert "2 of 3 seeds within 1.5 (test minus baseline: -1.00, +0.00, -2.00)" in text
    assert "54.7% fewer MACs on average (74.0, 0.0, 90.0). **missed**" in text  # 54.7 < 60
    goal["beyond"] = {"d": 0.5}
    text = study.markdown({**settings, "title": "t", "about": "a"},
                          study.summarize(settings, records), records)
    assert "**met**" in text
    (pooled / "d-seed1-new.json").write_text((pooled / "d-seed2-new.json").read_text()
                                             .replace('"seed": 2', '"seed": 1'))
    with pytest.raises(SystemExit, match="seed 1 of new on d is recorded twice"):
        study.markdown(settings, study.summarize(settings, records), records)


def test_a_stopped_study_stops_its_runs_so_the_next_can_resume_them(tmp_path):
    """SIGTERM to the study (a session's end, `kill`) reaches the bpl run it started, which
    ends as on Ctrl-C; a run left going would hold its folder's lock against the next study."""
    import os
    import signal
    import subprocess
    import sys
    import time

    fake = tmp_path / "fake-python"  # stands in for `python -m bpl train ...`
    fake.write_text(f"#!/bin/sh\ntrap 'echo stopped > {tmp_path}/mark; exit 130' TERM\n"
                    f"echo $$ > {tmp_path}/pid\nwhile :; do sleep 0.1; done\n")
    fake.chmod(0o755)
    driver = tmp_path / "driver.py"
    driver.write_text(
        "import sys\n"
        f"sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "from benchmark_scripts import load_benchmark\n"
        "study = load_benchmark('convergence_study')\n"
        f"settings = {{**study.DEFAULTS, 'out': {str(tmp_path / 'runs')!r}, "
        f"'results': {str(tmp_path / 'results')!r}, 'datasets': {{'d': {{}}}}, 'seeds': [0], "
        "'baselines': {'base': {}}, 'prune_from': 'base'}\n"
        f"sys.exit(study.execute(settings, jobs=1, records=None, deadline=None, python={str(fake)!r}))\n")
    runner = subprocess.Popen([sys.executable, str(driver)], stdout=subprocess.PIPE, text=True)
    pid_file = tmp_path / "pid"
    for _ in range(200):
        if pid_file.exists() and pid_file.read_text().strip():
            break
        time.sleep(0.05)
    child = int(pid_file.read_text())
    runner.send_signal(signal.SIGTERM)
    out, _ = runner.communicate(timeout=60)
    assert runner.returncode == 128 + signal.SIGTERM
    assert (tmp_path / "mark").read_text().strip() == "stopped"  # it got SIGTERM, as bpl would
    assert "stopped d-seed0-base (its run resumes next time)" in out
    with pytest.raises(ProcessLookupError):
        os.kill(child, 0)
