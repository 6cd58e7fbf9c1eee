"""Memory: peak MLX memory per phase (rollout, log-probs, update) over a 30-step run, to show that
nothing grows step over step.

    uv run python scripts/bench_memory.py [--quick] [--steps 30]

The trainer resets MLX's peak counter at each phase boundary and logs memory/peak_<phase>_gb
every step; this script reads them back from metrics.jsonl, with the process RSS.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import tempfile
from pathlib import Path

from bench_common import machine, print_table, write_results
from bench_e2e import write_bench_rubric

from mlx_grpo.cli import train_main

PHASES = ("memory/peak_rollout_gb", "memory/peak_logprobs_gb", "memory/peak_update_gb", "System/Process_Memory_GB")


def run(steps: int, batch_size: int, group_size: int, max_new_tokens: int) -> tuple[list[dict], list[dict]]:
    info = machine()
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp:
        # Near-miss credit on the answer, so (almost) every step has reward spread and runs an update.
        rubric = write_bench_rubric({"rubric": "rubrics/math.yaml", "answer_closeness": 0.2}, Path(tmp))
        with contextlib.redirect_stdout(io.StringIO()):  # the trainer's console output
            code = train_main(["--train.steps", str(steps), "--run-name", "mem", "--train.output_dir", tmp,
                               "--rubric", str(rubric),
                               "--rollout.batch_size", str(batch_size), "--rollout.group_size", str(group_size),
                               "--rollout.max_new_tokens", str(max_new_tokens), "--train.save_every", "0",
                               "--logging.sample_every", "0", "--no-wandb"])
        if code != 0:
            raise SystemExit(f"training failed (exit {code})")
        lines = [json.loads(x) for x in (Path(tmp) / "runs" / "mem" / "metrics.jsonl").read_text().splitlines()]
    per_step = [{"step": m["step"], "updated": not m["actor/update_skipped"], **{k: m[k] for k in PHASES}}
                for m in lines]
    window = max(1, min(5, steps // 3))
    rows = []
    for key in PHASES:
        # A skipped update allocates nothing: compare the update's peak over steps that ran one.
        values = [m[key] for m in per_step if m["updated"] or key != "memory/peak_update_gb"] or [0.0]
        first, last = values[1:1 + window] or values, values[-window:]  # step 1: one-time allocations
        first_mean, last_mean = sum(first) / len(first), sum(last) / len(last)
        rows.append({"metric": key, "model": "smollm2-135m-instruct", "B": batch_size, "G": group_size,
                     "max_new_tokens": max_new_tokens, "steps": steps, "backend": info["backend"],
                     "blas": info["blas"], "first_gb": first_mean, "last_gb": last_mean, "max_gb": max(values[1:] or values),
                     "growth_pct": 100 * (last_mean - first_mean) / first_mean if first_mean else 0.0})
    return rows, per_step


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="4 steps of 8 tokens")
    parser.add_argument("--steps", type=int, default=None, help="steps to run (30; 4 with --quick)")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--group-size", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=None, help="16; 8 with --quick")
    args = parser.parse_args(argv)
    steps = args.steps or (4 if args.quick else 30)
    args.max_new_tokens = args.max_new_tokens or (8 if args.quick else 16)
    rows, per_step = run(steps, args.batch_size, args.group_size, args.max_new_tokens)
    print_table(f"Memory over {steps} steps: mean of the first steps after step 1 vs the last steps (GB)", rows,
                ["metric", "B", "G", "max_new_tokens", "steps", "first_gb", "last_gb", "max_gb", "growth_pct"])
    write_results("memory", rows, vars(args) | {"steps": steps, "per_step": per_step})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
