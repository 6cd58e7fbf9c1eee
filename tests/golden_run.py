"""A seeded training run on the tiny random model whose logs are the golden record (test_golden_run.py).

    python tests/golden_run.py OUT VARIANT

Copies the run's metrics.jsonl and reward_breakdown.jsonl into OUT. Run it under MLX_GRPO_BLAS=none: the
reference BLAS computes the same bits on every x86 CPU, where OpenBLAS picks kernels per CPU model.
To regenerate the golden files after an intended change of behaviour:

    MLX_GRPO_BLAS=none python tests/golden_run.py tests/data/golden/VARIANT VARIANT
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import mlx_grpo  # noqa: E402,F401  (loads the BLAS before mlx.core)

from conftest import make_tiny_model  # noqa: E402
from dp_worker import ByteTokenizer, byte_score  # noqa: E402
from mlx_grpo import trainer  # noqa: E402
from mlx_grpo.config import load_config  # noqa: E402
from mlx_grpo.metrics import MetricsHub  # noqa: E402
from mlx_grpo.metrics.files import JsonlSink  # noqa: E402
from mlx_grpo.rewards import Scorer, load_rubric  # noqa: E402
from mlx_grpo.rewards.checks import CHECKS  # noqa: E402

RUBRIC = """name: golden
criteria:
  - {name: Bytes, weight: 0.7, check: byte_score}
  - {name: Answer, weight: 0.3, check: number_check, params: {untagged_credit: 1.0}}
"""
COMMON = {"train.steps": 4, "rollout.batch_size": 2, "rollout.group_size": 4, "rollout.max_new_tokens": 8,
          "rollout.temperature": 1.0, "optim.learning_rate": 1e-2, "optim.warmup_steps": 1, "lora.rank": 4,
          "train.save_every": 2, "logging.sample_every": 1,
          "logging.histogram_every": 2, "data.epoch_size": 6,
          "optim.bias_correction": False}  # pinned: the record predates the default's change
VARIANTS = {
    # A KL penalty (reference pass), two passes per batch and held-out evaluation.
    "kl_mu2_eval": {"grpo.beta": 0.05, "grpo.num_iterations": 2, "eval.every": 2, "eval.samples": 2,
                    "eval.temperature": 1.0},
    # The pipelined next batch, micro-batches, the per-sequence loss and the batch std.
    "pipeline_accum": {"rollout.pipeline": True, "optim.grad_accum_steps": 2, "grpo.loss_type": "grpo",
                       "grpo.scale_rewards": "batch"},
}


def main() -> None:
    out, variant = Path(sys.argv[1]), sys.argv[2]
    CHECKS["byte_score"] = byte_score
    out.mkdir(parents=True, exist_ok=True)
    run_dir = Path(tempfile.mkdtemp(prefix="golden-"))
    rubric_path = run_dir / "rubric.yaml"
    rubric_path.write_text(RUBRIC)
    cfg = load_config(None, {**COMMON, **VARIANTS[variant]})
    items = [{"prompt": f"Question {i}: what is {i} plus {i % 7}?", "answer": str(i + i % 7)} for i in range(12)]
    held_out = [{"prompt": f"Held out {i}: what is {i} plus 1?", "answer": str(i + 1)} for i in range(3)]
    hub = MetricsHub([JsonlSink(run_dir / "metrics.jsonl")])
    scorer = Scorer(load_rubric(rubric_path))
    try:
        trainer.train(cfg, make_tiny_model(seed=0), ByteTokenizer(), trainer.Prompts(items, held_out), scorer,
                      trainer.RunIO(run_dir, hub))
    finally:
        scorer.close()
        hub.close()
    for name in ("metrics.jsonl", "reward_breakdown.jsonl"):
        shutil.copy(run_dir / name, out / name)
    shutil.rmtree(run_dir)


if __name__ == "__main__":
    main()
