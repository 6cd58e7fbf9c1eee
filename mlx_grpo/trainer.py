"""The GRPO training loop: rollout -> score (overlapped) -> advantages -> clipped-surrogate update -> log.

Read `train` top to bottom; every other function here is a small piece it calls.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_map

from mlx_grpo import grpo
from mlx_grpo.checkpoint import load_checkpoint, log_sizes, save_checkpoint
from mlx_grpo.config import Config
from mlx_grpo.data import PromptSampler, build_prompt_tokens
from mlx_grpo.distributed import World
from mlx_grpo.evaluate import evaluate_with_config
from mlx_grpo.forward import checkpoint_blocks
from mlx_grpo.metrics import MetricsHub
from mlx_grpo.metrics.health import HealthConfig, HealthMonitor
from mlx_grpo.metrics.record import (correctness_criterion, criterion_metrics, length_metrics, reward_metrics,
                                     teacher_metrics, timing_per_token)
from mlx_grpo.metrics.system import SystemSampler
from mlx_grpo.metrics.tracker import MetricsTracker
from mlx_grpo.models import adapters_disabled, apply_lora, has_lora, prepare_full_finetune, save_adapters
from mlx_grpo.rewards import RubricWatcher, Scorer, contiguous_groups, describe_rubric
from mlx_grpo.rewards.scoring import RewardBatch
from mlx_grpo.rollout import Rollout, TrainBatch, generate_rollout, to_train_batch


# What a skipped update reports: no loss, no movement, ratios of exactly 1 (and no entropy measured).
NO_UPDATE_STATS = {"loss": 0.0, "policy_loss": 0.0, "kl": 0.0, "ppo_kl": 0.0, "clip_frac": 0.0, "grad_norm": 0.0,
                   "ratio_mean": 1.0, "ratio_std": 0.0, "ratio_p95": 1.0, "log_ratio_mean": 0.0,
                   "log_ratio_std": 0.0, "outside_clip_frac": 0.0}
# Update statistics averaged over the ranks in data-parallel training (grad_norm is global already).
RANK_AVERAGED_STATS = [key for key in NO_UPDATE_STATS if key != "grad_norm"] + ["entropy"]
# Under optim.compile, lengths are padded to multiples of this: every new shape is a new compile.
COMPILE_BUCKET = 32
# Log files in the run directory that a resume truncates back to the checkpoint.
LOG_FILES = ("metrics.jsonl", "batch_metrics.jsonl", "learning.log", "completions.jsonl", "reward_breakdown.jsonl")
# reward_breakdown.jsonl: one compact line per completion, every step.
BREAKDOWN_KEYS = ("step", "prompt_id", "completion", "reward", "valid", "scores")


class TrainingDiverged(RuntimeError):
    """Too many consecutive updates had a non-finite loss or gradient."""


@dataclass
class TrainState:
    step: int = 0
    rewards: list[float] = field(default_factory=list)  # mean reward per step, for the summary
    stop_reason: str | None = None  # set when training ended before cfg.train.steps (e.g. budget spent)
    summary: list[list] = field(default_factory=list)  # per-criterion [name, mean, std, min, max, samples]
    nonfinite_skips: int = 0  # updates skipped for a NaN/inf loss or gradient


def phase_peak_gb() -> float:
    """Peak MLX memory in GiB (as the System/*_GB tags) since the previous call, which starts the
    next phase's measurement."""
    peak = mx.get_peak_memory() / 1024**3
    mx.reset_peak_memory()
    return peak


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    mx.random.seed(seed)


def build_optimizer(cfg: Config) -> optim.Optimizer:
    """AdamW with linear warmup then cosine decay to min_lr_ratio * lr over the run."""
    o = cfg.optim
    decay_steps = max(1, cfg.train.steps - o.warmup_steps)
    schedule = optim.cosine_decay(o.learning_rate, decay_steps, o.learning_rate * o.min_lr_ratio)
    if o.warmup_steps > 0:
        warmup = optim.linear_schedule(o.learning_rate / (o.warmup_steps + 1), o.learning_rate, o.warmup_steps)
        schedule = optim.join_schedules([warmup, schedule], [o.warmup_steps])
    return optim.AdamW(learning_rate=schedule, weight_decay=o.weight_decay, bias_correction=o.bias_correction)


def prepare_trainable(model, cfg: Config) -> dict:
    """Attach LoRA adapters (or unfreeze everything) and return the adapter_config to save."""
    if cfg.optim.grad_checkpoint:
        checkpoint_blocks(model)
    if cfg.lora.fine_tune_type == "full":
        return prepare_full_finetune(model)
    return apply_lora(model, rank=cfg.lora.rank, alpha=cfg.lora.alpha, dropout=cfg.lora.dropout,
                      num_layers=cfg.lora.num_layers, target_modules=cfg.lora.target_modules or None)


def batch_logprobs(model, batch: TrainBatch, cfg: Config, return_entropy: bool = False):
    rows, G = batch.tokens.shape[0], cfg.rollout.group_size
    # Rows come in whole groups that share a prompt: run each prompt once (not under compile,
    # which would need the prompt lengths as constants).
    shared = cfg.grpo.share_prompt_pass and not cfg.optim.compile and G > 1 and rows % G == 0
    return grpo.completion_logprobs(model, batch.tokens, batch.prompt_lengths, batch.mask.shape[1],
                                    chunk_size=cfg.grpo.logprob_chunk_size, return_entropy=return_entropy,
                                    group_size=G if shared else 1)


def reference_logprobs(model, batch: TrainBatch, cfg: Config, base_params) -> mx.array:
    """Log-probs under the reference policy: the base model, without a second copy for LoRA."""
    if has_lora(model):
        with adapters_disabled(model):
            return mx.stop_gradient(batch_logprobs(model, batch, cfg))
    current = model.trainable_parameters()
    model.update(base_params)  # full fine-tune: swap the frozen initial weights in and back
    try:
        return mx.stop_gradient(batch_logprobs(model, batch, cfg))
    finally:
        model.update(current)


def make_loss_fn(cfg: Config):
    g = cfg.grpo

    def loss_fn(model, batch: TrainBatch, advantages, old_logprobs, ref_logprobs):
        # The entropy comes almost free from the logits this pass computes anyway.
        logprobs, entropy = batch_logprobs(model, batch, cfg, return_entropy=True)
        # With one pass (mu = 1) the sampling policy is the current one: ratio == 1, but its
        # gradient is the policy gradient, so the old log-probs are the detached current ones.
        old = mx.stop_gradient(logprobs) if old_logprobs is None else old_logprobs
        loss, stats = grpo.grpo_loss(logprobs, old, advantages, batch.mask, ref_logprobs=ref_logprobs,
                                     beta=g.beta, epsilon=g.epsilon, epsilon_high=g.epsilon_high,
                                     loss_type=g.loss_type, max_completion_length=cfg.rollout.max_new_tokens)
        stats["entropy"] = grpo.masked_mean(mx.stop_gradient(entropy), batch.mask)
        return loss, stats

    return loss_fn


def make_grad_fn(model, cfg: Config):
    """(model, batch, advantages, old, ref) -> ((loss, stats), grads), compiled when optim.compile is set.

    The compiled step takes the model's state (and the random state, for LoRA dropout) as implicit
    inputs and outputs: the weights are then real inputs of the graph rather than constants baked
    into it, which is what keeps LoRA gradients from silently coming out as zero.
    """
    loss_and_grad = nn.value_and_grad(model, make_loss_fn(cfg))
    if not cfg.optim.compile:
        return loss_and_grad
    state = [model.state, mx.random.state]
    compiled = {}  # one compiled step per combination of frozen log-probs given (old, ref)

    def grad_fn(model, batch: TrainBatch, advantages, old, ref):
        given = (old is not None, ref is not None)
        if given not in compiled:
            def step(tokens, prompt_lengths, mask, advantages, *frozen):
                frozen = iter(frozen)
                old, ref = (next(frozen) if has else None for has in given)
                return loss_and_grad(model, TrainBatch(tokens, prompt_lengths, mask, 0), advantages, old, ref)
            compiled[given] = mx.compile(step, inputs=state, outputs=state)
        frozen = [a for a in (old, ref) if a is not None]  # compile takes arrays only, not None
        return compiled[given](batch.tokens, batch.prompt_lengths, batch.mask, advantages, *frozen)

    return grad_fn


def micro_batches(cfg: Config, batch: TrainBatch) -> list[tuple[int, int]]:
    """Row ranges of the grad_accum micro-batches."""
    size = batch.tokens.shape[0] // cfg.optim.grad_accum_steps
    return [(i, i + size) for i in range(0, batch.tokens.shape[0], size)]


def frozen_logprobs(model, cfg: Config, batch: TrainBatch, base_params, sampled=None) -> tuple[list, list]:
    """Old-policy and reference log-probs per micro-batch, fixed before the update starts.

    They depend only on the sampled tokens, so the trainer computes them while the teacher scores.
    sampled: (N, C) log-probs recorded while sampling, for a batch that an earlier policy sampled
    (rollout.pipeline); they are then the old policy, whatever num_iterations is.
    """
    g = cfg.grpo
    ranges = micro_batches(cfg, batch)
    parts = [batch.rows(a, b) for a, b in ranges]
    if sampled is not None:
        old = [sampled[a:b] for a, b in ranges]
    elif g.num_iterations > 1:  # only needed when the weights move between passes
        old = [mx.stop_gradient(batch_logprobs(model, m, cfg)) for m in parts]
    else:
        old = [None] * len(parts)
    ref = [reference_logprobs(model, m, cfg, base_params) for m in parts] if g.beta > 0 else [None] * len(parts)
    mx.eval(old, ref)
    return old, ref


def update_policy(model, optimizer, loss_and_grad, cfg: Config, batch: TrainBatch, advantages, old, ref,
                  world: World = World(), local: bool = True):
    """mu passes over the batch, each an optimizer step over grad_accum micro-batches.

    Data-parallel: each step's gradient is combined over the ranks first. local=False means this
    rank has no scored completion this step; it still takes part, with nothing to add.
    """
    g, accum = cfg.grpo, cfg.optim.grad_accum_steps
    ranges = micro_batches(cfg, batch)
    micro, micro_adv = [batch.rows(a, b) for a, b in ranges], [advantages[a:b] for a, b in ranges]
    weight = grpo.loss_denominator(batch.mask, g.loss_type) if local else 0.0
    model.train()
    totals: dict[str, float] = {}
    grad_norm = mx.array(0.0)
    for _ in range(g.num_iterations):
        if local:
            grads = None
            for m, adv, old_lp, ref_lp in zip(micro, micro_adv, old, ref):
                (loss, stats), step_grads = loss_and_grad(model, m, adv, old_lp, ref_lp)
                grads = step_grads if grads is None else tree_map(mx.add, grads, step_grads)
                stats = {"loss": loss, **stats}
                mx.eval(grads, stats)
                for key, value in stats.items():
                    totals[key] = totals.get(key, 0.0) + value.item() / (accum * g.num_iterations)
            grads = tree_map(lambda x: x / accum, grads)
        else:  # nothing of ours to train: zeros, which the weighted combination gives no weight
            grads = tree_map(mx.zeros_like, model.trainable_parameters())
        grads = world.combine_gradients(grads, weight)
        if cfg.optim.max_grad_norm > 0:
            grads, grad_norm = optim.clip_grad_norm(grads, cfg.optim.max_grad_norm)
        else:
            grad_norm = optim.clip_grad_norm(grads, float("inf"))[1]
        # A NaN/inf anywhere makes the norm non-finite: skip the step rather than poison the weights
        # and the optimizer's moments (every rank decides alike: the norm is global).
        if world.any(not (math.isfinite(grad_norm.item()) and math.isfinite(totals.get("loss", 0.0)))):
            totals["nonfinite"] = True
            break
        optimizer.update(model, grads)
        mx.eval(model.parameters(), optimizer.state)
    model.eval()
    if world.size > 1:  # every rank reports the weighted mean over the ranks
        sums = world.sum([totals.get(key, 0.0) * weight for key in RANK_AVERAGED_STATS] + [weight])
        totals.update({key: value / max(sums[-1], 1e-12) for key, value in zip(RANK_AVERAGED_STATS, sums)})
    totals["grad_norm"] = grad_norm.item()
    return totals


@dataclass
class ScoredRollout:
    """A rollout whose scoring runs in the background."""
    samples: list[dict]
    prompts: list[list[int]]
    rollout: Rollout
    texts: list[str]
    group_samples: list[dict]
    scoring: Future
    score_start: float
    scored_at: list[float]  # filled in when scoring finishes
    late: bool = False  # sampled before the previous update (rollout.pipeline): train it off-policy


def sample_and_score(step: int, cfg: Config, model, tokenizer, samples: list[dict], scorer: Scorer,
                     late: bool = False, rank: int = 0) -> ScoredRollout:
    """Generate G completions per prompt and submit them for scoring (checks in threads, teacher
    requests concurrently). Text is decoded for the rubric only; training uses the sampled ids."""
    # Each step's sampling randomness depends only on (seed, step, rank), so a resumed run draws
    # exactly what the uninterrupted run drew.
    mx.random.seed(cfg.train.seed * 1_000_003 + step + rank * 1_000_000_007)
    G, eos_ids = cfg.rollout.group_size, set(tokenizer.eos_token_ids)
    prompts = [build_prompt_tokens(tokenizer, s, cfg.data.system_prompt or None) for s in samples]
    rollout = generate_rollout(model, prompts, group_size=G, max_new_tokens=cfg.rollout.max_new_tokens,
                               eos_token_ids=eos_ids, temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p)
    return submit_scoring(cfg, tokenizer, samples, prompts, rollout, scorer, late)


def submit_scoring(cfg: Config, tokenizer, samples, prompts, rollout: Rollout, scorer: Scorer, late: bool) -> ScoredRollout:
    G, eos_ids = cfg.rollout.group_size, set(tokenizer.eos_token_ids)
    texts = [tokenizer.decode([t for t in ids if t not in eos_ids]) for ids in rollout.completion_tokens]
    group_samples = [s for s in samples for _ in range(G)]
    score_start = time.perf_counter()
    scoring = scorer.submit(group_samples, texts, contiguous_groups(len(texts), G))
    scored_at: list[float] = []
    scoring.add_done_callback(lambda _: scored_at.append(time.perf_counter()))
    return ScoredRollout(samples, prompts, rollout, texts, group_samples, scoring, score_start, scored_at, late)


def sampled_logprobs(rollout: Rollout, width: int) -> mx.array:
    """(N, width) log-probs recorded while sampling, right-padded with 0 like the train batch's mask."""
    return mx.array([lp + [0.0] * (width - len(lp)) for lp in rollout.logprobs], dtype=mx.float32)


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
        summary = describe_rubric(rubric)
        hub.log_text(step, "Rubric/changes", summary)
        notify(f"rubric reloaded at step {step}: {rubric.path} (version {rubric.version})")


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


def train(cfg: Config, run_dir: Path, items: list[dict], scorer: Scorer, model, tokenizer,
          hub: MetricsHub, progress=None, watcher: RubricWatcher | None = None, notify=print,
          resume: Path | None = None, should_stop=lambda: False, world: World = World(),
          eval_items: list[dict] | None = None) -> TrainState:
    """Run GRPO steps up to cfg.train.steps; adapters are saved into run_dir, also when a step fails.

    `scorer` holds the rubric (and its teacher); `watcher`, if given, hot-reloads the rubric file.
    `resume` is a checkpoint directory to continue from. Training stops early, cleanly, with a
    checkpoint, when the teacher's budget is spent or `should_stop()` turns true (Ctrl-C);
    state.stop_reason says why. `world`: this process's rank in data-parallel training (only
    rank 0 writes to run_dir). `eval_items`: held-out prompts scored every cfg.eval.every steps.
    """
    seed_everything(cfg.train.seed)
    adapter_config = prepare_trainable(model, cfg)
    base_params = None
    if cfg.grpo.beta > 0 and not has_lora(model):
        base_params = tree_map(lambda p: mx.array(p), model.trainable_parameters())
    optimizer = build_optimizer(cfg)
    loss_and_grad = make_grad_fn(model, cfg)
    sampler = PromptSampler(items, seed=cfg.train.seed)
    B, G = cfg.rollout.batch_size, cfg.rollout.group_size
    state = TrainState()
    prompts_per_epoch = cfg.data.epoch_size or len(items)
    global_prompts = B * world.size  # each step's prompts over all ranks

    def next_prompts() -> list[dict]:
        """This rank's B of the step's global batch (every rank's sampler draws the same one)."""
        return world.shard(sampler.next_batch(global_prompts))

    tracker = MetricsTracker(rubric_name=scorer.rubric.name, group_size=G, prompts_per_epoch=prompts_per_epoch,
                             histogram_every=cfg.logging.histogram_every,
                             correct_criterion=correctness_criterion(cfg.logging.correct_criterion, scorer.rubric),
                             correct_threshold=cfg.logging.correct_threshold)
    # Judged over several steps: with one prompt per step a single step says little.
    health = HealthMonitor(HealthConfig(zero_std_window=5, flat_reward_window=10, warmup_steps=cfg.optim.warmup_steps))
    system_stats = SystemSampler(cfg.logging.system_interval_s).start()
    first_step, elapsed_before, nonfinite_run, saved_step, save_time = 1, 0.0, 0, 0, 0.0
    upcoming: ScoredRollout | None = None  # rollout.pipeline: the next step's batch, sampled early
    run_complete = False  # the last step (or the budget's) is done: time for the final summary
    if resume is not None:
        saved = load_checkpoint(resume, model, optimizer)
        sampler.load_state_dict(saved["sampler"])
        tracker, health, state.rewards = saved["tracker"], saved["health"], saved["rewards"]
        scorer.restore_usage(saved["teacher_usage"], saved["teacher_latencies"])
        random.setstate(saved["python_random"])
        np.random.set_state(saved["numpy_random"])
        saved_step = saved["step"]
        first_step = saved_step + 1
        elapsed_before, nonfinite_run, state.nonfinite_skips = saved["elapsed_s"], saved["nonfinite_run"], saved["nonfinite_skips"]
        state.step = saved["step"]
        if saved.get("upcoming"):  # sampled before the checkpoint; its scoring is redone
            up = saved["upcoming"]
            upcoming = submit_scoring(cfg, tokenizer, up["samples"], up["prompts"], up["rollout"], scorer, late=True)
    # Only rank 0 writes files; the other ranks' lines go nowhere.
    completions_log = open(run_dir / "completions.jsonl" if world.is_main else os.devnull, "a", encoding="utf-8")
    breakdown_log = open(run_dir / "reward_breakdown.jsonl" if world.is_main else os.devnull, "a", encoding="utf-8")
    start_time = time.perf_counter() - elapsed_before

    def checkpoint(step: int) -> float:
        """Save checkpoint `step` (after its logs are written, so their sizes include it)."""
        if not world.is_main:
            return 0.0
        begin = time.perf_counter()
        save_adapters(model, run_dir, adapter_config)
        save_checkpoint(run_dir, step, model, optimizer, keep=cfg.train.keep_checkpoints, state={
            "sampler": sampler.state_dict(), "tracker": tracker, "health": health, "rewards": state.rewards,
            "teacher_usage": scorer.usage, "teacher_latencies": scorer.latencies,
            "python_random": random.getstate(), "numpy_random": np.random.get_state(),
            "elapsed_s": time.perf_counter() - start_time, "nonfinite_run": nonfinite_run,
            "nonfinite_skips": state.nonfinite_skips, "rubric_version": scorer.rubric.version,
            "teacher_cache": str(scorer.cache.path) if scorer.cache is not None else None,
            "upcoming": None if upcoming is None else {
                "samples": upcoming.samples, "prompts": upcoming.prompts, "rollout": upcoming.rollout},
            "log_sizes": log_sizes([run_dir / name for name in LOG_FILES])})
        return time.perf_counter() - begin

    try:
        for step in range(first_step, cfg.train.steps + 1):
            step_start = time.perf_counter()
            phase_peak_gb()  # each phase's peak memory is measured from here
            reload_rubric(watcher, scorer, hub, step, notify)
            usage_before = scorer.usage

            # 1-2. Rollout: B prompts x G samples, all decoded together, then scored in the
            # background. With rollout.pipeline this batch was sampled during the previous step.
            if upcoming is None:
                current = sample_and_score(step, cfg, model, tokenizer, next_prompts(), scorer, rank=world.rank)
            else:
                current, upcoming = upcoming, None
            rollout, prompts = current.rollout, current.prompts
            texts, group_samples = current.texts, current.group_samples
            gen_time = rollout.generation_time_s if not current.late else 0.0  # this step's sampling

            # 3. Meanwhile: the train batch and the log-probs the update needs that do not depend on
            # rewards, and (pipeline) the next batch, sampled by the weights before this update.
            if cfg.rollout.pipeline and step < cfg.train.steps:
                upcoming = sample_and_score(step + 1, cfg, model, tokenizer, next_prompts(), scorer, late=True,
                                            rank=world.rank)
                gen_time += upcoming.rollout.generation_time_s
            peaks = {"rollout": phase_peak_gb()}
            batch = to_train_batch(rollout, mask_truncated=cfg.grpo.mask_truncated,
                                   pad_to=COMPILE_BUCKET if cfg.optim.compile else 1)
            ref_start = time.perf_counter()
            sampled = sampled_logprobs(rollout, batch.mask.shape[1]) if current.late else None
            old_logprobs, ref_logprobs = frozen_logprobs(model, cfg, batch, base_params, sampled)
            ref_time = time.perf_counter() - ref_start
            peaks["logprobs"] = phase_peak_gb()
            wait_start = time.perf_counter()
            scored = current.scoring.result()
            reward_wait = time.perf_counter() - wait_start
            scorer.check_failures()  # raises TeacherUnavailable when too many recent scores failed

            # 4. Advantages, relative within each prompt's group; masked rows get none and no loss.
            adv_start = time.perf_counter()
            advantages = grpo.group_advantages(mx.array(scored.rewards), G, scale=cfg.grpo.scale_rewards,
                                               valid=mx.array(scored.valid))
            if not scored.valid.all():
                batch = batch.keep_rows(scored.valid)
            # Ranks agree: any signal anywhere means every rank joins the update.
            has_signal = world.any((cfg.grpo.beta > 0 and scored.valid.any()) or mx.any(advantages != 0).item())
            adv_time = time.perf_counter() - adv_start

            # 5. Update: clipped surrogate against the sampling policy, optional KL to the base model.
            # A batch where every group scored alike carries no signal; stepping AdamW on its zero
            # gradient would still move the weights along stale momentum, so skip it.
            update_start = time.perf_counter()
            stats = update_policy(model, optimizer, loss_and_grad, cfg, batch, advantages, old_logprobs, ref_logprobs,
                                  world, local=bool(scored.valid.any())) if has_signal else dict(NO_UPDATE_STATS)
            update_time = time.perf_counter() - update_start
            peaks["update"] = phase_peak_gb()

            if stats.get("nonfinite"):
                nonfinite_run += 1
                state.nonfinite_skips += 1
                notify(f"warning: step {step}: non-finite loss or gradient; the update was skipped "
                       f"({nonfinite_run} in a row)")
                if nonfinite_run >= cfg.train.max_nonfinite_skips:
                    raise TrainingDiverged(
                        f"{nonfinite_run} updates in a row had a NaN/inf loss or gradient (train.max_nonfinite_skips); "
                        "lower optim.learning_rate or check the rubric's rewards")
            else:
                nonfinite_run = 0

            # 6. Log one record, of the whole global batch: every rank's completions are gathered
            # (every rank computes the same record; rank 0's sinks write it).
            state.step = step
            timings = {"gen": gen_time, "ref": ref_time, "adv": adv_time,
                       "reward": (current.scored_at[0] if current.scored_at else wait_start + reward_wait)
                       - current.score_start,
                       "update_actor": update_time, "save_checkpoint": save_time}  # the latest save
            gen_speed, backprop_speed = world.sum([rollout.tokens_per_sec, batch.num_tokens * cfg.grpo.num_iterations
                                                   / update_time if has_signal else 0.0])  # tokens/s of all ranks
            backprop_speed = backprop_speed if has_signal else None
            seen = gather_step(world, scored, rollout, prompts, np.array(advantages))
            eval_record = {}
            if eval_items and cfg.eval.every and (step % cfg.eval.every == 0 or step == cfg.train.steps):
                eval_record = held_out_record(cfg, model, tokenizer, eval_items, scorer) if world.is_main else {}
                timings["eval"] = eval_record.pop("timing_s/eval", 0.0)
            step_time = time.perf_counter() - step_start
            record = step_record(cfg, step, stats, seen.scored, scorer, seen.finish_reasons, seen.lengths,
                                 seen.prompt_lengths, seen.advantages, optimizer)
            record.update(eval_record)
            record.update(timing_records(timings, reward_wait, step_time, rollout, batch.num_tokens))
            record["time/elapsed_s"] = time.perf_counter() - start_time
            record["health/nonfinite_skips"] = float(state.nonfinite_skips)
            record["epoch"] = step * global_prompts / prompts_per_epoch  # the same epochs as Epoch/*
            usage = scorer.usage
            if scorer.teacher is not None or usage.requests:
                record.update(teacher_metrics(usage.since(usage_before), usage, scorer.latencies))
            if step % cfg.logging.performance_every == 0 or step == 1:  # "every N batches", as in the seed
                record["Performance/Generation_TokensPerSec"] = gen_speed
                record["Performance/Generation_Time"] = rollout.generation_time_s
            if backprop_speed is not None:  # a skipped update measured no backprop speed
                record["Performance/Backprop_TokensPerSec"] = backprop_speed
            record.update(tracker.update(step, record, seen.scored, global_prompts, gen_speed, backprop_speed,
                                         seen.truncated, seen.lengths))
            busy = gen_time + ref_time + update_time  # seconds MLX computed this step
            record.update(system_stats.snapshot(busy_s=busy, wall_s=step_time))
            record.update({f"memory/peak_{phase}_gb": gb for phase, gb in peaks.items()})
            record["System/GPU_Memory_Peak_GB"] = max(peaks.values())  # this step's peak (reset per phase)
            health_scalars, warnings = health.update(step, record)
            record.update(health_scalars)
            spent, interrupted = scorer.budget_exhausted(), should_stop()
            if world.size > 1:  # one rank's reason to stop stops them all, at the same step
                any_spent, any_interrupted = world.sum([float(spent is not None), float(interrupted)])
                spent = spent or ("the teacher budget is spent on another rank" if any_spent else None)
                interrupted = any_interrupted > 0
            run_complete = step == cfg.train.steps or spent is not None  # (an interrupted run is resumed)
            if run_complete:
                record.update(tracker.close_epoch())  # the last, partial epoch: short runs get Epoch/* too
            hub.log(step, record)
            for warning in warnings:
                notify(f"health: {warning}")
                hub.log_text(step, "health/warnings", warning)

            state.rewards.append(record["Train/AvgReward"])
            rows = completion_rows(step, group_samples, texts, scored)
            for row in rows:
                breakdown_log.write(json.dumps({k: row[k] for k in BREAKDOWN_KEYS if k in row}) + "\n")
            breakdown_log.flush()
            if cfg.logging.sample_every and (step % cfg.logging.sample_every == 0 or step == 1):
                for row in rows:
                    completions_log.write(json.dumps(row) + "\n")
                completions_log.flush()
                hub.log_text(step, "Samples/completions", samples_markdown(rows[:G]))
            if progress is not None:
                progress(step, record)
            if spent is not None:
                state.stop_reason = f"{spent}; stopped after step {step}"
                hub.log_text(step, "Notices", state.stop_reason)
            elif interrupted:
                state.stop_reason = f"interrupted; stopped after step {step}"
            last = step == cfg.train.steps or state.stop_reason is not None
            if last or (cfg.train.save_every and step % cfg.train.save_every == 0):
                save_time = checkpoint(step)
                saved_step = step
            if state.stop_reason is not None:
                notify(state.stop_reason)
                break
    finally:
        # Whatever ends the loop (done, budget, teacher down, a crash), the trained weights are kept.
        system_stats.stop()
        if state.step > saved_step and state.step >= first_step and world.is_main:
            save_adapters(model, run_dir, adapter_config)
        if run_complete and world.is_main:
            final, table = tracker.finish()
            hub.log_summary(state.step, final, table)
            (run_dir / "summary.json").write_text(json.dumps({"step": state.step, **final, "criteria": [
                dict(zip(("criterion", "mean", "std", "min", "max", "samples"), row)) for row in table]}, indent=1))
            state.summary = table
        completions_log.close()
        breakdown_log.close()
    return state


def step_record(cfg: Config, step: int, stats: dict, scored, scorer: Scorer, finish_reasons: list[str],
                lengths: np.ndarray, prompt_lengths: list[int], advantages: np.ndarray, optimizer) -> dict:
    """The step's own metrics (everything that needs no history), named as in the seed references."""
    G = cfg.rollout.group_size
    lr = optimizer.learning_rate.item() if isinstance(optimizer.learning_rate, mx.array) else optimizer.learning_rate
    adv = advantages[scored.valid] if scored.valid.any() else np.zeros(1)
    record = {
        "Train/Loss": stats["loss"],
        "Train/PolicyLoss": stats["policy_loss"],
        "Train/KLPenalty": cfg.grpo.beta * stats["kl"],
        **reward_metrics(scored.rewards, scored.valid, G),
        **criterion_metrics(scorer.rubric.criteria, scored.criterion_scores, scored.valid),
        **length_metrics(lengths.tolist(), prompt_lengths, finish_reasons, cfg.rollout.max_new_tokens),
        "actor/update_skipped": float("entropy" not in stats),
        "actor/pg_loss": stats["policy_loss"],
        "actor/grad_norm": stats["grad_norm"],
        "actor/lr": float(lr),
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
    }
    if "entropy" in stats:  # measured by the update's forward pass; a skipped update has none
        record["actor/entropy_loss"] = stats["entropy"]
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


def gather_step(world: World, scored: RewardBatch, rollout: Rollout, prompts: list[list[int]],
                advantages: np.ndarray) -> StepView:
    """This rank's completions, or with several ranks all of them (rank 0's first)."""
    names = sorted(scored.criterion_scores)
    columns = world.gather(np.stack([scored.rewards, scored.valid, *(scored.criterion_scores[n] for n in names),
                                     [len(c) for c in rollout.completion_tokens], rollout.truncated,
                                     advantages], axis=1).astype(np.float32))
    rewards, valid, *criteria, lengths, truncated, adv = columns.T
    gathered = RewardBatch(rewards=rewards, criterion_scores=dict(zip(names, criteria)), valid=valid.astype(bool),
                           justifications=scored.justifications)
    prompt_lengths = world.gather(np.array([len(p) for p in prompts], dtype=np.float32)).astype(int).tolist()
    truncated = truncated.astype(bool)
    return StepView(gathered, lengths.astype(int), truncated, ["length" if t else "stop" for t in truncated],
                    prompt_lengths, adv)


def held_out_record(cfg: Config, model, tokenizer, items: list[dict], scorer: Scorer) -> dict:
    """eval/* scalars of the current weights on the fixed held-out subset."""
    result = evaluate_with_config(model, tokenizer, items, scorer, cfg)
    return {**{f"eval/{key}": value for key, value in result.metrics.items()}, "timing_s/eval": result.seconds}


def timing_records(timings: dict[str, float], reward_wait: float, step_time: float, rollout, num_tokens: int) -> dict:
    record = {f"timing_s/{phase}": seconds for phase, seconds in timings.items()}
    record["timing_s/reward_wait"] = reward_wait  # the part of scoring nothing else overlapped
    record["timing_s/step"] = step_time
    record.update(timing_per_token(timings, rollout.num_generated_tokens, num_tokens))
    return record


def samples_markdown(rows: list[dict]) -> str:
    """A few completions of one prompt with their scores, for TensorBoard's Text tab."""
    parts = [f"**Prompt** ({rows[0]['prompt_id']}): {rows[0]['prompt']}"]
    for i, row in enumerate(rows, start=1):
        reward = "masked" if row["reward"] is None else f"{row['reward']:.3f}"
        scores = ", ".join(f"{k} {'-' if v is None else f'{v:.2f}'}" for k, v in row["scores"].items())
        parts.append(f"**{i}.** reward {reward} ({scores})\n\n```\n{row['completion']}\n```")
    return "\n\n".join(parts)
