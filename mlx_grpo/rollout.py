"""Batched generation of G completions per prompt, returning token ids rather than text.

We drive mlx-lm's `BatchGenerator` directly instead of `batch_generate`, because the latter drops
the EOS token from rows that stopped; GRPO must train on that token (it is how the model learns
to stop).
"""

from __future__ import annotations

import time
import weakref
from dataclasses import dataclass

import mlx.core as mx
from mlx_lm.generate import BatchGenerator
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.sample_utils import make_sampler

from mlx_grpo.errors import UserInputError, first_line
from mlx_grpo.forward import logprob_tolerance, model_name, own_logprobs, probe


@dataclass
class Rollout:
    """B*G completions, group-contiguous: rows g*G .. g*G+G-1 answer prompt g."""

    prompt_tokens: list[list[int]]       # one entry per completion (repeated within a group)
    completion_tokens: list[list[int]]   # sampled ids, including the EOS token when the row stopped
    finish_reasons: list[str]            # "stop" (EOS) or "length" (hit max_new_tokens)
    prefill_time_s: float
    generation_time_s: float
    # log p(token) of each sampled token under the sampling model, from the raw logits (before
    # temperature and top-p), aligned with completion_tokens; the log-softmax runs in float32
    # whatever the model's dtype, as the trainer's does.
    logprobs: list[list[float]] | None = None
    max_new_tokens: int = 0  # the budget the rows were sampled with (rollout.adaptive_window varies it)
    # 1.0 on sampled tokens, 0.0 on tokens inserted rather than sampled (S-GRPO's answer-inducing
    # text), which must carry no loss; None: every token was sampled.
    loss_mask: list[list[float]] | None = None

    @property
    def completion_lengths(self) -> list[int]:
        return [len(c) for c in self.completion_tokens]

    @property
    def num_generated_tokens(self) -> int:
        return sum(self.completion_lengths)

    @property
    def tokens_per_sec(self) -> float:
        return self.num_generated_tokens / max(self.generation_time_s, 1e-9)

    @property
    def truncated(self) -> list[bool]:
        return [reason == "length" for reason in self.finish_reasons]


def _prefill(model, prompt: list[int]) -> list:
    """A KV cache holding all but the last prompt token: BatchGenerator feeds the last one itself,
    as the first decode step, so a row inserted with this cache goes straight to decoding."""
    cache = make_prompt_cache(model)
    if len(prompt) > 1:
        model(mx.array(prompt[:-1])[None], cache=cache)
        mx.eval([c.state for c in cache])
    return cache


# id(model) -> ({shared prefill?: rows decoded together (0 = all, 1 = one at a time), for each kind
# of prefill that works}, whether its logits need casting to float32). Decided once per model by
# check_generation.
_DECODE_MODES: dict[int, tuple[dict[bool, int], bool]] = {}


def check_generation(model) -> str:
    """Check that mlx-lm's batched decoding reproduces the model's own forward, and choose how it
    runs: for each kind of prefill (rows starting from a shared prefill, or each row prefilling its
    own prompt), all rows together or, where mlx-lm's batched caches or masks do not fit the
    architecture, one row at a time. Returns a notice; raises UserInputError when nothing works.

    Greedy rows of different prompt lengths are compared against log_softmax(model(prompt +
    completion)). Runs once per model; generate_rollout calls it itself.
    """
    key = id(model)
    if key not in _DECODE_MODES:
        _DECODE_MODES[key] = _decode_modes(model)
        weakref.finalize(model, _DECODE_MODES.pop, key, None)
    return "; ".join(f"{'shared prefill' if shared else 'own prefill'}: "
                     f"{'all rows together' if rows == 0 else 'one row at a time (slower)'}"
                     for shared, rows in _DECODE_MODES[key][0].items())


def _decode_modes(model) -> tuple[dict[bool, int], bool]:
    vocab, dtype = probe(model)
    tolerance, cast = logprob_tolerance(dtype), dtype != mx.float32
    high = min(vocab, 1000)
    prompts = [[(7 * i + 3) % high + 1 for i in range(n)] for n in (3, 6)]
    modes, problems = {}, []
    for shared in (True, False):
        for rows_together in (0, 1):
            try:
                rollout = _generate(model, prompts, group_size=2, max_new_tokens=3, eos_token_ids=[],
                                    temperature=0.0, top_p=1.0, share_prefill=shared, rows_together=rows_together,
                                    float32_logits=cast)
                full = [p + c for p, c in zip(rollout.prompt_tokens, rollout.completion_tokens)]
                width = max(map(len, full))
                tokens = mx.array([row + [0] * (width - len(row)) for row in full], dtype=mx.int32)
                lengths = mx.array([len(p) for p in rollout.prompt_tokens], dtype=mx.int32)
                gap = float(mx.abs(own_logprobs(model, tokens, lengths, 3) - mx.array(rollout.logprobs)).max().item())
            except Exception as err:  # noqa: BLE001  (a failing mode only means: not this one)
                problems.append(first_line(err))
                continue
            if gap <= tolerance:
                modes[shared] = rows_together
                break
            problems.append(f"its sampled log-probs differ from its own forward pass by {gap:.2g}")
    if not modes:
        found = "; ".join(dict.fromkeys(problems))
        raise UserInputError(f"model {model_name(model)}: mlx-lm's generation does not work for it ({found})")
    return modes, cast


def generate_rollout(
    model,
    prompts: list[list[int]],
    *,
    group_size: int,
    max_new_tokens: int,
    eos_token_ids: set[int] | list[int],
    temperature: float = 1.0,
    top_p: float = 1.0,
    share_prefill: bool = True,
) -> Rollout:
    """Sample `group_size` completions for each prompt, all rows decoded in one batch (or one row at
    a time, for an architecture that check_generation found mlx-lm cannot batch).

    share_prefill: run each distinct prompt through the model once and start its G rows from
    that one KV cache, instead of prefilling the same prompt G times.
    """
    check_generation(model)
    modes, cast = _DECODE_MODES[id(model)]
    share_prefill = share_prefill if share_prefill in modes else not share_prefill  # the kind that works
    return _generate(model, prompts, group_size=group_size, max_new_tokens=max_new_tokens,
                     eos_token_ids=eos_token_ids, temperature=temperature, top_p=top_p, share_prefill=share_prefill,
                     rows_together=modes[share_prefill], float32_logits=cast)


def _in_float32(tokens, logits):
    return logits.astype(mx.float32)


def _generate(model, prompts, *, group_size, max_new_tokens, eos_token_ids, temperature, top_p, share_prefill,
              rows_together: int, float32_logits: bool = False) -> Rollout:
    rows = [list(p) for p in prompts for _ in range(group_size)]
    sampler = make_sampler(temp=temperature, top_p=top_p if top_p < 1.0 else 0.0)
    generator = BatchGenerator(
        model,
        max_tokens=max_new_tokens,
        stop_tokens=[[t] for t in eos_token_ids],
        sampler=sampler,
        # A bfloat16 model's log-softmax in bfloat16 is off by up to 0.1 nats; in float32, the
        # sampler's log-probs are the trainer's (which computes them in float32 too).
        logits_processors=[_in_float32] if float32_logits else None,
        # One decode batch for every row, so nothing queues behind the default limit of 32.
        completion_batch_size=rows_together or len(rows),
        prefill_batch_size=rows_together or len(rows),
    )
    was_training = model.training
    model.eval()  # no LoRA dropout while sampling
    try:
        start = time.perf_counter()
        if share_prefill:
            caches: dict[tuple[int, ...], list] = {}
            for p in prompts:
                if tuple(p) not in caches:
                    caches[tuple(p)] = _prefill(model, list(p))
            # Rows of a group may share one cache object: the generator merges the row caches into
            # a fresh batch cache and never writes to the ones passed in.
            uids = generator.insert([r[-1:] for r in rows], [max_new_tokens] * len(rows),
                                    caches=[caches[tuple(r)] for r in rows])
        else:
            uids = generator.insert(rows, [max_new_tokens] * len(rows))
        completions = {uid: [] for uid in uids}
        picked: list[tuple[list[int], mx.array]] = []
        reasons: dict[int, str] = {}
        first_token_at = None
        while responses := generator.next_generated():
            if first_token_at is None:
                first_token_at = time.perf_counter()
            for r in responses:
                completions[r.uid].append(r.token)
                if r.finish_reason is not None:
                    reasons[r.uid] = "stop" if r.finish_reason == "stop" else "length"
            # Each response carries the full-vocabulary log-softmax row; keep only the sampled
            # entry. async_eval lets the vocab-sized rows be freed without stalling the decoder.
            step = mx.stack([r.logprobs[r.token] for r in responses]).astype(mx.float32)
            mx.async_eval(step)
            picked.append(([r.uid for r in responses], step))
        end = time.perf_counter()
    finally:
        generator.close()
        model.train(was_training)
    logprobs = {uid: [] for uid in uids}
    if picked:
        values = mx.concatenate([s for _, s in picked]).tolist()
        for uid, value in zip((u for us, _ in picked for u in us), values):
            logprobs[uid].append(value)
    mx.clear_cache()
    first_token_at = first_token_at or end
    return Rollout(
        prompt_tokens=rows,
        completion_tokens=[completions[u] for u in uids],
        finish_reasons=[reasons.get(u, "length") for u in uids],
        prefill_time_s=first_token_at - start,
        generation_time_s=end - start,
        logprobs=[logprobs[u] for u in uids],
        max_new_tokens=max_new_tokens,
    )


@dataclass
class TrainBatch:
    tokens: mx.array          # (N, T) prompt + completion, right-padded with 0
    prompt_lengths: mx.array  # (N,)
    mask: mx.array            # (N, C) 1.0 on completion tokens (EOS included), 0.0 on padding
    num_tokens: int           # real (unpadded) prompt + completion tokens, for throughput

    def rows(self, start: int, stop: int) -> "TrainBatch":
        """A micro-batch of rows [start, stop), for gradient accumulation."""
        tokens = self.tokens[start:stop]
        lengths = self.prompt_lengths[start:stop]
        mask = self.mask[start:stop]
        real = int((lengths.sum() + mask.sum()).item())
        return TrainBatch(tokens, lengths, mask, real)

    def keep_rows(self, keep) -> "TrainBatch":
        """Zero the loss mask of rows where `keep` (bool, (N,)) is False, e.g. completions the
        teacher failed to score: they must not move the weights, not even through the KL term."""
        mask = self.mask * mx.array(keep, dtype=mx.float32)[:, None]
        return TrainBatch(self.tokens, self.prompt_lengths, mask, self.num_tokens)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def to_train_batch(rollout: Rollout, mask_truncated: bool = False, pad_to: int = 1) -> TrainBatch:
    """Concatenate each prompt with its sampled ids (never re-tokenised text) into one array.

    pad_to: round both lengths up to a multiple of it, so a compiled step sees few shapes.
    """
    completion_len = _round_up(max(1, max(rollout.completion_lengths)), pad_to)
    total_len = _round_up(max(len(p) + len(c) for p, c in zip(rollout.prompt_tokens, rollout.completion_tokens)), pad_to)
    tokens, mask = [], []
    sampled = rollout.loss_mask or [[1.0] * len(c) for c in rollout.completion_tokens]
    for prompt, completion, truncated, on in zip(rollout.prompt_tokens, rollout.completion_tokens,
                                                 rollout.truncated, sampled):
        row = prompt + completion
        tokens.append(row + [0] * (total_len - len(row)))
        keep = 0.0 if (mask_truncated and truncated) else 1.0
        mask.append([keep * m for m in on] + [0.0] * (completion_len - len(completion)))
    lengths = [len(p) for p in rollout.prompt_tokens]
    num_tokens = sum(lengths) + rollout.num_generated_tokens
    return TrainBatch(mx.array(tokens, dtype=mx.int32), mx.array(lengths, dtype=mx.int32),
                      mx.array(mask, dtype=mx.float32), num_tokens)
