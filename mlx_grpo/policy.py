"""The policy being trained: the model with its adapters, AdamW, the loss and its gradient, and
the reference policy that the KL penalty holds it to.

`Policy.frozen_logprobs` computes what the update needs that does not depend on rewards (the
old-policy and reference log-probs); `Policy.update` takes the clipped-surrogate steps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_map

from mlx_grpo import grpo
from mlx_grpo.config import Config
from mlx_grpo.distributed import World
from mlx_grpo.forward import FAST_PATH, LogprobPath, check_logprob_path, checkpoint_blocks, completion_logprobs
from mlx_grpo.adapters import adapters_disabled, apply_lora, has_lora, prepare_full_finetune, save_adapters
from mlx_grpo.rollout import TrainBatch

# What a skipped update reports: no loss, no movement, ratios of exactly 1 (and no entropy measured).
NO_UPDATE_STATS = {"loss": 0.0, "policy_loss": 0.0, "kl": 0.0, "ppo_kl": 0.0, "clip_frac": 0.0, "grad_norm": 0.0,
                   "ratio_mean": 1.0, "ratio_std": 0.0, "ratio_p95": 1.0, "log_ratio_mean": 0.0,
                   "log_ratio_std": 0.0, "outside_clip_frac": 0.0}
# Update statistics averaged over the ranks in data-parallel training (grad_norm is global already).
RANK_AVERAGED_STATS = [key for key in NO_UPDATE_STATS if key != "grad_norm"] + ["entropy"]
# Under optim.compile, lengths are padded to multiples of this: every new shape is a new compile.
COMPILE_BUCKET = 32


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


LOGPROB_CHUNK = 64  # completion positions per log-prob chunk: bounds the (rows, chunk, vocab) logits


def batch_logprobs(model, batch: TrainBatch, cfg: Config, return_entropy: bool = False,
                   return_varentropy: bool = False, path: LogprobPath = FAST_PATH):
    rows, G = batch.tokens.shape[0], cfg.rollout.group_size
    # Rows come in whole groups that share a prompt: run each prompt once (not under compile,
    # which would need the prompt lengths as constants).
    shared = cfg.grpo.share_prompt_pass and not cfg.optim.compile and G > 1 and rows % G == 0
    return completion_logprobs(model, batch.tokens, batch.prompt_lengths, batch.mask.shape[1],
                               chunk_size=LOGPROB_CHUNK, return_entropy=return_entropy,
                               return_varentropy=return_varentropy, group_size=G if shared else 1, path=path)


def reference_logprobs(model, batch: TrainBatch, cfg: Config, path: LogprobPath, base_params) -> mx.array:
    """Log-probs under the reference policy: the base model, without a second copy for LoRA."""
    if has_lora(model):
        with adapters_disabled(model):
            return mx.stop_gradient(batch_logprobs(model, batch, cfg, path=path))
    current = model.trainable_parameters()
    model.update(base_params)  # full fine-tune: swap the frozen initial weights in and back
    try:
        return mx.stop_gradient(batch_logprobs(model, batch, cfg, path=path))
    finally:
        model.update(current)


def make_loss_fn(cfg: Config, path: LogprobPath = FAST_PATH):
    g = cfg.grpo

    def loss_fn(model, batch: TrainBatch, advantages, old_logprobs, ref_logprobs):
        # The entropy comes almost free from the logits this pass computes anyway.
        logprobs, entropy = batch_logprobs(model, batch, cfg, return_entropy=True, path=path)
        # With one pass (mu = 1) the sampling policy is the current one: ratio == 1, but its
        # gradient is the policy gradient, so the old log-probs are the detached current ones.
        old = mx.stop_gradient(logprobs) if old_logprobs is None else old_logprobs
        forking = None
        if g.top_entropy_quantile < 1:
            forking = grpo.top_entropy_mask(mx.stop_gradient(entropy), batch.mask, g.top_entropy_quantile)
        loss, stats = grpo.grpo_loss(logprobs, old, advantages, batch.mask, ref_logprobs=ref_logprobs,
                                     beta=g.beta, epsilon=g.epsilon, epsilon_high=g.epsilon_high,
                                     loss_type=g.loss_type, max_completion_length=cfg.rollout.max_new_tokens,
                                     importance_sampling_level=g.importance_sampling_level, policy_mask=forking)
        stats["entropy"] = grpo.masked_mean(mx.stop_gradient(entropy), batch.mask)
        stats["token_logprobs"] = mx.stop_gradient(logprobs)  # for the sampler gap; not averaged
        if ref_logprobs is not None:
            stats["ref_logprobs"] = grpo.masked_mean(mx.stop_gradient(ref_logprobs), batch.mask)
        return loss, stats

    return loss_fn


def make_grad_fn(model, cfg: Config, path: LogprobPath = FAST_PATH):
    """(model, batch, advantages, old, ref) -> ((loss, stats), grads), compiled when optim.compile is set.

    The compiled step takes the model's state (and the random state, for LoRA dropout) as implicit
    inputs and outputs: the weights are then real inputs of the graph rather than constants baked
    into it, which is what keeps LoRA gradients from silently coming out as zero.
    """
    loss_and_grad = nn.value_and_grad(model, make_loss_fn(cfg, path))
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


@dataclass
class OffPolicyWeights:
    """grpo.tis_cap: (N, C) truncated importance weights for a batch that older weights sampled."""
    weights: mx.array
    stats: dict[str, float]


def frozen_logprobs(model, cfg: Config, path: LogprobPath, batch: TrainBatch, base_params,
                    sampled=None) -> tuple[list, list, OffPolicyWeights | None]:
    """Old-policy and reference log-probs per micro-batch, fixed before the update starts, and
    the off-policy weights of a late batch when grpo.tis_cap is on (else None).

    They depend only on the sampled tokens, so the trainer computes them while the teacher scores.
    sampled: (N, C) log-probs recorded while sampling, for a batch that an earlier policy sampled
    (rollout.pipeline); they are then the old policy, whatever num_iterations is, unless
    grpo.tis_cap is on: the old policy is then the current weights, and the weights correct for them.
    """
    g = cfg.grpo
    ranges = micro_batches(cfg, batch)
    parts = [batch.rows(a, b) for a, b in ranges]
    off_policy = None
    if sampled is not None and g.tis_cap == 0:
        old = [sampled[a:b] for a, b in ranges]
    elif sampled is not None or g.num_iterations > 1:  # only needed when the weights move between passes
        old = [mx.stop_gradient(batch_logprobs(model, m, cfg, path=path)) for m in parts]
    else:
        old = [None] * len(parts)
    if sampled is not None and g.tis_cap > 0:
        weights, stats = grpo.truncated_importance_weights(mx.concatenate(old), sampled, batch.mask, g.tis_cap)
        mx.eval(weights, stats)
        off_policy = OffPolicyWeights(weights, {key: value.item() for key, value in stats.items()})
    ref = [reference_logprobs(model, m, cfg, path, base_params) for m in parts] if g.beta > 0 else [None] * len(parts)
    mx.eval(old, ref)
    return old, ref, off_policy


def update_policy(model, optimizer, loss_and_grad, cfg: Config, batch: TrainBatch, advantages, old, ref,
                  world: World = World(), local: bool = True, sampled: mx.array | None = None):
    """mu passes over the batch, each an optimizer step over grad_accum micro-batches.

    Data-parallel: each step's gradient is combined over the ranks first. local=False means this
    rank has no scored completion this step; it still takes part, with nothing to add.
    sampled: the sampler's (N, C) log-probs of the batch; the first pass's own log-probs, taken
    before any weight moves, then give the sampler gap (training/rollout_*) at no extra cost.
    """
    g, accum = cfg.grpo, cfg.optim.grad_accum_steps
    ranges = micro_batches(cfg, batch)
    micro, micro_adv = [batch.rows(a, b) for a, b in ranges], [advantages[a:b] for a, b in ranges]
    weight = grpo.loss_denominator(batch.mask, g.loss_type) if local else 0.0
    model.train()
    totals: dict[str, float] = {}
    first_pass = []  # the trainer's log-probs at the sampling weights, per micro-batch
    grad_norm = mx.array(0.0)
    skipped = False
    for iteration in range(g.num_iterations):
        if local:
            grads = None
            for m, adv, old_lp, ref_lp in zip(micro, micro_adv, old, ref):
                (loss, stats), step_grads = loss_and_grad(model, m, adv, old_lp, ref_lp)
                token_logprobs = stats.pop("token_logprobs")
                if iteration == 0:
                    first_pass.append(token_logprobs)
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
            skipped = iteration == 0  # no optimizer step was taken at all
            break
        optimizer.update(model, grads)
        mx.eval(model.parameters(), optimizer.state)
    model.eval()
    if sampled is not None and first_pass:
        totals.update(grpo.rollout_logprob_gap(mx.concatenate(first_pass), sampled, batch.mask))
    if world.size > 1:  # every rank reports the weighted mean over the ranks
        sums = world.sum([totals.get(key, 0.0) * weight for key in RANK_AVERAGED_STATS] + [weight])
        totals.update({key: value / max(sums[-1], 1e-12) for key, value in zip(RANK_AVERAGED_STATS, sums)})
    totals["grad_norm"] = grad_norm.item()
    totals["skipped"] = skipped
    return totals


class Policy:
    """The model, its optimizer and its loss; and the base weights when a full fine-tune needs them
    as the reference (with LoRA the reference is the model with its adapters switched off)."""

    def __init__(self, model, cfg: Config, world: World = World()):
        self.model, self.cfg, self.world = model, cfg, world
        self.adapter_config = prepare_trainable(model, cfg)
        # Which fast log-prob paths reproduce the model's own forward, checked as it will train.
        self.logprob_path = check_logprob_path(model)
        self.base_params = None
        if cfg.grpo.beta > 0 and not has_lora(model):
            self.base_params = tree_map(lambda p: mx.array(p), model.trainable_parameters())
        self.optimizer = build_optimizer(cfg)
        self.loss_and_grad = make_grad_fn(model, cfg, self.logprob_path)

    def frozen_logprobs(self, batch: TrainBatch, sampled=None) -> tuple[list, list, OffPolicyWeights | None]:
        return frozen_logprobs(self.model, self.cfg, self.logprob_path, batch, self.base_params, sampled)

    def update(self, batch: TrainBatch, advantages, old, ref, local: bool = True,
               off_policy: OffPolicyWeights | None = None, sampled: mx.array | None = None) -> dict:
        """The update's statistics; given the sampler's log-probs of an on-policy batch, also its
        sampler gap (training/rollout_*), measured before the weights move."""
        gap = {}
        if sampled is not None and (old[0] is not None or self.cfg.lora.dropout > 0):
            # The frozen pass has them already; or the first pass runs with dropout, unlike the sampler.
            gap, sampled = self.sampler_gap(batch, sampled, old), None
        if off_policy is not None:  # per-token advantages: each token's weight folded in
            advantages = off_policy.weights * advantages.reshape(-1, 1)
        stats = update_policy(self.model, self.optimizer, self.loss_and_grad, self.cfg, batch, advantages, old, ref,
                              self.world, local, sampled)
        return {**stats, **gap, **(off_policy.stats if off_policy is not None else {})}

    def skipped_update(self, batch: TrainBatch, sampled: mx.array | None = None) -> dict:
        """What a step without an update reports (NO_UPDATE_STATS), and the batch's sampler gap."""
        return {**NO_UPDATE_STATS, "skipped": True,
                **(self.sampler_gap(batch, sampled, [None]) if sampled is not None else {})}

    def token_entropy(self, batch: TrainBatch) -> tuple[mx.array, mx.array]:
        """(N, C) entropy and varentropy of each completion position under the current weights."""
        _, entropy, varentropy = batch_logprobs(self.model, batch, self.cfg, return_varentropy=True,
                                                 path=self.logprob_path)
        mx.eval(entropy, varentropy)
        return entropy, varentropy

    def sampler_gap(self, batch: TrainBatch, sampled: mx.array, old: list) -> dict[str, float]:
        """training/rollout_* : the trainer's log-probs of the batch against the sampler's, at the
        weights that sampled it (call before the update). The frozen old-policy log-probs are reused
        when they were computed; otherwise this is one forward pass without gradients."""
        if any(o is None for o in old):
            trainer = mx.concatenate([mx.stop_gradient(batch_logprobs(self.model, batch.rows(a, b), self.cfg,
                                                                      path=self.logprob_path))
                                      for a, b in micro_batches(self.cfg, batch)])
        else:
            trainer = mx.concatenate(old)
        return grpo.rollout_logprob_gap(trainer, sampled, batch.mask)

    @property
    def learning_rate(self) -> float:
        lr = self.optimizer.learning_rate
        return float(lr.item() if isinstance(lr, mx.array) else lr)

    def save_adapters(self, run_dir: Path) -> None:
        save_adapters(self.model, run_dir, self.adapter_config)
