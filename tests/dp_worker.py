"""One rank of a data-parallel training run on the tiny random model (run by test_distributed.py).

    python dp_worker.py OUT --batch-size B --steps N [--resume]

Launched alone it is a single process; under mlx.launch (or with MLX_RANK / MLX_HOSTFILE set) it
is one rank of several. Completions are sampled with a seed per prompt (each prompt generated on
its own), so the same prompt gets the same completions whichever rank, or batch, it lands in;
the reward is a fixed function of the text. Each rank saves its final weights as rank<R>.safetensors.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import mlx_grpo  # noqa: E402,F401  (loads the optimised BLAS before mlx.core)

import mlx.core as mx  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402

from conftest import make_tiny_model  # noqa: E402
from mlx_grpo import rollout_source, trainer  # noqa: E402
from mlx_grpo.checkpoint import latest_checkpoint  # noqa: E402
from mlx_grpo.config import load_config  # noqa: E402
from mlx_grpo.distributed import init_world  # noqa: E402
from mlx_grpo.metrics import MetricsHub  # noqa: E402
from mlx_grpo.metrics.files import JsonlSink  # noqa: E402
from mlx_grpo.rewards import Scorer, load_rubric  # noqa: E402
from mlx_grpo.rewards.checks import CHECKS  # noqa: E402
from mlx_grpo.rollout import Rollout  # noqa: E402


class ByteTokenizer:
    """Text as UTF-8 bytes: ids 0..255, the tiny model's vocabulary."""

    chat_template = None
    eos_token_ids = list(range(32))  # control bytes end a completion: lengths vary, as the test needs

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(ids).decode("utf-8", errors="replace")


def byte_score(completion: str, sample: dict) -> float:
    """A deterministic score that differs between completions, so groups have advantages."""
    return (sum(completion.encode("utf-8")) % 97) / 96


def per_prompt_rollout(model, prompts, *, group_size, **kwargs) -> Rollout:
    """generate_rollout one prompt at a time, seeded by the prompt's tokens."""
    parts = []
    for prompt in prompts:
        mx.random.seed(int(hashlib.sha1(bytes(prompt)).hexdigest()[:8], 16))
        parts.append(GENERATE(model, [prompt], group_size=group_size, **kwargs))
    return Rollout(*(sum((getattr(p, name) for p in parts), []) for name in ("prompt_tokens", "completion_tokens",
                                                                              "finish_reasons")),
                   prefill_time_s=sum(p.prefill_time_s for p in parts),
                   generation_time_s=sum(p.generation_time_s for p in parts),
                   logprobs=sum((p.logprobs for p in parts), []))


GENERATE = rollout_source.generate_rollout


def scripted_score(completion: str, sample: dict) -> float:
    """byte_score on prompts whose number is divisible by 3; 0.5 (a group with no spread) elsewhere."""
    return byte_score(completion, sample) if int(sample["prompt"].split()[1].rstrip(":")) % 3 == 0 else 0.5


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--batch-size", type=int, required=True)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--stop-after", type=int, default=0, help="Rank 0 asks to stop (as Ctrl-C) after N steps.")
    parser.add_argument("--loss-type", default="bnpo")
    parser.add_argument("--dynamic-sampling", action="store_true",
                        help="rollout.dynamic_sampling, with prompts not divisible by 3 all scoring 0.5")
    args = parser.parse_args()

    CHECKS["byte_score"] = scripted_score if args.dynamic_sampling else byte_score
    rollout_source.generate_rollout = per_prompt_rollout
    world = init_world()
    args.out.mkdir(parents=True, exist_ok=True)
    rubric_path = args.out / f"rubric{world.rank}.yaml"
    rubric_path.write_text("name: bytes\ncriteria:\n  - {name: Bytes, weight: 1, check: byte_score}\n")
    cfg = load_config(None, {
        "train.steps": args.steps, "rollout.batch_size": args.batch_size, "rollout.group_size": 4,
        "rollout.max_new_tokens": 8, "rollout.temperature": 1.0, "optim.learning_rate": 1e-2,
        "optim.warmup_steps": 0, "train.save_every": 1, "logging.sample_every": 1, "grpo.loss_type": args.loss_type,
        "lora.rank": 4, "rollout.dynamic_sampling": args.dynamic_sampling, "rollout.max_resample_batches": 8})
    run_dir = args.out / "run"
    items = [{"prompt": f"Question {i}: what is {i} plus {i % 7}?", "answer": str(i + i % 7)} for i in range(16)]
    if world.is_main:
        run_dir.mkdir(exist_ok=True)
    hub = MetricsHub([JsonlSink(run_dir / "metrics.jsonl")] if world.is_main else [])
    scorer = Scorer(load_rubric(rubric_path))
    model = make_tiny_model(seed=0)
    steps_done = []

    def should_stop() -> bool:  # asked once per step
        steps_done.append(1)
        return world.is_main and len(steps_done) == args.stop_after

    try:
        trainer.train(cfg, model, ByteTokenizer(), trainer.Prompts(items), scorer, trainer.RunIO(
            run_dir, hub, should_stop=should_stop, resume=latest_checkpoint(run_dir) if args.resume else None), world)
    finally:
        scorer.close()
        hub.close()
    # Every rank saves the weights it holds (rank 0 alone writes the run's adapters).
    mx.save_safetensors(str(args.out / f"rank{world.rank}.safetensors"), dict(tree_flatten(model.trainable_parameters())))


if __name__ == "__main__":
    main()
