"""The one way the project replaces a file: never half-written, whatever crashes when."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path


def fsync_path(path: Path) -> None:
    """Flush a file's (or a directory's entries') data to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, write) -> None:
    """write(tmp_path) into a temp file beside `path`, fsync it, then rename over `path`."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; what we write is an ordinary file
        fsync_path(Path(tmp))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_dir(target: Path, write, replace: bool = True) -> None:
    """write(tmp_dir) into a temporary directory beside `target`, then rename it into place: a crash
    never leaves half a directory. An existing `target` is replaced, or with replace=False kept
    (another process made the same directory first, and theirs is just as good)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    old = target.with_name(f".{target.name}.old")
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; what we write is an ordinary directory
        write(tmp)
        if target.exists() and replace:
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
        try:
            os.replace(tmp, target)
        except OSError:  # (replace=False) the other process renamed its directory into place first
            if replace or not target.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
