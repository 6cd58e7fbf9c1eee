"""The atomic writes: a file or a directory appears whole, or not at all."""

from __future__ import annotations

import pytest

from mlx_grpo.fileio import atomic_dir, atomic_write


def write_files(*names):
    def write(tmp):
        for name in names:
            (tmp / name).write_text(name)
    return write


def test_a_directory_appears_whole_and_replaces_the_earlier_one(tmp_path):
    target = tmp_path / "out" / "model"
    atomic_dir(target, write_files("a", "b"))
    assert sorted(p.name for p in target.iterdir()) == ["a", "b"]
    atomic_dir(target, write_files("c"))
    assert [p.name for p in target.iterdir()] == ["c"]
    assert [p.name for p in target.parent.iterdir()] == ["model"]  # no temporary or old directory left


def test_kept_when_another_process_made_it_first(tmp_path):
    target = tmp_path / "cache"

    def write(tmp):
        tmp.joinpath("ours").write_text("")
        target.mkdir()  # the other conversion finishes while ours is being written
        target.joinpath("theirs").write_text("")

    atomic_dir(target, write, replace=False)
    assert [p.name for p in target.iterdir()] == ["theirs"]
    assert [p.name for p in tmp_path.iterdir()] == ["cache"]


def test_a_failed_write_leaves_nothing(tmp_path):
    target = tmp_path / "model"

    def write(tmp):
        (tmp / "half").write_text("")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        atomic_dir(target, write)
    assert list(tmp_path.iterdir()) == []
    atomic_write(tmp_path / "f.txt", lambda tmp: open(tmp, "w").write("x"))
    assert [p.name for p in tmp_path.iterdir()] == ["f.txt"] and oct((tmp_path / "f.txt").stat().st_mode)[-3:] == "644"
