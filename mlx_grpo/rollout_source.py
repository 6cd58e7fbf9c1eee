"""Where each step's completions come from: the prompt sampler, this rank's share of the global
batch, generation, scoring in the background, (rollout.pipeline) the next batch sampled early, and
(rollout.dynamic_sampling) further batches until enough groups have a reward spread.
"""

from __future__ import annotations

import random
import time
from concurrent.futures import Future
from dataclasses import asdict, dataclass, field, replace

import mlx.core as mx
import numpy as np

from mlx_grpo.adaptive_window import AdaptiveWindow
from mlx_grpo.config import Config
from mlx_grpo.curriculum import Curriculum, difficulty_levels
from mlx_grpo.data import PromptSampler, build_prompt_tokens
from mlx_grpo.distributed import World
from mlx_grpo.grpo import zero_std_groups
from mlx_grpo.rewards import Scorer, contiguous_groups
from mlx_grpo.rollout import Rollout, generate_rollout
from mlx_grpo.rows import take_rows
from mlx_grpo.sgrpo import serial_group_rollout


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
    explored: bool = False  # rollout.adaptive_window: sampled at the full max_new_tokens to explore
    sampling_record: dict = field(default_factory=dict)  # rollout.dynamic_sampling's dynamic_sampling/* counts
    sampler_gap: dict = field(default_factory=dict)  # a late batch's training/rollout_*, measured when sampled

    @property
    def scoring_time(self) -> float:
        """Seconds from submission until the scores were ready (call after the result)."""
        return (self.scored_at[0] if self.scored_at else time.perf_counter()) - self.score_start

    def sampled_logprobs(self, width: int) -> mx.array:
        """(N, width) log-probs recorded while sampling, right-padded with 0 like the train batch's mask."""
        return mx.array([lp + [0.0] * (width - len(lp)) for lp in self.rollout.logprobs], dtype=mx.float32)


class RolloutSource:
    """Generates each step's B x G completions and submits them for scoring.

    Every rank's sampler draws the same global batch of B * world.size prompts; each rank takes its
    own B. With rollout.pipeline, `prefetch` samples the next step's batch before this step's
    update, so that the teacher scores it while the update runs. `adapt` lets the step's results
    steer what comes next: the curriculum's level (data.curriculum) and the generation window
    (rollout.adaptive_window). Every rank adapts alike: it sees every rank's results.
    """

    def __init__(self, cfg: Config, items: list[dict], model, tokenizer, scorer: Scorer, world: World = World()):
        self.cfg, self.model, self.tokenizer, self.scorer, self.world = cfg, model, tokenizer, scorer, world
        d, r = cfg.data, cfg.rollout
        self.levels = difficulty_levels(items)  # for difficulty/*, easiest first
        self.sampler = (Curriculum(items, cfg.train.seed, d.curriculum_threshold)
                        if d.curriculum else PromptSampler(items, seed=cfg.train.seed))
        self.window = AdaptiveWindow(cfg.train.seed, r.max_new_tokens) if r.adaptive_window else None
        self.upcoming: ScoredRollout | None = None

    def take(self, step: int) -> ScoredRollout:
        """This step's batch: sampled now, or the one prefetched during the previous step."""
        if self.upcoming is None:
            return self._sample_with_spread(step) if self.cfg.rollout.dynamic_sampling else self._sample(step, late=False)
        current, self.upcoming = self.upcoming, None
        return current

    def prefetch(self, step: int) -> float:
        """rollout.pipeline: sample step + 1's batch now; returns its generation seconds."""
        if not self.cfg.rollout.pipeline or step >= self.cfg.train.steps:
            return 0.0
        self.upcoming = self._sample(step + 1, late=True)
        return self.upcoming.rollout.generation_time_s

    def _sample_with_spread(self, step: int) -> ScoredRollout:
        """rollout.dynamic_sampling: draw batches of B prompts, waiting for their scores, until B groups
        have a reward spread or max_resample_batches were drawn; every rank draws as many batches, so
        each contributes exactly B groups. Short of B, dropped groups (advantage 0) fill the rest."""
        B, G, r = self.cfg.rollout.batch_size, self.cfg.rollout.group_size, self.cfg.rollout
        drawn, kept, dropped = [], [], []  # drawn: (batch, its scores); kept/dropped: (batch index, group)
        for attempt in range(r.max_resample_batches):
            batch = self._sample(step, late=False, attempt=attempt)
            scores = batch.scoring.result()
            drawn.append((batch, scores))
            flat = np.array(zero_std_groups(mx.array(np.nan_to_num(scores.rewards)), G, mx.array(scores.valid)))
            for g, no_spread in enumerate(flat.tolist()):
                (dropped if no_spread else kept).append((attempt, g))
            if not self.world.any(len(kept) < B):
                break
        chosen = (kept + dropped)[:B]
        totals = self.world.sum([len(drawn), len(drawn) * B, len(dropped), min(len(kept), B)])
        merged = _merge_groups(drawn, chosen, G)
        merged.sampling_record = {"dynamic_sampling/batches_drawn": totals[0] / self.world.size,
                                  "dynamic_sampling/groups_drawn": totals[1], "dynamic_sampling/groups_dropped": totals[2],
                                  "dynamic_sampling/groups_with_spread": totals[3]}
        return merged

    def _sample(self, step: int, late: bool, attempt: int = 0) -> ScoredRollout:
        """Generate G completions per prompt and submit them for scoring (checks in threads, teacher
        requests concurrently). Text is decoded for the rubric only; training uses the sampled ids."""
        samples = self.world.shard(self.sampler.next_batch(self.cfg.rollout.batch_size * self.world.size))
        r = self.cfg.rollout
        budget, explored = self.window.window_for(step) if self.window else (r.max_new_tokens, False)
        generate = generate_rollout
        if r.sgrpo:
            rng = random.Random(f"sgrpo:{self.cfg.train.seed}:{step}:{self.world.rank}")  # the exits; resume-exact

            def generate(model, prompts, **sample):
                return serial_group_rollout(model, self.tokenizer, prompts, **sample, rng=rng,
                                            answer_tokens=r.sgrpo_answer_tokens)
        # Each step's sampling randomness depends only on (seed, step, rank), so a resumed run draws
        # exactly what the uninterrupted run drew; `attempt` counts dynamic sampling's further batches.
        seed = self.cfg.train.seed * 1_000_003 + step + self.world.rank * 1_000_000_007 + attempt * 10_000_000_019
        scored = sample_and_score(self.model, self.tokenizer, self.scorer, samples, seed=seed, group_size=r.group_size,
                                  max_new_tokens=budget, temperature=r.temperature, top_p=r.top_p,
                                  system_prompt=self.cfg.data.system_prompt or None, generate=generate)
        return replace(scored, late=late, explored=explored)

    def adapt(self, current: ScoredRollout, seen) -> dict:
        """Learn from a step's results (`seen`: the logger's StepView of every rank's completions);
        returns the curriculum/* and adaptive_window/* scalars of the step."""
        record = {}
        if isinstance(self.sampler, Curriculum):
            record.update(self.sampler.observe(seen.levels, seen.correct, seen.scored.valid))
        record.update(current.sampling_record)
        if self.window is not None:
            record.update(self.window.observe(current.rollout.max_new_tokens, current.explored, seen.lengths,
                                              seen.correct, seen.scored.valid, seen.scored.rewards))
        return record

    def state_dict(self) -> dict:
        """The sampler's cursor (and curriculum level), the window's memory, and a prefetched batch's
        tokens (its scores are not kept)."""
        up = self.upcoming
        return {"sampler": self.sampler.state_dict(), "window": self.window.state_dict() if self.window else None,
                "upcoming": None if up is None else {"samples": up.samples, "prompts": up.prompts,
                                                     "rollout": asdict(up.rollout), "explored": up.explored}}

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state["sampler"])
        if self.window is not None:
            self.window.load_state_dict(state["window"])
        if state.get("upcoming"):  # sampled before the checkpoint; its scoring is redone
            up = state["upcoming"]
            scored = submit_scoring(self.scorer, self.tokenizer, up["samples"], up["prompts"], Rollout(**up["rollout"]))
            self.upcoming = replace(scored, late=True, explored=up.get("explored", False))


def sample_and_score(model, tokenizer, scorer: Scorer, samples: list[dict], *, seed: int, group_size: int,
                     max_new_tokens: int, temperature: float, top_p: float = 1.0, system_prompt: str | None = None,
                     generate=generate_rollout) -> ScoredRollout:
    """The one path from prompts to scored completions, for training and evaluation alike: each
    sample's chat prompt, `group_size` completions of it sampled under mx.random.seed(seed), decoded
    without their EOS tokens and submitted for scoring (`.scoring` is its Future)."""
    prompts = [build_prompt_tokens(tokenizer, s, system_prompt) for s in samples]
    mx.random.seed(seed)
    rollout = generate(model, prompts, group_size=group_size, max_new_tokens=max_new_tokens,
                       eos_token_ids=set(tokenizer.eos_token_ids), temperature=temperature, top_p=top_p)
    return submit_scoring(scorer, tokenizer, samples, prompts, rollout)


def submit_scoring(scorer: Scorer, tokenizer, samples: list[dict], prompts: list[list[int]],
                   rollout: Rollout) -> ScoredRollout:
    """Decode a rollout's completions (its EOS tokens dropped) and submit them, group by group, for scoring."""
    G, eos_ids = len(rollout.completion_tokens) // len(prompts), set(tokenizer.eos_token_ids)
    texts = [tokenizer.decode([t for t in ids if t not in eos_ids]) for ids in rollout.completion_tokens]
    group_samples = [s for s in samples for _ in range(G)]
    score_start = time.perf_counter()
    scoring = scorer.submit(group_samples, texts, contiguous_groups(len(texts), G))
    scored_at: list[float] = []
    scoring.add_done_callback(lambda _: scored_at.append(time.perf_counter()))
    return ScoredRollout(samples, prompts, rollout, texts, group_samples, scoring, score_start, scored_at)


def _merge_groups(drawn: list, chosen: list[tuple[int, int]], G: int) -> ScoredRollout:
    """One ScoredRollout of the `chosen` (batch index, group) groups of the drawn batches, in that
    order, with their scores as an already finished Future. Its times are those of all the batches."""
    rows = [(a, g * G + k) for a, g in chosen for k in range(G)]
    first = drawn[0][0]

    def pick(values):  # one per row of each batch
        return [values(drawn[a][0])[i] for a, i in rows]

    rollout = replace(take_rows([b.rollout for b, _ in drawn], rows, lambda r: len(r.completion_tokens)),
                      prefill_time_s=sum(b.rollout.prefill_time_s for b, _ in drawn),
                      generation_time_s=sum(b.rollout.generation_time_s for b, _ in drawn))
    rewards = take_rows([s for _, s in drawn], rows, lambda r: len(r.rewards))
    done = Future()
    done.set_result(rewards)
    last_scored = max(t for b, _ in drawn for t in b.scored_at) if all(b.scored_at for b, _ in drawn) else first.score_start
    return ScoredRollout(samples=[drawn[a][0].samples[g] for a, g in chosen],
                         prompts=[drawn[a][0].prompts[g] for a, g in chosen], rollout=rollout,
                         texts=pick(lambda b: b.texts), group_samples=pick(lambda b: b.group_samples), scoring=done,
                         score_start=first.score_start, scored_at=[last_scored], explored=first.explored)
