"""Everything a run writes about itself: one metric record per step, named as in the seed references,
and the run directory's completions.jsonl, reward_breakdown.jsonl and summary.json.

`RunLogger.log_step` turns what a step produced (a `StepOutcome`) into its record: the step's own
metrics here, the cross-step ones from `MetricsTracker`, the warnings of `HealthMonitor`, the
machine's load from `SystemSampler`, and hands the record to the sinks of the `MetricsHub`.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

from mlx_grpo import grpo
from mlx_grpo.config import Config
from mlx_grpo.curriculum import difficulty_metrics, level_indices
from mlx_grpo.distributed import World
from mlx_grpo.metrics import MetricsHub
from mlx_grpo.metrics.health import HealthConfig, HealthMonitor
from mlx_grpo.metrics.record import (alias_metrics, critic_metrics,
                                     criterion_metrics, length_metrics, reward_metrics, teacher_metrics,
                                     timing_per_token)
from mlx_grpo.metrics.system import SystemSampler
from mlx_grpo.metrics.tracker import FirstAndLast, MetricsTracker
from mlx_grpo.rewards import Scorer
from mlx_grpo.rewards.scoring import RewardBatch
from mlx_grpo.rollout import Rollout
from mlx_grpo.sgrpo import sgrpo_metrics

# Log files in the run directory that a resume truncates back to the checkpoint.
LOG_FILES = ("metrics.jsonl", "batch_metrics.jsonl", "learning.log", "completions.jsonl", "reward_breakdown.jsonl")
# reward_breakdown.jsonl: one compact line per completion, every step.
BREAKDOWN_KEYS = ("step", "prompt_id", "completion", "reward", "valid", "scores")


def phase_peak_gb() -> float:
    """Peak MLX memory in GiB (as the System/*_GB tags) since the previous call, which starts the
    next phase's measurement."""
    peak = mx.get_peak_memory() / 1024**3
    mx.reset_peak_memory()
    return peak


class PhaseTimer:
    """Seconds and peak MLX memory of each phase of one step, from its start."""

    def __init__(self):
        self.start = time.perf_counter()
        self.seconds: dict[str, float] = {}
        self.peaks_gb: dict[str, float] = {}
        phase_peak_gb()  # each phase's peak memory is measured from here

    @contextmanager
    def time(self, phase: str):
        begin = time.perf_counter()
        try:
            yield
        finally:
            self.add(phase, time.perf_counter() - begin)

    def add(self, phase: str, seconds: float) -> None:
        self.seconds[phase] = self.seconds.get(phase, 0.0) + seconds

    def peak(self, phase: str) -> None:
        """The peak memory of `phase`, which ends now."""
        self.peaks_gb[phase] = phase_peak_gb()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start


@dataclass(kw_only=True)
class StepOutcome:
    """What one step produced, on this rank: the record of the step is made of it. Built with
    keywords only, so that no two of its fields can be swapped unseen."""
    step: int
    samples: list[dict]         # one per completion (the group's prompt repeated)
    prompts: list[list[int]]    # prompt ids, one per prompt
    rollout: Rollout
    texts: list[str]
    scored: RewardBatch
    correct: np.ndarray         # bool, one per completion: the step's CorrectRule verdicts
    advantages: np.ndarray
    stats: dict                 # the update's statistics; stats["skipped"]: no optimizer step was taken
    updated: bool               # False: no group had a signal, the update was skipped
    trained_tokens: int
    learning_rate: float
    timer: PhaseTimer
    reward_seconds: float       # submission to scores ready
    eval_record: dict
    nonfinite_skips: int        # updates skipped so far for a NaN/inf loss or gradient


class RunLogger:
    """Owns the step record and every file of the run directory. Only rank 0 writes; every rank
    computes the record (its collectives need every rank)."""

    def __init__(self, cfg: Config, run_dir: Path, hub: MetricsHub, scorer: Scorer, num_items: int,
                 world: World = World(), notify=print, progress=None, levels: list | None = None):
        self.cfg, self.run_dir, self.hub, self.scorer, self.world = cfg, run_dir, hub, scorer, world
        self.levels = levels or []  # the training set's difficulty labels, easiest first
        self.notify, self.progress = notify, progress
        self.prompts_per_step = cfg.rollout.batch_size * world.size  # each step's prompts over all ranks
        self.prompts_per_epoch = cfg.data.epoch_size or num_items
        self.tracker = MetricsTracker(
            rubric_name=scorer.rubric.name, group_size=cfg.rollout.group_size, prompts_per_epoch=self.prompts_per_epoch,
            histogram_every=cfg.logging.histogram_every)
        # Judged over several steps: with one prompt per step a single step says little.
        self.health = HealthMonitor(HealthConfig(zero_std_window=5, flat_reward_window=10,
                                                 warmup_steps=cfg.optim.warmup_steps),
                                    teacher=scorer.teacher is not None)
        self.reward_ends = FirstAndLast()  # the first and latest steps' mean rewards, for the final report
        self.elapsed_before = 0.0  # of the run before a resume
        self.start_time = time.perf_counter()
        self.system = SystemSampler()  # every second
        self.completions = self._open("completions.jsonl")
        self.breakdown = self._open("reward_breakdown.jsonl")
        self._usage_before = scorer.usage

    def start(self) -> None:
        """The first step is next: the run's clock (continued after a resume) and the system sampler."""
        self.start_time = time.perf_counter() - self.elapsed_before
        self.system.start()

    def _open(self, name: str):
        return open(self.run_dir / name if self.world.is_main else os.devnull, "a", encoding="utf-8")

    def start_step(self) -> PhaseTimer:
        """A new step begins: its phase timer, and the teacher usage that the step's own is counted from."""
        self._usage_before = self.scorer.usage
        return PhaseTimer()

    def gather(self, out: StepOutcome) -> "StepView":
        """The step's completions over every rank."""
        return gather_step(self.world, out.scored, out.correct, out.rollout, out.prompts, out.advantages,
                           level_indices(out.samples, self.levels))

    def log_step(self, out: StepOutcome, seen: "StepView", last: bool, extra: dict | None = None) -> dict:
        """The step's record, logged to every sink; its completions written to the run directory.
        `seen` is `gather(out)`; `extra` holds scalars computed elsewhere (curriculum, window)."""
        cfg, timer = self.cfg, out.timer
        update_s = timer.seconds.get("update_actor", 0.0)
        gen_speed, backprop_speed, logprob_sum, sampled_tokens = self.world.sum([  # over all ranks
            out.rollout.tokens_per_sec,
            out.trained_tokens * cfg.grpo.num_iterations / update_s if out.updated else 0.0,
            sum(map(sum, out.rollout.logprobs or [])), out.rollout.num_generated_tokens])
        phases = {**timer.seconds, "reward": out.reward_seconds}
        record = step_record(cfg, out.stats, seen, self.scorer, out.learning_rate, out.rollout.max_new_tokens)
        record["objective/logprobs"] = logprob_sum / max(sampled_tokens, 1)  # of the sampled tokens, when sampled
        record.update(difficulty_metrics(self.levels, seen.levels, seen.correct, seen.scored.valid))
        if cfg.rollout.sgrpo:
            record.update(sgrpo_metrics(seen.correct, seen.scored.valid, cfg.rollout.group_size))
        record.update(out.eval_record)
        record.update(extra or {})
        record.update(timing_records(phases, timer.elapsed(), out.rollout.num_generated_tokens, out.trained_tokens))
        record["time/elapsed_s"] = time.perf_counter() - self.start_time
        record["health/nonfinite_skips"] = float(out.nonfinite_skips)
        record["epoch"] = out.step * self.prompts_per_step / self.prompts_per_epoch  # the same epochs as Epoch/*
        usage = self.scorer.usage
        if self.scorer.teacher is not None or usage.requests:
            record.update(teacher_metrics(usage.since(self._usage_before), usage, self.scorer.latencies))
        if out.scored.gaming:  # scored with a teacher: completions that address the grader
            flagged, n = self.world.sum([float(sum(g is not None for g in out.scored.gaming)), float(len(out.texts))])
            record["Teacher/SuspectedGamingFrac"] = flagged / max(n, 1.0)
        record["Performance/Generation_TokensPerSec"] = gen_speed
        record["Performance/Generation_Time"] = out.rollout.generation_time_s
        if out.updated:  # a skipped update measured no backprop speed
            record["Performance/Backprop_TokensPerSec"] = backprop_speed
        record.update(self.tracker.update(out.step, record, seen.scored, self.prompts_per_step, gen_speed,
                                          backprop_speed if out.updated else None, seen.correct, seen.truncated,
                                          seen.lengths))
        record.update(alias_metrics(record))
        if out.step % cfg.logging.histogram_every == 0:  # TRL PPO's distributions (arrays become histograms)
            record["env/reward_dist"] = seen.scored.rewards[seen.scored.valid].astype(np.float32)
            record["ppo/policy/advantages"] = seen.advantages[seen.scored.valid].astype(np.float32)
        busy = sum(timer.seconds.get(phase, 0.0) for phase in ("gen", "ref", "update_actor"))  # MLX computing
        record.update(self.system.snapshot(busy_s=busy, wall_s=record["timing_s/step"]))
        record.update({f"memory/peak_{phase}_gb": gb for phase, gb in timer.peaks_gb.items()})
        record["System/GPU_Memory_Peak_GB"] = max(timer.peaks_gb.values())  # this step's peak (reset per phase)
        health_scalars, warnings = self.health.update(out.step, record)
        record.update(health_scalars)
        if last:
            record.update(self.tracker.close_epoch())  # the last, partial epoch: short runs get Epoch/* too
        self.hub.log(out.step, record)
        for warning in warnings:
            self.notify(f"health: {warning}")
            self.hub.log_text(out.step, "health/warnings", warning)
        self.reward_ends.add(record["Train/AvgReward"])
        self._write_completions(out)
        self._log_gaming(out)
        if self.progress is not None:
            self.progress(out.step, record)
        return record

    def _write_completions(self, out: StepOutcome) -> None:
        rows = completion_rows(out.step, out.samples, out.texts, out.scored)
        for row in rows:
            self.breakdown.write(json.dumps({k: row[k] for k in BREAKDOWN_KEYS if k in row}) + "\n")
        self.breakdown.flush()
        every = self.cfg.logging.sample_every
        if every and (out.step % every == 0 or out.step == 1):
            for row in rows:
                self.completions.write(json.dumps(row) + "\n")
            self.completions.flush()
            self.hub.log_text(out.step, "Samples/completions", samples_markdown(rows[:self.cfg.rollout.group_size]))

    def _log_gaming(self, out: StepOutcome, shown: int = 3) -> None:
        """A few of this step's completions that address the grader, in TensorBoard's text tab."""
        found = [(why, text) for why, text in zip(out.scored.gaming, out.texts) if why is not None]
        if found:
            action = {"warn": "counted only", "mask": "masked", "zero": "rewarded 0"}[self.scorer.teacher.cfg.on_gaming]
            lines = [f"{len(found)} of {len(out.texts)} completions address the grader ({action}):", ""]
            lines += [f"- **{why}**: `{' '.join(text.split())[:300]}`" for why, text in found[:shown]]
            self.hub.log_text(out.step, "Teacher/SuspectedGaming", "\n".join(lines))

    def note(self, step: int, text: str) -> None:
        """A notice for the user, also in the logs."""
        self.hub.log_text(step, "Notices", text)

    def finish(self, step: int) -> list[list]:
        """End of the run: final/* scalars, the criteria table and summary.json; returns the table."""
        final, table = self.tracker.finish()
        self.hub.log_summary(step, final, table)
        if self.world.is_main:
            (self.run_dir / "summary.json").write_text(json.dumps({"step": step, **final, "criteria": [
                dict(zip(("criterion", "mean", "std", "min", "max", "samples"), row)) for row in table]}, indent=1))
        return table

    def close(self) -> None:
        self.system.stop()
        self.completions.close()
        self.breakdown.close()

    def state_dict(self) -> dict:
        return {"tracker": self.tracker.state_dict(), "health": self.health.state_dict(),
                "reward_ends": self.reward_ends.state_dict(),
                "elapsed_s": time.perf_counter() - self.start_time}

    def load_state_dict(self, state: dict) -> None:
        self.tracker.load_state_dict(state["tracker"])
        self.health.load_state_dict(state["health"])
        self.reward_ends.load_state_dict(state.get("reward_ends") or {"first": state["rewards"][:FirstAndLast.KEEP],
                                                                      "last": state["rewards"][-FirstAndLast.KEEP:]})
        self.elapsed_before = state["elapsed_s"]


def step_record(cfg: Config, stats: dict, seen: "StepView", scorer: Scorer, learning_rate: float,
                max_new_tokens: int) -> dict:
    """The step's own metrics (everything that needs no history), named as in the seed references."""
    scored, G = seen.scored, cfg.rollout.group_size
    overlong = grpo.overlong_penalty(seen.lengths, max_new_tokens, cfg.grpo.overlong_buffer, cfg.grpo.overlong_penalty)
    adv = seen.advantages[scored.valid] if scored.valid.any() else np.zeros(1)
    record = {
        "Train/Loss": stats["loss"],
        "Train/PolicyLoss": stats["policy_loss"],
        "Train/KLPenalty": cfg.grpo.beta * stats["kl"],
        **reward_metrics(scored.rewards, scored.valid, G),
        **criterion_metrics(scorer.rubric.criteria, scored.criterion_scores, scored.valid),
        **length_metrics(seen.lengths.tolist(), seen.prompt_lengths, seen.finish_reasons, max_new_tokens),
        "actor/update_skipped": float(stats["skipped"]),
        "actor/pg_loss": stats["policy_loss"],
        "actor/grad_norm": stats["grad_norm"],
        "actor/lr": learning_rate,
        "actor/pg_clipfrac": stats["clip_frac"],
        "actor/ppo_kl": stats["ppo_kl"],
        "actor/kl_loss": stats["kl"],
        "actor/kl_coef": cfg.grpo.beta,
        "actor/is_ratio/mean": stats["ratio_mean"],
        "actor/is_ratio/std": stats["ratio_std"],
        "actor/is_ratio/p95": stats["ratio_p95"],
        "actor/is_log_ratio/mean": stats["log_ratio_mean"],
        "actor/is_log_ratio/std": stats["log_ratio_std"],
        "actor/is_clip/outside_frac": stats["outside_clip_frac"],
        "critic/advantages/mean": float(adv.mean()),
        "critic/advantages/max": float(adv.max()),
        "critic/advantages/min": float(adv.min()),
        **critic_metrics(scored.rewards, scored.rewards + overlong, scored.valid, seen.advantages, seen.lengths,
                         cfg.grpo.beta, stats["kl"]),
    }
    if cfg.grpo.overlong_penalty > 0:
        record["rewards/overlong_penalty_mean"] = float(overlong[scored.valid].mean()) if scored.valid.any() else 0.0
    if not stats["skipped"]:  # measured by the update's forward pass; a skipped update has none
        record["actor/entropy_loss"] = stats["entropy"]
    for key in ("tis_mean", "tis_max", "tis_clipped_frac"):  # grpo.tis_cap on a late (pipelined) batch
        if key in stats:
            record[f"actor/{key}"] = stats[key]
    if "ref_logprobs" in stats:  # grpo.beta > 0: the sampled tokens' log-probs under the reference
        record["objective/ref_logprobs"] = stats["ref_logprobs"]
    return record


@dataclass
class StepView:
    """What the step's record is made of, over the completions of every rank."""
    scored: RewardBatch
    lengths: np.ndarray
    truncated: np.ndarray
    finish_reasons: list[str]
    prompt_lengths: list[int]
    advantages: np.ndarray
    levels: np.ndarray  # each completion's difficulty level, an index into the dataset's levels (-1: none)
    correct: np.ndarray  # bool: the CorrectRule's verdicts


def gather_step(world: World, scored: RewardBatch, correct: np.ndarray, rollout: Rollout, prompts: list[list[int]],
                advantages: np.ndarray, levels: np.ndarray) -> StepView:
    """This rank's completions, or with several ranks all of them (rank 0's first). `levels`: the
    difficulty level index of each prompt's sample, one per completion."""
    names = sorted(scored.criterion_scores)
    columns = world.gather(np.stack([scored.rewards, scored.valid, *(scored.criterion_scores[n] for n in names),
                                     rollout.completion_lengths, rollout.truncated,
                                     advantages, levels, correct], axis=1).astype(np.float32))
    rewards, valid, *criteria, lengths, truncated, adv, level, is_correct = columns.T
    gathered = RewardBatch(rewards=rewards, criterion_scores=dict(zip(names, criteria)), valid=valid.astype(bool),
                           justifications=scored.justifications)
    prompt_lengths = world.gather(np.array([len(p) for p in prompts], dtype=np.float32)).astype(int).tolist()
    truncated = truncated.astype(bool)
    return StepView(gathered, lengths.astype(int), truncated, ["length" if t else "stop" for t in truncated],
                    prompt_lengths, adv, level.astype(np.int64), is_correct.astype(bool))


def timing_records(phases: dict[str, float], step_s: float, response_tokens: int, trained_tokens: int) -> dict:
    """timing_s/* of each phase and the step; timing_per_token_ms/* of each phase but the reward wait
    and the teacher audit, which no token count measures."""
    record = {f"timing_s/{phase}": seconds for phase, seconds in phases.items()}
    record["timing_s/step"] = step_s
    # reward_wait: the part of scoring nothing else overlapped (already inside "reward").
    record.update(timing_per_token({p: s for p, s in phases.items() if p not in ("reward_wait", "teacher_audit")},
                                   response_tokens, trained_tokens))
    return record


def prompt_id(sample: dict) -> str:
    """The dataset's id for the prompt, else a short stable hash of its text."""
    if sample.get("id") is not None:
        return str(sample["id"])
    return hashlib.sha1(sample["prompt"].encode("utf-8")).hexdigest()[:10]


def completion_rows(step: int, samples: list[dict], texts: list[str], scored) -> list[dict]:
    """completions.jsonl rows: the text, its reward (null when masked), each criterion's score and
    the teacher's justification, so a surprising reward can be traced to its reason."""
    rows = []
    for i, (sample, text) in enumerate(zip(samples, texts)):
        scores = {name: None if np.isnan(col[i]) else round(float(col[i]), 4)
                  for name, col in scored.criterion_scores.items()}
        reasons = {name: why[i] for name, why in scored.justifications.items() if why[i]}
        # What the rubric's checks read from the sample, so `rubric score --jsonl` can rescore the file.
        inputs = {k: sample[k] for k in ("answer", "tests", "entry_point") if sample.get(k) is not None}
        rows.append({"step": step, "prompt_id": prompt_id(sample), "prompt": sample["prompt"], **inputs,
                     "completion": text, "reward": float(scored.rewards[i]) if scored.valid[i] else None,
                     "valid": bool(scored.valid[i]), "scores": scores,
                     **({"justifications": reasons} if reasons else {})})
    return rows


def samples_markdown(rows: list[dict]) -> str:
    """A few completions of one prompt with their scores, for TensorBoard's Text tab."""
    parts = [f"**Prompt** ({rows[0]['prompt_id']}): {rows[0]['prompt']}"]
    for i, row in enumerate(rows, start=1):
        reward = "masked" if row["reward"] is None else f"{row['reward']:.3f}"
        scores = ", ".join(f"{k} {'-' if v is None else f'{v:.2f}'}" for k, v in row["scores"].items())
        parts.append(f"**{i}.** reward {reward} ({scores})\n\n```\n{row['completion']}\n```")
    return "\n\n".join(parts)
