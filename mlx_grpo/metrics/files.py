"""Plain-file sinks in the run directory: metrics.jsonl and the human learning.log."""

from __future__ import annotations

import json
import time
from pathlib import Path


class JsonlSink:
    """One JSON object per step, flushed at once so a crash loses nothing already logged."""

    def __init__(self, path: str | Path):
        self.file = open(path, "a", encoding="utf-8")

    def log(self, step: int, record: dict[str, float]) -> None:
        self.file.write(json.dumps({"step": step, "time": time.time(), **record}) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


class LearningLogSink:
    """One human-readable line per step in the seed's format, for `tail -f learning.log`:
    [Epoch 0.02]  loss=0.0123  grad=0.4567  lr=2.00e-04  reward=0.512±0.201  Answer_rew=0.250  frac_zero_std=0.50
    """

    def __init__(self, path: str | Path):
        self.file = open(path, "a", encoding="utf-8")

    def log(self, step: int, record: dict[str, float]) -> None:
        nan = float("nan")
        parts = [
            f"[Epoch {record.get('epoch', nan):.2f}]",
            f"loss={record.get('Train/Loss', nan):.4f}",
            f"grad={record.get('actor/grad_norm', nan):.4f}",
            f"lr={record.get('actor/lr', nan):.2e}",
            f"reward={record.get('Train/AvgReward', nan):.3f}±{record.get('Train/RewardStd', nan):.3f}",
        ]
        # Criteria come from the record, so a rubric edited mid-run shows its new criteria.
        parts += [f"{tag[len('Scoring/'):-len('_score')]}_rew={value:.3f}" for tag, value in record.items()
                  if tag.startswith("Scoring/") and tag.endswith("_score")]
        parts.append(f"frac_zero_std={record.get('frac_reward_zero_std', nan):.2f}")
        self.file.write("  ".join(parts) + "\n")
        self.file.flush()

    def log_text(self, step: int, tag: str, text: str) -> None:
        self.file.write(f"[step {step}] {tag}: {' '.join(text.split())}\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()
