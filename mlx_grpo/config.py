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


def opt(default, help: str, choices: tuple | None = None):
    """A dataclass field with help text (and optionally the allowed values)."""
    meta = {"help": help, "choices": choices}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class ModelConfig:
    path: str = opt("smollm2-135m-instruct", "Model: built-in alias, Hugging Face id, local mlx-lm directory, or .gguf file.")
    dtype: str = opt("auto", "Weight dtype. 'auto' is bfloat16 on a Mac's GPU (Metal) and float32 on a CPU, where "
                             "bfloat16 matmuls are slow. 'native' keeps the checkpoint's dtype (a 4-bit model stays "
                             "quantised: QLoRA).", ("auto", "float32", "float16", "bfloat16", "native"))


@dataclass
class LoraConfig:
    fine_tune_type: str = opt("lora", "'lora' trains low-rank adapters; 'full' trains every weight.", ("lora", "full"))
    rank: int = opt(8, "LoRA rank.")
    alpha: float = opt(16.0, "LoRA alpha; the adapter output is scaled by alpha / rank.")
    dropout: float = opt(0.0, "Dropout on the LoRA input.")
    num_layers: int = opt(-1, "Adapt the last N transformer blocks (-1 = all).")
    target_modules: list = opt([], "Linear layers to adapt, e.g. [self_attn.q_proj, self_attn.v_proj]; empty = mlx-lm's default set.")


@dataclass
class DataConfig:
    dataset: str = opt("largest", "A built-in task name ('largest', 'arithmetic' or 'coding') or a path to a JSONL "
                                  "file with a 'prompt' field.")
    train_size: int = opt(2000, "Number of training prompts generated for built-in tasks (one epoch).")
    test_size: int = opt(200, "Number of held-out prompts generated for built-in tasks.")
    instruction: str = opt("", "Built-in tasks: the instruction after each question; empty = the task's own "
                               "(largest: 'Answer with just the number.').")
    list_size: int = opt(3, "Largest task difficulty: how many numbers each question lists (3-5 are its levels).")
    min_list_size: int = opt(0, "Largest task: when above 0 and below list_size, each question lists between this many "
                                "and list_size numbers, so one dataset holds several difficulty levels.")
    max_value: int = opt(99, "Largest task: the numbers are drawn from 1 to this.")
    max_ops: int = opt(1, "Arithmetic task difficulty: at most this many operations per problem (1-3).")
    max_operand: int = opt(20, "Arithmetic task difficulty: largest number in a problem.")
    system_prompt: str = opt("", "System prompt; empty = the task's default. A dataset row's 'system' field wins.")
    on_bad_line: str = opt("error", "What to do with a malformed JSONL line.", ("error", "skip"))
    curriculum: bool = opt(False, "Sample the easiest difficulty level first; the next level joins the pool once the "
                                  "current one's recent accuracy reaches curriculum_threshold.")
    curriculum_threshold: float = opt(0.7, "Curriculum: the accuracy (pass@1 rule) that unlocks the next level.")
    curriculum_window: int = opt(64, "Curriculum: that accuracy is over the current level's last N scored completions.")
    epoch_size: int = opt(80, "Prompts per epoch for the Epoch/* metrics (80: the demo's 100 steps of 4 prompts show "
                              "5 epochs); 0 = one pass over the training prompts.")


@dataclass
class RolloutConfig:
    batch_size: int = opt(4, "Prompts per step (B).")
    group_size: int = opt(8, "Completions per prompt (G); advantages are relative within a group.")
    max_new_tokens: int = opt(8, "Maximum completion length in tokens (the demo's answers take 2 to 8; word "
                                 "problems with reasoning need about 64, code 256).")
    temperature: float = opt(1.0, "Sampling temperature.")
    top_p: float = opt(1.0, "Nucleus sampling threshold (1.0 = off).")
    adaptive_window: bool = opt(False, "Set each step's max_new_tokens from the recent successful completions' lengths "
                                       "(their window_percentile plus window_margin, within [window_min_tokens, "
                                       "max_new_tokens]); a step explores at max_new_tokens with probability window_epsilon.")
    window_min_tokens: int = opt(4, "Adaptive window: the smallest budget it may set.")
    window_margin: int = opt(4, "Adaptive window: tokens of room above that percentile.")
    window_percentile: float = opt(95.0, "Adaptive window: the percentile of the successful lengths the window covers.")
    window_epsilon: float = opt(0.1, "Adaptive window: the chance that a step explores at the full max_new_tokens.")
    window_history: int = opt(256, "Adaptive window: how many of the latest successful lengths it remembers.")
    dynamic_sampling: bool = opt(False, "DAPO's dynamic sampling: drop the groups whose rewards are all equal (no "
                                        "signal) and draw more prompts until batch_size groups with a spread exist, "
                                        "or max_resample_batches batches were drawn (then dropped groups fill the rest).")
    max_resample_batches: int = opt(3, "Dynamic sampling: the most batches of batch_size prompts drawn per step, "
                                       "the first included.")
    pipeline: bool = opt(False, "Generate the next batch while the teacher scores this one. That batch then trains one "
                                "update late, with its importance ratio taken against the policy that sampled it. "
                                "Pays off when teacher latency is a large part of a step.")


@dataclass
class GRPOConfig:
    beta: float = opt(0.0, "Weight of the k3 KL penalty to the reference (base) model; 0 skips the reference pass.")
    epsilon: float = opt(0.2, "Lower clip range of the importance ratio: 1 - epsilon.")
    epsilon_high: float = opt(0.28, "Upper clip range: 1 + epsilon_high (DAPO's clip-higher).")
    loss_type: str = opt("bnpo", "Loss aggregation: grpo (per-sequence mean), bnpo/dapo (token mean), dr_grpo (sum / (N * max_len)).",
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
    sgrpo: bool = opt(False, "S-GRPO (serial group): per prompt, one full reasoning path, then G - 1 answers from exits "
                             "cut inside its <reasoning>; correct answers earn 1, 1/2, 1/4, ... by exit order, wrong "
                             "ones 0, and the advantage is the reward minus the group mean. It replaces the parallel group.")
    sgrpo_answer_tokens: int = opt(16, "S-GRPO: the most tokens an early exit's answer may take.")
    logprob_chunk_size: int = opt(64, "Completion positions per chunk when computing log-probs (bounds the logits memory).")


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


@dataclass
class TrainConfig:
    steps: int = opt(100, "Optimizer steps to run.")
    seed: int = opt(0, "Seed for data order, sampling and initialisation.")
    save_every: int = opt(10, "Save a checkpoint (and the adapters) every N steps (0 = only at the end).")
    keep_checkpoints: int = opt(3, "Keep the newest K checkpoints in <run>/checkpoints (0 = keep all).")
    max_nonfinite_skips: int = opt(5, "Stop after this many consecutive updates skipped for a NaN/inf loss or gradient.")
    run_name: str = opt("", "Run name; empty = a timestamp.")
    output_dir: str = opt("logs", "Root of logs/runs/<run> and logs/tensorboard/<run>.")


@dataclass
class LoggingConfig:
    wandb: str = opt("auto", "Mirror metrics to Weights & Biases: auto = when WANDB_API_KEY (or a W&B mode) is set; "
                             "on; off (also --no-wandb). true/false mean on/off.", ("auto", "on", "off"))
    wandb_mode: str = opt("", "W&B mode: online, offline (no account needed) or disabled; empty = W&B's default "
                              "(WANDB_MODE).", ("", "online", "offline", "disabled"))
    wandb_project: str = opt("mlx-grpo", "W&B project name.")
    sample_every: int = opt(5, "Write sample completions to completions.jsonl, and a few to a TensorBoard text "
                               "event, every N steps (0 = never).")
    performance_every: int = opt(10, "Log Performance/Generation_TokensPerSec and _Time every N batches "
                                     "(the running averages and percentiles are logged every step).")
    histogram_every: int = opt(10, "Log reward histograms every N steps (once at least 10 samples exist).")
    correct_criterion: str = opt("", "Criterion whose score decides 'correct' for pass_at_1 / pass_at_all "
                                     "(batch_metrics.jsonl) and eval accuracy; empty = the rubric's `correct:` "
                                     "criterion, or the total reward when it names none.")
    correct_threshold: float = opt(1.0, "A completion is correct when that score is >= this.")
    entropy_dump_every: int = opt(0, "Every N steps write the per-token entropy and varentropy of the sampling policy "
                                     "to <run>/entropy_data/entropy_step_NNNNNN.safetensors (0 = never; never to W&B). "
                                     "scripts/entropy_report.py plots them.")
    system_interval_s: float = opt(1.0, "Seconds between System/* samples (taken in a background thread).")


@dataclass
class EvalConfig:
    every: int = opt(0, "During training, evaluate on a fixed held-out subset every N steps and log eval/* "
                        "(0 = never). `uv run eval` evaluates a finished run.")
    num_prompts: int = opt(50, "Held-out prompts in that subset (`uv run eval` uses data.test_size).")
    samples: int = opt(1, "Completions per held-out prompt; pass@k is reported for k up to this.")
    temperature: float = opt(0.0, "Sampling temperature for evaluation (0 = greedy: one deterministic answer).")
    dataset: str = opt("", "Held-out prompts: empty = the built-in task's test split; else a JSONL file.")
    chunk_rows: int = opt(64, "Completions generated together per evaluation batch (bounds memory).")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rubric: str = opt("rubrics/largest.yaml", "Path to the rubric YAML that scores completions. Edits to it apply from the next step.")
    teacher_cache: str = opt("", "Teacher score cache (sqlite). Empty = teacher_cache.sqlite in the run directory; "
                                 "a shared path such as ~/.cache/mlx-grpo/teacher.sqlite reuses scores across runs.")
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


def iter_fields(cls=Config, prefix: str = ""):
    """Yield (dotted_name, dataclass_field) for every leaf option."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        name = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(hints[f.name]):
            yield from iter_fields(hints[f.name], name + ".")
        else:
            yield name, f, hints[f.name]


def _coerce(value: Any, kind, where: str) -> Any:
    """Check a YAML/CLI value against the field's type; ints are accepted for floats."""
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
    leaves = {name: (f, kind) for name, f, kind in iter_fields()}
    if dotted not in leaves:
        section = dotted.split(".")[0] + "."
        siblings = [n for n in leaves if n.startswith(section)]
        hint = f" (valid: {', '.join(siblings)})" if siblings else ""
        raise UserInputError(f"{source}: unknown key '{dotted}'{hint}")
    f, kind = leaves[dotted]
    if f.metadata.get("choices") == ("auto", "on", "off") and isinstance(value, bool):
        value = "on" if value else "off"  # `wandb: false` reads naturally in YAML
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
    sections = {name.split(".")[0] for name, _, _ in iter_fields() if "." in name}
    flat = {}
    for key, value in tree.items():
        if key in sections and isinstance(value, dict):
            flat.update({f"{key}.{child}": v for child, v in value.items()})
        else:
            flat[str(key)] = value
    return flat


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Defaults, then the YAML file, then dotted overrides; then validation."""
    if path is None:
        return _build({}, "", overrides)
    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"{path}: config file not found")
    tree = _read_yaml(path)
    tree.pop("resolved_model", None)  # a run's config.yaml records the model directory it loaded
    return _build(tree, str(path), overrides)


def _build(tree: dict, source: str, overrides: dict[str, Any] | None) -> Config:
    cfg = Config()
    for dotted, value in _flatten(tree).items():
        _apply(cfg, dotted, value, source)
    for dotted, value in (overrides or {}).items():
        _apply(cfg, dotted, value, "command line")
    validate(cfg)
    return cfg


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
    return load_config(path, overrides)


def validate(cfg: Config) -> None:
    """Range checks that types alone cannot express."""
    def require(ok: bool, key: str, what: str):
        if not ok:
            value = cfg
            for p in key.split("."):
                value = getattr(value, p)
            raise UserInputError(f"config: {key} {what}, got {value!r}")

    for name, _, kind in iter_fields():  # .inf and .nan would pass the range checks below
        if kind is float:
            require(math.isfinite(functools.reduce(getattr, name.split("."), cfg)), name, "must be a finite number")
    require(cfg.rollout.group_size >= 2, "rollout.group_size", "must be at least 2 (advantages compare completions within a group)")
    require(cfg.rollout.batch_size >= 1, "rollout.batch_size", "must be at least 1")
    require(cfg.rollout.max_new_tokens >= 1, "rollout.max_new_tokens", "must be at least 1")
    require(cfg.rollout.temperature >= 0, "rollout.temperature", "must be >= 0")
    require(0 < cfg.rollout.top_p <= 1, "rollout.top_p", "must be in (0, 1]")
    require(cfg.lora.rank >= 1, "lora.rank", "must be at least 1")
    require(cfg.lora.alpha > 0, "lora.alpha", "must be positive")
    require(0 <= cfg.lora.dropout < 1, "lora.dropout", "must be in [0, 1)")
    require(cfg.lora.num_layers == -1 or cfg.lora.num_layers >= 1, "lora.num_layers", "must be -1 (all) or at least 1")
    require(cfg.grpo.beta >= 0, "grpo.beta", "must be >= 0")
    require(cfg.grpo.epsilon > 0, "grpo.epsilon", "must be positive")
    require(cfg.grpo.epsilon_high > 0, "grpo.epsilon_high", "must be positive")
    require(cfg.grpo.importance_sampling_level == "token" or cfg.grpo.loss_type != "dr_grpo",
            "grpo.importance_sampling_level", "sequence (GSPO) is length-normalised and does not go with "
            "loss_type dr_grpo; use grpo, bnpo or dapo")
    per_criterion = cfg.grpo.reward_aggregation == "normalize_then_sum"
    require(not (per_criterion and cfg.grpo.sgrpo), "grpo.reward_aggregation",
            "normalize_then_sum does not go with grpo.sgrpo, whose rewards come from the exit order, not the criteria")
    require(not (per_criterion and cfg.grpo.overlong_penalty > 0), "grpo.reward_aggregation",
            "normalize_then_sum does not go with grpo.overlong_penalty (a reward term outside the rubric's criteria)")
    require(cfg.rollout.max_resample_batches >= 1, "rollout.max_resample_batches", "must be at least 1")
    require(not (cfg.rollout.dynamic_sampling and cfg.rollout.pipeline), "rollout.dynamic_sampling",
            "does not go with rollout.pipeline, which must sample the next batch before this one's scores are known")
    require(cfg.grpo.tis_cap == 0 or cfg.grpo.tis_cap >= 1, "grpo.tis_cap", "must be 0 (off) or at least 1")
    require(0 < cfg.grpo.top_entropy_quantile <= 1, "grpo.top_entropy_quantile", "must be in (0, 1]")
    require(cfg.grpo.num_iterations >= 1, "grpo.num_iterations", "must be at least 1")
    require(cfg.grpo.logprob_chunk_size >= 1, "grpo.logprob_chunk_size", "must be at least 1")
    require(cfg.optim.learning_rate > 0, "optim.learning_rate", "must be positive")
    require(cfg.optim.weight_decay >= 0, "optim.weight_decay", "must be >= 0")
    require(cfg.optim.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0")
    require(0 <= cfg.optim.min_lr_ratio <= 1, "optim.min_lr_ratio", "must be in [0, 1]")
    require(cfg.optim.max_grad_norm >= 0, "optim.max_grad_norm", "must be >= 0")
    require(cfg.optim.grad_accum_steps >= 1, "optim.grad_accum_steps", "must be at least 1")
    n = cfg.rollout.batch_size * cfg.rollout.group_size
    require(n % cfg.optim.grad_accum_steps == 0, "optim.grad_accum_steps",
            f"must divide the batch_size * group_size = {n} completions")
    require(cfg.train.steps >= 1, "train.steps", "must be at least 1")
    require(cfg.train.save_every >= 0, "train.save_every", "must be >= 0")
    require(cfg.train.keep_checkpoints >= 0, "train.keep_checkpoints", "must be >= 0")
    require(cfg.train.max_nonfinite_skips >= 1, "train.max_nonfinite_skips", "must be at least 1")
    require(cfg.data.train_size >= 1, "data.train_size", "must be at least 1")
    require(cfg.data.test_size >= 0, "data.test_size", "must be >= 0")
    require(cfg.data.max_ops >= 1, "data.max_ops", "must be at least 1")
    require(cfg.data.list_size >= 2, "data.list_size", "must be at least 2")
    require(cfg.data.max_value >= cfg.data.list_size, "data.max_value", "must be at least data.list_size (the numbers are distinct)")
    require(cfg.data.max_operand >= 2, "data.max_operand", "must be at least 2")
    require(cfg.logging.sample_every >= 0, "logging.sample_every", "must be >= 0")
    require(cfg.logging.performance_every >= 1, "logging.performance_every", "must be at least 1")
    require(cfg.logging.histogram_every >= 1, "logging.histogram_every", "must be at least 1")
    require(cfg.data.min_list_size == 0 or 2 <= cfg.data.min_list_size <= cfg.data.list_size, "data.min_list_size",
            "must be 0 (off) or between 2 and data.list_size")
    require(0 <= cfg.data.curriculum_threshold <= 1, "data.curriculum_threshold", "must be in [0, 1]")
    require(cfg.data.curriculum_window >= 1, "data.curriculum_window", "must be at least 1")
    require(1 <= cfg.rollout.window_min_tokens <= cfg.rollout.max_new_tokens, "rollout.window_min_tokens",
            "must be between 1 and rollout.max_new_tokens")
    require(cfg.rollout.window_margin >= 0, "rollout.window_margin", "must be >= 0")
    require(0 < cfg.rollout.window_percentile <= 100, "rollout.window_percentile", "must be in (0, 100]")
    require(0 <= cfg.rollout.window_epsilon <= 1, "rollout.window_epsilon", "must be in [0, 1]")
    require(cfg.rollout.window_history >= 1, "rollout.window_history", "must be at least 1")
    require(cfg.grpo.overlong_penalty >= 0, "grpo.overlong_penalty", "must be >= 0")
    require(cfg.grpo.overlong_penalty == 0 or 1 <= cfg.grpo.overlong_buffer <= cfg.rollout.max_new_tokens,
            "grpo.overlong_buffer", "must be between 1 and rollout.max_new_tokens when grpo.overlong_penalty is on")
    require(cfg.grpo.sgrpo_answer_tokens >= 1, "grpo.sgrpo_answer_tokens", "must be at least 1")
    require(cfg.logging.entropy_dump_every >= 0, "logging.entropy_dump_every", "must be >= 0")
    require(cfg.logging.system_interval_s > 0, "logging.system_interval_s", "must be positive")
    require(cfg.eval.every >= 0, "eval.every", "must be >= 0")
    require(cfg.eval.num_prompts >= 1, "eval.num_prompts", "must be at least 1")
    require(cfg.eval.samples >= 1, "eval.samples", "must be at least 1")
    require(cfg.eval.temperature >= 0, "eval.temperature", "must be >= 0")
    require(cfg.eval.chunk_rows >= 1, "eval.chunk_rows", "must be at least 1")
    require(cfg.data.epoch_size >= 0, "data.epoch_size", "must be >= 0")
    require(bool(cfg.rubric), "rubric", "must name a rubric YAML file")
    require(bool(cfg.model.path.strip()), "model.path", "must name a model (built-in alias, HF id, directory or .gguf)")
    require(all(isinstance(m, str) and m.strip() for m in cfg.lora.target_modules), "lora.target_modules",
            "must be a list of layer names such as [q_proj, v_proj]")
    require(not cfg.train.run_name or "/" not in cfg.train.run_name and cfg.train.run_name not in (".", ".."),
            "train.run_name", "must be a plain directory name")


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def parse_cli_value(text: str) -> Any:
    """Parse an override value the way YAML would ('50' -> 50, 'true' -> True, '[a, b]' -> list)."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text
