"""grpo.tis_cap: truncated importance sampling for the batches rollout.pipeline trains one update late."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from mlx_grpo import grpo
from mlx_grpo.config import Config
from mlx_grpo.errors import UserInputError

MASK = np.array([[1, 1, 1, 0], [1, 1, 1, 1]], dtype=np.float32)
ADV = np.array([1.5, -0.5], dtype=np.float32)


def test_weights_and_their_statistics_by_hand():
    sampled = np.array([[-1.0, -2.0, -0.5, -np.inf], [-3.0, -1.0, -1.0, -2.0]], dtype=np.float32)
    old = np.array([[-0.5, -2.2, -0.5, 0.0], [-1.0, -1.1, -0.9, -2.0]], dtype=np.float32)
    weights, stats = grpo.truncated_importance_weights(mx.array(old), mx.array(sampled), mx.array(MASK), 2.0)
    raw = np.exp(np.where(MASK > 0, old.astype(np.float64) - np.where(MASK > 0, sampled, 0), 0))
    expected = np.where(MASK > 0, np.minimum(raw, 2.0), 0)
    np.testing.assert_allclose(np.array(weights), expected, rtol=1e-6)
    real = expected[MASK > 0]
    assert stats["tis_mean"].item() == pytest.approx(real.mean(), rel=1e-6)
    assert stats["tis_max"].item() == pytest.approx(2.0)  # exp(2) was capped
    assert stats["tis_clipped_frac"].item() == pytest.approx(1 / 7)


def test_per_token_weights_fold_into_the_surrogate():
    rng = np.random.default_rng(3)
    old = rng.normal(-2, 0.5, MASK.shape).astype(np.float32)
    logp = (old + rng.normal(0, 0.2, MASK.shape)).astype(np.float32)
    w = np.array([[0.5, 2.0, 1.0, 0.0], [1.0, 0.25, 1.5, 2.0]], dtype=np.float32)
    loss, _ = grpo.grpo_loss(mx.array(logp), mx.array(old), mx.array(w * ADV[:, None]), mx.array(MASK), loss_type="bnpo")
    ratio = np.exp(logp.astype(np.float64) - old)
    surrogate = np.minimum(ratio * ADV[:, None], np.clip(ratio, 0.8, 1.2) * ADV[:, None])
    assert loss.item() == pytest.approx(-(w * surrogate * MASK).sum() / MASK.sum(), rel=1e-5)


def test_tis_cap_is_validated():
    cfg = Config()
    cfg.grpo.tis_cap = 0.5
    with pytest.raises(UserInputError, match="grpo.tis_cap must be 0 .off. or at least 1"):
        cfg.validate()


def test_a_pipelined_run_logs_the_weights(tmp_path, monkeypatch):
    from test_seed_capabilities import make_items, tiny_run

    options = {"train.steps": 3, "rollout.max_new_tokens": 12, "rollout.pipeline": True}
    on = tiny_run(tmp_path / "on", {**options, "grpo.tis_cap": 2.0}, make_items(12), monkeypatch=monkeypatch)
    off = tiny_run(tmp_path / "off", options, make_items(12), monkeypatch=monkeypatch)
    steps_on = [r for r in on if "actor/pg_loss" in r]
    late = [r for r in steps_on if "actor/tis_mean" in r]
    assert late, "no late batch logged its weights"
    for r in late:
        assert 0 < r["actor/tis_mean"] <= r["actor/tis_max"] <= 2.0 and 0 <= r["actor/tis_clipped_frac"] <= 1
    assert not any("actor/tis_mean" in r for r in off)
    # Step 1 trains on-policy in both; later steps differ once the correction applies.
    steps_off = [r for r in off if "actor/pg_loss" in r]
    assert steps_on[0]["actor/pg_loss"] == steps_off[0]["actor/pg_loss"]
    assert any(a["actor/pg_loss"] != b["actor/pg_loss"] for a, b in zip(steps_on[1:], steps_off[1:]))
