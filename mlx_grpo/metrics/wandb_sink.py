"""Optional Weights & Biases mirror. Set WANDB_MODE=offline to log without an account."""

from __future__ import annotations

from pathlib import Path

from mlx_grpo.config import Config, to_dict


class WandbSink:
    def __init__(self, cfg: Config, run_dir: Path):
        import wandb  # imported lazily: it is slow to import and most runs don't use it

        # The config holds no secrets: API keys are only ever read from the environment.
        self.run = wandb.init(project=cfg.logging.wandb_project, name=run_dir.name, dir=str(run_dir),
                              config=to_dict(cfg))

    def log(self, step: int, record: dict[str, float]) -> None:
        self.run.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=step)

    def log_text(self, step: int, tag: str, text: str) -> None:
        import html

        import wandb

        self.run.log({tag: wandb.Html(f"<pre>{html.escape(text)}</pre>")}, step=step)

    def close(self) -> None:
        self.run.finish()
