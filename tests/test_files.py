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
