"""What the base model and the cheapest hacks score on each built-in task and difficulty level.

Measure this before tuning anything: GRPO moves greedy accuracy towards pass@k, so a task worth
training on has a real pass@8 and a low greedy accuracy, and a trained model has learned only if
it beats the hacks (the best constant answer, and always copying one position of the question).

    uv run python scripts/task_baselines.py                         # every task and level, 200 prompts
    uv run python scripts/task_baselines.py --tasks largest --num-prompts 50
    uv run python scripts/task_baselines.py --tasks largest --levels "3 numbers"

Prints a markdown table (the one in docs/results.md) and writes logs/baselines/<time>.json.
"Correct" is the rubric's `correct:` criterion at full score.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import mlx_grpo  # noqa: F401  (loads the optimised BLAS before mlx.core)

ROOT = Path(__file__).resolve().parent.parent

# (task, level label, dataset options, rubric, max_new_tokens): the levels each built-in task has.
LEVELS = [
    ("largest", "3 numbers", {"list_size": 3}, "rubrics/largest.yaml", 8),
    ("largest", "4 numbers", {"list_size": 4}, "rubrics/largest.yaml", 8),
    ("largest", "5 numbers", {"list_size": 5}, "rubrics/largest.yaml", 8),
    ("arithmetic", "1 operation", {"max_ops": 1}, "rubrics/math.yaml", 64),
    ("arithmetic", "2 operations", {"max_ops": 2, "exact": 2}, "rubrics/math.yaml", 64),
    ("arithmetic", "3 operations", {"max_ops": 3, "exact": 3}, "rubrics/math.yaml", 64),
]


def level_items(task: str, options: dict, n: int, seed: int) -> list[dict]:
    """n held-out items of one level; `exact` keeps only items of exactly that difficulty."""
    from mlx_grpo.data import load_dataset

    options = dict(options)
    exact = options.pop("exact", None)
    if exact is None:
        return load_dataset(task, split="test", seed=seed, size=n, **options)
    pool = load_dataset(task, split="test", seed=seed, size=n * 4 * exact, **options)
    items = [item for item in pool if item["difficulty"] == exact][:n]
    if len(items) < n:
        raise SystemExit(f"task_baselines: only {len(items)} held-out {task} items of difficulty {exact}")
    return items


def measure(model, tokenizer, task, label, options, rubric_path, max_new_tokens, args) -> dict:
    from mlx_grpo.evaluate import best_hack_acc, evaluate, hack_baselines
    from mlx_grpo.rewards import Scorer, load_rubric
    from mlx_grpo.rewards.correct import CorrectRule

    items = level_items(task, options, args.num_prompts, args.seed)
    rubric = load_rubric(ROOT / rubric_path)
    scorer = Scorer(rubric)
    common = dict(max_new_tokens=max_new_tokens, seed=args.seed, correct=CorrectRule(rubric.correct),
                  chunk_rows=args.chunk_rows)
    try:
        def progress(what):
            return lambda done, total: print(f"\r  {task} {label} {what}: {done}/{total} prompts", end="",
                                              file=sys.stderr, flush=True)
        greedy = evaluate(model, tokenizer, items, scorer, samples=1, temperature=0.0, progress=progress("greedy"),
                          **common)
        sampled = evaluate(model, tokenizer, items, scorer, samples=args.samples, temperature=args.temperature,
                           progress=progress(f"{args.samples} samples"), **common)
        print(file=sys.stderr)
    finally:
        scorer.close()
    hacks = hack_baselines(items)
    return {
        "task": task, "level": label, "num_prompts": len(items), "max_new_tokens": max_new_tokens,
        "rubric": rubric_path, "correct_criterion": rubric.correct or "reward",
        "greedy_acc": greedy.metrics["pass_at_1"], "sampled_acc": sampled.metrics["pass_at_1"],
        f"pass_at_{args.samples}": sampled.metrics[f"pass_at_{args.samples}"],
        "greedy_distinct_answers": greedy.metrics["distinct_answers"],
        "greedy_top_answer_share": greedy.metrics["top_answer_share"],
        "greedy_mean_length": greedy.metrics["mean_length"], "greedy_truncated_frac": greedy.metrics["truncated_frac"],
        **hacks, "best_hack_acc": best_hack_acc(hacks),
        "seconds": round(greedy.seconds + sampled.seconds, 1),
    }


def markdown(rows: list[dict], samples: int, temperature: float) -> str:
    pct = lambda v: f"{100 * v:.1f}%"  # noqa: E731
    lines = [f"| task | level | greedy | sampled (T {temperature}) | pass@{samples} | best constant | "
             "best position copy | distinct greedy answers | greedy length | seconds |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        constant = f"{pct(r['best_constant_acc'])} ({r['best_constant']})" if "best_constant" in r else "n/a"
        copy = f"{pct(r['best_copy_acc'])} ({r['best_copy']})" if "best_copy" in r else "n/a"
        lines.append(f"| {r['task']} | {r['level']} | {pct(r['greedy_acc'])} | {pct(r['sampled_acc'])} | "
                     f"{pct(r[f'pass_at_{samples}'])} | {constant} | {copy} | {r['greedy_distinct_answers']:.0f} | "
                     f"{r['greedy_mean_length']:.1f} | {r['seconds']:.0f} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", nargs="+", default=sorted({t for t, *_ in LEVELS}), help="Tasks to measure.")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--num-prompts", type=int, default=200, help="Held-out prompts per level.")
    parser.add_argument("--samples", type=int, default=8, help="Samples per prompt for sampled accuracy and pass@k.")
    parser.add_argument("--levels", nargs="+", help="Only these levels, by label (e.g. '3 numbers').")
    parser.add_argument("--temperature", type=float, default=1.0, help="The training temperature (the demo's: 1.0).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--chunk-rows", type=int, default=64, help="Completions generated together.")
    parser.add_argument("--out", type=Path, help="JSON output (default logs/baselines/<time>.json).")
    args = parser.parse_args()
    unknown = set(args.tasks) - {t for t, *_ in LEVELS}
    if unknown:
        parser.error(f"unknown task {sorted(unknown)[0]!r}; choose from {', '.join(sorted({t for t, *_ in LEVELS}))}")
    labels = {label for _, label, *_ in LEVELS}
    if args.levels and not set(args.levels) <= labels:
        parser.error(f"unknown level {sorted(set(args.levels) - labels)[0]!r}; choose from {', '.join(sorted(labels))}")
    if args.num_prompts < 1 or args.samples < 1:
        parser.error("--num-prompts and --samples must be at least 1")

    from mlx_grpo.models import load_model

    model, tokenizer, _ = load_model(args.model, "float32")
    rows = []
    for task, label, options, rubric_path, max_new_tokens in LEVELS:
        if task in args.tasks and (not args.levels or label in args.levels):
            rows.append(measure(model, tokenizer, task, label, options, rubric_path, max_new_tokens, args))
            print(markdown(rows[-1:], args.samples, args.temperature).splitlines()[-1], flush=True)
    table = markdown(rows, args.samples, args.temperature)
    print("\n" + table)
    out = args.out or ROOT / "logs" / "baselines" / f"{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": args.model, "samples": args.samples, "temperature": args.temperature,
                               "seed": args.seed, "rows": rows}, indent=1) + "\n")
    print(f"Wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
