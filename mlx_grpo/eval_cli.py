"""`uv run eval`: score a model (with a run's adapters, or the base model) on held-out prompts.

    uv run eval --run logs/runs/demo --compare base     # trained vs base, side by side
    uv run eval --samples 8 --temperature 0.8           # pass@1..8 of the base model
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import mlx_grpo  # noqa: F401 (loads the optimised BLAS before mlx.core)
from mlx_grpo.cli import DEFAULT_CONFIG, OneLineParser, start_scorer, trained_run, with_one_line_errors
from mlx_grpo.config import Config, load_config, load_run_config
from mlx_grpo.errors import UserInputError


def build_parser():
    parser = OneLineParser(prog="eval", description="Evaluate on the held-out split with a rubric: mean reward, "
                           "per-criterion means, pass@k, mean length, truncation rate. Defaults come from the "
                           "run's config (or --config) and its eval section.")
    parser.add_argument("--run", metavar="RUN_DIR|latest", help="A training run: its config and saved adapters.")
    parser.add_argument("--config", default=DEFAULT_CONFIG, help="Config YAML, when no --run is given.")
    parser.add_argument("--compare", choices=["base"], help="Also evaluate the base model on the same prompts and "
                        "seeds, and print both side by side.")
    parser.add_argument("--model", help="Model (default: the run's or the config's).")
    parser.add_argument("--rubric", help="Rubric YAML (default: the run's or the config's).")
    parser.add_argument("--data", help="Held-out prompts: a built-in task (its test split) or a JSONL file.")
    parser.add_argument("--num-prompts", type=int, help="Held-out prompts to evaluate (default: data.test_size).")
    parser.add_argument("--samples", type=int, help="Completions per prompt; pass@k for k up to this (default: eval.samples).")
    parser.add_argument("--temperature", type=float, help="Sampling temperature, 0 = greedy (default: eval.temperature).")
    parser.add_argument("--max-new-tokens", type=int, help="Completion length limit (default: rollout.max_new_tokens).")
    parser.add_argument("--seed", type=int, help="Seed of the prompts and of sampling (default: train.seed).")
    parser.add_argument("--correct-criterion", help="Criterion that decides a correct answer for pass@k "
                        "(default: reward.correct_criterion; empty = the total reward).")
    parser.add_argument("--correct-threshold", type=float, help="Correct when that score is >= this (default: "
                        "reward.correct_threshold).")
    parser.add_argument("--output", help="Where to write the JSON (default: RUN_DIR/eval.json, else logs/eval/<time>.json).")
    parser.add_argument("--debug", action="store_true", help="Show Python tracebacks for errors.")
    return parser


def eval_config(args, run_dir: Path | None) -> Config:
    """The run's (or --config's) settings with the command line's changes applied and validated."""
    from mlx_grpo.data import BUILTIN_TASKS

    overrides = {key: value for key, value in {
        "model.path": args.model, "rubric": args.rubric, "data.test_size": args.num_prompts,
        "eval.samples": args.samples, "eval.temperature": args.temperature,
        "rollout.max_new_tokens": args.max_new_tokens, "train.seed": args.seed,
        "reward.correct_criterion": args.correct_criterion, "reward.correct_threshold": args.correct_threshold,
    }.items() if value is not None}
    config_path = args.config if Path(args.config).exists() or args.config != DEFAULT_CONFIG else None

    def load(changes: dict) -> Config:
        return load_run_config(run_dir, changes) if run_dir is not None else load_config(config_path, changes)

    if args.data is not None and args.data not in BUILTIN_TASKS:
        overrides["eval.dataset"] = args.data
    elif args.data is not None and args.data != load({}).data.dataset:  # another task: not the run's task options
        overrides.update({"data.dataset": args.data, "task": {}})
    return load(overrides)


def run_eval(args, console) -> int:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from mlx_grpo.evaluate import evaluate_with_config, hack_baselines, held_out_items, load_run_adapters
    from mlx_grpo.rewards.correct import CorrectRule
    from mlx_grpo.adapters import adapters_disabled, has_lora
    from mlx_grpo.models import load_model, validate_model_path
    from mlx_grpo.rewards import load_rubric

    run_dir = None
    if args.run:
        run_dir = trained_run(args.run, Config().train.output_dir)
    if args.compare and run_dir is None:
        raise UserInputError("--compare base needs --run RUN_DIR: the trained adapters to compare with the base model")
    cfg = eval_config(args, run_dir)
    rubric = load_rubric(cfg.rubric)
    items = held_out_items(cfg)
    if not items:
        raise UserInputError("eval: no held-out prompts to evaluate (--num-prompts / data.test_size is 0)")
    validate_model_path(cfg.model.path)
    output = Path(args.output) if args.output else (
        run_dir / "eval.json" if run_dir else Path(cfg.train.output_dir) / "eval" / f"{time.strftime('%Y%m%d-%H%M%S')}.json")
    output.parent.mkdir(parents=True, exist_ok=True)
    scorer = start_scorer(cfg, rubric, output.parent, console, lambda text: console.print(text, markup=False))
    try:
        with console.status(f"Loading {cfg.model.path} ({cfg.model.dtype})..."):
            model, tokenizer, _ = load_model(cfg.model.path, cfg.model.dtype)
            if run_dir is not None:
                load_run_adapters(model, run_dir)
        e = cfg.eval
        settings = {"model": cfg.model.path, "adapters": str(run_dir) if run_dir else None, "rubric": cfg.rubric,
                    "dataset": e.dataset or cfg.data.dataset, "split": "test", "num_prompts": len(items),
                    "samples": e.samples, "temperature": e.temperature, "top_p": cfg.rollout.top_p,
                    "max_new_tokens": cfg.rollout.max_new_tokens, "seed": cfg.train.seed,
                    "correct_criterion": CorrectRule.from_config(cfg).criterion_of(rubric) or "reward",
                    "correct_threshold": cfg.reward.correct_threshold, "task_options": cfg.task}
        console.print(f"Evaluating {len(items)} held-out prompts x {e.samples} samples at temperature "
                      f"{e.temperature} (seed {cfg.train.seed})", soft_wrap=True)

        def run_one(label: str):
            with Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), TextColumn("prompts"),
                          TimeElapsedColumn(), console=console) as bar:
                task = bar.add_task(label, total=len(items))
                return evaluate_with_config(model, tokenizer, items, scorer, cfg,
                                            progress=lambda done, total: bar.update(task, completed=done))

        results = {}
        if run_dir is None:
            results["base"] = run_one("base")
        else:
            results["trained"] = run_one("trained")
            if args.compare:
                if has_lora(model):
                    with adapters_disabled(model):
                        results["base"] = run_one("base")
                else:  # full fine-tune: the base weights are a fresh load
                    model, tokenizer, _ = load_model(cfg.model.path, cfg.model.dtype)
                    results["base"] = run_one("base")
    finally:
        scorer.close()
    hacks = hack_baselines(items)
    console.print(results_table(results))
    for line in verdict_lines(results, hacks, settings["correct_criterion"]):
        console.print(line, soft_wrap=True, markup=False)
    output.write_text(json.dumps({"settings": settings, "seconds": {k: round(r.seconds, 1) for k, r in results.items()},
                                  "hack_baselines": hacks, **{k: r.metrics for k, r in results.items()}},
                                 indent=1) + "\n")
    with open(output.with_name(output.stem + "_completions.jsonl"), "w", encoding="utf-8") as f:
        for label, result in results.items():
            for row in result.rows:
                f.write(json.dumps({"model": label, "prompt_id": items[row["prompt_index"]].get("id", row["prompt_index"]),
                                    **row}) + "\n")
    console.print(f"Wrote {output}", soft_wrap=True)
    return 0


def results_table(results: dict):
    """metric | base | trained | change, for whichever of the two were evaluated."""
    from rich.table import Table

    labels = [k for k in ("base", "trained") if k in results]
    table = Table(title="Held-out evaluation")
    table.add_column("metric")
    for label in labels:
        table.add_column(label, justify="right")
    if len(labels) == 2:
        table.add_column("change", justify="right")
    for key in results[labels[0]].metrics:
        values = [results[label].metrics[key] for label in labels]
        count = key.startswith(("num_", "distinct_"))
        cells = [f"{v:.0f}" if count else f"{v:.3f}" for v in values]
        if len(values) == 2 and not count:
            cells.append(f"{values[1] - values[0]:+.3f}")
        elif len(values) == 2:
            cells.append("")
        table.add_row(key, *cells)
    return table


def verdict_lines(results: dict, hacks: dict, correct_criterion: str) -> list[str]:
    """Accuracy against the cheapest hacks, in words: a trained model that does not beat the best of
    them has learned a trick (a constant, a copied number), not the task."""
    from mlx_grpo.evaluate import best_hack_acc

    if not hacks:
        return ["Hack baselines: none (the held-out answers are not numbers)."]
    lines = [f"Hack baselines on these prompts: always answering {hacks['best_constant']} scores "
             f"{100 * hacks['best_constant_acc']:.1f}%"
             + (f"; always copying the question's {hacks['best_copy']} scores {100 * hacks['best_copy_acc']:.1f}%."
                if "best_copy" in hacks else ".")]
    best = best_hack_acc(hacks)
    for label in [k for k in ("base", "trained") if k in results]:
        acc = results[label].metrics["pass_at_1"]
        margin = 100 * (acc - best)
        if acc > best:
            lines.append(f"{label}: accuracy ({correct_criterion}) {100 * acc:.1f}%, {margin:.1f} points above the best hack.")
        else:
            lines.append(f"{label}: accuracy ({correct_criterion}) {100 * acc:.1f}% does NOT beat the best hack "
                         f"baseline ({100 * best:.1f}%)" + (": training has not taught the task." if label == "trained" else "."))
    if "base" in results and "trained" in results:
        base, trained = (results[k].metrics for k in ("base", "trained"))
        if trained["distinct_answers"] < 0.5 * base["distinct_answers"]:
            lines.append(f"trained: only {trained['distinct_answers']:.0f} distinct answers against the base model's "
                         f"{base['distinct_answers']:.0f} (the most frequent is {100 * trained['top_answer_share']:.0f}% "
                         "of them): it has collapsed onto a few answers.")
    return lines


def main(argv: list[str] | None = None) -> int:
    from rich.console import Console

    argv = sys.argv[1:] if argv is None else argv
    console = Console()
    return with_one_line_errors(lambda: run_eval(build_parser().parse_args(argv), console), debug="--debug" in argv)


if __name__ == "__main__":
    sys.exit(main())
