"""Checkpoints in the run directory, written so that a crash never leaves a half-written one.

    logs/runs/<run>/checkpoints/step_000010/
        adapters.safetensors    trainable weights (LoRA adapters, or every weight for a full fine-tune)
        optimizer.safetensors   AdamW moments and step
        state.pkl               step, data cursor, RNG states, metric accumulators, teacher usage,
                                rubric version, and the size of every log file at this step

A checkpoint is written into a hidden temp directory, each file fsynced, then renamed into place:
a directory named step_* is always complete. Resuming truncates the logs back to the sizes saved
with it, so steps after the checkpoint that a crash left in the logs are redone, not duplicated.
"""

from __future__ import annotations

import os
import pickle
import shutil
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

from mlx_grpo.errors import UserInputError

CHECKPOINTS = "checkpoints"


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(run_dir: Path, step: int, model, optimizer, state: dict, keep: int) -> Path:
    """Write checkpoint `step` atomically and keep only the newest `keep` (0 = all)."""
    root = Path(run_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:06d}"
    tmp = root / f".step_{step:06d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    weights = dict(tree_flatten(model.trainable_parameters()))
    moments = dict(tree_flatten(optimizer.state))
    mx.eval(weights, moments)
    mx.save_safetensors(str(tmp / "adapters.safetensors"), weights)
    mx.save_safetensors(str(tmp / "optimizer.safetensors"), moments)
    (tmp / "state.pkl").write_bytes(pickle.dumps({"step": step, **state}))
    for name in ("adapters.safetensors", "optimizer.safetensors", "state.pkl"):
        _fsync(tmp / name)
    if final.exists():  # the same step saved again (e.g. the final save right after a periodic one)
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync(root)
    if keep > 0:
        for old in sorted(complete_checkpoints(run_dir))[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def complete_checkpoints(run_dir: Path) -> list[Path]:
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step_*") if (p / "state.pkl").is_file())


def latest_checkpoint(run_dir: Path) -> Path:
    found = complete_checkpoints(run_dir)
    if not found:
        raise UserInputError(f"--resume: {run_dir} has no complete checkpoint to resume from")
    return found[-1]


def load_checkpoint(path: Path, model, optimizer) -> dict:
    """Put the checkpoint's weights into `model` and moments into `optimizer`; return its state."""
    weights = mx.load(str(path / "adapters.safetensors"))
    model.load_weights(list(weights.items()), strict=False)
    optimizer.state = tree_unflatten(list(mx.load(str(path / "optimizer.safetensors")).items()))
    mx.eval(model.parameters(), optimizer.state)
    return read_state(path)


def read_state(path: Path) -> dict:
    """A checkpoint's state.pkl: its step, log sizes, cursors and accumulators."""
    return pickle.loads((Path(path) / "state.pkl").read_bytes())


def log_sizes(paths: list[Path]) -> dict[str, int]:
    """Current byte size of each log file (0 if missing), to truncate back to on resume."""
    return {p.name: (p.stat().st_size if p.exists() else 0) for p in paths}


def truncate_logs(run_dir: Path, sizes: dict[str, int]) -> None:
    """Cut each log back to its size at the checkpoint: lines of lost steps disappear."""
    for name, size in sizes.items():
        path = Path(run_dir) / name
        if path.exists() and path.stat().st_size > size:
            with open(path, "r+b") as f:
                f.truncate(size)
