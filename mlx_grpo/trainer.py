"""The GRPO training loop: rollout -> score (overlapped) -> advantages -> update -> log -> checkpoint.

Read `train` top to bottom: it is the algorithm. Each of its steps is a call to the one object that
owns that concern:

    RolloutSource  (rollout_source.py)   prompts, generation, scoring in the background
    Policy         (policy.py)           model, AdamW, the clipped-surrogate loss, the reference
    grpo           (grpo.py)             the math: advantages, the loss, KL (pure functions)
    CorrectRule    (rewards/correct.py)  which completions are correct (reward.correct_*)
    RunLogger      (metrics/run_log.py)  the step's metric record and the run directory's files
    sgrpo          (sgrpo.py)            S-GRPO's serial group and its decaying rewards (rollout.sgrpo)
    Checkpointer   (checkpoint.py)       saves and restores the state of all of the above
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import mlx.core as mx
import numpy as np

from mlx_grpo import grpo, sgrpo
from mlx_grpo.checkpoint import Checkpointer, GlobalRandom
from mlx_grpo.config import Config
from mlx_grpo.distributed import World
from mlx_grpo.evaluate import evaluate_with_config
from mlx_grpo.metrics import MetricsHub
from mlx_grpo.metrics.entropy_dump import EntropyDumper
from mlx_grpo.metrics.tracker import FirstAndLast
from mlx_grpo.metrics.run_log import LOG_FILES, RunLogger, StepOutcome
from mlx_grpo.policy import COMPILE_BUCKET, Policy
from mlx_grpo.rewards import RubricWatcher, Scorer, contiguous_groups, describe_rubric
from mlx_grpo.rewards.correct import CorrectRule
from mlx_grpo.rollout import check_generation, to_train_batch
from mlx_grpo.rollout_source import RolloutSource


class TrainingDiverged(RuntimeError):
    """Too many consecutive updates had a non-finite loss or gradient."""


MAX_NONFINITE_SKIPS = 5  # updates skipped in a row for a NaN/inf loss or gradient before the run stops


@dataclass
class Prompts:
    train: list[dict]
    held_out: list[dict] | None = None  # scored every cfg.eval.every steps (eval/* metrics)


@dataclass
class RunIO:
    """Where the run writes, and how it talks with whoever started it."""
    run_dir: Path  # adapters, checkpoints and logs (only rank 0 writes)
    hub: MetricsHub  # the metric sinks: TensorBoard, jsonl, learning.log, W&B
    progress: Callable[[int, dict], None] | None = None  # called with (step, record) after every step
    notify: Callable[[str], None] = print  # messages for the user
    watcher: RubricWatcher | None = None  # hot-reloads the rubric file
    should_stop: Callable[[], bool] = lambda: False  # asked once per step; True stops cleanly (Ctrl-C)
    resume: Path | None = None  # a checkpoint directory to continue from
    logged_with_every_step: dict = field(default_factory=dict)  # scalars for every record (the memory estimate)


@dataclass
class TrainState:
    step: int = 0
    reward_ends: FirstAndLast = field(default_factory=FirstAndLast)  # the first and latest mean rewards, for the report
    stop_reason: str | None = None  # set when training ended before cfg.train.steps (e.g. budget spent)
    summary: list[list] = field(default_factory=list)  # per-criterion [name, mean, std, min, max, samples]
    nonfinite_skips: int = 0  # updates skipped for a NaN/inf loss or gradient
    nonfinite_run: int = 0  # ... of which this many in a row, up to now

    def count_nonfinite(self, step: int, stats: dict, limit: int, notify) -> None:
        """Count a skipped non-finite update; too many in a row means the run has diverged."""
        if not stats.get("nonfinite"):
            self.nonfinite_run = 0
            return
        self.nonfinite_run += 1
        self.nonfinite_skips += 1
        notify(f"warning: step {step}: non-finite loss or gradient; the update was skipped "
               f"({self.nonfinite_run} in a row)")
        if self.nonfinite_run >= limit:
            raise TrainingDiverged(
                f"{self.nonfinite_run} updates in a row had a NaN/inf loss or gradient; "
                "lower optim.learning_rate or check the rubric's rewards")

    def state_dict(self) -> dict:
        return {"step": self.step, "nonfinite_skips": self.nonfinite_skips, "nonfinite_run": self.nonfinite_run}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.nonfinite_skips, self.nonfinite_run = (
            state["step"], state["nonfinite_skips"], state["nonfinite_run"])


def train(cfg: Config, model, tokenizer, prompts: Prompts, scorer: Scorer, run: RunIO,
          world: World = World()) -> TrainState:
    """GRPO steps up to cfg.train.steps; adapters are saved into run.run_dir, also when a step fails.
    It stops early, with a checkpoint, when the teacher budget is spent or run.should_stop() turns
    true (state.stop_reason says why). `world`: this process's rank in data-parallel training."""
    seed_everything(cfg.train.seed)
    policy = Policy(model, cfg, world)
    run.notify(f"log-probs: {policy.logprob_path.describe()} (checked against the model's own forward: "
               f"max gap {policy.logprob_path.gap:.1e}); generation: {check_generation(model)}")
    rollouts = RolloutSource(cfg, prompts.train, model, tokenizer, scorer, world)
    logger = RunLogger(cfg, run.run_dir, run.hub, scorer, len(prompts.train), world, run.notify, run.progress,
                       levels=rollouts.levels)
    correct_rule = CorrectRule.from_config(cfg)
    entropy_dumps = EntropyDumper(run.run_dir, cfg.logging.entropy_dump_every, enabled=world.is_main)
    state = TrainState()
    checkpointer = Checkpointer(run.run_dir, policy, {"loop": state, "rollouts": rollouts, "logger": logger,
                                                      "scorer": scorer, "random": GlobalRandom()},
                                LOG_FILES, keep=cfg.train.keep_checkpoints, enabled=world.is_main)
    if run.resume is not None:
        checkpointer.restore(run.resume)
    logger.start()
    run_complete = False
    try:
        for step in range(state.step + 1, cfg.train.steps + 1):
            timer = logger.start_step()
            reload_rubric(run.watcher, scorer, run.hub, step, run.notify)

            # 1-2. Rollout: B prompts x G samples, all decoded together, then scored in the
            # background. With rollout.pipeline this batch was sampled during the previous step.
            current = rollouts.take(step)
            timer.add("gen", 0.0 if current.late else current.rollout.generation_time_s)

            # 3. Meanwhile: (pipeline) the next batch, sampled by the weights before this update, and
            # the log-probs the update needs that do not depend on rewards.
            timer.add("gen", rollouts.prefetch(step))
            if rollouts.upcoming is not None:  # its sampler gap, while the weights are those that sampled it
                rollouts.upcoming.sampler_gap = measure_sampler_gap(cfg, policy, rollouts.upcoming)
            timer.peak("rollout")
            batch = train_batch(cfg, current.rollout)
            with timer.time("ref"):
                sampled = current.sampled_logprobs(batch.mask.shape[1]) if current.late else None
                old_logprobs, ref_logprobs, off_policy = policy.frozen_logprobs(batch, sampled)
            if entropy_dumps.due(step):  # logging.entropy_dump_every
                with timer.time("entropy_dump"):
                    entropy_dumps.dump(step, policy, batch, current.rollout.completion_lengths)
            timer.peak("logprobs")
            with timer.time("reward_wait"):
                scored = current.scoring.result()
            audited = {}
            if audit_due(scorer, step):  # teacher.audit_every: can this step's own completions fool the teacher?
                with timer.time("teacher_audit"):
                    groups = contiguous_groups(len(current.texts), cfg.rollout.group_size)
                    audited = scorer.audit(current.group_samples, current.texts, groups)
            scorer.check_failures()  # raises TeacherUnavailable when too many recent scores failed
            correct = correct_rule.mask(scored, scorer.rubric)  # the step's one verdict per completion

            # 4. Advantages, relative within each prompt's group; masked rows get none and no loss.
            # S-GRPO: the group is serial, and its rewards decay with the exit of each correct answer.
            # grpo.overlong_penalty: DAPO's soft punishment of completions near max_new_tokens;
            # grpo.reward_aggregation: the criteria summed before or after their normalisation.
            with timer.time("adv"):
                advantages = step_advantages(cfg, scored, current.rollout, correct if cfg.rollout.sgrpo else None)
                batch = batch if scored.valid.all() else batch.keep_rows(scored.valid)
                # Ranks agree: any signal anywhere means every rank joins the update.
                has_signal = world.any((cfg.grpo.beta > 0 and scored.valid.any()) or mx.any(advantages != 0).item())

            # 5. Update: clipped surrogate against the sampling policy, optional KL to the base model.
            # A batch where every group scored alike carries no signal; stepping AdamW on its zero
            # gradient would still move the weights along stale momentum, so skip it.
            # training/rollout_*, the trainer's log-probs against the sampler's at the sampling weights,
            # come with the update (a late batch's were measured when it was sampled).
            with timer.time("update_actor"):
                on_policy = None if current.late else current.sampled_logprobs(batch.mask.shape[1])
                stats = policy.update(batch, advantages, old_logprobs, ref_logprobs, local=bool(scored.valid.any()),
                                      off_policy=off_policy, sampled=on_policy) if has_signal else (
                    policy.skipped_update(batch, on_policy))
                gap = current.sampler_gap if current.late else {k: stats.pop(k) for k in list(stats)
                                                                if k.startswith("training/rollout_")}
            timer.peak("update")
            state.count_nonfinite(step, stats, MAX_NONFINITE_SKIPS, run.notify)

            # 6. Held-out evaluation, every cfg.eval.every steps and at the end.
            eval_record = held_out_record(cfg, step, model, tokenizer, prompts.held_out, scorer, timer, world)

            # 7. Checkpoint the weights (when due, or when the run stops here), so that the step's
            # record holds the save's time.
            state.step = step
            state.stop_reason, budget_spent = stop_requests(step, scorer, run.should_stop, world)
            run_complete = step == cfg.train.steps or budget_spent  # (an interrupted run is resumed)
            checkpoint_due = run_complete or state.stop_reason or (cfg.train.save_every and step % cfg.train.save_every == 0)
            if checkpoint_due:
                timer.add("save_checkpoint", checkpointer.write_weights(step))

            # 8. Log one record of the whole global batch (every rank's completions are gathered),
            # once the curriculum and the generation window have learnt from it for the next steps.
            outcome = StepOutcome(
                step=step, samples=current.group_samples, prompts=current.prompts, rollout=current.rollout,
                texts=current.texts, scored=scored, correct=correct, advantages=np.array(advantages), stats=stats,
                updated=has_signal, trained_tokens=batch.num_tokens, learning_rate=policy.learning_rate, timer=timer,
                reward_seconds=current.scoring_time, eval_record=eval_record, nonfinite_skips=state.nonfinite_skips)
            seen = logger.gather(outcome)
            adapted = rollouts.adapt(current, seen)
            logger.log_step(outcome, seen, last=run_complete, extra={**adapted, **audited, **gap, **run.logged_with_every_step})

            # 9. The checkpoint's state, now that the record is in the logs; stop early when asked to.
            if checkpoint_due:
                checkpointer.commit(step)
            if state.stop_reason is not None:
                logger.note(step, state.stop_reason)
                run.notify(state.stop_reason)
                break
    finally:  # whatever ends the loop (done, budget, teacher down, a crash), the trained weights are kept
        wrap_up(state, policy, logger, checkpointer, run_complete, world)
        entropy_dumps.close()  # after the weights are safe: it raises a failed write
    return state


def wrap_up(state: TrainState, policy: Policy, logger: RunLogger, checkpointer: Checkpointer, run_complete: bool,
            world: World) -> None:
    """The end of a run: adapters saved if the last steps have no checkpoint, the summary if done."""
    if state.step > checkpointer.saved_step and world.is_main:
        policy.save_adapters(logger.run_dir)
    if run_complete and world.is_main:
        state.summary = logger.finish(state.step)
    logger.close()
    state.reward_ends = logger.reward_ends


def train_batch(cfg: Config, rollout):
    """The rollout as right-padded token rows and a loss mask (lengths bucketed under optim.compile)."""
    return to_train_batch(rollout, mask_truncated=cfg.grpo.mask_truncated,
                          pad_to=COMPILE_BUCKET if cfg.optim.compile else 1)


def measure_sampler_gap(cfg: Config, policy: Policy, scored) -> dict:
    """training/rollout_logprob_diff_* and rollout_probs_diff_* of a batch sampled for a later
    step (rollout.pipeline), measured now, at the weights that sampled it."""
    batch = train_batch(cfg, scored.rollout)
    return policy.sampler_gap(batch, scored.sampled_logprobs(batch.mask.shape[1]), [None])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    mx.random.seed(seed)


def step_advantages(cfg: Config, scored, rollout, correct: np.ndarray | None) -> mx.array:
    """The step's (N,) advantages from its scores: the weighted reward (plus grpo.overlong_penalty)
    relative within each group; S-GRPO's exit-order rewards (`correct` given) without the std;
    or, with grpo.reward_aggregation normalize_then_sum, each criterion normalised before the sum."""
    G, valid = cfg.rollout.group_size, mx.array(scored.valid)
    if cfg.grpo.reward_aggregation == "normalize_then_sum":
        names = list(scored.criterion_scores)
        return grpo.normalize_then_sum([scored.criterion_scores[n] for n in names], [scored.weights[n] for n in names],
                                       G, valid=valid)
    rewards = sgrpo.decaying_rewards(correct, G) if correct is not None else scored.rewards
    rewards = rewards + grpo.overlong_penalty(rollout.completion_lengths, rollout.max_new_tokens,
                                              cfg.grpo.overlong_buffer, cfg.grpo.overlong_penalty)
    return grpo.group_advantages(mx.array(rewards), G, valid=valid,
                                 scale="none" if correct is not None else cfg.grpo.scale_rewards)


def reload_rubric(watcher: RubricWatcher | None, scorer: Scorer, hub: MetricsHub, step: int, notify) -> None:
    """Apply an edited rubric file from this step on; a broken edit only warns (the old rubric stays)."""
    if watcher is None:
        return
    rubric, warning = watcher.poll()
    if warning:
        notify(f"warning: {warning}")
        hub.log_text(step, "Notices", f"warning: {warning}")
    if rubric is not None:
        scorer.set_rubric(rubric)
        hub.log_text(step, "Rubric/changes", describe_rubric(rubric))
        notify(f"rubric reloaded at step {step}: {rubric.path} (version {rubric.version})")


def audit_due(scorer: Scorer, step: int) -> bool:
    """Whether this step audits the teacher (Teacher/Audit_*, every teacher.audit_every steps)."""
    every = scorer.teacher.cfg.audit_every if scorer.teacher is not None else 0
    return bool(every) and step % every == 0


def stop_requests(step: int, scorer: Scorer, should_stop, world: World) -> tuple[str | None, bool]:
    """(why the run stops after this step, or None; whether that is the teacher budget, which ends
    the run, unlike Ctrl-C, which a resume continues). One rank's reason stops them all, at once."""
    spent, interrupted = scorer.budget_exhausted(), should_stop()
    if world.size > 1:
        any_spent, any_interrupted = world.sum([float(spent is not None), float(interrupted)])
        spent = spent or ("the teacher budget is spent on another rank" if any_spent else None)
        interrupted = any_interrupted > 0
    if spent is not None:
        return f"{spent}; stopped after step {step}", True
    return (f"interrupted; stopped after step {step}" if interrupted else None), False


def held_out_record(cfg: Config, step: int, model, tokenizer, items: list[dict] | None, scorer: Scorer,
                    timer, world: World) -> dict:
    """eval/* scalars of the current weights on the fixed held-out subset, when this step is due
    (every cfg.eval.every steps, and the last); rank 0 alone evaluates."""
    if not (items and cfg.eval.every and (step % cfg.eval.every == 0 or step == cfg.train.steps)):
        return {}
    with timer.time("testing"):  # the seed's name for the validation phase
        result = evaluate_with_config(model, tokenizer, items, scorer, cfg) if world.is_main else None
    return {f"eval/{key}": value for key, value in result.metrics.items()} if result is not None else {}
