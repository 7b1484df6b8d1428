"""Atomic writes: the file appears whole or not at all, with the mode a plain open() would give."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import save_file

from prunekit.io import atomic_open, atomic_path, torch_save, write_json


def _expected_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def test_every_atomic_writer_leaves_open_modes_and_no_temporaries(tmp_path):
    write_json(tmp_path / "a.json", {"x": 1})
    torch_save({"w": torch.ones(2)}, tmp_path / "b.pt")
    with atomic_path(tmp_path / "c.safetensors") as tmp:  # safetensors replaces the file it writes
        save_file({"w": torch.ones(2)}, str(tmp))
    for name in ("a.json", "b.pt", "c.safetensors"):
        assert (tmp_path / name).stat().st_mode & 0o777 == _expected_mode(), name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.pt", "c.safetensors"]


def test_a_failed_write_keeps_the_old_file(tmp_path):
    target = tmp_path / "keep.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_open(target) as handle:
        handle.write("half")
        raise RuntimeError("killed mid-write")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["keep.txt"]
