"""HealthMonitor on synthetic metric streams that should and should not warn."""

import math

import numpy as np
import pytest

from mlx_grpo.metrics.health import HealthConfig, HealthMonitor


def healthy_record(step: int, rng: np.random.Generator) -> dict[str, float]:
    return {
        "frac_reward_zero_std": 0.3,
        "actor/entropy_loss": 0.5,
        "actor/grad_norm": 0.5 + 0.1 * rng.standard_normal(),
        "actor/update_skipped": 0.0,
        "response_length/clip_ratio": 0.05,
        "Train/AvgReward": 0.1 + 0.01 * step,
        "actor/kl_loss": 0.02,
        "actor/ppo_kl": 0.001,
        "actor/pg_clipfrac": 0.02,
    }


def run(monitor: HealthMonitor, records, start: int = 1):
    """Feeds records from step `start`; returns per-step (scalars, warnings)."""
    return [monitor.update(step, rec) for step, rec in enumerate(records, start)]


def all_warnings(results) -> list[str]:
    return [w for _, warnings in results for w in warnings]


def test_healthy_stream_is_silent():
    rng = np.random.default_rng(0)
    monitor = HealthMonitor()
    results = run(monitor, [healthy_record(s, rng) for s in range(1, 51)])
    assert all_warnings(results) == []
    for scalars, _ in results:
        assert set(scalars) == {f"health/{c}" for c in HealthMonitor.CHECKS} | {"health/warnings_total"}
        assert all(v == 0.0 for v in scalars.values())
    assert monitor.summary() == dict.fromkeys(HealthMonitor.CHECKS, 0)


def test_mode_collapse_episodes_warn_once_each():
    zero_std = [0.3] * 5 + [0.9] * 10 + [0.3] * 5 + [0.95] * 3 + [0.3] * 2
    monitor = HealthMonitor()
    results = run(monitor, [{"frac_reward_zero_std": z} for z in zero_std])

    warned_steps = [step for step, (_, w) in enumerate(results, 1) if w]
    assert warned_steps == [6, 21]  # first step of each collapse episode
    assert "frac_reward_zero_std=0.9 > 0.8" in results[5][1][0]
    flags = [s["health/mode_collapse"] for s, _ in results]
    assert flags == [1.0 if z > 0.8 else 0.0 for z in zero_std]
    assert results[-1][0]["health/warnings_total"] == 2.0
    assert results[10][0]["health/warnings_total"] == 1.0  # mid-episode: still one
    assert monitor.summary()["mode_collapse"] == 2


def test_entropy_floor_triggers_mode_collapse():
    monitor = HealthMonitor()
    _, warnings = monitor.update(3, {"frac_reward_zero_std": 0.2, "actor/entropy_loss": 0.005})
    assert len(warnings) == 1
    assert warnings[0].startswith("mode collapse at step 3")
    assert "entropy" in warnings[0] and "< 0.02" in warnings[0]
    assert "frac_reward_zero_std" not in warnings[0]
    scalars, warnings = monitor.update(4, {"frac_reward_zero_std": 0.2, "actor/entropy_loss": 0.3})
    assert scalars["health/mode_collapse"] == 0.0 and warnings == []


def grad(value: float, skipped: bool = False) -> dict[str, float]:
    return {"actor/grad_norm": value, "actor/update_skipped": 1.0 if skipped else 0.0}


def test_grad_spike_absolute():
    monitor = HealthMonitor()
    _, warnings = monitor.update(1, grad(15.0))
    assert len(warnings) == 1 and "grad_norm=15 > 10" in warnings[0]
    scalars, _ = monitor.update(2, grad(9.0))
    assert scalars["health/grad_spike"] == 0.0


def test_grad_spike_relative_to_running_median():
    monitor = HealthMonitor()
    run(monitor, [grad(0.5)] * 10)
    scalars, warnings = monitor.update(11, grad(2.0))  # 4x the median: below factor 5
    assert warnings == [] and scalars["health/grad_spike"] == 0.0
    scalars, warnings = monitor.update(12, grad(4.0))  # 8x the median
    assert scalars["health/grad_spike"] == 1.0
    assert len(warnings) == 1 and "median 0.5" in warnings[0] and "step 12" in warnings[0]


def test_grad_spike_needs_five_history_values():
    monitor = HealthMonitor()
    run(monitor, [grad(0.5)] * 4)
    scalars, _ = monitor.update(5, grad(4.0))  # only 4 earlier values: relative rule off
    assert scalars["health/grad_spike"] == 0.0


def test_grad_spike_ignores_skipped_updates():
    monitor = HealthMonitor()
    # Skipped steps neither warn nor count as history (so 4 real values: rule still off).
    results = run(monitor, [grad(0.5)] * 4 + [grad(50.0, skipped=True), grad(0.0, skipped=True)])
    assert all_warnings(results) == []
    scalars, _ = monitor.update(7, grad(4.0))
    assert scalars["health/grad_spike"] == 0.0
    # Absent grad norm (no update_skipped key either) is no data.
    scalars, _ = monitor.update(8, {})
    assert scalars["health/grad_spike"] == 0.0


def test_grad_spike_zero_median_is_not_a_baseline():
    monitor = HealthMonitor()
    run(monitor, [grad(0.0)] * 6)  # all-zero-advantage steps
    scalars, _ = monitor.update(7, grad(0.03))
    assert scalars["health/grad_spike"] == 0.0


def runaway(clip: float, reward: float) -> dict[str, float]:
    return {"response_length/clip_ratio": clip, "Train/AvgReward": reward}


def test_runaway_with_flat_reward_warns_once_window_is_full():
    monitor = HealthMonitor()  # window 5
    results = run(monitor, [runaway(0.9, 0.05)] * 8)
    flags = [s["health/runaway_completions"] for s, _ in results]
    assert flags == [0.0] * 4 + [1.0] * 4
    warnings = all_warnings(results)
    assert len(warnings) == 1 and warnings[0].startswith("runaway completions at step 5")
    assert "clip_ratio=0.9 > 0.5" in warnings[0]


def test_runaway_with_rising_reward_is_silent():
    monitor = HealthMonitor()
    results = run(monitor, [runaway(0.9, 0.1 + 0.05 * i) for i in range(10)])
    assert all_warnings(results) == []


def test_runaway_flat_reward_with_short_completions_is_silent():
    monitor = HealthMonitor()
    results = run(monitor, [runaway(0.1, 0.05)] * 10)
    assert all_warnings(results) == []


def test_runaway_window_needs_a_reward_every_step():
    monitor = HealthMonitor()
    records = [runaway(0.9, 0.05)] * 4 + [{"response_length/clip_ratio": 0.9}] + [runaway(0.9, 0.05)] * 4
    results = run(monitor, records)
    assert all_warnings(results) == []  # the gap keeps every 5-step window incomplete
    scalars, warnings = monitor.update(10, runaway(0.9, 0.05))
    assert scalars["health/runaway_completions"] == 1.0 and len(warnings) == 1


@pytest.mark.parametrize("key, above, below", [
    ("actor/kl_loss", 1.5, 0.5),
    ("actor/ppo_kl", 0.08, 0.01),
    ("actor/ppo_kl", -0.08, -0.01),  # k1 can go negative: size matters
    ("actor/pg_clipfrac", 0.3, 0.1),
    ("training/rollout_logprob_diff_mean", 0.3, 0.01),  # a wrong head vs bfloat16 rounding
])
def test_threshold_checks_warn_above_only(key, above, below):
    check = {"actor/kl_loss": "kl_blowup", "actor/ppo_kl": "approx_kl", "actor/pg_clipfrac": "clipfrac",
             "training/rollout_logprob_diff_mean": "sampler_mismatch"}[key]
    monitor = HealthMonitor()
    scalars, warnings = monitor.update(1, {key: below})
    assert warnings == [] and scalars[f"health/{check}"] == 0.0
    scalars, warnings = monitor.update(2, {key: above})
    assert scalars[f"health/{check}"] == 1.0
    assert len(warnings) == 1 and key in warnings[0] and "step 2" in warnings[0]
    assert monitor.summary()[check] == 1


def test_absent_keys_never_warn():
    monitor = HealthMonitor()
    results = run(monitor, [{}] * 30 + [{"unrelated/metric": 1e9}] * 5)
    assert all_warnings(results) == []
    assert all(v == 0.0 for s, _ in results for v in s.values())


def test_non_finite_inputs_warn_without_raising():
    record = {
        "frac_reward_zero_std": math.nan,
        "actor/entropy_loss": math.nan,
        "actor/grad_norm": math.nan,
        "actor/update_skipped": 0.0,
        "response_length/clip_ratio": math.inf,
        "Train/AvgReward": math.nan,
        "actor/kl_loss": math.inf,
        "actor/ppo_kl": -math.inf,
        "actor/pg_clipfrac": math.nan,
        "training/rollout_logprob_diff_mean": math.nan,
    }
    monitor = HealthMonitor()
    scalars, warnings = monitor.update(1, record)
    assert all(scalars[f"health/{c}"] == 1.0 for c in HealthMonitor.CHECKS)
    assert len(warnings) == len(HealthMonitor.CHECKS)
    assert all("non-finite" in w for w in warnings)
    # NaN never entered the grad history: the relative rule still works afterwards.
    run(monitor, [grad(0.5)] * 6, start=2)
    scalars, _ = monitor.update(8, grad(4.0))
    assert scalars["health/grad_spike"] == 1.0


def test_warmup_suppresses_then_warns():
    monitor = HealthMonitor(HealthConfig(warmup_steps=5))
    collapsed = {"frac_reward_zero_std": 1.0, "actor/grad_norm": 50.0}
    results = run(monitor, [collapsed] * 4)  # steps 1..4
    assert all_warnings(results) == []
    assert all(v == 0.0 for s, _ in results for v in s.values())
    scalars, warnings = monitor.update(5, collapsed)
    assert scalars["health/mode_collapse"] == 1.0 and scalars["health/grad_spike"] == 1.0
    assert len(warnings) == 2 and scalars["health/warnings_total"] == 2.0


def test_messages_are_single_line_with_step_and_hint():
    monitor = HealthMonitor()
    _, warnings = monitor.update(42, {
        "frac_reward_zero_std": 0.88, "actor/grad_norm": 12.0, "actor/kl_loss": 2.0,
        "actor/ppo_kl": 0.2, "actor/pg_clipfrac": 0.5,
    })
    assert len(warnings) == 5
    for message in warnings:
        assert isinstance(message, str) and "\n" not in message
        assert "step 42" in message
    assert warnings[0] == ("mode collapse at step 42: frac_reward_zero_std=0.88 > 0.8 (most groups scored alike "
                           "or the policy is near-deterministic; raise temperature or group_size, "
                           "or add partial-credit criteria)")


def test_zero_std_window_smooths_single_prompt_batches():
    # With one prompt per step, frac_reward_zero_std is 0 or 1: a window keeps a lone 1 from warning.
    monitor = HealthMonitor(HealthConfig(zero_std_window=5))
    flips = [1.0, 0.0, 1.0, 1.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0]
    warned = [step for step, value in enumerate(flips, start=1)
              if monitor.update(step, {"frac_reward_zero_std": value})[1]]
    assert warned == [10]  # the first step whose 5-step mean (1.0) is above 0.8
