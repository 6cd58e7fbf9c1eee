"""Cross-step metrics: speed percentiles, epochs, pass rates, reward windows, the final summary;
and when the W&B mirror turns on."""

from __future__ import annotations

import numpy as np
import pytest

from mlx_grpo.config import load_config
from mlx_grpo.metrics.tracker import EpochStats, MetricsTracker, pass_rates, speed_stats
from mlx_grpo.metrics.wandb_sink import run_config, wandb_enabled
from mlx_grpo.rewards.correct import CorrectRule
from mlx_grpo.rewards.scoring import RewardBatch


def test_speed_stats_p99_is_the_slow_tail():
    speeds = [100.0] * 99 + [1.0]
    stats = speed_stats("Generation", speeds)
    assert stats["Performance/Generation_AvgTokensPerSec"] == pytest.approx(99.01)
    assert stats["Performance/Generation_P50TokensPerSec"] == 100.0
    assert stats["Performance/Generation_MinTokensPerSec"] == 1.0
    assert stats["Performance/Generation_P99TokensPerSec"] == pytest.approx(np.percentile(speeds, 1))
    assert stats["Performance/Generation_P99TokensPerSec"] < 100.0  # the stall shows
    assert speed_stats("Backprop", []) == {}


def test_pass_rates_by_hand():
    # Prompt A: 1 of 4 correct; prompt B: 2 of 4; prompt C: none (and one masked).
    correct = np.array([1, 0, 0, 0, 1, 1, 0, 0, 0, 0, 0, 1], dtype=bool)
    valid = np.array([1] * 8 + [1, 1, 1, 0], dtype=bool)
    rates = pass_rates(correct, valid, 4)
    assert rates["pass_at_1"] == pytest.approx((0.25 + 0.5 + 0.0) / 3)
    assert rates["pass_at_all"] == pytest.approx(2 / 3)
    assert pass_rates(correct, np.zeros(12, dtype=bool), 4) == {}


def test_epochs_close_after_a_pass_and_report_trends():
    epochs = EpochStats(prompts_per_epoch=2)
    assert epochs.add(np.array([0.2, 0.4]), loss=1.0, api_tokens=100, num_prompts=1) is None
    first = epochs.add(np.array([0.6, 0.8]), loss=0.5, api_tokens=50, num_prompts=1)
    assert first["Epoch/AvgReward"] == pytest.approx(0.5)
    assert first["Epoch/AvgLoss"] == pytest.approx(0.75)
    assert first["Epoch/RewardVariance"] == pytest.approx(np.var([0.2, 0.4, 0.6, 0.8]))
    assert first["Epoch/RewardTrend"] == 0.0 and first["Epoch/LossTrend"] == 0.0  # nothing to compare with
    assert first["Epoch/APITokens"] == 150 and first["Epoch/NumSamples"] == 4
    epochs.add(np.array([0.9]), loss=0.25, api_tokens=10, num_prompts=1)
    second = epochs.close()  # a partial epoch at the end of a run
    assert second["Epoch/RewardTrend"] == pytest.approx(0.4)
    assert second["Epoch/LossTrend"] == pytest.approx(0.5)  # loss went down: positive
    assert second["Epoch/NumSamples"] == 1
    assert epochs.close() is None


def batch(scores, valid=None):
    scores = {k: np.asarray(v, dtype=np.float32) for k, v in scores.items()}
    n = len(next(iter(scores.values())))
    valid = np.ones(n, dtype=bool) if valid is None else np.asarray(valid, dtype=bool)
    rewards = np.where(valid, np.mean(list(scores.values()), axis=0), np.nan).astype(np.float32)
    return RewardBatch(rewards=rewards, criterion_scores=scores, valid=valid)


def test_reward_tags_recent_means_histograms_and_final_summary():
    tracker = MetricsTracker(rubric_name="r", group_size=2, prompts_per_epoch=100, histogram_every=2)
    steps = [batch({"A": [1, 0, 1, 1], "B": [0.5, 0.5, 0.0, 1.0]}),
             batch({"A": [0, 0, 1, 0], "B": [0.2, 0.4, 0.6, 0.8]}, valid=[1, 1, 1, 0]),
             batch({"A": [1, 1, 1, 1], "B": [1.0, 1.0, 1.0, 1.0]})]
    out = []
    for step, scored in enumerate(steps, start=1):
        correct = CorrectRule("A", 1.0).mask(scored, rubric=None)
        out.append(tracker.update(step, {"Train/Loss": 0.1}, scored, 2, 50.0 + step, None, correct,
                                  np.zeros(4, dtype=bool), np.full(4, 10)))
    one, two, three = out
    assert one["rewards/A_mean"] == 0.75 and one["rewards/A_max"] == 1.0 and one["rewards/A_min"] == 0.0
    assert one["criteria/r/B_mean"] == 0.5
    assert one["rewards/total_mean"] == pytest.approx(0.75 + 0.5)  # the sum of the criteria's means
    assert one["train/step"] == 1.0
    assert one["pass_at_1"] == pytest.approx((0.5 + 1.0) / 2) and one["pass_at_all"] == 1.0
    assert two["rewards/A_mean"] == pytest.approx(1 / 3)  # the masked row is left out
    # recent_mean: the last 10 scores (4 + 3 + 3 of the third step's 4).
    assert three["rewards/A_recent_mean"] == pytest.approx(np.mean([0, 1, 1, 0, 0, 1, 1, 1, 1, 1]))
    # Histograms: every 2 steps, once 10 samples exist.
    assert not any(k.endswith("_hist") for k in one)
    assert not any(k.endswith("_hist") for k in two)  # only 7 samples by step 2
    assert "rewards/A_hist" not in three  # step 3 is not a multiple of 2
    assert "Performance/Backprop_AvgTokensPerSec" not in three  # no update measured yet
    assert three["Performance/Generation_AvgTokensPerSec"] == pytest.approx(52.0)
    final, rows = tracker.finish()
    assert final["final/A_total_samples"] == 11 and final["final/A_mean"] == pytest.approx(8 / 11)
    names = [row[0] for row in rows]
    assert names == ["r/A", "r/B", "rubric"]
    assert rows[0][5] == 11


def test_running_stats_agree_with_numpy_over_every_score():
    from mlx_grpo.metrics.tracker import RunningStats

    rng = np.random.default_rng(0)
    chunks = [rng.random(rng.integers(0, 9)).astype(np.float32) for _ in range(200)]
    running = RunningStats()
    for chunk in chunks:
        running.add(chunk)
    every = np.concatenate(chunks).astype(np.float64)
    assert running.count == every.size
    assert running.mean == pytest.approx(every.mean(), rel=1e-12)
    assert running.std == pytest.approx(every.std(), rel=1e-9)
    assert (running.low, running.high) == (every.min(), every.max())


def test_the_tracker_state_is_bounded(tmp_path):
    """A checkpoint's tracker state after 10,000 steps is the size it was after 100 (the scores and the
    speeds were kept whole, and re-saved at every checkpoint). The epoch in progress keeps its own
    rewards, at most an epoch's."""
    import json

    tracker = MetricsTracker(rubric_name="r", group_size=4, prompts_per_epoch=80, histogram_every=10)
    rng = np.random.default_rng(1)
    sizes = {}
    for step in range(1, 10_001):
        scored = batch({"A": rng.random(8), "B": rng.random(8)})
        tracker.update(step, {"Train/Loss": 0.1}, scored, 2, 50.0 + rng.random(), 20.0 + rng.random(),
                       np.zeros(8, dtype=bool), np.zeros(8, dtype=bool), np.full(8, 10))
        if step in (100, 10_000):
            sizes[step] = len(json.dumps(tracker.state_dict()))
    assert sizes[10_000] < 1.2 * sizes[100]  # past the speed window, nothing grows
    assert sizes[10_000] < 20_000
    restored = MetricsTracker(rubric_name="r", group_size=4, prompts_per_epoch=80, histogram_every=10)
    restored.load_state_dict(json.loads(json.dumps(tracker.state_dict())))
    assert restored.finish() == tracker.finish()


def test_histogram_appears_once_ten_samples_exist():
    tracker = MetricsTracker(rubric_name="r", group_size=4, prompts_per_epoch=100, histogram_every=2)
    scored = batch({"A": [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]})
    none = np.zeros(6, dtype=bool)
    tracker.update(1, {}, scored, 1, 1.0, 1.0, none, none, np.ones(6))
    second = tracker.update(2, {}, scored, 1, 1.0, 1.0, none, none, np.ones(6))
    assert second["rewards/A_hist"].shape == (12,) and second["rewards/rubric_hist"].shape == (12,)


def test_wandb_turns_on_with_a_key_or_a_mode(monkeypatch):
    for var in ("WANDB_API_KEY", "WANDB_MODE"):
        monkeypatch.delenv(var, raising=False)
    assert not wandb_enabled(load_config(None))
    monkeypatch.setenv("WANDB_API_KEY", "x")
    assert wandb_enabled(load_config(None))
    assert not wandb_enabled(load_config(None, {"logging.wandb": "off"}))  # --no-wandb
    monkeypatch.delenv("WANDB_API_KEY")
    assert wandb_enabled(load_config(None, {"logging.wandb": "offline"}))
    assert wandb_enabled(load_config(None, {"logging.wandb": True}))  # YAML true means on
    config = run_config(load_config(None))
    assert config["num_generations"] == 8 and config["use_lora"] is True and "mlx_grpo" in config
