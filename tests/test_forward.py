"""Gradient checkpointing of the transformer blocks: the same log-probs and gradients, less memory."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from conftest import make_tiny_model
from mlx_grpo.forward import checkpoint_blocks
from mlx_grpo.forward import completion_logprobs
from mlx_grpo.adapters import apply_lora
from mlx_grpo.rollout import generate_rollout
from test_grpo import _grouped_batch


def lora_model():
    model = make_tiny_model(seed=4)
    apply_lora(model, rank=4, alpha=8, dropout=0.0, num_layers=-1)
    mx.random.seed(5)
    # Non-zero B, so the gradients of A are not trivially zero.
    model.load_weights([(k, mx.random.normal(v.shape) * 0.05 if k.endswith("lora_b") else v)
                        for k, v in tree_flatten(model.trainable_parameters())], strict=False)
    return model


@pytest.mark.parametrize("group_size", [1, 3])
def test_checkpointed_blocks_give_the_same_values_and_gradients(group_size):
    tokens, plens, c, mask = _grouped_batch([6, 2], [3, 5, 1, 4, 2, 2], 3)
    w = mx.array(np.random.default_rng(1).normal(size=mask.shape), dtype=mx.float32) * mask
    results = []
    for checkpoint in (False, True):
        model = lora_model()
        if checkpoint:
            checkpoint_blocks(model)
            assert type(model.model.layers[0]).__name__.startswith("Checkpointed")

        def loss(m):
            return (completion_logprobs(m, tokens, plens, c, chunk_size=2, group_size=group_size) * w).sum()

        value, grads = nn.value_and_grad(model, loss)(model)
        results.append((value.item(), dict(tree_flatten(grads))))
    (v1, g1), (v2, g2) = results
    assert v2 == pytest.approx(v1, abs=1e-4)
    assert g1.keys() == g2.keys() and any(k.endswith("self_attn.k_proj.lora_a") for k in g1)
    for k in g1:
        np.testing.assert_allclose(np.array(g2[k]), np.array(g1[k]), rtol=1e-4, atol=1e-6, err_msg=k)
    assert all(float(mx.abs(g).max()) > 0 for g in g2.values())


def test_checkpointing_keeps_names_other_models_and_generation():
    model, other = lora_model(), lora_model()
    names = [k for k, _ in tree_flatten(model.parameters())]
    checkpoint_blocks(model)
    checkpoint_blocks(model)  # idempotent
    assert [k for k, _ in tree_flatten(model.parameters())] == names
    assert not type(other.model.layers[0]).__name__.startswith("Checkpointed")  # only this model changed
    # Generation (mlx-lm's KV caches) runs through the plain blocks: greedy tokens agree.
    prompts = [[5, 6, 7, 8], [9, 10]]
    a = generate_rollout(model, prompts, group_size=2, max_new_tokens=5, eos_token_ids=[], temperature=0.0)
    b = generate_rollout(other, prompts, group_size=2, max_new_tokens=5, eos_token_ids=[], temperature=0.0)
    assert a.completion_tokens == b.completion_tokens


def test_checkpointing_lowers_the_peak_memory_of_a_backward_pass():
    tokens, plens, c, mask = _grouped_batch([40, 40], [60] * 8, 4)
    peaks = []
    for checkpoint in (False, True):
        model = make_tiny_model(seed=2)
        apply_lora(model, rank=4, alpha=8, dropout=0.0, num_layers=-1)
        if checkpoint:
            checkpoint_blocks(model)
        grad_fn = nn.value_and_grad(model, lambda m: completion_logprobs(m, tokens, plens, c, group_size=4).sum())
        mx.eval(grad_fn(model))
        mx.clear_cache()
        base = mx.get_active_memory()
        mx.reset_peak_memory()
        mx.eval(grad_fn(model))
        peaks.append(mx.get_peak_memory() - base)
    assert peaks[1] < 0.8 * peaks[0]
