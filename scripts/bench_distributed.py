"""Data parallelism: the same global batch trained by one process and by two ranks on this machine.

    uv run python scripts/bench_distributed.py [--steps 6] [--prompts 2]

One process runs `train` with rollout.batch_size = P; two processes started by mlx.launch (ring
backend on 127.0.0.1) run it with P / 2 each. Both train SmolLM2-135M on the same prompts with
the same seed. Reported: wall time of the whole command (model loads included) and the mean
step time after the first step, from each run's metrics.jsonl. On one machine the two ranks
share its cores, so this measures the cost of the extra process and of the gradient exchange
rather than a speed-up; on two Macs each rank has a machine of its own.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_common import ROOT, print_table, write_results

LAUNCH = Path(sys.executable).parent / "mlx.launch"


def run(label: str, ranks: int, prompts: int, steps: int, out: Path, port: int) -> dict:
    train = [sys.executable, "-m", "mlx_grpo.cli", "--no-wandb", "--train.output_dir", str(out), "--run-name", label,
             "--train.steps", str(steps), "--rollout.batch_size", str(prompts // ranks), "--rollout.group_size", "4",
             "--rollout.max_new_tokens", "32", "--train.save_every", "0", "--logging.sample_every", "0"]
    cmd = train if ranks == 1 else [str(LAUNCH), "--backend", "ring", "--hosts", "127.0.0.1", "-n", str(ranks),
                                    "--starting-port", str(port), "--", *train]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLX_")}
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{label} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    metrics = [json.loads(line) for line in (out / "runs" / label / "metrics.jsonl").read_text().splitlines()]
    later = [m["timing_s/step"] for m in metrics[1:]] or [metrics[0]["timing_s/step"]]
    return {"run": label, "processes": ranks, "prompts_per_process": prompts // ranks, "wall_s": wall,
            "step_s": sum(later) / len(later), "gen_tok_s": metrics[-1].get("Performance/Generation_AvgTokensPerSec"),
            "reward_last": metrics[-1]["Train/AvgReward"]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--prompts", type=int, default=2, help="Prompts per step over all processes (even).")
    parser.add_argument("--port", type=int, default=32323, help="First ring port (two are used).")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        rows = [run("one-process", 1, args.prompts, args.steps, Path(tmp), args.port),
                run("two-processes", 2, args.prompts, args.steps, Path(tmp), args.port)]
    rows[1]["speedup"] = rows[0]["step_s"] / rows[1]["step_s"]
    print_table(f"Data parallel, {args.prompts} prompts x G=4 x 32 tokens per step, {args.steps} steps",
                rows, ["run", "processes", "prompts_per_process", "wall_s", "step_s", "gen_tok_s", "speedup"])
    write_results("distributed", rows, vars(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
