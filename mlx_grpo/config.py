"""Training configuration: a tree of dataclasses, loaded from YAML, overridden by dotted CLI flags.

Every field carries its help text in `metadata["help"]`; `--help` is generated from it, so the
dataclasses below are the single reference for what can be configured.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mlx_grpo.errors import UserInputError
from mlx_grpo.tasks import check_task_options, task_option_defaults


def opt(default, help: str, choices: tuple | None = None):
    """A dataclass field with help text (and optionally the allowed values)."""
    meta = {"help": help, "choices": choices}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


def checker(prefix: str, section):
    """require(ok, key, what): raise a one-line UserInputError naming `prefix + key` and its value."""
    def require(ok: bool, key: str, what: str) -> None:
        if not ok:
            value = functools.reduce(getattr, key.split("."), section)
            raise UserInputError(f"config: {prefix}{key} {what}, got {value!r}")
    return require


@dataclass
class ModelConfig:
    path: str = opt("smollm2-135m-instruct", "Model: built-in alias, Hugging Face id, local mlx-lm directory, or .gguf file.")
    dtype: str = opt("auto", "Weight dtype. 'auto' is bfloat16 on a Mac's GPU (Metal) and float32 on a CPU, where "
                             "bfloat16 matmuls are slow. 'native' keeps the checkpoint's dtype (a 4-bit model stays "
                             "quantised: QLoRA).", ("auto", "float32", "float16", "bfloat16", "native"))

    def validate(self) -> None:
        checker("model.", self)(bool(self.path.strip()), "path",
                                "must name a model (built-in alias, HF id, directory or .gguf)")


@dataclass
class LoraConfig:
    fine_tune_type: str = opt("lora", "'lora' trains low-rank adapters; 'full' trains every weight.", ("lora", "full"))
    rank: int = opt(8, "LoRA rank.")
    alpha: float = opt(16.0, "LoRA alpha; the adapter output is scaled by alpha / rank.")
    dropout: float = opt(0.0, "Dropout on the LoRA input.")
    num_layers: int = opt(-1, "Adapt the last N transformer blocks (-1 = all).")
    target_modules: list = opt([], "Linear layers to adapt, e.g. [self_attn.q_proj, self_attn.v_proj]; empty = mlx-lm's default set.")

    def validate(self) -> None:
        require = checker("lora.", self)
        require(self.rank >= 1, "rank", "must be at least 1")
        require(self.alpha > 0, "alpha", "must be positive")
        require(0 <= self.dropout < 1, "dropout", "must be in [0, 1)")
        require(self.num_layers == -1 or self.num_layers >= 1, "num_layers", "must be -1 (all) or at least 1")
        require(all(isinstance(m, str) and m.strip() for m in self.target_modules), "target_modules",
                "must be a list of layer names such as [q_proj, v_proj]")


@dataclass
class DataConfig:
    dataset: str = opt("largest", "A built-in task name ('largest', 'arithmetic' or 'coding') or a path to a JSONL "
                                  "file with a 'prompt' field.")
    train_size: int = opt(2000, "Number of training prompts generated for built-in tasks (one epoch).")
    test_size: int = opt(200, "Number of held-out prompts generated for built-in tasks.")
    system_prompt: str = opt("", "System prompt; empty = the task's default. A dataset row's 'system' field wins.")
    curriculum: bool = opt(False, "Sample the easiest difficulty level first; the next level joins the pool once the "
                                  "current one's recent accuracy reaches curriculum_threshold.")
    curriculum_threshold: float = opt(0.7, "Curriculum: the accuracy (reward.correct_*) over the current level's last "
                                           "64 scored completions that unlocks the next level.")
    epoch_size: int = opt(80, "Prompts per epoch for the Epoch/* metrics (80: the demo's 100 steps of 4 prompts show "
                              "5 epochs); 0 = one pass over the training prompts.")

    def validate(self) -> None:
        require = checker("data.", self)
        require(self.train_size >= 1, "train_size", "must be at least 1")
        require(self.test_size >= 0, "test_size", "must be >= 0")
        require(0 <= self.curriculum_threshold <= 1, "curriculum_threshold", "must be in [0, 1]")
        require(self.epoch_size >= 0, "epoch_size", "must be >= 0")


@dataclass
class RewardConfig:
    correct_criterion: str = opt("", "Criterion whose score decides 'correct': pass@1 and pass@all, eval accuracy, "
                                     "S-GRPO's rewards, the curriculum and the adaptive window; empty = the rubric's "
                                     "`correct:` criterion, or the total reward when it names none.")
    correct_threshold: float = opt(1.0, "A completion is correct when that score is >= this.")


@dataclass
class RolloutConfig:
    batch_size: int = opt(4, "Prompts per step (B).")
    group_size: int = opt(8, "Completions per prompt (G); advantages are relative within a group.")
    max_new_tokens: int = opt(8, "Maximum completion length in tokens (the demo's answers take 2 to 8; word "
                                 "problems with reasoning need about 64, code 256).")
    temperature: float = opt(1.0, "Sampling temperature.")
    top_p: float = opt(1.0, "Nucleus sampling threshold (1.0 = off).")
    adaptive_window: bool = opt(False, "Set each step's max_new_tokens from the lengths of the latest 256 correct "
                                       "completions (their 95th percentile plus 4 tokens, at least 4, at most "
                                       "max_new_tokens); one step in ten explores at max_new_tokens.")
    dynamic_sampling: bool = opt(False, "DAPO's dynamic sampling: drop the groups whose rewards are all equal (no "
                                        "signal) and draw more prompts until batch_size groups with a spread exist, "
                                        "or max_resample_batches batches were drawn (then dropped groups fill the rest).")
    max_resample_batches: int = opt(3, "Dynamic sampling: the most batches of batch_size prompts drawn per step, "
                                       "the first included.")
    pipeline: bool = opt(False, "Generate the next batch while the teacher scores this one. That batch then trains one "
                                "update late, with its importance ratio taken against the policy that sampled it. "
                                "Pays off when teacher latency is a large part of a step.")
    sgrpo: bool = opt(False, "S-GRPO (serial group): per prompt, one full reasoning path, then G - 1 answers from exits "
                             "cut inside its <reasoning>; correct answers earn 1, 1/2, 1/4, ... by exit order, wrong "
                             "ones 0, and the advantage is the reward minus the group mean. It replaces the parallel group.")
    sgrpo_answer_tokens: int = opt(16, "S-GRPO: the most tokens an early exit's answer may take.")

    def validate(self) -> None:
        require = checker("rollout.", self)
        require(self.batch_size >= 1, "batch_size", "must be at least 1")
        require(self.group_size >= 2, "group_size", "must be at least 2 (advantages compare completions within a group)")
        require(self.max_new_tokens >= 1, "max_new_tokens", "must be at least 1")
        require(self.temperature >= 0, "temperature", "must be >= 0")
        require(0 < self.top_p <= 1, "top_p", "must be in (0, 1]")
        require(self.max_resample_batches >= 1, "max_resample_batches", "must be at least 1")
        require(not (self.dynamic_sampling and self.pipeline), "dynamic_sampling",
                "does not go with rollout.pipeline, which must sample the next batch before this one's scores are known")
        require(self.sgrpo_answer_tokens >= 1, "sgrpo_answer_tokens", "must be at least 1")


@dataclass
class GRPOConfig:
    beta: float = opt(0.0, "Weight of the k3 KL penalty to the reference (base) model; 0 skips the reference pass.")
    epsilon: float = opt(0.2, "Lower clip range of the importance ratio: 1 - epsilon.")
    epsilon_high: float = opt(0.28, "Upper clip range: 1 + epsilon_high (DAPO's clip-higher).")
    loss_type: str = opt("bnpo", "Loss aggregation: grpo (per-sequence mean), bnpo (token mean; dapo is another name "
                                 "for it), dr_grpo (sum / (N * max_len)).",
                         ("grpo", "bnpo", "dapo", "dr_grpo"))
    scale_rewards: str = opt("group", "Divide advantages by the group std, the batch std, or not at all (Dr. GRPO).",
                             ("group", "batch", "none"))
    importance_sampling_level: str = opt("token", "token: a ratio per token (GRPO). sequence: GSPO, one length-normalised "
                                                  "ratio per completion, clipped as a whole; steadier when the ratios are "
                                                  "noisy (mu > 1, pipeline, MoE). GSPO's paper clips at epsilon 3e-4 and "
                                                  "epsilon_high 4e-4.", ("token", "sequence"))
    top_entropy_quantile: float = opt(1.0, "Only the tokens whose entropy is in this top fraction of the micro-batch "
                                           "carry policy loss (0.2 = the 20% most uncertain 'forking' tokens); 1 = all.")
    reward_aggregation: str = opt("sum_then_normalize", "sum_then_normalize: advantages from the weighted reward. "
                                  "normalize_then_sum (GDPO): each criterion is normalised within its group before the "
                                  "weighted sum, so a low-spread criterion is not drowned by a high-spread one; "
                                  "scale_rewards does not apply.", ("sum_then_normalize", "normalize_then_sum"))
    tis_cap: float = opt(0.0, "rollout.pipeline off-policy correction (0 = off): a batch sampled by the previous "
                              "weights is clipped against the current ones, each token weighted by the truncated "
                              "importance ratio min(pi_current / pi_sampled, tis_cap); 2 is a common cap. Off, the "
                              "clip is taken against the sampling policy itself.")
    num_iterations: int = opt(1, "Optimisation passes (mu) over each generated batch.")
    mask_truncated: bool = opt(False, "Exclude completions that hit max_new_tokens from the loss.")
    overlong_penalty: float = opt(0.0, "DAPO's soft overlong punishment (0 = off): a reward term that is 0 up to "
                                       "max_new_tokens - overlong_buffer tokens, then falls linearly to -this at "
                                       "max_new_tokens. Unlike mask_truncated it also warns completions nearing the limit.")
    overlong_buffer: int = opt(16, "The overlong punishment's ramp, in tokens before max_new_tokens.")
    share_prompt_pass: bool = opt(True, "Run each group's prompt through the model once in the log-prob and update passes, "
                                        "its G completions attending to that one copy (false: every row in full).")

    def validate(self) -> None:
        require = checker("grpo.", self)
        require(self.beta >= 0, "beta", "must be >= 0")
        require(self.epsilon > 0, "epsilon", "must be positive")
        require(self.epsilon_high > 0, "epsilon_high", "must be positive")
        require(self.importance_sampling_level == "token" or self.loss_type != "dr_grpo", "importance_sampling_level",
                "sequence (GSPO) is length-normalised and does not go with loss_type dr_grpo; use grpo or bnpo")
        per_criterion = self.reward_aggregation == "normalize_then_sum"
        require(not (per_criterion and self.overlong_penalty > 0), "reward_aggregation",
                "normalize_then_sum does not go with grpo.overlong_penalty (a reward term outside the rubric's criteria)")
        require(not per_criterion or self.scale_rewards == "group", "scale_rewards",
                "does not apply with reward_aggregation normalize_then_sum, which divides each criterion by its "
                "group's std; leave it at group")
        require(self.tis_cap == 0 or self.tis_cap >= 1, "tis_cap", "must be 0 (off) or at least 1")
        require(0 < self.top_entropy_quantile <= 1, "top_entropy_quantile", "must be in (0, 1]")
        require(self.num_iterations >= 1, "num_iterations", "must be at least 1")
        require(self.overlong_penalty >= 0, "overlong_penalty", "must be >= 0")


@dataclass
class OptimConfig:
    learning_rate: float = opt(3e-4, "Peak learning rate.")
    weight_decay: float = opt(0.0, "AdamW weight decay.")
    bias_correction: bool = opt(True, "AdamW bias correction, as in PyTorch and TRL. MLX's own default is off, which "
                                      "makes the updates of a 100-step run about 3x larger at the same learning rate "
                                      "(README: learning rates); measured on the demo, off collapsed one seed in three.")
    warmup_steps: int = opt(2, "Linear warmup steps.")
    min_lr_ratio: float = opt(0.1, "Cosine decay floor, as a fraction of the peak learning rate.")
    max_grad_norm: float = opt(1.0, "Global gradient-norm clip (0 = off).")
    grad_checkpoint: bool = opt(False, "Recompute each transformer block's activations in the backward pass instead of "
                                       "keeping them: much less memory in the update for about a third more update time.")
    compile: bool = opt(False, "mx.compile the loss and gradient; lengths are padded to multiples of 32 so few shapes "
                               "recompile. Helps most on Metal; on CPU each new shape costs a g++ build.")
    grad_accum_steps: int = opt(1, "Micro-batches per optimizer step; the B*G completions are split evenly among them.")

    def validate(self) -> None:
        require = checker("optim.", self)
        require(self.learning_rate > 0, "learning_rate", "must be positive")
        require(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        require(self.warmup_steps >= 0, "warmup_steps", "must be >= 0")
        require(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", "must be in [0, 1]")
        require(self.max_grad_norm >= 0, "max_grad_norm", "must be >= 0")
        require(self.grad_accum_steps >= 1, "grad_accum_steps", "must be at least 1")


@dataclass
class TrainConfig:
    steps: int = opt(100, "Optimizer steps to run.")
    seed: int = opt(0, "Seed for data order, sampling and initialisation.")
    save_every: int = opt(10, "Save a checkpoint (and the adapters) every N steps (0 = only at the end).")
    keep_checkpoints: int = opt(3, "Keep the newest K checkpoints in <run>/checkpoints (0 = keep all).")
    run_name: str = opt("", "Run name; empty = a timestamp.")
    output_dir: str = opt("logs", "Root of logs/runs/<run> and logs/tensorboard/<run>.")

    def validate(self) -> None:
        require = checker("train.", self)
        require(self.steps >= 1, "steps", "must be at least 1")
        require(self.save_every >= 0, "save_every", "must be >= 0")
        require(self.keep_checkpoints >= 0, "keep_checkpoints", "must be >= 0")
        require(not self.run_name or "/" not in self.run_name and self.run_name not in (".", ".."), "run_name",
                "must be a plain directory name")


@dataclass
class LoggingConfig:
    wandb: str = opt("auto", "Mirror metrics to Weights & Biases: auto = when WANDB_API_KEY or WANDB_MODE is set; on "
                             "(W&B's own mode: online unless WANDB_MODE says otherwise); offline (into the run "
                             "directory, no account needed); off (also --no-wandb). true/false mean on/off.",
                     ("auto", "on", "offline", "off"))
    wandb_project: str = opt("mlx-grpo", "W&B project name.")
    sample_every: int = opt(5, "Write sample completions to completions.jsonl, and a few to a TensorBoard text "
                               "event, every N steps (0 = never).")
    histogram_every: int = opt(10, "Log reward histograms every N steps (once at least 10 samples exist).")
    entropy_dump_every: int = opt(0, "Every N steps write the per-token entropy and varentropy of the sampling policy "
                                     "to <run>/entropy_data/entropy_step_NNNNNN.safetensors (0 = never; never to W&B). "
                                     "scripts/entropy_report.py plots them.")

    def validate(self) -> None:
        require = checker("logging.", self)
        require(self.sample_every >= 0, "sample_every", "must be >= 0")
        require(self.histogram_every >= 1, "histogram_every", "must be at least 1")
        require(self.entropy_dump_every >= 0, "entropy_dump_every", "must be >= 0")


@dataclass
class EvalConfig:
    every: int = opt(0, "During training, evaluate on a fixed held-out subset every N steps and log eval/* "
                        "(0 = never). `uv run eval` evaluates a finished run.")
    num_prompts: int = opt(50, "Held-out prompts in that subset (`uv run eval` uses data.test_size).")
    samples: int = opt(1, "Completions per held-out prompt; pass@k is reported for k up to this.")
    temperature: float = opt(0.0, "Sampling temperature for evaluation (0 = greedy: one deterministic answer).")
    dataset: str = opt("", "Held-out prompts: empty = the built-in task's test split; else a JSONL file.")

    def validate(self) -> None:
        require = checker("eval.", self)
        require(self.every >= 0, "every", "must be >= 0")
        require(self.num_prompts >= 1, "num_prompts", "must be at least 1")
        require(self.samples >= 1, "samples", "must be at least 1")
        require(self.temperature >= 0, "temperature", "must be >= 0")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    task: dict = opt({}, "Options of the built-in task named by data.dataset, e.g. --task.list_size 4. largest: "
                         "list_size (3; how many numbers each question lists, 3-5 are its levels), min_list_size (0; "
                         "above 0, each question lists between this many and list_size), max_value (99). "
                         "arithmetic: max_ops (1; operations per problem, 1-3), max_operand (20). Every task: "
                         "instruction (the text after each question; empty = the task's own).")
    rubric: str = opt("rubrics/largest.yaml", "Path to the rubric YAML that scores completions. Edits to it apply from the next step.")
    teacher_cache: str = opt("", "Teacher score cache (sqlite). Empty = teacher_cache.sqlite in the run directory; "
                                 "a shared path such as ~/.cache/mlx-grpo/teacher.sqlite reuses scores across runs.")
    reward: RewardConfig = field(default_factory=RewardConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def validate(self) -> None:
        """Each section checks its own ranges; the checks that join two sections are here."""
        require = checker("", self)
        for name, _, kind in iter_fields():  # .inf and .nan would pass the range checks
            if kind is float:
                require(math.isfinite(functools.reduce(getattr, name.split("."), self)), name, "must be a finite number")
        for section in (self.model, self.lora, self.data, self.rollout, self.grpo, self.optim, self.train,
                        self.logging, self.eval):
            section.validate()
        require(bool(self.rubric), "rubric", "must name a rubric YAML file")
        check_task_options(self.data.dataset, self.task)
        require(not (self.grpo.reward_aggregation == "normalize_then_sum" and self.rollout.sgrpo),
                "grpo.reward_aggregation",
                "normalize_then_sum does not go with rollout.sgrpo, whose rewards come from the exit order, not the criteria")
        require(self.grpo.overlong_penalty == 0 or 1 <= self.grpo.overlong_buffer <= self.rollout.max_new_tokens,
                "grpo.overlong_buffer", "must be between 1 and rollout.max_new_tokens when grpo.overlong_penalty is on")
        n = self.rollout.batch_size * self.rollout.group_size
        require(n % self.optim.grad_accum_steps == 0, "optim.grad_accum_steps",
                f"must divide the batch_size * group_size = {n} completions")


def iter_fields(cls=Config, prefix: str = ""):
    """Yield (dotted_name, dataclass_field) for every leaf option."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        name = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(hints[f.name]):
            yield from iter_fields(hints[f.name], name + ".")
        else:
            yield name, f, hints[f.name]


# Settings of earlier versions. A config file that uses one gets a one-line message naming what
# to write instead; a run directory's own config.yaml (written by an earlier version) is read
# with the new names, and without the removed settings.
RENAMED = {
    "logging.correct_criterion": "reward.correct_criterion",  # correctness is a reward concept, not a log's
    "logging.correct_threshold": "reward.correct_threshold",
    "grpo.sgrpo": "rollout.sgrpo",  # S-GRPO changes how a group is sampled
    "grpo.sgrpo_answer_tokens": "rollout.sgrpo_answer_tokens",
    "logging.wandb_mode": "logging.wandb",  # one W&B switch: auto, on, offline, off
    **{f"data.{name}": f"task.{name}"  # options of one built-in task, checked by that task
       for name in ("instruction", "list_size", "min_list_size", "max_value", "max_ops", "max_operand")},
}
REMOVED = {  # setting: (its earlier default, what holds now)
    "rollout.window_min_tokens": (4, "the adaptive window's floor is 4 tokens"),
    "rollout.window_margin": (4, "the adaptive window adds 4 tokens of margin"),
    "rollout.window_percentile": (95.0, "the adaptive window covers the 95th percentile"),
    "rollout.window_epsilon": (0.1, "the adaptive window explores on one step in ten"),
    "rollout.window_history": (256, "the adaptive window remembers the latest 256 successes"),
    "data.curriculum_window": (64, "the curriculum's accuracy is over the level's latest 64 completions"),
    "data.on_bad_line": ("error", "a malformed JSONL line is always an error naming its line"),
    "train.max_nonfinite_skips": (5, "training stops after 5 non-finite updates in a row"),
    "grpo.logprob_chunk_size": (64, "log-probs are computed 64 positions at a time"),
    "eval.chunk_rows": (64, "evaluation generates 64 completions at a time"),
    "logging.system_interval_s": (1.0, "System/* is sampled every second"),
    "logging.performance_every": (10, "Performance/Generation_* is logged every step"),
}
# logging.wandb_mode's values, as logging.wandb values (a run's old config.yaml)
_OLD_WANDB_MODES = {"online": "on", "offline": "offline", "disabled": "off"}


def old_name_message(dotted: str) -> str | None:
    """The one-line message for a setting of an earlier version, or None for any other name."""
    if dotted in RENAMED:
        new = RENAMED[dotted]
        choices = dict((n, f.metadata.get("choices")) for n, f, _ in iter_fields()).get(new)
        return f"'{dotted}' is now '{new}'" + (f" ({', '.join(choices)})" if choices else "")
    if dotted in REMOVED:
        return f"'{dotted}' was removed: {REMOVED[dotted][1]}"
    return None


def dropped_settings(run_dir: Path) -> list[str]:
    """The removed settings that a run recorded by an earlier version had changed from their
    default, each with what holds now: a resumed run continues without them."""
    path = Path(run_dir) / "config.yaml"
    flat = _flatten(_read_yaml(path)) if path.is_file() else {}
    return [f"{name} was {flat[name]!r}; now {now}" for name, (default, now) in REMOVED.items()
            if name in flat and flat[name] != default]


def _coerce(value: Any, kind, where: str) -> Any:
    """Check a YAML/CLI value against the field's type; ints are accepted for floats."""
    if kind is dict:
        if not isinstance(value, dict):
            raise UserInputError(f"{where}: expected a mapping, got {value!r}")
        return value
    if isinstance(kind, types.GenericAlias) or kind is list:
        if not isinstance(value, list):
            raise UserInputError(f"{where}: expected a list, got {value!r}")
        return value
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise UserInputError(f"{where}: expected true or false, got {value!r}")
    if kind in (int, float) and isinstance(value, str):
        try:  # PyYAML reads 1e-3 (no dot, no sign after e) as a string
            value = float(value) if kind is float else int(value)
        except ValueError:
            raise UserInputError(f"{where}: expected {kind.__name__}, got {value!r}") from None
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise UserInputError(f"{where}: expected {kind.__name__}, got {value!r}")
    return value


def _apply(cfg: Config, dotted: str, value: Any, source: str) -> None:
    if dotted.startswith("task."):  # one option of the built-in task (checked by it in validate)
        cfg.task = {**cfg.task, dotted[len("task."):]: value}
        return
    leaves = {name: (f, kind) for name, f, kind in iter_fields()}
    if dotted not in leaves:
        old = old_name_message(dotted)
        if old is not None:
            raise UserInputError(f"{source}: {old}")
        section = dotted.split(".")[0] + "."
        siblings = [n for n in leaves if n.startswith(section)]
        hint = f" (valid: {', '.join(siblings)})" if siblings else ""
        raise UserInputError(f"{source}: unknown key '{dotted}'{hint}")
    f, kind = leaves[dotted]
    if dotted == "logging.wandb" and isinstance(value, bool):
        value = "on" if value else "off"  # `wandb: false` reads naturally in YAML
    if dotted == "grpo.loss_type" and value == "dapo":
        value = "bnpo"  # DAPO's token-level mean is bnpo's
    value = _coerce(value, kind, f"{source}: {dotted}")
    choices = f.metadata.get("choices")
    if choices and value not in choices:
        raise UserInputError(f"{source}: {dotted} must be one of {', '.join(choices)}, got {value!r}")
    *parents, leaf = dotted.split(".")
    target = cfg
    for p in parents:
        target = getattr(target, p)
    setattr(target, leaf, value)


def _flatten(tree: dict) -> dict[str, Any]:
    """{'grpo': {'beta': 0.1}} -> {'grpo.beta': 0.1}; sections are one level deep."""
    sections = {name.split(".")[0] for name, _, _ in iter_fields() if "." in name} | {"task"}
    flat = {}
    for key, value in tree.items():
        if key in sections and isinstance(value, dict):
            flat.update({f"{key}.{child}": v for child, v in value.items()})
        else:
            flat[str(key)] = value
    return flat


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None,
                earlier_version: bool = False) -> Config:
    """Defaults, then the YAML file, then dotted overrides; then validation. `earlier_version`:
    the file is a run's own record, whose old setting names are read as today's."""
    if path is None:
        return _build({}, "", overrides)
    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"{path}: config file not found")
    tree = _read_yaml(path)
    tree.pop("resolved_model", None)  # a run's config.yaml records the model directory it loaded
    return _build(tree, str(path), overrides, earlier_version)


def _build(tree: dict, source: str, overrides: dict[str, Any] | None, earlier_version: bool = False) -> Config:
    cfg = Config()
    flat = _flatten(tree)
    if earlier_version:
        flat = _today_names(flat)
    for dotted, value in flat.items():
        _apply(cfg, dotted, value, source)
    if earlier_version:  # an old record lists every task's options, but its task takes only its own
        cfg.task = {k: v for k, v in cfg.task.items() if k in task_option_defaults(cfg.data.dataset)}
    for dotted, value in (overrides or {}).items():
        _apply(cfg, dotted, value, "command line")
    cfg.validate()
    return cfg


def _today_names(flat: dict[str, Any]) -> dict[str, Any]:
    """A run's recorded settings under today's names, without the removed ones."""
    today = {}
    for dotted, value in flat.items():
        if dotted == "logging.wandb_mode":
            if value in _OLD_WANDB_MODES and flat.get("logging.wandb") != "off":
                today["logging.wandb"] = _OLD_WANDB_MODES[value]
        elif dotted not in REMOVED:
            today[RENAMED.get(dotted, dotted)] = value
    return today


def _read_yaml(path: Path) -> dict:
    """A config file's mapping; any problem is one UserInputError naming the file (and line)."""
    try:
        tree = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError:
        raise UserInputError(f"{path}: not valid UTF-8 text") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise UserInputError(f"{path}{line}: invalid YAML ({getattr(err, 'problem', None) or err})") from None
    if not isinstance(tree, dict):
        raise UserInputError(f"{path}: the top level must be a mapping of sections")
    return tree


def load_run_config(run_dir: Path, overrides: dict[str, Any] | None = None) -> Config:
    """The config a run was started with (its config.yaml), then command-line overrides."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise UserInputError(f"{path} not found; is {run_dir} a run directory?")
    return load_config(path, overrides, earlier_version=True)


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def parse_cli_value(text: str) -> Any:
    """Parse an override value the way YAML would ('50' -> 50, 'true' -> True, '[a, b]' -> list)."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text
