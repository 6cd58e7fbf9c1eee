"""Checkpoints in the run directory, written so that a crash never leaves a half-written one.

    logs/runs/<run>/checkpoints/step_000010/
        adapters.safetensors    trainable weights (LoRA adapters, or every weight for a full fine-tune)
        optimizer.safetensors   AdamW moments and step
        state.json              step, data cursor, RNG states, metric accumulators, teacher usage,
                                rubric version, and the size of every log file at this step: plain
                                JSON, which no renamed class can break

A checkpoint is written into a hidden temp directory, each file fsynced, then renamed into place:
a directory named step_* is always complete. Resuming truncates the logs back to the sizes saved
with it, so steps after the checkpoint that a crash left in the logs are redone, not duplicated.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from mlx_grpo.errors import UserInputError
from mlx_grpo.fileio import fsync_path

CHECKPOINTS = "checkpoints"
STATE = "state.json"
OLD_STATE = "state.pkl"  # written by earlier versions, which pickled whole objects


def save_checkpoint(run_dir: Path, step: int, model, optimizer, state: dict, keep: int) -> Path:
    """Write checkpoint `step` atomically and keep only the newest `keep` (0 = all)."""
    return commit_checkpoint(run_dir, step, write_weights(run_dir, step, model, optimizer), state, keep)


def write_weights(run_dir: Path, step: int, model, optimizer) -> Path:
    """The first part of checkpoint `step`: its weights and moments, into a hidden temp directory."""
    root = Path(run_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".step_{step:06d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    weights = dict(tree_flatten(model.trainable_parameters()))
    moments = dict(tree_flatten(optimizer.state))
    mx.eval(weights, moments)
    mx.save_safetensors(str(tmp / "adapters.safetensors"), weights)
    mx.save_safetensors(str(tmp / "optimizer.safetensors"), moments)
    return tmp


def commit_checkpoint(run_dir: Path, step: int, tmp: Path, state: dict, keep: int) -> Path:
    """The rest: the state beside the weights in `tmp`, everything fsynced, then renamed into place
    (only then is it a checkpoint); the newest `keep` are kept (0 = all)."""
    root = Path(run_dir) / CHECKPOINTS
    final = root / f"step_{step:06d}"
    (tmp / STATE).write_text(json.dumps({"step": step, **state}))
    for name in ("adapters.safetensors", "optimizer.safetensors", STATE):
        fsync_path(tmp / name)
    if final.exists():  # the same step saved again (e.g. the final save right after a periodic one)
        shutil.rmtree(final)
    os.rename(tmp, final)
    fsync_path(root)
    if keep > 0:
        for old in sorted(complete_checkpoints(run_dir))[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def complete_checkpoints(run_dir: Path) -> list[Path]:
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step_*") if (p / STATE).is_file() or (p / OLD_STATE).is_file())


def latest_checkpoint(run_dir: Path) -> Path:
    found = complete_checkpoints(run_dir)
    if not found:
        raise UserInputError(f"--resume: {run_dir} has no complete checkpoint to resume from")
    return found[-1]


def load_checkpoint(path: Path, model, optimizer) -> dict:
    """Put the checkpoint's weights into `model` and moments into `optimizer`; return its state."""
    state = read_state(path)  # first: an unreadable checkpoint changes nothing
    weights = mx.load(str(path / "adapters.safetensors"))
    model.load_weights(list(weights.items()), strict=False)
    optimizer.state = tree_unflatten(list(mx.load(str(path / "optimizer.safetensors")).items()))
    mx.eval(model.parameters(), optimizer.state)
    return state


def check_resumable(path: Path) -> None:
    """Refuse a checkpoint written by an earlier version (state.pkl), without reading it."""
    path = Path(path)
    if not (path / STATE).is_file() and (path / OLD_STATE).is_file():
        raise UserInputError(f"--resume: {path} was written by an earlier version of mlx-grpo (state.pkl) and "
                             "cannot be resumed by this one; start a new run (its adapters.safetensors still load)")


def read_state(path: Path) -> dict:
    """A checkpoint's state.json: its step, log sizes, cursors and accumulators."""
    check_resumable(path)
    return json.loads((Path(path) / STATE).read_text())


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


class GlobalRandom:
    """Python's and NumPy's global random state, as plain lists. (MLX's is reseeded every step.)"""

    def state_dict(self) -> dict:
        version, internal, gauss = random.getstate()
        kind, keys, pos, has_gauss, cached = np.random.get_state()
        return {"python": [version, list(internal), gauss],
                "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)]}

    def load_state_dict(self, state: dict) -> None:
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
        kind, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


class Checkpointer:
    """Saves the policy's weights and moments with the state of every owner, and gives it back.

    owners: name -> object with state_dict() / load_state_dict(state); each checkpoint holds
    {name: owner.state_dict()} plus the sizes of the run's log files. Only rank 0 writes.
    """

    def __init__(self, run_dir: Path, policy, owners: dict, log_files: tuple[str, ...], keep: int,
                 enabled: bool = True):
        self.run_dir, self.policy, self.owners, self.log_files = Path(run_dir), policy, owners, log_files
        self.keep, self.enabled = keep, enabled
        self.saved_step = 0
        self._pending: Path | None = None  # the temp directory of a checkpoint whose weights are written

    def write_weights(self, step: int) -> float:
        """Checkpoint `step`'s weights, adapters and moments, before its record is logged, so the
        record holds the time they took (timing_s/save_checkpoint); returns those seconds."""
        self.saved_step = step
        if not self.enabled:
            return 0.0
        begin = time.perf_counter()
        self.policy.save_adapters(self.run_dir)
        self._pending = write_weights(self.run_dir, step, self.policy.model, self.policy.optimizer)
        return time.perf_counter() - begin

    def commit(self, step: int) -> None:
        """Finish checkpoint `step` once its record is logged: every owner's state and the log
        files' sizes, which include that record, so a resume neither loses nor repeats it."""
        if not self.enabled:
            return
        state = {name: owner.state_dict() for name, owner in self.owners.items()}
        commit_checkpoint(self.run_dir, step, self._pending, keep=self.keep, state={
            **state, "log_sizes": log_sizes([self.run_dir / name for name in self.log_files])})

    def restore(self, path: Path) -> int:
        """Load checkpoint `path` into the policy and every owner; returns its step."""
        saved = load_checkpoint(path, self.policy.model, self.policy.optimizer)
        for name, owner in self.owners.items():
            owner.load_state_dict(saved[name])
        self.saved_step = saved["step"]
        return saved["step"]
