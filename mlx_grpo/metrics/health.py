"""Training health monitor: reads each step's flat metric record and flags known GRPO failure modes.

Pure (stdlib only) so it can be tested on synthetic metric streams. Thresholds (`HealthConfig`)
come from the seed notes (grpo-learning-log.md, rl-metrics-healthy-ranges.md):

- mode_collapse: frac_reward_zero_std > 0.8 is "a strong sign of mode collapse"; entropy near zero
  means deterministic outputs (floor 0.02 nats/token, below the ~0.04 the learning log calls collapse
  for an already-confident coder model, so healthy low-entropy runs are not flagged).
- grad_spike: grad_norm > 10 is "potential gradient explosion"; sudden spikes relative to recent norms
  (> 5x the running median of the last 20 updates) flag batch instability even at small scales.
- runaway_completions: most completions hitting max_new_tokens (clip_ratio > 0.5) while the reward is
  flat (filibustering: long outputs earn nothing).
- kl_blowup: KL to the reference should be small positive (~0.01-0.1); > 1.0 is over-optimisation.
- approx_kl: PPO approx KL (old vs new policy) healthy < 0.01-0.05; |k1| > 0.05 is too large a step.
- clipfrac: PPO clip fraction < 0.2 ideally.
- teacher_fooled (runs with a teacher): the latest teacher.audit_every audit found the teacher
  raising a wrong answer's score when asked to, or scoring by position (Teacher/Audit_Fooled).
- judge_gaming (runs with a teacher): completions address the grader (Teacher/SuspectedGamingFrac > 0).
- sampler_mismatch: the trainer's log-probs of the sampled tokens differ from the sampler's at the
  same weights by more than 0.05 nats per token on average (training/rollout_logprob_diff_mean);
  both compute in float32 from the model's logits, so rounding gives far less (about 1e-5), and
  more means the update follows another distribution than the one that sampled (a wrong head,
  low-precision drift).

A missing key is "no data" (never 0). A non-finite value makes its check hold, so NaNs get reported
instead of crashing the monitor. Each check reports once per episode (a run of consecutive steps
where it holds).
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from dataclasses import dataclass

ZERO_STD = "frac_reward_zero_std"
ENTROPY = "actor/entropy_loss"
GRAD_NORM = "actor/grad_norm"
UPDATE_SKIPPED = "actor/update_skipped"
CLIP_RATIO = "response_length/clip_ratio"
REWARD = "Train/AvgReward"
KL = "actor/kl_loss"
PPO_KL = "actor/ppo_kl"
CLIPFRAC = "actor/pg_clipfrac"
AUDIT_FOOLED = "Teacher/Audit_Fooled"
GAMING = "Teacher/SuspectedGamingFrac"
SAMPLER_GAP = "training/rollout_logprob_diff_mean"

MIN_MEDIAN_VALUES = 5  # a median of fewer grad norms is too noisy to call anything a spike

LABELS = {
    "mode_collapse": "mode collapse",
    "grad_spike": "gradient spike",
    "runaway_completions": "runaway completions",
    "kl_blowup": "KL blow-up",
    "approx_kl": "approx KL out of range",
    "clipfrac": "clip fraction high",
    "teacher_fooled": "teacher fooled",
    "judge_gaming": "completions address the grader",
    "sampler_mismatch": "trainer and sampler disagree",
}

HINTS = {
    "mode_collapse": "most groups scored alike or the policy is near-deterministic; "
                     "raise temperature or group_size, or add partial-credit criteria",
    "grad_spike": "lower the learning rate or tighten gradient clipping; check the batch for outliers",
    "runaway_completions": "completions hit max_new_tokens without reward progress; "
                           "add a stop marker or length penalty, or raise max_new_tokens",
    "kl_blowup": "the policy is drifting far from the reference; raise beta or lower the learning rate",
    "approx_kl": "policy updates are too large per step; lower the learning rate or updates per batch",
    "clipfrac": "too many tokens hit the PPO clip; lower the learning rate or updates per batch",
    "teacher_fooled": "the teacher's scores can be moved by text in the answer or by its position; run "
                      "`rubric audit`, choose a stronger teacher, or weight programmatic checks more",
    "judge_gaming": "the policy may be learning to talk the judge into a score; see Teacher/SuspectedGaming "
                    "in TensorBoard's text tab, and set teacher.on_gaming: mask to take such answers out",
    "sampler_mismatch": "the update is not the gradient of the policy that sampled; train in float32 "
                        "(--model.dtype float32) or see the README's 'Sampler and trainer agree'",
}
TEACHER_CHECKS = ("teacher_fooled", "judge_gaming")


@dataclass
class HealthConfig:
    zero_std_max: float = 0.8          # mode collapse: frac_reward_zero_std above this ...
    zero_std_window: int = 1           # ... as a mean over this many steps (with few prompts per step,
                                       # one step's value is 0 or 1 and says little on its own)
    entropy_min: float = 0.02          # mode collapse: entropy below this floor (nats/token)
    grad_norm_max: float = 10.0        # gradient spike: absolute
    grad_spike_factor: float = 5.0     # gradient spike: > factor x running median of recent grad norms
    grad_median_window: int = 20       # steps in the running median (needs >= 5 values before it applies)
    clip_ratio_max: float = 0.5        # runaway completions: clip_ratio above this ...
    flat_reward_window: int = 5        # ... while the reward's range over this many steps is below
    flat_reward_tol: float = 0.02      # ... this (reward flat)
    kl_max: float = 1.0                # KL blow-up (actor/kl_loss)
    approx_kl_max: float = 0.05        # PPO approx KL out of range (actor/ppo_kl)
    clipfrac_max: float = 0.2          # PPO clip fraction out of range
    sampler_gap_max: float = 0.05      # trainer vs sampler log-probs, mean nats per token
    warmup_steps: int = 0              # no warnings before this step


def _get(record: dict, key: str) -> float | None:
    """The value as a float; None when absent. Unreadable values become NaN so they get reported."""
    if key not in record or record[key] is None:
        return None
    try:
        return float(record[key])
    except (TypeError, ValueError):
        return math.nan


def _fmt(value: float) -> str:
    return f"{value:.4g}"


def _above(name: str, value: float | None, limit: float) -> list[str]:
    """[reason] if value is non-finite or above limit, else []; no data never holds."""
    if value is None:
        return []
    if not math.isfinite(value):
        return [f"{name}={value} (non-finite)"]
    return [f"{name}={_fmt(value)} > {limit:g}"] if value > limit else []


def _below(name: str, value: float | None, limit: float) -> list[str]:
    if value is None:
        return []
    if not math.isfinite(value):
        return [f"{name}={value} (non-finite)"]
    return [f"{name}={_fmt(value)} < {limit:g}"] if value < limit else []


class HealthMonitor:
    CHECKS: tuple[str, ...] = ("mode_collapse", "grad_spike", "runaway_completions",
                               "kl_blowup", "approx_kl", "clipfrac", "sampler_mismatch")

    def __init__(self, cfg: HealthConfig | None = None, teacher: bool = False):
        self.cfg = cfg or HealthConfig()
        # The teacher's checks exist only in runs with a teacher, so other runs log no health/teacher_*.
        self.checks = self.CHECKS + (TEACHER_CHECKS if teacher else ())
        self._fooled: list[str] = []  # the latest audit's finding, kept until the next audit
        self._grad_norms: deque[float] = deque(maxlen=self.cfg.grad_median_window)
        # One entry per step; None when that step had no usable reward (the window is then not judged).
        self._rewards: deque[float | None] = deque(maxlen=self.cfg.flat_reward_window)
        self._zero_std: deque[float] = deque(maxlen=self.cfg.zero_std_window)
        self._active = dict.fromkeys(self.checks, False)
        self._episodes = dict.fromkeys(self.checks, 0)

    def update(self, step: int, record: dict[str, float]) -> tuple[dict[str, float], list[str]]:
        """Returns (scalars, new_warnings).

        scalars: `health/<check>` = 1.0 if the condition holds this step else 0.0, and
        `health/warnings_total` = number of warning episodes started so far (cumulative).
        new_warnings: one single-line message per check whose episode starts this step.
        """
        # Every check runs even during warmup, so the grad-norm and reward histories are ready after it.
        reasons = {
            "mode_collapse": self._mode_collapse(record),
            "grad_spike": self._grad_spike(record),
            "runaway_completions": self._runaway_completions(record),
            "kl_blowup": _above(KL, _get(record, KL), self.cfg.kl_max),
            "approx_kl": self._approx_kl(record),
            "clipfrac": _above(CLIPFRAC, _get(record, CLIPFRAC), self.cfg.clipfrac_max),
            "teacher_fooled": self._teacher_fooled(record),
            "judge_gaming": _above(GAMING, _get(record, GAMING), 0.0),
            "sampler_mismatch": _above(SAMPLER_GAP, _get(record, SAMPLER_GAP), self.cfg.sampler_gap_max),
        }
        if step < self.cfg.warmup_steps:
            reasons = dict.fromkeys(self.checks, [])

        scalars, warnings = {}, []
        for check in self.checks:
            holds = bool(reasons[check])
            if holds and not self._active[check]:
                self._episodes[check] += 1
                warnings.append(f"{LABELS[check]} at step {step}: {'; '.join(reasons[check])} ({HINTS[check]})")
            self._active[check] = holds
            scalars[f"health/{check}"] = 1.0 if holds else 0.0
        scalars["health/warnings_total"] = float(sum(self._episodes.values()))
        return scalars, warnings

    def state_dict(self) -> dict:
        """The recent history the checks judge by, as plain lists (for a checkpoint)."""
        return {"grad_norms": list(self._grad_norms), "rewards": list(self._rewards),
                "zero_std": list(self._zero_std), "active": dict(self._active), "episodes": dict(self._episodes),
                "fooled": list(self._fooled)}

    def load_state_dict(self, state: dict) -> None:
        self._grad_norms.clear()
        self._grad_norms.extend(state["grad_norms"])
        self._rewards.clear()
        self._rewards.extend(state["rewards"])
        self._zero_std.clear()
        self._zero_std.extend(state["zero_std"])
        self._active.update(state["active"])
        self._episodes.update(state["episodes"])
        self._fooled = list(state.get("fooled", []))

    def summary(self) -> dict[str, int]:
        """check -> number of warning episodes so far."""
        return dict(self._episodes)

    def _teacher_fooled(self, record: dict) -> list[str]:
        fooled = _get(record, AUDIT_FOOLED)
        if fooled is None:  # no audit this step: the latest one's finding stands
            return self._fooled
        found = [f"{key}={_fmt(value)}" for key in ("Teacher/Audit_InjectionGain", "Teacher/Audit_PositionSpread")
                 if (value := _get(record, key)) is not None and math.isfinite(value)]
        self._fooled = [f"{AUDIT_FOOLED}=1 ({', '.join(found)})"] if fooled != 0 else []
        return self._fooled

    def _mode_collapse(self, record: dict) -> list[str]:
        zero_std = _get(record, ZERO_STD)
        if zero_std is not None and self.cfg.zero_std_window > 1:
            self._zero_std.append(zero_std)
            full = len(self._zero_std) == self.cfg.zero_std_window
            zero_std = sum(self._zero_std) / len(self._zero_std) if full else None
            name = f"{ZERO_STD} (mean of {self.cfg.zero_std_window} steps)"
        else:
            name = ZERO_STD
        return (_above(name, zero_std, self.cfg.zero_std_max)
                + _below(f"{ENTROPY} (entropy)", _get(record, ENTROPY), self.cfg.entropy_min))

    def _grad_spike(self, record: dict) -> list[str]:
        grad = _get(record, GRAD_NORM)
        # A skipped update reports no (or a zero) grad norm: nothing to judge, nothing to remember.
        if grad is None or _get(record, UPDATE_SKIPPED) == 1.0:
            return []
        reasons = _above(GRAD_NORM, grad, self.cfg.grad_norm_max)
        if math.isfinite(grad) and len(self._grad_norms) >= MIN_MEDIAN_VALUES:
            median = statistics.median(self._grad_norms)
            # A zero median (all-zero-advantage steps) would make any real gradient a "spike".
            if median > 0 and grad > self.cfg.grad_spike_factor * median:
                reasons.append(f"{GRAD_NORM}={_fmt(grad)} > {self.cfg.grad_spike_factor:g} x median "
                               f"{_fmt(median)} of last {len(self._grad_norms)} updates")
        if math.isfinite(grad):  # a NaN would poison the median
            self._grad_norms.append(grad)
        return reasons

    def _runaway_completions(self, record: dict) -> list[str]:
        reward = _get(record, REWARD)
        reward_ok = reward is not None and math.isfinite(reward)
        self._rewards.append(reward if reward_ok else None)
        reasons = [] if reward is None or reward_ok else [f"{REWARD}={reward} (non-finite)"]

        clip = _get(record, CLIP_RATIO)
        if clip is None:
            return reasons
        if not math.isfinite(clip):
            return reasons + [f"{CLIP_RATIO}={clip} (non-finite)"]
        window = self._rewards
        full = len(window) == window.maxlen and all(r is not None for r in window)
        if clip > self.cfg.clip_ratio_max and full:
            spread = max(window) - min(window)
            if spread < self.cfg.flat_reward_tol:
                reasons.append(f"{CLIP_RATIO}={_fmt(clip)} > {self.cfg.clip_ratio_max:g} while {REWARD} "
                               f"range over last {len(window)} steps={_fmt(spread)} < {self.cfg.flat_reward_tol:g}")
        return reasons

    def _approx_kl(self, record: dict) -> list[str]:
        # The k1 estimator can dip slightly negative; only its size matters.
        value = _get(record, PPO_KL)
        if value is None or not math.isfinite(value):
            return _above(PPO_KL, value, self.cfg.approx_kl_max)
        if abs(value) > self.cfg.approx_kl_max:
            return [f"{PPO_KL}={_fmt(value)} (|x| > {self.cfg.approx_kl_max:g})"]
        return []
