"""grpo.overlong_penalty: DAPO's soft overlong punishment, by hand and in a run."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from mlx_grpo.config import load_config  # noqa: E402
from mlx_grpo.errors import UserInputError  # noqa: E402
from mlx_grpo.grpo import overlong_penalty  # noqa: E402
from test_seed_capabilities import make_items, tiny_run  # noqa: E402


def test_overlong_penalty_by_hand():
    # max 10 tokens, a ramp of 4: free up to 6 tokens, then -0.5 x (length - 6) / 4.
    assert overlong_penalty([3, 6, 7, 8, 10], 10, 4, 0.5).tolist() == [0.0, 0.0, -0.125, -0.25, -0.5]
    assert overlong_penalty([10, 10], 10, 10, 0.0).tolist() == [0.0, 0.0]  # off
    assert overlong_penalty([12], 10, 4, 1.0).tolist() == [-1.0]  # an S-GRPO exit may run past the budget


def test_bad_overlong_settings_are_one_line_errors():
    with pytest.raises(UserInputError, match="grpo.overlong_buffer must be between 1 and rollout.max_new_tokens"):
        load_config(None, {"grpo.overlong_penalty": 1.0, "grpo.overlong_buffer": 64, "rollout.max_new_tokens": 8})
    with pytest.raises(UserInputError, match="grpo.overlong_penalty must be >= 0"):
        load_config(None, {"grpo.overlong_penalty": -1.0})


def test_the_penalty_is_added_to_the_reward_and_logged(tmp_path, monkeypatch):
    options = {"train.steps": 3, "rollout.max_new_tokens": 12, "grpo.overlong_penalty": 1.0, "grpo.overlong_buffer": 6}
    records = tiny_run(tmp_path / "on", options, make_items(12), monkeypatch=monkeypatch)
    assert any(r["rewards/overlong_penalty_mean"] < 0 for r in records)
    for r in records:
        assert r["critic/rewards/mean"] - r["critic/score/mean"] == pytest.approx(r["rewards/overlong_penalty_mean"],
                                                                                   abs=1e-5)
        # The longest completion of the step took the penalty its length says.
        longest = r["response_length/max"]
        assert r["critic/rewards/min"] <= r["critic/score/max"] + float(overlong_penalty([longest], 12, 6, 1.0)[0]) + 1e-6
    off = tiny_run(tmp_path / "off", {"train.steps": 3, "rollout.max_new_tokens": 12}, make_items(12),
                   monkeypatch=monkeypatch)
    assert all("rewards/overlong_penalty_mean" not in r and r["critic/rewards/mean"] == r["critic/score/mean"]
               for r in off)
    # The penalty changed what the update saw.
    assert [r["Train/Loss"] for r in records] != [r["Train/Loss"] for r in off]
