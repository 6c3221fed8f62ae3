"""Each benchmark script runs end to end at its smallest setting and writes its results
(into a temporary folder: BPL_BENCH_RESULTS), so a refactor cannot break one unseen.
The numbers are not checked here; they are claims only when run on purpose."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

SCRIPTS = {
    "bench_prune_latency": (["--size", "32", "--batch-sizes", "1", "--repeats", "3",
                             "--warmup", "1"], ["prune_latency.json", "prune_latency.md"]),
    "bench_train_step": (["--quick", "--archs", "resnet18", "--size", "32", "--no-memory",
                          "--steps", "1", "--warmup", "1", "--reductions", "0.5",
                          "--name", "smoke"], ["smoke.json", "smoke.md"]),
    "bench_train_step --kinds": (["--kinds", "--quick", "--archs", "resnet18", "--size", "32",
                                  "--steps", "1", "--warmup", "1", "--reductions", "0.5",
                                  "--name", "smoke_kinds"], ["smoke_kinds.json", "smoke_kinds.md"]),
    "bench_deploy": (["--quick", "--name", "smoke_deploy"],
                     ["smoke_deploy.json", "smoke_deploy.md"]),
    "bench_deploy --int8": (["--int8", "--quick", "--name", "smoke_int8"],
                            ["smoke_int8.json", "smoke_int8.md"]),
    "bench_deploy --speed-target": (["--speed-target", "--quick", "--name", "smoke_speed"],
                                    ["smoke_speed.json", "smoke_speed.md"]),
    "zoo": (["--models", "tv:resnet18", "--timeout", "120"], ["zoo.json", "zoo.md"]),
    "run_all": (["--quick"], ["suite_quick.json", "suite_quick.md"]),
    "bench_data_cache": (["--quick", "--sizes", "100", "--modes", "mmap", "--work", "work",
                          "--name", "smoke_cache"], ["smoke_cache.json", "smoke_cache.md"]),
}


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_benchmark_script_runs_and_writes_its_results(name, tmp_path):
    args, written = SCRIPTS[name]
    env = {**os.environ, "BPL_BENCH_RESULTS": str(tmp_path), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    script = name.split()[0]  # "bench_deploy --int8": the script, another mode of it
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / f"{script}.py"), *args],
                          capture_output=True, text=True, timeout=240, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for file in written:
        assert (tmp_path / file).stat().st_size > 0, file
    data = json.loads((tmp_path / written[0]).read_text())
    assert data  # a JSON object with its results
