"""`uv run rubric`: check a rubric file, and score sample completions with it before a training run.

    rubric check rubrics/code_quality.yaml [--ping]
    rubric score rubrics/math.yaml --prompt "What is 2+3?" --answer 5 --completion "<answer>5</answer>" ...
    rubric score rubrics/code_quality.yaml --jsonl logs/runs/<run>/completions.jsonl [--offline]
    rubric audit rubrics/largest_teacher.yaml --data logs/runs/<run>/completions.jsonl [--json audit.json]

Scoring prints one row per completion and each criterion's mean / std / min / max, so the effect
of a weight or a judge text can be seen on real completions in seconds. Auditing probes the live
teacher for injection, position and length bias, self-consistency, agreement with the rubric's
hand-scored `examples:` and group-vs-single agreement (mlx_grpo/rewards/audit.py), prints a
pass / warn / fail table, and exits 1 when any probe fails.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections import defaultdict

import numpy as np

import mlx_grpo  # noqa: F401  (loads the optimised BLAS before anything imports mlx.core)
from mlx_grpo.cli import OneLineParser, with_one_line_errors
from mlx_grpo.errors import UserInputError


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="rubric", description="Validate a rubric, or score completions with it.")
    parser.add_argument("--debug", action="store_true", help="Show Python tracebacks for errors.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)

    check = commands.add_parser("check", help="Validate a rubric file and summarise it.")
    check.add_argument("rubric", help="Rubric YAML.")
    check.add_argument("--ping", action="store_true", help="Also send the teacher one tiny request.")

    score = commands.add_parser("score", help="Score completions and print the per-criterion table.")
    score.add_argument("rubric", help="Rubric YAML.")
    score.add_argument("--prompt", help="The task given to the model.")
    score.add_argument("--completion", action="append", default=[],
                       help="A completion to score; repeat for a group (the teacher sees them side by side).")
    score.add_argument("--answer", help="Reference answer, for checks such as number_check.")
    score.add_argument("--tests", action="append", default=[], help="A unit test (assert ...) for python_tests; repeatable.")
    score.add_argument("--entry-point", help="Function name the tests call, for python_tests.")
    score.add_argument("--jsonl", help="Rows with prompt and completion (and answer / tests), e.g. a run's "
                                       "completions.jsonl; rows with the same prompt form one group.")
    score.add_argument("--limit", type=int, default=0, help="Score at most this many rows of --jsonl (0 = all).")
    score.add_argument("--offline", action="store_true", help="Programmatic checks only; no teacher requests.")
    score.add_argument("--cache", help="Teacher score cache (sqlite) to read and fill, e.g. a run's teacher_cache.sqlite.")
    score.add_argument("--why", action="store_true", help="Print the teacher's justification for each score.")
    score.add_argument("--json", action="store_true", help="Print one JSON object per completion instead of the table.")

    audit = commands.add_parser("audit", help="Probe the teacher for biases; exit 1 when a probe fails.")
    audit.add_argument("rubric", help="Rubric YAML with a teacher and judge criteria.")
    audit.add_argument("--data", help="Rows with prompt and completion (and answer), e.g. a run's completions.jsonl; "
                                      "rows with the same prompt form one group. Default: the rubric's examples.")
    audit.add_argument("--probes", type=int, default=4, metavar="N",
                       help="Groups of completions each probe uses (default 4); more is surer and costs more requests.")
    audit.add_argument("--repeats", type=int, default=3, help="Requests per group for the consistency probe (default 3).")
    audit.add_argument("--json", metavar="OUT", help="Also write the results to this JSON file.")
    return parser


def read_samples(args) -> tuple[list[dict], list[str]]:
    """(sample, completion) pairs from the flags or from --jsonl."""
    if args.jsonl:
        if args.prompt or args.completion:
            raise UserInputError("command line: give either --jsonl or --prompt/--completion, not both")
        if args.limit < 0:
            raise UserInputError(f"command line: --limit must be >= 0, got {args.limit}")
        return jsonl_samples(args.jsonl, args.limit)
    if not args.prompt or not args.completion:
        raise UserInputError("command line: give --prompt and at least one --completion, or --jsonl FILE")
    sample = {"prompt": args.prompt}
    if args.answer is not None:
        sample["answer"] = args.answer
    if args.tests:
        sample["tests"] = list(args.tests)
    if args.entry_point:
        sample["entry_point"] = args.entry_point
    return [sample] * len(args.completion), list(args.completion)


def jsonl_samples(path: str, limit: int = 0) -> tuple[list[dict], list[str]]:
    """(sample, completion) pairs from rows with prompt and completion (the first `limit`; 0 = all)."""
    from mlx_grpo.data import load_jsonl

    rows, _ = load_jsonl(path)
    for i, row in enumerate(rows, start=1):
        if not isinstance(row.get("completion"), str):
            raise UserInputError(f"{path}: row {i} has no string 'completion' field")
    rows = rows[:limit] if limit else rows
    return [{k: v for k, v in row.items() if k != "completion"} for row in rows], [row["completion"] for row in rows]


def prompt_groups(samples: list[dict]) -> list[list[int]]:
    """Row indices per distinct (prompt, answer), in first-seen order: one teacher request each."""
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i, sample in enumerate(samples):
        groups[(sample["prompt"], sample.get("answer"))].append(i)
    return list(groups.values())


def checks_only(rubric):
    """The rubric without its judge criteria (for --offline); weights renormalise over the checks."""
    kept = [c for c in rubric.criteria if c.check is not None]
    if not kept:
        raise UserInputError(f"{rubric.path}: --offline leaves nothing to score (every criterion is a judge)")
    return dataclasses.replace(rubric, criteria=kept, teacher_config=None)


def print_table(console, rubric, samples, completions, result, why: bool) -> None:
    from rich.table import Table

    names = [c.name for c in rubric.criteria]
    table = Table(title=f"{rubric.name} (version {rubric.version})", show_lines=False)
    table.add_column("#", justify="right")
    table.add_column("completion", max_width=48, overflow="ellipsis", no_wrap=True)
    table.add_column("reward", justify="right")
    for c in rubric.criteria:
        table.add_column(f"{c.name}\n×{c.weight / rubric.total_weight:.2f}", justify="right")
    for i, text in enumerate(completions):
        reward = "masked" if not result.valid[i] else f"{result.rewards[i]:.3f}"
        cells = [_cell(result.criterion_scores[n][i]) for n in names]
        table.add_row(str(i + 1), " ".join(text.split()) or "(empty)", reward, *cells)
    table.add_section()
    valid = result.valid
    for label, fn in (("mean", np.mean), ("std", np.std), ("min", np.min), ("max", np.max)):
        reward = _cell(fn(result.rewards[valid])) if valid.any() else "-"
        cells = []
        for n in names:
            column = result.criterion_scores[n][valid]
            column = column[~np.isnan(column)]
            cells.append(_cell(fn(column)) if column.size else "-")
        table.add_row("", label, reward, *cells)
    console.print(table)
    if why:
        for name, reasons in result.justifications.items():
            for i, reason in enumerate(reasons):
                if reason:
                    console.print(f"{i + 1} {name}: {reason}", soft_wrap=True, markup=False)


def print_json(rubric, completions, result) -> None:
    for i, text in enumerate(completions):
        scores = {c.name: _number(result.criterion_scores[c.name][i]) for c in rubric.criteria}
        reasons = {name: why[i] for name, why in result.justifications.items() if why[i]}
        print(json.dumps({"completion": text, "valid": bool(result.valid[i]), "reward": _number(result.rewards[i]),
                          "scores": scores, **({"justifications": reasons} if reasons else {})}))


def _number(value) -> float | None:
    return None if value != value else round(float(value), 6)


def _finite(value):
    """JSON-safe: NaN (a skipped probe's number) becomes null."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return None if isinstance(value, float) and value != value else value


def _cell(value) -> str:
    return "-" if value != value else f"{value:.3f}"


def run_check(args, console) -> int:
    from mlx_grpo.rewards import Scorer, describe_rubric, load_rubric

    rubric = load_rubric(args.rubric)
    console.print(describe_rubric(rubric), markup=False, soft_wrap=True)
    if args.ping:
        if rubric.teacher_config is None:
            console.print("no teacher block: nothing to ping")
        else:
            scorer = Scorer(rubric, warn=lambda text: console.print(f"teacher: {text}", markup=False))
            try:
                scorer.preflight()
            finally:
                scorer.close()
            how = f"; {scorer.teacher.describe_scoring()}" if scorer.teacher is not None else ""
            console.print(f"teacher {rubric.teacher_config.model} at {rubric.teacher_config.shown_url}: ok{how}",
                          markup=False, soft_wrap=True)
    console.print(f"{args.rubric}: ok")
    return 0


def run_score(args, console) -> int:
    from mlx_grpo.rewards import Scorer, load_rubric

    samples, completions = read_samples(args)
    rubric = load_rubric(args.rubric, sample=samples[0] if samples else None)
    if args.offline:
        rubric = checks_only(rubric)
    scorer = Scorer(rubric, cache_path=args.cache, warn=lambda text: console.print(f"teacher: {text}", markup=False))
    try:
        scorer.preflight()
        with console.status(f"Scoring {len(completions)} completions..."):
            result = scorer.score(samples, completions, prompt_groups(samples))
        usage = scorer.usage
    finally:
        scorer.close()
    if args.json:
        print_json(rubric, completions, result)
        return 0
    print_table(console, rubric, samples, completions, result, args.why)
    if scorer.teacher is not None:
        last = f"; last error: {scorer.teacher.last_error}" if usage.failed else ""
        console.print(f"teacher: {usage.requests} requests, {usage.tokens:,} tokens, {usage.cache_hits} cache hits, "
                      f"{usage.failed} masked{last}", markup=False, soft_wrap=True)
    return 0


def audit_groups(rubric, data: str | None, limit: int):
    """(groups for the probes, groups of the rubric's hand-scored examples)."""
    from mlx_grpo.rewards.audit import Group

    judges = {c.name: c for c in rubric.criteria if c.judge is not None}

    def grouped(samples, completions, expected=None):
        groups = []
        for rows in prompt_groups(samples):
            sample = samples[rows[0]]
            answer = sample.get("answer")
            groups.append(Group(sample["prompt"], None if answer is None else str(answer),
                                [completions[i] for i in rows], [expected[i] for i in rows] if expected else []))
        return groups

    def unit(name, value):
        low, high = judges[name].scale
        return (value - low) / (high - low)

    examples = grouped([{k: e[k] for k in ("prompt", "answer") if k in e} for e in rubric.examples],
                       [e["completion"] for e in rubric.examples],
                       [{n: unit(n, v) for n, v in e["scores"].items()} for e in rubric.examples])
    if data:
        probed = grouped(*jsonl_samples(data))
    elif examples:
        probed = examples
    else:
        raise UserInputError(f"{rubric.path}: nothing to audit with: give --data FILE (rows with prompt and "
                             "completion, e.g. a run's completions.jsonl) or add examples: to the rubric")
    if not probed:
        raise UserInputError(f"{data}: no rows to audit with")
    return probed[:limit], examples


VERDICT_STYLE = {"pass": "green", "warn": "yellow", "fail": "bold red", "skip": "dim"}


def run_audit(args, console) -> int:
    from rich.table import Table

    from mlx_grpo.rewards import load_rubric
    from mlx_grpo.rewards.audit import PROBES, Auditor, run_probes
    from mlx_grpo.rewards.teacher import Teacher

    if args.probes < 1:
        raise UserInputError(f"command line: --probes must be at least 1, got {args.probes}")
    if args.repeats < 2:
        raise UserInputError(f"command line: --repeats must be at least 2, got {args.repeats}")
    rubric = load_rubric(args.rubric)
    if rubric.teacher_config is None or not any(c.judge is not None for c in rubric.criteria):
        raise UserInputError(f"{rubric.path}: no judge criteria, so no teacher to audit")
    groups, examples = audit_groups(rubric, args.data, args.probes)
    cfg = rubric.teacher_config
    teacher = Teacher(cfg, rubric.criteria, rubric.version, warn=lambda text: console.print(f"teacher: {text}",
                                                                                             markup=False))
    auditor = Auditor(teacher, repeats=args.repeats)

    async def check_teacher():  # in the probes' event loop, where the teacher's client lives
        await teacher.preflight()
        console.print(f"auditing teacher {cfg.model} at {cfg.shown_url} (mode {cfg.mode}, "
                      f"{teacher.describe_scoring()}) on {len(groups)} groups, "
                      f"{sum(len(g.completions) for g in groups)} completions", markup=False, soft_wrap=True)

    status = console.status(f"checking the teacher {cfg.model} at {cfg.shown_url}...")
    status.start()
    try:
        # The labels probe scores the hand-scored examples, whatever --data holds.
        plan = [(probe, examples if probe == "labels" else groups) for probe in PROBES]
        results = run_probes(auditor, plan, progress=lambda probe: status.update(f"probe {probe}..."),
                             before=check_teacher)
    finally:
        status.stop()
    table = Table(title=f"teacher audit: {cfg.model} on {rubric.name}")
    for column in ("probe", "verdict", "measured", "what was measured"):
        table.add_column(column, overflow="fold")
    for r in results:
        table.add_row(r.probe, f"[{VERDICT_STYLE[r.verdict]}]{r.verdict}[/]", "-" if r.value != r.value else
                      f"{r.value:.3f}", r.detail)
    console.print(table)
    usage = teacher.usage
    console.print(f"teacher: {usage.requests} requests, {usage.tokens:,} tokens for the audit", markup=False)
    failed = [r.probe for r in results if r.verdict == "fail"]
    if args.json:
        report = {"rubric": rubric.path, "rubric_version": rubric.version, "teacher": cfg.model,
                  "base_url": cfg.shown_url, "mode": cfg.mode, "scoring": teacher.scoring, "groups": len(groups),
                  "results": [dataclasses.asdict(r) for r in results],
                  "usage": {"requests": usage.requests, "tokens": usage.tokens, "cost_usd": usage.cost_usd}}
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(_finite(report), f, indent=1)
    if failed:
        console.print(f"audit failed: {', '.join(failed)}; see 'Can I trust my teacher?' in the README",
                      markup=False)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    from rich.console import Console

    argv = sys.argv[1:] if argv is None else argv
    console = Console()

    def run() -> int:
        args = build_parser().parse_args(argv)
        commands = {"check": run_check, "score": run_score, "audit": run_audit}
        return commands[args.command](args, console)

    return with_one_line_errors(run, debug="--debug" in argv)


if __name__ == "__main__":
    sys.exit(main())
