"""GRPO math against hand-computed numbers, and chunked log-probs against a naive full-logits version."""

import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_grpo.forward import completion_logprobs
from mlx_grpo.grpo import (
    group_advantages,
    grpo_loss,
    k3_kl,
    masked_mean,
    zero_std_groups,
)
from tests.conftest import make_tiny_model


def close(a, b, atol=1e-4):
    np.testing.assert_allclose(np.array(a), np.array(b, dtype=np.float32), atol=atol, rtol=0)


# ---------------------------------------------------------------------------------------------
# Advantages (population std, ddof=0)


def test_advantages_population_std_single_group():
    # mean 0.5, population std 0.5 -> +-0.5 / 0.5001. (The unbiased std would give +-0.866.)
    adv = group_advantages(mx.array([1.0, 0.0, 0.0, 1.0]), 4)
    close(adv, [0.99980, -0.99980, -0.99980, 0.99980], atol=1e-5)


def test_advantages_groups_are_independent():
    rewards = mx.array([1.0, 0.0, 0.0, 1.0, 2.0, 4.0, 4.0, 2.0, 5.0, 5.0, 5.0, 5.0])
    adv = group_advantages(rewards, 4)
    # group 2: mean 3, std 1 -> +-1 / 1.0001; group 3: constant -> exactly 0
    close(adv, [0.9998, -0.9998, -0.9998, 0.9998, -0.9999, 0.9999, 0.9999, -0.9999, 0, 0, 0, 0])


def test_advantages_scale_none_and_batch():
    rewards = mx.array([0.0, 2.0, 4.0, 6.0])  # groups of 2: [0, 2] and [4, 6]
    close(group_advantages(rewards, 2, scale="none"), [-1, 1, -1, 1], atol=1e-6)
    close(group_advantages(rewards, 2, scale="group"), [-0.9999, 0.9999, -0.9999, 0.9999])
    # batch: mean 3, deviations -3, -1, 1, 3 -> population std sqrt(5) = 2.23607
    close(group_advantages(rewards, 2, scale="batch"), [-0.44719, 0.44719, -0.44719, 0.44719], atol=1e-5)


def test_advantages_invalid_rows_are_excluded_and_zero():
    rewards = mx.array([1.0, 0.0, float("nan"), 1.0])
    valid = mx.array([True, True, False, True])
    adv = group_advantages(rewards, 4, valid=valid)
    # valid rewards [1, 0, 1]: mean 2/3, std sqrt(2)/3 = 0.471405 -> (1/3)/0.471505, (-2/3)/0.471505
    close(adv, [0.70696, -1.41392, 0.0, 0.70696], atol=1e-5)
    # A group whose only valid row is alone gets 0, not NaN.
    adv = group_advantages(mx.array([3.0, 9.0]), 2, valid=mx.array([True, False]))
    close(adv, [0.0, 0.0], atol=0)


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_advantages_of_equal_rewards_are_exactly_zero(scale):
    # 0.42333 eight times: the float32 mean is off by an ulp, which must not leak into advantages.
    rewards = mx.array([0.4233333] * 8 + [0.1, 0.7, 0.1, 0.7, 0.3, 0.3, 0.3, 0.3], dtype=mx.float32)
    assert mx.sum(rewards[:8]).item() / 8 != rewards[0].item()  # the rounding this guards against
    adv = group_advantages(rewards, 8, scale=scale)
    assert (np.array(adv[:8]) == 0).all()
    assert (np.array(adv[8:]) != 0).any()


def test_advantages_bad_input():
    with pytest.raises(ValueError):
        group_advantages(mx.array([1.0, 2.0, 3.0]), 2)
    with pytest.raises(ValueError):
        group_advantages(mx.array([1.0, 2.0]), 2, scale="median")


def test_zero_std_groups():
    rewards = mx.array([1.0, 0.0, 0.0, 1.0, 5.0, 5.0, 5.0, 5.0, 3.0, 7.0, 3.0, 3.0])
    assert zero_std_groups(rewards, 4).tolist() == [False, True, False]
    valid = mx.array([True] * 8 + [True, False, True, True])  # the 7 is a failed score
    assert zero_std_groups(rewards, 4, valid=valid).tolist() == [False, True, True]


# ---------------------------------------------------------------------------------------------
# KL and masked mean


def test_k3_kl_values():
    logp = mx.array([0.0, 0.0, -1.0])
    ref = mx.array([0.5, -0.5, -1.0])  # d = 0.5, -0.5, 0
    close(k3_kl(logp, ref), [math.exp(0.5) - 1.5, math.exp(-0.5) - 0.5, 0.0], atol=1e-6)
    close(k3_kl(logp, ref), [0.1487213, 0.1065307, 0.0], atol=1e-6)


def test_masked_mean_empty_is_zero():
    assert masked_mean(mx.array([1.0, 3.0, 100.0]), mx.array([1, 1, 0])).item() == 2.0
    assert masked_mean(mx.array([1.0, 3.0]), mx.array([0, 0])).item() == 0.0


# ---------------------------------------------------------------------------------------------
# Clipped surrogate


def test_ratio_one_gives_minus_mean_advantage():
    lp = mx.full((2, 3), -1.0)
    adv = mx.array([1.0, -2.0])
    mask = mx.ones((2, 3))
    for loss_type in ("grpo", "bnpo", "dapo", "dr_grpo"):
        loss, stats = grpo_loss(lp, lp, adv, mask, loss_type=loss_type)
        assert loss.item() == pytest.approx(0.5, abs=1e-6)  # -(1 - 2) / 2
        assert stats["ratio_mean"].item() == pytest.approx(1.0)
        assert stats["clip_frac"].item() == 0.0
        assert stats["kl"].item() == 0.0


def _single_token(log_ratio, adv, **kw):
    """Loss and d loss / d logp for one token with the given log-ratio and advantage."""
    old = mx.array([[0.0]])

    def f(lp):
        return grpo_loss(lp, old, mx.array([adv]), mx.ones((1, 1)), **kw)[0]

    lp = mx.array([[log_ratio]])
    loss, grad = mx.value_and_grad(f)(lp)
    return loss.item(), grad.item()


def test_clipping_high_and_low():
    ln = math.log
    # ratio 1.5 > 1.2, A > 0: clipped at 1.2, no gradient
    loss, grad = _single_token(ln(1.5), 1.0)
    assert loss == pytest.approx(-1.2, abs=1e-6) and grad == 0.0
    # ratio 1.5, A < 0: the unclipped branch is the min, gradient -A * ratio = 1.5
    loss, grad = _single_token(ln(1.5), -1.0)
    assert loss == pytest.approx(1.5, abs=1e-6) and grad == pytest.approx(1.5, abs=1e-6)
    # ratio 0.5 < 0.8, A < 0: clipped at 0.8, no gradient
    loss, grad = _single_token(ln(0.5), -1.0)
    assert loss == pytest.approx(0.8, abs=1e-6) and grad == 0.0
    # ratio 0.5, A > 0: unclipped, gradient -A * ratio = -0.5
    loss, grad = _single_token(ln(0.5), 1.0)
    assert loss == pytest.approx(-0.5, abs=1e-6) and grad == pytest.approx(-0.5, abs=1e-6)
    # epsilon_high widens only the upper side: 1.5 < 1 + 0.6 is not clipped
    loss, grad = _single_token(ln(1.5), 1.0, epsilon_high=0.6)
    assert loss == pytest.approx(-1.5, abs=1e-6) and grad == pytest.approx(-1.5, abs=1e-6)


def test_clip_statistics():
    ln = math.log
    old = mx.zeros((2, 2))
    lp = mx.array([[ln(1.5), 0.0], [ln(0.5), 0.0]])
    adv = mx.array([1.0, -1.0])
    _, s = grpo_loss(lp, old, adv, mx.ones((2, 2)))
    assert s["clip_frac_high"].item() == pytest.approx(0.25)
    assert s["clip_frac_low"].item() == pytest.approx(0.25)
    assert s["clip_frac"].item() == pytest.approx(0.5)
    assert s["ratio_mean"].item() == pytest.approx(1.0, abs=1e-6)  # (1.5 + 1 + 0.5 + 1) / 4
    assert s["ratio_max"].item() == pytest.approx(1.5, abs=1e-6)
    # Importance-ratio distribution over the 4 tokens: 1.5, 1, 0.5, 1.
    assert s["ratio_std"].item() == pytest.approx(math.sqrt(0.125), abs=1e-6)
    assert s["ratio_p95"].item() == pytest.approx(1.0, abs=1e-6)  # nearest lower rank of 4: index 2
    assert s["log_ratio_mean"].item() == pytest.approx((ln(1.5) + ln(0.5)) / 4, abs=1e-6)
    assert s["outside_clip_frac"].item() == pytest.approx(0.5)
    k3 = lambda d: math.exp(d) - d - 1  # noqa: E731  (KL(new || old) with d = old - new)
    assert s["ppo_kl"].item() == pytest.approx((k3(-ln(1.5)) + k3(-ln(0.5))) / 4, abs=1e-6)
    # Same ratios with the advantage signs swapped: nothing is clipped, but still outside the range.
    _, s = grpo_loss(lp, old, -adv, mx.ones((2, 2)))
    assert s["clip_frac"].item() == 0.0 and s["outside_clip_frac"].item() == pytest.approx(0.5)
    # Masked tokens are ignored by every statistic.
    _, s = grpo_loss(lp, old, adv, mx.array([[0, 1], [0, 1]]))
    assert s["clip_frac"].item() == 0.0 and s["ratio_max"].item() == pytest.approx(1.0)
    assert s["ratio_std"].item() == 0.0 and s["ppo_kl"].item() == 0.0 and s["outside_clip_frac"].item() == 0.0
    # An empty mask gives zeros, not NaN.
    _, s = grpo_loss(lp, old, adv, mx.zeros((2, 2)))
    assert all(math.isfinite(v.item()) for v in s.values()) and s["ratio_p95"].item() == 0.0


def test_masked_quantile_matches_numpy():
    import numpy as np

    from mlx_grpo.grpo import masked_quantile

    x = mx.array(np.arange(1, 21, dtype=np.float32).reshape(4, 5))
    mask = mx.array((np.arange(20).reshape(4, 5) % 3 != 0).astype(np.float32))
    values = np.sort(np.array(x)[np.array(mask) > 0])
    for q in (0.0, 0.5, 0.95, 1.0):
        assert masked_quantile(x, mask, q).item() == values[int(np.floor(q * (len(values) - 1)))]


def _ragged():
    # ratio 1 everywhere, so the per-token loss is -A: row 0 = -1 (3 tokens), row 1 = +2 (1 token),
    # row 2 = -5 but fully masked (e.g. a truncated completion).
    lp = mx.full((3, 3), -0.7)
    adv = mx.array([1.0, -2.0, 5.0])
    mask = mx.array([[1, 1, 1], [1, 0, 0], [0, 0, 0]])
    return lp, adv, mask


@pytest.mark.parametrize(
    "loss_type, kw, expected",
    [
        ("grpo", {}, 0.5),  # (-1 + 2) / 2 non-empty sequences
        ("bnpo", {}, -0.25),  # (-3 + 2) / 4 tokens
        ("dapo", {}, -0.25),
        ("dr_grpo", {}, -1 / 9),  # -1 / (3 sequences * C=3)
        ("dr_grpo", {"max_completion_length": 5}, -1 / 15),
    ],
)
def test_loss_aggregation_on_ragged_mask(loss_type, kw, expected):
    lp, adv, mask = _ragged()
    loss, stats = grpo_loss(lp, lp, adv, mask, loss_type=loss_type, **kw)
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert stats["policy_loss"].item() == pytest.approx(expected, abs=1e-6)


def test_kl_penalty_adds_beta_k3():
    lp, adv, mask = _ragged()
    ref = lp + 0.5  # d = 0.5 -> k3 = e^0.5 - 1.5 on every token
    k3 = math.exp(0.5) - 1.5
    loss, stats = grpo_loss(lp, lp, adv, mask, ref_logprobs=ref, beta=0.1, loss_type="bnpo")
    assert loss.item() == pytest.approx(-0.25 + 0.1 * k3, abs=1e-6)
    assert stats["policy_loss"].item() == pytest.approx(-0.25, abs=1e-6)
    assert stats["kl"].item() == pytest.approx(k3, abs=1e-6)
    # beta = 0: the KL is still reported but not added.
    loss, stats = grpo_loss(lp, lp, adv, mask, ref_logprobs=ref, beta=0.0, loss_type="bnpo")
    assert loss.item() == pytest.approx(-0.25, abs=1e-6)
    assert stats["kl"].item() == pytest.approx(k3, abs=1e-6)


def test_padding_garbage_does_not_leak():
    lp, adv, mask = _ragged()
    old = mx.where(mask > 0, lp, -mx.inf)  # e.g. -inf old log-probs in the padding
    ref = mx.where(mask > 0, lp, mx.nan)

    def f(x):
        return grpo_loss(x, old, adv, mask, ref_logprobs=ref, beta=0.1)[0]

    loss, grad = mx.value_and_grad(f)(lp)
    assert loss.item() == pytest.approx(0.5, abs=1e-6)
    g = np.array(grad)
    assert np.isfinite(g).all() and (g[np.array(mask) == 0] == 0).all()


def test_unknown_loss_type():
    lp, adv, mask = _ragged()
    with pytest.raises(ValueError):
        grpo_loss(lp, lp, adv, mask, loss_type="ppo")


# ---------------------------------------------------------------------------------------------
# completion_logprobs vs the naive full-logits computation


def _batch(prompt_lengths, t=12, vocab=256, seed=1):
    rng = np.random.default_rng(seed)
    tokens = mx.array(rng.integers(0, vocab, size=(len(prompt_lengths), t)), dtype=mx.int32)
    return tokens, mx.array(prompt_lengths, dtype=mx.int32)


def _naive(model, tokens, prompt_lengths, c, temperature=1.0):
    logits = model(tokens).astype(mx.float32) / temperature  # (N, T, V)
    logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    n, t = tokens.shape
    p = prompt_lengths.reshape(n, 1)
    pos = mx.minimum(p + mx.arange(c).reshape(1, c), t - 1)
    rows = mx.arange(n).reshape(n, 1)
    lp = logp[rows, pos - 1, tokens[rows, pos]]
    probs = mx.exp(logp[rows, pos - 1])
    ent = -(probs * logp[rows, pos - 1]).sum(-1)
    return lp, ent


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("chunk_size", [1, 4, 6, 100])
def test_completion_logprobs_match_naive(tie, chunk_size):
    model = make_tiny_model(tie=tie)
    assert hasattr(model, "lm_head") != tie
    tokens, plens = _batch([3, 5, 1, 7])
    c = 6  # row 3 runs past T: positions are clamped in both versions
    got = completion_logprobs(model, tokens, plens, c, chunk_size=chunk_size)
    want, _ = _naive(model, tokens, plens, c)
    assert got.shape == (4, c) and got.dtype == mx.float32
    # Compare where p + j < T; clamped positions are garbage that the caller masks.
    in_range = (np.array(plens)[:, None] + np.arange(c)[None]) < tokens.shape[1]
    assert not in_range.all()
    close(np.array(got)[in_range], np.array(want)[in_range], atol=1e-5)


def test_completion_logprobs_entropy_and_temperature(tiny_model):
    tokens, plens = _batch([2, 4])
    lp, ent = completion_logprobs(tiny_model, tokens, plens, 5, chunk_size=2, temperature=0.7, return_entropy=True)
    want_lp, want_ent = _naive(tiny_model, tokens, plens, 5, temperature=0.7)
    close(lp, want_lp, atol=1e-5)
    close(ent, want_ent, atol=1e-4)
    assert (np.array(ent) > 0).all()


def test_completion_logprobs_is_a_distribution(tiny_model):
    # Same 3-token prompt, every possible next token: the probabilities sum to 1.
    prompt = mx.array([[7, 42, 9]] * 256, dtype=mx.int32)
    tokens = mx.concatenate([prompt, mx.arange(256, dtype=mx.int32).reshape(256, 1)], axis=1)
    lp = completion_logprobs(tiny_model, tokens, mx.full((256,), 3, dtype=mx.int32), 1)
    assert (np.array(lp) < 0).all()
    assert float(mx.exp(lp).sum()) == pytest.approx(1.0, abs=1e-4)


@pytest.mark.parametrize("tie", [True, False])
def test_completion_logprobs_gradient_matches_naive(tie):
    model = make_tiny_model(tie=tie)
    tokens, plens = _batch([3, 5, 2], t=10)
    c = 5
    w = mx.array(np.random.default_rng(0).normal(size=(3, c)), dtype=mx.float32)

    def chunked(m):
        return (completion_logprobs(m, tokens, plens, c, chunk_size=2) * w).sum()

    def naive(m):
        return (_naive(m, tokens, plens, c)[0] * w).sum()

    v1, g1 = nn.value_and_grad(model, chunked)(model)
    v2, g2 = nn.value_and_grad(model, naive)(model)
    assert v1.item() == pytest.approx(v2.item(), abs=1e-4)
    f1, f2 = dict(tree_flatten(g1)), dict(tree_flatten(g2))
    assert f1.keys() == f2.keys()
    head = "model.embed_tokens.weight" if tie else "lm_head.weight"
    assert np.abs(np.array(f1[head])).max() > 0  # the head's gradient does flow through the checkpoint
    for k in f1:
        close(f1[k], f2[k], atol=1e-5)


def test_completion_logprobs_memory_is_below_full_logits():
    vocab, n, p, c = 8192, 4, 8, 192
    model = make_tiny_model(vocab_size=vocab)
    tokens = mx.array(np.random.default_rng(0).integers(0, vocab, size=(n, p + c)), dtype=mx.int32)
    plens = mx.full((n,), p, dtype=mx.int32)
    full_logits = n * c * vocab * 4

    def peak(fn):
        mx.eval(model.parameters())
        mx.clear_cache()
        base = mx.get_active_memory()
        mx.reset_peak_memory()
        mx.eval(fn())
        return mx.get_peak_memory() - base

    def chunked(m):
        return completion_logprobs(m, tokens, plens, c, chunk_size=16).sum()

    def naive(m):
        return _naive(m, tokens, plens, c)[0].sum()

    # Forward only: far less than one full (N, C, vocab) float32 logits tensor.
    assert peak(lambda: chunked(model)) < 0.6 * full_logits
    # With gradients: well under the naive version.
    grad_peak = peak(lambda: nn.value_and_grad(model, chunked)(model))
    naive_peak = peak(lambda: nn.value_and_grad(model, naive)(model))
    assert grad_peak < 0.6 * naive_peak


# ---------------------------------------------------------------------------------------------
# One prompt pass per group against one per row


def _grouped_batch(prompt_lens, completion_lens, group_size, vocab=256, seed=3):
    """Group-contiguous rows: each group's prompt repeated, completions of their own lengths."""
    rng = np.random.default_rng(seed)
    rows, plens = [], []
    for g, p in enumerate(prompt_lens):
        prompt = rng.integers(1, vocab, p).tolist()
        for i in range(group_size):
            rows.append(prompt + rng.integers(1, vocab, completion_lens[g * group_size + i]).tolist())
            plens.append(p)
    t = max(map(len, rows))
    c = max(completion_lens)
    tokens = mx.array([r + [0] * (t - len(r)) for r in rows], dtype=mx.int32)
    mask = np.array([[1.0 if j < n else 0.0 for j in range(c)] for n in completion_lens], dtype=np.float32)
    return tokens, mx.array(plens, dtype=mx.int32), c, mx.array(mask)


@pytest.mark.parametrize("tie", [True, False])
def test_shared_prompt_pass_matches_per_row_values_and_gradients(tie):
    model = make_tiny_model(tie=tie)
    G = 3
    # Prompts of 7, 1 and 4 tokens; completions of 1 to 6 tokens, so padding differs by group
    # and the longest completion's group is not the longest prompt's.
    tokens, plens, c, mask = _grouped_batch([7, 1, 4], [2, 6, 1, 5, 3, 1, 4, 4, 2], G)
    w = mx.array(np.random.default_rng(0).normal(size=mask.shape), dtype=mx.float32) * mask

    def loss(group_size):
        def fn(m):
            lp, ent = completion_logprobs(m, tokens, plens, c, chunk_size=4, return_entropy=True, group_size=group_size)
            return (lp * w).sum(), (lp, ent)
        return fn

    (v1, (lp1, ent1)), g1 = nn.value_and_grad(model, loss(1))(model)
    (v2, (lp2, ent2)), g2 = nn.value_and_grad(model, loss(G))(model)
    m = np.array(mask) > 0
    close(np.array(lp2)[m], np.array(lp1)[m], atol=1e-5)
    close(np.array(ent2)[m], np.array(ent1)[m], atol=1e-4)
    assert v2.item() == pytest.approx(v1.item(), abs=1e-4)
    f1, f2 = dict(tree_flatten(g1)), dict(tree_flatten(g2))
    assert f1.keys() == f2.keys()
    for k in f1:
        close(f2[k], f1[k], atol=1e-5)
    # The attention weights see the prompt only through the shared pass: their gradient is real.
    assert np.abs(np.array(f2["model.layers.0.self_attn.k_proj.weight"])).max() > 0


def test_trainer_uses_the_shared_prompt_pass_only_on_whole_groups(tiny_model):
    from mlx_grpo.config import load_config
    from mlx_grpo.rollout import TrainBatch
    from mlx_grpo.policy import batch_logprobs

    tokens, plens, c, mask = _grouped_batch([5, 2], [3, 1, 2, 4], 2)
    batch = TrainBatch(tokens, plens, mask, 0)
    m = np.array(mask) > 0
    results = {}
    for share in (True, False):
        cfg = load_config(None, {"rollout.group_size": 2, "grpo.share_prompt_pass": share})
        results[share] = np.array(batch_logprobs(tiny_model, batch, cfg))
    close(results[True][m], results[False][m], atol=1e-5)
    # A micro-batch that splits a group falls back to full rows instead of mixing prompts.
    cfg = load_config(None, {"rollout.group_size": 4})
    odd = batch.rows(0, 2)
    close(np.array(batch_logprobs(tiny_model, odd, cfg))[m[:2]], results[False][:2][m[:2]], atol=1e-5)
