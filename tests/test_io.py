"""Atomic writes: the file appears whole or not at all, with the mode a plain open() would give."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import save_file

from prunekit.errors import UserError
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


def _writers(target):
    """Each atomic writer of prunekit.io, writing ``target``."""
    def via_path():
        with atomic_path(target) as tmp:
            tmp.write_text("x")

    def via_open():
        with atomic_open(target) as handle:
            handle.write("x")

    return {"atomic_path": via_path, "atomic_open": via_open, "write_json": lambda: write_json(target, {}),
            "torch_save": lambda: torch_save({"w": torch.ones(1)}, target)}


def _tree(root):
    return sorted((str(p.relative_to(root)), p.is_dir() or p.read_bytes()) for p in root.rglob("*"))


@pytest.mark.parametrize("writer", ["atomic_path", "atomic_open", "write_json", "torch_save"])
@pytest.mark.parametrize("relative", ["file/out.json", "file/sub/deeper/out.json"])
def test_a_folder_under_a_file_is_one_line_naming_the_path(writer, relative, tmp_path):
    """Tests run as root, for whom read-only folders are writable: a parent that is a regular
    file makes the path unwritable for everyone."""
    (tmp_path / "file").write_text("keep")
    before = _tree(tmp_path)
    with pytest.raises(UserError) as err:
        _writers(tmp_path / relative)[writer]()
    assert str(err.value) == f"cannot write '{tmp_path / relative}': '{tmp_path / 'file'}' is a file, not a folder"
    assert _tree(tmp_path) == before


@pytest.mark.parametrize("writer", ["atomic_path", "write_json"])
def test_a_kernel_folder_is_one_line_naming_the_path(writer):
    """/sys accepts no new file, not even from root (the read-only folder of this test)."""
    target = "/sys/prunekit-test-output.json"
    with pytest.raises(UserError, match=f"^cannot write '{target}': [A-Z][a-z -]+$"):
        _writers(target)[writer]()
    assert not os.path.exists(target)


def test_a_directory_in_the_way_is_one_line_and_leaves_no_temporary(tmp_path):
    (tmp_path / "out.json").mkdir()
    (tmp_path / "out.json" / "inside").write_text("keep")
    before = _tree(tmp_path)
    with pytest.raises(UserError, match=f"^cannot write '{tmp_path / 'out.json'}': Is a directory$"):
        write_json(tmp_path / "out.json", {"x": 1})
    assert _tree(tmp_path) == before
