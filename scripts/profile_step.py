"""Where a GRPO step's time goes: one decode step and one update, split into their parts.

    uv run python scripts/profile_step.py [--quick] [--rows 8] [--prompt-len 147] [--completion 64]

Decode: the demo's rollout (LoRA rank 8 on every projection of every block, B x G rows) at the
middle of a completion. The whole step (model call and sampler) is timed, then each part alone at
the same shapes: the projections' matmuls, the LoRA adapters' extra work, attention over the KV
cache, the output head, the sampler. What is left is everything else (norms, RoPE, activations,
residual adds, cache writes, dispatch). The "in the step" rows time the step again with one part
patched out (LoRA, RoPE, cache writes, attention, norms): what that part costs in place, which can
exceed its time alone. Each idea for a faster rollout saves at most its part:
merging LoRA into the weights saves at most the LoRA row, a cheaper sampler at most the sampler
row. The lower-precision head rows show what a bf16 or 8-bit head costs on this backend.

Update: the default GRPO update (eager, one prompt pass per group) on a fixed batch, against the
time its matmuls take alone at the update's own shapes: forward, and the backward pass's input
gradient (the frozen weights get no weight gradient under LoRA), plus the adapters' small matmuls
and the output head. The matmuls' share of the update bounds the MFU that faster elementwise
work could buy; their own GFLOP/s against the large-matmul peak bounds the rest.

Times are the fastest of --repeats runs: on a shared or throttled machine the slower runs measure
the neighbours. Nothing else may run meanwhile.
"""

from __future__ import annotations

import argparse
import sys
import time
from unittest import mock

from bench_common import DEFAULT_MODEL, load_lora_bench_model, machine, print_table, write_results  # noqa: I001
from bench_blas import matmul_peak_gflops

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.sample_utils import make_sampler
from mlx_lm.tuner.lora import LoRALinear

from mlx_grpo.config import load_config
from mlx_grpo.policy import build_optimizer, make_grad_fn, update_policy
from mlx_grpo.rollout import to_train_batch

COLUMNS = ["phase", "part", "ms", "share_pct", "count", "gflop_s", "gb_s", "note"]


def best_ms(fn, repeats: int) -> float:
    """Fastest of `repeats` timed calls of fn() (evaluated), after two warm-up calls."""
    for _ in range(2):
        mx.eval(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        mx.eval(fn())
        times.append(time.perf_counter() - start)
    return 1e3 * min(times)


def read_bandwidth_gb_s() -> float:
    """The machine's memory read bandwidth as numpy's (vectorised) sum of a 256 MB array sees it."""
    a = np.ones(64_000_000, dtype=np.float32)
    a.sum()
    start = time.perf_counter()
    for _ in range(3):
        a.sum()
    return 3 * a.nbytes / (time.perf_counter() - start) / 1e9


def elementwise_ns() -> dict[str, float]:
    """ns per element of a multiply and of the transcendental ops that softmax, SiLU and the
    sampler are made of, on 4M float32 elements: how far this backend's element-wise kernels are
    from the memory-bound multiply."""
    x = mx.random.normal((4_000_000,))
    ops = {"multiply": lambda: x * 1.5, "exp": lambda: mx.exp(x), "sigmoid": lambda: mx.sigmoid(x),
           "log": lambda: mx.log(mx.abs(x) + 1)}
    return {name: best_ms(fn, 3) * 1e6 / x.size for name, fn in ops.items()}


def projections(model) -> list[tuple[str, object]]:
    """(name, LoRALinear) of every adapted projection of block 0; every block has the same."""
    return [(name, m) for name, m in model.model.layers[0].named_modules() if isinstance(m, LoRALinear)]


def decode_profile(model, rows: int, context: int, repeats: int) -> list[dict]:
    args = model.args
    layers = len(model.model.layers)
    hidden, vocab = args.hidden_size, args.vocab_size
    heads, kv_heads = args.num_attention_heads, args.num_key_value_heads
    head_dim = hidden // heads
    sampler = make_sampler(temp=0.8)

    cache = make_prompt_cache(model)
    model(mx.zeros((rows, context), dtype=mx.int32), cache=cache)
    mx.eval([c.state for c in cache])
    token = mx.zeros((rows, 1), dtype=mx.int32)

    def step():
        logits = model(token, cache=cache)[:, -1, :]
        for c in cache:  # write the same cache slot every call: the context stays `context` long
            c.offset -= 1
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        return sampler(logprobs), logprobs

    parts = {"whole decode step": (best_ms(step, repeats), 1, None, None)}
    in_step = {}
    for part, patch in in_step_skips(model, cache).items():
        # Pairs of steps with and without the part, the median of their differences: the VM's
        # drift over the pairs then moves both halves of a pair alike.
        saved = []
        for _ in range(3 * repeats):
            with_part = best_ms(step, 1)
            with patch:
                saved.append(with_part - best_ms(step, 1))
        in_step[part] = float(np.median(saved))
    weight_bytes, matmul_ms, lora_ms = 0, 0.0, 0.0
    adapted = projections(model)
    for name, lora in adapted:
        # Every block's own weights, as the step reads them: one block's weights timed 30 times
        # would sit in cache and measure faster than the step can go.
        every_block = [dict(b.named_modules())[name] for b in model.model.layers]
        x = mx.random.normal((rows, 1, lora.linear.weight.shape[1]))
        ms = best_ms(lambda: [m.linear(x) for m in every_block], repeats)
        matmul_ms += ms
        lora_ms += best_ms(lambda: [m(x) for m in every_block], repeats) - ms
        weight_bytes += lora.linear.weight.nbytes * layers
    count = len(adapted) * layers
    parts[f"matmul ({len(adapted)} projections x {layers} blocks)"] = (
        matmul_ms, count, 2 * rows * weight_bytes / 4 / matmul_ms / 1e6, weight_bytes / matmul_ms / 1e6)
    parts[f"LoRA extra ({len(adapted)} x {layers})"] = (lora_ms, count, None, None)
    q = mx.random.normal((rows, heads, 1, head_dim))
    k = mx.random.normal((rows, kv_heads, context, head_dim))
    v = mx.random.normal((rows, kv_heads, context, head_dim))
    parts["attention (sdpa over the cache)"] = (
        best_ms(lambda: mx.fast.scaled_dot_product_attention(q, k, v, scale=head_dim ** -0.5), repeats) * layers,
        layers, None, None)
    embed = model.model.embed_tokens.weight
    h = mx.random.normal((rows, 1, hidden))
    head_ms = best_ms(lambda: h @ embed.T, repeats)
    parts["output head (fp32)"] = (head_ms, 1, 2 * rows * embed.size / head_ms / 1e6, embed.nbytes / head_ms / 1e6)
    logits = mx.random.normal((rows, vocab)) * 3
    parts["sampler (log-softmax + categorical)"] = (
        best_ms(lambda: sampler(logits - mx.logsumexp(logits, axis=-1, keepdims=True)), repeats), 1, None, None)

    total = parts["whole decode step"][0]
    accounted = sum(v[0] for k, v in parts.items() if k != "whole decode step")
    parts["everything else (norms, RoPE, activations, adds, cache, dispatch)"] = (total - accounted, None, None, None)
    rows_out = []
    for part, (ms, count, gflops, gbs) in parts.items():
        rows_out.append({"phase": f"decode, {rows} rows, context {context}", "part": part, "ms": ms,
                         "share_pct": 100 * ms / total, "count": count, "gflop_s": gflops, "gb_s": gbs})
    for part, saved in in_step.items():
        rows_out.append({"phase": f"decode, {rows} rows, context {context}", "part": f"in the step: {part}",
                         "ms": saved, "share_pct": 100 * saved / total,
                         "note": "the step's time with this part, less without it"})
    # What a lower-precision head would cost here (the head is a plain matmul, so it stands for them all).
    for label, fn in (("output head in bf16", (lambda e=embed.astype(mx.bfloat16), hb=h.astype(mx.bfloat16): hb @ e.T)),
                      ("output head 8-bit quantized", _quantized_head(embed, h))):
        ms = best_ms(fn, max(1, repeats // 2))
        rows_out.append({"phase": f"decode, {rows} rows, context {context}", "part": label, "ms": ms,
                         "share_pct": 100 * ms / total, "count": 1, "note": f"{ms / head_ms:.1f}x the fp32 head"})
    return rows_out


def _skip_cache_write(self, keys, values):
    """KVCache.update_and_fetch without the write: the same slices come back, so attention still
    reads a context of the same length."""
    self.offset += keys.shape[2]
    return self.keys[..., : self.offset, :], self.values[..., : self.offset, :]


def in_step_skips(model, cache) -> dict[str, object]:
    """Patches that each drop one part from the model's own decode step, keeping every shape.
    What a part costs in place can exceed its time alone: in the step its inputs come cold
    from memory, and it queues behind the ops before it."""
    model_module = sys.modules[type(model.model).__module__]
    return {
        "LoRA adapters' extra work": mock.patch.object(LoRALinear, "__call__", lambda self, x: self.linear(x)),
        "RoPE": mock.patch.object(nn.RoPE, "__call__", lambda self, x, offset=0: x),
        "KV cache writes": mock.patch.object(type(cache[0]), "update_and_fetch", _skip_cache_write),
        "attention (sdpa)": mock.patch.object(model_module, "scaled_dot_product_attention",
                                              lambda queries, keys, values, **kw: queries),
        "RMS norms": mock.patch.object(nn.RMSNorm, "__call__", lambda self, x: x),
    }


def _quantized_head(embed, h):
    wq, scales, biases = mx.quantize(embed, group_size=64, bits=8)
    return lambda: mx.quantized_matmul(h, wq, scales, biases, transpose=True, group_size=64, bits=8)


def update_profile(model, tokenizer, batch_size: int, group_size: int, completion: int, repeats: int,
                   peak_gflops: float) -> list[dict]:
    from bench_backprop import computed_tokens, fixed_batch, gradient_path_params

    overrides = {"rollout.batch_size": batch_size, "rollout.group_size": group_size,
                 "rollout.max_new_tokens": completion, "optim.warmup_steps": 0, "optim.learning_rate": 1e-5}
    cfg = load_config(None, overrides)
    rollout = fixed_batch(tokenizer, batch_size, group_size, completion)
    batch = to_train_batch(rollout)
    advantages = mx.array(np.random.default_rng(1).standard_normal(batch_size * group_size).astype(np.float32))
    optimizer, grad_fn = build_optimizer(cfg), make_grad_fn(model, cfg)

    def update():
        update_policy(model, optimizer, grad_fn, cfg, batch, advantages, [None], [None])
        return mx.array(0)

    total = best_ms(update, repeats)
    positions = computed_tokens(rollout, group_size)  # a group's prompt runs once
    layers = len(model.model.layers)
    phase = f"update, B{batch_size} G{group_size}, {positions} positions"
    out, flops_all, gemm_ms = [], 0.0, 0.0
    for name, lora in projections(model):
        w = lora.linear.weight  # (out, in)
        x = mx.random.normal((positions, w.shape[1]))
        dy = mx.random.normal((positions, w.shape[0]))
        ms = best_ms(lambda: [x @ w.T, dy @ w], repeats) * layers  # forward, and the input gradient
        flops = 2 * 2 * positions * w.size * layers
        a, b = lora.lora_a, lora.lora_b  # (in, r), (r, out)
        xa = x @ a
        lora_ms = best_ms(lambda: [(x @ a) @ b, dy @ b.T, (dy @ b.T) @ a.T, x.T @ (dy @ b.T), xa.T @ dy],
                          repeats) * layers
        out.append({"phase": phase, "part": f"matmul {name} (forward + input gradient)", "ms": ms, "count": layers,
                    "gflop_s": flops / ms / 1e6})
        out.append({"phase": phase, "part": f"LoRA matmuls {name} (forward + gradients)", "ms": lora_ms, "count": layers})
        flops_all += flops
        gemm_ms += ms + lora_ms
    embed = model.model.embed_tokens.weight
    completions = sum(len(c) for c in rollout.completion_tokens)
    x = mx.random.normal((completions, embed.shape[1]))
    dy = mx.random.normal((completions, embed.shape[0]))
    head_ms = best_ms(lambda: [x @ embed.T, dy @ embed], repeats)
    head_flops = 2 * 2 * completions * embed.size
    out.append({"phase": phase, "part": "output head (forward + input gradient)", "ms": head_ms, "count": 1,
                "gflop_s": head_flops / head_ms / 1e6})
    flops_all += head_flops
    gemm_ms += head_ms
    # Two elementwise parts that need exp per element, which this backend computes one element at a
    # time: the log-softmax over the vocabulary and the SiLU gate, each forward + backward.
    logits = mx.random.normal((completions, embed.shape[0]))
    softmax_ms = best_ms(lambda: mx.grad(lambda z: mx.logsumexp(z, axis=-1).sum())(logits), repeats)
    inner = model.args.intermediate_size
    gate, up = mx.random.normal((positions, inner)), mx.random.normal((positions, inner))
    silu_ms = best_ms(lambda: mx.grad(lambda g, u: (g * mx.sigmoid(g) * u).sum(), argnums=(0, 1))(gate, up),
                      repeats) * layers
    for row in out:
        row["share_pct"] = 100 * row["ms"] / total
    six_n = 6 * gradient_path_params(model, cfg.lora.num_layers) * positions
    out.insert(0, {"phase": phase, "part": "whole update (eager, default)", "ms": total, "share_pct": 100.0,
                   "gflop_s": six_n / total / 1e6,
                   "note": f"MFU {100 * six_n / total / 1e6 / peak_gflops:.0f}% of {peak_gflops:.0f} GFLOP/s (6N)"})
    out.append({"phase": phase, "part": "all matmuls above", "ms": gemm_ms, "share_pct": 100 * gemm_ms / total,
                "gflop_s": flops_all / gemm_ms / 1e6,
                "note": f"{100 * flops_all / gemm_ms / 1e6 / peak_gflops:.0f}% of the large-matmul peak (LoRA time in, its FLOPs not)"})
    out.append({"phase": phase, "part": "log-softmax over the vocabulary (forward + backward)", "ms": softmax_ms,
                "share_pct": 100 * softmax_ms / total, "count": 1})
    out.append({"phase": phase, "part": f"SiLU gate (forward + backward) x {layers}", "ms": silu_ms,
                "share_pct": 100 * silu_ms / total, "count": layers})
    rest = total - gemm_ms - softmax_ms - silu_ms
    out.append({"phase": phase, "part": "everything else (attention, norms, RoPE, adds, AdamW, dispatch)",
                "ms": rest, "share_pct": 100 * rest / total})
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats, shorter update batch")
    parser.add_argument("--rows", type=int, default=8, help="decode rows (B x G; the demo's 1 x 8)")
    parser.add_argument("--prompt-len", type=int, default=147, help="prompt tokens (the arithmetic prompts' length)")
    parser.add_argument("--completion", type=int, default=64, help="completion tokens (decode context: half of it)")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per part (5; 3 with --quick)")
    parser.add_argument("--model", default=DEFAULT_MODEL)
    args = parser.parse_args(argv)
    repeats = args.repeats or (3 if args.quick else 5)

    model, tokenizer, _ = load_lora_bench_model(args.model)

    bandwidth = read_bandwidth_gb_s()
    per_element = elementwise_ns()
    peak = matmul_peak_gflops(args.quick)
    rows = decode_profile(model, args.rows, args.prompt_len + args.completion // 2, repeats)
    model.train()
    rows += update_profile(model, tokenizer, 1 if args.quick else 2, 4, 16 if args.quick else args.completion,
                           repeats, peak)
    info = machine()
    print_table(f"Where the time goes ({args.model}, fp32, {info['backend']}, BLAS {info['blas']})", rows, COLUMNS)
    print(f"memory read bandwidth (numpy sum) {bandwidth:.1f} GB/s; large-matmul peak {peak:.0f} GFLOP/s")
    print("element-wise ns per float32 element: "
          + ", ".join(f"{name} {ns:.2f}" for name, ns in per_element.items()))
    write_results("profile", rows, vars(args) | {"read_bandwidth_gb_s": bandwidth, "matmul_peak_gflops": peak,
                                                 "elementwise_ns_per_element": per_element})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
