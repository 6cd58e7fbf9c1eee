"""Teacher overlap: GRPO step time with a teacher that answers at once and with one that takes 1 s
per request, without and with rollout.pipeline.

    uv run python scripts/bench_teacher.py [--quick] [--latency 1.0]

The teacher is the scripted OpenAI-compatible server of the test suite (a real HTTP server on
127.0.0.1) grading every completion; max_concurrency is high enough that requests never queue.
Without the pipeline, scoring overlaps only the log-prob passes (none with mu = 1 and beta = 0),
so a step waits for the teacher. With it, the next batch is sampled while this one is scored.
The four runs share one process (the model is loaded from the same directory each time).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import tempfile
from pathlib import Path

from bench_common import ROOT, machine, print_table, write_results

RUBRIC = """
name: bench_teacher
teacher:
  model: scripted-teacher
  base_url: ${OPENAI_BASE_URL}
  api_key_env: ""
  mode: group
  max_concurrency: 16
  timeout_s: 30
criteria:
  - {name: Format, weight: 1, check: format_approx}
  - {name: Helpful, weight: 1, judge: "Is the reasoning clear? 10 = very clear, 0 = none."}
"""


def one_run(latency: float, pipeline: bool, settings: dict, work: Path) -> dict:
    """Train in this process against a scripted teacher; returns the step times (runs in a child)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from teacher_server import ScriptedTeacher

    from mlx_grpo.cli import train_main

    teacher = ScriptedTeacher()
    teacher.grade = lambda text: float(len(text) % 11)  # scores that differ, so updates have signal
    if latency > 0:
        teacher.script.extend([("sleep", latency)] * 10_000)
    os.environ["OPENAI_BASE_URL"] = teacher.url
    rubric = work / "rubric.yaml"
    rubric.write_text(RUBRIC)
    name = f"lat{latency:g}-{'pipe' if pipeline else 'sync'}"
    code = train_main([
        "--train.steps", str(settings["steps"]), "--run-name", name, "--train.output_dir", str(work / "logs"),
        "--rubric", str(rubric), "--rollout.batch_size", str(settings["B"]), "--rollout.group_size", str(settings["G"]),
        "--rollout.max_new_tokens", str(settings["max_new_tokens"]), "--rollout.pipeline", str(pipeline).lower(),
        "--train.save_every", "0", "--optim.warmup_steps", "0", "--logging.sample_every", "0", "--no-wandb",
    ])
    teacher.close()
    if code != 0:
        raise SystemExit(f"training failed for {name} (exit {code})")
    lines = [json.loads(x) for x in (work / "logs" / "runs" / name / "metrics.jsonl").read_text().splitlines()]
    return {"step_s": [m["timing_s/step"] for m in lines], "reward_wait_s": [m["timing_s/reward_wait"] for m in lines],
            "requests": len(teacher.chat_requests)}


def median(values: list[float]) -> float:
    values = sorted(values)
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2


def run(quick: bool, latency: float) -> list[dict]:
    info = machine()
    settings = ({"B": 1, "G": 2, "max_new_tokens": 8, "steps": 2} if quick
                else {"B": 2, "G": 4, "max_new_tokens": 24, "steps": 3})
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-teacher-") as tmp:
        for pipeline in (False, True):
            for lat in (0.0, latency):
                work = Path(tmp) / f"{lat}-{pipeline}"
                work.mkdir()
                with contextlib.redirect_stdout(io.StringIO()):  # the trainer's console output
                    result = one_run(lat, pipeline, settings, work)
                # Step 1 pays for lazy initialisation, and with the pipeline it samples two batches.
                steady = result["step_s"][1:]
                rows.append({"model": "smollm2-135m-instruct", **{k: settings[k] for k in ("B", "G", "max_new_tokens")},
                             "dtype": "float32", "backend": info["backend"], "blas": info["blas"],
                             "pipeline": pipeline, "latency_s": lat, "steps_timed": len(steady),
                             "step_s": median(steady), "reward_wait_s": median(result["reward_wait_s"][1:]),
                             "teacher_requests": result["requests"]})
    for row in rows:
        base = next(r for r in rows if r["pipeline"] == row["pipeline"] and r["latency_s"] == 0)
        row["ratio_vs_0s"] = row["step_s"] / base["step_s"]
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="B=1, G=2, 8 tokens, 2 steps")
    parser.add_argument("--latency", type=float, default=1.0, help="teacher seconds per request")
    args = parser.parse_args(argv)
    rows = run(args.quick, args.latency)
    print_table(f"Teacher overlap: step time at 0 s and {args.latency:g} s per teacher request (target ratio <= 1.15)",
                rows, ["pipeline", "latency_s", "B", "G", "max_new_tokens", "steps_timed", "step_s", "reward_wait_s",
                       "teacher_requests", "ratio_vs_0s"])
    write_results("teacher", rows, vars(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
