"""generate_rollout: group layout, EOS handling, shared vs per-row prefill, and the recorded
sampling log-probs against teacher-forced ones."""

import mlx.core as mx
import numpy as np
import pytest

from mlx_grpo.forward import completion_logprobs
from mlx_grpo.rollout import generate_rollout, to_train_batch
from conftest import make_tiny_model

# Different lengths in one batch, one of a single token (nothing to prefill before decoding).
PROMPTS = [[1, 2, 3, 4, 5, 6, 7], [9, 10], [11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22], [30]]
NO_EOS: list[int] = []


def teacher_forced(model, rollout) -> tuple[np.ndarray, np.ndarray]:
    """(N, C) log p of each completion token by a plain forward pass, and the recorded ones."""
    batch = to_train_batch(rollout)
    width = batch.mask.shape[1]
    forced = completion_logprobs(model, batch.tokens, batch.prompt_lengths, width)
    recorded = np.zeros((len(rollout.logprobs), width), dtype=np.float32)
    for i, row in enumerate(rollout.logprobs):
        recorded[i, :len(row)] = row
    mask = np.array(batch.mask)
    return np.array(forced) * mask, recorded * mask


def test_group_layout_and_lengths(tiny_model):
    G = 3
    prompts = PROMPTS + [PROMPTS[0]]  # a repeated prompt still gets its own group
    rollout = generate_rollout(tiny_model, prompts, group_size=G, max_new_tokens=6, eos_token_ids=NO_EOS,
                               temperature=1.0)
    assert len(rollout.completion_tokens) == len(prompts) * G
    for g, prompt in enumerate(prompts):
        for row in range(g * G, g * G + G):
            assert rollout.prompt_tokens[row] == prompt
    assert all(len(c) == 6 for c in rollout.completion_tokens)
    assert rollout.finish_reasons == ["length"] * len(prompts) * G
    assert all(rollout.truncated)
    assert [len(lp) for lp in rollout.logprobs] == [len(c) for c in rollout.completion_tokens]
    assert rollout.num_generated_tokens == 6 * len(prompts) * G


def test_eos_is_kept_and_ends_the_row(tiny_model):
    greedy = generate_rollout(tiny_model, PROMPTS, group_size=1, max_new_tokens=6, eos_token_ids=NO_EOS,
                              temperature=0.0)
    eos = greedy.completion_tokens[0][2]  # prompt 0 emits it as its third token
    stops_at = [c.index(eos) + 1 if eos in c else None for c in greedy.completion_tokens]

    rollout = generate_rollout(tiny_model, PROMPTS, group_size=2, max_new_tokens=6, eos_token_ids={eos},
                               temperature=0.0)
    for g, stop in enumerate(stops_at):
        for row in (2 * g, 2 * g + 1):
            completion = rollout.completion_tokens[row]
            if stop is None:
                assert rollout.finish_reasons[row] == "length"
                assert completion == greedy.completion_tokens[g]
            else:
                assert rollout.finish_reasons[row] == "stop"
                assert completion == greedy.completion_tokens[g][:stop]
                assert completion[-1] == eos
            assert len(rollout.logprobs[row]) == len(completion)
    assert rollout.finish_reasons[0] == "stop" and len(rollout.completion_tokens[0]) <= 3


def test_shared_prefill_matches_independent_rows(tiny_model):
    kwargs = dict(group_size=2, max_new_tokens=8, eos_token_ids=NO_EOS, temperature=0.0)
    shared = generate_rollout(tiny_model, PROMPTS, share_prefill=True, **kwargs)
    independent = generate_rollout(tiny_model, PROMPTS, share_prefill=False, **kwargs)
    assert shared.prompt_tokens == independent.prompt_tokens
    assert shared.completion_tokens == independent.completion_tokens
    np.testing.assert_allclose(np.array(shared.logprobs), np.array(independent.logprobs), atol=1e-4, rtol=0)


@pytest.mark.parametrize("share_prefill", [True, False])
@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 0.5), (0.0, 1.0)])
def test_recorded_logprobs_match_teacher_forcing(share_prefill, temperature, top_p):
    # Recorded log-probs are the raw model distribution (no temperature, no top-p), which is what
    # completion_logprobs computes at its default temperature of 1.
    model = make_tiny_model(seed=1)
    mx.random.seed(3)
    rollout = generate_rollout(model, PROMPTS, group_size=3, max_new_tokens=10, eos_token_ids={5, 17},
                               temperature=temperature, top_p=top_p, share_prefill=share_prefill)
    forced, recorded = teacher_forced(model, rollout)
    np.testing.assert_allclose(recorded, forced, atol=1e-4, rtol=0)
    # Not vacuous: real, non-trivial log-probs were compared.
    assert rollout.num_generated_tokens > 0 and np.abs(recorded).max() > 0.1


def test_restores_training_mode(tiny_model):
    tiny_model.train()
    generate_rollout(tiny_model, PROMPTS[:1], group_size=2, max_new_tokens=2, eos_token_ids=NO_EOS)
    assert tiny_model.training
