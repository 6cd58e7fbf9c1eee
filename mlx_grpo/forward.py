"""Training-time forward passes through an mlx-lm model: one prompt pass per group, and gradient
checkpointing of the transformer blocks.

Both work through the model's own code: the prompt is shared through mlx-lm's cache protocol
(`offset`, `update_and_fetch`, `make_mask`), and checkpointing wraps each block's `__call__`.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.base import create_causal_mask


class PromptKV:
    """One block's keys and values of a prompt, run once, that its G completion rows attend to.

    Nothing is copied in place, so gradients flow back through the shared prompt pass.
    """

    def __init__(self, rows: int, keys: mx.array | None = None, values: mx.array | None = None):
        self.rows, self.keys, self.values = rows, keys, values
        self.offset = 0 if keys is None else keys.shape[2]

    def update_and_fetch(self, keys, values):
        if self.keys is None:  # the prompt's own pass
            self.keys, self.values, self.offset = keys, values, keys.shape[2]
            return keys, values
        # The completions' pass: every row attends to the same prompt.
        shape = (self.rows, *self.keys.shape[1:])
        return (mx.concatenate([mx.broadcast_to(self.keys, shape), keys], axis=2),
                mx.concatenate([mx.broadcast_to(self.values, shape), values], axis=2))

    def make_mask(self, n: int, return_array: bool = False, window_size=None):
        return create_causal_mask(n, offset=self.offset, window_size=window_size)


def shared_prompt_hidden(model: nn.Module, tokens: mx.array, prompt_lengths: list[int], c: int,
                         group_size: int) -> mx.array:
    """(N, C, H) final-normed hidden states that predict the C completion tokens, running each
    group's prompt through the model once instead of once per row.

    Rows are group-contiguous (rows g*G .. g*G+G-1 share a prompt), right-padded like the train batch.
    """
    n = tokens.shape[0]
    parts = []
    for start in range(0, n, group_size):
        p = prompt_lengths[start]
        caches = [PromptKV(group_size) for _ in model.model.layers]
        last = model.model(tokens[start:start + 1, :p], cache=caches)[:, -1:]  # predicts completion token 0
        last = mx.broadcast_to(last, (group_size, 1, last.shape[-1]))
        if c == 1:
            parts.append(last)
            continue
        # Completion tokens 0 .. C-2 predict tokens 1 .. C-1 (zero-padded where a row is shorter).
        comp = tokens[start:start + group_size, p:p + c - 1]
        if comp.shape[1] < c - 1:
            comp = mx.pad(comp, [(0, 0), (0, c - 1 - comp.shape[1])])
        parts.append(mx.concatenate([last, model.model(comp, cache=caches)], axis=1))
    return mx.concatenate(parts, axis=0)


# ---------------------------------------------------------------------------------------------
# Gradient checkpointing


_checkpointed_classes: dict[type, type] = {}


def _checkpointed_call(block_call):
    """A block `__call__` that keeps only its input for the backward pass and recomputes the rest.

    The prompt's keys and values cross blocks through PromptKV, so they are made explicit inputs
    (completion pass) or outputs (prompt pass) of the checkpoint; a value captured by closure
    would get no gradient.
    """

    def call(self, x, mask=None, cache=None):
        if cache is not None and not isinstance(cache, PromptKV):
            return block_call(self, x, mask, cache)  # generation's KV caches: no gradient, nothing to save
        params = self.trainable_parameters()
        if cache is None:
            def plain(params, x):
                self.update(params)
                return block_call(self, x, mask, None)
            return mx.checkpoint(plain)(params, x)
        if cache.keys is None:
            def prompt_pass(params, x):
                self.update(params)
                fresh = PromptKV(cache.rows)
                out = block_call(self, x, mask, fresh)
                return out, fresh.keys, fresh.values
            out, cache.keys, cache.values = mx.checkpoint(prompt_pass)(params, x)
            cache.offset = cache.keys.shape[2]
            return out

        def completion_pass(params, x, keys, values):
            self.update(params)
            return block_call(self, x, mask, PromptKV(cache.rows, keys, values))
        return mx.checkpoint(completion_pass)(params, x, cache.keys, cache.values)

    return call


def checkpoint_blocks(model: nn.Module) -> None:
    """Recompute each transformer block's activations in the backward pass instead of keeping them:
    the update's memory then grows with one block's activations, not all of them, for about one
    more forward pass of compute. Only `model`'s blocks change (their class is swapped for a
    checkpointing subclass); parameter names stay the same."""
    for block in model.model.layers:
        base = type(block)
        if base in _checkpointed_classes.values():
            continue
        if base not in _checkpointed_classes:
            _checkpointed_classes[base] = type(f"Checkpointed{base.__name__}", (base,),
                                               {"__call__": _checkpointed_call(base.__call__)})
        block.__class__ = _checkpointed_classes[base]
