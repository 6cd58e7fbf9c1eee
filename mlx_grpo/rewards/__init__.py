"""Rewards: rubric loading, programmatic checks, the teacher client, and scoring."""

from mlx_grpo.rewards.checks import CHECKS
from mlx_grpo.rewards.rubric import Criterion, Rubric, RubricWatcher, describe_rubric, load_rubric
from mlx_grpo.rewards.scoring import (RewardBatch, Scorer, TeacherUnavailable, contiguous_groups,
                                      score_completions)

__all__ = ["CHECKS", "Criterion", "RewardBatch", "Rubric", "RubricWatcher", "Scorer", "TeacherUnavailable",
           "contiguous_groups", "describe_rubric", "load_rubric", "score_completions"]
