"""Pure GRPO math: advantages, the clipped surrogate loss, KL, clip statistics and the sampler gap.

The log-probs it works on come from the model in forward.py.

Everything here takes mlx arrays and returns mlx arrays. No model state is kept and nothing is
logged; the trainer decides what to do with the numbers.

Conventions
- A batch of N = B * G completions is laid out group-contiguously: rows g*G .. g*G+G-1 are the G
  completions of prompt g.
- Per-token arrays are (N, C): C completion positions, padded on the right, with a float/bool mask
  (1 = a real completion token, EOS included; 0 = padding or a masked-out truncated completion).
- Standard deviations are *population* std (ddof=0). TRL uses the unbiased std (ddof=1); the two
  differ by sqrt(G / (G - 1)). ddof=0 is defined for any group size and for groups where only one
  row is valid (the advantage is then exactly 0 rather than 0/0).
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np


LOSS_TYPES = ("grpo", "bnpo", "dapo", "dr_grpo")
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")
# GSPO's ratio is length-normalised by construction; Dr. GRPO's constant denominator exists to undo
# a length normalisation, so the two contradict each other.
SEQUENCE_LEVEL_LOSS_TYPES = ("grpo", "bnpo", "dapo")
ADVANTAGE_SCALES = ("group", "batch", "none")


# ---------------------------------------------------------------------------------------------
# Small helpers


def masked_mean(x: mx.array, mask: mx.array, axis=None) -> mx.array:
    """Mean of x over mask == 1 (0 where the mask is empty rather than NaN)."""
    mask = mask.astype(x.dtype)
    total = (x * mask).sum(axis=axis)
    count = mask.sum(axis=axis)
    return total / mx.maximum(count, 1)


def masked_std(x: mx.array, mask: mx.array) -> mx.array:
    """Population std of x over mask == 1 (0 for an empty mask)."""
    mean = masked_mean(x, mask)
    return mx.sqrt(masked_mean((x - mean) ** 2, mask))


def masked_quantile(x: mx.array, mask: mx.array, q: float) -> mx.array:
    """The q-quantile (nearest rank, lower) of x over mask == 1; 0 for an empty mask."""
    flat = mx.where(mask.reshape(-1) > 0, x.reshape(-1).astype(mx.float32), mx.inf)
    count = (mask > 0).sum()
    rank = mx.floor(q * (mx.maximum(count, 1) - 1)).astype(mx.int32)
    value = mx.sort(flat)[rank]
    return mx.where(count > 0, value, 0.0)


def k3_kl(logprobs: mx.array, ref_logprobs: mx.array) -> mx.array:
    """Per-token k3 estimator of KL(pi || pi_ref): e^d - d - 1 with d = ref - logp.

    Unbiased and always >= 0 (Schulman's "k3"), which is what GRPO's KL penalty uses.
    """
    d = ref_logprobs - logprobs
    return mx.exp(d) - d - 1


# ---------------------------------------------------------------------------------------------
# Advantages


def _grouped(x: mx.array, group_size: int) -> mx.array:
    if x.ndim != 1:
        raise ValueError(f"expected a 1-D array of rewards, got shape {x.shape}")
    if group_size < 1 or x.shape[0] % group_size != 0:
        raise ValueError(f"{x.shape[0]} rewards do not split into groups of {group_size}")
    return x.reshape(-1, group_size)


def group_advantages(
    rewards: mx.array,
    group_size: int,
    scale: str = "group",
    eps: float = 1e-4,
    valid: mx.array | None = None,
) -> mx.array:
    """Group-relative advantages A = (r - mean_group) / (std + eps), shape (N,), float32.

    scale: "group" divides by the group's std, "batch" by the std of all valid rewards in the
    batch (around the batch mean), "none" does not divide (Dr. GRPO). Stds are population stds.
    valid: optional bool (N,). Invalid rows (e.g. a failed teacher call) are left out of the means
    and stds and get advantage 0, so a failure is never scored as a bad answer.
    """
    if scale not in ADVANTAGE_SCALES:
        raise ValueError(f"unknown advantage scale {scale!r}; expected one of {ADVANTAGE_SCALES}")
    r = _grouped(rewards.astype(mx.float32), group_size)
    v = mx.ones_like(r) if valid is None else _grouped(valid, group_size).astype(mx.float32)
    r = mx.where(v > 0, r, 0.0)  # invalid rewards may be NaN or garbage: keep them out of every sum

    n = mx.maximum(v.sum(axis=1, keepdims=True), 1)
    mean = r.sum(axis=1, keepdims=True) / n
    # A group of equal rewards gives exactly 0, not the rounding error of its float32 mean: a tiny
    # nonzero advantage makes the trainer take a step, and AdamW then moves the weights a full
    # learning rate along its stale momentum on no signal at all.
    highest = mx.where(v > 0, r, -mx.inf).max(axis=1, keepdims=True)
    lowest = mx.where(v > 0, r, mx.inf).min(axis=1, keepdims=True)
    dev = mx.where(highest > lowest, r - mean, 0.0) * v
    if scale == "group":
        std = mx.sqrt((dev * dev).sum(axis=1, keepdims=True) / n)
        adv = dev / (std + eps)
    elif scale == "batch":
        n_all = mx.maximum(v.sum(), 1)
        batch_dev = (r - r.sum() / n_all) * v
        std = mx.sqrt((batch_dev * batch_dev).sum() / n_all)
        adv = dev / (std + eps)
    else:
        adv = dev
    return adv.reshape(-1)


def normalize_then_sum(columns: list, weights: list[float], group_size: int, eps: float = 1e-4,
                       valid: mx.array | None = None) -> mx.array:
    """Advantages from per-criterion scores, each normalised within its group before the weighted
    sum (GDPO; TRL's multi-objective "normalize_then_sum"), shape (N,), float32.

    A_c = (r_c - mean_group) / (std_group + eps) per criterion c; S = sum_c w_c A_c / sum_c w_c;
    the advantage is S / (std of S over the batch's valid rows + eps). A criterion with a small
    spread then moves the advantage as much as one with a large spread, in proportion to its
    weight, instead of being drowned by it. Invalid rows get 0, as in group_advantages.
    """
    valid = mx.ones((len(columns[0]),), dtype=mx.bool_) if valid is None else valid
    summed = mx.zeros((len(columns[0]),), dtype=mx.float32)
    for column, weight in zip(columns, weights):
        column = mx.array(np.nan_to_num(np.asarray(column, dtype=np.float32), nan=0.0))
        summed = summed + float(weight) * group_advantages(column, group_size, "group", eps, valid)
    summed = summed / float(sum(weights))
    v = valid.astype(mx.float32)
    n = mx.maximum(v.sum(), 1)
    std = mx.sqrt(((summed - (summed * v).sum() / n) ** 2 * v).sum() / n)
    return summed / (std + eps)


def overlong_penalty(lengths, max_new_tokens: int, buffer: int, penalty: float) -> np.ndarray:
    """DAPO's soft overlong punishment, a reward term per completion: 0 up to max_new_tokens - buffer
    tokens, then falling linearly to -penalty at max_new_tokens (a completion cut there)."""
    lengths = np.asarray(lengths, dtype=np.float64)
    if penalty == 0:
        return np.zeros(lengths.shape, dtype=np.float32)
    start = max_new_tokens - buffer
    return (-penalty * np.clip((lengths - start) / buffer, 0.0, 1.0)).astype(np.float32)


def zero_std_groups(rewards: mx.array, group_size: int, valid: mx.array | None = None) -> mx.array:
    """bool (B,): True for groups whose (valid) rewards are all equal, i.e. all advantages are 0.

    Exact equality, not std < tol: such groups carry no learning signal (DAPO dynamic sampling
    drops them). A group with at most one valid row also counts as zero-std.
    """
    r = _grouped(rewards.astype(mx.float32), group_size)
    v = mx.ones(r.shape, dtype=mx.bool_) if valid is None else _grouped(valid, group_size)
    v = v.astype(mx.bool_)
    hi = mx.where(v, r, -mx.inf).max(axis=1)
    lo = mx.where(v, r, mx.inf).min(axis=1)
    return (hi <= lo) | (v.sum(axis=1) <= 1)


# ---------------------------------------------------------------------------------------------
# Loss


def _aggregate(per_token: mx.array, mask: mx.array, loss_type: str, max_len: int) -> mx.array:
    if loss_type == "grpo":
        # Mean per sequence, then over the sequences that have at least one token.
        counts = mask.sum(axis=1)
        seq = (per_token * mask).sum(axis=1) / mx.maximum(counts, 1)
        has = (counts > 0).astype(per_token.dtype)
        return (seq * has).sum() / mx.maximum(has.sum(), 1)
    if loss_type in ("bnpo", "dapo"):
        return (per_token * mask).sum() / mx.maximum(mask.sum(), 1)
    if loss_type == "dr_grpo":
        # Constant denominator: no length bias (Dr. GRPO).
        return (per_token * mask).sum() / (per_token.shape[0] * max_len)
    raise ValueError(f"unknown loss_type {loss_type!r}; expected one of {LOSS_TYPES}")


def loss_denominator(mask: mx.array, loss_type: str) -> float:
    """What the loss divides its sum by (up to a constant): tokens for a token mean, sequences for a
    per-sequence mean. Batches combine exactly when their losses are weighted by it."""
    if loss_type in ("bnpo", "dapo"):
        return float(mask.sum().item())
    if loss_type == "grpo":
        return float((mask.sum(axis=1) > 0).sum().item())
    return float(mask.shape[0])  # dr_grpo: rows times a constant max_len


def sequence_log_ratio(log_ratio: mx.array, mask: mx.array) -> mx.array:
    """GSPO's (N, 1) log importance ratio: the mean token log-ratio of each sequence,
    log s_i = (1 / |y_i|) sum_t (log pi(y_t) - log pi_old(y_t)); 0 for an empty row."""
    counts = mask.sum(axis=1, keepdims=True)
    return (log_ratio * mask).sum(axis=1, keepdims=True) / mx.maximum(counts, 1)


def top_entropy_mask(entropy: mx.array, mask: mx.array, quantile: float) -> mx.array:
    """float (N, C): 1 on the real tokens whose entropy is in the top `quantile` fraction of the
    batch's real tokens (at or above the (1 - quantile) quantile), 0 elsewhere."""
    threshold = masked_quantile(entropy, mask, 1.0 - quantile)
    return ((entropy >= threshold) & (mask > 0)).astype(mx.float32)


def rollout_logprob_gap(trainer_logprobs: mx.array, sampler_logprobs: mx.array, mask: mx.array) -> dict[str, float]:
    """How far the trainer's log-probs of the sampled tokens are from the sampler's, at the weights
    that sampled them: max and mean over the real tokens of |trainer - sampler| (in nats), and of
    |p_trainer - p_sampler| (verl's rollout_probs_diff). Both compute the same distribution, so a
    gap beyond rounding means the update follows a different policy from the one that sampled."""
    on = mask > 0
    if not bool(on.any().item()):
        return {}
    trainer, sampler = trainer_logprobs.astype(mx.float32), sampler_logprobs.astype(mx.float32)
    log_gap = mx.where(on, mx.abs(trainer - sampler), 0.0)
    prob_gap = mx.where(on, mx.abs(mx.exp(trainer) - mx.exp(sampler)), 0.0)
    return {"training/rollout_logprob_diff_max": log_gap.max().item(),
            "training/rollout_logprob_diff_mean": masked_mean(log_gap, mask).item(),
            "training/rollout_probs_diff_max": prob_gap.max().item(),
            "training/rollout_probs_diff_mean": masked_mean(prob_gap, mask).item()}


def truncated_importance_weights(old_logprobs: mx.array, sampled_logprobs: mx.array, mask: mx.array,
                                 cap: float) -> tuple[mx.array, dict[str, mx.array]]:
    """Truncated importance sampling for samples drawn by other weights than the ones about to be
    updated: per token w = min(pi_old / pi_sampled, cap) = min(exp(old - sampled), cap), 0 on padding.

    The clipped surrogate then compares the new policy with pi_old (the weights at the start of
    this update), and w corrects for pi_old not being the policy that drew the tokens. Returns the
    (N, C) weights and their statistics over the real tokens: mean, max and the clipped fraction.
    """
    on = mask > 0
    raw = mx.exp(mx.where(on, old_logprobs.astype(mx.float32) - sampled_logprobs.astype(mx.float32), 0.0))
    weights = mx.where(on, mx.minimum(raw, cap), 0.0)
    stats = {"tis_mean": masked_mean(weights, mask), "tis_max": weights.max(),
             "tis_clipped_frac": masked_mean((raw > cap).astype(mx.float32), mask)}
    return mx.stop_gradient(weights), stats


def grpo_loss(
    logprobs: mx.array,
    old_logprobs: mx.array,
    advantages: mx.array,
    mask: mx.array,
    *,
    ref_logprobs: mx.array | None = None,
    beta: float = 0.0,
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
    loss_type: str = "grpo",
    max_completion_length: int | None = None,
    importance_sampling_level: str = "token",
    policy_mask: mx.array | None = None,
) -> tuple[mx.array, dict[str, mx.array]]:
    """Clipped-surrogate GRPO loss (a scalar to minimise) and a dict of scalar statistics.

    advantages: (N,), or (N, C) when each token has its own (a non-negative per-token weight w
    folds in exactly: w * min(r A, clip(r) A) = min(r wA, clip(r) wA), which is how
    truncated_importance_weights are applied).
    ratio = exp(logp - old_logp) is taken against the policy that *generated* the samples; the
    reference only enters through the k3 KL penalty (when beta > 0 and ref_logprobs is given).
    Per token: -min(ratio * A, clip(ratio, 1 - eps, 1 + eps_high) * A) + beta * k3.
    Aggregation (loss_type): "grpo" mean per sequence then over non-empty sequences; "bnpo" /
    "dapo" sum / number of tokens; "dr_grpo" sum / (N * max_completion_length), which defaults to C.
    importance_sampling_level "sequence" is GSPO: every token of sequence i uses the one ratio
    s_i = exp(mean_t(logp - old_logp)), clipped as a whole; with loss_type "grpo" the loss is then
    the paper's -1/G sum_i min(s_i A_i, clip(s_i) A_i).
    policy_mask: optional (N, C) 0/1; only its tokens carry policy loss (top_entropy_mask), while
    the aggregation still divides by the tokens of `mask` and the KL term covers all of them.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}; expected one of {LOSS_TYPES}")
    if importance_sampling_level not in IMPORTANCE_SAMPLING_LEVELS:
        raise ValueError(f"unknown importance_sampling_level {importance_sampling_level!r}")
    if importance_sampling_level == "sequence" and loss_type not in SEQUENCE_LEVEL_LOSS_TYPES:
        raise ValueError(f"importance_sampling_level 'sequence' does not go with loss_type {loss_type!r}")
    eps_low = float(epsilon)
    eps_high = eps_low if epsilon_high is None else float(epsilon_high)
    max_len = logprobs.shape[1] if max_completion_length is None else int(max_completion_length)

    mask = mask.astype(mx.float32)
    on = mask > 0
    # Padding may hold garbage (e.g. -inf old log-probs): replace it by 0 up front so no inf/NaN
    # reaches the sums or the backward pass.
    logprobs = mx.where(on, logprobs.astype(mx.float32), 0.0)
    old = mx.where(on, mx.stop_gradient(old_logprobs.astype(mx.float32)), 0.0)
    ref = None
    if ref_logprobs is not None:
        ref = mx.where(on, mx.stop_gradient(ref_logprobs.astype(mx.float32)), 0.0)
    adv = mx.stop_gradient(advantages.astype(mx.float32))
    adv = adv if adv.ndim == 2 else adv.reshape(-1, 1)  # (N,) per completion, or (N, C) per token

    log_ratio = logprobs - old
    if importance_sampling_level == "sequence":
        log_ratio = mx.broadcast_to(sequence_log_ratio(log_ratio, mask), log_ratio.shape)
    ratio = mx.exp(log_ratio)
    clipped = mx.clip(ratio, 1 - eps_low, 1 + eps_high)
    objective = mx.minimum(ratio * adv, clipped * adv)
    if policy_mask is not None:
        objective = objective * mx.stop_gradient(policy_mask.astype(mx.float32))
    # Every aggregation is linear, so the loss splits into the policy term and the KL term.
    policy_loss = _aggregate(-objective, mask, loss_type, max_len)
    loss = policy_loss
    kl_mean = mx.array(0.0)  # token mean of k3 against the reference, a statistic
    if ref is not None:
        k3 = k3_kl(logprobs, ref)
        kl_term = _aggregate(k3, mask, loss_type, max_len)
        # With a token-mean loss the statistic *is* the loss term: reuse that node. Under
        # mx.compile, two equal subgraphs where one is detached get merged and the compiled
        # backward pass then fails (the same goes for policy_loss below).
        kl_mean = kl_term if loss_type in ("bnpo", "dapo") else masked_mean(k3, mask)
        if beta > 0:
            loss = loss + beta * kl_term

    # Statistics: no gradient flows through them.
    sg = mx.stop_gradient
    r = sg(ratio)
    # The clipped branch is active only where clipping lowers the objective: ratio below 1 - eps
    # with A < 0, or above 1 + eps_high with A > 0 (same as TRL).
    low = ((r < 1 - eps_low) & (adv < 0)).astype(mx.float32)
    high = ((r > 1 + eps_high) & (adv > 0)).astype(mx.float32)

    log_ratio = sg(log_ratio)
    stats = {
        "policy_loss": sg(policy_loss),
        "kl": sg(kl_mean),
        # How far this update moved from the sampling policy (k3 estimate of KL(new || old)).
        "ppo_kl": masked_mean(sg(k3_kl(logprobs, old)), mask),
        "clip_frac_low": masked_mean(low, mask),
        "clip_frac_high": masked_mean(high, mask),
        "clip_frac": masked_mean(mx.maximum(low, high), mask),
        "ratio_mean": masked_mean(r, mask),
        "ratio_std": masked_std(r, mask),
        "ratio_p95": masked_quantile(r, mask, 0.95),
        # ratio > 0, so 0 marks an empty mask.
        "ratio_max": mx.where(on, r, 0.0).max(),
        "log_ratio_mean": masked_mean(log_ratio, mask),
        "log_ratio_std": masked_std(log_ratio, mask),
        # Outside the clip range whatever the advantage's sign (clip_frac counts only active clips).
        "outside_clip_frac": masked_mean(((r < 1 - eps_low) | (r > 1 + eps_high)).astype(mx.float32), mask),
    }
    return loss, stats
