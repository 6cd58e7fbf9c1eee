"""Held-out evaluation: sample completions for test prompts, score them with the rubric, summarise.

The math is in pure functions (`pass_at_k`, `eval_metrics`); `evaluate` drives generation and
scoring in chunks, each chunk seeded from (seed, chunk index), so two models evaluated with the
same seed see the same prompts and the same random stream.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import numpy as np

from mlx_grpo.curriculum import difficulty_levels, difficulty_metrics, level_indices
from mlx_grpo.errors import UserInputError
from mlx_grpo.rewards.checks import extract_answer, last_number, normalize, numbers_in
from mlx_grpo.rewards.correct import CorrectRule
from mlx_grpo.rollout_source import sample_and_score


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct: 1 - C(n-c, k) / C(n, k).

    The chance that at least one of k samples drawn without replacement from the n is correct.
    """
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:  # every draw of k must include a correct one
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def report_ks(samples: int) -> list[int]:
    """The k of pass@k to report: 1, powers of two below `samples`, and `samples` itself."""
    ks, k = [], 1
    while k < samples:
        ks.append(k)
        k *= 2
    return ks + [samples]


def eval_metrics(rewards: np.ndarray, valid: np.ndarray, criterion_scores: dict[str, np.ndarray],
                 correct: np.ndarray, lengths: np.ndarray, truncated: np.ndarray, samples: int) -> dict[str, float]:
    """Summary of an evaluation. Arrays are per completion, the `samples` completions of each prompt
    adjacent. Masked completions (valid False: the teacher gave no score) are left out of every
    score; pass@k averages over the prompts with at least k scored completions."""
    record: dict[str, float] = {"num_prompts": float(len(rewards) // samples), "num_completions": float(len(rewards)),
                                "masked_frac": float(1.0 - valid.mean()) if valid.size else 0.0}
    record["mean_reward"] = float(rewards[valid].mean()) if valid.any() else float("nan")
    for name, column in criterion_scores.items():
        scored = column[valid]
        scored = scored[~np.isnan(scored)]
        record[f"criteria/{name}"] = float(scored.mean()) if scored.size else float("nan")
    for k in report_ks(samples):
        per_prompt = []
        for start in range(0, len(correct), samples):
            ok = correct[start:start + samples][valid[start:start + samples]]
            if ok.size >= k:
                per_prompt.append(pass_at_k(int(ok.size), int(ok.sum()), k))
        record[f"pass_at_{k}"] = float(np.mean(per_prompt)) if per_prompt else float("nan")
    record["mean_length"] = float(lengths.mean()) if lengths.size else 0.0
    record["truncated_frac"] = float(truncated.mean()) if truncated.size else 0.0
    return record


def _number_text(value: float) -> str:
    return str(int(value)) if value.is_integer() else repr(value)


def final_answer(completion: str) -> str | None:
    """The answer a completion gives, as the answer checks read it: the last number inside the last
    <answer> tag (its normalised text when it holds no number), else the last number anywhere."""
    tagged = extract_answer(completion)
    text = tagged if tagged is not None else completion
    number = last_number(text)
    if number is not None and math.isfinite(number):
        return _number_text(number)
    return normalize(tagged) if tagged else None


def answer_spread(answers: list[str | None]) -> dict[str, float]:
    """How varied the given answers are: distinct answers, and the share of the most frequent one.
    A policy that collapsed onto a constant shows few distinct answers and a top share near 1."""
    given = [a for a in answers if a is not None]
    if not given:
        return {"distinct_answers": 0.0, "top_answer_share": 0.0}
    top = Counter(given).most_common(1)[0][1]
    return {"distinct_answers": float(len(set(given))), "top_answer_share": top / len(answers)}


def hack_baselines(items: list[dict]) -> dict:
    """The accuracy of the cheapest hacks on these items, which a trained model must beat to have
    learned anything: always giving the most common answer, and always copying the number at one
    fixed position of the question (counted from the start and from the end; the best one).

    Only items with a numeric answer count. Returns {} when there are none.
    """
    scored = [(last_number(str(s.get("answer", ""))), s) for s in items if s.get("answer") is not None]
    scored = [(a, s) for a, s in scored if a is not None and math.isfinite(a)]
    if not scored:
        return {}
    constant, hits = Counter(a for a, _ in scored).most_common(1)[0]
    result = {"best_constant": _number_text(constant), "best_constant_acc": hits / len(scored)}
    position_hits: Counter = Counter()
    for answer, sample in scored:
        numbers = _question_numbers(sample)
        for i, value in enumerate(numbers):
            position_hits[f"number {i + 1}"] += value == answer
            position_hits[f"number {i + 1} from the end"] += numbers[-1 - i] == answer
    if position_hits:
        position, hits = max(position_hits.items(), key=lambda kv: kv[1])
        result.update({"best_copy": position, "best_copy_acc": hits / len(scored)})
    return result


def _question_numbers(sample: dict) -> list[float]:
    """The numbers of the question itself (not of an instruction appended to it, when the item says)."""
    return numbers_in(str(sample.get("question") or sample.get("prompt", "")))


def best_hack_acc(baselines: dict) -> float:
    return max(baselines.get("best_constant_acc", 0.0), baselines.get("best_copy_acc", 0.0))


@dataclass
class EvalResult:
    metrics: dict[str, float]
    rows: list[dict] = field(default_factory=list)  # one per completion: prompt index, text, reward, scores
    seconds: float = 0.0


def evaluate(model, tokenizer, items: list[dict], scorer, *, samples: int, max_new_tokens: int,
             temperature: float, top_p: float = 1.0, seed: int = 0, system_prompt: str | None = None,
             correct: CorrectRule = CorrectRule(), chunk_rows: int = 64, progress=None) -> EvalResult:
    """Sample `samples` completions for each item, score them, and summarise (see eval_metrics).
    Completions are generated `chunk_rows` at a time (that bounds memory).

    progress(done_prompts, total_prompts) is called after each chunk.
    """
    correct.check(scorer.rubric)
    per_chunk = max(1, chunk_rows // samples)
    parts: dict[str, list] = {"rewards": [], "valid": [], "correct": [], "lengths": [], "truncated": []}
    columns: dict[str, list] = {c.name: [] for c in scorer.rubric.criteria}
    rows: list[dict] = []
    start_time = time.perf_counter()
    for chunk, start in enumerate(range(0, len(items), per_chunk)):
        # Seeded by (seed, chunk): every model evaluated with this seed gets the same draws.
        sampled = sample_and_score(model, tokenizer, scorer, items[start:start + per_chunk],
                                   seed=seed * 1_000_003 + chunk, group_size=samples, max_new_tokens=max_new_tokens,
                                   temperature=temperature, top_p=top_p, system_prompt=system_prompt)
        rollout, texts, scored = sampled.rollout, sampled.texts, sampled.scoring.result()
        is_correct = correct.mask(scored, scorer.rubric)
        parts["rewards"].append(scored.rewards)
        parts["valid"].append(scored.valid)
        parts["correct"].append(is_correct)
        parts["lengths"].append(np.array(rollout.completion_lengths))
        parts["truncated"].append(np.array(rollout.truncated, dtype=bool))
        for name in columns:
            columns[name].append(scored.criterion_scores.get(name, np.full(len(texts), np.nan, dtype=np.float32)))
        for i, text in enumerate(texts):
            rows.append({"prompt_index": start + i // samples, "completion": text,
                         "reward": float(scored.rewards[i]) if scored.valid[i] else None,
                         "answer": final_answer(text),
                         "correct": bool(is_correct[i]), "tokens": len(rollout.completion_tokens[i]),
                         "finish_reason": rollout.finish_reasons[i],
                         "scores": {n: None if np.isnan(c[i]) else round(float(c[i]), 4)
                                    for n, c in scored.criterion_scores.items()}})
        if progress is not None:
            progress(min(start + per_chunk, len(items)), len(items))
    joined = {key: np.concatenate(value) for key, value in parts.items()}
    metrics = eval_metrics(joined["rewards"], joined["valid"], {n: np.concatenate(c) for n, c in columns.items()},
                           joined["correct"], joined["lengths"], joined["truncated"], samples)
    metrics.update(answer_spread([row["answer"] for row in rows]))
    levels = difficulty_levels(items)  # difficulty/{level}_acc and _count, when the items carry levels
    metrics.update(difficulty_metrics(levels, level_indices([s for s in items for _ in range(samples)], levels),
                                      joined["correct"], joined["valid"]))
    return EvalResult(metrics, rows, time.perf_counter() - start_time)


def evaluate_with_config(model, tokenizer, items: list[dict], scorer, cfg, progress=None) -> EvalResult:
    """`evaluate` with the settings of a run's config: its eval section, completion length, top-p,
    seed, system prompt and correctness rule."""
    return evaluate(model, tokenizer, items, scorer, samples=cfg.eval.samples,
                    max_new_tokens=cfg.rollout.max_new_tokens, temperature=cfg.eval.temperature,
                    top_p=cfg.rollout.top_p, seed=cfg.train.seed, system_prompt=cfg.data.system_prompt or None,
                    correct=CorrectRule.from_config(cfg), progress=progress)


def held_out_items(cfg) -> list[dict]:
    """The held-out prompts: eval.dataset if set, else the built-in task's test split."""
    from mlx_grpo.data import BUILTIN_TASKS, load_dataset

    spec = cfg.eval.dataset or cfg.data.dataset
    if not cfg.eval.dataset and spec not in BUILTIN_TASKS:
        raise UserInputError(f"eval: {spec} has no held-out split; name a held-out JSONL file with eval.dataset "
                             "(or --data for `uv run eval`)")
    return load_dataset(spec, split="test", seed=cfg.train.seed, size=cfg.data.test_size,
                        **({} if cfg.eval.dataset else cfg.task))  # the task's options, not a file's


def load_run_adapters(model, run_dir: Path) -> None:
    """Apply a run's saved adapters (LoRA layers, or full fine-tuned weights) to `model`."""
    from mlx_lm.tuner.utils import load_adapters

    run_dir = Path(run_dir)
    for name in ("adapter_config.json", "adapters.safetensors"):
        if not (run_dir / name).is_file():
            raise UserInputError(f"{run_dir}: no {name}; is this a run directory with saved adapters?")
    try:
        load_adapters(model, str(run_dir))
    except ValueError as err:  # adapters trained on another model
        raise UserInputError(f"{run_dir}: adapters do not fit this model ({str(err).splitlines()[0]})") from None
    mx.eval(model.parameters())
