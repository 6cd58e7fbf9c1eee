"""Rewards: rubric loading and scoring completions with programmatic checks."""

from mlx_grpo.rewards.checks import CHECKS
from mlx_grpo.rewards.rubric import Criterion, Rubric, load_rubric
from mlx_grpo.rewards.scoring import RewardBatch, score_completions

__all__ = ["CHECKS", "Criterion", "RewardBatch", "Rubric", "load_rubric", "score_completions"]
