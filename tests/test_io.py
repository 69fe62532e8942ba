"""``sparta.io.atomic_write``: all or nothing, with ordinary file permissions."""

from __future__ import annotations

import os

import pytest

from sparta.io import atomic_write


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "out.bin"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_write(path) as f:
        f.write(b"half of the new")
        raise RuntimeError("killed")
    assert path.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]


def test_written_files_get_the_umask_permissions_not_owner_only(tmp_path):
    mask = os.umask(0o022)
    try:
        with atomic_write(tmp_path / "sub" / "out.txt", "w", encoding="utf-8") as f:
            f.write("new")
    finally:
        os.umask(mask)
    path = tmp_path / "sub" / "out.txt"
    assert path.read_text(encoding="utf-8") == "new"
    assert path.stat().st_mode & 0o777 == 0o644
