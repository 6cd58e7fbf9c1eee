"""What counts as a correct completion: one rule, owned here, for every consumer.

pass@1 and pass@all, the eval accuracy, S-GRPO's exit rewards, the curriculum's level accuracy and
the adaptive window's successful lengths all read the same `CorrectRule` (reward.correct_criterion
and reward.correct_threshold). The trainer applies it once per step and hands the result on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from mlx_grpo.errors import UserInputError


@dataclass(frozen=True)
class CorrectRule:
    criterion: str = ""  # a rubric criterion; "" = the rubric's `correct:` one, else the total reward
    threshold: float = 1.0  # correct when that score is at least this

    @classmethod
    def from_config(cls, cfg) -> "CorrectRule":
        return cls(cfg.reward.correct_criterion, cfg.reward.correct_threshold)

    def criterion_of(self, rubric) -> str:
        """The criterion that decides under `rubric` ("" = the total reward)."""
        return self.criterion or rubric.correct

    def check(self, rubric) -> None:
        """A configured criterion must be one of the rubric's: one line naming the choices, else."""
        names = [c.name for c in rubric.criteria]
        if self.criterion and self.criterion not in names:
            raise UserInputError(f"reward.correct_criterion {self.criterion!r} is not a criterion of {rubric.path} "
                                 f"({', '.join(names)})")

    def mask(self, scored, rubric) -> np.ndarray:
        """Which completions of a RewardBatch are correct. The deciding criterion's score (the total
        reward when there is none, or when a rubric edit removed it) is at least the threshold;
        unscored completions are not correct."""
        criterion = self.criterion_of(rubric)
        values = scored.criterion_scores.get(criterion, scored.rewards) if criterion else scored.rewards
        return np.nan_to_num(values, nan=-math.inf) >= self.threshold
