"""GSPO (grpo.importance_sampling_level: sequence) and grpo.top_entropy_quantile, against the
papers' formulas written out in numpy."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from mlx_grpo import grpo
from mlx_grpo.config import Config
from mlx_grpo.errors import UserInputError

RNG = np.random.default_rng(7)
N, C = 4, 5
MASK = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 0]], dtype=np.float32)
ADV = np.array([1.0, -0.5, 2.0, -1.5], dtype=np.float32)


def gspo_numpy(logp, old, adv, mask, eps_low, eps_high):
    """The GSPO objective: -1/G sum_i min(s_i A_i, clip(s_i, 1-eps, 1+eps_h) A_i),
    s_i = exp(1/|y_i| sum_t (logp - old))."""
    lengths = mask.sum(axis=1)
    s = np.exp(((logp - old) * mask).sum(axis=1) / lengths)
    per_sequence = np.minimum(s * adv, np.clip(s, 1 - eps_low, 1 + eps_high) * adv)
    return -per_sequence.mean(), s


def loss_of(logp, old, **kwargs):
    loss, stats = grpo.grpo_loss(mx.array(logp), mx.array(old), mx.array(ADV), mx.array(MASK), **kwargs)
    return loss, stats


def test_gspo_loss_matches_the_paper_by_hand():
    old = RNG.normal(-2, 0.5, (N, C)).astype(np.float32)
    logp = (old + RNG.normal(0, 0.3, (N, C))).astype(np.float32)
    loss, stats = loss_of(logp, old, epsilon=0.1, epsilon_high=0.2, importance_sampling_level="sequence")
    expected, s = gspo_numpy(logp.astype(np.float64), old.astype(np.float64), ADV, MASK, 0.1, 0.2)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    # Some sequences are clipped at this spread, so the clip is exercised too.
    assert np.any((s < 0.9) | (s > 1.2))
    # The token-level loss differs: the option does something.
    token_loss, _ = loss_of(logp, old, epsilon=0.1, epsilon_high=0.2)
    assert abs(token_loss.item() - expected) > 1e-3
    # Token mean (bnpo): each sequence's term weighted by its length.
    bnpo, _ = loss_of(logp, old, epsilon=0.1, epsilon_high=0.2, importance_sampling_level="sequence", loss_type="bnpo")
    per_sequence = np.minimum(s * ADV, np.clip(s, 0.9, 1.2) * ADV)
    assert bnpo.item() == pytest.approx(-(per_sequence * MASK.sum(axis=1)).sum() / MASK.sum(), rel=1e-5)


def test_gspo_gradient_is_the_papers_and_matches_a_finite_difference():
    old = RNG.normal(-2, 0.5, (N, C)).astype(np.float32)
    logp = (old + RNG.normal(0, 0.02, (N, C))).astype(np.float32)  # inside the clip range
    kwargs = dict(epsilon=0.2, epsilon_high=0.28, importance_sampling_level="sequence")

    grad = np.array(mx.grad(lambda x: loss_of_array(x, old, **kwargs))(mx.array(logp)))
    # The paper: d/dlogp_{i,t} of -1/G sum_i s_i A_i is -A_i s_i / (G |y_i|) on real tokens.
    _, s = gspo_numpy(logp.astype(np.float64), old.astype(np.float64), ADV, MASK, 0.2, 0.28)
    analytic = -(ADV * s / (N * MASK.sum(axis=1)))[:, None] * MASK
    np.testing.assert_allclose(grad, analytic, rtol=1e-4, atol=1e-7)

    h = 1e-2
    for i, t in [(0, 0), (1, 2), (2, 0), (3, 3), (1, 4)]:  # (1, 4) is padding: no gradient
        up, down = logp.copy(), logp.copy()
        up[i, t] += h
        down[i, t] -= h
        numeric = (loss_of_array(mx.array(up), old, **kwargs).item()
                   - loss_of_array(mx.array(down), old, **kwargs).item()) / (2 * h)
        assert grad[i, t] == pytest.approx(numeric, rel=2e-2, abs=1e-5)


def loss_of_array(x, old, **kwargs):
    loss, _ = grpo.grpo_loss(x, mx.array(old), mx.array(ADV), mx.array(MASK), **kwargs)
    return loss


def test_gspo_with_one_pass_is_the_sequence_mean_policy_gradient():
    # mu = 1: old = the current log-probs, s = 1, and the gradient is A_i / (G |y_i|) per token.
    logp = RNG.normal(-2, 0.5, (N, C)).astype(np.float32)
    grad = mx.grad(lambda x: grpo.grpo_loss(x, mx.stop_gradient(x), mx.array(ADV), mx.array(MASK),
                                            importance_sampling_level="sequence")[0])(mx.array(logp))
    np.testing.assert_allclose(np.array(grad), -(ADV / (N * MASK.sum(axis=1)))[:, None] * MASK, rtol=1e-5)


def test_gspo_refuses_dr_grpo_in_one_line():
    with pytest.raises(ValueError, match="does not go with loss_type 'dr_grpo'"):
        loss_of(np.zeros((N, C), np.float32), np.zeros((N, C), np.float32), importance_sampling_level="sequence",
                loss_type="dr_grpo")
    cfg = Config()
    cfg.grpo.importance_sampling_level, cfg.grpo.loss_type = "sequence", "dr_grpo"
    with pytest.raises(UserInputError, match="grpo.importance_sampling_level sequence .GSPO. is length-normalised"):
        cfg.validate()


def test_top_entropy_mask_keeps_the_top_fraction_by_hand():
    entropy = np.array([[0.1, 2.0, 0.3, 5.0, 0.2], [1.0, 0.0, 3.0, 9.0, 9.0],
                        [4.0, 9.0, 9.0, 9.0, 9.0], [0.5, 0.6, 0.7, 0.8, 9.0]], dtype=np.float32)
    real = np.sort(entropy[MASK > 0])  # 13 real tokens; padding (the 9.0s) never counts
    q = 0.25
    threshold = real[int(np.floor((1 - q) * (len(real) - 1)))]  # nearest rank, lower
    expected = ((entropy >= threshold) & (MASK > 0)).astype(np.float32)
    got = np.array(grpo.top_entropy_mask(mx.array(entropy), mx.array(MASK), q))
    np.testing.assert_array_equal(got, expected)
    assert got.sum() == 4 and 0.2 <= got.sum() / MASK.sum() <= 0.35
    assert np.array(grpo.top_entropy_mask(mx.array(entropy), mx.array(MASK), 1.0)).sum() == MASK.sum()


def test_only_masked_tokens_carry_policy_loss_but_the_denominator_is_every_token():
    old = RNG.normal(-2, 0.5, (N, C)).astype(np.float32)
    logp = (old + RNG.normal(0, 0.1, (N, C))).astype(np.float32)
    keep = np.zeros((N, C), np.float32)
    keep[0, 1] = keep[3, 2] = 1
    loss, _ = loss_of(logp, old, loss_type="bnpo", policy_mask=mx.array(keep))
    ratio = np.exp(logp.astype(np.float64) - old)
    per_token = np.minimum(ratio * ADV[:, None], np.clip(ratio, 0.8, 1.2) * ADV[:, None])
    assert loss.item() == pytest.approx(-(per_token * keep).sum() / MASK.sum(), rel=1e-5)
    grad = np.array(mx.grad(lambda x: grpo.grpo_loss(x, mx.array(old), mx.array(ADV), mx.array(MASK), loss_type="bnpo",
                                                     policy_mask=mx.array(keep))[0])(mx.array(logp)))
    assert np.count_nonzero(grad) == 2 and grad[0, 1] != 0 and grad[3, 2] != 0


def test_top_entropy_quantile_is_validated():
    cfg = Config()
    cfg.grpo.top_entropy_quantile = 0.0
    with pytest.raises(UserInputError, match=r"grpo.top_entropy_quantile must be in \(0, 1\]"):
        cfg.validate()


def test_both_options_train_through_the_trainer(tmp_path, monkeypatch):
    from test_seed_capabilities import make_items, tiny_run

    common = {"train.steps": 2, "rollout.max_new_tokens": 12, "grpo.num_iterations": 2}
    runs = {name: tiny_run(tmp_path / name, {**common, **extra}, make_items(12), monkeypatch=monkeypatch)
            for name, extra in [("token", {}), ("gspo", {"grpo.importance_sampling_level": "sequence"}),
                                ("forking", {"grpo.top_entropy_quantile": 0.3})]}
    first = {name: [r for r in records if "actor/pg_loss" in r][0] for name, records in runs.items()}
    assert all(np.isfinite(r["actor/pg_loss"]) for r in first.values())
    # The same samples (same seed, same first-pass weights), a different loss on the second pass.
    assert first["gspo"]["critic/score/mean"] == first["token"]["critic/score/mean"]
    assert first["gspo"]["actor/pg_loss"] != first["token"]["actor/pg_loss"]
    assert first["forking"]["actor/pg_loss"] != first["token"]["actor/pg_loss"]
