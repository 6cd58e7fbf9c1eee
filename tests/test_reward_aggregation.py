"""grpo.reward_aggregation: normalize_then_sum (GDPO), against the formula in numpy and on the math rubric."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from mlx_grpo import grpo
from mlx_grpo.config import Config
from mlx_grpo.errors import UserInputError
from mlx_grpo.rewards import load_rubric, score_completions

MATH = Path(__file__).resolve().parent.parent / "rubrics" / "math.yaml"


def by_hand(columns, weights, G, eps=1e-4):
    summed = np.zeros(len(columns[0]))
    for column, weight in zip(columns, weights):
        groups = np.asarray(column, dtype=np.float64).reshape(-1, G)
        dev = groups - groups.mean(axis=1, keepdims=True)
        norm = dev / (groups.std(axis=1, keepdims=True) + eps)
        summed += weight * norm.reshape(-1)
    summed /= sum(weights)
    return summed / (summed.std() + eps)


def test_normalize_then_sum_by_hand():
    a = [1.0, 0.0, 1.0, 0.0, 0.5, 0.5, 0.5, 0.5]  # second group all equal: that criterion adds 0 there
    b = [0.9, 1.0, 0.9, 1.0, 0.2, 0.4, 0.6, 0.8]
    got = np.array(grpo.normalize_then_sum([a, b], [0.7, 0.3], 4))
    np.testing.assert_allclose(got, by_hand([a, b], [0.7, 0.3], 4), rtol=1e-5, atol=1e-6)


def test_invalid_rows_get_nothing_and_count_for_nothing():
    a = [1.0, 0.0, np.nan, 0.0]
    valid = mx.array([True, True, False, True])
    got = np.array(grpo.normalize_then_sum([a], [1.0], 4, valid=valid))
    assert got[2] == 0
    expected = by_hand([[1.0, 0.0, 0.0]], [1.0], 3)
    np.testing.assert_allclose(got[[0, 1, 3]], expected, rtol=1e-5)


def test_on_the_math_rubric_a_low_spread_answer_is_no_longer_drowned():
    # One group: two right answers without tags (Answer 0.5 x 0.7 = 0.35 of reward) and two tidy
    # wrong answers (format 0.3 + near-miss credit 0.112 = 0.412). Summed, the tidy wrong answers
    # win. Normalised per criterion, Answer's weight 0.7 outvotes the format's 0.3, whatever the
    # spreads, and the right answers win.
    rubric = load_rubric(MATH)
    sample = {"prompt": "What is 2 + 3?", "answer": "5"}
    completions = ["5", "the answer is 5",
                   "<reasoning>\n2 + 3\n</reasoning>\n<answer>\n6\n</answer>",
                   "<reasoning>\n2 + 3\n</reasoning>\n<answer>\n4\n</answer>"]
    scored = score_completions(rubric, [sample] * 4, completions)
    summed = np.array(grpo.group_advantages(mx.array(scored.rewards), 4))
    columns = list(scored.criterion_scores.values())
    weights = [scored.weights[name] for name in scored.criterion_scores]
    per_criterion = np.array(grpo.normalize_then_sum(columns, weights, 4))
    np.testing.assert_allclose(per_criterion, by_hand(columns, weights, 4), rtol=1e-5, atol=1e-6)
    assert scored.rewards.tolist() == pytest.approx([0.35, 0.35, 0.412, 0.412], abs=1e-3)
    assert np.sign(summed).tolist() == [-1, -1, 1, 1]
    assert np.sign(per_criterion).tolist() == [1, 1, -1, -1]


def test_refused_where_it_does_not_apply():
    for section, key, value, fragment in [
            ("rollout", "sgrpo", True, "does not go with rollout.sgrpo"),
            ("grpo", "overlong_penalty", 0.5, "does not go with grpo.overlong_penalty"),
            ("grpo", "scale_rewards", "none", "grpo.scale_rewards does not apply")]:
        cfg = Config()
        cfg.grpo.reward_aggregation = "normalize_then_sum"
        setattr(getattr(cfg, section), key, value)
        with pytest.raises(UserInputError, match=fragment):
            cfg.validate()


def test_it_trains_through_the_trainer(tmp_path, monkeypatch):
    from test_seed_capabilities import make_items, tiny_run

    common = {"train.steps": 2, "rollout.max_new_tokens": 12}
    runs = [tiny_run(tmp_path / name, {**common, **extra}, make_items(12), monkeypatch=monkeypatch)
            for name, extra in [("sum", {}), ("per_criterion", {"grpo.reward_aggregation": "normalize_then_sum"})]]
    first = [[r for r in records if "actor/pg_loss" in r][0] for records in runs]
    assert first[0]["critic/score/mean"] == first[1]["critic/score/mean"]
    assert np.isfinite(first[1]["actor/pg_loss"]) and first[0]["critic/advantages/max"] != first[1]["critic/advantages/max"]
