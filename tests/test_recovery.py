"""benchmarks/recovery_study.py end to end on a tiny generated image folder (no ../shared)."""

from __future__ import annotations

import csv
import json
import shutil
import statistics
from pathlib import Path

import pytest
import torch

from benchmark_scripts import load_benchmark
from test_reproduce import _image_folder

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "recovery_study.py"


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _load_script():
    return load_benchmark("recovery_study")


def test_confidence_interval_matches_the_t_distribution():
    study = _load_script()
    st = study.ci95([1.0, 2.0, 3.0])
    assert st["mean"] == 2.0 and st["std"] == 1.0 and st["n"] == 3
    assert st["ci95"] == pytest.approx(4.302653 / 3 ** 0.5, rel=1e-4)  # t(0.975, 2) = 4.3027
    five = [0.3, -0.1, 0.5, 0.2, 0.4]
    assert study.ci95(five)["ci95"] == pytest.approx(
        2.776445 * statistics.stdev(five) / 5 ** 0.5, rel=1e-4)
    assert study.ci95([0.7])["ci95"] is None


def test_the_pilot_chooses_on_validation_never_on_test():
    study = _load_script()
    rows = []
    for seed in (0, 1):
        # 'a' is better on validation, 'b' on test: the choice must follow validation
        for variant, val, test in (("plain", 50, 50), ("bpl-a", 53, 49), ("bpl-b", 51, 60)):
            rows.append({"dataset": "d", "seed": seed, "flops_reduction": 0.9, "arm": variant,
                         "variant": variant, "val_top1": val + seed, "test_top1": test})
    choice = study.choose_variant(rows, ["a", "b"])
    assert choice["variant"] == "a"
    assert choice["val_difference_vs_plain"]["a"]["mean"] == 3.0
    assert choice["val_difference_vs_plain"]["b"]["mean"] == 1.0


def test_study_runs_pilot_then_arms_pairs_them_and_resumes(tmp_path):
    study = _load_script()
    data = _image_folder(tmp_path / "images", classes=3, per_class=10)
    out, res = tmp_path / "runs", tmp_path / "results"
    config = tmp_path / "tiny.yaml"
    config.write_text(json.dumps({
        "out": str(out), "results": str(res), "arch": "tiny_resnet",
        "datasets": {"imagefolder": {"data_root": str(data), "image_size": 16}},
        "seeds": [0, 1], "reductions": [0.5], "baseline_epochs": 1, "finetune_epochs": 2,
        "pilot": {"seeds": [0], "reduction": 0.5, "variants": ["preserve", "split"]},
        "common": {"batch_size": 8, "device": "cpu", "latency": False, "val_ratio": 0.25},
        "baseline": {"lr": 0.05}, "finetune": {"lr": 0.02},
    }))
    assert study.main(["--config", str(config), "--quiet"]) == 0

    pilot = list(csv.DictReader((res / "pilot.csv").open()))
    assert sorted(r["variant"] for r in pilot) == ["bpl-preserve", "bpl-split", "plain"]
    val = {r["variant"]: float(r["val_top1"]) for r in pilot}
    chosen = max(("preserve", "split"), key=lambda v: val[f"bpl-{v}"])  # one seed: the best
    results = json.loads((res / "results.json").read_text())
    assert results["summary"]["choice"]["variant"] == chosen

    rows = list(csv.DictReader((res / "results.csv").open()))
    assert {"dataset", "seed", "arm", "flops_reduction", "macs", "val_top1",
            "test_top1"} <= set(rows[0])
    assert sorted((r["seed"], r["arm"]) for r in rows) == sorted(
        (s, a) for s in ("0", "1") for a in ("plain", "bpl", "kd", "bpl+kd"))
    for seed in ("0", "1"):
        mine = [r for r in rows if r["seed"] == seed]
        # paired: the same pruned model (same MACs) and the same test images in every arm
        assert len({r["macs"] for r in mine}) == 1
        tests = {json.dumps(json.loads((out / r["run_dir"] / "split.json").read_text())["test"])
                 for r in mine}
        assert len(tests) == 1
        by_arm = {r["arm"]: r for r in mine}
        assert Path(by_arm["bpl"]["run_dir"]).name == f"bpl-{chosen}"
        assert Path(by_arm["bpl+kd"]["run_dir"]).name == f"bpl-{chosen}+kd"
        assert float(by_arm["kd"]["distill_ms_per_step"]) > 0 and by_arm["plain"][
            "distill_ms_per_step"] == ""
        for r in mine:
            assert 0 <= float(r["test_top1"]) <= 100 and r["test_images"] == "6"
    # seed 0's bpl run is the pilot's run of the chosen variant, not trained twice
    seed0 = out / "imagefolder" / "seed0" / "r50"
    assert sorted(p.name for p in seed0.iterdir()) == sorted(
        ["plain", "bpl-preserve", "bpl-split", "kd", f"bpl-{chosen}+kd"])
    summary = (res / "summary.md").read_text()
    assert "| bpl |" in summary and "Chosen for the study's bpl arms" in summary
    assert (res / "accuracy_vs_macs.png").stat().st_size > 0

    # re-running skips every finished run
    mtimes = {p: p.stat().st_mtime_ns for p in out.glob("imagefolder/seed*/*/*/metrics.json")}
    assert len(mtimes) == 9  # pilot 3 + seed 0: kd, bpl+kd + seed 1: 4
    assert study.main(["--config", str(config), "--quiet"]) == 0
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes
    # a run cut off after its last epoch resumes; other settings are refused
    (seed0 / "kd" / "metrics.json").unlink()
    (res / "records" / "imagefolder__seed0__r50__kd.json").unlink()
    assert study.main(["--config", str(config), "--quiet"]) == 0
    assert (seed0 / "kd" / "metrics.json").exists()
    assert "resuming" in (out / "study.log").read_text()
    # a new session: a fresh checkout holds the committed records, not the run directories
    records = res / "records"
    assert len(list(records.glob("*.json"))) == 11  # 2 baselines + 9 fine-tuning runs
    shutil.rmtree(out)
    assert study.main(["--config", str(config), "--quiet"]) == 0
    assert not out.exists() or not list(out.glob("imagefolder/seed*/*/*/metrics.json"))
    again = list(csv.DictReader((res / "results.csv").open()))
    assert [r["test_top1"] for r in again] == [r["test_top1"] for r in rows]
    # one run still to do: the baseline is retrained, identical, so the others stay paired
    kd1 = records / "imagefolder__seed1__r50__kd.json"
    kept = {p: p.stat().st_mtime_ns for p in records.glob("imagefolder__seed1__r50__*.json")
            if p != kd1}
    kd1.unlink()
    assert study.main(["--config", str(config), "--quiet"]) == 0
    assert kd1.exists() and (out / "imagefolder" / "seed1" / "baseline" / "best.pt").exists()
    assert {p: p.stat().st_mtime_ns for p in kept} == kept
    # a retrained baseline that differs from the record: its seed's runs are run again
    shutil.rmtree(out)
    base1 = records / "imagefolder__seed1__baseline.json"
    record = json.loads(base1.read_text())
    base1.write_text(json.dumps(dict(record, state_sha256="0" * 64)))
    kd1.unlink()
    assert study.main(["--config", str(config), "--quiet"]) == 0
    assert all(p.stat().st_mtime_ns != t for p, t in kept.items())
    assert json.loads(base1.read_text())["state_sha256"] == record["state_sha256"]
    # a record made with other settings is refused
    config.write_text(config.read_text().replace('"finetune_epochs": 2', '"finetune_epochs": 3'))
    assert study.main(["--config", str(config), "--quiet"]) == 1


def test_shipped_config_resolves():
    study = _load_script()
    settings = study.load_settings(study.DEFAULT_CONFIG)
    assert set(settings["datasets"]) == {"ucm", "eurosat"}
    assert len(settings["seeds"]) >= 5 and {0.5, 0.74, 0.9} <= set(settings["reductions"])
    cfg = study.run_config(settings, "eurosat", 3, 0.9, {"partners": False, "distill": True}, "kd")
    assert cfg.distill and not cfg.partners and cfg.select == "best" and cfg.val_ratio == 0.1
    assert cfg.baseline.endswith("eurosat/seed3/baseline/best.pt")


def test_arms_setting_picks_the_study_arms_and_refuses_a_study_without_plain(tmp_path):
    study = _load_script()
    base = {"datasets": {"imagefolder": {"data_root": str(tmp_path), "image_size": 16}},
            "reductions": [0.5, 0.9]}

    def settings_with(arms):
        path = tmp_path / "s.yaml"
        path.write_text(json.dumps(dict(base, arms=arms)))
        return study.load_settings(path)

    runs = study._study_runs(settings_with(["plain", "bpl"]), "preserve", "imagefolder", 0)
    assert [(arm, Path(cfg.out).name) for arm, cfg in runs] == [
        ("plain", "plain"), ("bpl", "bpl-preserve")] * 2
    assert len(study._study_runs(settings_with(list(study.ARMS)), "split", "imagefolder", 0)) == 8
    for bad in (["bpl", "kd"], ["plain", "distill"], []):
        with pytest.raises(study.BPLError, match="arms must be"):
            settings_with(bad)


def test_long_finetune_config_resolves():
    study = _load_script()
    path = SCRIPT.parent / "configs" / "recovery_long_cpu.yaml"
    long, main = study.load_settings(path), study.load_settings(study.DEFAULT_CONFIG)
    # the same baselines as the main study (its run directories can be linked in) ...
    assert (study._protocol(study.run_config(long, "ucm", 0))
            == study._protocol(study.run_config(main, "ucm", 0)))
    # ... and the same fine-tuning but four times as long
    assert long["finetune_epochs"] == 4 * main["finetune_epochs"]
    assert long["paired_with"] == main["results"]
    assert long["datasets"] == main["datasets"]
    for dataset in long["datasets"]:
        assert (study._protocol(study.run_config(long, dataset, 4))
                == study._protocol(study.run_config(main, dataset, 4)))
    name, fields = study.arm_fields(long, "bpl", long["bpl_variant"])
    cfg = study.run_config(long, "ucm", 0, 0.9, fields, name)
    ref = study._protocol(study.run_config(main, "ucm", 0, 0.9, fields, name))
    assert study._protocol(cfg) == dict(ref, epochs=cfg.epochs)


def test_plot_draws_each_reductions_own_paired_difference(tmp_path, monkeypatch):
    from matplotlib.axes import Axes

    study = _load_script()
    rows = []
    for seed in (0, 1, 2):
        for f, gain in ((0.5, 1.0), (0.9, 3.0)):
            for arm, top1 in (("plain", 70.0 + seed), ("bpl", 70.0 + seed + gain)):
                rows.append({"dataset": "d", "seed": seed, "flops_reduction": f, "arm": arm,
                             "test_top1": top1, "macs": 1e6 * (1 - f),
                             "baseline_test_top1": 80.0})
    drawn = {}
    errorbar = Axes.errorbar

    def keep(ax, x, y, *args, **kwargs):
        drawn[kwargs.get("label")] = list(y)
        return errorbar(ax, x, y, *args, **kwargs)

    monkeypatch.setattr(Axes, "errorbar", keep)
    study.plot(rows, tmp_path / "plot.png")
    assert drawn["bpl − plain"] == pytest.approx([1.0, 3.0])  # not one pooled value twice
    assert (tmp_path / "plot.png").stat().st_size > 0


def test_rounding_report_aggregates_every_recorded_seed_whichever_seeds_ran(tmp_path,
                                                                          monkeypatch):
    study = _load_script()
    rounding = load_benchmark("rounding_accuracy")
    config = tmp_path / "s.yaml"
    config.write_text(json.dumps({
        "out": str(tmp_path / "runs"), "results": str(tmp_path / "res"), "seeds": [0, 1, 2],
        "datasets": {"imagefolder": {"data_root": str(tmp_path), "image_size": 16}}}))
    missing_r8 = {1, 2}  # seed 1 has no baseline checkpoint here; seed 2 has one
    (tmp_path / "runs" / "imagefolder" / "seed2" / "baseline").mkdir(parents=True)
    (tmp_path / "runs" / "imagefolder" / "seed2" / "baseline" / "best.pt").write_bytes(b"")
    ran = []

    def load_record(settings, cfg):
        if Path(cfg.out).name == rounding.ARM and cfg.seed in missing_r8:
            return None
        return {"seed": cfg.seed}

    def run(settings, cfg, **kwargs):
        ran.append(cfg.seed)
        missing_r8.discard(cfg.seed)
        return {"seed": cfg.seed}

    def row(settings, cfg, arm, record, base):
        gain = 1.0 if arm == rounding.ARM else 0.0
        return {"macs": 1e6, "test_top1": 80.0 + cfg.seed + gain, "val_top1": 70.0 + gain}

    monkeypatch.setattr(study, "load_record", load_record)
    monkeypatch.setattr(study, "run", run)
    monkeypatch.setattr(study, "row", row)
    monkeypatch.setattr(rounding, "study", study)
    assert rounding.main(["--config", str(config), "--seeds", "1", "2",
                          "--reductions", "0.9"]) == 0
    assert ran == [2]  # seed 1's baseline checkpoint is not here: not run
    md = (tmp_path / "res" / "rounding.md").read_text()
    assert "| imagefolder | 90% | 1.0 / 1.0 | +1.00 ± 0.00 (2) | +1.00 ± 0.00 (2) |" in md
    rows = list(csv.DictReader((tmp_path / "res" / "rounding.csv").open()))
    assert sorted(r["seed"] for r in rows) == ["0", "2"]  # seed 0 ran before, not this time
    assert rounding.main(["--config", str(config), "--report", "--reductions", "0.9"]) == 0
    assert ran == [2] and (tmp_path / "res" / "rounding.md").read_text() == md


def test_a_fixed_variant_reports_no_pilot(tmp_path, monkeypatch):
    study = _load_script()
    monkeypatch.setattr(study, "load_record", lambda settings, cfg: {"seed": cfg.seed})
    monkeypatch.setattr(study, "row", lambda settings, cfg, name, record, base: {"arm": name})
    path = tmp_path / "s.yaml"
    spec = {"datasets": {"imagefolder": {"data_root": str(tmp_path), "image_size": 16}},
            "seeds": [0, 1], "reductions": [0.9], "arms": ["plain", "bpl"]}
    path.write_text(json.dumps(dict(spec, bpl_variant="preserve")))
    rows, pilot_rows = study.finished_rows(study.load_settings(path), "preserve")
    assert [r["arm"] for r in rows] == ["plain", "bpl"] * 2 and pilot_rows == []
    path.write_text(json.dumps(spec))  # auto: the pilot's variants at its seeds
    rows, pilot_rows = study.finished_rows(study.load_settings(path), "preserve")
    assert len(rows) == 4 and len(pilot_rows) == 2 * (1 + len(study.VARIANTS))


def test_against_other_pairs_run_by_run():
    study = _load_script()
    mine = [{"dataset": "d", "seed": s, "flops_reduction": 0.9, "arm": "plain",
             "test_top1": 80.0 + s + 2, "val_top1": 70.0 + 1} for s in (0, 1, 2)]
    # the other study's results.csv as csv.DictReader gives it: strings, one extra seed
    theirs = [{"dataset": "d", "seed": str(s), "flops_reduction": "0.9", "arm": "plain",
               "test_top1": str(80.0 + s), "val_top1": "70.0"} for s in (0, 1, 2, 3)]
    got = study.against_other(mine, theirs)
    assert list(got) == ["d/r90/plain"]
    assert got["d/r90/plain"]["test_top1"]["mean"] == pytest.approx(2.0)
    assert got["d/r90/plain"]["test_top1"]["n"] == 3
    assert got["d/r90/plain"]["val_top1"]["mean"] == pytest.approx(1.0)
    assert study.against_other(mine, [dict(theirs[0], arm="kd")]) == {}


def test_long_paper_probe_shares_the_long_probes_plain_runs():
    study = _load_script()
    configs = SCRIPT.parent / "configs"
    long = study.load_settings(configs / "recovery_long_cpu.yaml")
    paper = study.load_settings(configs / "recovery_long_paper_cpu.yaml")
    assert paper["bpl_variant"] == "paper" and paper["paired_with"] == long["results"]
    for dataset in long["datasets"]:
        name, fields = study.arm_fields(paper, "plain", paper["bpl_variant"])
        mine = study.run_config(paper, dataset, 2, 0.9, fields, name)
        assert mine.to_dict() == study.run_config(long, dataset, 2, 0.9, fields, name).to_dict()
        name, fields = study.arm_fields(paper, "bpl", paper["bpl_variant"])
        assert study.run_config(paper, dataset, 2, 0.9, fields, name).init == "paper"


def test_precision_configs_share_baselines_and_differ_only_in_precision():
    """The bf16 check: the same baselines, pruned models and protocol as the fp32 side,
    fine-tuned with amp + channels_last instead of pinned fp32 NCHW."""
    study = _load_script()
    configs = SCRIPT.parent / "configs"
    fp32 = study.load_settings(configs / "precision_fp32_cpu.yaml")
    bf16 = study.load_settings(configs / "precision_bf16_cpu.yaml")
    assert bf16["baselines_from"] == fp32["out"] and bf16["paired_with"] == fp32["results"]
    for dataset in fp32["datasets"]:
        base = study.run_config(fp32, dataset, 3)
        assert not base.amp and not base.channels_last  # pinned, whatever the defaults
        assert study._protocol(study.run_config(bf16, dataset, 3)) == study._protocol(base)
        for arm in ("plain", "bpl"):
            name, fields = study.arm_fields(fp32, arm, fp32["bpl_variant"])
            a = study.run_config(fp32, dataset, 3, 0.9, fields, name)
            b = study.run_config(bf16, dataset, 3, 0.9, fields, name)
            assert not a.amp and b.amp and b.channels_last
            assert study._protocol(a) == dict(study._protocol(b), amp=False, channels_last=False)


def test_baselines_from_links_the_other_studys_baselines_and_trains_none(tmp_path):
    study = _load_script()
    data = _image_folder(tmp_path / "images", classes=3, per_class=8)
    common = {"arch": "tiny_resnet", "seeds": [0], "reductions": [0.5], "baseline_epochs": 1,
              "finetune_epochs": 1, "bpl_variant": "preserve", "arms": ["plain"],
              "datasets": {"imagefolder": {"data_root": str(data), "image_size": 16}},
              "common": {"batch_size": 8, "device": "cpu", "latency": False, "val_ratio": 0.25}}
    first, second = tmp_path / "first.yaml", tmp_path / "second.yaml"
    first.write_text(json.dumps({**common, "out": str(tmp_path / "a"),
                                 "results": str(tmp_path / "ra")}))
    second.write_text(json.dumps({**common, "out": str(tmp_path / "b"),
                                  "results": str(tmp_path / "rb"),
                                  "baselines_from": str(tmp_path / "a"),
                                  "paired_with": str(tmp_path / "ra"),
                                  "finetune": {"amp": False}}))
    assert study.main(["--config", str(second), "--quiet"]) == 1  # no baseline there yet
    assert not (tmp_path / "b" / "imagefolder" / "seed0" / "baseline").exists()
    assert study.main(["--config", str(first), "--quiet"]) == 0
    base = tmp_path / "a" / "imagefolder" / "seed0" / "baseline" / "best.pt"
    before = base.stat().st_mtime_ns
    assert study.main(["--config", str(second), "--quiet"]) == 0
    link = tmp_path / "b" / "imagefolder" / "seed0" / "baseline"
    assert link.is_symlink() and base.stat().st_mtime_ns == before  # linked, not retrained
    rows = list(csv.DictReader((tmp_path / "rb" / "results.csv").open()))
    theirs = list(csv.DictReader((tmp_path / "ra" / "results.csv").open()))
    assert rows[0]["macs"] == theirs[0]["macs"]  # the same pruned model
    assert rows[0]["precision"] == "float32"
    assert "Against" in (tmp_path / "rb" / "summary.md").read_text()
    # a new session: both sides recorded, no run directories; nothing to link, nothing refused
    shutil.rmtree(tmp_path / "a")
    shutil.rmtree(tmp_path / "b")
    assert study.main(["--config", str(second), "--quiet"]) == 0
    assert not (tmp_path / "b").exists() or not link.exists()


def test_studies_recorded_in_fp32_keep_training_in_fp32(monkeypatch):
    """bf16 became the default on AMX CPUs (issue 25); the studies recorded before it ran in
    fp32 and pin that, so their runs still pair and resume; the bf16 side forces bf16."""
    study = _load_script()
    from bpl.precision import ENV, cpu_bf16

    configs = SCRIPT.parent / "configs"
    for name in ("recovery_cpu", "recovery_long_cpu", "recovery_long_paper_cpu"):
        assert study.load_settings(configs / f"{name}.yaml")["cpu_bf16"] is False
    assert "cpu_bf16: false" in (configs / "ucm_cpu.yaml").read_text()
    assert study.load_settings(configs / "precision_bf16_cpu.yaml")["cpu_bf16"] is True
    monkeypatch.setenv(ENV, "")  # so the variable is put back as it was afterwards
    monkeypatch.delenv(ENV)
    study.apply_cpu_bf16(None)
    assert ENV not in __import__("os").environ
    study.apply_cpu_bf16(False)
    assert cpu_bf16() == (False, f"{ENV}=0")
    study.apply_cpu_bf16(True)
    assert cpu_bf16() == (True, f"{ENV}=1")
