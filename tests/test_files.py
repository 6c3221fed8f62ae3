"""Atomic writes: complete files with normal permissions, nothing left behind on failure."""

from __future__ import annotations

import os
import stat

import pytest
import torch

from bpl.files import atomic_path, atomic_save, atomic_write_json, atomic_write_text


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_writes_leave_no_temp_file_and_normal_permissions(tmp_path):
    umask = os.umask(0o022)
    try:
        text = atomic_write_text(tmp_path / "a" / "b.txt", "x\r\ny\n")
        js = atomic_write_json(tmp_path / "c.json", {"k": 1.5}, indent=1, newline=False)
        pt = atomic_save({"w": torch.ones(2)}, tmp_path / "d.pt")
    finally:
        os.umask(umask)
    assert text.read_bytes() == b"x\r\ny\n"
    assert js.read_text() == '{\n "k": 1.5\n}'
    assert torch.equal(torch.load(pt, weights_only=True)["w"], torch.ones(2))
    for path in (text, js, pt):
        assert _mode(path) == 0o644
    names = sorted(p.name for p in tmp_path.rglob("*"))
    assert names == ["a", "b.txt", "c.json", "d.pt"]


def test_failed_write_keeps_the_previous_file(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="check failed"), atomic_path(target) as tmp:
        tmp.write_bytes(b"new, unchecked")
        raise RuntimeError("check failed")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]


def _half_written(fig, fname, *args, **kwargs):
    """A savefig that dies halfway: some bytes in the file, then an error."""
    with open(fname, "wb") as f:
        f.write(b"\x89PNG half")
    raise KeyboardInterrupt  # as a killed run (SIGTERM is turned into it)


def test_a_plot_is_written_atomically(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    from bpl.files import atomic_savefig

    fig = Figure()
    fig.add_subplot().plot([0, 1], [1, 0])
    png = atomic_savefig(fig, tmp_path / "curve.png", dpi=50)
    pdf = atomic_savefig(fig, tmp_path / "curve.pdf")  # the format is the suffix's
    before = png.read_bytes()
    assert before.startswith(b"\x89PNG") and pdf.read_bytes().startswith(b"%PDF")
    assert _mode(png) == 0o666 & ~_umask()
    monkeypatch.setattr(Figure, "savefig", _half_written)
    with pytest.raises(KeyboardInterrupt):
        atomic_savefig(fig, png)
    assert png.read_bytes() == before  # the old plot, whole
    with pytest.raises(KeyboardInterrupt):
        atomic_savefig(fig, tmp_path / "new.png")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curve.pdf", "curve.png"]


def test_a_run_report_plot_that_fails_midway_leaves_the_old_plot(tmp_path, monkeypatch, caplog):
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    from bpl.report import write_report

    history = [{"epoch": e, "train_loss": 1.0 / e, "train_top1": 50.0 + e} for e in (1, 2)]
    write_report(tmp_path, {"command": "train", "history": history})
    before = (tmp_path / "curves.png").read_bytes()

    def fails(fig, fname, *args, **kwargs):
        with open(fname, "wb") as f:
            f.write(b"\x89PNG half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Figure, "savefig", fails)
    write_report(tmp_path, {"command": "train", "history": history[:1]})
    assert (tmp_path / "curves.png").read_bytes() == before and "plots skipped" in caplog.text
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def _umask() -> int:
    umask = os.umask(0o022)
    os.umask(umask)
    return umask
