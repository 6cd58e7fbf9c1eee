"""rollout.adaptive_window: each step's generation budget (max_new_tokens) follows the lengths of
the recent successful completions, so a step does not pay for tokens that correct answers never
need. With probability epsilon a step explores at the full maximum instead, which keeps a window
that has become too small from hiding the longer answers that would need more room.

"Success" is the pass@1 rule: the correctness criterion reaches reward.correct_threshold.
"""

from __future__ import annotations

import random
from collections import deque

import numpy as np


def window_from_lengths(lengths, percentile: float, margin: int, low: int, high: int) -> int:
    """The budget for successful completions of these lengths: their percentile plus a margin,
    clamped to [low, high]; `high` when there are none yet."""
    if len(lengths) == 0:
        return high
    return int(np.clip(int(np.ceil(np.percentile(lengths, percentile))) + margin, low, high))


class AdaptiveWindow:
    """Chooses the window of each step (`window_for`) and learns from its results (`observe`).

    Exploration is decided by (seed, step) alone, so a resumed run explores on the same steps.
    """

    # The window covers the 95th percentile of the latest 256 successful lengths plus 4 tokens, is
    # never below 4 tokens, and one step in ten explores at the full budget: enough room for the
    # typical answer, and a steady chance to find out that longer ones succeed.
    def __init__(self, seed: int, max_tokens: int, min_tokens: int = 4, margin: int = 4, percentile: float = 95.0,
                 epsilon: float = 0.1, history: int = 256, ema: float = 0.9):
        self.seed, self.max_tokens, self.min_tokens = seed, max_tokens, min(min_tokens, max_tokens)
        self.margin, self.percentile, self.epsilon, self.ema_decay = margin, percentile, epsilon, ema
        self.success_lengths: deque = deque(maxlen=history)  # lengths of the latest successes, all steps
        self.success_rate_ema: float | None = None
        self.steps = self.explored_steps = 0
        self.cumulative_reward = 0.0
        self.successes = self.scored = 0

    def window_for(self, step: int) -> tuple[int, bool]:
        """(max_new_tokens for this step, whether it explores at the maximum)."""
        if random.Random(f"window:{self.seed}:{step}").random() < self.epsilon:
            return self.max_tokens, True
        return window_from_lengths(list(self.success_lengths), self.percentile, self.margin,
                                   self.min_tokens, self.max_tokens), False

    def observe(self, window: int, explored: bool, lengths: np.ndarray, success: np.ndarray,
                valid: np.ndarray, rewards: np.ndarray) -> dict:
        """Learn from one step's completions (every rank's); returns the adaptive_window/* scalars."""
        good = lengths[success & valid].astype(float)
        self.success_lengths.extend(good.tolist())
        rate = float(good.size / valid.sum()) if valid.any() else 0.0
        self.success_rate_ema = rate if self.success_rate_ema is None else (
            self.ema_decay * self.success_rate_ema + (1 - self.ema_decay) * rate)
        self.steps += 1
        self.explored_steps += int(explored)
        self.cumulative_reward += float(rewards[valid].mean()) if valid.any() else 0.0
        self.successes += int(good.size)
        self.scored += int(valid.sum())
        stats = (good.mean(), np.median(good), good.std(), np.percentile(good, 95)) if good.size else (0.0,) * 4
        return {
            "adaptive_window/current_window": float(window),
            "adaptive_window/mean_success_length": float(stats[0]),
            "adaptive_window/median_success_length": float(stats[1]),
            "adaptive_window/std_success_length": float(stats[2]),
            "adaptive_window/p95_success_length": float(stats[3]),
            "adaptive_window/num_success_samples": float(good.size),
            "adaptive_window/success_rate": rate,
            "adaptive_window/success_rate_ema": self.success_rate_ema,
            "adaptive_window/exploration_rate": self.explored_steps / self.steps,
            "adaptive_window/epsilon": self.epsilon,
            # The sum over steps of each step's mean reward.
            "adaptive_window/cumulative_reward": self.cumulative_reward,
            "adaptive_window/cumulative_success_rate": self.successes / max(self.scored, 1),
            "adaptive_window/explored_step": float(explored),
        }

    def state_dict(self) -> dict:
        return {"success_lengths": list(self.success_lengths), "success_rate_ema": self.success_rate_ema,
                "steps": self.steps, "explored_steps": self.explored_steps,
                "cumulative_reward": self.cumulative_reward, "successes": self.successes, "scored": self.scored}

    def load_state_dict(self, state: dict) -> None:
        self.success_lengths = deque(state["success_lengths"], maxlen=self.success_lengths.maxlen)
        self.success_rate_ema = state["success_rate_ema"]
        self.steps, self.explored_steps = state["steps"], state["explored_steps"]
        self.cumulative_reward = state["cumulative_reward"]
        self.successes, self.scored = state["successes"], state["scored"]
