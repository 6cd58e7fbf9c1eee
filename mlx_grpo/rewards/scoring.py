"""Score a batch of completions with a rubric: per-criterion scores and the weighted reward."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mlx_grpo.errors import UserInputError
from mlx_grpo.rewards.checks import CHECKS
from mlx_grpo.rewards.rubric import Rubric


@dataclass
class RewardBatch:
    rewards: np.ndarray  # float32 (N,): sum(w_i * s_i) / sum(w_i), in [0, 1]
    criterion_scores: dict[str, np.ndarray]  # criterion name -> float32 (N,) in [0, 1]
    valid: np.ndarray  # bool (N,): False where a score could not be had (teacher failures, later)


def score_completions(rubric: Rubric, samples: list[dict], completions: list[str]) -> RewardBatch:
    """Run every criterion once on every (sample, completion) pair.

    A check's score outside [0, 1] is a bug in the check; it is clipped (NaN counts as 0) rather
    than allowed to skew the reward. A UserInputError from a check (e.g. a non-numeric answer)
    is re-raised naming the rubric and criterion.
    """
    if len(samples) != len(completions):
        raise ValueError(f"{len(samples)} samples but {len(completions)} completions")
    n = len(completions)
    weighted = np.zeros(n, dtype=np.float64)
    scores: dict[str, np.ndarray] = {}
    for criterion in rubric.criteria:
        if criterion.check is None:
            raise ValueError(f"criterion {criterion.name!r} is teacher-judged; not supported in this version")
        check = CHECKS[criterion.check]
        try:
            raw = [check(c, s, **criterion.params) for s, c in zip(samples, completions)]
        except UserInputError as err:
            raise UserInputError(f"{rubric.path}: {criterion.name}: {err}") from None
        column = np.nan_to_num(np.asarray(raw, dtype=np.float64), nan=0.0, posinf=1.0, neginf=0.0)
        column = np.clip(column, 0.0, 1.0)
        scores[criterion.name] = column.astype(np.float32)
        weighted += criterion.weight * column
    rewards = (weighted / rubric.total_weight).astype(np.float32)
    return RewardBatch(rewards=rewards, criterion_scores=scores, valid=np.ones(n, dtype=bool))
