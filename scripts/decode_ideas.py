"""Faster-rollout ideas that were measured and not kept, timed against the rollout as it is.

    uv run python scripts/decode_ideas.py [--repeats 3] [--max-new-tokens 64] [--rows 8]

Each idea is patched in for the length of a run of generate_rollout (the demo's shape: one
prompt, 8 rows, LoRA rank 8 on every projection, adapters non-zero), then taken out again:

- merged LoRA: a sampling copy of every adapted weight, W + scale * (A B)^T, so a decode step runs
  one matmul per projection instead of three; it costs a second copy of those weights in memory;
- compiled block halves (Llama-family blocks only): everything before the cache write (norm,
  q/k/v projections, RoPE) and everything after attention (o_proj, residual, norm, MLP) as two
  `mx.compile`d functions per block, so their element-wise work is fused and dispatched once;
- both together.

Runs alternate between the ideas, so a machine that slows down over the runs slows them all; the
table gives each idea's median tokens/s and its ratio to the plain rollout's. The last columns
compare each idea's tokens and sampled-token log-probs with the plain rollout's at the same seed:
identical tokens and a log-prob difference near float precision mean the idea samples from the same
policy. Nothing else may run meanwhile.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
from unittest import mock

from bench_common import DEFAULT_MODEL, bench_prompts, load_lora_bench_model, print_table, write_results  # noqa: I001

import mlx.core as mx
from mlx_lm.models import llama
from mlx_lm.models.base import scaled_dot_product_attention
from mlx_lm.tuner.lora import LoRALinear

from mlx_grpo.rollout import generate_rollout

COLUMNS = ["idea", "tok_s", "x_plain", "runs", "same_tokens", "max_logprob_diff"]


@contextlib.contextmanager
def merged_lora(model):
    lora_layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    for m in lora_layers:
        m.sampling_weight = m.linear.weight + (m.scale * (m.lora_a @ m.lora_b)).T.astype(m.linear.weight.dtype)
    mx.eval([m.sampling_weight for m in lora_layers])
    with mock.patch.object(LoRALinear, "__call__", lambda self, x: x @ self.sampling_weight.T):
        yield
    for m in lora_layers:
        del m.sampling_weight


def _compile_halves(block):
    attn = block.self_attn

    def before_cache(x, offset):
        batch, length, _ = x.shape
        h = block.input_layernorm(x)
        q = attn.q_proj(h).reshape(batch, length, attn.n_heads, -1).transpose(0, 2, 1, 3)
        k = attn.k_proj(h).reshape(batch, length, attn.n_kv_heads, -1).transpose(0, 2, 1, 3)
        v = attn.v_proj(h).reshape(batch, length, attn.n_kv_heads, -1).transpose(0, 2, 1, 3)
        return attn.rope(q, offset=offset), attn.rope(k, offset=offset), v

    def after_attention(x, out):
        batch, length, _ = x.shape
        h = x + attn.o_proj(out.transpose(0, 2, 1, 3).reshape(batch, length, -1))
        return h + block.mlp(block.post_attention_layernorm(h))

    # inputs=: the block's weights are read at each call, not frozen into the graph.
    return mx.compile(before_cache, inputs=[block.state]), mx.compile(after_attention, inputs=[block.state])


@contextlib.contextmanager
def compiled_halves(model):
    blocks = model.model.layers
    if not all(isinstance(b, llama.TransformerBlock) for b in blocks):
        raise SystemExit("compiled block halves are written for Llama-family blocks only")
    halves = {id(b): _compile_halves(b) for b in blocks}
    eager_call = llama.TransformerBlock.__call__

    def call(self, x, mask=None, cache=None):
        if cache is None or x.shape[1] != 1:  # prefill stays eager
            return eager_call(self, x, mask, cache)
        before_cache, after_attention = halves[id(self)]
        offset = cache.offset if isinstance(cache.offset, mx.array) else mx.array(cache.offset)
        q, k, v = before_cache(x, offset)
        k, v = cache.update_and_fetch(k, v)
        out = scaled_dot_product_attention(q, k, v, cache=cache, scale=self.self_attn.scale, mask=mask)
        return after_attention(x, out)

    with mock.patch.object(llama.TransformerBlock, "__call__", call):
        yield


@contextlib.contextmanager
def both(model):
    with merged_lora(model), compiled_halves(model):
        yield


IDEAS = {"plain rollout": lambda model: contextlib.nullcontext(), "merged LoRA": merged_lora,
         "compiled block halves": compiled_halves, "merged LoRA + compiled halves": both}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="timed rollouts per idea")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--rows", type=int, default=8, help="G: rows sampled from the one prompt")
    parser.add_argument("--model", default=DEFAULT_MODEL)
    args = parser.parse_args(argv)

    model, tokenizer, _ = load_lora_bench_model(args.model)
    prompts, _ = bench_prompts(tokenizer, 1)

    def rollout(idea: str, tokens: int, seed: int):
        with IDEAS[idea](model):
            mx.random.seed(seed)
            return generate_rollout(model, prompts, group_size=args.rows, max_new_tokens=tokens,
                                    eos_token_ids=[], temperature=0.8)

    rates = {idea: [] for idea in IDEAS}
    for idea in IDEAS:
        rollout(idea, 4, 0)  # warm-up: allocation, BLAS threads, compilation
    for run in range(args.repeats):
        for idea in IDEAS:
            rates[idea].append(rollout(idea, args.max_new_tokens, run).tokens_per_sec)
            print(f"run {run + 1}/{args.repeats} {idea}: {rates[idea][-1]:.1f} tok/s", flush=True)

    # The same seed for every idea; the plain rollout comes first in IDEAS and is the reference.
    same_seed = {idea: rollout(idea, args.max_new_tokens, 1234) for idea in IDEAS}
    reference = same_seed["plain rollout"]
    plain = statistics.median(rates["plain rollout"])
    rows = []
    for idea, same in same_seed.items():
        diff = max(abs(a - b) for ra, rb in zip(same.logprobs, reference.logprobs) for a, b in zip(ra, rb))
        rows.append({"idea": idea, "tok_s": statistics.median(rates[idea]),
                     "x_plain": statistics.median(rates[idea]) / plain, "runs": args.repeats,
                     "same_tokens": same.completion_tokens == reference.completion_tokens, "max_logprob_diff": diff})
    print_table(f"Rollout ideas ({args.model}, 1 prompt x {args.rows} rows, {args.max_new_tokens} tokens)", rows, COLUMNS)
    write_results("decode-ideas", rows, vars(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
