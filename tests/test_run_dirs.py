"""Runs that cannot be mixed up: one run at a time per directory, no stale files reused,
nothing left by a run that failed, and SIGTERM handled as Ctrl-C (issue 29)."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from bpl.cli import main
from bpl.files import BusyError, exclusive_lock, lock_holder
from bpl.pipeline import LOCK_FILE

FAST = ["--data", "digits", "--image-size", "16", "--batch-size", "64", "--quiet", "--no-latency",
        "--arch", "tiny_resnet"]


def run_cli(*args) -> int:
    return main([str(a) for a in args])


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.iterdir()) if p.is_file() and p.name != LOCK_FILE}


def test_exclusive_lock_refuses_a_second_holder_and_ends_with_its_holder(tmp_path):
    path = tmp_path / "run" / LOCK_FILE
    with exclusive_lock(path):
        with pytest.raises(BusyError) as busy, exclusive_lock(path):
            pass
        assert busy.value.holder == f"pid {os.getpid()}"
    with exclusive_lock(path):  # released: free again
        pass
    # a process killed while holding it (kill -9) holds nothing: the kernel drops the lock
    code = ("import sys, time; from bpl.files import exclusive_lock\n"
            f"with exclusive_lock({str(path)!r}):\n    print('held', flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(BusyError, match=f"pid {proc.pid}"), exclusive_lock(path):
            pass
    finally:
        proc.kill()
        proc.wait()
    with exclusive_lock(path):
        pass


def test_a_second_run_into_a_busy_directory_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    with exclusive_lock(out / LOCK_FILE):  # as a run in another process holds it
        assert run_cli("train", *FAST, "--epochs", "1", "--out", out) == 1
        err = capsys.readouterr().err.strip()
        assert "in use by another bpl run" in err and "--out" in err and len(err.splitlines()) == 1
        assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE]  # nothing written
        assert run_cli("train", *FAST, "--epochs", "1", "--out", out, "--resume") == 1
    assert run_cli("train", *FAST, "--epochs", "1", "--out", out) == 0  # free: it runs


def test_an_existing_run_is_not_touched_by_a_refused_one(tmp_path, capsys):
    out = tmp_path / "run"
    assert run_cli("train", *FAST, "--epochs", "1", "--out", out) == 0
    before = _digests(out)
    assert run_cli("train", *FAST, "--epochs", "2", "--seed", "3", "--out", out) == 1
    assert "--resume" in capsys.readouterr().err
    assert _digests(out) == before  # config.json included: refused before anything was written


def test_a_new_run_never_reuses_a_stale_split(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    # what a run killed before its first epoch leaves: its split (another seed's, here one
    # that names images that do not exist) and its config
    (out / "split.json").write_text(json.dumps({"train": ["nowhere/1.png"], "val": [],
                                                "test": ["nowhere/2.png"]}))
    (out / "config.json").write_text("{}")
    assert run_cli("train", *FAST, "--epochs", "1", "--seed", "1", "--out", out) == 0
    split = json.loads((out / "split.json").read_text())
    again = tmp_path / "fresh"
    assert run_cli("train", *FAST, "--epochs", "1", "--seed", "1", "--out", again) == 0
    assert split == json.loads((again / "split.json").read_text())  # the seed's own split
    assert json.loads((out / "config.json").read_text())["seed"] == 1


def test_a_failed_run_leaves_no_folder_behind(tmp_path, capsys):
    out = tmp_path / "a" / "b" / "run"
    assert run_cli("train", "--data-root", tmp_path / "missing", "--out", out, "--quiet") == 1
    assert "missing" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # the folders made for it went with it
    keep = tmp_path / "mine"
    keep.mkdir()
    assert run_cli("train", "--data-root", tmp_path / "missing", "--out", keep / "run",
                   "--quiet") == 1
    assert keep.is_dir() and list(keep.iterdir()) == []  # a folder of the user's stays


def test_sigterm_ends_a_run_as_ctrl_c_does(tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1] / "src"),
                                          os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-m", "bpl", "train", *FAST, "--epochs", "200",
                             "--out", str(out)], stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.time() + 120
        while not (out / "last.pt").exists() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.2)
        assert (out / "last.pt").exists(), "no epoch finished in 2 minutes"
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130
    assert "continue with --resume" in err.strip().splitlines()[-1]
    assert not list(out.glob(".*.tmp"))  # a write it cut off was discarded whole
    assert run_cli("train", *FAST, "--epochs", "2", "--out", out, "--resume") == 0


def test_a_full_disk_is_one_line_that_names_it(tmp_path, capsys, monkeypatch):
    import shutil as _shutil

    import bpl.files

    out = tmp_path / "run"
    assert run_cli("train", *FAST, "--epochs", "1", "--out", out) == 0
    before = (out / "last.pt").read_bytes()

    def full(obj, f, *a, **k):  # what torch's zip writer raises when the disk fills
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0")

    monkeypatch.setattr(bpl.files.torch, "save", full)
    monkeypatch.setattr(bpl.files.shutil, "disk_usage",
                        lambda p: _shutil._ntuple_diskusage(10**9, 10**9 - 4096, 4096))
    capsys.readouterr()
    assert run_cli("train", *FAST, "--epochs", "2", "--out", out, "--resume") == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no space left on the disk" in err and "--resume" in err
    assert (out / "last.pt").read_bytes() == before  # the earlier checkpoint survives whole
    assert not list(out.glob(".*.tmp"))


def test_os_errors_name_their_cause_and_fix():
    import errno

    from bpl.cli import os_error_message

    assert "read-only" in os_error_message(OSError(errno.EROFS, "Read-only file system", "/r/x"))
    assert "--out on a writable disk" in os_error_message(OSError(errno.EROFS, "x", "/r/x"))
    assert "/d/x" in os_error_message(OSError(errno.ENOSPC, "No space left", "/d/x"))
    assert os_error_message(OSError(errno.EIO, "Input/output error", "/d/y")) == (
        "Input/output error (/d/y)")


def test_negative_workers_are_refused(tmp_path, capsys):
    assert run_cli("train", *FAST, "--workers", "-1", "--out", tmp_path / "r") == 1
    assert "--workers must be 0" in capsys.readouterr().err


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_a_folder_without_write_permission_is_named(tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        assert run_cli("train", *FAST, "--epochs", "1", "--out", locked / "run") == 1
    finally:
        locked.chmod(0o700)
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(locked) in err and ".tmp" not in err


def test_a_permission_error_names_the_folder_not_a_temporary_file(tmp_path, monkeypatch):
    import errno
    import tempfile

    from bpl.cli import os_error_message
    from bpl.files import atomic_write_text

    def refused(dir=None, prefix="", suffix=""):
        raise PermissionError(errno.EACCES, "Permission denied", f"{dir}/{prefix}abc{suffix}")

    monkeypatch.setattr(tempfile, "mkstemp", refused)
    with pytest.raises(PermissionError) as exc:
        atomic_write_text(tmp_path / "a.txt", "x")
    message = os_error_message(exc.value)
    assert f"({tmp_path})" in message and ".tmp" not in message and "a.txt" in message


def test_exclusive_lock_can_wait_and_survives_its_file_being_deleted(tmp_path):
    path = tmp_path / "x.lock"
    told, got = [], threading.Event()

    def waiter():
        with exclusive_lock(path, on_busy=told.append):
            got.set()

    with exclusive_lock(path):
        assert lock_holder(path) == f"pid {os.getpid()}"
        thread = threading.Thread(target=waiter)
        thread.start()
        deadline = time.monotonic() + 10
        while not told and time.monotonic() < deadline:
            time.sleep(0.01)
        assert told == [f"pid {os.getpid()}"] and not got.is_set()  # said once, waiting
        path.unlink()  # a cleaner deletes the lock file it holds: the waiter locks a new one
    thread.join(10)
    assert got.is_set() and path.exists() and lock_holder(path) is None
