"""Rollout: tokens/s of generate_rollout against mlx-lm's batch_generate and single-stream decoding.

    uv run python scripts/bench_rollout.py [--quick] [--max-new-tokens 64] [--sizes 1,8,32]

Every method decodes exactly max_new_tokens per row (no EOS stop), from the same prompts with the
same sampler, so tokens/s compare like for like. Times include prefill; prefill_s is reported apart.
B*G rows are B prompts x G samples each (G = --group-size, or B*G itself when smaller).
Single-stream decoding runs the rows one after another; its rate does not depend on how many
rows there are, so only the first --single-rows of them are timed. --unshared adds
generate_rollout with share_prefill=False (each row prefills its own copy of the prompt).
"""

from __future__ import annotations

import argparse
import time

from bench_common import (DEFAULT_MODEL, bench_prompts, load_bench_model, machine, peak_gb,  # noqa: I001
                          print_table, write_results)

import mlx.core as mx
from mlx_lm.generate import batch_generate, generate_step
from mlx_lm.sample_utils import make_sampler

from mlx_grpo.rollout import generate_rollout

COLUMNS = ["method", "B", "G", "prompt_len", "max_new_tokens", "tok_s", "prefill_s", "wall_s", "peak_gb",
           "x_batch_generate", "x_single_stream"]


class _NoStop:
    """The tokenizer batch_generate sees: no EOS ids, so every row runs to max_tokens."""

    eos_token_ids: list[int] = []

    def __init__(self, tokenizer):
        self.decode = tokenizer.decode


def _sampler(temperature: float, top_p: float):
    return make_sampler(temp=temperature, top_p=top_p if top_p < 1.0 else 0.0)


def run_ours(model, prompts, group_size, max_new, temperature, top_p, share_prefill=True) -> dict:
    start = time.perf_counter()
    r = generate_rollout(model, prompts, group_size=group_size, max_new_tokens=max_new, eos_token_ids=[],
                         temperature=temperature, top_p=top_p, share_prefill=share_prefill)
    wall = time.perf_counter() - start
    return {"tokens": r.num_generated_tokens, "wall_s": wall, "prefill_s": r.prefill_time_s}


def run_batch_generate(model, tokenizer, rows, max_new, temperature, top_p) -> dict:
    start = time.perf_counter()
    # All rows prefill and decode as one batch, as generate_rollout does: the baseline at its best.
    out = batch_generate(model, _NoStop(tokenizer), rows, max_tokens=max_new, sampler=_sampler(temperature, top_p),
                         return_token_ids=True, completion_batch_size=len(rows), prefill_batch_size=len(rows))
    wall = time.perf_counter() - start
    return {"tokens": sum(len(t) for t in out.token_ids), "wall_s": wall, "prefill_s": out.stats.prompt_time}


def run_single_stream(model, rows, max_new, temperature, top_p) -> dict:
    sampler, tokens, prefill = _sampler(temperature, top_p), 0, 0.0
    start = time.perf_counter()
    for row in rows:
        row_start = time.perf_counter()
        # generate_step never stops at EOS, so each row gives exactly max_new tokens.
        for n, (token, _) in enumerate(generate_step(mx.array(row), model, max_tokens=max_new, sampler=sampler)):
            if n == 0:
                prefill += time.perf_counter() - row_start
            tokens += 1
    return {"tokens": tokens, "wall_s": time.perf_counter() - start, "prefill_s": prefill}


def shape(size: int, group_size: int) -> tuple[int, int]:
    g = min(group_size, size)
    if size % g:
        raise SystemExit(f"--sizes: {size} rows is not a whole number of groups of {g}")
    return size // g, g


def run(quick: bool, max_new_tokens: int | None = None, sizes: tuple[int, ...] = (1, 8, 32), group_size: int = 8,
        temperature: float = 0.8, top_p: float = 1.0, single_rows: int = 1, unshared: bool = False,
        dtype: str = "float32", model_path: str = DEFAULT_MODEL) -> list[dict]:
    max_new = max_new_tokens or (8 if quick else 64)
    model, tokenizer, _ = load_bench_model(model_path, dtype)
    info = machine()
    all_prompts, _ = bench_prompts(tokenizer, max(shape(s, group_size)[0] for s in sizes))

    # Warm-up: first calls pay for allocation and BLAS thread start-up.
    run_ours(model, all_prompts[:1], 2, 4, temperature, top_p)
    run_batch_generate(model, tokenizer, all_prompts[:1] * 2, 4, temperature, top_p)
    run_single_stream(model, all_prompts[:1], 4, temperature, top_p)

    rows = []
    for size in sizes:
        b, g = shape(size, group_size)
        prompts = all_prompts[:b]
        repeated = [p for p in prompts for _ in range(g)]
        methods = {"generate_rollout": lambda: run_ours(model, prompts, g, max_new, temperature, top_p)}
        if unshared and g > 1:
            methods["generate_rollout share_prefill=False"] = (
                lambda: run_ours(model, prompts, g, max_new, temperature, top_p, share_prefill=False))
        methods["mlx_lm batch_generate"] = lambda: run_batch_generate(model, tokenizer, repeated, max_new,
                                                                      temperature, top_p)
        methods["mlx_lm single stream"] = lambda: run_single_stream(model, repeated[:single_rows], max_new,
                                                                    temperature, top_p)
        results = {}
        for name, fn in methods.items():
            mx.clear_cache()
            mx.reset_peak_memory()
            out = fn()
            results[name] = dict(out, tok_s=out["tokens"] / out["wall_s"], peak_gb=peak_gb())
        for name, out in results.items():
            rows.append({
                "method": name, "model": model_path, "B": b, "G": g,
                "prompt_len": round(sum(len(p) for p in prompts) / b), "max_new_tokens": max_new,
                "dtype": dtype, "backend": info["backend"], "blas": info["blas"],
                "tokens": out["tokens"], "tok_s": out["tok_s"], "prefill_s": out["prefill_s"],
                "wall_s": out["wall_s"], "peak_gb": out["peak_gb"],
                "x_batch_generate": out["tok_s"] / results["mlx_lm batch_generate"]["tok_s"],
                "x_single_stream": out["tok_s"] / results["mlx_lm single stream"]["tok_s"],
            })
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="8 new tokens per row instead of 64")
    parser.add_argument("--max-new-tokens", type=int, default=None)
    parser.add_argument("--sizes", default="1,8,32", help="comma-separated B*G row counts")
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--single-rows", type=int, default=1, help="rows timed for single-stream decoding")
    parser.add_argument("--unshared", action="store_true", help="also time generate_rollout(share_prefill=False)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--json-only", action="store_true", help="write the JSON file, print no table")
    args = parser.parse_args()

    sizes = tuple(int(s) for s in args.sizes.split(","))
    rows = run(args.quick, args.max_new_tokens, sizes, args.group_size, args.temperature, args.top_p,
               args.single_rows, args.unshared, args.dtype, args.model)
    settings = {"quick": args.quick, "max_new_tokens": rows[0]["max_new_tokens"], "sizes": list(sizes),
                "group_size": args.group_size, "temperature": args.temperature, "top_p": args.top_p,
                "single_stream_rows": args.single_rows, "unshared": args.unshared, "dtype": args.dtype, "model": args.model,
                "eos": "none: every row decodes max_new_tokens"}
    if not args.json_only:
        r = rows[0]
        print_table(f"Rollout tokens/s ({r['model']}, {r['dtype']}, {r['backend']}, blas {r['blas']})", rows, COLUMNS)
    write_results("rollout", rows, settings)


if __name__ == "__main__":
    main()
