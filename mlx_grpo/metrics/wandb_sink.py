"""Weights & Biases mirror of every metric, plus the W&B guide's rubric table and final summary.

`logging.wandb`: auto (on when WANDB_API_KEY or WANDB_MODE is in the environment), on (in W&B's own
mode, WANDB_MODE's when set), offline (into the run directory, no account needed) or off
(also `--no-wandb`). The API key is read by wandb from the environment only:
it is never in the run config.
"""

from __future__ import annotations

import html
import os
import uuid
from pathlib import Path

import numpy as np

from mlx_grpo.config import Config, to_dict

SUMMARY_COLUMNS = ["criterion", "mean", "std", "min", "max", "samples"]


def wandb_enabled(cfg: Config) -> bool:
    if cfg.logging.wandb != "auto":
        return cfg.logging.wandb != "off"
    return bool(os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_MODE"))


def run_config(cfg: Config) -> dict:
    """The fields of the W&B guide's run configuration that apply here, then the whole config."""
    lora = cfg.lora.fine_tune_type == "lora"
    return {
        "model_id": cfg.model.path,
        "num_steps": cfg.train.steps,
        "learning_rate": cfg.optim.learning_rate,
        "batch_size": cfg.rollout.batch_size * cfg.rollout.group_size // cfg.optim.grad_accum_steps,
        "use_lora": lora,
        "lora_rank": cfg.lora.rank if lora else None,
        "lora_alpha": cfg.lora.alpha if lora else None,
        "num_generations": cfg.rollout.group_size,
        "beta": cfg.grpo.beta,
        "epsilon": cfg.grpo.epsilon,
        "temperature": cfg.rollout.temperature,
        "max_generation_steps": cfg.rollout.max_new_tokens,
        "weight_decay": cfg.optim.weight_decay,
        "max_grad_norm": cfg.optim.max_grad_norm,
        "warmup_fraction": cfg.optim.warmup_steps / max(1, cfg.train.steps),
        "rubric_file": cfg.rubric,
        "rubric_weight": 1.0,  # the rubric is the whole reward
        "mlx_grpo": to_dict(cfg),
    }


class WandbSink:
    def __init__(self, cfg: Config, run_dir: Path, announce=print):
        import wandb  # imported lazily: it is slow to import and most runs don't use it

        self.wandb = wandb
        # The run id is kept in the run directory, so a resumed run continues the same W&B run.
        id_file = run_dir / "wandb_run_id"
        run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:8]
        id_file.write_text(run_id + "\n")
        mode = "offline" if cfg.logging.wandb == "offline" else None  # None: W&B's own (WANDB_MODE, else online)
        self.run = wandb.init(project=cfg.logging.wandb_project, name=run_dir.name, dir=str(run_dir),
                              config=run_config(cfg), mode=mode, id=run_id, resume="allow")
        where = self.run.url or f"offline, in {Path(self.run.dir).parent}"
        announce(f"W&B initialized: {where}")

    def log(self, step: int, record: dict) -> None:
        values = {}
        for key, value in record.items():
            if isinstance(value, np.ndarray):
                values[key] = self.wandb.Histogram(value.tolist())
            elif isinstance(value, (int, float)):
                values[key] = value
        self.run.log(values, step=step)

    def log_text(self, step: int, tag: str, text: str) -> None:
        self.run.log({tag: self.wandb.Html(f"<pre>{html.escape(text)}</pre>")}, step=step)

    def log_summary(self, step: int, scalars: dict[str, float], rows: list[list]) -> None:
        # Logged (not only put in the summary) so they mirror TensorBoard's final/* scalars.
        table = self.wandb.Table(columns=SUMMARY_COLUMNS, data=rows)
        self.run.log({**scalars, "rubric_criteria_summary": table}, step=step)

    def close(self) -> None:
        self.run.finish()
        # W&B keeps process-wide settings (mode, key) from its first run; drop them, so a later run
        # in this process reads its own settings and environment.
        self.wandb.teardown()
