"""Atomic writes leave files whose mode the user's umask decides, like any other tool's."""

from __future__ import annotations

import os
import stat

import numpy as np
import pytest

from tpas.utils.io import atomic_save, write_json, write_text


@pytest.fixture()
def umask():
    """Set the process umask for one test and restore it afterwards."""
    old = os.umask(0o022)
    os.umask(old)

    def set_mask(mask: int) -> None:
        os.umask(mask)

    yield set_mask
    os.umask(old)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize("mask, expected", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_written_files_follow_the_umask(tmp_path, umask, mask, expected):
    umask(mask)
    write_json(tmp_path / "a.json", {"x": 1})
    write_text(tmp_path / "sub" / "b.txt", "hello\n")
    atomic_save(tmp_path / "c.npy", lambda tmp: np.save(open(tmp, "wb"), np.zeros(3)))
    assert [mode(tmp_path / p) for p in ("a.json", "sub/b.txt", "c.npy")] == [expected] * 3
    assert not list(tmp_path.rglob(".*.tmp"))


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "keep.txt"
    write_text(path, "old\n")
    with pytest.raises(RuntimeError):
        atomic_save(path, lambda tmp: (tmp.write_text("half"), (_ for _ in ()).throw(RuntimeError("boom"))))
    assert path.read_text() == "old\n" and not list(tmp_path.glob(".*.tmp"))
