"""Score completions with a rubric: per-criterion scores in [0, 1] and the weighted reward.

`score_completions` is the synchronous path for rubrics of programmatic checks only. `Scorer`
handles every rubric: it runs checks in a thread pool and teacher requests on its own event
loop, all at once, and hands back a future so the trainer can keep working while it waits.

A completion the teacher failed to score is *masked* (valid=False, reward NaN): it gets no
advantage and is left out of every reward statistic. It is never scored 0.

With a teacher, each completion is also checked for text addressed to the grader
(rewards/gaming.py); `teacher.on_gaming` says whether such a completion is only counted (warn),
masked like a failed score (mask), or given reward 0 (zero). `audit` reruns the injection and
position probes (rewards/audit.py) on a step's completions, on a separate, uncached teacher whose
requests count against the budget but are reported apart.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from mlx_grpo.errors import UserInputError
from mlx_grpo.rewards.audit import TRAINING_PROBES, Auditor, Group, training_metrics
from mlx_grpo.rewards.cache import ScoreCache
from mlx_grpo.rewards.checks import CHECKS
from mlx_grpo.rewards.gaming import suspected_gaming
from mlx_grpo.rewards.rubric import Criterion, Rubric
from mlx_grpo.rewards.teacher import LATENCY_WINDOW, Teacher, TeacherUsage
from mlx_grpo.rewards.user_checks import call_user_check, call_user_check_async


@dataclass
class RewardBatch:
    rewards: np.ndarray  # float32 (N,): sum(w_i * s_i) / sum(w_i) in [0, 1]; NaN where not valid
    criterion_scores: dict[str, np.ndarray]  # criterion name -> float32 (N,) in [0, 1]; NaN where unscored
    valid: np.ndarray  # bool (N,): False where a teacher score could not be had
    justifications: dict[str, list[str]] = field(default_factory=dict)  # judge criterion -> teacher's reasons
    weights: dict[str, float] = field(default_factory=dict)  # criterion name -> its weight in the rubric that scored
    gaming: list = field(default_factory=list)  # with a teacher: per completion, how it addresses the grader, or None


class TeacherUnavailable(RuntimeError):
    """Too many teacher scores failed recently; the message says what the last failure was."""


def run_check(rubric: Rubric, criterion: Criterion, sample: dict, completion: str) -> float | None:
    """One check on one completion, clipped to [0, 1] (NaN counts as 0): a score outside the range
    is a bug in the check and must not skew the reward. A UserInputError names rubric and criterion.
    A Python check of the user's own may return None (mask the completion); out of range it raises."""
    if criterion.function is not None:
        return call_user_check(criterion.function, completion, sample, criterion.params, _where(rubric, criterion))
    try:
        value = float(CHECKS[criterion.check](completion, sample, **criterion.params))
    except UserInputError as err:
        raise UserInputError(f"{rubric.path}: {criterion.name}: {err}") from None
    return 0.0 if value != value else min(1.0, max(0.0, value))


def _where(rubric: Rubric, criterion: Criterion) -> str:
    return f"{rubric.path}: {criterion.name}: check {criterion.check}"


def _check_job(loop, pool, rubric: Rubric, criterion: Criterion, sample: dict, completion: str):
    """An awaitable score: an async Python check runs on the loop itself, everything else in the pool."""
    if criterion.function is not None and inspect.iscoroutinefunction(criterion.function):
        return call_user_check_async(criterion.function, completion, sample, criterion.params,
                                     _where(rubric, criterion))
    return loop.run_in_executor(pool, run_check, rubric, criterion, sample, completion)


def _check_columns(checks: list[Criterion], values: list, n: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Per-criterion score columns (NaN where a check returned None) and the rows no check masked."""
    scores, valid = {}, np.ones(n, dtype=bool)
    for k, c in enumerate(checks):
        column = values[k * n:(k + 1) * n]
        valid &= np.array([v is not None for v in column], dtype=bool)
        scores[c.name] = np.array([np.nan if v is None else v for v in column], dtype=np.float64)
    return scores, valid


def combine(rubric: Rubric, scores: dict[str, np.ndarray], valid: np.ndarray,
            justifications: dict[str, list[str]] | None = None) -> RewardBatch:
    """The weighted reward from per-criterion columns; rows that are not valid get NaN."""
    n = len(valid)
    weighted = np.zeros(n, dtype=np.float64)
    for criterion in rubric.criteria:
        weighted += criterion.weight * np.nan_to_num(scores[criterion.name].astype(np.float64), nan=0.0)
    rewards = np.where(valid, weighted / rubric.total_weight, np.nan).astype(np.float32)
    columns = {name: column.astype(np.float32) for name, column in scores.items()}
    return RewardBatch(rewards=rewards, criterion_scores=columns, valid=valid.astype(bool),
                       justifications=justifications or {}, weights={c.name: c.weight for c in rubric.criteria})


def score_completions(rubric: Rubric, samples: list[dict], completions: list[str]) -> RewardBatch:
    """Run every (programmatic) criterion once on every (sample, completion) pair."""
    if len(samples) != len(completions):
        raise ValueError(f"{len(samples)} samples but {len(completions)} completions")
    judged = [c.name for c in rubric.criteria if c.check is None]
    if judged:
        raise ValueError(f"criterion {judged[0]!r} needs the teacher; score with a Scorer")
    values = [run_check(rubric, c, s, t) for c in rubric.criteria for s, t in zip(samples, completions)]
    return combine(rubric, *_check_columns(rubric.criteria, values, len(completions)))


def contiguous_groups(n: int, group_size: int) -> list[list[int]]:
    """Row indices of each prompt group when the G completions of a prompt are adjacent."""
    return [list(range(i, min(i + group_size, n))) for i in range(0, n, group_size)]


class Scorer:
    """Scores batches with the current rubric; the rubric (and its teacher) can be swapped between steps.

    Teacher requests run on a private event loop thread; checks run in a thread pool (the
    `python_tests` sandbox spends its time in a subprocess). Results come back as a Future.
    """

    def __init__(self, rubric: Rubric, cache_path: str | Path | None = None, warn: Callable[[str], None] = print,
                 workers: int | None = None):
        self.warn = warn
        self.cache = ScoreCache(cache_path) if cache_path else None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="mlx-grpo-scorer", daemon=True)
        self._thread.start()
        self._pool = ThreadPoolExecutor(max_workers=workers or min(4, os.cpu_count() or 1),
                                        thread_name_prefix="mlx-grpo-check")
        self._usage_before = TeacherUsage()  # usage of teachers replaced by a rubric reload
        self._latencies_before: list[float] = []
        self._recent: deque[bool] = deque()  # True where a judged completion failed
        self._auditor: Auditor | None = None  # teacher.audit_every: its own uncached teacher
        self._audit_usage_before = TeacherUsage()
        self.teacher: Teacher | None = None
        self.rubric = rubric
        self.set_rubric(rubric)

    # -- rubric ------------------------------------------------------------------------------

    def set_rubric(self, rubric: Rubric) -> None:
        """Use `rubric` from the next batch on (a new teacher only if its settings changed)."""
        config = rubric.teacher_config
        needs_teacher = config is not None and any(c.judge is not None for c in rubric.criteria)
        old = self.teacher
        if not needs_teacher:
            self.teacher = None
        elif old is None or old.cfg != config:
            self.teacher = Teacher(config, rubric.criteria, rubric.version, self.cache, warn=self.warn)
            if old is not None:
                self._carry_scoring(old, self.teacher)
        else:
            old.criteria = [c for c in rubric.criteria if c.judge is not None]
            old.rubric_version = rubric.version
        if old is not None and old is not self.teacher:
            self._usage_before = self._add(self._usage_before, old.usage)
            self._latencies_before = (self._latencies_before + list(old.latencies))[-LATENCY_WINDOW:]
            self._run(old.close())
        if self.teacher is not None:
            self._recent = deque(self._recent, maxlen=self.teacher.cfg.failure_window)
        self.rubric = rubric

    def preflight(self) -> None:
        """Check the teacher answers, and how it can score (raises UserInputError with what to fix)."""
        if self.teacher is not None:
            self._run(self.teacher.preflight())

    def _carry_scoring(self, old: Teacher, new: Teacher) -> None:
        """A teacher edited in the rubric keeps what the preflight found about the same server; a new
        server or way of scoring is checked again (a failure keeps the configured default, with a warning)."""
        same = ("model", "base_url", "scoring", "chat_template_kwargs", "reasoning_effort", "min_logprob_mass")
        if all(getattr(old.cfg, key) == getattr(new.cfg, key) for key in same):
            new.scoring, new.scoring_note, new.top_logprobs = old.scoring, old.scoring_note, old.top_logprobs
            return
        try:
            self._run(new.preflight())
            self.warn(f"the edited rubric's teacher answers; {new.describe_scoring()}")
        except UserInputError as err:
            self.warn(f"the edited rubric's teacher failed its check: {err}")

    # -- scoring -----------------------------------------------------------------------------

    def submit(self, samples: list[dict], completions: list[str], groups: list[list[int]]) -> Future:
        """Start scoring; the Future's result is a RewardBatch. `groups` are the row indices of
        each prompt's completions (one teacher request per group in group mode)."""
        if len(samples) != len(completions):
            raise ValueError(f"{len(samples)} samples but {len(completions)} completions")
        return asyncio.run_coroutine_threadsafe(self._score(self.rubric, self.teacher, samples, completions, groups),
                                                self._loop)

    def score(self, samples: list[dict], completions: list[str], groups: list[list[int]]) -> RewardBatch:
        return self.submit(samples, completions, groups).result()

    async def _score(self, rubric: Rubric, teacher: Teacher | None, samples, completions, groups) -> RewardBatch:
        loop = asyncio.get_running_loop()
        n = len(completions)
        checks = [c for c in rubric.criteria if c.check is not None]
        check_jobs = [_check_job(loop, self._pool, rubric, c, s, t) for c in checks for s, t in zip(samples, completions)]
        judge_jobs = []
        if teacher is not None:
            for rows in groups:
                sample = samples[rows[0]]
                judge_jobs.append(teacher.judge_group(sample["prompt"], _reference(sample),
                                                      [completions[i] for i in rows]))
        check_values, judged = await asyncio.gather(asyncio.gather(*check_jobs), asyncio.gather(*judge_jobs))

        scores, valid = _check_columns(checks, check_values, n)
        failed = np.zeros(n, dtype=bool)  # the teacher's failures, which _recent counts (not a check's None)
        reasons: dict[str, list[str]] = {}
        for c in rubric.criteria:
            if c.judge is not None:
                scores[c.name] = np.full(n, np.nan)
                reasons[c.name] = [""] * n
        for rows, results in zip(groups, judged):
            for i, result in zip(rows, results):
                if result is None or any(c.name not in result for c in rubric.criteria if c.judge is not None):
                    valid[i], failed[i] = False, True
                    continue
                for name, (value, why) in result.items():
                    if name in reasons:
                        scores[name][i] = value
                        reasons[name][i] = why
        if teacher is None:
            return combine(rubric, scores, valid, reasons)
        self._recent.extend(bool(f) for f in failed)
        gaming = [suspected_gaming(text) for text in completions]
        flagged = np.array([g is not None for g in gaming], dtype=bool)
        if teacher.cfg.on_gaming == "mask":
            valid &= ~flagged  # like a failed score: no advantage, and never a 0
        batch = combine(rubric, scores, valid, reasons)
        if teacher.cfg.on_gaming == "zero":
            batch.rewards[flagged & batch.valid] = 0.0
        batch.gaming = gaming
        return batch

    # -- auditing the teacher during training ----------------------------------------------------

    def audit(self, samples: list[dict], completions: list[str], groups: list[list[int]]) -> dict[str, float]:
        """The injection and position probes on the step's largest group: Teacher/Audit_* scalars.
        Synchronous: it runs every teacher.audit_every steps and its requests are few (3 per audit)."""
        if self.teacher is None or not groups:
            return {}
        cfg = self.teacher.cfg
        if self._auditor is None or self._auditor.teacher.cfg != cfg:
            self._retire_auditor()
            self._auditor = Auditor(Teacher(cfg, self.rubric.criteria, self.rubric.version, cache=None,
                                            warn=self.warn), orders=2)
        auditor = self._auditor
        auditor.teacher.criteria = list(self.teacher.criteria)
        auditor.teacher.scoring, auditor.teacher.top_logprobs = self.teacher.scoring, self.teacher.top_logprobs
        auditor.forget()
        rows = max(groups, key=len)
        sample = samples[rows[0]]
        group = Group(sample["prompt"], _reference(sample), [completions[i] for i in rows])
        before = auditor.teacher.usage.snapshot()
        results = [self._run(auditor.run(probe, [group])) for probe in TRAINING_PROBES]
        spent = auditor.teacher.usage.since(before)
        total = self.audit_usage
        return {**training_metrics(results), "Teacher/Audit_Requests": spent.requests,
                "Teacher/Audit_APITokens": spent.tokens, "Teacher/Audit_APITokensTotal": total.tokens}

    @property
    def audit_usage(self) -> TeacherUsage:
        """The audit's teacher usage over the whole run, apart from scoring's."""
        current = self._auditor.teacher.usage if self._auditor is not None else TeacherUsage()
        return self._add(self._audit_usage_before, current)

    def _retire_auditor(self) -> None:
        if self._auditor is not None:
            self._audit_usage_before = self._add(self._audit_usage_before, self._auditor.teacher.usage)
            self._run(self._auditor.teacher.close())
            self._auditor = None

    # -- accounting and stopping ---------------------------------------------------------------

    @property
    def usage(self) -> TeacherUsage:
        """Teacher usage over the whole run (across rubric reloads)."""
        current = self.teacher.usage if self.teacher is not None else TeacherUsage()
        return self._add(self._usage_before, current)

    def restore_usage(self, usage: TeacherUsage, latencies: list[float]) -> None:
        """Continue a resumed run's accounting (budget, totals, latency percentiles); what this
        process already spent (the preflight) is added on top."""
        self._usage_before, self._latencies_before = usage, list(latencies)[-LATENCY_WINDOW:]

    def state_dict(self) -> dict:
        """The run's teacher accounting, as plain numbers (for a checkpoint), and for whoever reads
        the checkpoint, the rubric version and score cache it was scored with."""
        return {"usage": asdict(self.usage), "latencies": self.latencies, "rubric_version": self.rubric.version,
                "cache": str(self.cache.path) if self.cache is not None else None,
                "audit_usage": asdict(self.audit_usage)}

    def load_state_dict(self, state: dict) -> None:
        self.restore_usage(TeacherUsage(**state["usage"]), state["latencies"])
        self._audit_usage_before = TeacherUsage(**state.get("audit_usage", {}))

    @property
    def latencies(self) -> list[float]:
        """Seconds per answered teacher request, the latest LATENCY_WINDOW of the run."""
        now = list(self.teacher.latencies) if self.teacher is not None else []
        return (self._latencies_before + now)[-LATENCY_WINDOW:]

    def check_failures(self) -> None:
        """Raise TeacherUnavailable when the recent failure rate passes the rubric's threshold."""
        # Judge only once a quarter of the window is in, so one unlucky first group cannot stop a run.
        if self.teacher is None or len(self._recent) < max(1, self.teacher.cfg.failure_window // 4):
            return
        rate = sum(self._recent) / len(self._recent)
        if rate > self.teacher.cfg.max_failure_rate:
            raise TeacherUnavailable(
                f"{sum(self._recent)} of the last {len(self._recent)} teacher scores failed "
                f"(max_failure_rate {self.teacher.cfg.max_failure_rate:g}); last error: {self.teacher.last_error}")

    def budget_exhausted(self) -> str | None:
        """A message when the teacher's token or USD budget is spent, else None."""
        if self.teacher is None:
            return None
        budget, used = self.teacher.cfg.budget, self._add(self.usage, self.audit_usage)  # audit requests count too
        if budget.tokens is not None and used.tokens >= budget.tokens:
            return f"teacher token budget spent: {used.tokens:,} of {budget.tokens:,} tokens"
        if budget.usd is not None and used.cost_usd >= budget.usd:
            return f"teacher budget spent: ${used.cost_usd:.4f} of ${budget.usd:.2f}"
        return None

    def close(self) -> None:
        """Idempotent: a second call (e.g. from a finally block) does nothing."""
        if not self._loop.is_running():
            return
        if self.teacher is not None:
            self._run(self.teacher.close())
        self._retire_auditor()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        self._pool.shutdown(wait=False, cancel_futures=True)
        if self.cache is not None:
            self.cache.close()

    def _run(self, coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    @staticmethod
    def _add(a: TeacherUsage, b: TeacherUsage) -> TeacherUsage:
        return TeacherUsage(**{k: getattr(a, k) + getattr(b, k) for k in vars(a)})


def _reference(sample: dict) -> str | None:
    answer = sample.get("answer")
    return None if answer is None else str(answer)
