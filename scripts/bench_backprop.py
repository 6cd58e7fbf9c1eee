"""Backprop: tokens/s of the GRPO update (loss + gradient + AdamW step) on a fixed batch, eager and
under mx.compile, with MFU against the matmul peak measured in the same run; plus the forward-only
log-prob pass, each with one prompt pass per group and with every row in full.

    uv run python scripts/bench_backprop.py [--quick] [--batch-size 2 --group-size 4 --completion 64]

MFU = 6 x (parameters on the gradient path) x positions computed per second / matmul peak, where a
prompt shared by its group counts once. With LoRA on every layer the
gradient path is the whole network, as in the usual 6N rule; frozen weights get no weight gradient,
so the work actually done is nearer 4N and this MFU is an upper bound on the true utilisation.
"""

from __future__ import annotations

import argparse
import time

from bench_common import (DEFAULT_MODEL, bench_prompts, load_bench_model, machine, print_table,  # noqa: I001
                          write_results)
from bench_blas import matmul_peak_gflops

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from mlx_grpo.config import load_config
from mlx_grpo.forward import checkpoint_blocks
from mlx_grpo.rollout import Rollout, to_train_batch
from mlx_grpo.policy import COMPILE_BUCKET, batch_logprobs, build_optimizer, make_grad_fn, prepare_trainable, update_policy


def gradient_path_params(model, num_layers: int) -> int:
    """Parameters the backward pass runs through: the adapted blocks and everything above them,
    with the output head (the tied embedding counts once, as the head's matmul)."""
    layers = model.model.layers
    first = 0 if num_layers < 0 else max(0, len(layers) - num_layers)
    count = sum(v.size for layer in layers[first:] for _, v in tree_flatten(layer.parameters()))
    args = model.args
    return count + args.vocab_size * args.hidden_size


def computed_tokens(rollout, prompt_shared_by: int) -> int:
    """Positions the forward pass runs: each prompt once per `prompt_shared_by` rows, every completion."""
    prompts = sum(len(p) for p in rollout.prompt_tokens[::prompt_shared_by])
    return prompts + sum(len(c) for c in rollout.completion_tokens)


def fixed_batch(tokenizer, batch_size: int, group_size: int, completion: int, seed: int = 0):
    """B prompts x G rows of `completion` random tokens: the same work every call, no EOS."""
    prompts, _ = bench_prompts(tokenizer, batch_size, seed)
    rng = np.random.default_rng(seed)
    rows = [p for p in prompts for _ in range(group_size)]
    completions = [rng.integers(100, 20000, completion).tolist() for _ in rows]
    return Rollout(prompt_tokens=rows, completion_tokens=completions, finish_reasons=["length"] * len(rows),
                   prefill_time_s=0.0, generation_time_s=1.0)


def time_updates(model, cfg, batch, advantages, repeats: int) -> tuple[float, float, float]:
    """(first call seconds, median seconds of the next `repeats`, peak GB) for update_policy."""
    optimizer, grad_fn = build_optimizer(cfg), make_grad_fn(model, cfg)
    mx.reset_peak_memory()
    start = time.perf_counter()
    update_policy(model, optimizer, grad_fn, cfg, batch, advantages, [None], [None])
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        update_policy(model, optimizer, grad_fn, cfg, batch, advantages, [None], [None])
        times.append(time.perf_counter() - start)
    return first, float(np.median(times)), mx.get_peak_memory() / 1e9


def time_logprobs(model, batch, cfg, repeats: int) -> tuple[float, float]:
    """(median seconds, peak GB) of the forward-only log-prob pass (the old/reference policy's)."""
    mx.eval(batch_logprobs(model, batch, cfg))
    mx.reset_peak_memory()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        mx.eval(batch_logprobs(model, batch, cfg))
        times.append(time.perf_counter() - start)
    return float(np.median(times)), mx.get_peak_memory() / 1e9


def run(quick: bool, batch_size: int, group_size: int, completion: int, model_path: str = DEFAULT_MODEL) -> list[dict]:
    info = machine()
    repeats = 1 if quick else 2
    peak_gflops = matmul_peak_gflops(quick)
    model, tokenizer, _ = load_bench_model(model_path)
    overrides = {"rollout.batch_size": batch_size, "rollout.group_size": group_size,
                 "rollout.max_new_tokens": completion, "optim.warmup_steps": 0, "optim.learning_rate": 1e-5}
    cfg = load_config(None, overrides)
    prepare_trainable(model, cfg)
    path_params = gradient_path_params(model, cfg.lora.num_layers)
    rollout = fixed_batch(tokenizer, batch_size, group_size, completion)
    advantages = mx.array(np.random.default_rng(1).standard_normal(batch_size * group_size).astype(np.float32))
    common = {"model": model_path, "B": batch_size, "G": group_size, "prompt_len": len(rollout.prompt_tokens[0]),
              "completion": completion, "dtype": "float32", "backend": info["backend"], "blas": info["blas"],
              "lora": f"r{cfg.lora.rank} x all layers" if cfg.lora.num_layers < 0 else f"r{cfg.lora.rank} x {cfg.lora.num_layers}"}
    # Forward-only passes first: checkpointing (the last update row) changes the model for good.
    batch = to_train_batch(rollout)
    passes = (("log-probs (shared prompt)", {}), ("log-probs (per-row prompt)", {"grpo.share_prompt_pass": False}))
    logprob_rows = []
    for phase, extra in passes:
        seconds, peak = time_logprobs(model, batch, load_config(None, {**overrides, **extra}), repeats)
        logprob_rows.append({**common, "phase": phase, "tokens": batch.num_tokens, "seconds": seconds,
                             "tokens_per_s": batch.num_tokens / seconds, "peak_gb": peak})
    # The default (one prompt pass per group), every row in full, compiled (every row in full),
    # and with gradient checkpointing.
    updates = [("update (eager)", {}), ("update (eager, per-row prompt)", {"grpo.share_prompt_pass": False})]
    if not quick:  # compile's first call builds kernels with g++ on CPU
        updates += [("update (compiled)", {"optim.compile": True}), ("update (grad_checkpoint)", {"optim.grad_checkpoint": True})]
    rows = []
    for phase, extra in updates:
        cfg_u = load_config(None, {**overrides, **extra})
        if cfg_u.optim.grad_checkpoint:
            checkpoint_blocks(model)
        batch = to_train_batch(rollout, pad_to=COMPILE_BUCKET if cfg_u.optim.compile else 1)
        first, seconds, peak = time_updates(model, cfg_u, batch, advantages, repeats)
        tps = batch.num_tokens / seconds  # real tokens: padding for compile counts against it
        # MFU counts the positions the model actually ran: a shared prompt runs once per group.
        computed = computed_tokens(rollout, group_size if cfg_u.grpo.share_prompt_pass and not cfg_u.optim.compile else 1)
        rows.append({**common, "phase": phase, "tokens": batch.num_tokens, "computed_tokens": computed,
                     "first_call_s": first, "seconds": seconds, "tokens_per_s": tps,
                     "mfu_pct": 100 * 6 * path_params * computed / seconds / (peak_gflops * 1e9), "peak_gb": peak})
    rows += logprob_rows
    for row in rows:
        row["matmul_peak_gflops"] = peak_gflops
        row["gradient_path_params_m"] = path_params / 1e6
        row["x_default"] = row["tokens_per_s"] / rows[0]["tokens_per_s"]  # < 1: slower than the default
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 prompt, 8 completion tokens, fewer rows")
    parser.add_argument("--batch-size", type=int, default=None, help="prompts (2; 1 with --quick)")
    parser.add_argument("--group-size", type=int, default=4)
    parser.add_argument("--completion", type=int, default=None, help="completion tokens per row (64; 8 with --quick)")
    parser.add_argument("--model", default=DEFAULT_MODEL)
    args = parser.parse_args(argv)
    completion = args.completion or (8 if args.quick else 64)
    args.batch_size = args.batch_size or (1 if args.quick else 2)
    rows = run(args.quick, args.batch_size, args.group_size, completion, args.model)
    print_table("Backprop: GRPO update on a fixed batch (LoRA), and the log-prob pass", rows,
                ["phase", "B", "G", "prompt_len", "completion", "tokens", "first_call_s", "seconds", "tokens_per_s",
                 "computed_tokens", "mfu_pct", "x_default", "peak_gb"])
    print(f"matmul peak {rows[0]['matmul_peak_gflops']:.1f} GFLOP/s; gradient path "
          f"{rows[0]['gradient_path_params_m']:.1f}M parameters; {rows[0]['backend']}, BLAS {rows[0]['blas']}")
    write_results("backprop", rows, vars(args) | {"completion": completion})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
