"""Pure functions that turn one step's raw results into the flat metric record the sinks share.

Names follow the seed references: Train/*, Performance/*, Scoring/* (TensorBoard), actor/*,
response_length/*, completion/*, timing_s/* (the TinyZero-style groups).
"""

from __future__ import annotations


import numpy as np


def reward_metrics(rewards: np.ndarray, valid: np.ndarray, group_size: int) -> dict[str, float]:
    """Batch reward statistics over the validly scored completions."""
    scored = rewards[valid]
    if scored.size == 0:
        scored = np.zeros(1, dtype=np.float32)
    # A group whose valid rewards are all equal (or that has at most one) gives every row advantage 0.
    groups = [rewards[i:i + group_size][valid[i:i + group_size]] for i in range(0, len(rewards), group_size)]
    zero_std = float(np.mean([g.size < 2 or np.ptp(g) < 1e-6 for g in groups])) if groups else 0.0
    return {
        "Train/AvgReward": float(scored.mean()),
        "Train/RewardStd": float(scored.std()),
        "Train/RewardMin": float(scored.min()),
        "Train/RewardMax": float(scored.max()),
        "Train/RewardVariance": float(scored.var()),
        "frac_reward_zero_std": zero_std,
        "Train/MaskedFrac": float(1.0 - valid.mean()) if valid.size else 0.0,
    }


def criterion_metrics(criteria: list, scores: dict[str, np.ndarray], valid: np.ndarray) -> dict[str, float]:
    """Each criterion's weight (as the seed logs it) and its actual mean score in [0, 1]."""
    total_weight = sum(c.weight for c in criteria)
    record = {}
    for criterion in criteria:
        record[f"Scoring/{criterion.name}"] = criterion.weight / total_weight
        values = scores[criterion.name][valid]
        record[f"Scoring/{criterion.name}_score"] = float(values.mean()) if values.size else 0.0
        record[f"Scoring/{criterion.name}_std"] = float(values.std()) if values.size else 0.0
    return record


def length_metrics(completion_lengths: list[int], prompt_lengths: list[int], finish_reasons: list[str],
                   max_new_tokens: int) -> dict[str, float]:
    lengths = np.asarray(completion_lengths, dtype=np.float64)
    prompts = np.asarray(prompt_lengths, dtype=np.float64)
    truncated = np.asarray([r == "length" for r in finish_reasons], dtype=np.float64)
    return {
        "response_length/mean": float(lengths.mean()),
        "response_length/max": float(lengths.max()),
        "response_length/min": float(lengths.min()),
        "response_length/clip_ratio": float(np.mean(lengths >= max_new_tokens)),
        "prompt_length/mean": float(prompts.mean()),
        "prompt_length/max": float(prompts.max()),
        "prompt_length/min": float(prompts.min()),
        "completion/truncated_frac": float(truncated.mean()),
        "completion/finished_frac": float(1.0 - truncated.mean()),
        "tokens/prompt_total": float(prompts.sum()),
        "tokens/response_total": float(lengths.sum()),
        "tokens/overall_total": float(prompts.sum() + lengths.sum()),
        # The TRL names of the healthy-ranges seed.
        "tokens/queries_len_mean": float(prompts.mean()),
        "tokens/responses_len_mean": float(lengths.mean()),
        "tokens/responses_len_std": float(lengths.std()),
        # Prompts are never cut to a maximum length here, so none is ever clipped.
        "prompt_length/clip_ratio": 0.0,
    }


def critic_metrics(rewards: np.ndarray, shaped: np.ndarray, valid: np.ndarray, advantages: np.ndarray,
                   lengths: np.ndarray, beta: float, kl: float) -> dict[str, float]:
    """TinyZero's critic/* names carried over to GRPO, which has no critic.

    score: the rubric reward of each scored completion. rewards: `shaped`, the reward the advantages
    were computed from: the score plus grpo.overlong_penalty's term (the KL is a term of the loss in
    GRPO, not reward shaping, so without that penalty rewards equal the score). returns: what
    the update used as each token's return: the completion's advantage on every one of its tokens
    (an outcome reward, undiscounted), so these statistics are token-weighted. kl / kl_coeff: the
    mean k3 KL to the reference and its weight beta.
    """
    scored = rewards[valid] if valid.any() else np.zeros(1, dtype=np.float32)
    after = shaped[valid] if valid.any() else np.zeros(1, dtype=np.float32)
    per_token = np.repeat(advantages[valid], lengths[valid]) if valid.any() else np.zeros(0)
    per_token = per_token if per_token.size else np.zeros(1, dtype=np.float32)
    record = {}
    for name, values in (("score", scored), ("rewards", after)):
        record.update({f"critic/{name}/mean": float(values.mean()), f"critic/{name}/max": float(values.max()),
                       f"critic/{name}/min": float(values.min())})
    record.update({"critic/returns/mean": float(per_token.mean()), "critic/returns/max": float(per_token.max()),
                   "critic/returns/min": float(per_token.min()), "ppo/returns/var": float(per_token.var()),
                   "critic/kl": float(kl), "critic/kl_coeff": beta})
    return record


# Other trainers' names for values this record already holds: TRL GRPOTrainer's plain log keys (the
# learning-log seed) and TRL PPO's env/, objective/ and ppo/ groups (the healthy-ranges seed).
ALIASES = {
    "loss": "Train/Loss", "grad_norm": "actor/grad_norm", "learning_rate": "actor/lr",
    "reward": "Train/AvgReward", "reward_std": "Train/RewardStd", "entropy": "actor/entropy_loss",
    "env/reward_mean": "Train/AvgReward", "env/reward_std": "Train/RewardStd",
    "objective/kl": "actor/ppo_kl", "objective/kl_coef": "actor/kl_coef", "objective/entropy": "actor/entropy_loss",
    "ppo/policy/entropy": "actor/entropy_loss", "ppo/policy/clipfrac": "actor/pg_clipfrac",
    "ppo/policy/approxkl": "actor/ppo_kl", "ppo/policy/ratio": "actor/is_ratio/mean",
    "ppo/policy/advantages_mean": "critic/advantages/mean", "ppo/returns/mean": "critic/returns/mean",
    "ppo/loss/policy": "actor/pg_loss", "ppo/loss/total": "Train/Loss",
}


def alias_metrics(record: dict) -> dict[str, float]:
    """The ALIASES of `record`'s values, and TRL's per-reward-function rewards/{criterion}/mean and /std."""
    out = {alias: record[name] for alias, name in ALIASES.items() if name in record}
    out["ppo/mean_non_score_reward"] = -record["Train/KLPenalty"]  # TRL PPO: the KL penalty as a reward
    for tag, value in record.items():
        if tag.startswith("Scoring/") and tag.endswith("_score"):
            name = tag[len("Scoring/"):-len("_score")]
            out[f"rewards/{name}/mean"] = value
            out[f"rewards/{name}/std"] = record[f"Scoring/{name}_std"]
    return out


def correctness_metrics(correct: np.ndarray, truncated: np.ndarray, lengths: np.ndarray) -> dict[str, float]:
    """TinyZero's completion/*_correct_frac and correct_mean_length, given what counts as correct."""
    record = {}
    if truncated.any():
        record["completion/truncated_correct_frac"] = float(correct[truncated].mean())
    if (~truncated).any():
        record["completion/finished_correct_frac"] = float(correct[~truncated].mean())
    if correct.any():
        record["completion/correct_mean_length"] = float(lengths[correct].mean())
    return record


def timing_per_token(timings_s: dict[str, float], response_tokens: int, total_tokens: int) -> dict[str, float]:
    """timing_per_token_ms/*: generation per response token, the other phases per trained token."""
    record = {}
    for phase, seconds in timings_s.items():
        per = response_tokens if phase == "gen" else total_tokens
        record[f"timing_per_token_ms/{phase}"] = 1000.0 * seconds / max(per, 1)
    return record


def teacher_metrics(step_usage, total_usage, latencies: list[float]) -> dict[str, float]:
    """Teacher traffic this step (requests, tokens, cache hits, failures), running totals, and the
    run's rates and latency percentiles under Scoring/ (latencies: seconds per answered request)."""
    judged = total_usage.scored + total_usage.failed  # completions that needed the teacher
    looked_up = judged + total_usage.cache_hits
    record = {
        "Scoring/Teacher_FailureRate": total_usage.failed / judged if judged else 0.0,
        "Scoring/Teacher_ParseErrorRate": total_usage.invalid_replies / total_usage.requests if total_usage.requests else 0.0,
        "Scoring/Teacher_CacheHitRate": total_usage.cache_hits / looked_up if looked_up else 0.0,
        "Scoring/Teacher_LowMassRate": total_usage.low_mass / total_usage.token_scores if total_usage.token_scores else 0.0,
        "Scoring/Teacher_Tokens": total_usage.tokens,
        "Scoring/Teacher_CostUSD": total_usage.cost_usd,
    }
    if latencies:
        record["Scoring/Teacher_LatencyP50_s"] = float(np.percentile(latencies, 50))
        record["Scoring/Teacher_LatencyP95_s"] = float(np.percentile(latencies, 95))
    return record | {
        "Teacher/Requests": step_usage.requests,
        "Teacher/PromptTokens": step_usage.prompt_tokens,
        "Teacher/CompletionTokens": step_usage.completion_tokens,
        "Teacher/APITokens": step_usage.tokens,
        "Teacher/APITokensTotal": total_usage.tokens,
        "Teacher/CacheHits": step_usage.cache_hits,
        "Teacher/Retries": step_usage.retries,
        "Teacher/InvalidReplies": step_usage.invalid_replies,
        "Teacher/Failed": step_usage.failed,
        "Teacher/LowMass": step_usage.low_mass,
        "Teacher/EstimatedUsageRequests": step_usage.estimated_requests,
        "Teacher/CostUSD": step_usage.cost_usd,
        "Teacher/CostUSDTotal": total_usage.cost_usd,
    }
