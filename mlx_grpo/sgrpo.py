"""S-GRPO, the serial group (Dai et al. 2025, "S-GRPO: Early Exit via Reinforcement Learning in
Reasoning Models", arXiv 2505.07686), for completions with a <reasoning> section.

Instead of G independent completions of a prompt (the parallel group), the group is one full
reasoning path and G - 1 early exits from it: the path is cut at positions drawn uniformly inside
its reasoning, the answer-inducing text (close the reasoning, open the answer) is appended, and
the model writes an answer from there. Rows of a group are in exit order, earliest first; the
uncut path is the last row, exit G.

Rewards decay with the exit: the earliest correct answer earns 1, the next correct one 1/2, then
1/4, ... (1 / 2^(n - 1) for the n-th correct answer in exit order); wrong answers earn 0. The
advantage is the reward minus the group's mean, as in the paper (no division by the std).
"""

from __future__ import annotations

import random

import numpy as np

from mlx_grpo.rollout import Rollout, generate_rollout

REASONING_OPEN, REASONING_CLOSE, ANSWER_OPEN = "<reasoning>", "</reasoning>", "<answer>"
# What an exit appends to the cut reasoning: our format's way of saying "stop thinking, answer now".
ANSWER_INDUCING = f"\n{REASONING_CLOSE}\n{ANSWER_OPEN}\n"


def decaying_rewards(correct: np.ndarray, group_size: int) -> np.ndarray:
    """Per row: 1 / 2^(n - 1) for the n-th correct answer of its group in exit order, else 0."""
    correct = np.asarray(correct, dtype=bool).reshape(-1, group_size)
    nth = np.cumsum(correct, axis=1)
    return np.where(correct, 0.5 ** (nth - 1.0), 0.0).reshape(-1).astype(np.float32)


def exit_candidates(token_ends: list[int], text: str) -> range:
    """The cut positions p (keep tokens [0, p)) that end inside the reasoning: after the opening tag
    (p there: an exit before any thought) and before the closing one (or <answer>, or the end).
    token_ends[k]: the length of the text of tokens [0, k]. Without a reasoning tag the whole
    completion counts as reasoning."""
    opened = text.find(REASONING_OPEN)
    start = opened + len(REASONING_OPEN) if opened >= 0 else 0
    end = next((i for i in (text.find(REASONING_CLOSE, start), text.find(ANSWER_OPEN, start)) if i >= 0), len(text))
    ends = [0, *token_ends]  # ends[p]: the text length of the first p tokens
    low = next((p for p, e in enumerate(ends) if e >= start), len(ends) - 1)
    high = max((p for p, e in enumerate(ends) if e <= end), default=0)
    return range(low, max(low, high) + 1)


def draw_exits(candidates: range, count: int, rng: random.Random) -> list[int]:
    """`count` exit positions, uniform over the candidates (distinct while there are enough), ascending."""
    if len(candidates) >= count:
        return sorted(rng.sample(list(candidates), count))
    return sorted(rng.choice(candidates) for _ in range(count))


def token_text_ends(tokenizer, ids: list[int]) -> list[int]:
    """The decoded length of each prefix of `ids` (where every token's text ends)."""
    return [len(tokenizer.decode(ids[:k + 1])) for k in range(len(ids))]


def encode_plain(tokenizer, text: str) -> list[int]:
    """`text` as token ids, without the special tokens a tokenizer may add at the start."""
    try:
        return list(tokenizer.encode(text, add_special_tokens=False))
    except TypeError:  # a tokenizer without the option
        return list(tokenizer.encode(text))


def serial_group_rollout(model, tokenizer, prompts: list[list[int]], *, group_size: int, max_new_tokens: int,
                         answer_tokens: int, eos_token_ids: set[int], temperature: float, top_p: float,
                         rng: random.Random) -> Rollout:
    """The serial groups of `prompts`: rows group-contiguous, exits first (earliest first), then the
    full path. The answer-inducing tokens are inserted, not sampled: loss_mask is 0 on them."""
    sample = dict(eos_token_ids=eos_token_ids, temperature=temperature, top_p=top_p)
    full = generate_rollout(model, prompts, group_size=1, max_new_tokens=max_new_tokens, **sample)
    inducing = encode_plain(tokenizer, ANSWER_INDUCING)
    cuts = []
    for ids in full.completion_tokens:
        text_ids = [t for t in ids if t not in eos_token_ids]
        text = tokenizer.decode(text_ids)
        cuts.append(draw_exits(exit_candidates(token_text_ends(tokenizer, text_ids), text), group_size - 1, rng))
    exit_prompts = [p + full.completion_tokens[i][:cut] + inducing for i, p in enumerate(prompts) for cut in cuts[i]]
    answers = generate_rollout(model, exit_prompts, group_size=1, max_new_tokens=answer_tokens, share_prefill=False,
                               **sample)
    rows: dict[str, list] = {"prompt_tokens": [], "completion_tokens": [], "finish_reasons": [], "logprobs": [],
                             "loss_mask": []}

    def add(prompt, completion, reason, logprobs, mask):
        for key, value in zip(rows, (prompt, completion, reason, logprobs, mask)):
            rows[key].append(value)

    for i, prompt in enumerate(prompts):
        ids, lps = full.completion_tokens[i], full.logprobs[i]
        for j, cut in enumerate(cuts[i]):
            a = i * (group_size - 1) + j
            answer = answers.completion_tokens[a]
            add(list(prompt), ids[:cut] + inducing + answer, answers.finish_reasons[a],
                lps[:cut] + [0.0] * len(inducing) + answers.logprobs[a],
                [1.0] * cut + [0.0] * len(inducing) + [1.0] * len(answer))
        add(list(prompt), list(ids), full.finish_reasons[i], list(lps), [1.0] * len(ids))
    return Rollout(**rows, prefill_time_s=full.prefill_time_s + answers.prefill_time_s,
                   generation_time_s=full.generation_time_s + answers.generation_time_s,
                   max_new_tokens=max_new_tokens)


def sgrpo_metrics(correct: np.ndarray, valid: np.ndarray, group_size: int) -> dict[str, float]:
    """sgrpo/exit_{k}_accuracy for each exit k (k = group_size: the uncut path), the mean exit k of
    the correct answers, and the accuracy over every row. Masked rows are left out."""
    correct = np.asarray(correct, dtype=bool).reshape(-1, group_size)
    valid = np.asarray(valid, dtype=bool).reshape(-1, group_size)
    record = {}
    for k in range(group_size):
        if valid[:, k].any():
            record[f"sgrpo/exit_{k + 1}_accuracy"] = float(correct[valid[:, k], k].mean())
    exits = np.broadcast_to(np.arange(1, group_size + 1), correct.shape)
    hits = correct & valid
    if hits.any():  # (no correct answer: no position to average)
        record["sgrpo/avg_correct_exit_position"] = float(exits[hits].mean())
    record["sgrpo/overall_accuracy"] = float(correct[valid].mean()) if valid.any() else 0.0
    return record
