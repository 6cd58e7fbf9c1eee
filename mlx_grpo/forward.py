"""Training-time forward passes through an mlx-lm model: the log-probs of the sampled completion
tokens, one prompt pass per group, gradient checkpointing of the transformer blocks, and the
start-up check that decides which of the fast paths are exact for the model at hand.

Everything runs through the model's own code. The prompt is shared through mlx-lm's cache protocol
(`offset`, `update_and_fetch`, `make_mask`), or through the model's own caches copied per row;
checkpointing wraps each block's `__call__`; and the head is either the model's linear head or its
own `__call__` fed the body's output, so a logit softcap or scale after the head is kept. Where no
shortcut reproduces `model(tokens)`, the trainer runs `model(tokens)` itself, a few rows at a time.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_map
from mlx_lm.models.base import create_causal_mask
from mlx_lm.models.cache import make_prompt_cache

from mlx_grpo.errors import UserInputError, first_line

# The exact fallback runs model(tokens) on at most this many (position x vocab) logits at a time.
OWN_FORWARD_LOGITS = 1 << 24


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


# ---------------------------------------------------------------------------------------------
# Where the body and the head are


def _text_model_path(model: nn.Module) -> list[str]:
    """Keys from the model to the module that holds the text body at `.model`: none, or the text
    model that a multimodal wrapper keeps under `.language_model` (Gemma 3, Qwen3.5, Mistral 3)."""
    path, inner = [], model
    while "model" not in inner and isinstance(inner.get("language_model"), nn.Module):
        path.append("language_model")
        inner = inner["language_model"]
    return path


def text_model(model: nn.Module) -> nn.Module:
    inner = model
    for key in _text_model_path(model):
        inner = inner[key]
    return inner


def body_of(model: nn.Module) -> nn.Module | None:
    """The transformer body (embeddings, blocks, final norm), or None where there is none to find."""
    body = text_model(model).get("model")
    return body if isinstance(body, nn.Module) and "layers" in body else None


def linear_head(model: nn.Module) -> tuple[nn.Module, callable] | None:
    """(module owning the head weights, hidden -> logits) for mlx-lm's usual linear head: `lm_head`,
    or the input embedding when the two are tied. None when there is neither."""
    inner, body = text_model(model), body_of(model)
    tied = getattr(getattr(inner, "args", None), "tie_word_embeddings", None)
    head = inner.get("lm_head")
    if isinstance(head, nn.Module) and not tied:
        return head, head
    embed = body.get("embed_tokens") if body is not None else None
    if isinstance(embed, nn.Module) and hasattr(embed, "as_linear"):
        return embed, embed.as_linear
    return None


_given_body_classes: dict[type, type] = {}


def own_head_logits(model: nn.Module, hidden: mx.array) -> mx.array:
    """Logits from the body's output `hidden` (rows, L, H) through whatever the model's own
    `__call__` does after its body: the head, and any softcap or scaling after it.

    For the length of one call the body's class is swapped for one that returns `hidden`; the swap
    sits inside this function, so a gradient checkpoint that recomputes it swaps again.
    """
    body = body_of(model)
    base = type(body)
    if base not in _given_body_classes:
        _given_body_classes[base] = type(f"Given{base.__name__}", (base,),
                                         {"__call__": lambda self, *args, **kwargs: self.__dict__["_given"]})
    body.__dict__["_given"] = hidden
    body.__class__ = _given_body_classes[base]
    try:
        return model(mx.zeros(hidden.shape[:2], dtype=mx.int32))
    finally:
        body.__class__ = base
        del body.__dict__["_given"]


# ---------------------------------------------------------------------------------------------
# The paths and the check that chooses them


HEADS = ("linear", "own_head", "own_forward")


@dataclass(frozen=True)
class LogprobPath:
    """How the trainer computes completion log-probs for one model (see check_logprob_path).

    head: "linear" runs the body, then the linear head on a few positions at a time; "own_head" the
    same with the model's own `__call__` after the body; "own_forward" runs `model(tokens)` itself.
    prompt: how a group's shared prompt is run once: "prompt_kv" (the blocks' KV-cache protocol,
    checkpoint-friendly), "model_cache" (the model's own caches from mlx-lm's make_prompt_cache,
    copied per row: conv and linear-attention layers too), or "per_row" (every row in full).
    """
    head: str = "linear"
    prompt: str = "prompt_kv"
    vocab_size: int = 0
    gap: float = 0.0  # the largest |log-prob - the model's own| the check measured on this path

    def describe(self) -> str:
        heads = {"linear": "the linear head in chunks", "own_head": "the model's own head (softcap/scale kept)",
                 "own_forward": "the model's own forward, a few rows at a time"}
        prompts = {"prompt_kv": "one prompt pass per group", "model_cache": "one prompt pass per group (model caches)",
                   "per_row": "the prompt once per row"}
        return f"{heads[self.head]}, {prompts[self.prompt]}"


FAST_PATH = LogprobPath()


def logprob_tolerance(dtype) -> float:
    """The largest log-prob gap taken for rounding rather than a different computation."""
    return 1e-4 if dtype == mx.float32 else 5e-2


def _check_batch(vocab: int, group_size: int = 2, prompt: int = 6, completion: int = 5):
    """Two groups of rows sharing a prompt, completions of different lengths, from a fixed seed that
    leaves every global random state alone."""
    rng = np.random.default_rng(20261204)
    high = min(vocab, 1000)
    rows = []
    for _ in range(2):
        p = rng.integers(1, high, prompt).tolist()
        rows += [p + rng.integers(1, high, completion - i).tolist() + [0] * i for i in range(group_size)]
    return (mx.array(rows, dtype=mx.int32), mx.array([prompt] * len(rows), dtype=mx.int32), completion,
            mx.array([[1.0] * (completion - i) + [0.0] * i for _ in range(2) for i in range(group_size)]))


def own_logprobs(model: nn.Module, tokens: mx.array, prompt_lengths: mx.array, c: int) -> mx.array:
    """(N, C) log-probs of the completion tokens straight from log_softmax(model(tokens)): the
    reference every faster path is checked against."""
    logits = model(tokens).astype(mx.float32)
    n, t = tokens.shape
    src = mx.clip(prompt_lengths.reshape(n, 1) - 1 + mx.arange(c).reshape(1, c), 0, t - 1)
    picked = mx.take_along_axis(logits, src[..., None], axis=1)
    targets = mx.take_along_axis(tokens, mx.clip(src + 1, 0, t - 1), axis=1)
    return mx.take_along_axis(picked, targets[..., None], axis=-1).squeeze(-1) - mx.logsumexp(picked, axis=-1)


def _gap(model, path: LogprobPath, batch, group_size: int, want: mx.array) -> float:
    tokens, plens, c, mask = batch
    try:
        got = completion_logprobs(model, tokens, plens, c, group_size=group_size, path=path)
        gap = float(mx.max(mx.abs(got - want) * mask).item())
    except Exception:  # noqa: BLE001  (any failure of a shortcut only means: not this path)
        return float("inf")
    return gap if np.isfinite(gap) else float("inf")


def model_name(model: nn.Module) -> str:
    args = getattr(text_model(model), "args", None) or getattr(model, "args", None)
    return getattr(args, "model_type", None) or type(model).__module__.rsplit(".", 1)[-1]


def probe(model: nn.Module) -> tuple[int, mx.Dtype]:
    """(vocabulary size, dtype of the logits) from one short forward pass of the model's own; a
    model whose forward pass fails is refused in one line."""
    try:
        logits = model(mx.array([[1, 2]], dtype=mx.int32))
        mx.eval(logits)
    except Exception as err:  # noqa: BLE001
        raise UserInputError(f"model {model_name(model)}: its own forward pass fails on a token batch "
                             f"({first_line(err)})") from None
    return int(logits.shape[-1]), logits.dtype


def check_logprob_path(model: nn.Module) -> LogprobPath:
    """The fastest path whose log-probs equal log_softmax(model(tokens)) on a short batch, within
    rounding of the model's dtype; raises UserInputError when the model cannot run even that.

    Run it on the model as it will train (adapters attached, blocks checkpointed): whatever makes
    a shortcut differ, a softcap after the head or a layer that no KV cache fits, is found here,
    not by a list of architecture names.
    """
    vocab, dtype = probe(model)
    tol = logprob_tolerance(dtype)
    batch = _check_batch(vocab)
    tokens, plens, c, mask = batch
    want = own_logprobs(model, tokens, plens, c)
    mx.eval(want)
    if not bool(mx.all(mx.isfinite(want)).item()):
        raise UserInputError(f"model {model_name(model)}: its own forward pass gives non-finite log-probs")
    heads = [h for h in HEADS if h == "own_forward" or body_of(model) is not None]
    if linear_head(model) is None:
        heads = [h for h in heads if h != "linear"]
    for head in heads:  # the last, own_forward, is model(tokens) itself: it cannot differ but by rounding
        gap = _gap(model, LogprobPath(head, "per_row", vocab), batch, 1, want)
        if gap <= tol:
            break
    if head == "own_forward":
        return LogprobPath("own_forward", "per_row", vocab, gap)
    for prompt in ("prompt_kv", "model_cache"):
        shared = LogprobPath(head, prompt, vocab)
        shared_gap = _gap(model, shared, batch, 2, want)
        if shared_gap <= tol:
            return LogprobPath(head, prompt, vocab, shared_gap)
    return LogprobPath(head, "per_row", vocab, gap)


# ---------------------------------------------------------------------------------------------
# Log-probs of the sampled completion tokens


def _token_stats(inv_t: float, return_entropy: bool, return_varentropy: bool):
    """logits (rows, L, V), ids (rows, L) -> (log-probs,) or (log-probs, entropy[, varentropy])."""

    def stats(logits, ids):
        logits = logits.astype(mx.float32)
        if inv_t != 1.0:
            logits = logits * inv_t
        lse = mx.logsumexp(logits, axis=-1)
        # ids are integer inputs of a checkpoint: stop_gradient so its VJP skips them.
        ids = mx.stop_gradient(ids)
        lp = mx.take_along_axis(logits, ids[..., None], axis=-1).squeeze(-1) - lse
        if not return_entropy:
            return (lp,)
        # H = lse - sum p * logit; cheap because the chunk's logits already exist. It is a
        # statistic: stop_gradient keeps the backward pass from differentiating it.
        z = mx.stop_gradient(logits)
        probs = mx.softmax(z, axis=-1)
        ent = mx.stop_gradient(lse) - (probs * z).sum(axis=-1)
        if not return_varentropy:
            return lp, ent
        log_p = z - mx.stop_gradient(lse)[..., None]
        return lp, ent, (probs * log_p * log_p).sum(axis=-1) - ent * ent

    return stats


def completion_logprobs(
    model: nn.Module,
    tokens: mx.array,
    prompt_lengths: mx.array,
    completion_length: int,
    chunk_size: int = 32,
    temperature: float = 1.0,
    return_entropy: bool = False,
    group_size: int = 1,
    return_varentropy: bool = False,
    path: LogprobPath = FAST_PATH,
) -> mx.array | tuple[mx.array, ...]:
    """float32 (N, C) log p(tokens[i, p_i + j] | tokens[i, :p_i + j]) for j in [0, C).

    tokens: int32 (N, T), each row = prompt, completion, right padding (the model has no attention
    mask, so right padding cannot affect earlier positions). prompt_lengths: int (N,), each >= 1.
    Positions past T are clamped to T - 1; the caller masks them.

    path: how to compute them for this model (check_logprob_path); the default is mlx-lm's usual
    body + linear head. Memory: only the (N, T, hidden) body output is kept; the head runs on
    chunk_size completion positions at a time, so at most N * chunk_size * vocab logits exist at
    once. Each chunk is wrapped in a checkpoint, so under a gradient transform the backward pass
    recomputes a chunk's logits instead of keeping every chunk's logits alive.
    temperature: divide logits by it (to match a sampler that used temperature != 1).
    return_entropy: also return the per-token entropy (N, C) of the (tempered) distribution.
    return_varentropy: return the entropy and also the varentropy (N, C), the variance of log p
    over the distribution: sum p (log p)^2 - H^2.
    group_size: when > 1, consecutive rows in groups of this size share their prompt, which is then
    run once per group (G times less prompt work) where the path allows; not under mx.compile,
    which cannot read the prompt lengths.
    """
    n, t = tokens.shape
    c = int(completion_length)
    p = prompt_lengths.astype(mx.int32).reshape(n, 1)
    j = mx.arange(c, dtype=mx.int32).reshape(1, c)
    # The hidden state at position k predicts token k + 1.
    src = mx.clip(p - 1 + j, 0, t - 1)
    targets = mx.take_along_axis(tokens, mx.clip(p + j, 0, t - 1), axis=1)
    stats = _token_stats(1.0 / float(temperature), return_entropy or return_varentropy, return_varentropy)
    width = 1 + bool(return_entropy or return_varentropy) + bool(return_varentropy)
    if c == 0:
        columns = [mx.zeros((n, 0), dtype=mx.float32)] * width
    elif path.head == "own_forward":
        columns = _own_forward_columns(model, tokens, src, targets, stats, path.vocab_size)
    else:
        columns = _split_columns(model, tokens, prompt_lengths, src, targets, c, chunk_size, stats,
                                 group_size if path.prompt != "per_row" else 1, path)
    return columns[0] if width == 1 else tuple(columns)


def _split_columns(model, tokens, prompt_lengths, src, targets, c, chunk_size, stats, group_size, path):
    """The body once, then the head over chunk_size completion positions at a time."""
    body = body_of(model)
    if group_size > 1:
        hidden = shared_prompt_hidden(model, tokens, prompt_lengths.tolist(), c, group_size, path.prompt)
    else:
        hidden = mx.take_along_axis(body(tokens), src[..., None], axis=1)  # (N, C, H), final-normed
    if path.head == "linear":
        head_module, head = linear_head(model)
        # Checkpoint w.r.t. the head's (trainable) parameters as well as the chunk inputs.
        chunk_fn = nn.utils.checkpoint(head_module, lambda h, ids: stats(head(h), ids))
    else:  # the model's own head
        chunk_fn = _checkpoint_outside_blocks(model, lambda h, ids: stats(own_head_logits(model, h), ids))
    step = max(1, int(chunk_size))
    chunks = []
    for s in range(0, c, step):
        h = hidden[:, s : s + step]
        if chunks:
            # Order the chunks, so the lazy graph frees one chunk's logits before the next.
            h = mx.depends(h, chunks[-1][0])
        chunks.append(chunk_fn(h, targets[:, s : s + step]))
    return [mx.concatenate([ch[k] for ch in chunks], axis=1) for k in range(len(chunks[0]))]


def _checkpoint_outside_blocks(model: nn.Module, fn):
    """fn checkpointed with respect to its inputs and every trainable parameter outside the
    transformer blocks (the head, a tied embedding, a logit scale), which is what the model's own
    `__call__` may use after its body. The blocks' parameters reach fn only through the body's
    output, an input; leaving them out spares a zero gradient of every block per chunk."""

    def outside_blocks() -> dict:
        params = model.trainable_parameters()
        body = params
        for key in [*_text_model_path(model), "model"]:
            body = body.get(key, {}) if isinstance(body, dict) else {}
        if isinstance(body, dict):
            body.pop("layers", None)
        return params

    def inner(params, *args):
        model.update(params)
        return fn(*args)

    checkpointed = mx.checkpoint(inner)
    return lambda *args: checkpointed(outside_blocks(), *args)


def _own_forward_columns(model, tokens, src, targets, stats, vocab_size):
    """model(tokens) itself, on as many rows at a time as keep the logits under OWN_FORWARD_LOGITS;
    each row chunk is checkpointed, so the backward pass recomputes rather than keeps its logits."""
    n, t = tokens.shape
    rows = max(1, OWN_FORWARD_LOGITS // max(1, t * vocab_size))

    def chunk(toks, positions, ids):
        logits = model(mx.stop_gradient(toks))
        return stats(mx.take_along_axis(logits, mx.stop_gradient(positions)[..., None], axis=1), ids)

    chunk_fn = nn.utils.checkpoint(model, chunk)
    chunks = []
    for s in range(0, n, rows):
        part = tokens[s : s + rows]
        if chunks:
            part = mx.depends(part, chunks[-1][0])
        chunks.append(chunk_fn(part, src[s : s + rows], targets[s : s + rows]))
    return [mx.concatenate([ch[k] for ch in chunks], axis=0) for k in range(len(chunks[0]))]


def _model_cache_rows(model: nn.Module, prompt: mx.array, rows: int) -> list:
    """The model's own caches (mlx-lm's make_prompt_cache) after the body ran the prompt, each copied
    to `rows` rows. MLX writes into an array by making a new one, so gradients flow back through
    the prompt pass."""
    caches = make_prompt_cache(model)
    body_of(model)(prompt, cache=caches)
    for cache in caches:
        cache.state = tree_map(lambda a: mx.broadcast_to(a, (rows, *a.shape[1:])) if isinstance(a, mx.array) else a,
                               cache.state)
    return caches


def shared_prompt_hidden(model: nn.Module, tokens: mx.array, prompt_lengths: list[int], c: int,
                         group_size: int, prompt_pass: str = "prompt_kv") -> mx.array:
    """(N, C, H) final-normed hidden states that predict the C completion tokens, running each
    group's prompt through the body once instead of once per row.

    Rows are group-contiguous (rows g*G .. g*G+G-1 share a prompt), right-padded like the train batch.
    prompt_pass "prompt_kv" shares the blocks' keys and values (PromptKV); "model_cache" runs the
    prompt with the model's own caches and copies them per row.
    """
    n, body = tokens.shape[0], body_of(model)
    parts = []
    for start in range(0, n, group_size):
        p = prompt_lengths[start]
        prompt = tokens[start:start + 1, :p - 1 if prompt_pass == "model_cache" else p]
        if prompt_pass == "model_cache":
            # The prompt's last token runs with the completions, so every row's state is its own
            # from there on.
            caches = _model_cache_rows(model, prompt, group_size) if p > 1 else None
            rows = tokens[start:start + group_size, p - 1:p + c - 1]
            if rows.shape[1] < c:
                rows = mx.pad(rows, [(0, 0), (0, c - rows.shape[1])])
            parts.append(body(rows, cache=caches))
            continue
        caches = [PromptKV(group_size) for _ in body.layers]
        last = body(prompt, cache=caches)[:, -1:]  # predicts completion token 0
        last = mx.broadcast_to(last, (group_size, 1, last.shape[-1]))
        if c == 1:
            parts.append(last)
            continue
        # Completion tokens 0 .. C-2 predict tokens 1 .. C-1 (zero-padded where a row is shorter).
        comp = tokens[start:start + group_size, p:p + c - 1]
        if comp.shape[1] < c - 1:
            comp = mx.pad(comp, [(0, 0), (0, c - 1 - comp.shape[1])])
        parts.append(mx.concatenate([last, body(comp, cache=caches)], axis=1))
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

    def call(self, x, mask=None, cache=None, *args, **kwargs):
        if args or kwargs or (cache is not None and not isinstance(cache, PromptKV)):
            # Generation's caches, the model's own caches or a block with more inputs: run as is.
            return block_call(self, x, mask, cache, *args, **kwargs)
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
    body = body_of(model)
    for block in body.layers if body is not None else []:
        base = type(block)
        if base in _checkpointed_classes.values():
            continue
        if base not in _checkpointed_classes:
            _checkpointed_classes[base] = type(f"Checkpointed{base.__name__}", (base,),
                                               {"__call__": _checkpointed_call(base.__call__)})
        block.__class__ = _checkpointed_classes[base]
