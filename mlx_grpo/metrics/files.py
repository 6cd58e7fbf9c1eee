"""Plain-file sinks in the run directory: metrics.jsonl and the human learning.log."""

from __future__ import annotations

import json
import time
from pathlib import Path


class JsonlSink:
    """One JSON object per step, flushed at once so a crash loses nothing already logged.

    `keys`, if given, keeps only those entries (batch_metrics.jsonl holds just pass_at_1 and
    pass_at_all). Arrays (histograms) are left out; TensorBoard and W&B have them.
    """

    def __init__(self, path: str | Path, keys: tuple[str, ...] | None = None):
        self.file = open(path, "a", encoding="utf-8")
        self.keys = keys

    def log(self, step: int, record: dict) -> None:
        values = {k: v for k, v in record.items() if isinstance(v, (int, float))
                  and (self.keys is None or k in self.keys)}
        if self.keys is not None and not values:
            return
        self.file.write(json.dumps({"step": step, "time": time.time(), **values}) + "\n")
        self.file.flush()


    def close(self) -> None:
        self.file.close()


class LearningLogSink:
    """One human-readable line per step in the seed's format, for `tail -f learning.log`:
    [Epoch 0.02]  loss=0.0123  grad=0.4567  lr=2.00e-04  reward=0.512±0.201  Answer_rew=0.250±0.433  entropy=0.812  frac_zero_std=0.50
    Notices (rubric reloads, health warnings) go in between, as "[step N] tag: text" lines.
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
        for tag, value in record.items():
            if tag.startswith("Scoring/") and tag.endswith("_score"):
                name = tag[len("Scoring/"):-len("_score")]
                parts.append(f"{name}_rew={value:.3f}±{record.get(f'Scoring/{name}_std', 0.0):.3f}")
        parts.append(f"entropy={record.get('actor/entropy_loss', nan):.3f}")
        parts.append(f"frac_zero_std={record.get('frac_reward_zero_std', nan):.2f}")
        self.file.write("  ".join(parts) + "\n")
        held_out = {tag[len("eval/"):]: value for tag, value in record.items() if tag.startswith("eval/")}
        if held_out:  # the held-out evaluation of this step, on a line of its own
            self.file.write(f"[eval step {step}]  " + "  ".join(
                f"{name}={value:.3f}" for name, value in held_out.items() if not name.startswith("num_")) + "\n")
        self.file.flush()

    def log_text(self, step: int, tag: str, text: str) -> None:
        if tag.startswith("Samples/"):
            return  # sample completions are in completions.jsonl; here they would drown the metrics
        self.file.write(f"[step {step}] {tag}: {' '.join(text.split())}\n")
        self.file.flush()

    def log_summary(self, step: int, scalars: dict[str, float], rows: list[list]) -> None:
        for name, mean, std, lo, hi, n in rows:
            self.file.write(f"[final] {name}: mean={mean:.3f} std={std:.3f} min={lo:.3f} max={hi:.3f} samples={n}\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()
