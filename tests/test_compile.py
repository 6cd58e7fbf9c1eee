"""optim.compile: the compiled loss-and-gradient step must agree with the eager one, with LoRA."""

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
import pytest
from mlx.utils import tree_flatten

from conftest import TINY_VOCAB, make_tiny_model
from mlx_grpo.config import load_config
from mlx_grpo.adapters import apply_lora
from mlx_grpo.rollout import Rollout, TrainBatch, to_train_batch
from mlx_grpo.policy import make_grad_fn


def lora_model(seed: int = 0):
    model = make_tiny_model(seed=seed)
    apply_lora(model, rank=4, alpha=8, dropout=0.0, num_layers=-1)
    # LoRA's B starts at zero, which makes every gradient of A zero too: give B values so that a
    # step that silently loses the adapters' gradients cannot pass.
    mx.random.seed(seed + 1)
    params = [(k, mx.random.normal(v.shape) * 0.05 if k.endswith("lora_b") else v)
              for k, v in tree_flatten(model.trainable_parameters())]
    model.load_weights(params, strict=False)
    mx.eval(model.parameters())
    return model


def a_batch(seed: int = 0, rows: int = 4, prompt_len: int = 5, completion_len: int = 7) -> TrainBatch:
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, TINY_VOCAB, size=(rows, prompt_len + completion_len))
    lengths = np.full(rows, prompt_len)
    mask = np.ones((rows, completion_len), dtype=np.float32)
    mask[1, 4:] = 0  # a shorter completion
    return TrainBatch(mx.array(tokens, dtype=mx.int32), mx.array(lengths, dtype=mx.int32), mx.array(mask),
                      int(lengths.sum() + mask.sum()))


def config(compile_step: bool, **overrides):
    return load_config(None, overrides={"optim.compile": compile_step, **overrides})


def assert_same_grads(eager, compiled):
    eager, compiled = dict(tree_flatten(eager)), dict(tree_flatten(compiled))
    assert eager.keys() == compiled.keys()
    for name, g in eager.items():
        np.testing.assert_allclose(np.array(compiled[name]), np.array(g), rtol=1e-4, atol=1e-6, err_msg=name)


# On-policy (no frozen log-probs), pipelined (old log-probs recorded while sampling), and mu > 1
# with a KL penalty (old and reference log-probs).
@pytest.mark.parametrize("overrides, give_old, give_ref", [
    ({}, False, False), ({"rollout.pipeline": True}, True, False),
    ({"grpo.beta": 0.04, "grpo.num_iterations": 2}, True, True)])
def test_compiled_gradients_match_eager_with_lora(overrides, give_old, give_ref):
    model = lora_model()
    batch = a_batch()
    advantages = mx.array([1.0, -0.5, 0.25, -0.75])
    old = mx.random.normal(batch.mask.shape) * 0.1 - 3.0 if give_old else None
    ref = mx.random.normal(batch.mask.shape) * 0.1 - 3.0 if give_ref else None
    eager_fn = make_grad_fn(model, config(False, **overrides))
    compiled_fn = make_grad_fn(model, config(True, **overrides))

    (loss_e, stats_e), grads_e = eager_fn(model, batch, advantages, old, ref)
    (loss_c, stats_c), grads_c = compiled_fn(model, batch, advantages, old, ref)
    mx.eval(grads_e, grads_c)
    assert abs(loss_c.item() - loss_e.item()) < 1e-5
    assert abs(stats_c["entropy"].item() - stats_e["entropy"].item()) < 1e-4
    assert_same_grads(grads_e, grads_c)
    norms = {k: float(mx.abs(v).sum()) for k, v in tree_flatten(grads_c)}
    assert all(k.endswith(("lora_a", "lora_b")) for k in norms)
    assert all(n > 0 for n in norms.values()), "a LoRA gradient is zero under compile"

    # After an optimizer step the compiled function must see the new weights, not constants
    # captured at its first call.
    optimizer = optim.Adam(learning_rate=1e-2)
    optimizer.update(model, grads_e)
    mx.eval(model.parameters())
    (loss_e2, stats_e2), grads_e2 = eager_fn(model, batch, advantages, old, ref)
    (loss_c2, stats_c2), grads_c2 = compiled_fn(model, batch, advantages, old, ref)
    assert abs(stats_e2["entropy"].item() - stats_e["entropy"].item()) > 1e-6  # the step changed the policy
    assert abs(stats_c2["entropy"].item() - stats_e2["entropy"].item()) < 1e-4
    assert abs(loss_c2.item() - loss_e2.item()) < 1e-5
    assert_same_grads(grads_e2, grads_c2)


def test_bucketed_batch_gives_the_same_gradients():
    """Padding lengths up to a bucket (what optim.compile does) changes shapes, not the loss."""
    model = lora_model()
    rollout = Rollout(prompt_tokens=[[3, 4, 5], [3, 4, 5], [7, 8], [7, 8]],
                      completion_tokens=[[10, 11, 12, 1], [13, 14], [15], [16, 17, 18, 19, 20]],
                      finish_reasons=["stop", "stop", "stop", "length"], prefill_time_s=0.0, generation_time_s=1.0)
    plain, padded = to_train_batch(rollout), to_train_batch(rollout, pad_to=32)
    assert plain.tokens.shape == (4, 7) and plain.mask.shape == (4, 5)
    assert padded.tokens.shape == (4, 32) and padded.mask.shape == (4, 32)
    assert padded.num_tokens == plain.num_tokens
    advantages = mx.array([1.0, -1.0, 0.5, -0.5])
    grad_fn = make_grad_fn(model, config(False))
    (loss_p, _), grads_p = grad_fn(model, plain, advantages, None, None)
    (loss_b, _), grads_b = grad_fn(model, padded, advantages, None, None)
    assert abs(loss_p.item() - loss_b.item()) < 1e-6
    assert_same_grads(grads_p, grads_b)


def test_compiled_update_moves_the_weights_like_eager():
    """Two optimizer steps with gradient accumulation: the same weights either way."""
    from mlx_grpo.policy import build_optimizer, update_policy

    results = []
    for compile_step in (False, True):
        model = lora_model()
        cfg = config(compile_step, **{"optim.grad_accum_steps": 2, "optim.warmup_steps": 0,
                                      "optim.learning_rate": 1e-2, "rollout.batch_size": 1, "rollout.group_size": 4})
        optimizer, grad_fn = build_optimizer(cfg), make_grad_fn(model, cfg)
        batch, advantages = a_batch(), mx.array([1.0, -0.5, 0.25, -0.75])
        for _ in range(2):
            stats = update_policy(model, optimizer, grad_fn, cfg, batch, advantages, [None, None], [None, None])
        assert stats["grad_norm"] > 0
        results.append(dict(tree_flatten(model.trainable_parameters())))
    eager, compiled = results
    for name, w in eager.items():
        np.testing.assert_allclose(np.array(compiled[name]), np.array(w), rtol=1e-4, atol=1e-5, err_msg=name)
    moved = lora_model()
    start = dict(tree_flatten(moved.trainable_parameters()))
    assert any(float(mx.abs(compiled[k] - start[k]).max()) > 1e-4 for k in start)
