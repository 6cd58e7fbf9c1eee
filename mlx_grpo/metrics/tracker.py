"""Metrics with memory across steps, computed once here so that no sink computes statistics:

- speed percentiles over the last SPEED_WINDOW steps (Performance/*_AvgTokensPerSec, _P50, _P99, _Min),
- epoch averages and trends (Epoch/*),
- per-criterion reward tags for the W&B guide (rewards/*, criteria/*), recent means and histograms,
- pass@1 / pass@all per batch (batch_metrics.jsonl),
- and the run's final per-criterion summary (final/*, rubric_criteria_summary) from running moments,
  so that the state a checkpoint saves does not grow with the run.

"P99" of a speed is the slow tail: the tokens/s that 99% of steps reached or beat (the 1st
percentile of the per-step speeds). A mean hides stalls; this is the number that shows them.
"""

from __future__ import annotations

from collections import deque
from dataclasses import asdict, dataclass, field

import numpy as np

from mlx_grpo.metrics.record import correctness_metrics

RECENT = 10  # samples in rewards/*_recent_mean, and the minimum before a histogram is logged
# Steps whose speeds the percentiles cover: the state a checkpoint saves stays the same size however
# long the run (the speeds of a 10,000-step run would otherwise be re-saved at every checkpoint).
# The speed percentiles cover the latest 100 steps: recent enough to show a slowdown (a Mac that
# throttles, a teacher that queues) within a hundred steps, and a checkpoint that does not grow.
SPEED_WINDOW = 100


@dataclass
class RunningStats:
    """Count, mean, spread and range of a stream of scores, in constant memory (Welford's update)."""
    count: int = 0
    mean: float = 0.0
    m2: float = 0.0  # the sum of squared differences from the mean
    low: float = float("inf")
    high: float = float("-inf")

    def add(self, values: np.ndarray) -> None:
        if not values.size:
            return
        values = values.astype(np.float64)
        n, mean = values.size, float(values.mean())
        total = self.count + n
        delta = mean - self.mean
        self.m2 += float(((values - mean) ** 2).sum()) + delta * delta * self.count * n / total
        self.mean += delta * n / total
        self.count = total
        self.low, self.high = min(self.low, float(values.min())), max(self.high, float(values.max()))

    @property
    def std(self) -> float:
        return (self.m2 / self.count) ** 0.5 if self.count else 0.0


def speed_stats(name: str, speeds) -> dict[str, float]:
    """Avg / P50 / P99 (slow tail, see module doc) / Min over the last SPEED_WINDOW steps' tokens/s."""
    values = np.asarray(speeds, dtype=np.float64)
    if values.size == 0:
        return {}
    return {
        f"Performance/{name}_AvgTokensPerSec": float(values.mean()),
        f"Performance/{name}_P50TokensPerSec": float(np.percentile(values, 50)),
        f"Performance/{name}_P99TokensPerSec": float(np.percentile(values, 1)),
        f"Performance/{name}_MinTokensPerSec": float(values.min()),
    }


def pass_rates(correct: np.ndarray, valid: np.ndarray, group_size: int) -> dict[str, float]:
    """pass_at_1: mean over prompts of the fraction of correct completions; pass_at_all: fraction
    of prompts with at least one correct completion. Masked completions are left out."""
    at_1, at_all = [], []
    for start in range(0, len(correct), group_size):
        ok = correct[start:start + group_size][valid[start:start + group_size]]
        if ok.size:
            at_1.append(ok.mean())
            at_all.append(ok.any())
    if not at_1:
        return {}
    return {"pass_at_1": float(np.mean(at_1)), "pass_at_all": float(np.mean(at_all))}


@dataclass
class EpochStats:
    """Accumulates one epoch (a pass over `prompts_per_epoch` prompts) and reports it when done."""

    prompts_per_epoch: int
    rewards: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    api_tokens: int = 0
    samples: int = 0
    prompts: int = 0
    epoch: int = 0
    previous: tuple[float, float] | None = None  # (avg reward, avg loss) of the last epoch

    def add(self, rewards: np.ndarray, loss: float, api_tokens: int, num_prompts: int) -> dict[str, float] | None:
        self.rewards.extend(rewards.tolist())
        self.losses.append(loss)
        self.api_tokens += api_tokens
        self.samples += len(rewards)
        self.prompts += num_prompts
        return self.close() if self.prompts >= self.prompts_per_epoch else None

    def close(self) -> dict[str, float] | None:
        """The Epoch/* record of what has accumulated (also a partial epoch at the end of a run)."""
        if not self.losses:
            return None
        rewards = np.asarray(self.rewards, dtype=np.float64)
        avg_reward = float(rewards.mean()) if rewards.size else 0.0
        avg_loss = float(np.mean(self.losses))
        prev_reward, prev_loss = self.previous or (avg_reward, avg_loss)
        record = {
            "Epoch/AvgReward": avg_reward,
            "Epoch/AvgLoss": avg_loss,
            "Epoch/RewardVariance": float(rewards.var()) if rewards.size else 0.0,
            "Epoch/RewardTrend": avg_reward - prev_reward,  # > 0: reward went up
            "Epoch/LossTrend": prev_loss - avg_loss,  # > 0: loss went down (improving)
            "Epoch/APITokens": float(self.api_tokens),
            "Epoch/NumSamples": float(self.samples),
        }
        self.previous = (avg_reward, avg_loss)
        self.epoch += 1
        self.rewards, self.losses, self.api_tokens, self.samples = [], [], 0, 0
        self.prompts = max(0, self.prompts - self.prompts_per_epoch)
        return record


@dataclass
class FirstAndLast:
    """The first KEEP values of a series and its latest KEEP: how a run began and how it ended,
    in a state that does not grow with the run."""
    KEEP = 5
    first: list = field(default_factory=list)
    last: list = field(default_factory=list)

    def add(self, value: float) -> None:
        if len(self.first) < self.KEEP:
            self.first.append(value)
        self.last = [*self.last, value][-self.KEEP:]

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        self.first, self.last = list(state["first"]), list(state["last"])


class MetricsTracker:
    """Turns each step's record and scores into the cross-step tags above."""

    def __init__(self, *, rubric_name: str, group_size: int, prompts_per_epoch: int,
                 histogram_every: int = 10):
        self.rubric_name = rubric_name
        self.group_size = group_size
        self.histogram_every = histogram_every
        self.epochs = EpochStats(prompts_per_epoch)
        self.speeds = {"Generation": deque(maxlen=SPEED_WINDOW), "Backprop": deque(maxlen=SPEED_WINDOW)}
        self.recent: dict[str, deque] = {}
        self.hist_buffer: dict[str, list[float]] = {}
        self.scores: dict[str, RunningStats] = {}  # of every score so far: final/* and the summary table
        self.cumulative_reward = 0.0  # every scored completion's reward so far (train/cumulative_reward)

    def update(self, step: int, record: dict, scored, num_prompts: int, gen_speed: float,
               backprop_speed: float | None, correct: np.ndarray, truncated: np.ndarray, lengths: np.ndarray) -> dict:
        """Extra tags for this step. `record` holds the step's own metrics; `scored` is its RewardBatch;
        the speeds are tokens/s (backprop None when the update was skipped); `correct` (the trainer's
        verdicts), `truncated` and `lengths` are per completion."""
        extra: dict = {"train/step": float(step)}
        for name, speed in (("Generation", gen_speed), ("Backprop", backprop_speed)):
            if speed is not None:
                self.speeds[name].append(speed)
            extra.update(speed_stats(name, self.speeds[name]))

        valid = scored.valid
        columns = {name: column[valid] for name, column in scored.criterion_scores.items()}
        columns = {name: column[~np.isnan(column)] for name, column in columns.items()}
        rewards = scored.rewards[valid]
        extra.update(self._reward_tags(step, columns, rewards))
        # An outcome reward sits on a completion's last token, so the sum of the token-level
        # rewards (the seed's definition) is the sum of the completions' rewards.
        self.cumulative_reward += float(rewards.sum())
        extra["train/cumulative_reward"] = self.cumulative_reward

        extra.update(pass_rates(correct, valid, self.group_size))
        extra.update(correctness_metrics(correct[valid], truncated[valid], lengths[valid]))

        epoch = self.epochs.add(rewards, record.get("Train/Loss", 0.0), int(record.get("Teacher/APITokens", 0)),
                                num_prompts)
        if epoch:
            extra.update(epoch)
        return extra

    def _reward_tags(self, step: int, columns: dict[str, np.ndarray], rewards: np.ndarray) -> dict:
        tags: dict = {}
        means = []
        for name, values in [*columns.items(), ("rubric", rewards)]:
            self.scores.setdefault(name, RunningStats()).add(values)
            recent = self.recent.setdefault(name, deque(maxlen=RECENT))
            recent.extend(values.tolist())
            buffer = self.hist_buffer.setdefault(name, [])
            buffer.extend(values.tolist())
            if values.size:
                tags[f"rewards/{name}_mean"] = float(values.mean())
                tags[f"rewards/{name}_max"] = float(values.max())
                tags[f"rewards/{name}_min"] = float(values.min())
                if name != "rubric":
                    means.append(float(values.mean()))
                    tags[f"criteria/{self.rubric_name}/{name}_mean"] = float(values.mean())
            if recent:
                tags[f"rewards/{name}_recent_mean"] = float(np.mean(recent))
            if step % self.histogram_every == 0 and len(buffer) >= RECENT:
                tags[f"rewards/{name}_hist"] = np.asarray(buffer, dtype=np.float32)  # arrays become histograms
                self.hist_buffer[name] = []
        # As in the W&B guide: the sum of the reward functions' (criteria's) means.
        tags["rewards/total_mean"] = float(sum(means))
        return tags

    def state_dict(self) -> dict:
        """What the tracker has accumulated, as plain lists and numbers (for a checkpoint)."""
        return {"epochs": asdict(self.epochs), "speeds": {name: list(values) for name, values in self.speeds.items()},
                "recent": {name: list(values) for name, values in self.recent.items()},
                "hist_buffer": self.hist_buffer, "scores": {name: asdict(s) for name, s in self.scores.items()},
                "cumulative_reward": self.cumulative_reward}

    def load_state_dict(self, state: dict) -> None:
        epochs = dict(state["epochs"])
        previous = epochs.pop("previous")
        self.epochs = EpochStats(**epochs, previous=tuple(previous) if previous is not None else None)
        self.speeds = {name: deque(values, maxlen=SPEED_WINDOW) for name, values in state["speeds"].items()}
        self.recent = {name: deque(values, maxlen=RECENT) for name, values in state["recent"].items()}
        self.hist_buffer = {name: list(values) for name, values in state["hist_buffer"].items()}
        self.scores = {name: RunningStats(**stats) for name, stats in state.get("scores", {}).items()}
        for name, values in state.get("all_scores", {}).items():  # a checkpoint that kept every score
            self.scores.setdefault(name, RunningStats()).add(np.asarray(values, dtype=np.float64))
        self.cumulative_reward = state.get("cumulative_reward", 0.0)  # (a checkpoint from before it existed)

    def close_epoch(self) -> dict[str, float]:
        """Epoch/* of the epoch in progress (at the end of a run), or {} if it just closed."""
        return self.epochs.close() or {}

    def finish(self) -> tuple[dict[str, float], list[list]]:
        """(final/* scalars, rubric_criteria_summary rows [name, mean, std, min, max, samples])."""
        final, rows = {}, []
        for name, running in self.scores.items():
            if not running.count:
                continue
            stats = (running.mean, running.std, running.low, running.high, running.count)
            final.update({f"final/{name}_mean": stats[0], f"final/{name}_std": stats[1],
                          f"final/{name}_min": stats[2], f"final/{name}_max": stats[3],
                          f"final/{name}_total_samples": float(stats[4])})
            rows.append([name if name == "rubric" else f"{self.rubric_name}/{name}", *stats])
        return final, rows
