"""Difficulty levels: per-level accuracy (difficulty/{level}_acc, _count) and the curriculum that
samples easier levels first.

An item's level is its "difficulty" field: the built-in tasks set it (largest: how many numbers
the list has; arithmetic: how many operations; coding: the reference solution's size), and a
JSONL row may carry one (a number or a short name).
"""

from __future__ import annotations

import re
from collections import deque

import numpy as np

from mlx_grpo.data import PromptSampler
from mlx_grpo.errors import UserInputError


def level_order(label) -> tuple:
    """Sort key: numeric levels by value, before named ones in alphabetical order."""
    return (0, float(label), "") if isinstance(label, (int, float)) else (1, 0.0, str(label))


def difficulty_levels(items: list[dict]) -> list:
    """The distinct difficulty labels of `items`, easiest first ([] when none carries one)."""
    return sorted({item["difficulty"] for item in items if item.get("difficulty") is not None}, key=level_order)


def level_tag(label) -> str:
    """A label as it appears in a tag: difficulty/3_acc, difficulty/hard_acc."""
    return re.sub(r"[^\w.-]+", "_", str(label))


def level_indices(samples: list[dict], levels: list) -> np.ndarray:
    """Each sample's index in `levels` (-1 when it has no label, or one not in `levels`)."""
    position = {label: i for i, label in enumerate(levels)}
    return np.array([position.get(s.get("difficulty"), -1) for s in samples], dtype=np.int64)


def difficulty_metrics(levels: list, indices: np.ndarray, correct: np.ndarray, valid: np.ndarray) -> dict:
    """difficulty/{level}_acc (correct among the scored completions of that level, by the pass@1
    rule) and difficulty/{level}_count (completions of that level), for each level present."""
    record = {}
    for i, label in enumerate(levels):
        at = indices == i
        if not at.any():
            continue
        scored = at & valid
        record[f"difficulty/{level_tag(label)}_count"] = float(at.sum())
        if scored.any():
            record[f"difficulty/{level_tag(label)}_acc"] = float(correct[scored].mean())
    return record


class Curriculum:
    """data.curriculum: prompts come from the easiest level first; once that level's recent
    accuracy (over its last `window` scored completions) reaches `threshold`, the next level joins
    the pool. Earlier levels stay in the pool, so they are still practised.

    It sees a step's results after the step (`observe`): with rollout.pipeline the batch sampled
    during a step is drawn before that step's results are known, one step behind.
    """

    def __init__(self, items: list[dict], seed: int, threshold: float, window: int = 64):
        self.items, self.seed, self.threshold = items, seed, threshold
        self.levels = difficulty_levels(items)
        if len(self.levels) < 2:
            raise UserInputError("data.curriculum needs a dataset with at least two difficulty levels; "
                                 f"this one has {len(self.levels)} (e.g. largest with task.min_list_size 3 "
                                 "and task.list_size 5, or arithmetic with task.max_ops 3)")
        self.level = 0  # index into self.levels of the hardest level in the pool
        self.recent: deque = deque(maxlen=window)  # correct (1.0) or not, the current level's latest
        self.sampler = self._sampler()

    def _sampler(self) -> PromptSampler:
        unlocked = set(self.levels[:self.level + 1])
        pool = [item for item in self.items if item.get("difficulty") in unlocked]
        return PromptSampler(pool, seed=f"{self.seed}:curriculum{self.level}")

    def next_batch(self, n: int) -> list[dict]:
        return self.sampler.next_batch(n)

    def observe(self, indices: np.ndarray, correct: np.ndarray, valid: np.ndarray) -> dict:
        """Count this step's completions of the current level; move up when it is mastered.
        Returns the curriculum/* scalars: the level the step was drawn at and its recent accuracy."""
        at = (indices == self.level) & valid
        self.recent.extend(correct[at].astype(float).tolist())
        record = {"curriculum/level_index": float(self.level),
                  "curriculum/recent_acc": float(np.mean(self.recent)) if self.recent else 0.0}
        label = self.levels[self.level]
        if isinstance(label, (int, float)):
            record["curriculum/level"] = float(label)
        full = len(self.recent) == self.recent.maxlen
        if full and record["curriculum/recent_acc"] >= self.threshold and self.level + 1 < len(self.levels):
            self.level += 1
            self.recent.clear()
            self.sampler = self._sampler()
        return record

    @property
    def current(self):
        return self.levels[self.level]

    def state_dict(self) -> dict:
        return {"level": self.level, "recent": list(self.recent), "sampler": self.sampler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.level = state["level"]
        self.recent = deque(state["recent"], maxlen=self.recent.maxlen)
        self.sampler = self._sampler()
        self.sampler.load_state_dict(state["sampler"])
