"""The mlx-lm-lora side of scripts/bench_e2e.py: its GRPO trainer (`train_grpo`), called in-process.

Run by bench_e2e.py inside `uv run --with mlx-lm-lora ...` (mlx-lm-lora is not a project
dependency). Configured to match our side:
- model: mlx-lm-lora's own loader (`from_pretrained`) on the same mlx-lm directory (fp32),
  LoRA on the same blocks with the same rank and scale;
- prompts: the same token ids (our chat-template prompts), in the same order (our PromptSampler);
- reward: our rubric's programmatic checks, wrapped in mlx-lm-lora's reward-function signature;
- sampling: temperature 0.8, no top-p/top-k/min-p, stop on EOS only (no "</answer>" stop string);
- loss: bnpo, beta 0 (so no reference model is loaded or run), epsilon 0.2 / 0.28, one pass;
- optimizer: the same AdamW schedule object our trainer builds;
- no validation passes, adapters saved once at the end, no fusing.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import mlx_grpo  # noqa: F401,E402  (the same optimised BLAS as our side, loaded before mlx.core)

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402
import bench_e2e  # noqa: E402
from bench_e2e import BENCH_DIR, StepClock, bench_config, bench_items, worker_result  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--settings", required=True, help="JSON settings from bench_e2e.py")
    parser.add_argument("--model-dir", required=True, help="mlx-lm model directory")
    parser.add_argument("--out", required=True, help="where to write the JSON result")
    args = parser.parse_args(argv)
    s = json.loads(args.settings)
    bench_e2e.PROCESS_PEAK = bench_e2e.ProcessPeak()  # same peak accounting as our side

    from mlx_lm.tuner.callbacks import TrainingCallback
    from mlx_lm_lora.trainer import grpo_trainer
    from mlx_lm_lora.utils import from_pretrained

    from mlx_grpo.data import PromptSampler, build_prompt_tokens
    from mlx_grpo.rewards import load_rubric, score_completions
    from mlx_grpo.policy import build_optimizer

    cfg = bench_config(s)
    model, tokenizer, _ = from_pretrained(
        model=args.model_dir,
        lora_config={"rank": s["lora_rank"], "dropout": 0.0, "scale": s["lora_alpha"] / s["lora_rank"],
                     "use_dora": False, "num_layers": s["lora_layers"]})
    rubric = load_rubric(cfg.rubric)

    # mlx-lm-lora's dataset rows: (prompt ids, answer ids, prompt text, answer text, type); the
    # "type" slot carries our sample dict, which its reward functions receive as `types`.
    dataset = [(build_prompt_tokens(tokenizer, item, None), tokenizer.encode(item["answer"]), item["prompt"],
                item["answer"], item) for item in bench_items(cfg)]

    def same_order_batches(dataset, batch_size, max_seq_length, train=False):
        """Our trainer's prompt order (its own iterator sorts by length and shuffles)."""
        sampler = PromptSampler(dataset, seed=cfg.train.seed)
        while True:
            rows = sampler.next_batch(batch_size)
            yield ([r[0][:max_seq_length] for r in rows], [r[1] for r in rows], [r[2] for r in rows],
                   [r[3] for r in rows], [r[4] for r in rows])

    def rubric_reward(prompts, completions, answer, types=None):
        return score_completions(rubric, list(types), list(completions)).rewards.tolist()

    clock = StepClock()
    generate = grpo_trainer.generate_grpo

    def counted_generate(**kwargs):
        """Its rollout, unchanged, with the tokens it produced and the time it took recorded."""
        start = time.perf_counter()
        completions, texts, indices = generate(**kwargs)
        prompts = kwargs["prompt_tokens"]
        clock.rollout(time.perf_counter() - start, [len(prompts[i]) for i in indices],
                      [int(c.size) for c in completions])
        return completions, texts, indices

    grpo_trainer.generate_grpo = counted_generate  # train_grpo looks the name up at call time

    class Steps(TrainingCallback):
        def on_train_loss_report(self, info):  # steps_per_report=1: once per iteration
            # (it steps the optimizer every iteration, whatever the rewards)
            clock.step_done(updated=True, reward=info.get("train_total_rewards_mean"))

    run_dir = Path(tempfile.mkdtemp(prefix="e2e-peer-", dir=BENCH_DIR))
    steps = s["warmup_steps"] + s["timed_steps"]
    training_args = grpo_trainer.GRPOTrainingArgs(
        batch_size=s["batch_size"], iters=steps, val_batches=0, steps_per_report=1,
        steps_per_eval=10**9, steps_per_save=10**9, adapter_file=str(run_dir / "adapters.safetensors"),
        max_seq_length=4096, max_completion_length=s["max_new_tokens"], grad_checkpoint=False,
        beta=s["beta"], group_size=s["group_size"], epsilon=s["epsilon"], epsilon_high=s["epsilon_high"],
        temperature=s["temperature"], top_p=s["top_p"], top_k=0, min_p=0.0, grpo_loss_type=s["loss_type"],
        gradient_accumulation_steps=1, importance_sampling_level="token")
    mx.random.seed(s["seed"])
    np.random.seed(s["seed"])
    clock.last = time.perf_counter()
    try:
        grpo_trainer.train_grpo(
            model=model, ref_model=None, tokenizer=tokenizer, optimizer=build_optimizer(cfg),
            train_dataset=dataset, val_dataset=None, reward_funcs=[rubric_reward], args=training_args,
            iterate_batches=same_order_batches, training_callback=Steps(), end_answer_token="")
    finally:
        if not s.get("keep"):
            shutil.rmtree(run_dir, ignore_errors=True)

    versions = {p: importlib.metadata.version(p) for p in ("mlx", "mlx-lm", "mlx-lm-lora")}
    result = worker_result(clock.steps, s["warmup_steps"], trainer="mlx-lm-lora", versions=versions,
                           lora_layers=len(model.layers) if s["lora_layers"] == -1 else s["lora_layers"])
    Path(args.out).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
